"""The dashboard's review queue and models pages through the server app (TestClient): the
review API's access rule and decide(); promote (gated, force) and rollback with an admin key."""

from __future__ import annotations

import json
import re

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from tests.unit.ui.conftest import make_run
from tuneforge.production.loop.review_queue import QueueRules, fill_queue, get_item
from tuneforge.registry.tables import Feedback, RequestLog


def add_request(reg, rid, model="bot", response="5", **feedback):
    with Session(reg.engine) as s, s.begin():
        s.add(RequestLog(id=rid, endpoint="chat", model=model, version=f"{model}:v1", route=model, arm="prod",
                         messages=[{"role": "user", "content": f"<b>What</b> is 2+2? ({rid})"}], response=response))
        s.add(Feedback(request_id=rid, **feedback))


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_review_page_lists_shows_and_decides_items_for_admin_and_reviewer_keys(ui_app, registry):
    add_request(registry, "r1", comment="wrong sum", score=0.1)
    add_request(registry, "r2", thumbs="down", correction="4")
    add_request(registry, "r3", model="other", thumbs="down")
    fill_queue(registry, QueueRules(sample_rate=0))
    _, admin = registry.create_key("ops", ["*"], admin=True)
    _, rev = registry.create_key("rev", ["bot"], reviewer=True)
    _, tenant = registry.create_key("app", ["*"])
    with TestClient(ui_app) as c:
        page = c.get("/ui/review", headers=bearer(rev))
        assert page.status_code == 200
        ids = re.findall(r'<tr data-id="(\d+)"', page.text)
        assert len(ids) == 2  # the reviewer sees its model's items only, not "other"'s
        assert "&lt;b&gt;What&lt;/b&gt;" in page.text and "wrong sum" in page.text  # autoescaped prompt
        second = c.get(f"/ui/review?item={ids[1]}", headers=bearer(rev))
        assert "correction: <code>4</code>" in second.text and f'data-prev="/ui/review?status=pending&amp;item={ids[0]}"' in second.text
        ok = c.post(f"/ui/review/{ids[0]}", json={"decision": "accept"}, headers=bearer(rev))
        fixed = c.post(f"/ui/review/{ids[1]}", json={"decision": "correct", "corrected": "4"}, headers=bearer(rev))
        again = c.post(f"/ui/review/{ids[0]}", json={"decision": "reject"}, headers=bearer(rev))
        empty = c.post(f"/ui/review/{ids[1]}", json={"decision": "correct"}, headers=bearer(admin))
        other = [i for i in re.findall(r'<tr data-id="(\d+)"', c.get("/ui/review", headers=bearer(admin)).text)]
        hidden = c.post(f"/ui/review/{other[0]}", json={"decision": "reject"}, headers=bearer(rev))
        assert c.get("/ui/review", headers=bearer(tenant)).status_code == 403
        assert c.post(f"/ui/review/{other[0]}", json={"decision": "reject"}, headers=bearer(tenant)).status_code == 403
        decided = c.get("/ui/review?status=decided", headers=bearer(rev)).text
    assert ok.status_code == 200 and ok.json()["decision"] == "accept" and ok.json()["reviewer"] == "rev"
    assert fixed.status_code == 200 and get_item(registry, int(ids[1]))["corrected"] == "4"
    assert again.status_code == 409 and "already decided" in again.json()["error"]["message"]
    assert empty.status_code == 400 and "needs the corrected answer" in empty.json()["error"]["message"]
    assert other == [other[0]] and hidden.status_code == 404  # not this reviewer's: no existence leak
    assert get_item(registry, int(other[0]))["decision"] is None
    assert decided.count("<tr data-id=") == 2


