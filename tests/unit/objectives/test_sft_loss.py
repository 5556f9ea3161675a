import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge.data.render import IGNORE, encode_rows, pack_rows, packed_batch, pad_batch
from tuneforge.data.builtin import orders
from tuneforge.data.formats import FORMATS
from tuneforge.objectives.sft import masked_ce_from_hidden, masked_ce_from_logits
from tuneforge.objectives import OBJECTIVES


def test_masked_ce_matches_torch_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[IGNORE, 3, 4, IGNORE, IGNORE], [IGNORE, IGNORE, 1, 2, 10]])
    total, n = masked_ce_from_logits(logits, labels)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                                            ignore_index=IGNORE, reduction="sum")
    assert int(n) == 5 and torch.allclose(total, ref)


def test_logits_only_at_trained_positions_gives_the_same_loss():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13, bias=False)
    hidden = torch.randn(3, 6, 8)
    labels = torch.randint(0, 13, (3, 6))
    labels[:, :2] = IGNORE
    a, na = masked_ce_from_hidden(hidden, labels, head)
    b, nb = masked_ce_from_logits(head(hidden), labels)
    assert int(na) == int(nb) and torch.allclose(a, b, atol=1e-5)


def _head_ce_pair(autocast: bool, monkeypatch):
    """(loss, d loss/d hidden) from the chunked path (several chunks) and from the plain one."""
    from tuneforge.objectives import sft as sft_mod

    monkeypatch.setattr(sft_mod, "CHUNK_VALUES", 4 * 13)  # 4 rows a chunk: 17 trained rows -> 5 chunks
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13, bias=False).requires_grad_(False)
    hidden = torch.randn(3, 7, 8)
    labels = torch.randint(0, 13, (3, 7))
    labels[:, :1] = IGNORE
    labels[0, 4] = IGNORE
    out = []
    for chunked in (True, False):
        h = hidden.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if chunked:
                assert sft_mod.chunkable(head)
                loss, n = masked_ce_from_hidden(h, labels, head)
            else:
                loss, n = masked_ce_from_logits(head(h), labels)
        (loss * 0.5).backward()  # a scaled loss, as the training loop's 1/tokens
        out.append((loss.detach(), h.grad, int(n)))
    return out


def test_chunked_head_ce_matches_the_plain_loss_and_gradient(monkeypatch):
    (a, ga, na), (b, gb, nb) = _head_ce_pair(False, monkeypatch)
    assert na == nb == 17
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(ga, gb, atol=1e-6)
    assert ga.abs().sum() > 0 and (ga[:, -1] == 0).all()  # the last position predicts nothing


def test_chunked_head_ce_under_bf16_autocast_stays_within_rounding(monkeypatch):
    (a, ga, _), (b, gb, _) = _head_ce_pair(True, monkeypatch)
    assert torch.allclose(a, b, rtol=1e-3) and torch.allclose(ga, gb, atol=2e-3, rtol=2e-2)


def test_a_trained_head_keeps_the_plain_path_and_gets_its_gradient():
    from tuneforge.objectives.sft import chunkable

    head = torch.nn.Linear(8, 13, bias=False)
    assert not chunkable(head) and not chunkable(torch.nn.Linear(8, 13).requires_grad_(False))
    loss, _ = masked_ce_from_hidden(torch.randn(2, 5, 8), torch.randint(0, 13, (2, 5)), head)
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def _rows(tok, n=6):
    convert = FORMATS["instruction"].convert
    return encode_rows(tok, [convert(r, {}) for r in orders(n=n, seed=5)], 512, "drop").rows


def test_objective_hidden_path_equals_full_logits_on_a_model(tiny_model_dir, tiny_tok):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = pad_batch(_rows(tiny_tok), tiny_tok.pad_token_id)
    sft = OBJECTIVES["sft"]
    with torch.no_grad():
        a, n = sft.loss(model, batch, None, hidden_path=True)
        b, m = sft.loss(model, batch, None, hidden_path=False)
    assert int(n) == int(m) > 0 and torch.allclose(a, b, rtol=1e-5)


