"""`tuneforge improve` on a tiny model: reviewed rows -> dataset -> training -> gate -> canary,
the registry route override the server reads per request, and promote-after on synthetic
arm feedback."""

import json
from pathlib import Path

import pytest
import yaml
from deploy_helpers import fake_run
from fastapi.testclient import TestClient
from rich.console import Console
from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneforge.data.builtin import orders
from tuneforge.deploy.config import ServeConfig
from tuneforge.deploy.server import create_app
from tuneforge.production.loop.improve import (ImproveConfig, ImproveError, export_dataset, improve, load_improve_config,
                                          promote_after)
from tuneforge.production.loop.review_queue import decide, fill_queue, list_items
from tuneforge.registry.tables import Feedback, RequestLog, ReviewItem
from tuneforge.registry.store import Registry

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def base_run(tiny_model_dir, tmp_path_factory):
    """The current version: a short LoRA run of the tiny model on the orders task."""
    from tuneforge.plugins import validate_config
    from tuneforge.train.run import train

    out = tmp_path_factory.mktemp("improve-base")
    cfg = validate_config({
        "model": {"name": tiny_model_dir},
        "data": {"train": ["builtin:orders?n=80&seed=3"], "max_length": 160, "val_size": 0.1, "test_size": 0.1},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"lr": 5e-3, "max_steps": 4, "batch_size": 4, "eval_every": 0, "save_every": 0, "seed": 7,
                  "dtype": "fp32"},
        "eval": {"max_new_tokens": 4, "limit": 4, "batch_size": 4, "baseline": False},
        "output_dir": str(out), "run_name": "v1"})
    return train(cfg, console=QUIET)


def reviewed_registry(path: Path, run_dir, n: int = 14) -> Registry:
    """bot:v1 at prod; n logged answers (wrong prose) with thumbs down, queued and decided:
    all corrected with the right JSON except one accepted, one rejected and one left undecided."""
    reg = Registry(f"sqlite:///{path}")
    reg.add(run_dir, "bot")
    reg.promote("bot:v1", "prod")
    rows = list(orders(n=n, seed=11))
    with Session(reg.engine) as s, s.begin():
        for k, r in enumerate(rows):
            s.add(RequestLog(id=f"req{k}", endpoint="chat", model="bot", route="bot", version="bot:v1", arm=None,
                             messages=[{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}],
                             response=f"answer {k} in prose"))
            s.add(Feedback(request_id=f"req{k}", thumbs="down"))
    fill_queue(reg)
    items = list_items(reg)
    assert len(items) == n
    for k, item in enumerate(items):
        if k == 0:
            decide(reg, item["id"], "accept", "ana")
        elif k == 1:
            decide(reg, item["id"], "reject", "ana")
        elif k == 2:
            continue  # undecided
        else:
            decide(reg, item["id"], "correct", "ana", rows[k]["output"])
    return reg


