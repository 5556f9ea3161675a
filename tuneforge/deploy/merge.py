"""Merge several LoRA runs on the same base into one run-like folder whose ``adapter/`` is a
standard peft LoRA adapter (``tuneforge generate/eval/serve/registry add`` take it as a run).

Every combination works on each adapted module's weight update ΔW_i = scale_i · B_i A_i
(shape out x in), never on A and B separately, then goes back to a rank-r LoRA by SVD:

- linear: Σ w_i ΔW_i. With r = the sum of the inputs' ranks (the default) it is exact;
- ties: TIES-merging of the weighted ΔW_i (keep the top ``density`` share of each by
  magnitude, elect a sign per entry, average the agreeing entries);
- dare_linear / dare_ties: DARE (drop 1-``density`` of each ΔW_i's entries at random and
  rescale by 1/density, seeded) followed by the linear sum / the TIES election.

The combinations are peft's own functions (``peft.utils.merge_utils``, what its ``*_svd``
combination types call); the SVD is done here so that the part it drops is measured: the
relative Frobenius error ||ΔW - ΔW_r|| / ||ΔW|| of each module and overall goes into the
folder's ``tuneforge_merge.json`` (peft's ``*_svd`` path reports nothing, and with
``use_rslora`` it would rescale the result by sqrt(r)).

A merged folder:

    config.yaml            the first run's config, method r/alpha set to the merged adapter's,
                           data = the runs' own train/validation/test splits (data/*.jsonl)
    adapter/               peft adapter (adapter_config.json, adapter_model.safetensors) + tokenizer
    data/RUN/{train,validation,test}.jsonl   each run's splits, rebuilt from its config
    tuneforge_merge.json   how, weights, rank, the truncation errors (also the proof that
                           tuneforge made the folder, so a later merge may replace it)

``--how fusion`` (learned composition) lives in tuneforge/deploy/fusion.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from tuneforge.config import ConfigError, to_yaml
from tuneforge.data.render import with_system
from tuneforge.io import atomic_dir, check_output, write_json
from tuneforge.methods.lora import PAIR_KEYS, Lora, read_lora
from tuneforge.models.load import load_tokenizer
from tuneforge.plugins import objective_of, validate_config
from tuneforge.runs import load_run_config

STATIC = ("linear", "ties", "dare_linear", "dare_ties")
HOWS = STATIC + ("fusion",)
MERGEABLE = ("lora", "qlora", "fusion")  # a fusion run saves one plain LoRA (methods/fusion.py)
MERGE_FILE = "tuneforge_merge.json"  # also the proof that tuneforge made the folder (it may replace it)
SPLITS = ("train", "validation", "test")


def owned(p: Path) -> bool:
    return (p / MERGE_FILE).is_file()


# --- merging weight updates -----------------------------------------------------------------


def combine(deltas: list[torch.Tensor], weights: list[float], how: str, density: float) -> torch.Tensor:
    """One module's merged ΔW from the inputs' ΔW (peft's task-vector merges, on ΔW)."""
    from peft.utils import merge_utils  # deferred: peft imports transformers

    w = torch.tensor(weights, dtype=deltas[0].dtype)
    if how == "linear":
        return merge_utils.task_arithmetic(deltas, w)
    if how == "ties":
        return merge_utils.ties(deltas, w, density)
    if how == "dare_linear":
        return merge_utils.dare_linear(deltas, w, density)
    return merge_utils.dare_ties(deltas, w, density)


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(A: rank x in, B: out x rank, dropped ||.||², total ||.||²): the best rank-``rank``
    approximation B A of ``delta`` (Eckart-Young), the singular values split evenly between
    A and B; zero rows/columns pad a module whose ΔW has fewer singular values than ``rank``."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # u: out x k, s: k, vh: k x in
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    a = torch.zeros(rank, delta.shape[1], dtype=delta.dtype)
    b = torch.zeros(delta.shape[0], rank, dtype=delta.dtype)
    a[:k] = root[:, None] * vh[:k]
    b[:, :k] = u[:, :k] * root[None, :]
    return a, b, float((s[k:] ** 2).sum()), float((s ** 2).sum())


def merge_loras(loras: list[Lora], weights: list[float], how: str, rank: int, density: float, seed: int
                ) -> tuple[dict[str, torch.Tensor], dict]:
    """peft-format tensors of the merged adapter (scale 1: alpha = r) and the truncation report."""
    modules = sorted({m for lo in loras for m in lo.pairs})
    tensors, errors = {}, {}
    dropped_total = norm_total = 0.0
    with torch.random.fork_rng(devices=[]):  # DARE's drops: seeded, without touching the caller's RNG
        torch.manual_seed(seed)
        for module in modules:
            kind = next(lo.kinds[module] for lo in loras if module in lo.pairs)
            present = {i: lo.delta(module) for i, lo in enumerate(loras) if module in lo.pairs}
            shape = next(iter(present.values())).shape
            # A run that did not adapt this module contributes ΔW = 0.
            deltas = [present.get(i, torch.zeros(shape, dtype=torch.float64)) for i in range(len(loras))]
            merged = combine(deltas, weights, how, density)
            a, b, dropped, norm = low_rank(merged, rank)
            ka, kb = PAIR_KEYS[kind]
            tensors[module + ka], tensors[module + kb] = a.float().contiguous(), b.float().contiguous()
            errors[module] = math.sqrt(dropped / norm) if norm > 0 else 0.0
            dropped_total += dropped
            norm_total += norm
    errors = {m.removeprefix("base_model.model."): e for m, e in errors.items()}
    worst = max(errors, key=errors.get)
    report = {"rank": rank, "relative_frobenius_error": math.sqrt(dropped_total / norm_total) if norm_total else 0.0,
              "worst_module": worst, "worst_module_error": errors[worst], "modules": errors}
    return tensors, report


def adapter_config(loras: list[Lora], rank: int, modules: list[str]) -> dict:
    """The first input's adapter_config.json for the merged adapter: rank r, alpha r (scale 1, no
    rsLoRA), the adapted modules of every input."""
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    return {**loras[0].config, "r": rank, "lora_alpha": rank, "use_rslora": False, "target_modules": leaves,
            "rank_pattern": {}, "alpha_pattern": {}}


# --- the run-like folder ------------------------------------------------------------------


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
    objectives = {cfg.objective.name for _, cfg in cfgs}
    if len(objectives) > 1:
        problems.append(f"the runs trained different objectives: {sorted(objectives)}")
    return problems


def task_names(runs: list[Path]) -> list[str]:
    """One name per run (its folder name; numbered when two runs share one)."""
    names = [r.resolve().name for r in runs]
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]


