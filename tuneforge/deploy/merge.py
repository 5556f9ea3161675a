"""Merge several LoRA runs on the same base into one standard peft adapter folder
(peft ``add_weighted_adapter``).

- linear: weighted sum of the adapters' A and B matrices, each scaled by sqrt(weight x
  the adapter's alpha/r) (same rank needed). The merged delta B@A then includes cross
  terms between adapters: it is not the weighted sum of the deltas;
- ties: TIES-merging (trim to the top ``density`` share of each task vector, elect signs,
  average the agreeing entries);
- dare_linear / dare_ties: DARE (randomly drop 1-``density`` of each task vector and
  rescale) followed by a linear / TIES combination.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tuneforge.config import ConfigError
from tuneforge.io import atomic_dir, check_output, write_json
from tuneforge.models.load import load_causal_lm, load_tokenizer
from tuneforge.runs import load_run_config

HOWS = ("linear", "ties", "dare_linear", "dare_ties")
MERGEABLE = ("lora", "qlora")
MERGE_FILE = "tuneforge_merge.json"  # also the proof that tuneforge made the folder (it may replace it)


def check_runs(cfgs: list[tuple[Path, object]], weights: list[float], how: str) -> list[str]:
    problems = []
    if len(weights) != len(cfgs):
        problems.append(f"--weights has {len(weights)} values for {len(cfgs)} runs")
    if how not in HOWS:
        problems.append(f"--how {how}: choose one of {', '.join(HOWS)}")
    for run, cfg in cfgs:
        if cfg.method.name not in MERGEABLE:
            problems.append(f"{run}: method '{cfg.method.name}' cannot be merged (only {', '.join(MERGEABLE)} runs)")
    bases = {cfg.model.name for _, cfg in cfgs}
    if len(bases) > 1:
        problems.append(f"the runs fine-tuned different base models: {sorted(bases)}")
    ranks = {cfg.method.r for _, cfg in cfgs if cfg.method.name in MERGEABLE}
    if len(ranks) > 1:
        problems.append(f"the runs use different LoRA ranks {sorted(ranks)}: {how} merging needs one rank")
    return problems


def merge_adapters(runs: list[Path], weights: list[float], how: str, out: Path, density: float = 0.5,
                   seed: int = 0) -> Path:
    from peft import PeftModel  # deferred: peft imports transformers; config validation and --help stay quick

    runs = [Path(r) for r in runs]
    check_output(out, lambda p: (p / MERGE_FILE).is_file(), what="merged adapter folder", inputs=runs)
    cfgs = [(r, load_run_config(r)) for r in runs]
    problems = check_runs(cfgs, weights, how)
    if problems:
        raise ConfigError(problems, "merge-adapters")
    first = cfgs[0][1]
    base = load_causal_lm(first.model.name, torch.float32, "cpu")
    names = [f"run{i}" for i in range(len(runs))]
    model = PeftModel.from_pretrained(base, str(runs[0] / "adapter"), adapter_name=names[0])
    for name, run in zip(names[1:], runs[1:]):
        model.load_adapter(str(run / "adapter"), adapter_name=name)
    torch.manual_seed(seed)  # DARE's random drops
    kw = {"density": density} if how != "linear" else {}
    model.add_weighted_adapter(names, weights, adapter_name="merged", combination_type=how, **kw)
    for name in names:
        model.delete_adapter(name)
    with atomic_dir(out, lambda p: (p / MERGE_FILE).is_file(), what="merged adapter folder", inputs=runs) as tmp:
        model.save_pretrained(tmp / "peft", selected_adapters=["merged"])
        # peft writes a non-default adapter into a sub-folder named after it; lift it to the top.
        for f in (tmp / "peft" / "merged").iterdir():
            shutil.move(str(f), tmp / f.name)
        shutil.rmtree(tmp / "peft")
        load_tokenizer(first.model.name, revision=first.model.revision).save_pretrained(tmp)
        write_json(tmp / MERGE_FILE, {"runs": [str(r.resolve()) for r in runs], "weights": weights,
                                                  "how": how, "density": density if kw else None,
                                                  "base": first.model.name})
    return out
