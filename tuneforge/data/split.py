"""Train/validation/test split: seeded, by ratio or fixed size, stratified for
classification, with alike prompts kept on one side, and a leakage check.

Rows are first grouped: rows whose prompts are equal or near-equal (MinHash, see
dedup.py) form one group, and a group goes wholly to one split, so a paraphrased
question in train cannot give away a test answer. Groups are then dealt out per stratum
(the label, for classification) in a seeded order.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Literal

import numpy as np
from pydantic import Field

from tuneforge.config import Strict
from tuneforge.data.dedup import components, signatures, similar_pairs, text_key
from tuneforge.data.formats import prompt_text
from tuneforge.data.manifest import SPLITS, Stage


class SplitOptions(Strict):
    validation: float = Field(0.1, ge=0, description="share (< 1) or number of rows (>= 1)")
    test: float = Field(0.1, ge=0, description="share (< 1) or number of rows (>= 1)")
    seed: int = 0
    stratify: Literal["auto", "yes", "no"] = Field("auto", description="auto: by label for classification rows")
    group_threshold: float = Field(0.8, gt=0, le=1, description="prompts this similar share a split")
    leakage: Literal["remove", "report", "off"] = Field(
        "remove", description="test rows whose prompt (nearly) matches a train prompt: remove or only report")
    leakage_threshold: float = Field(0.8, gt=0, le=1)


def prompt_signatures(rows: list[dict], seed: int = 0) -> np.ndarray:
    return signatures([prompt_text(r) for r in rows], seed=seed)


def prompt_groups(rows: list[dict], threshold: float, seed: int = 0, sig: np.ndarray | None = None) -> np.ndarray:
    """Group label per row: rows with equal or near-equal prompts share a label."""
    n = len(rows)
    first: dict[bytes, int] = {}
    exact = np.array([first.setdefault(text_key(prompt_text(r)), k) for k, r in enumerate(rows)], dtype=np.int64)
    sig = prompt_signatures(rows, seed) if sig is None else sig
    i, j, _ = similar_pairs(sig, threshold) if n > 1 else (np.empty(0, int),) * 3
    idx = np.arange(n)
    return components(n, np.concatenate([i, idx]), np.concatenate([j, exact]))


def stratum_targets(size: float, n_total: int, strata: dict[str, int]) -> dict[str, int]:
    """Rows each stratum gives to a held-out split: a share of each, or a fixed total
    divided in proportion (largest remainders, so the parts sum to the total)."""
    total = round(size * n_total) if size < 1 else int(size)
    exact = {s: total * n / n_total for s, n in strata.items()}
    out = {s: int(v) for s, v in exact.items()}
    for s in sorted(exact, key=lambda s: exact[s] - out[s], reverse=True)[: total - sum(out.values())]:
        out[s] += 1
    return out


def split_rows(rows: list[dict], opts: SplitOptions) -> tuple[dict[str, list[dict]], Stage]:
    parts, stage = split_indices(rows, opts)
    return {name: [rows[k] for k in idx] for name, idx in parts.items()}, stage


def split_indices(rows: list[dict], opts: SplitOptions, sig: np.ndarray | None = None
                  ) -> tuple[dict[str, list[int]], Stage]:
    """Row indices of each split (sorted). ``sig``: the rows' prompt signatures, when the
    caller has them (the leakage check reuses them)."""
    n = len(rows)
    for name in ("validation", "test"):
        size = getattr(opts, name)
        if size >= 1 and size != int(size):
            raise ValueError(f"split {name}={size}: a share must be < 1, a row count a whole number")
    if (opts.validation >= 1 or opts.test >= 1) and opts.validation * (opts.validation >= 1) + opts.test * (
            opts.test >= 1) >= n:
        raise ValueError(f"fixed split sizes validation={opts.validation:g} test={opts.test:g} leave no "
                         f"training rows out of {n}")
    stratify = opts.stratify == "yes" or (opts.stratify == "auto" and rows and "label" in rows[0])
    labels = prompt_groups(rows, opts.group_threshold, opts.seed, sig)
    groups: dict[int, list[int]] = defaultdict(list)
    for k, g in enumerate(labels.tolist()):
        groups[g].append(k)
    # A group's stratum is its first row's label (a group spanning labels is rare: same prompt, two labels).
    strata: dict[str, list[int]] = defaultdict(list)
    for g in sorted(groups):
        strata[rows[g].get("label", "") if stratify else ""].append(g)
    sizes = {s: sum(len(groups[g]) for g in gs) for s, gs in strata.items()}
    want = {name: stratum_targets(getattr(opts, name), n, sizes) for name in ("test", "validation")}
    parts: dict[str, list[int]] = {name: [] for name in SPLITS}
    rng = random.Random(opts.seed)
    for s in sorted(strata):
        order = list(strata[s])
        rng.shuffle(order)
        got = {"test": 0, "validation": 0}
        for g in order:
            dest = next((name for name in ("test", "validation") if got[name] < want[name][s]), "train")
            parts[dest].extend(groups[g])
            if dest != "train":
                got[dest] += len(groups[g])
    out = {name: sorted(idx) for name, idx in parts.items()}
    stage = Stage("split", input=n, kept=n, info={
        "stratified": bool(stratify), "groups": len(groups), "rows_in_multi_row_groups":
            sum(len(m) for m in groups.values() if len(m) > 1), **{name: len(v) for name, v in out.items()}})
    return out, stage.check()


def find_leaks(train: list[dict], test: list[dict], threshold: float, seed: int = 0,
               sig: np.ndarray | None = None) -> dict[int, tuple[int, float]]:
    """Test row index -> (train row index, similarity) for test prompts that equal or nearly
    equal a train prompt (similarity 1.0 for an exact match up to case and spacing).
    ``sig``: prompt signatures of train + test rows in that order, when already computed."""
    if not train or not test:
        return {}
    tr = [prompt_text(r) for r in train]
    te = [prompt_text(r) for r in test]
    seen = {text_key(p): k for k, p in enumerate(tr)}
    leaks = {k: (seen[text_key(p)], 1.0) for k, p in enumerate(te) if text_key(p) in seen}
    i, j, est = similar_pairs(signatures(tr + te, seed=seed) if sig is None else sig, threshold)
    cross = (i < len(tr)) & (j >= len(tr))  # i < j, so a cross pair has the train row first
    for a, b, e in zip(i[cross].tolist(), j[cross].tolist(), est[cross].tolist()):
        leaks.setdefault(b - len(tr), (a, e))
    return leaks


def leakage_stage(train: list[dict], test: list[dict], opts: SplitOptions,
                  sig: np.ndarray | None = None) -> tuple[list[dict], Stage]:
    stage = Stage("leakage", input=len(test), info={"action": opts.leakage, "threshold": opts.leakage_threshold})
    if opts.leakage == "off":
        stage.kept = len(test)
        return test, stage.check()
    leaks = find_leaks(train, test, opts.leakage_threshold, opts.seed, sig)
    out = []
    for k, row in enumerate(test):
        if k in leaks:
            t, sim = leaks[k]
            detail = f"{row.get('_where', '?')} prompt matches train row {train[t].get('_where', '?')} ({sim:.2f})"
            if opts.leakage == "remove":
                stage.drop("prompt also in train", detail)
                continue
            stage.changed["prompt also in train (kept)"] += 1
            stage.note("prompt also in train (kept)", detail)
        out.append(row)
    stage.info["found"] = len(leaks)
    stage.kept = len(out)
    return out, stage.check()
