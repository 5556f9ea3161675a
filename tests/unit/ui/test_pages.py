"""The dashboard's pages and calls through the server app (FastAPI TestClient): the runs
table, a run page with its SVG curves and scores, the New run form's inline checks, plan,
YAML and command line, and the API key login."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from tuneforge.ui.charts import line_chart
from tuneforge.ui.newrun import field_of


def test_the_runs_table_lists_run_folders_with_status_method_and_metric(ui_app):
    with TestClient(ui_app) as c:
        r = c.get("/ui/runs")
    assert r.status_code == 200
    row = re.search(r'<tr data-id="alpha">(.*?)</tr>', r.text, re.DOTALL).group(1)
    assert "finished" in row and "lora + sft" in row and "builtin:orders?n=60" in row and "json_exact 0.75" in row
    beta = re.search(r'<tr data-id="beta">(.*?)</tr>', r.text, re.DOTALL).group(1)
    assert "running" in beta and "val_loss 1.85" in beta  # metrics written just now, no eval yet


def test_a_run_page_shows_curves_scores_metrics_and_config(ui_app):
    with TestClient(ui_app) as c:
        r = c.get("/ui/runs/alpha")
        live = c.get("/ui/runs/alpha/live")
        missing = c.get("/ui/runs/..%2F..%2Fetc")
    assert r.status_code == 200
    assert r.text.count("<polyline") == 3 and "train loss 1.4" in r.text and "validation loss 1.6" in r.text
    assert re.search(r"json_exact</td>\s*<td>0.25</td><td>0.75</td>\s*<td class=\"up\">\+0.5</td>", r.text)
    assert 'id="metrics"' in r.text and "lora" in r.text and "max_steps: 6" in r.text
    assert live.status_code == 200 and 'data-active="no"' in live.text and "<svg" in live.text
    assert missing.status_code == 404


def test_the_form_check_puts_each_validator_message_at_its_field(ui_app):
    form = {"model.name": "smollm2-135m-instruct", "data.train": "builtin:orders?n=60", "train.lr": "fast",
            "method.name": "lorra", "extra_yaml": "train: {lrr: 0.1}", "plan": False}
    with TestClient(ui_app) as c:
        r = c.post("/ui/api/validate", json=form)
    body = r.json()
    assert r.status_code == 200 and body["ok"] is False
    fields = {p["field"]: p["message"] for p in body["problems"]}
    assert "did you mean 'lora'" in fields["method.name"]
    assert "train.lr" in fields["train.lr"]
    assert "unknown key 'train.lrr'" in fields["extra_yaml"] and "did you mean 'train.lr'" in fields["extra_yaml"]
    assert "lrr: 0.1" in body["yaml"] and body["cli"][-1].startswith("tuneforge train ")


def test_a_valid_form_gets_the_plan_yaml_and_command(ui_app, tiny_model_dir):
    form = {"model.name": tiny_model_dir, "data.train": "builtin:orders?n=60", "train.max_steps": "4",
            "train.batch_size": "2", "data.max_length": "64", "run_name": "my run", "extra_yaml": "train: {dtype: fp32}"}
    with TestClient(ui_app) as c:
        body = c.post("/ui/api/validate", json=form).json()
    assert body["ok"] is True and body["problems"] == []
    assert body["yaml"].startswith("train:") and "max_steps: 4" in body["yaml"] and "run_name: my run" in body["yaml"]
    assert body["cli"] == ["tuneforge check my-run.yaml", "tuneforge plan my-run.yaml", "tuneforge train my-run.yaml"]
    plan = body["plan"]
    assert plan is not None, body.get("plan_error")
    assert plan["device"] == "cpu" and plan["batch"] == 2 and plan["seq"] == 64 and plan["steps"] == 4
    assert plan["rows"][0]["trainable"] > 0 and plan["rows"][0]["peak_gb"] > 0 and plan["total_s"] > 0


def test_a_yaml_box_that_is_not_a_mapping_is_a_problem_at_the_box(ui_app):
    with TestClient(ui_app) as c:
        body = c.post("/ui/api/validate", json={"extra_yaml": "- a\n- b", "plan": False}).json()
    assert body["problems"][0] == {"field": "extra_yaml", "message": "must be a mapping of config keys (key: value)"}


def test_the_new_run_page_has_every_field(ui_app):
    with TestClient(ui_app) as c:
        r = c.get("/ui/new")
    assert r.status_code == 200
    for name in ("model.name", "data.train", "train.lr", "extra_yaml"):
        assert f'id="f-{name}"' in r.text and f'id="p-{name}"' in r.text
    assert 'id="start"' in r.text and "disabled" not in re.search(r'<button[^>]*id="start"[^>]*>', r.text).group(0)
    # the registered methods and objectives (plug-ins included) are offered under their fields
    methods = re.search(r'<datalist id="l-method.name">(.*?)</datalist>', r.text, re.S).group(1)
    assert {"lora", "qlora", "full", "prompt"} <= set(re.findall(r'<option value="([^"]+)">', methods))
    objectives = re.search(r'<datalist id="l-objective.name">(.*?)</datalist>', r.text, re.S).group(1)
    assert {"sft", "dpo", "kto"} <= set(re.findall(r'<option value="([^"]+)">', objectives))
    assert 'list="l-model.name"' in r.text and "smollm2-135m-instruct" in r.text


def test_with_keys_pages_ask_for_a_key_and_a_tenant_sees_no_local_runs(ui_app, registry):
    admin = registry.create_key("ops", ["*"], admin=True)[1]
    app_key = registry.create_key("app", ["*"])[1]
    with TestClient(ui_app) as c:
        r = c.get("/ui/runs", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/ui/login?next=/ui/runs"
        assert c.post("/ui/api/validate", json={}).status_code == 401
        bad = c.post("/ui/login", data={"key": "nope", "next": "/ui/runs"}, follow_redirects=False)
        assert bad.status_code == 401 and "unknown or revoked" in bad.text
        ok = c.post("/ui/login", data={"key": admin, "next": "/ui/runs"}, follow_redirects=False)
        assert ok.status_code == 303 and "httponly" in ok.headers["set-cookie"].lower()
        assert 'data-id="alpha"' in c.get("/ui/runs").text
        c.cookies.clear()
        c.post("/ui/login", data={"key": app_key, "next": "/ui/runs"})
        page = c.get("/ui/runs")
        assert page.status_code == 200 and 'data-id="alpha"' not in page.text
        assert c.get("/ui/runs/alpha").status_code == 404


def test_static_files_are_served_locally(ui_app):
    with TestClient(ui_app) as c:
        assert "setupNewRun" in c.get("/ui/static/ui.js").text
        assert c.get("/ui/static/ui.css").headers["content-type"].startswith("text/css")
        assert c.get("/ui/static/../app.py").status_code == 404


def test_field_of_maps_messages_to_form_fields():
    assert field_of("'train.lr': Input should be a valid number (got 'x')") == "train.lr"
    assert field_of("unknown key 'method.rr': did you mean 'method.r'?") == "extra_yaml"
    assert field_of("unknown method 'lorra': did you mean 'lora'?") == "method.name"
    assert field_of("'data' is required") == "data.train"
    assert field_of("2 problems") == ""


def test_chart_labels_each_line_at_its_end_and_skips_non_finite_points():
    svg = line_chart({"train loss": [(1, 2.0), (2, float("nan")), (3, 1.0)], "validation loss": []}, "loss")
    assert svg.count("<polyline") == 1 and "train loss 1" in svg and "validation" not in svg
    assert "no data yet" in line_chart({}, "loss")


def test_line_labels_that_would_overlap_are_moved_apart():
    svg = line_chart({"a": [(1, 1.0), (2, 1.0)], "b": [(1, 2.0), (2, 1.0001)]}, "loss")
    ys = [float(y) for y in re.findall(r'<text x="[\d.]+" y="([\d.]+)" fill="[^"]+" class="line-label"', svg)]
    assert len(ys) == 2 and abs(ys[0] - ys[1]) >= 13


def test_tuneforge_ui_and_serve_ui_build_the_server_app_with_the_dashboard(monkeypatch, tmp_path, runs_dir):
    # deferred: only this test builds apps through the CLI (server.serve is patched below)
    from fastapi import FastAPI

    from tuneforge.cli import main
    from tuneforge.deploy import server
    from tuneforge.registry.store import Registry

    built = []

    def fake_serve(cfg, on_request=None, app_factory=server.create_app):
        app = app_factory(cfg, Registry(cfg.registry), object(), None)
        assert isinstance(app, FastAPI)
        c = TestClient(app)  # no lifespan: no worker, no model preload
        built.append((cfg.port, c.get("/ui/runs").status_code, c.get("/v1/models").status_code))

    monkeypatch.setattr(server, "serve", fake_serve)
    monkeypatch.setenv("TUNEFORGE_ALLOCATOR", "off")  # in process: serve would re-exec with the allocator
    reg = f"sqlite:///{tmp_path / 'r.db'}"
    assert main(["ui", "--runs", str(runs_dir), "--registry", reg, "--port", "8123"]) == 0
    assert main(["serve", "--ui", "--registry", reg]) == 0
    assert main(["serve", "--registry", reg]) == 0
    assert built == [(8123, 200, 200), (8000, 200, 200), (8000, 404, 200)]