def write_task_data(cfgs: list[tuple[Path, object]], names: list[str], data_dir: Path, final_dir: Path
                    ) -> tuple[dict, dict]:
    """Each run's own train/validation/test rows (rebuilt from its config with its seed, so a
    run's test rows stay the ones it never trained on) -> data_dir/NAME/SPLIT.jsonl, named in
    the config by where they will live (``final_dir``: data_dir after the folder's rename).
    Returns (the merged config's data section, {name: {split: file}}). When the runs' system
    prompts differ, each run's is written into its rows (and the config has none)."""
    from tuneforge.data.prepare import build_splits

    system = {cfg.data.system_prompt for _, cfg in cfgs}
    shared_system = system.pop() if len(system) == 1 else None
    files: dict[str, dict[str, str]] = {}
    for name, (_, cfg) in zip(names, cfgs):
        splits = build_splits(cfg.data, cfg.train.seed, objective_of(cfg).data_kind)
        files[name] = {}
        for split in SPLITS:
            rows = getattr(splits, split)
            if not rows:
                continue
            path = data_dir / name / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                for row in rows:
                    row = {k: v for k, v in row.items() if not k.startswith("_")}
                    if shared_system is None and cfg.data.system_prompt and "messages" in row:
                        row["messages"] = with_system(row["messages"], cfg.data.system_prompt)
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            files[name][split] = str(final_dir / name / f"{split}.jsonl")
    first = cfgs[0][1].data
    data = first.model_dump() | {
        "train": [f["train"] for f in files.values()],
        "validation": [f["validation"] for f in files.values() if "validation" in f],
        "test": [f["test"] for f in files.values() if "test" in f],
        "tasks": [], "system_prompt": shared_system, "format": "auto", "columns": {}, "ignore_fields": []}
    if not data["validation"]:
        data["validation"] = []
    return data, files


