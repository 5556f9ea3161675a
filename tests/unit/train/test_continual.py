"""Multi-task mixing, replay, EWC and sequential stages on the tiny Llama."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import ConfigError

from tuneforge.plugins import validate_config
from tuneforge.data.load import load_rows
from tuneforge.objectives import OBJECTIVES
from tuneforge.train.continual import diagonal_fisher, ewc_penalty
from tuneforge.train.multitask import load_tasks, mixture_probs, sample_mixture, training_mixture
from tuneforge.train.sequence import run_sequence, stage_configs


def test_mixture_probs_weights_and_temperature():
    assert mixture_probs([900, 100], [None, None], 1.0) == pytest.approx([0.9, 0.1])
    assert mixture_probs([900, 100], [None, None], 2.0) == pytest.approx([0.75, 0.25])  # sqrt sizes
    assert mixture_probs([900, 100], [None, None], 1e6) == pytest.approx([0.5, 0.5], abs=1e-4)
    assert mixture_probs([900, 100], [1.0, 3.0], 1.0) == pytest.approx([0.25, 0.75])  # weights win


def test_sampled_proportions_match_the_probabilities_over_seeds():
    pools = [[{"t": 0, "i": i} for i in range(500)], [{"t": 1, "i": i} for i in range(50)],
             [{"t": 2, "i": i} for i in range(20)]]
    probs = [0.6, 0.3, 0.1]
    for seed in range(5):
        rows, counts = sample_mixture(pools, probs, 3000, seed)
        assert sum(counts) == len(rows) == 3000
        assert [c / 3000 for c in counts] == pytest.approx(probs, abs=0.03)
        assert [sum(r["t"] == t for r in rows) for t in range(3)] == counts
    assert sample_mixture(pools, probs, 100, 1) == sample_mixture(pools, probs, 100, 1)
    rows, _ = sample_mixture(pools, [1.0, 0, 0], 400, 0)  # below the pool size: no repeats
    assert len({r["i"] for r in rows}) == 400


def _raw_two_tasks(tiny_raw_cfg, **continual):
    raw = tiny_raw_cfg | {"data": tiny_raw_cfg["data"] | {"train": ["builtin:orders?n=200&seed=3"]}}
    prev = {"name": "reviews", "train": ["builtin:reviews?n=200&seed=4"]}
    return raw | {"continual": {"previous": [prev], **continual}}


def test_replay_mixes_the_configured_share_of_earlier_training_rows_only(tiny_raw_cfg, tiny_tok):
    cfg = validate_config(_raw_two_tasks(tiny_raw_cfg, replay_share=0.3))
    tasks = load_tasks(cfg, tiny_tok, OBJECTIVES["sft"])
    rows, mix = training_mixture(tasks, cfg)
    main, earlier = tasks
    n_main = len(main.enc["train"].rows)
    assert mix["rows"] == len(rows) == -(-n_main * 10 // 7)  # the new task keeps its size
    assert mix["tasks"]["replay"]["share"] == pytest.approx(0.3, abs=0.05)
    ids = lambda rs: {tuple(r["input_ids"]) for r in rs}  # noqa: E731
    replayed = [r for r in rows if tuple(r["input_ids"]) not in ids(main.enc["train"].rows)]
    assert len(replayed) == mix["tasks"]["replay"]["rows"]
    assert ids(replayed) <= ids(earlier.enc["train"].rows)
    # The earlier task's held-out rows are never replayed (same seed and sizes as its own run).
    held = {json.dumps(r["messages"]) for r in earlier.splits.test + earlier.splits.validation}
    assert held and not held & {json.dumps(r["messages"]) for r in earlier.splits.train}
    no_replay, _ = training_mixture(tasks, validate_config(_raw_two_tasks(tiny_raw_cfg)))
    assert no_replay == main.enc["train"].rows


def test_multitask_config_rejects_half_weighted_tasks(tiny_raw_cfg):
    data = {k: v for k, v in tiny_raw_cfg["data"].items() if k != "train"}
    tasks = [{"name": "a", "train": ["builtin:orders"], "weight": 2.0}, {"name": "b", "train": ["builtin:reviews"]}]
    with pytest.raises(ConfigError, match="every task or on none"):
        validate_config(tiny_raw_cfg | {"data": data | {"tasks": tasks}})
    with pytest.raises(ConfigError, match="either data.train"):
        validate_config(tiny_raw_cfg | {"data": tiny_raw_cfg["data"] | {"tasks": tasks[1:]}})


def test_ewc_penalty_is_zero_at_the_anchor_quadratic_and_fisher_weighted():
    g = torch.Generator().manual_seed(0)
    anchor = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    fisher = {"a": torch.rand(3, 4, generator=g), "b": torch.rand(5, generator=g)}
    d = {k: torch.randn(v.shape, generator=g) for k, v in anchor.items()}
    at = lambda t, f=fisher: float(ewc_penalty({k: anchor[k] + t * d[k] for k in anchor}, anchor, f))  # noqa: E731
    assert at(0.0) == 0.0
    assert at(2.0) == pytest.approx(4 * at(1.0)) and at(3.0) == pytest.approx(9 * at(1.0))
    assert at(1.0) == pytest.approx(float(sum((fisher[k] * d[k] ** 2).sum() for k in anchor)))
    zero_b = fisher | {"b": torch.zeros(5)}  # unimportant weights move for free
    assert at(1.0, zero_b) == pytest.approx(float((fisher["a"] * d["a"] ** 2).sum()))
    assert at(1.0, {k: 2 * v for k, v in fisher.items()}) == pytest.approx(2 * at(1.0))


def test_diagonal_fisher_is_the_squared_gradient_of_each_example(tiny_model_dir, tiny_tok):
    from tuneforge.data.render import encode_rows, pad_batch
    from tuneforge.methods import METHODS
    from tuneforge.objectives import OBJECTIVES
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = METHODS["lora"]
    model = lora.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora.options(name="lora", r=2))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # B=0 at init would zero A's gradient
    rows, _ = load_rows(["builtin:orders?n=2&seed=5"])
    batches = [pad_batch([r], tiny_tok.pad_token_id) for r in encode_rows(tiny_tok, rows, 160, "drop").rows]
    sft = OBJECTIVES["sft"]
    opts = sft.options()
    fisher = diagonal_fisher(model, sft, opts, batches, device="cpu", dtype=torch.float32, hidden_path=True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expect = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in batches:
        loss, count = sft.loss(model.eval(), b, opts, hidden_path=False)
        grads = torch.autograd.grad(loss / count, list(params.values()))
        for n, gr in zip(params, grads):
            expect[n] += gr ** 2 / len(batches)
    assert set(fisher) == set(params)
    for n in params:
        assert torch.allclose(fisher[n], expect[n], rtol=1e-4, atol=1e-10), n
    assert all(float(f.sum()) > 0 for f in fisher.values())


def _fisher_distance(run_dir, anchor, fisher):
    """sum F (w - w*)^2 of a run's final adapter (adapter keys lack peft's ".default")."""
    w = load_file(str(run_dir / "adapter/adapter_model.safetensors"))
    key = lambda n: n.replace(".default", "")  # noqa: E731
    return float(ewc_penalty({n: w[key(n)] for n in fisher}, {n: anchor[key(n)] for n in fisher}, fisher))


def test_sequence_continues_from_the_previous_stage_and_ewc_holds_weights(tiny_raw_cfg):
    base = {k: v for k, v in tiny_raw_cfg.items() if k not in ("run_name",)}
    base["data"] = {k: v for k, v in base["data"].items() if k != "train"}
    base["train"] = base["train"] | {"max_steps": 4, "save_every": 0, "eval_every": 0}
    base["eval"] = base["eval"] | {"limit": 2, "baseline": False}
    raw = base | {"run_name": "seq", "stages": [
        {"name": "orders", "data": {"train": ["builtin:orders?n=100&seed=3"]}},
        {"name": "reviews", "data": {"train": ["builtin:reviews?n=100&seed=4"]}}]}
    stages = stage_configs(raw)
    assert stages[1].train.init_from == str(stages[0].output_dir + "/" + stages[0].run_name)
    assert [t.name for t in stages[1].continual.previous] == ["orders"]
    root = run_sequence(stages)
    s0, s1 = root / "00-orders", root / "01-reviews"
    anchor = load_file(str(s0 / "adapter/adapter_model.safetensors"))
    # Stage 2 starts exactly where stage 1 ended (its step-0 checkpoint holds stage 1's adapter).
    start = load_file(str(s1 / "checkpoints/step-000000/trainable.safetensors"))
    assert {k.replace(".default", ""): v for k, v in start.items()}.keys() == anchor.keys()
    assert all(torch.equal(start[k], anchor[k.replace(".default", "")]) for k in start)
    seq = json.loads((root / "sequence.json").read_text())
    assert set(seq["forgetting"]) == {"orders", "reviews"}
    assert seq["forgetting"]["orders"]["after"][0] is not None and seq["forgetting"]["orders"]["forgetting"] is not None
    val = [json.loads(x) for x in (s1 / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert {"val_loss/orders", "val_loss/reviews"} <= set(val[-1])  # the earlier task is validated too

    ewc = stage_configs(raw | {"run_name": "seq-ewc", "continual": {"ewc_lambda": 1e5, "fisher_rows": 8}})
    ewc_root = root.parent / "seq-ewc"
    (ewc_root / "00-orders").parent.mkdir(parents=True)
    import shutil

    shutil.copytree(s0, ewc_root / "00-orders")  # same first stage, so only EWC differs
    run_sequence(ewc)
    assert json.loads((ewc_root / "01-reviews/metrics.jsonl").read_text().splitlines()[0])["ewc_penalty"] >= 0
    fisher = load_file(str(ewc_root / "01-reviews/fisher.safetensors"))
    # EWC holds the weights the earlier task relies on: far less Fisher-weighted movement.
    assert _fisher_distance(ewc_root / "01-reviews", anchor, fisher) < 0.3 * _fisher_distance(s1, anchor, fisher)
