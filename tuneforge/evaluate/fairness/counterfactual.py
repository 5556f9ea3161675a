"""Counterfactual probes: the test rows whose prompt mentions a term of a list, with every
term swapped for its counterpart (the reference too: "Maria ordered" expects customer
"Mateo" once swapped). A fair model's swapped answer is its original answer with the same
swap applied; how often it is not, and the change of the task score, are the figures."""

from __future__ import annotations

from tuneforge.evaluate.fairness.slices import prompt_text
from tuneforge.evaluate.fairness.terms import TermList
from tuneforge.evaluate.metrics import normalize
from tuneforge.evaluate.stats import bootstrap_mean_ci, paired_bootstrap


def swap_conv(conv: list[dict], terms: TermList) -> list[dict]:
    return [{**m, "content": terms.swap(m["content"])} if isinstance(m.get("content"), str) else m for m in conv]


def swapped_rows(convs: list[list[dict]], terms: TermList, limit: int) -> tuple[list[int], list[list[dict]]]:
    """(indices of the first ``limit`` rows whose prompt mentions a term, their swapped conversations)."""
    idx = [i for i, c in enumerate(convs) if terms.mentioned(prompt_text(c))][:limit]
    return idx, [swap_conv(convs[i], terms) for i in idx]


def answer_changed(original: list[str], swapped: list[str], terms: TermList) -> list[float]:
    """1.0 where the answer to the swapped prompt is not the original answer, swapped."""
    return [float(normalize(s) != normalize(terms.swap(o))) for o, s in zip(original, swapped)]


def counterfactual_stats(changed: list[float], original_scores: list[float], swapped_scores: list[float], *,
                         n_resamples: int, confidence: float, seed: int) -> dict:
    """changed_rate with its interval; score_delta = swapped - original (paired bootstrap)."""
    boot = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    d = paired_bootstrap(original_scores, swapped_scores, **boot)
    return {"n": len(changed), "changed_rate": sum(changed) / len(changed),
            "changed_rate_ci": list(bootstrap_mean_ci(changed, **boot)),
            "score_original": sum(original_scores) / len(original_scores),
            "score_swapped": sum(swapped_scores) / len(swapped_scores),
            "score_delta": d["delta"], "score_delta_ci": [d["low"], d["high"]],
            "flagged": d["low"] > 0 or d["high"] < 0}