def test_packed_batch_gives_the_same_per_example_loss_as_unpacked(tiny_model_dir, tiny_tok):
    """Packed rows must not attend across examples: the loss of each example is unchanged."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = _rows(tiny_tok)
    sft = OBJECTIVES["sft"]
    with torch.no_grad():
        singles = [sft.loss(model, pad_batch([r], 0), None, hidden_path=True)[0] for r in rows]
        bins = pack_rows(rows, max_length=400)
        assert any(len(b) > 1 for b in bins)
        packed, n = sft.loss(model, packed_batch(bins, tiny_tok.pad_token_id), None, hidden_path=True)
        padded, m = sft.loss(model, pad_batch(rows, tiny_tok.pad_token_id), None, hidden_path=True)
    assert int(n) == int(m)
    assert torch.allclose(packed, sum(singles), rtol=1e-4)
    assert torch.allclose(padded, sum(singles), rtol=1e-4)


def test_padding_free_batch_gives_the_padded_loss_and_gradients(tiny_model_dir, tiny_tok):
    """Rows laid end to end with per-example attention (train/varlen.py): same loss and the
    same gradients as the padded batch, so the speed-up changes nothing that is learned."""
    from tuneforge.train import varlen

    rows = _rows(tiny_tok)
    sft = OBJECTIVES["sft"]
    results = []
    for padding_free in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        if padding_free:
            assert varlen.enable(model)
            batch = packed_batch([rows], tiny_tok.pad_token_id)
            assert batch["input_ids"].shape[0] == 1 and (batch["input_ids"] == tiny_tok.pad_token_id).sum() == 0
        else:
            batch = pad_batch(rows, tiny_tok.pad_token_id)
        loss, n = sft.loss(model, batch, None, hidden_path=True)
        loss.backward()
        results.append((loss.detach(), int(n), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    (a, na, ga), (b, nb, gb) = results
    assert na == nb and torch.allclose(a, b, rtol=1e-5)
    assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6)


def test_padding_free_batch_under_bf16_autocast_with_fp32_weights(tiny_model_dir, tiny_tok):
    """Full fine-tuning's set-up (fp32 weights, bf16 autocast): mixed-dtype queries and keys reach
    the attention; the padding-free loss still matches the padded one to bf16 precision."""
    from tuneforge.train import varlen

    rows = _rows(tiny_tok)
    sft = OBJECTIVES["sft"]
    losses = []
    for padding_free in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        batch = pad_batch(rows, tiny_tok.pad_token_id)
        if padding_free:
            assert varlen.enable(model)
            batch = packed_batch([rows], tiny_tok.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, n = sft.loss(model, batch, None, hidden_path=True)
        loss.backward()
        assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
        losses.append(float(loss.detach()) / int(n))
    assert abs(losses[0] - losses[1]) < 0.02 * abs(losses[0])


def test_padding_free_attention_leaves_padded_batches_and_generation_unchanged(tiny_model_dir, tiny_tok):
    from tuneforge.train import varlen

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    fast = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert varlen.enable(fast)
    batch = pad_batch(_rows(tiny_tok, n=3), tiny_tok.pad_token_id)
    prompt = torch.tensor([batch["input_ids"][0, :12].tolist()])
    with torch.no_grad():
        for m in (plain, fast):
            m.generation_config.pad_token_id = tiny_tok.pad_token_id
        assert torch.allclose(plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              fast(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              atol=1e-5)
        assert torch.equal(plain.generate(prompt, max_new_tokens=6, do_sample=False),
                           fast.generate(prompt, max_new_tokens=6, do_sample=False))
        # Several full-length rows (CPT blocks): no padding, so transformers drops the mask and
        # passes one [1, L] row of positions for the whole batch; every row must still attend.
        full = batch["input_ids"][:, :10]
        ones = torch.ones_like(full)
        assert torch.allclose(plain(input_ids=full, attention_mask=ones).logits,
                              fast(input_ids=full, attention_mask=ones).logits, atol=1e-5)


def test_varlen_segments_follow_position_resets():
    from tuneforge.train.varlen import segments

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert segments(pos) == [(0, 0, 3), (0, 3, 5), (0, 5, 9)]


def test_rows_laid_end_to_end_never_predict_the_next_examples_first_token():
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    b = packed_batch([rows], pad_id=0)
    targets = b["labels"][0, 1:]
    assert int((targets != IGNORE).sum()) == 2 + 1  # 3-token row: 2 targets, 2-token row: 1, none across


@pytest.mark.parametrize("explicit_max", [0, 10_000], ids=["flash-backward", "explicit-backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_attention_gradients_match_float64_attention(monkeypatch, explicit_max, dtype):
    """VarlenAttentionFn's two backward paths against autograd through plain causal softmax
    attention in float64, per example, with grouped-query heads (6 query heads on 2 keys)."""
    from tuneforge.train import varlen

    monkeypatch.setattr(varlen, "EXPLICIT_BACKWARD_MAX", explicit_max)
    monkeypatch.setattr(varlen, "EXPLICIT_BACKWARD_MAX_FP32", explicit_max)
    gen = torch.Generator().manual_seed(0)
    bounds = ((0, 0, 7), (0, 7, 19), (1, 0, 19))
    q, k, v = (torch.randn(2, h, 19, 16, generator=gen).to(dtype).requires_grad_() for h in (6, 2, 2))
    grad = torch.randn(2, 19, 6, 16, generator=gen).to(dtype)
    out = varlen.VarlenAttentionFn.apply(q, k, v, bounds, 0.25)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.zeros(2, 19, 6, 16, dtype=torch.float64)
    for b, s, e in bounds:
        kk, vv = (t[b, :, s:e].repeat_interleave(3, 0) for t in (k64, v64))
        scores = (q64[b, :, s:e] @ kk.transpose(1, 2)) * 0.25
        scores = scores.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
        ref[b, s:e] = (scores.softmax(-1) @ vv).transpose(0, 1)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    tol = 1e-5 if dtype == torch.float32 else 0.05
    assert (out.double() - ref).abs().max() < tol
    for got, want in ((dq, rq), (dk, rk), (dv, rv)):
        assert (got.double() - want).abs().max() < tol * max(1.0, float(want.abs().max()))


def _prefixed_rows(tiny_tok):
    """Chat rows that share a system prompt and an instruction, as a classification file does."""
    convert = FORMATS["chat"].convert
    rows = [{"messages": [{"role": "system", "content": "You label reviews as positive or negative, one word."},
                          {"role": "user", "content": f"Review: {text}"},
                          {"role": "assistant", "content": label}]}
            for text, label in (("great film, loved it", "positive"), ("dull and far too long", "negative"),
                                ("the cast shines", "positive"))]
    return encode_rows(tiny_tok, [convert(r, {}) for r in rows], 400, "drop").rows


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_rows_sharing_a_prefix_compute_it_once_with_the_same_loss_and_gradients(tiny_model_dir, tiny_tok, autocast):
    """shared_prefix_batch lays the rows' common untrained prefix once, each row's own tokens
    after it at their own positions; the loss and every gradient are those of the plain
    padding-free batch (LoRA-free model: no dropout to differ)."""
    from tuneforge.data.render import shared_prefix, shared_prefix_batch
    from tuneforge.train import varlen

    rows = _prefixed_rows(tiny_tok)
    n = shared_prefix(rows)
    first_trained = min(next(i for i, x in enumerate(r["labels"]) if x != IGNORE) for r in rows)
    assert 16 <= n < first_trained  # the system prompt and more, but never a trained token
    shared = shared_prefix_batch(rows, tiny_tok.pad_token_id)
    plain = packed_batch([rows], tiny_tok.pad_token_id)
    assert shared["input_ids"].shape[1] == plain["input_ids"].shape[1] - 2 * n  # the prefix once, not 3 times
    assert int(shared["n_real"]) == int(plain["n_real"])
    sft = OBJECTIVES["sft"]
    results = []
    for batch in (plain, shared):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        assert varlen.enable(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, count = sft.loss(model, batch, None, hidden_path=True)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), int(count), grads))
    (a, na, ga), (b, nb, gb) = results
    assert na == nb and torch.allclose(a, b, rtol=1e-2 if autocast else 1e-5)
    assert ga.keys() == gb.keys()
    for k in ga:
        scale = float(ga[k].abs().max()) or 1.0
        assert (ga[k] - gb[k]).abs().max() <= (2e-2 if autocast else 1e-4) * scale, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_shared_attention_gradients_match_float64_masked_attention(dtype):
    """Attention for rows sharing a prefix against autograd through dense masked
    softmax attention in float64: two rows (one with a 5-token prefix and two continuations,
    one plain example), grouped-query heads. The prefix's key/value gradients sum over the
    prefix's own causal attention and every continuation's."""
    from tuneforge.train.varlen import prefix_shared_attention, segments

    torch.manual_seed(0)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 5, 6, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]])
    bounds = segments(pos)
    firsts = [int(pos[b, s]) for b, s, _ in bounds]
    assert firsts == [0, 5, 5, 0]
    allowed = torch.zeros(2, 14, 14, dtype=torch.bool)  # who each query may read, row by row
    for (b, s, e), p in zip(bounds, firsts):
        allowed[b, s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        allowed[b, s:e, :p] = True
    q, k, v = (torch.randn(2, h, 14, 8, dtype=torch.float64) for h in (6, 2, 2))
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    rq, rk, rv = ref_in
    scores = rq @ rk.repeat_interleave(3, dim=1).transpose(-1, -2) * 0.3
    ref = (scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1) @ rv.repeat_interleave(3, dim=1))
    ref = ref.transpose(1, 2)
    got_in = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    got = prefix_shared_attention(*got_in, bounds, firsts, 0.3, 3)
    assert got.shape == ref.shape == (2, 14, 6, 8)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    got.backward(grad.to(dtype))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert (got.double() - ref).abs().max() <= tol * ref.abs().max()
    for g, r in zip(got_in, ref_in):
        assert (g.grad.double() - r.grad).abs().max() <= 2 * tol * r.grad.abs().max()


def test_rows_without_a_long_enough_common_prefix_stay_plain(tiny_tok):
    from tuneforge.data.render import shared_prefix, shared_prefix_batch

    rows = [{"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE, IGNORE, IGNORE, 4, 5]},
            {"input_ids": [1, 2, 9, 9, 9], "labels": [IGNORE, IGNORE, IGNORE, 9, 9]}]
    assert shared_prefix(rows) == 2 and shared_prefix_batch(rows, 0) is None  # below 16 tokens
    assert shared_prefix_batch(rows, 0, min_prefix=2)["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 4]]
    # a prefix never reaches a trained token, nor the token its last position predicts
    trained_early = [{"input_ids": [1, 2, 3, 4], "labels": [IGNORE, 2, 3, 4]}, {"input_ids": [1, 2, 3, 5], "labels": [IGNORE] * 3 + [5]}]
    assert shared_prefix(trained_early) == 0
