"""Sequence classification: a new head on a causal LM or an encoder, cross-entropy on labels.

The label names come from the data and are saved with the model (config id2label), so the
tuned model predicts names, not indices. The recipe is tuneforge.train.recipes.heads.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tuneforge.config import Strict
from tuneforge.objectives.base import ONE_TASK_RECIPE_REFUSES, Objective, register_objective


def classification_metrics(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict:
    """Accuracy, per-class and macro precision/recall/F1, and the confusion matrix
    (rows: true class, columns: predicted class). A class never predicted has precision 0."""
    k = len(labels)
    cm = [[0] * k for _ in range(k)]
    for t, p in zip(y_true, y_pred):
        cm[t][p] += 1
    per_class = {}
    for i, name in enumerate(labels):
        tp = cm[i][i]
        predicted, actual = sum(cm[r][i] for r in range(k)), sum(cm[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    present = [c for c in per_class.values() if c["support"]]  # macro over classes that occur
    macro = {m: sum(c[m] for c in present) / max(len(present), 1) for m in ("precision", "recall", "f1")}
    n = len(y_true)
    return {"accuracy": sum(cm[i][i] for i in range(k)) / n if n else 0.0, "macro": macro,
            "per_class": per_class, "confusion_matrix": cm, "labels": labels, "n": n}


def balanced_class_weights(y: list[int], k: int) -> list[float]:
    """n / (k * n_c) per class c (1.0 for a class with no rows: it is never a target, so its
    weight does not enter the loss)."""
    counts = [0] * k
    for c in y:
        counts[c] += 1
    return [len(y) / (k * n_c) if n_c else 1.0 for n_c in counts]


class ClassifyOptions(Strict):
    name: Literal["classify"] = "classify"
    labels: list[str] | None = Field(None, description="class names in order; default: the sorted training labels")
    # Cross-entropy on imbalanced classes is minimised largely by the frequent ones: on the
    # chatterbot topics (trivia 49%, emotion 9%) the unweighted head never predicted emotion.
    # "balanced" weighs class c by n / (k * n_c) over the training split (scikit-learn's
    # convention), so each class counts as much as the others in the training loss; it trades
    # some accuracy on frequent classes for recall on rare ones (macro F1).
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="none, or balanced: weigh each class's loss by n / (classes * rows of that class)")


@register_objective
class Classify(Objective):
    name = "classify"
    options = ClassifyOptions
    data_kind = "classification"
    recipe = "heads"
    refuses = ONE_TASK_RECIPE_REFUSES | {
        "privacy": "DP-SGD is wired to the token loss (per-example scaling of a token sum); the head recipe "
                   "takes no per-example gradients",
    }