def run_like_config(first, method: dict, data: dict, out: Path) -> dict:
    """The first run's config with the merged method and data, named after ``out`` (what made
    the first run itself, continual/privacy/init_from/parent, is not the merged folder's)."""
    raw = {k: v for k, v in json.loads(first.model_dump_json()).items() if k not in ("continual", "privacy")}
    raw["train"]["init_from"] = None
    return raw | {"method": method, "data": data, "output_dir": str(out.resolve().parent), "run_name": out.name,
                  "parent_run": None}


def merge_adapters(runs: list[Path], weights: list[float], how: str, out: Path, density: float = 0.5,
                   seed: int = 0, rank: int | None = None, console=None) -> Path:
    runs = [Path(r) for r in runs]
    out = Path(out)
    check_output(out, owned, what="merged adapter folder", inputs=runs)
    cfgs = [(r, load_run_config(r)) for r in runs]
    problems = check_runs(cfgs, weights, how)
    if how == "fusion":
        problems.append("--how fusion trains: call tuneforge.deploy.fusion.fuse_adapters")
    if rank is not None and rank <= 0:
        problems.append(f"--rank {rank}: must be a positive number")
    if problems:
        raise ConfigError(problems, "merge-adapters")
    loras = [read_lora(r / "adapter") for r in runs]
    # Linear: the rank of Σ w_i ΔW_i is at most Σ r_i, so that rank is exact. TIES/DARE
    # change ΔW entry by entry (full rank in general): the largest input rank keeps the size.
    rank = rank or (sum(lo.rank for lo in loras) if how == "linear" else max(lo.rank for lo in loras))
    tensors, truncation = merge_loras(loras, weights, how, rank, density, seed)

    first = cfgs[0][1]
    names = task_names(runs)
    with atomic_dir(out, owned, what="merged adapter folder", inputs=runs) as tmp:
        (tmp / "adapter").mkdir()
        save_file(tensors, str(tmp / "adapter" / "adapter_model.safetensors"))
        acfg = adapter_config(loras, rank, [k.rsplit(".lora_", 1)[0] for k in tensors])
        (tmp / "adapter" / "adapter_config.json").write_text(json.dumps(acfg, indent=2))
        load_tokenizer(first.model.name, revision=first.model.revision).save_pretrained(tmp / "adapter")
        data, files = write_task_data(cfgs, names, tmp / "data", out.resolve() / "data")
        lora = first.method.name in ("lora", "qlora")
        method = (json.loads(first.method.model_dump_json()) if lora else {"name": "lora", "dropout": 0.0}) | {
            "r": rank, "alpha": rank, "rslora": False,
            "target_modules": "all-linear" if all(getattr(c.method, "target_modules", None) == "all-linear"
                                                  for _, c in cfgs) else acfg["target_modules"]}
        cfg = validate_config(run_like_config(first, method, data, out))
        (tmp / "config.yaml").write_text(to_yaml(cfg))
        write_json(tmp / MERGE_FILE, {
            "how": how, "runs": [str(r.resolve()) for r in runs], "tasks": dict(zip(names, files.values())),
            "weights": weights, "density": density if how != "linear" else None,
            "seed": seed if how.startswith("dare") else None, "base": first.model.name,
            "input_ranks": [lo.rank for lo in loras], "truncation": truncation})
    return out
