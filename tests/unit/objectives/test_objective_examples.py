"""The objective example configs validate (a typo in an example is a bug)."""

from pathlib import Path

import pytest
import yaml

from tuneforge.plugins import load_config
from tuneforge.train.rlhf import stage_configs

EXAMPLES = Path(__file__).parents[3] / "examples"


@pytest.mark.parametrize("name, objective", [("dpo", "dpo"), ("classify", "classify"), ("reward", "reward"),
                                             ("cpt", "cpt"), ("distill", "distill")])
def test_example_configs_validate(name, objective):
    assert load_config(EXAMPLES / f"{name}.yaml").objective.name == objective


def test_rlhf_example_validates():
    cfgs = stage_configs(yaml.safe_load((EXAMPLES / "rlhf.yaml").read_text()))
    assert [c.objective.name for c in cfgs.values()] == ["sft", "reward", "policy"]
    assert cfgs["policy"].objective.algorithm == "grpo"


def test_nproc_is_refused_for_objectives_with_their_own_loop(monkeypatch):
    from tuneforge.cli import main

    monkeypatch.setenv("TUNEFORGE_ALLOCATOR", "off")  # no re-exec of the test process with tcmalloc

    with pytest.raises(SystemExit) as e:
        main(["train", "--nproc", "2", str(EXAMPLES / "dpo.yaml")])
    assert "objective 'dpo' trains on one process" in str(e.value)