def test_only_decided_rows_flow_into_the_improve_dataset(base_run, tmp_path):
    reg = reviewed_registry(tmp_path / "reg.db", base_run)
    cfg = ImproveConfig(holdout=0.25, replay_share=0.5, seed=1)
    lineage = export_dataset(reg, "bot", Path(base_run), cfg, tmp_path / "data", QUIET)
    prepared = Path(lineage["prepared"])
    train = [json.loads(x) for x in (prepared / "train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (prepared / "validation.jsonl").read_text().splitlines()]
    answers = [r["messages"][-1]["content"] for r in train + held]
    assert "answer 0 in prose" in answers  # accepted: the logged answer is the training target
    assert "answer 1 in prose" not in answers  # rejected
    pending_prompt = list_items(reg)[0]["messages"][0]["content"]  # undecided: not even its prompt
    assert all(r["messages"][0]["content"] != pending_prompt for r in train + held)
    ids = {i["id"]: i for i in list_items(reg, "decided")}
    assert set(lineage["review_items_train"]) | set(lineage["review_items_holdout"]) == {
        i for i, v in ids.items() if v["decision"] != "reject"}
    assert not set(lineage["review_items_train"]) & set(lineage["review_items_holdout"])
    n_fb = len(lineage["review_items_train"])
    assert lineage["replayed_rows"] == len(train) - n_fb == n_fb  # replay_share 0.5: as many as reviewed
    assert len(held) == len(lineage["review_items_holdout"]) >= 2
    assert lineage["test_rows"]["kept"] <= lineage["test_rows"]["current"]
    assert (prepared / "manifest.json").is_file()


def test_improve_trains_only_on_its_own_models_answers(base_run, tmp_path):
    """Two models behind one A/B route: the other model's reviewed answers never reach this
    model's improve data, and improve.json's data record says which items were left out."""
    reg = reviewed_registry(tmp_path / "reg.db", base_run)
    reg.add(base_run, "overfit")
    with Session(reg.engine) as s, s.begin():
        for k in range(3):
            s.add(RequestLog(id=f"other{k}", endpoint="chat", model="bot", route="bot", version="overfit:v1",
                             arm="canary", messages=[{"role": "user", "content": f"other prompt {k}"}],
                             response="bread bread"))
            s.add(Feedback(request_id=f"other{k}", thumbs="down", correction=f"bread {k}"))
    fill_queue(reg)
    for item in list_items(reg, model="overfit"):
        decide(reg, item["id"], "correct", "ana", item["feedback"][0]["correction"])
    assert {i["version"] for i in list_items(reg, "all", model="bot")} == {"bot:v1"}  # review --model bot
    lineage = export_dataset(reg, "bot", Path(base_run), ImproveConfig(holdout=0.25, seed=1), tmp_path / "data", QUIET)
    prepared = Path(lineage["prepared"])
    texts = (prepared / "train.jsonl").read_text() + (prepared / "validation.jsonl").read_text()
    assert "bread" not in texts and "other prompt" not in texts
    others = {i["id"] for i in list_items(reg, "decided", model="overfit")}
    assert set(lineage["review_items_other_models"]["overfit:v1"]) == others and len(others) == 3
    assert not others & (set(lineage["review_items_train"]) | set(lineage["review_items_holdout"]))


def test_too_few_reviewed_items_is_a_clear_error(base_run, tmp_path):
    reg = reviewed_registry(tmp_path / "reg.db", base_run, n=4)  # 2 usable (1 accepted, 1 corrected)
    with pytest.raises(ImproveError, match="2 reviewed item\\(s\\) of bot ready.*tuneforge review --model bot"):
        export_dataset(reg, "bot", Path(base_run), ImproveConfig(), tmp_path / "data", QUIET)


def test_improve_refuses_then_passes_the_gate_and_sets_the_canary(base_run, tmp_path):
    reg = reviewed_registry(tmp_path / "reg.db", base_run)
    common = {"holdout": 0.25, "output_dir": str(tmp_path / "runs"), "seed": 1,
              "train": {"max_steps": 8, "lr": 1e-2}, "eval": {"limit": 4, "max_new_tokens": 4},
              "canary": {"weight": 0.1}}

    # a gate that asks for more than training gives: registered, not canaried, why said
    refused = improve(reg, "bot", ImproveConfig.model_validate(
        common | {"run_name": "try1", "gate": {"metric": "loss", "min_gain": 100, "min_rows": 2}}), QUIET)
    assert refused["version"] == "bot:v2" and refused["verdict"]["canary"] is False
    assert "feedback set loss is not shown to be better by more than 100: loss change +" in refused["verdict"]["why"][0]
    assert refused["verdict"]["changes"]["feedback"]["low"] <= refused["verdict"]["changes"]["feedback"]["high"]
    assert "canary" not in reg.aliases("bot") and reg.route_arms("bot") is None
    with Session(reg.engine) as s:
        assert s.scalars(select(ReviewItem.used_in)).all() == [None] * 14  # still available

    passed = improve(reg, "bot", ImproveConfig.model_validate(
        common | {"run_name": "try2", "gate": {"metric": "loss", "tolerance": 0.05, "min_rows": 2}}), QUIET)
    new, cur = passed["scores"]["new"], passed["scores"]["current"]
    assert new["feedback"]["loss"] < cur["feedback"]["loss"]  # trained on the corrections
    assert passed["verdict"]["canary"] is True, passed["verdict"]
    assert passed["version"] == "bot:v3" and reg.aliases("bot") == {"prod": 1, "canary": 3}
    assert reg.route_arms("bot") == [{"name": "prod", "target": "bot@prod", "weight": 0.9},
                                     {"name": "canary", "target": "bot@canary", "weight": 0.1}]
    run_dir = tmp_path / "runs" / "try2"
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["train"]["init_from"] == reg.resolve("bot:v1").run_dir  # continued from the current version
    assert cfg["data"]["train"] == [str(run_dir / "improve-data" / "prepared")]
    recorded = json.loads((run_dir / "improve.json").read_text())
    assert recorded["data"]["review_items_train"] == passed["data"]["review_items_train"]
    with Session(reg.engine) as s:
        used = dict(s.execute(select(ReviewItem.id, ReviewItem.used_in)).all())
    assert {i for i, v in used.items() if v == "bot:v3"} == set(passed["data"]["review_items_train"])
    assert all(used[i] is None for i in passed["data"]["review_items_holdout"])

    # the default gate refuses to decide on so few rows and says how many it needs; force overrides, recorded
    reg = reviewed_registry(tmp_path / "reg2.db", base_run)
    few = improve(reg, "bot", ImproveConfig.model_validate(common | {"run_name": "try-few", "gate": {"metric": "loss"}}),
                  QUIET, force=True)
    assert few["verdict"]["canary"] is True and reg.aliases("bot")["canary"] == 2
    assert any("rows; the gate needs 20 (gate.min_rows) to decide" in why for why in few["verdict"]["forced"])
    assert json.loads((tmp_path / "runs" / "try-few" / "improve.json").read_text())["verdict"]["forced"]


class FakeEngine:
    async def stream(self, req):
        from tuneforge.deploy.engines import Chunk

        yield Chunk(req.adapter, "stop", prompt_tokens=1, completion_tokens=1)

    async def close(self):
        pass


@pytest.fixture
def canary_reg(tiny_model_dir, tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    for k in range(2):
        reg.add(fake_run(tiny_model_dir, tmp_path / f"r{k}", seed=k), "bot")
    reg.promote("bot:v1", "prod")
    reg.promote("bot:v2", "canary")
    return reg


def test_route_override_reaches_a_running_server(canary_reg):
    records = []
    c = TestClient(create_app(ServeConfig(), canary_reg, FakeEngine(), on_request=records.append))

    def served(n):
        return [c.post("/v1/chat/completions", json={"model": "bot", "user": f"u{k}",
                                                     "messages": [{"role": "user", "content": "hi"}]}).json()["model"]
                for k in range(n)]

    assert set(served(20)) == {"bot:v1"}
    canary_reg.set_route_arms("bot", [{"name": "prod", "target": "bot@prod", "weight": 0.5},
                                      {"name": "canary", "target": "bot@canary", "weight": 0.5}])
    got = served(60)
    assert 15 <= got.count("bot:v2") <= 45 and records[-1].route == "bot" and records[-1].arm in ("prod", "canary")
    canary_reg.clear_route_arms("bot")
    assert set(served(20)) == {"bot:v1"}
    with pytest.raises(ValueError):
        canary_reg.set_route_arms("bot", [{"name": "x", "target": "bot@prod", "weight": 0}])  # serve.yaml's rules


def arm_feedback(reg, arm, version, good, bad, start=0):
    with Session(reg.engine) as s, s.begin():
        for k in range(good + bad):
            rid = f"{arm}-{version}-{start + k}"
            s.add(RequestLog(id=rid, endpoint="chat", model="bot", route="bot", arm=arm, version=version,
                             response="x"))
            s.add(Feedback(request_id=rid, thumbs="up" if k < good else "down"))


def start(reg, weight=0.1):
    reg.set_route_arms("bot", [{"name": "prod", "target": "bot@prod", "weight": 1 - weight},
                               {"name": "canary", "target": "bot@canary", "weight": weight}], restart=True)


def test_promote_after_waits_widens_then_promotes(canary_reg, tmp_path):
    cfg = ImproveConfig.model_validate({"promote": {"min_per_arm": 30, "max_weight": 0.4}})
    start(canary_reg)
    arm_feedback(canary_reg, "canary", "bot:v2", 5, 0)
    arm_feedback(canary_reg, "prod", "bot:v1", 3, 2)
    assert promote_after(canary_reg, "bot", cfg, QUIET)["action"] == "wait"  # too few rows
    arm_feedback(canary_reg, "canary", "bot:v2", 40, 5, start=100)
    arm_feedback(canary_reg, "canary", "bot:v1", 0, 50, start=200)  # served by another version: not counted
    arm_feedback(canary_reg, "prod", "bot:v1", 20, 25, start=100)
    step = promote_after(canary_reg, "bot", cfg, QUIET)
    assert step["action"] == "widen" and step["test"]["p_value"] < 0.05
    assert step["feedback"]["canary"]["n"] == 50 and step["feedback"]["canary"]["good"] == 45
    assert {a["name"]: a["weight"] for a in canary_reg.route_arms("bot")} == {"prod": 0.8, "canary": 0.2}
    assert promote_after(canary_reg, "bot", cfg, QUIET)["weight_after"] == pytest.approx(0.4)
    step = promote_after(canary_reg, "bot", cfg, QUIET)
    assert step["action"] == "promote"
    assert canary_reg.aliases("bot")["prod"] == 2 and canary_reg.route_arms("bot") is None
    steps = json.loads((tmp_path / "r1" / "improve.json").read_text())["steps"]
    assert [s["action"] for s in steps] == ["wait", "widen", "widen", "promote"]
    with pytest.raises(ImproveError, match="no canary arm"):
        promote_after(canary_reg, "bot", cfg, QUIET)


def test_promote_after_rolls_back_a_significant_regression_and_waits_on_noise(canary_reg):
    cfg = ImproveConfig.model_validate({"promote": {"min_per_arm": 30}})
    start(canary_reg)
    arm_feedback(canary_reg, "canary", "bot:v2", 20, 20)
    arm_feedback(canary_reg, "prod", "bot:v1", 22, 18)
    step = promote_after(canary_reg, "bot", cfg, QUIET)
    assert step["action"] == "wait" and step["test"]["p_value"] > 0.05
    arm_feedback(canary_reg, "canary", "bot:v2", 0, 40, start=100)
    arm_feedback(canary_reg, "prod", "bot:v1", 30, 10, start=100)
    step = promote_after(canary_reg, "bot", cfg, QUIET)
    assert step["action"] == "rollback"
    assert canary_reg.route_arms("bot") is None and canary_reg.aliases("bot")["prod"] == 1


def test_improve_config_errors_name_the_key(tmp_path):
    path = tmp_path / "improve.yaml"
    path.write_text("holdout: 2\ngate: {metrc: loss}\n")
    with pytest.raises(Exception) as e:
        load_improve_config(path)
    assert "holdout" in str(e.value) and "did you mean 'gate.metric'" in str(e.value)


def test_example_config_is_valid():
    cfg = load_improve_config(Path(__file__).parents[3] / "examples" / "improve.yaml")
    assert cfg.canary.route == "support-bot" and cfg.train == {"max_steps": 60, "lr": 1e-4}


def test_cli_promote_after_and_its_errors(canary_reg, capsys):
    from tuneforge.cli import main

    url = str(canary_reg.engine.url)
    assert main(["improve", "bot", "--promote-after", "--registry", url]) == 2
    assert "route bot has no canary arm" in capsys.readouterr().err
    start(canary_reg)
    arm_feedback(canary_reg, "canary", "bot:v2", 3, 0)
    assert main(["improve", "bot", "--promote-after", "--registry", url]) == 0
    assert "each arm needs 30" in capsys.readouterr().out.replace("\n", " ")
    assert main(["improve", "nobody", "--registry", url]) == 2
    assert "no model named 'nobody'" in capsys.readouterr().err


def test_changed_training_data_is_refused(base_run, tmp_path):
    import shutil

    run = shutil.copytree(base_run, tmp_path / "v1")
    report = json.loads((run / "data_report.json").read_text())
    (run / "data_report.json").write_text(json.dumps(report | {"manifest_sha256": "0" * 64}))
    reg = reviewed_registry(tmp_path / "reg.db", run)
    with pytest.raises(ImproveError, match="changed since it was trained"):
        export_dataset(reg, "bot", run, ImproveConfig(), tmp_path / "data", QUIET)
