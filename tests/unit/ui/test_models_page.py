"""The Models page's A/B routes, monitoring charts and alerts (TestClient). The request log is
written by the server's own RequestLogger and the feedback posted to /v1/feedback; the page's
numbers are checked against deploy.abreport.report and the monitor's thresholds."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from tests.unit.production.test_monitor import fake_embed
from tests.unit.ui.conftest import FakeEngine, make_run
from tuneforge.deploy.abreport import report
from tuneforge.deploy.config import ServeConfig
from tuneforge.production import request_log
from tuneforge.production.config import LoggingConfig
from tuneforge.production.http import RequestRecord
from tuneforge.production.loop import drift
from tuneforge.production.loop.review_queue import list_items
from tuneforge.registry.tables import utc_now
from tuneforge.ui.app import create_ui_app

ROUTE = {"arms": [{"name": "prod", "target": "bot:v1", "weight": 0.5},
                  {"name": "canary", "target": "bot:v2", "weight": 0.5}]}


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def ab_app(tmp_path, registry):
    for n, (name, model) in enumerate([("r1", "bot"), ("r2", "bot"), ("o1", "other")]):
        d = make_run(tmp_path / "reg-runs", name)
        (d / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * (n + 1))
        (d / "eval.json").write_text(json.dumps({"tuned": {"scores": {"json_exact": 0.5}}}))
        registry.add(d, model)
    cfg = ServeConfig.model_validate({"jobs": {"enabled": False}, "routes": {"bot-ab": ROUTE}})
    return create_ui_app(cfg, registry, FakeEngine(), runs_dir=tmp_path / "runs")


def log_requests(registry, monkeypatch, plan: list[tuple], hours_ago: float, prompt: str = "question {}") -> list[str]:
    """(arm, version, n, errors, latency_s) -> n requests through the server's request logger,
    stamped ``hours_ago``; returns the answered requests' ids."""
    at = utc_now() - timedelta(hours=hours_ago)
    monkeypatch.setattr(request_log, "utc_now", lambda: at)
    logger = request_log.RequestLogger(registry.engine, LoggingConfig(retention_days=None))
    ids = []
    for arm, version, n, errors, latency in plan:
        for i in range(n):
            rid = f"chatcmpl-{arm}-{hours_ago}-{i}"
            failed = i < errors
            logger(RequestRecord(endpoint="chat", model="bot-ab", request_id=rid, route="bot-ab", arm=arm,
                                 version=version, status=503 if failed else 200, latency_s=latency + i / 100,
                                 messages=[{"role": "user", "content": prompt.format(i)}],
                                 response=None if failed else f"answer {i}", finish_reason="stop"))
            ids += [] if failed else [rid]
    assert logger.flush()
    logger.close()
    return ids


def arm_cells(page: str, arm: str) -> dict[str, str]:
    row = re.search(rf'<tr data-arm="{arm}".*?</tr>', page, re.S).group(0)
    return {k: re.sub(r"<[^>]+>", "", v).strip() for k, v in re.findall(r'<td class="([\w-]+)">(.*?)</td>', row, re.S)}


def test_arms_figures_match_abreport_and_an_alert_appears_only_past_its_threshold(ab_app, registry, monkeypatch):
    _, admin = registry.create_key("ops", ["*"], admin=True)
    ids = log_requests(registry, monkeypatch, [("prod", "bot:v1", 30, 1, 0.2), ("canary", "bot:v2", 30, 1, 0.4)], 3)
    with TestClient(ab_app) as c:
        for n, rid in enumerate(ids):
            assert c.post("/v1/feedback", json={"request_id": rid, "score": 0.9 if "prod" in rid else 0.5 + n % 2 / 10},
                          headers=bearer(admin)).status_code == 200
        calm = c.get("/ui/models", headers=bearer(admin)).text
        # One hour later the canary fails 5 of 25 requests: its error rate passes 0.05.
        log_requests(registry, monkeypatch, [("canary", "bot:v2", 25, 5, 0.4)], 1)
        page = c.get("/ui/models", headers=bearer(admin)).text
        week = c.get("/ui/models?window=7d", headers=bearer(admin)).text
        bad = c.get("/ui/models?window=2y", headers=bearer(admin))

    expected = {a["arm"]: a for a in report(registry, "bot-ab", since=utc_now() - timedelta(hours=24))["arms"]}
    assert expected["canary"]["requests"] == 55 and expected["prod"]["feedback"] == 29
    for arm, a in expected.items():
        cells = arm_cells(page, arm)
        assert cells["requests"] == str(a["requests"])
        assert cells["errors"] == f"{a['errors']} ({100 * a['error_rate']:.1f}%)"
        assert (cells["p50"], cells["p95"]) == (f"{a['p50_s']:.3f}", f"{a['p95_s']:.3f}")
        assert (cells["feedback"], cells["score"]) == (str(a["feedback"]), f"{a['mean_score']:.3f}")
        assert cells["share"].startswith("50%")
    p = expected["prod"]["p_values"] or expected["canary"]["p_values"]
    other = "prod" if expected["prod"]["p_values"] else "canary"
    assert arm_cells(page, other)["p-score"] == f"{p['score']:.3g}" and p["score"] < 0.001

    # Charts: one line per route and version, computed per hour bucket.
    assert 'aria-label="latency p95 (s)"' in page and "<title>bot-ab bot:v2</title>" in page
    assert 'aria-label="requests per 6h"' in week

    # No alert before the errors; after them one critical error_rate alert on the canary's version.
    assert "no open alerts (rules: error_rate &gt; 0.05" in calm and 'class="alert' not in calm
    alerts = re.findall(r'<tr class="alert (\w+)" data-metric="(\w+)">.*?<td class="value">([\d.]+)</td>', page, re.S)
    assert alerts == [("critical", "error_rate", f"{6 / 55:.4g}")]
    assert "bot:v2" in re.search(r'<tr class="alert.*?</tr>', page, re.S).group(0)
    assert bad.status_code == 400 and "window is one of 24h, 7d" in bad.text


