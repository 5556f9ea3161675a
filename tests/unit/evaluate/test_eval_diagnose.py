"""Curve diagnosis rules on synthetic curves."""

import json
import math

from tuneforge.evaluate.diagnose import diagnose, read_curves


def curve(values, every=1):
    return [(i * every + every, v) for i, v in enumerate(values)]


def kinds(train, val):
    return [f.kind for f in diagnose(train, val)]


def test_healthy_run_is_ok():
    train = curve([2.0 * 0.9 ** i + 0.3 for i in range(40)])
    val = curve([1.5, 0.9, 0.6, 0.5], every=10)
    assert kinds(train, val) == ["ok"]


def test_overfitting_when_val_rises_while_train_falls():
    train = curve([2.0 * 0.9 ** i + 0.05 for i in range(60)])
    val = curve([1.2, 0.8, 0.7, 0.8, 0.95, 1.1], every=10)
    [f] = diagnose(train, val)
    assert f.kind == "overfitting"
    assert "step 30" in f.evidence and "train.max_steps=30" in f.suggestion


def test_one_noisy_validation_point_is_not_overfitting_and_the_verdict_is_one():
    """The case users saw: 'overfitting, stop near step 7' and 'underfitting, train longer' for
    the same run, from one high validation point at the end."""
    train = curve([3.2 - 0.05 * i for i in range(20)])  # falling, still above 2 nats at the end
    noisy = curve([2.9, 2.7, 2.6, 2.75], every=5)  # one noisy point after the minimum
    [f] = diagnose(train, noisy)
    assert f.kind == "underfitting"
    few = curve([2.0 * 0.9 ** i + 0.3 for i in range(20)])
    [g] = diagnose(few, curve([1.5, 0.9], every=10))
    assert g.kind == "too_few_points" and "2 validation point(s)" in g.evidence


def test_underfitting_when_flat_or_high():
    assert kinds(curve([3.0, 2.98, 2.99, 2.97, 2.96, 2.97, 2.95, 2.96, 2.95, 2.94]), curve([2.96], 10)) == [
        "underfitting"]
    high = curve([6.0 - 0.1 * i for i in range(20)])  # falling, but still ~4 nats at the end
    [f] = diagnose(high, curve([4.3], 20))
    assert f.kind == "underfitting" and "still high" in f.evidence
    rising = curve([2.0 * 0.9 ** i + 2.5 for i in range(60)])  # val truly rising AND high: over-fitting wins
    assert kinds(rising, curve([3.0, 2.8, 2.7, 2.8, 2.95, 3.1], every=10)) == ["overfitting"]


def test_too_high_lr_spikes_divergence_and_nan():
    spiky = [1.0 - 0.02 * i for i in range(30)]
    spiky[20] = 5.0
    [f] = diagnose(curve(spiky), [])
    assert f.kind == "lr_too_high" and "step 21" in f.evidence
    diverging = curve([1.0, 0.9, 0.95, 1.2, 1.6, 2.2, 3.0, 4.1, 5.5, 7.0])
    assert kinds(diverging, []) == ["lr_too_high"]
    assert "not finite" in diagnose(curve([1.0, 0.8, math.nan]), [])[0].evidence


def test_near_zero_loss_wobble_is_not_a_spike():
    """A converged run's 0.002 -> 0.007 is 3.5x the median but 0.005 nats: noise, not a high LR."""
    converged = [0.5 * 0.7 ** i + 0.002 for i in range(40)]
    converged[35] = 0.007
    assert kinds(curve(converged), []) == ["too_few_points"]  # no spike; without validation, no more to say


def test_read_curves_from_metrics_jsonl(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [{"kind": "train", "step": 1, "loss": 1.0},
                                                   {"kind": "eval", "step": 1, "val_loss": 1.1}]) + "\n")
    assert read_curves(p) == ([(1, 1.0)], [(1, 1.1)])
