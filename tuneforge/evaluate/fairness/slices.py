"""Slice metrics: every per-example metric of a system, per group of the test rows, with
counts and bootstrap intervals, and the gap between the best and the worst group."""

from __future__ import annotations

from tuneforge.evaluate.fairness.terms import TermList
from tuneforge.evaluate.stats import bootstrap_gap_ci, bootstrap_mean_ci

MISSING, NONE, MIXED = "(missing)", "(none)", "(mixed)"  # rows that belong to no group: counted, not compared
# Lower-is-better, unbounded metrics: reported per group but not gaps (their scale is not
# the task metrics', so "the largest gap" would compare nats with shares).
NOT_GAPPED = {"loss"}


def prompt_text(conv: list[dict]) -> str:
    """What the model reads of a row: every turn before the reference answer."""
    return "\n".join(m["content"] for m in conv[:-1] if isinstance(m.get("content"), str))


def column_groups(rows: list[dict], column: str) -> list[str]:
    """Each row's value of a test-row column (carried as bookkeeping in ``_columns``)."""
    out = []
    for r in rows:
        v = r.get("_columns", {}).get(column)
        out.append(MISSING if v is None or v == "" else str(v))
    return out


def term_groups(convs: list[list[dict]], terms: TermList) -> list[str]:
    """Each row's group of ``terms`` in its prompt: the one group it mentions, else none/mixed."""
    out = []
    for c in convs:
        found = terms.mentioned(prompt_text(c))
        out.append(next(iter(found)) if len(found) == 1 else MIXED if found else NONE)
    return out


def slice_metrics(groups: list[str], per_example: dict[str, list[float]], *, min_rows: int, n_resamples: int,
                  confidence: float, seed: int) -> dict:
    """{"groups": {group: {"n", metric: {"mean", "ci"}}}, "excluded": {why: n}, "gaps": {metric:
    {"value", "ci", "high", "low", "flagged"}}}. A gap compares the groups of at least
    ``min_rows`` rows (best mean - worst mean; flagged when its interval excludes 0)."""
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out: dict = {"groups": {}, "excluded": {}, "gaps": {}}
    boot = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    for g, idx in sorted(members.items()):
        if g in (MISSING, NONE, MIXED):
            out["excluded"][g] = len(idx)
            continue
        cell: dict = {"n": len(idx)}
        for m, vals in per_example.items():
            xs = [vals[i] for i in idx]
            cell[m] = {"mean": sum(xs) / len(xs), "ci": list(bootstrap_mean_ci(xs, **boot))}
        out["groups"][g] = cell
    eligible = {g: idx for g, idx in members.items() if g in out["groups"] and len(idx) >= min_rows}
    out["too_small"] = sorted(g for g in out["groups"] if g not in eligible)
    if len(eligible) < 2:
        return out
    for m, vals in per_example.items():
        if m in NOT_GAPPED:
            continue
        means = {g: out["groups"][g][m]["mean"] for g in eligible}
        ranked = sorted(means, key=means.get)  # stable over sorted names: two distinct groups even on a tie
        low, high = ranked[0], ranked[-1]
        lo, hi = bootstrap_gap_ci([vals[i] for i in eligible[high]], [vals[i] for i in eligible[low]], **boot)
        out["gaps"][m] = {"value": means[high] - means[low], "ci": [lo, hi], "high": high, "low": low,
                          "flagged": lo > 0}
    return out
