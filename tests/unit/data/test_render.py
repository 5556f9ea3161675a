import pytest
import torch

from tuneforge.data.render import IGNORE, RenderError, encode_rows, pack_rows, packed_batch, pad_batch, render_chat

CONV = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "a b c"},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "world"}]


def test_labels_cover_exactly_the_responses_plus_eos(tiny_tok):
    ids, labels = render_chat(tiny_tok, CONV)
    trained = tiny_tok.decode([t for t in labels if t != IGNORE])
    assert trained == "a b c<|im_end|>world<|im_end|>"
    eos_positions = [i for i, t in enumerate(ids) if t == tiny_tok.eos_token_id]
    # eos closing the user turns is not trained; eos closing assistant turns is.
    assert [labels[i] != IGNORE for i in eos_positions] == [False, True, False, True]
    # trained positions carry their own token id
    assert all(lab in (IGNORE, tok) for lab, tok in zip(labels, ids))


def test_overlength_rows_are_counted_never_hidden(tiny_tok):
    rows = [{"messages": CONV, "_where": "f.jsonl:1"}, {"messages": CONV[:2], "_where": "f.jsonl:2"}]
    n_long = len(render_chat(tiny_tok, CONV)[0])
    limit = n_long - 3
    dropped = encode_rows(tiny_tok, rows, limit, "drop")
    assert len(dropped.rows) == 1 and dropped.dropped["longer than max_length"] == 1
    assert "f.jsonl:1" in dropped.examples[0]
    truncated = encode_rows(tiny_tok, rows, limit, "truncate")
    assert len(truncated.rows) == 2 and truncated.truncated == 1
    assert len(truncated.rows[0]["input_ids"]) == limit
    with pytest.raises(RenderError, match=r"f.jsonl:1: \d+ tokens > data.max_length"):
        encode_rows(tiny_tok, rows, limit, "error")


def test_system_prompt_is_added_only_when_missing(tiny_tok):
    enc = encode_rows(tiny_tok, [{"messages": CONV[:2]}], 512, "drop", system_prompt="Be brief.")
    text = tiny_tok.decode(enc.rows[0]["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_pad_and_pack_batches_keep_every_token():
    rows = [{"input_ids": [5] * n, "labels": [IGNORE] + [5] * (n - 1)} for n in (3, 5, 4, 2)]
    b = pad_batch(rows, pad_id=0)
    assert b["input_ids"].shape == (4, 5) and int(b["n_real"]) == 14
    bins = pack_rows(rows, max_length=8)
    assert sorted(len(r["input_ids"]) for b_ in bins for r in b_) == [2, 3, 4, 5]
    assert all(sum(len(r["input_ids"]) for r in b_) <= 8 for b_ in bins)
    p = packed_batch(bins, pad_id=0)
    assert int(p["n_real"]) == 14
    assert (p["position_ids"] == 0).sum() == 4  # one reset per packed example
    assert "attention_mask" not in p
    assert torch.equal((p["labels"] != IGNORE).sum(), (b["labels"] != IGNORE).sum())