def test_promote_then_rollback_moves_the_alias_and_needs_an_admin_key(ui_app, registry, tmp_path):
    for n, (name, score) in enumerate([("r1", 0.75), ("r2", 0.5)]):
        d = make_run(tmp_path / "reg-runs", name)
        (d / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * (n + 1))
        (d / "eval.json").write_text(json.dumps({"tuned": {"scores": {"json_exact": score}}}))
        registry.add(d, "bot")
    _, admin = registry.create_key("ops", ["*"], admin=True)
    _, tenant = registry.create_key("app", ["bot"])
    with TestClient(ui_app) as c:
        assert c.post("/ui/models/bot/promote", json={"version": 1, "alias": "prod"},
                      headers=bearer(tenant)).status_code == 403
        tenant_page = c.get("/ui/models", headers=bearer(tenant)).text
        first = c.post("/ui/models/bot/promote", json={"version": 1, "alias": "prod"}, headers=bearer(admin))
        refused = c.post("/ui/models/bot/promote", json={"version": 2, "alias": "prod"}, headers=bearer(admin))
        forced = c.post("/ui/models/bot/promote", json={"version": "v2", "alias": "prod", "force": True},
                        headers=bearer(admin))
        after_promote = registry.aliases("bot")
        back = c.post("/ui/models/bot/rollback", json={"alias": "prod"}, headers=bearer(admin))
        none_left = c.post("/ui/models/bot/rollback", json={"alias": "prod"}, headers=bearer(admin))
        page = c.get("/ui/models", headers=bearer(admin)).text
    assert "bot:v2" in tenant_page and "form class=\"promote\"" not in tenant_page  # no buttons for a tenant
    assert first.status_code == 200 and first.json()["result"] == "bot@prod -> v1"
    assert refused.status_code == 409 and "worse than v1" in refused.json()["error"]["message"]
    assert forced.status_code == 200 and "forced" in forced.json()["result"] and after_promote == {"prod": 2}
    assert back.status_code == 200 and registry.aliases("bot") == {"prod": 1}
    assert none_left.status_code == 400 and "no earlier version" in none_left.json()["error"]["message"]
    assert 'data-alias="prod">bot@prod &rarr; v1' in page and page.count('<form class="promote"') == 2
    assert "rollback @prod: v2 &rarr; v1" in page


def test_review_page_filters_by_reason_and_an_admin_fills_the_queue_from_the_page(ui_app, registry):
    add_request(registry, "r1", score=0.1)
    add_request(registry, "r2", thumbs="down")
    add_request(registry, "r3", correction="4")
    add_request(registry, "r4", score=0.9)
    _, admin = registry.create_key("ops", ["*"], admin=True)
    _, rev = registry.create_key("rev", ["bot"], reviewer=True)
    with TestClient(ui_app) as c:
        assert 'id="empty"' in c.get("/ui/review", headers=bearer(admin)).text  # nothing queued yet
        assert c.post("/ui/review/fill", json={}, headers=bearer(rev)).status_code == 403  # reviewers decide, not fill
        bad = c.post("/ui/review/fill", json={"low_score": 2}, headers=bearer(admin))
        assert bad.status_code == 400 and "low_score" in bad.json()["error"]["message"]
        filled = c.post("/ui/review/fill", json={"low_score": 0.5}, headers=bearer(admin))
        assert filled.json()["added"] == {"low_feedback": 2, "correction": 1}  # r4 scored well: not queued
        assert c.post("/ui/review/fill", json={}, headers=bearer(admin)).json()["added"] == {}  # each request once

        page = c.get("/ui/review", headers=bearer(admin)).text
        assert "low_feedback (2)" in page and "correction (1)" in page and 'id="fill"' in page
        only = c.get("/ui/review?reason=correction", headers=bearer(admin)).text
        assert len(re.findall(r'<tr data-id="(\d+)"', only)) == 1 and "(r3)" in only
        assert 'data-here="/ui/review?status=pending&amp;reason=correction"' in only  # decisions stay in the filter
        assert 'id="fill"' not in c.get("/ui/review", headers=bearer(rev)).text
