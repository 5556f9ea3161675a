"""Adapter merging on the embedded SmolLM2-135M: two LoRA runs on two tasks (orders -> JSON,
reviews -> JSON), merged on ΔW by each static `--how` (truncation error per rank), and fused
(learned per-layer weights), with the fusion's per-task table against each adapter alone and the
equal-weight linear merge. Baseline of the ratios: the issue-30 report, where peft's linear
merge of A and B landed 93% away from the weighted ΔW sum.

    python benchmarks/adapter_merging.py --out /tmp/merging [--steps 30] [--fusion-steps 30] [--limit 16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tuneforge.deploy.fusion import EVAL_FILE, fuse_adapters
from tuneforge.deploy.merge import MERGE_FILE, merge_adapters, read_lora
from tuneforge.plugins import validate_config
from tuneforge.train.run import train


def lora_run(out: Path, task: str, a) -> Path:
    if (out / task / "adapter").is_dir():
        return out / task
    cfg = {"model": {"name": "smollm2-135m-instruct"},
           "data": {"train": [f"builtin:{task}?n={a.rows}&seed=1"], "max_length": 160, "overlength": "truncate"},
           "method": {"name": "lora", "r": 8, "alpha": 16},
           "train": {"max_steps": a.steps, "batch_size": 4, "lr": 1e-3, "eval_every": 0, "save_every": 0},
           "eval": {"limit": a.limit, "max_new_tokens": 48, "batch_size": 8, "baseline": False},
           "output_dir": str(out), "run_name": task}
    return train(validate_config(cfg))


def relative_error(merged: Path, runs: list[Path], weights: list[float]) -> float:
    """||ΔW_merged - Σ w ΔW_i|| / ||Σ w ΔW_i|| over all modules."""
    got, ins = read_lora(merged / "adapter"), [read_lora(r / "adapter") for r in runs]
    num = den = 0.0
    for m in got.pairs:
        target = sum(w * lo.delta(m) for w, lo in zip(weights, ins))
        num += float((got.delta(m) - target).norm() ** 2)
        den += float(target.norm() ** 2)
    return (num / den) ** 0.5


def main(a) -> None:
    out = Path(a.out)
    runs = [lora_run(out, t, a) for t in ("orders", "reviews")]
    print("| how | rank | reported truncation error | ||ΔW - Σ w ΔW_i|| / ||Σ w ΔW_i|| |")
    print("|---|---|---|---|")
    for how, rank in (("linear", None), ("linear", 8), ("linear", 4), ("ties", None), ("dare_ties", None)):
        folder = merge_adapters(runs, [0.5, 0.5], how, out / f"merged-{how}-{rank}", rank=rank, seed=0)
        t = json.loads((folder / MERGE_FILE).read_text())["truncation"]
        vs = f"{relative_error(folder, runs, [0.5, 0.5]):.2e}" if how == "linear" else "(not a weighted sum)"
        print(f"| {how} | {t['rank']} | {t['relative_frobenius_error']:.2e} | {vs} |")
    fused = fuse_adapters(runs, out / "fusion", [f"train.max_steps={a.fusion_steps}", f"eval.limit={a.limit}"])
    table = json.loads((fused / EVAL_FILE).read_text())
    print(json.dumps(table, indent=1))
    weights = json.loads((fused / "adapter" / "fusion.json").read_text())["weights"]
    print("learned weights (orders, reviews) per layer:", {g: w for g, w in list(weights.items())[::6]})


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--fusion-steps", type=int, default=30)
    p.add_argument("--limit", type=int, default=16)
    main(p.parse_args())
