"""The promotion gate decides on a paired comparison on the same rows: too few rows are
refused with the number needed, a clearly better candidate passes with its interval, a
forced promotion is recorded, and versions scored on different rows are both scored now on
the candidate's test split."""

import pytest
import yaml
from rich.console import Console

from deploy_helpers import fake_run, with_eval
from tuneforge.registry.gate import GateOptions, Scored, gated_promote
from tuneforge.registry.store import PromotionRefused, Registry

QUIET = Console(quiet=True)


@pytest.fixture
def two_runs(tiny_model_dir, tmp_path):
    return fake_run(tiny_model_dir, tmp_path / "old", seed=1), fake_run(tiny_model_dir, tmp_path / "new", seed=2)


def registry_with(tmp_path, old, new) -> Registry:
    reg = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    reg.add(old, "bot")
    reg.add(new, "bot")
    reg.promote("bot:v1", "prod", force=True)
    return reg


def test_a_better_candidate_on_three_rows_is_refused_as_too_few_and_force_is_recorded(two_runs, tmp_path):
    old, new = with_eval(two_runs[0], [0.0, 0.0, 0.0], "a"), with_eval(two_runs[1], [1.0, 1.0, 1.0], "a")
    reg = registry_with(tmp_path, old, new)
    with pytest.raises(PromotionRefused, match=r"too few rows to decide: 3 scored, 30 needed") as e:
        gated_promote(reg, "bot:v2", "prod", GateOptions(), console=QUIET)
    assert "exact_match 1.0000 vs 0.0000 on 3 rows" in str(e.value)
    assert reg.aliases("bot") == {"prod": 1}
    moved = gated_promote(reg, "bot:v2", "prod", GateOptions(), force=True, console=QUIET)
    assert reg.aliases("bot") == {"prod": 2} and "forced: too few rows" in moved
    assert reg.history("bot")[-1]["note"].startswith("forced: too few rows to decide: 3 scored, 30 needed")
    # Three rows are enough when the user says so: then the interval decides.
    reg.promote("bot:v1", "prod", force=True)
    assert "passed" in gated_promote(reg, "bot:v2", "prod", GateOptions(min_rows=3), console=QUIET)


def test_a_clearly_better_candidate_on_enough_rows_passes_with_its_interval_and_a_worse_one_is_refused(
        two_runs, tmp_path):
    old = with_eval(two_runs[0], [1.0, 0.0] * 20, "a")  # 50% on 40 rows
    new = with_eval(two_runs[1], [1.0] * 36 + [0.0] * 4, "a")  # 90% on the same rows
    reg = registry_with(tmp_path, old, new)
    moved = gated_promote(reg, "bot:v2", "prod", GateOptions(), console=QUIET)
    assert reg.aliases("bot") == {"prod": 2}
    assert "passed against bot:v1: exact_match 0.9000 vs 0.5000 on 40 rows, difference +0.4000 [+0." in moved
    assert "stored training-time evals (same rows)" in moved
    assert reg.history("bot")[-1]["note"].startswith("gate passed against bot:v1")
    # Back the other way: v1 is clearly worse than v2 on the same rows.
    with pytest.raises(PromotionRefused, match=r"not shown to be no worse \(lower end -0\.\d+ < -0\)"):
        gated_promote(reg, "bot:v1", "prod", GateOptions(), console=QUIET)


def test_versions_scored_on_different_rows_are_both_scored_now_on_the_candidates_test_split(
        two_runs, tiny_model_dir, tmp_path):
    old = with_eval(two_runs[0], [1.0] * 40, "a")
    new = with_eval(two_runs[1], [1.0] * 40, "b")  # another rows hash: the stored scores do not pair
    cfg = yaml.safe_load((new / "config.yaml").read_text())
    cfg["data"] = {"train": ["builtin:orders?n=80&seed=3"], "test_size": 0.5}
    (new / "config.yaml").write_text(yaml.safe_dump(cfg))
    reg = registry_with(tmp_path, old, new)
    calls = []

    def stub_scorer(run_dir, rows, label, ev):
        calls.append((run_dir, label, [r["messages"][-1]["content"] for r in rows]))
        good = run_dir == str(new.resolve())
        return Scored("exact_match", [1.0 if good or i % 2 else 0.0 for i in range(len(rows))])

    moved = gated_promote(reg, "bot:v2", "prod", GateOptions(), scorer=stub_scorer, console=QUIET)
    assert [c[:2] for c in calls] == [(str(old.resolve()), "bot:v1"), (str(new.resolve()), "bot:v2")]
    assert calls[0][2] == calls[1][2] and len(calls[0][2]) == 40  # the same rows: the candidate's test split
    assert "scored now on bot:v2's test split (their stored evals are on different rows)" in moved
    assert reg.aliases("bot") == {"prod": 2}


def test_the_default_scorer_scores_both_versions_on_the_candidates_rows(two_runs, tmp_path):
    old, new = two_runs  # no eval at all: both are scored now, with the candidate's eval settings
    for run in (old, new):  # real runs' configs (a run folder loads through its config)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["data"] = {"train": ["builtin:orders?n=20&seed=3"], "test_size": 0.5}
        cfg["eval"] = {"max_new_tokens": 3 if run == new else 50, "batch_size": 10}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    reg = registry_with(tmp_path, old, new)
    # Random adapters answer nothing right: 0 vs 0 on every row, an interval of [0, 0], no worse.
    moved = gated_promote(reg, "bot:v2", "prod", GateOptions(min_rows=10), console=QUIET)
    assert "passed against bot:v1: json_exact 0.0000 vs 0.0000 on 10 rows, difference +0.0000 [+0.0000, +0.0000]" in moved
    assert "a version has no per-example eval scores" in moved
