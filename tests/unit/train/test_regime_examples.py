"""The regime examples in examples/ validate (config, stages, search space)."""

from pathlib import Path

from tuneforge.plugins import load_config
from tuneforge.train.sequence import load_sequence
from tuneforge.train.sweep import load_space

EX = Path(__file__).resolve().parents[3] / "examples"


def test_regime_examples_validate():
    assert [t.name for t in load_config(EX / "multitask.yaml").data.tasks] == ["orders", "reviews"]
    assert load_config(EX / "private.yaml").privacy.target_epsilon == 8.0
    stages = load_sequence(EX / "sequence.yaml", ["run_name=s", "continual.replay_share=0.2"])
    assert [s.run_name for s in stages] == ["00-orders", "01-reviews"]
    assert stages[0].continual.replay_share == 0 and stages[1].continual.replay_share == 0.2
    assert set(load_space(EX / "sweep-space.yaml")) == {"train.lr", "method.r", "train.warmup_ratio"}
