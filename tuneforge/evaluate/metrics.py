"""Task metrics on generated text. Each returns a score in [0, 1] per example."""

from __future__ import annotations

import json
import re
import string
from collections import Counter


def normalize(text: str) -> str:
    text = text.lower().strip()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return re.sub(r"\s+", " ", text)


def exact_match(pred: str, ref: str) -> float:
    return float(normalize(pred) == normalize(ref))


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize(pred).split(), normalize(ref).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r:
        return float(p == r)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def parse_json_object(text: str):
    """The first JSON object in ``text`` (models often wrap it in prose or code fences)."""
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
            if isinstance(obj, dict):
                return obj
        except json.JSONDecodeError:
            pass
        start = text.find("{", start + 1)
    return None


def json_scores(pred: str, ref: str) -> dict[str, float]:
    """exact: the predicted object equals the reference; fields: share of reference fields right;
    valid: the output holds a JSON object at all."""
    gold = json.loads(ref)
    obj = parse_json_object(pred)
    if obj is None:
        return {"exact": 0.0, "fields": 0.0, "valid": 0.0}
    fields = sum(obj.get(k) == v for k, v in gold.items()) / max(len(gold), 1)
    return {"exact": float(obj == gold), "fields": fields, "valid": 1.0}


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (json.JSONDecodeError, TypeError):
        return False


def score_per_example(metric: str, preds: list[str], refs: list[str]) -> dict[str, list[float]]:
    """Every metric's per-example scores, the main one first (what the bootstrap resamples)."""
    if metric == "auto":
        metric = "json" if refs and all(is_json_object(r) for r in refs) else "exact_match"
    if metric == "json":
        rows = [json_scores(p, r) for p, r in zip(preds, refs)]
        return {f"json_{k}": [x[k] for x in rows] for k in ("exact", "fields", "valid")}
    fn = {"exact_match": exact_match, "token_f1": token_f1}[metric]
    return {metric: [fn(p, r) for p, r in zip(preds, refs)]}


def score(metric: str, preds: list[str], refs: list[str]) -> tuple[dict[str, float], list[float]]:
    """Aggregate scores and the per-example main score."""
    per = score_per_example(metric, preds, refs)
    return {k: sum(v) / len(v) for k, v in per.items()}, next(iter(per.values()))


# --- metrics chosen by task -------------------------------------------------------------
#
# ``task_metrics`` returns aggregates plus per-example scores: the per-example lists are
# what the paired bootstrap resamples, so every metric that is a mean over examples has
# one. Corpus-level metrics (BLEU, chrF, macro scores) have no per-example form: the
# bootstrap recomputes them on each resample of the examples (evaluate/intervals.py).

OTHER = "(other)"  # a generated answer that names none of the labels


def task_kind(refs: list[str], max_labels: int = 20) -> str:
    """json: every reference is a JSON object; classification: few distinct short answers,
    each seen several times; text: anything else."""
    if refs and all(is_json_object(r) for r in refs):
        return "json"
    labels = {normalize(r) for r in refs}
    short = all(len(normalize(r).split()) <= 3 for r in refs)
    if refs and short and 1 < len(labels) <= max_labels and len(labels) <= len(refs) / 2:
        return "classification"
    return "text"


def to_label(pred: str, labels: list[str]) -> str:
    """Map a generated answer to a label: exact after normalising, else the one label it
    names ("The sentiment is positive" -> "positive"). Naming several is a hedge: OTHER."""
    p = normalize(pred)
    if p in labels:
        return p
    hits = [lab for lab in labels if re.search(rf"\b{re.escape(lab)}\b", p)]
    return hits[0] if len(hits) == 1 else OTHER


def confusion_matrix(pred_labels: list[str], gold_labels: list[str], labels: list[str]) -> list[list[int]]:
    """Rows: gold, columns: predicted; the last column counts OTHER answers."""
    cols = [*labels, OTHER]
    matrix = [[0] * len(cols) for _ in labels]
    for p, g in zip(pred_labels, gold_labels):
        matrix[labels.index(g)][cols.index(p)] += 1
    return matrix


