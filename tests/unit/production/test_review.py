"""The review queue: filling rules, idempotence, decisions, the terminal loop and the HTTP API."""

import io
from datetime import datetime

import pytest
from fastapi.testclient import TestClient
from rich.console import Console
from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneforge.deploy.config import ServeConfig
from tuneforge.deploy.server import create_app
from tuneforge.cli import main
from tuneforge.production.loop.review_queue import (AlreadyDecided, QueueRules, ReviewError, UnknownItem, decide, fill_queue,
                                         get_item, list_items, review_loop)
from tuneforge.registry.tables import Feedback, RequestLog, ReviewItem
from tuneforge.registry.store import Registry


def log_row(rid, prompt="What is 2+2?", response="5", **kw):
    return RequestLog(id=rid, endpoint="chat", model="bot", version="bot:v1", route="bot", arm="prod",
                      messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}],
                      response=response, **kw)


def add_log(reg, rid, **kw):
    with Session(reg.engine) as s, s.begin():
        s.add(log_row(rid, **kw))


def add_feedback(reg, rid, **kw):
    with Session(reg.engine) as s, s.begin():
        s.add(Feedback(request_id=rid, **kw))


@pytest.fixture
def reg(tmp_path):
    r = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    add_log(r, "low", response="5")
    add_feedback(r, "low", score=0.2, comment="wrong sum")
    add_log(r, "high")
    add_feedback(r, "high", score=0.9)
    add_log(r, "down")
    add_feedback(r, "down", thumbs="down")
    add_log(r, "fixed")
    add_feedback(r, "fixed", thumbs="down", correction="4")
    add_log(r, "json", response="{not json", json_requested=True)
    add_log(r, "fell", fallback_reason="bot@canary: timed out after 5s")
    add_log(r, "failed", response=None, status=500, error="boom")  # nothing to review: no answer
    with Session(r.engine) as s, s.begin():
        s.add_all([log_row(f"plain{k}", response="ok") for k in range(200)])
    return r


def reasons(reg):
    with Session(reg.engine) as s:
        return dict(s.execute(select(ReviewItem.request_id, ReviewItem.reason)).all())


def test_fill_queues_each_signal_once_and_is_idempotent(reg):
    added = fill_queue(reg, QueueRules(sample_rate=0.1, seed=3))
    got = reasons(reg)
    assert {k: got[k] for k in ("low", "down", "fixed", "json", "fell")} == {
        "low": "low_feedback", "down": "low_feedback", "fixed": "correction", "json": "guard", "fell": "fallback"}
    assert "high" not in got and "failed" not in got
    sampled = [k for k, v in got.items() if v == "sample"]
    assert 8 <= len(sampled) <= 35  # ~10% of 200 plain requests, seeded
    assert added == {"low_feedback": 2, "correction": 1, "guard": 1, "fallback": 1, "sample": len(sampled)}
    assert fill_queue(reg, QueueRules(sample_rate=0.1, seed=3)) == {}  # second fill adds nothing
    assert reasons(reg) == got


def test_sampling_is_seeded(reg):
    fill_queue(reg, QueueRules(sample_rate=0.1, seed=3, corrections=False, thumbs_down=False, low_score=0,
                               guard=False, fallbacks=False))
    first = sorted(reasons(reg))
    with Session(reg.engine) as s, s.begin():
        s.query(ReviewItem).delete()
    fill_queue(reg, QueueRules(sample_rate=0.1, seed=3, corrections=False, thumbs_down=False, low_score=0,
                               guard=False, fallbacks=False))
    assert sorted(reasons(reg)) == first
    with Session(reg.engine) as s, s.begin():
        s.query(ReviewItem).delete()
    fill_queue(reg, QueueRules(sample_rate=0.1, seed=4, corrections=False, thumbs_down=False, low_score=0,
                               guard=False, fallbacks=False))
    assert sorted(reasons(reg)) != first


def test_fill_respects_since(reg):
    assert fill_queue(reg, QueueRules(since=datetime(2999, 1, 1))) == {}


