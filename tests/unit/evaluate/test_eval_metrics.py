"""Task metrics against values computed by hand."""

import json

import pytest

from tuneforge.evaluate.metrics import OTHER, bleu_chrf, classification_scores, task_kind, task_metrics, to_label


def test_task_kind_by_references():
    assert task_kind([json.dumps({"a": 1}), json.dumps({"b": 2})]) == "json"
    assert task_kind(["positive", "negative", "Positive", "negative"]) == "classification"
    # Every answer distinct: text, not labels.
    assert task_kind(["the cat sat", "a dog ran", "birds fly", "fish swim"]) == "text"


def test_to_label_maps_generated_answers():
    labels = ["negative", "neutral", "positive"]
    assert to_label("Positive.", labels) == "positive"
    assert to_label("The sentiment is negative", labels) == "negative"
    assert to_label("positive or negative", labels) == OTHER  # names two labels: ambiguous
    assert to_label("no idea", labels) == OTHER


def test_classification_scores_by_hand():
    # gold a a a b b c ; pred a a b b OTHER c
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", OTHER, "c"]
    s = classification_scores(pred, gold, ["a", "b", "c"])
    assert s["accuracy"] == pytest.approx(4 / 6)
    # a: P 2/2 R 2/3 ; b: P 1/2 R 1/2 ; c: P 1 R 1
    assert s["precision_macro"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert s["recall_macro"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 1.0]
    assert s["f1_macro"] == pytest.approx(sum(f1) / 3)
    # micro: 4 true positives, 5 label predictions (OTHER is none), 6 examples
    assert s["precision_micro"] == pytest.approx(4 / 5)
    assert s["recall_micro"] == pytest.approx(4 / 6)
    assert s["f1_micro"] == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    assert s["confusion"]["labels"] == ["a", "b", "c", OTHER]
    assert s["confusion"]["matrix"] == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]


def test_bleu_by_hand_and_chrf_bounds():
    # n-gram precisions 5/6, 3/5, 2/4, 1/3; same length so no brevity penalty.
    s = bleu_chrf(["the cat is on a mat"], ["the cat is on the mat"])
    assert s["bleu"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-4)
    assert 0 < s["chrf"] < 1
    same = bleu_chrf(["the cat is on the mat"], ["the cat is on the mat"])
    assert same == {"bleu": pytest.approx(1.0), "chrf": pytest.approx(1.0)}


def test_text_metrics_rouge_by_hand():
    r = task_metrics("text", ["the cat sat"], ["the cat sat on the mat"])
    # unigrams: P 3/3, R 3/6 -> F 2/3; bigrams: P 2/2, R 2/5 -> F 4/7; LCS 3 -> like unigrams
    assert r["scores"]["rouge1"] == pytest.approx(2 / 3)
    assert r["scores"]["rouge2"] == pytest.approx(4 / 7)
    assert r["scores"]["rougeL"] == pytest.approx(2 / 3)
    assert r["scores"]["token_f1"] == pytest.approx(2 / 3)
    assert r["scores"]["exact_match"] == 0.0
    assert {"bleu", "chrf"} <= set(r["scores"]) and r["main"] == "token_f1"


def test_json_and_classification_task_metrics():
    ref = json.dumps({"customer": "Ann", "quantity": 2})
    r = task_metrics("json", ['```json\n{"customer": "Ann", "quantity": 3}\n```', "nope"], [ref, ref])
    assert r["scores"]["json_valid"] == 0.5 and r["scores"]["json_fields"] == 0.25 and r["scores"]["json_exact"] == 0
    c = task_metrics("classification", ["Positive!", "negative", "meh"], ["positive", "positive", "negative"])
    assert c["per_example"]["accuracy"] == [1.0, 0.0, 0.0]
    assert c["confusion"]["matrix"] == [[0, 0, 1], [1, 1, 0]]  # rows negative, positive; last column OTHER
