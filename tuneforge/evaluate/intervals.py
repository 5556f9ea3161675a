"""Bootstrap intervals for every metric a system reports, and for the difference of two
systems on the same examples.

Each resample draws example indices with replacement and recomputes every metric on them:
means over examples (exact match, token F1, ROUGE, accuracy) average the resampled
per-example scores; corpus metrics are recomputed from their per-example sufficient
statistics (BLEU's n-gram counts, chrF's character n-gram counts, the confusion matrix
behind macro/micro precision, recall and F1); loss and perplexity re-weight the resampled
per-example losses by their scored tokens. Two systems resampled with the same seed are
resampled on the same examples, which makes their difference a paired bootstrap.

A system is the dict ``measure.measure`` returns (``per_example``, ``preds``, ``refs``,
``confusion``, ``loss_tokens``); a missing part means that metric has no interval.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from tuneforge.evaluate.metrics import OTHER, normalize, scores_from_confusion, to_label
from tuneforge.evaluate.stats import resample_indices

# Metrics where lower is better: their differences read the other way round.
LOWER_IS_BETTER = {"loss", "perplexity"}
CLASSIFICATION = ("precision_macro", "recall_macro", "f1_macro", "precision_micro", "recall_micro", "f1_micro")

# One resample's value of each metric it covers, from an (n,) array of example indices.
Statistic = Callable[[np.ndarray], dict[str, float]]


def _sacrebleu_statistic(preds: list[str], refs: list[str]) -> Statistic:
    """BLEU and chrF from per-sentence statistics summed over the resample. sacrebleu's own
    paired bootstrap (sacrebleu.significance) sums the same statistics; its methods are used
    so the numbers equal ``metrics.bleu_chrf`` on the full set."""
    from sacrebleu.metrics import BLEU, CHRF  # deferred: only generation metrics need it

    metrics = {"bleu": BLEU(), "chrf": CHRF()}
    stats = {k: np.asarray(m._extract_corpus_statistics(preds, [refs]), dtype=float) for k, m in metrics.items()}
    return lambda idx: {k: m._compute_score_from_stats(list(stats[k][idx].sum(axis=0))).score / 100
                        for k, m in metrics.items()}


def _classification_statistic(preds: list[str], refs: list[str], labels: list[str]) -> Statistic:
    """Macro/micro scores from the confusion matrix of the resampled examples."""
    gold = np.array([labels.index(normalize(r)) for r in refs])
    cols = [*labels, OTHER]
    pred = np.array([cols.index(to_label(p, labels)) for p in preds])
    size = len(labels) * len(cols)

    def stat(idx):
        # np.bincount over (gold, predicted) pairs: the resample's confusion matrix.
        matrix = np.bincount(gold[idx] * len(cols) + pred[idx], minlength=size).reshape(len(labels), len(cols))
        return {k: v for k, v in scores_from_confusion(matrix).items() if k in CLASSIFICATION}

    return stat


def _loss_statistic(losses: list[float], tokens: list[int]) -> Statistic:
    """Token-weighted loss (as ``perplexity.summarize`` computes it) and its perplexity."""
    nll, count = np.asarray(losses, dtype=float) * np.asarray(tokens), np.asarray(tokens, dtype=float)

    def stat(idx):
        loss = float(nll[idx].sum() / max(count[idx].sum(), 1))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    return stat


def corpus_statistics(system: dict) -> Statistic | None:
    """Every metric of ``system`` that is not a plain mean of its per-example scores."""
    parts: list[Statistic] = []
    scores = system["scores"]
    if "bleu" in scores and "preds" in system:
        parts.append(_sacrebleu_statistic(system["preds"], system["refs"]))
    if "f1_macro" in scores and "confusion" in system and "preds" in system:
        parts.append(_classification_statistic(system["preds"], system["refs"], system["confusion"]["labels"][:-1]))
    if "loss" in scores and "loss_tokens" in system:
        parts.append(_loss_statistic(system["per_example"]["loss"], system["loss_tokens"]))
    if not parts:
        return None
    return lambda idx: {k: v for part in parts for k, v in part(idx).items()}


def resampled_scores(system: dict, *, n_resamples: int, seed: int) -> dict[str, np.ndarray]:
    """{metric: (n_resamples,) values}. Means are vectorised; corpus metrics loop over resamples."""
    out: dict[str, np.ndarray] = {}
    corpus = corpus_statistics(system)
    covered = set(corpus(np.arange(system["n"]))) if corpus else set()
    for name, values in system["per_example"].items():
        # Lists shorter than n (tool rows: answers after a tool result) are resampled on their own.
        if name not in covered and values:
            arr = np.asarray(values, dtype=float)
            out[name] = arr[resample_indices(arr.size, n_resamples=n_resamples, seed=seed)].mean(axis=1)
    if corpus:
        rows = [corpus(idx) for idx in resample_indices(system["n"], n_resamples=n_resamples, seed=seed)]
        out |= {k: np.array([r[k] for r in rows]) for k in covered}
    return out


def system_intervals(system: dict, *, n_resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> dict[str, list[float]]:
    """{metric: [low, high]}: a percentile bootstrap interval for every metric with the data to
    resample it."""
    tail = (1 - confidence) / 2
    return {k: [float(x) for x in np.quantile(v, [tail, 1 - tail])]
            for k, v in resampled_scores(system, n_resamples=n_resamples, seed=seed).items()
            if k in system["scores"]}


def paired_intervals(base: dict, tuned: dict, *, n_resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """{metric: {"low", "high", "p_not_better"}} for tuned - base on the same examples.
    p_not_better: the share of resamples where tuned is not better (>= for lower-is-better)."""
    if base["n"] != tuned["n"]:
        raise ValueError(f"a paired comparison needs the same examples (got {base['n']} and {tuned['n']})")
    a = resampled_scores(base, n_resamples=n_resamples, seed=seed)
    b = resampled_scores(tuned, n_resamples=n_resamples, seed=seed)
    tail = (1 - confidence) / 2
    out = {}
    for name in a.keys() & b.keys():
        if a[name].shape != b[name].shape:
            continue  # resampled on different examples: no paired interval
        d = b[name] - a[name]
        lo, hi = np.quantile(d, [tail, 1 - tail])
        worse = (d >= 0) if name in LOWER_IS_BETTER else (d <= 0)
        out[name] = {"low": float(lo), "high": float(hi), "p_not_better": float(worse.mean())}
    return out