def test_decide_records_reviewer_and_time_once(reg):
    fill_queue(reg)
    items = {i["request_id"]: i for i in list_items(reg)}
    low = items["low"]
    assert low["feedback"][0]["comment"] == "wrong sum" and low["messages"][1]["content"] == "What is 2+2?"
    out = decide(reg, low["id"], "correct", "ana", "4")
    assert out["decision"] == "correct" and out["corrected"] == "4" and out["reviewer"] == "ana"
    assert out["decided_at"] is not None
    with pytest.raises(AlreadyDecided, match="already decided \\(correct by ana"):
        decide(reg, low["id"], "reject", "bob")
    with pytest.raises(UnknownItem):
        decide(reg, 9999, "accept", "ana")
    with pytest.raises(ReviewError, match="needs the corrected answer"):
        decide(reg, items["down"]["id"], "correct", "ana", "  ")
    with pytest.raises(ReviewError, match="one of accept, correct, reject"):
        decide(reg, items["down"]["id"], "maybe", "ana")
    with pytest.raises(ReviewError, match="reviewer"):
        decide(reg, items["down"]["id"], "accept", "")
    assert [i["request_id"] for i in list_items(reg, "decided")] == ["low"]
    assert "low" not in [i["request_id"] for i in list_items(reg)]


def test_terminal_loop_decides_skips_and_resumes(reg):
    fill_queue(reg)
    pending = list_items(reg, reasons=["low_feedback", "correction"])
    assert [i["request_id"] for i in pending] == ["low", "down", "fixed"]
    out = io.StringIO()
    # low: unknown key, then correct with a two-line answer; down: skip; fixed: 'c' + empty line
    # takes the user's correction; then input ends (resumable).
    keys = io.StringIO("x\nc\nThe sum is\n4.\n\ns\nc\n\n")
    done = review_loop(reg, "ana", ["low_feedback", "correction"], console=Console(file=out, width=120), stdin=keys)
    assert done == {"correct": 2, "skip": 1}
    text = out.getvalue()
    assert "What is 2+2?" in text and "unknown key 'x'" in text and "score 0.2" in text
    assert "[a]ccept  [c]orrect  [r]eject  [s]kip  [q]uit > " in text  # the keys, not eaten as markup
    decided = {i["request_id"]: i for i in list_items(reg, "decided")}
    assert decided["low"]["corrected"] == "The sum is\n4." and decided["fixed"]["corrected"] == "4"
    assert decided["low"]["reviewer"] == "ana"
    # resume: only the skipped item is still pending for these reasons; quit leaves it pending
    done = review_loop(reg, "bob", ["low_feedback", "correction"], console=Console(file=io.StringIO()),
                       stdin=io.StringIO("r\n"))
    assert done == {"reject": 1}
    assert list_items(reg, reasons=["low_feedback", "correction"]) == []
    assert list_items(reg, "decided", ["low_feedback"])[-1]["reviewer"] == "bob"


def test_terminal_loop_quit_leaves_items_pending(reg):
    fill_queue(reg)
    n = len(list_items(reg))
    done = review_loop(reg, "ana", console=Console(file=io.StringIO()), stdin=io.StringIO("a\nq\n"))
    assert done == {"accept": 1}
    assert len(list_items(reg)) == n - 1


class NoEngine:
    async def close(self):
        pass


