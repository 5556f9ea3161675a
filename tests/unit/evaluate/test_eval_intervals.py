"""Bootstrap intervals for every metric: corpus metrics (BLEU, chrF, macro-F1) recomputed per
resample, perplexity re-weighted by tokens, paired differences on the same examples."""

import math
import random

import pytest

from tuneforge.evaluate.intervals import paired_intervals, system_intervals
from tuneforge.evaluate.metrics import task_metrics

WORDS = "the a cat dog sat ran on under mat rug big small red blue".split()


def text_system(n: int, noise: float, seed: int = 0) -> dict:
    """n references and predictions that copy them with a share ``noise`` of words replaced."""
    rng = random.Random(seed)
    refs = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(n)]
    preds = [" ".join(w if rng.random() > noise else rng.choice(WORDS) for w in r.split()) for r in refs]
    return task_metrics("text", preds, refs) | {"n": n, "preds": preds, "refs": refs}


def class_system(n: int, wrong_every: int) -> dict:
    labels = ["positive", "negative", "neutral"]
    refs = [labels[i % 3] for i in range(n)]
    preds = [labels[(i + 1) % 3] if i % wrong_every == 0 else refs[i] for i in range(n)]
    return task_metrics("classification", preds, refs, labels) | {"n": n, "preds": preds, "refs": refs}


@pytest.mark.parametrize("metric", ["bleu", "chrf", "token_f1"])
def test_corpus_metric_interval_contains_the_point_and_narrows_with_more_rows(metric):
    small, large = text_system(20, 0.3), text_system(320, 0.3)
    ci_small = system_intervals(small, n_resamples=400)[metric]
    ci_large = system_intervals(large, n_resamples=400)[metric]
    for system, ci in ((small, ci_small), (large, ci_large)):
        assert ci[0] <= system["scores"][metric] <= ci[1]
    assert ci_large[1] - ci_large[0] < 0.6 * (ci_small[1] - ci_small[0])


def test_macro_f1_interval_is_recomputed_from_the_confusion_matrix():
    s = class_system(60, wrong_every=4)
    ci = system_intervals(s, n_resamples=400)
    assert set(ci) >= {"accuracy", "f1_macro", "precision_macro", "recall_micro"}
    assert ci["f1_macro"][0] < s["scores"]["f1_macro"] < ci["f1_macro"][1]
    perfect = class_system(60, wrong_every=10**6)  # only row 0 is wrong
    assert system_intervals(perfect, n_resamples=400)["f1_macro"][1] == pytest.approx(1.0)


def test_perplexity_interval_is_token_weighted_and_paired_differences_read_its_direction():
    base = {"n": 4, "scores": {"loss": 2.0, "perplexity": math.exp(2.0)},
            "per_example": {"loss": [2.0, 2.0, 2.0, 2.0]}, "loss_tokens": [10, 10, 10, 10]}
    # Tuned: lower loss on every row; the long row weighs more, as in summarize().
    losses, tokens = [1.0, 1.5, 1.2, 1.1], [30, 10, 10, 10]
    loss = sum(x * t for x, t in zip(losses, tokens)) / sum(tokens)
    tuned = {"n": 4, "scores": {"loss": loss, "perplexity": math.exp(loss)},
             "per_example": {"loss": losses}, "loss_tokens": tokens}
    ci = system_intervals(tuned, n_resamples=300)
    assert ci["perplexity"][0] <= math.exp(loss) <= ci["perplexity"][1]
    assert ci["loss"] == [pytest.approx(math.log(x), rel=1e-3) for x in ci["perplexity"]]  # one resampling
    d = paired_intervals(base, tuned, n_resamples=300)
    assert d["perplexity"]["high"] < 0 and d["perplexity"]["p_not_better"] == 0.0  # lower: better
    assert d["loss"]["p_not_better"] == 0.0


def test_paired_corpus_difference_excludes_zero_for_a_clearly_better_system():
    worse, better = text_system(200, 0.6, seed=1), text_system(200, 0.1, seed=1)  # same references
    assert worse["refs"] == better["refs"]
    d = paired_intervals(worse, better, n_resamples=300)
    assert d["bleu"]["low"] > 0 and d["chrf"]["low"] > 0 and d["bleu"]["p_not_better"] == 0.0
    same = paired_intervals(worse, worse, n_resamples=300)
    assert same["bleu"]["low"] == same["bleu"]["high"] == 0.0
    with pytest.raises(ValueError, match="same examples"):
        paired_intervals(worse, text_system(20, 0.1), n_resamples=10)
