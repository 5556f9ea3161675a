"""`registry promote --max-fairness-gap`: refuses a version whose eval's fairness gap is above
the limit, or that has none (saying how to produce it); passes below; --force overrides and
the alias history records why."""

import json
import pytest

from deploy_helpers import fake_run
from tuneforge.registry.store import PromotionRefused, Registry, RegistryError


@pytest.fixture
def reg_runs(tiny_model_dir, tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    runs = [fake_run(tiny_model_dir, tmp_path / f"run{i}", seed=i, score=0.5 + 0.1 * i) for i in range(3)]
    for gap, run in zip((0.02, 0.12), runs):
        (run / "eval").mkdir()
        (run / "eval" / "eval_results.json").write_text(json.dumps({"fairness": {"max_gap": {
            "metric": "json_exact", "value": gap, "ci": [gap - 0.01, gap + 0.01], "flagged": True,
            "source": "slices terms:names: male vs female"}}}))
    for run in runs:
        reg.add(run, "bot")  # v1 gap 0.02, v2 gap 0.12, v3 no fairness section
    return reg, runs


def test_promote_gates_on_the_fairness_gap(reg_runs):
    reg, runs = reg_runs
    assert reg.promote("bot:v1", "prod", max_fairness_gap=0.05) == "bot@prod -> v1"
    with pytest.raises(PromotionRefused, match=r"fairness gap json_exact 0\.1200 .*male vs female.*above "
                                               r"--max-fairness-gap 0\.05"):
        reg.promote("bot:v2", "prod", max_fairness_gap=0.05)
    assert reg.aliases("bot") == {"prod": 1}
    assert reg.promote("bot:v2", "prod", max_fairness_gap=0.15) == "bot@prod -> v2"  # the limit above its gap
    with pytest.raises(PromotionRefused, match=r"no evaluation at .*eval_results\.json.*--fairness default"):
        reg.promote("bot:v3", "prod", max_fairness_gap=0.5)
    assert "forced" in reg.promote("bot:v3", "prod", force=True, max_fairness_gap=0.5)
    assert reg.history("bot")[-1]["note"].startswith("forced: v3 has no evaluation")
    (runs[2] / "eval").mkdir()
    (runs[2] / "eval" / "eval_results.json").write_text(json.dumps({"fairness": None}))
    reg.add(runs[2], "bot")
    with pytest.raises(PromotionRefused, match="measured no fairness gap"):
        reg.promote("bot:v4", "staging", max_fairness_gap=0.5)  # a first promotion is gated too
    with pytest.raises(RegistryError, match="share >= 0"):
        reg.promote("bot:v1", "prod", max_fairness_gap=-1)


def test_cli_flag_reaches_the_gate(reg_runs, capsys):
    from tuneforge.cli import main

    reg, _ = reg_runs
    url = str(reg.engine.url)
    assert main(["registry", "promote", "bot:v2", "--max-fairness-gap", "0.05", "--registry", url]) == 3
    assert "above --max-fairness-gap 0.05" in capsys.readouterr().err
    assert main(["registry", "promote", "bot:v1", "--max-fairness-gap", "0.05", "--registry", url]) == 0