def test_split_and_end_need_an_admin_key_and_are_saved(ab_app, registry, monkeypatch):
    _, admin = registry.create_key("ops", ["*"], admin=True)
    _, tenant = registry.create_key("app", ["other"])
    log_requests(registry, monkeypatch, [("prod", "bot:v1", 3, 0, 0.2)], 2)
    with TestClient(ab_app) as c:
        tenant_page = c.get("/ui/models", headers=bearer(tenant)).text
        forbidden = c.post("/ui/routes/bot-ab/split", json={"weights": {"prod": 0.1, "canary": 0.9}},
                           headers=bearer(tenant))
        zero = c.post("/ui/routes/bot-ab/split", json={"weights": {"prod": 1, "canary": 0}}, headers=bearer(admin))
        missing = c.post("/ui/routes/bot-ab/split", json={"weights": {"prod": 1}}, headers=bearer(admin))
        assert registry.route_arms("bot-ab") is None  # nothing saved by a refused change
        split = c.post("/ui/routes/bot-ab/split", json={"weights": {"prod": 0.8, "canary": 0.2}}, headers=bearer(admin))
        after_split = c.get("/ui/models", headers=bearer(admin)).text
        end = c.post("/ui/routes/bot-ab/end", json={"keep": "canary"}, headers=bearer(admin))
        ended = registry.route_arms("bot-ab")
        cleared = c.post("/ui/routes/bot-ab/end", json={"clear": True}, headers=bearer(admin))
        again = c.post("/ui/routes/bot-ab/end", json={"clear": True}, headers=bearer(admin))

    # The tenant sees its own model only, and no admin control.
    assert "<h2>other</h2>" in tenant_page and "<h2>bot</h2>" not in tenant_page
    assert 'class="split"' not in tenant_page and "end-test" not in tenant_page
    assert 'form class="promote"' not in tenant_page
    assert forbidden.status_code == 403
    assert zero.status_code == 400 and "greater than 0" in zero.json()["error"]["message"]
    assert zero.json()["error"]["message"].startswith("route bot-ab: arm canary weight: ")
    assert missing.status_code == 400
    assert "one weight per arm of bot-ab: prod, canary" in missing.json()["error"]["message"]
    assert split.status_code == 200 and split.json()["result"] == "route bot-ab: prod 80%, canary 20%"
    assert arm_cells(after_split, "prod")["share"].startswith("80%") and "ui: split set by ops" in after_split
    assert end.status_code == 200 and ended == [{"name": "canary", "target": "bot:v2", "weight": 1.0}]
    assert cleared.status_code == 200 and registry.route_arms("bot-ab") is None
    assert again.status_code == 400 and "no override to clear" in again.json()["error"]["message"]


def test_drift_alert_only_when_the_drift_test_is_asked_for_and_nothing_is_queued(ab_app, registry, monkeypatch):
    monkeypatch.setattr(drift, "minilm_pair", fake_embed)  # the encoder is not loaded in unit tests
    log_requests(registry, monkeypatch, [("prod", "bot:v1", 25, 0, 0.2)], 2, prompt="How do I cook pasta number {}?")
    with TestClient(ab_app) as c:
        plain = c.get("/ui/models").text  # an open server (no key yet): every model, no admin control
        tested = c.get("/ui/models?drift=true").text
    assert "drift_p_value" not in plain and "no open alerts" in plain and "(drift test off)" in plain
    alert = re.search(r'<tr class="alert (\w+)" data-metric="drift_p_value">.*?</tr>', tested, re.S)
    assert alert and alert.group(1) == "warning" and "bot:v1" in alert.group(0)
    assert "drift bot-ab bot:v1: p=" in tested
    assert list_items(registry, "all") == []  # the dashboard never fills the review queue
