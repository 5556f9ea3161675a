"""The objectives' pure functions against values computed by hand."""

import math

import pytest
import torch

from tuneforge.data.formats import detect
from tuneforge.data.load import DataError, load_rows
from tuneforge.objectives.classify import classification_metrics
from tuneforge.objectives.cpt import pack_text
from tuneforge.objectives.distill import kd_loss_sum
from tuneforge.objectives.preference import dpo_loss, orpo_loss, sequence_logps, simpo_loss
from tuneforge.objectives.reward import bradley_terry_loss, pairwise_accuracy
from tuneforge.train.recipes.online_rl import hacking_alarm

t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731

# Policy/reference log-probs of one pair: the log-ratio margin h = (-1 + 1.5) - (-2 + 1.5) = 1.
PC, PR, RC, RR = t(-1.0), t(-2.0), t(-1.5), t(-1.5)


@pytest.mark.parametrize("loss_type, expected", [
    ("sigmoid", math.log(1 + math.exp(-0.1))),  # -log σ(β h), β = 0.1
    ("hinge", 0.9),  # max(0, 1 - β h)
    ("ipo", 16.0),  # (h - 1/(2β))² = (1 - 5)²
])
def test_dpo_variants(loss_type, expected):
    loss, rc, rr = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type=loss_type)
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    assert (rc.item(), rr.item()) == pytest.approx((0.05, -0.05))  # β (π - π_ref) per side


def test_dpo_label_smoothing():
    loss, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * math.log(1 + math.exp(-0.1)) + 0.1 * math.log(1 + math.exp(0.1)))


def test_simpo():
    # mean log-probs -4/4 = -1 and -6/2 = -3; β = 2, γ = 0.5: -log σ(-2 + 6 - 0.5)
    loss, rc, rr = simpo_loss(t(-4.0), t(-6.0), t(4.0), t(2.0), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-3.5)))
    assert (rc.item(), rr.item()) == pytest.approx((-2.0, -6.0))


def test_orpo():
    # mean token probabilities 0.5 (odds 1) and 0.25 (odds 1/3): log odds ratio ln 3
    loss, oc, orj = orpo_loss(t(2 * math.log(0.5)), t(math.log(0.25)), t(2.0), t(1.0), lam=0.1)
    assert loss.item() == pytest.approx(-math.log(0.5) + 0.1 * math.log(1 + 1 / 3))
    assert (oc.item(), orj.item()) == pytest.approx((0.0, -math.log(3)))


def test_bradley_terry_and_pairwise_accuracy():
    assert bradley_terry_loss(t(2.0), t(0.0)).item() == pytest.approx(math.log(1 + math.exp(-2)))
    assert bradley_terry_loss(t(2.0), t(0.0), center_coef=0.01).item() == pytest.approx(
        math.log(1 + math.exp(-2)) + 0.04)
    assert pairwise_accuracy(t(1.0, 0.0, 2.0), t(0.0, 0.0, 3.0)) == pytest.approx(1 / 3)  # a tie is wrong


def test_sequence_logps_sums_only_labelled_tokens():
    hidden = torch.zeros(2, 4, 4)  # with an identity head: uniform logits, log p = -ln 4 everywhere
    hidden[1, 0, 1] = math.log(3.0)  # row 1, position 0 predicts token 1 with p = 3/6
    labels = torch.tensor([[-100, -100, 2, 3], [-100, 1, -100, -100]])
    logp, n = sequence_logps(hidden, labels, torch.nn.Identity())
    assert logp.tolist() == pytest.approx([-2 * math.log(4), math.log(0.5)]) and n.tolist() == [2, 1]


def test_kd_loss():
    student = torch.zeros(1, 2)
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # p_teacher = (0.75, 0.25)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss_sum(student, teacher, torch.tensor([0]), 1.0, 0.0).item() == pytest.approx(kl, abs=1e-6)
    # T² scaling, and alpha mixes in the hard-label CE (ln 2 for uniform student logits).
    both = kd_loss_sum(student, teacher, torch.tensor([0]), 2.0, 0.5).item()
    p = torch.softmax(teacher / 2, -1)[0]
    kl_t2 = float((p * (p.log() - math.log(0.5))).sum())
    assert both == pytest.approx(0.5 * math.log(2) + 0.5 * 4 * kl_t2, abs=1e-6)


def test_classification_metrics():
    m = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["b"]["recall"] == 1.0
    assert m["macro"]["f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_pack_text_joins_documents_with_eos_and_counts_the_dropped_tail():
    assert pack_text([[1, 2, 3], [4, 5]], 0, 4) == ([[1, 2, 3, 0], [4, 5, 0]], 0)
    assert pack_text([[1, 2, 3], [4, 5]], 0, 6) == ([[1, 2, 3, 0, 4, 5]], 1)


def test_hacking_alarm():
    assert hacking_alarm({"kl": 0.1, "completions/mean_length": 20}, 20, 5.0, 0.25) is None
    assert "KL" in hacking_alarm({"kl": 9.0}, 20, 5.0, 0.25)
    assert "collapsing" in hacking_alarm({"kl": 0.1, "completions/mean_length": 3}, 20, 5.0, 0.25)


def test_formats_are_detected_within_the_objectives_kind(tmp_path):
    assert detect({"prompt", "chosen", "rejected"}, {}, "preference")[0] == "preference"
    assert detect({"text", "label"}, {}, "classification")[0] == "classification"
    assert detect({"text"}, {}, "text")[0] == "text"
    assert detect({"prompt", "completion", "text"}, {}, "sft")[0] == "prompt_completion"  # text is not chat
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a", "rejected": "a"}\n'
                 '{"prompt": [{"role": "user", "content": "hi"}], "chosen": "x", "rejected": "y"}\n')
    rows, report = load_rows([str(f)], kind="preference")
    assert [r["prompt"] for r in rows] == [[{"role": "user", "content": "q"}], [{"role": "user", "content": "hi"}]]
    assert report.dropped == {"rejected: identical to chosen": 1}
    with pytest.raises(DataError, match="holds preference rows"):
        load_rows([str(f)], fmt="preference", kind="sft")