def scores_from_confusion(matrix) -> dict[str, float]:
    """accuracy, macro and micro precision/recall/F1 of a confusion matrix (``confusion_matrix``'s
    layout; a list of lists or a numpy array: the bootstrap recomputes them per resample)."""
    n_labels = len(matrix)
    tp = [matrix[i][i] for i in range(n_labels)]
    predicted = [sum(matrix[r][i] for r in range(n_labels)) for i in range(n_labels)]
    actual = [sum(row) for row in matrix]

    def ratio(a, b):
        return float(a / b) if b else 0.0

    prec = [ratio(t, p) for t, p in zip(tp, predicted)]
    rec = [ratio(t, a) for t, a in zip(tp, actual)]
    f1 = [ratio(2 * p * r, p + r) for p, r in zip(prec, rec)]
    n = sum(actual)
    # Micro scores count OTHER answers as false negatives but not as false positives of
    # any label, so micro precision can exceed accuracy when the model answers off-label.
    micro_p, micro_r = ratio(sum(tp), sum(predicted)), ratio(sum(tp), n)
    return {"accuracy": ratio(sum(tp), n),
            "precision_macro": sum(prec) / n_labels, "recall_macro": sum(rec) / n_labels,
            "f1_macro": sum(f1) / n_labels,
            "precision_micro": micro_p, "recall_micro": micro_r,
            "f1_micro": ratio(2 * micro_p * micro_r, micro_p + micro_r)}


def classification_scores(pred_labels: list[str], gold_labels: list[str], labels: list[str]) -> dict:
    """accuracy, macro and micro precision/recall/F1 over ``labels``, and the confusion
    matrix (rows: gold, columns: predicted; the last column counts OTHER answers)."""
    matrix = confusion_matrix(pred_labels, gold_labels, labels)
    return scores_from_confusion(matrix) | {"confusion": {"labels": [*labels, OTHER], "matrix": matrix}}


def bleu_chrf(preds: list[str], refs: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu, its standard tokenisation), scaled to [0, 1]."""
    import sacrebleu  # deferred: only generation metrics need it

    return {"bleu": sacrebleu.corpus_bleu(preds, [refs]).score / 100,
            "chrf": sacrebleu.corpus_chrf(preds, [refs]).score / 100}


def rouge_per_example(preds: list[str], refs: list[str]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F-measure per example (rouge-score, with stemming)."""
    from rouge_score import rouge_scorer  # deferred: only generation metrics need it

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rows = [scorer.score(r, p) for p, r in zip(preds, refs)]
    return {k: [row[k].fmeasure for row in rows] for k in ("rouge1", "rouge2", "rougeL")}


def task_metrics(kind: str, preds: list[str], refs: list[str], labels: list[str] | None = None) -> dict:
    """{"kind", "main", "scores": {name: value}, "per_example": {name: [..]}, "confusion"?}.
    ``labels`` fixes the label set for classification (else: the references' labels)."""
    per: dict[str, list[float]] = {"exact_match": [exact_match(p, r) for p, r in zip(preds, refs)],
                                   "token_f1": [token_f1(p, r) for p, r in zip(preds, refs)]}
    scores: dict[str, float] = {}
    out = {"kind": kind}
    if kind == "json":
        rows = [json_scores(p, r) for p, r in zip(preds, refs)]
        per |= {f"json_{k}": [x[k] for x in rows] for k in ("exact", "fields", "valid")}
        out["main"] = "json_exact"
    elif kind == "classification":
        gold = [normalize(r) for r in refs]
        labels = sorted({normalize(x) for x in labels or []} | set(gold))
        pred_labels = [to_label(p, labels) for p in preds]
        cls = classification_scores(pred_labels, gold, labels)
        out["confusion"] = cls.pop("confusion")
        per["accuracy"] = [float(p == g) for p, g in zip(pred_labels, gold)]
        scores |= {k: v for k, v in cls.items() if k != "accuracy"}
        out["main"] = "accuracy"
    else:
        per |= rouge_per_example(preds, refs)
        scores |= bleu_chrf(preds, refs)
        out["main"] = "token_f1"
    means = {k: sum(v) / len(v) for k, v in per.items() if v}
    return out | {"scores": means | scores, "per_example": per}