def test_http_review_api(reg):
    fill_queue(reg)
    c = TestClient(create_app(ServeConfig(), reg, NoEngine()))
    r = c.get("/v1/review/items", params={"status": "pending", "reason": "correction"})
    assert r.status_code == 200
    [item] = r.json()["data"]
    assert item["request_id"] == "fixed" and item["feedback"][0]["correction"] == "4"
    ok = c.post(f"/v1/review/items/{item['id']}", json={"decision": "correct", "corrected": "4", "reviewer": "ana"})
    assert ok.status_code == 200 and ok.json()["reviewer"] == "ana" and ok.json()["decision"] == "correct"
    again = c.post(f"/v1/review/items/{item['id']}", json={"decision": "accept", "reviewer": "bob"})
    assert again.status_code == 409 and again.json()["error"]["type"] == "conflict_error"
    missing = c.post("/v1/review/items/9999", json={"decision": "accept", "reviewer": "bob"})
    assert missing.status_code == 404 and "no review item" in missing.json()["error"]["message"]
    other = list_items(reg)[0]["id"]
    bad = c.post(f"/v1/review/items/{other}", json={"decision": "maybe", "reviewer": "bob"})
    assert bad.status_code == 400 and "one of accept" in bad.json()["error"]["message"]
    no_reviewer = c.post(f"/v1/review/items/{other}", json={"decision": "accept"})
    assert no_reviewer.status_code == 400 and "reviewer" in no_reviewer.json()["error"]["message"]
    not_json = c.post(f"/v1/review/items/{other}", content=b"{oops", headers={"content-type": "application/json"})
    assert not_json.status_code == 400
    assert c.get("/v1/review/items", params={"status": "nope"}).status_code == 400
    assert c.get("/v1/review/items", params={"limit": "ten"}).json()["error"]["code"] == 400
    assert c.get("/v1/review/items/abc").json()["error"]["code"] == 404
    assert c.post("/v1/review/items/abc", json={"decision": "accept", "reviewer": "x"}).status_code == 404
    assert c.get(f"/v1/review/items/{other}").json()["decision"] is None
    assert list_items(reg)[0]["id"] == other  # the bad requests changed nothing

    # with keys: only an admin key reviews; a tenant's key (scoped, or for all models: what
    # `keys create` makes by default) may neither read items nor decide them
    _, scoped = reg.create_key("app", ["bot"])
    _, tenant = reg.create_key("tenant", [])
    _, admin = reg.create_key("ops", [], admin=True)
    assert c.get("/v1/review/items").status_code == 401
    for key in (scoped, tenant):
        denied = c.get("/v1/review/items", headers={"Authorization": f"Bearer {key}"})
        assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
        assert "admin or reviewer key" in denied.json()["error"]["message"]
        assert c.get(f"/v1/review/items/{other}", headers={"Authorization": f"Bearer {key}"}).status_code == 403
        post = c.post(f"/v1/review/items/{other}", json={"decision": "correct", "corrected": "x", "reviewer": "m"},
                      headers={"Authorization": f"Bearer {key}"})
        assert post.status_code == 403
    assert c.get(f"/v1/review/items/{other}").status_code == 401
    assert list_items(reg)[0]["id"] == other  # still pending: the refused decisions stored nothing
    assert c.get("/v1/review/items", headers={"Authorization": f"Bearer {admin}"}).status_code == 200


def test_cli_review_fills_and_reads_keys_from_stdin(reg, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("a\nq\n"))
    assert main(["review", "--reviewer", "cli", "--reason", "fallback", "--registry", str(reg.engine.url)]) == 0
    out = capsys.readouterr().out
    assert "queued" in out and "1 fallback" in out
    [item] = list_items(reg, "decided")
    assert item["request_id"] == "fell" and item["reviewer"] == "cli" and item["decision"] == "accept"
    assert main(["review", "--low-score", "2", "--registry", str(reg.engine.url)]) == 2
    assert "low_score" in capsys.readouterr().err


def test_a_reviewer_key_reviews_only_the_items_of_its_models(reg, capsys):
    with Session(reg.engine) as s, s.begin():  # another tenant's request, rated down
        s.add(RequestLog(id="other", endpoint="chat", model="shop:v2", version="shop:v2",
                         messages=[{"role": "user", "content": "SECRET ORDER"}], response="no"))
        s.add(Feedback(request_id="other", thumbs="down"))
    fill_queue(reg)
    c = TestClient(create_app(ServeConfig(), reg, NoEngine()))
    assert main(["keys", "create", "--name", "bot-reviewer", "--models", "bot", "--reviewer",
                 "--registry", str(reg.engine.url)]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    auth = {"Authorization": f"Bearer {key}"}
    mine = c.get("/v1/review/items", params={"status": "all", "limit": "3"}, headers=auth).json()["data"]
    assert len(mine) == 3 and all(i["route"] == "bot" for i in mine)
    everything = c.get("/v1/review/items", params={"status": "all", "limit": "1000"}, headers=auth).text
    assert "SECRET ORDER" not in everything and '"other"' not in everything
    [theirs] = [i for i in list_items(reg, "all") if i["request_id"] == "other"]
    assert c.get(f"/v1/review/items/{theirs['id']}", headers=auth).status_code == 404
    r = c.post(f"/v1/review/items/{theirs['id']}", json={"decision": "correct", "corrected": "x", "reviewer": "m"},
               headers=auth)
    assert r.status_code == 404 and get_item(reg, theirs["id"])["decision"] is None
    r = c.post(f"/v1/review/items/{mine[0]['id']}", json={"decision": "accept", "reviewer": "m"}, headers=auth)
    assert r.status_code == 200 and r.json()["decision"] == "accept"
    assert main(["keys", "list", "--registry", str(reg.engine.url)]) == 0
    assert "reviewer" in capsys.readouterr().out
