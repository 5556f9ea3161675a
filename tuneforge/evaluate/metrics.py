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


def score(metric: str, preds: list[str], refs: list[str]) -> tuple[dict[str, float], list[float]]:
    """Aggregate scores and the per-example main score."""
    if metric == "auto":
        metric = "json" if refs and all(is_json_object(r) for r in refs) else "exact_match"
    if metric == "json":
        rows = [json_scores(p, r) for p, r in zip(preds, refs)]
        agg = {f"json_{k}": sum(x[k] for x in rows) / len(rows) for k in ("exact", "fields", "valid")}
        return agg, [x["exact"] for x in rows]
    fn = {"exact_match": exact_match, "token_f1": token_f1}[metric]
    per = [fn(p, r) for p, r in zip(preds, refs)]
    return {metric: sum(per) / len(per)}, per
