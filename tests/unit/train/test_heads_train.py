"""Sequence-head objectives on the tiny Llama: classification (labels saved in the config,
metrics computed, head trained through LoRA's modules_to_save) and a Bradley-Terry reward
model that ranks held-out pairs above chance."""

import json
import random

import pytest
import torch

from tuneforge.plugins import validate_config
from tuneforge.runs import load_head
from tuneforge.train.run import train

LABELS = ["coffee mug", "desk lamp", "teapot"]


def _cls_file(path):
    rng = random.Random(0)
    rows = []
    for _ in range(100):
        label = rng.choice(LABELS)
        rows.append({"message": f"please send {rng.randint(1, 9)} {label} to {rng.choice(['Oslo', 'Lyon'])}",
                     "topic": label})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_classify_trains_head_and_reports_metrics(tiny_raw_cfg, tmp_path):
    raw = tiny_raw_cfg | {"objective": {"name": "classify"}, "run_name": "cls"}
    raw["data"] = {"train": [_cls_file(tmp_path / "cls.jsonl")], "columns": {"text": "message", "label": "topic"},
                   "max_length": 64, "val_size": 0.1, "test_size": 0.2}
    raw["train"] = raw["train"] | {"lr": 1e-2, "max_steps": 10, "batch_size": 8, "eval_every": 0, "save_every": 0}
    run_dir = train(validate_config(raw))
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["labels"] == sorted(LABELS) and len(ev["confusion_matrix"]) == 3
    # 20% of 100 rows, per label; a group of equal prompts stays whole, so a label's share can run over
    assert sum(map(sum, ev["confusion_matrix"])) == ev["n"] and 20 <= ev["n"] <= 24
    assert ev["accuracy"] > ev["majority_baseline_accuracy"]
    head = json.loads((run_dir / "head/config.json").read_text())
    assert head["id2label"] == {"0": "coffee mug", "1": "desk lamp", "2": "teapot"}
    model, tok = load_head(run_dir)  # base + adapter + trained head, merged
    enc = tok(["please send 3 teapot to Oslo"], return_tensors="pt")
    with torch.no_grad():
        assert model(**enc).logits.shape == (1, 3)
    saved = (run_dir / "adapter/adapter_model.safetensors")
    from safetensors.torch import load_file
    assert any("score" in k for k in load_file(str(saved)))  # the new head is saved with the adapter


def test_balanced_class_weights_make_each_class_count_equally():
    import torch.nn.functional as F

    from tuneforge.objectives.classify import balanced_class_weights
    from tuneforge.train.recipes.heads import classify_step

    y = [0] * 6 + [1] * 2 + [2]  # 6:2:1
    w = balanced_class_weights(y, 4)  # class 3 has no rows
    assert w == pytest.approx([9 / 24, 9 / 8, 9 / 4, 1.0])
    logits = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    model = lambda input_ids, attention_mask: type("Out", (), {"logits": logits})()  # noqa: E731
    batch = {"input_ids": None, "attention_mask": None, "labels": torch.tensor(y)}
    plain, _ = classify_step(model, batch)
    weighted, _ = classify_step(model, batch, torch.tensor(w))
    ce = F.cross_entropy(logits, torch.tensor(y), reduction="none")
    per_class_means = [ce[torch.tensor(y) == c].mean() for c in range(3)]
    assert plain == pytest.approx(float(ce.mean()))
    # over the training distribution the weighted loss is the mean of the per-class mean losses
    assert weighted == pytest.approx(float(sum(per_class_means) / 3))


def test_classify_class_weights_are_validated_and_recorded(tiny_raw_cfg, tmp_path):
    from tuneforge.config import ConfigError

    raw = tiny_raw_cfg | {"objective": {"name": "classify", "class_weights": "balancd"}, "run_name": "cw"}
    with pytest.raises(ConfigError, match="class_weights"):
        validate_config(raw)
    rows = [{"text": f"please send {i} mugs", "label": "mug"} for i in range(60)]
    rows += [{"text": f"please send {i} lamps", "label": "lamp"} for i in range(20)]
    path = tmp_path / "imbalanced.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    raw["objective"]["class_weights"] = "balanced"
    raw["data"] = {"train": [str(path)], "max_length": 32, "val_size": 0.1, "test_size": 0.2}
    raw["train"] = raw["train"] | {"lr": 1e-2, "max_steps": 4, "batch_size": 8, "eval_every": 0, "save_every": 0}
    summary = json.loads((train(validate_config(raw)) / "summary.json").read_text())
    w = summary["class_weights"]
    assert w == pytest.approx({"lamp": 2.0, "mug": 2 / 3}, abs=1e-4)  # train: 42 mug, 14 lamp (stratified split)


def test_reward_model_ranks_held_out_pairs_above_chance(tiny_raw_cfg):
    raw = tiny_raw_cfg | {"objective": {"name": "reward"}, "run_name": "rm"}
    raw["data"] = {"train": ["builtin:orders_preference?n=100&seed=3"], "max_length": 200, "val_size": 0.1,
                   "test_size": 0.2}
    raw["train"] = raw["train"] | {"lr": 1e-2, "max_steps": 10, "batch_size": 8, "eval_every": 0, "save_every": 0}
    run_dir = train(validate_config(raw))
    ev = json.loads((run_dir / "eval.json").read_text())["tuned"]
    assert ev["pairwise_accuracy"] > 0.5 and ev["margin"] > 0
    assert json.loads((run_dir / "head/config.json").read_text())["id2label"] == {"0": "reward"}


def test_labels_unseen_in_training_are_refused_by_name():
    from types import SimpleNamespace

    from tuneforge.config import ConfigError
    from tuneforge.train.recipes.heads import label_names

    rows = lambda *labels: [{"text": f"t{i}", "label": x} for i, x in enumerate(labels)]  # noqa: E731
    splits = SimpleNamespace(train=rows("bug", "billing", "bug"), validation=rows("bug"), test=rows("refund", "bug"))
    with pytest.raises(ConfigError, match=r"labels \['refund'\] occur in the data but not in the training split"):
        label_names(SimpleNamespace(labels=None), splits)
    with pytest.raises(ConfigError, match=r"\['refund'\] .* not in objective.labels"):
        label_names(SimpleNamespace(labels=["bug", "billing"]), splits)
    assert label_names(SimpleNamespace(labels=["bug", "billing", "refund"]), splits) == ["bug", "billing", "refund"]
