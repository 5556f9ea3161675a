"""`auto` in the New run form and on the run page (FastAPI TestClient): the auto box and
"auto" typed in a field make the config leave those settings to auto (train/auto.py); the
plan preview lists auto's decisions with their reasons; a run folder's auto.json is shown."""

from __future__ import annotations

import json
import re

import yaml
from fastapi.testclient import TestClient

from tuneforge.ui import newrun


def _form(model: str, **extra) -> dict:
    return {"model.name": model, "data.train": "builtin:orders?n=60", "train.lr": "", "train.max_steps": "2",
            "extra_yaml": "train: {dtype: fp32}", **extra}


def test_the_auto_box_with_an_empty_lr_leaves_lr_to_auto(ui_app, tiny_model_dir):
    with TestClient(ui_app) as c:
        body = c.post("/ui/api/validate", json=_form(tiny_model_dir, auto=True, plan=False)).json()
    assert body["ok"] is True, body["problems"]
    shown = yaml.safe_load(body["yaml"])
    assert shown["auto"] == "all" and "lr" not in shown["train"]
    checked = newrun.check(_form(tiny_model_dir, auto=True))
    assert "lr" not in checked.raw["train"] and {"lr", "epochs", "batch_size"} <= set(checked.config.auto)
    # a value the form gives is not auto's: max_steps stays, a typed lr wins over the box
    typed = newrun.check(_form(tiny_model_dir, auto=True, **{"train.lr": "1e-4"}))
    assert typed.config.train.lr == 1e-4 and "lr" not in typed.config.auto and "epochs" in typed.config.auto
    # unticked: no auto at all
    assert newrun.check(_form(tiny_model_dir, auto=False)).config.auto == []


def test_auto_typed_in_a_field_leaves_that_setting_to_auto(ui_app, tiny_model_dir):
    with TestClient(ui_app) as c:
        body = c.post("/ui/api/validate", json=_form(tiny_model_dir, plan=False, **{"train.epochs": "Auto"})).json()
    assert body["ok"] is True, body["problems"]
    assert yaml.safe_load(body["yaml"])["train"]["epochs"] == "auto"
    assert newrun.check(_form(tiny_model_dir, **{"train.epochs": "auto"})).config.auto == ["epochs"]


def test_the_box_and_an_auto_in_the_yaml_box_are_refused_at_the_box(ui_app, tiny_model_dir):
    form = _form(tiny_model_dir, auto=True, plan=False, extra_yaml="auto: [epochs]")
    with TestClient(ui_app) as c:
        body = c.post("/ui/api/validate", json=form).json()
    assert body["ok"] is False
    assert [p["field"] for p in body["problems"]] == ["auto"] and "auto: ['epochs']" in body["problems"][0]["message"]


def test_the_plan_preview_lists_autos_decisions_and_plans_the_decided_values(ui_app, tiny_model_dir, monkeypatch):
    import tuneforge.plan

    planned = []  # the configs the plan was asked for (the real plan is test_pages' subject; it takes minutes here)

    def fake_plan(cfg):
        planned.append(cfg)
        return {"device": "cpu", "dtype": "torch.float32", "batch": cfg.train.batch_size, "seq": cfg.data.max_length,
                "memory": [], "rows": {}, "speed": None,
                "shape": tuneforge.plan.StepShape(cfg.train.batch_size, cfg.data.max_length, "test")}

    monkeypatch.setattr(tuneforge.plan, "plan", fake_plan)
    with TestClient(ui_app) as c:  # one app start: its job worker thread starts once
        body = c.post("/ui/api/validate", json=_form(tiny_model_dir, auto=True)).json()
        plain = c.post("/ui/api/validate", json=_form(tiny_model_dir, **{"train.lr": "1e-4"})).json()
    plan = body["plan"]
    assert plan is not None, body.get("plan_error")
    decided = {d["setting"]: d["value"] for d in plan["auto"]}
    assert {"train.lr", "train.epochs", "train.batch_size", "data.max_length", "method.r"} <= set(decided)
    assert all(isinstance(d["why"], str) and d["why"] for d in plan["auto"])
    # the plan is of the decided values, not of the defaults
    cfg = planned[0]
    assert (cfg.train.lr, cfg.train.batch_size, cfg.data.max_length, cfg.method.r) == \
        (decided["train.lr"], decided["train.batch_size"], decided["data.max_length"], decided["method.r"])
    assert cfg.data.max_length != 512 or cfg.train.lr != 2e-4  # not simply the defaults again
    assert plain["plan"]["auto"] == [] and planned[1].train.lr == 1e-4


def test_a_run_page_shows_the_runs_auto_decisions(ui_app, runs_dir):
    decisions = [{"key": "train.epochs", "value": 3, "reason": "60 rows: 3 passes"},
                 {"key": "train.lr", "value": 0.0002, "reason": "LoRA on a 135M model"}]
    (runs_dir / "alpha" / "auto.json").write_text(json.dumps({"decisions": decisions, "task_shape": {}}))
    with TestClient(ui_app) as c:
        page, other = c.get("/ui/runs/alpha").text, c.get("/ui/runs/beta").text
    table = re.search(r'<table class="grid" id="auto-decisions">(.*?)</table>', page, re.S).group(1)
    rows = re.findall(r"<tr><td><code>(.*?)</code></td><td>(.*?)</td><td>(.*?)</td></tr>", table)
    assert rows == [("train.epochs", "3", "60 rows: 3 passes"), ("train.lr", "0.0002", "LoRA on a 135M model")]
    assert 'id="auto-decisions"' not in other  # a run without auto.json


def test_the_new_run_page_offers_the_auto_box_and_auto_in_the_number_fields(ui_app):
    with TestClient(ui_app) as c:
        r = c.get("/ui/new")
    assert 'type="checkbox" id="f-auto" name="auto"' in r.text and 'id="p-auto"' in r.text
    for name in newrun.AUTO_FIELDS:
        assert re.search(rf'<input id="f-{re.escape(name)}" name="{re.escape(name)}"[^>]*placeholder="default, or auto"',
                         r.text)
