"""Request logging (queue -> writer thread -> registry DB, redaction, opt-out, overflow,
locked database, retention) and POST /v1/feedback, with a fake engine."""

import sqlite3
import threading
from datetime import timedelta

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from tuneforge.deploy.config import ServeConfig
from tuneforge.deploy.engines import Chunk
from tuneforge.deploy.server import create_app
from tuneforge.production.http import RequestRecord
from tuneforge.production.config import LoggingConfig
from tuneforge.production.request_log import RequestLogger, purge
from tuneforge.registry.tables import Feedback, RequestLog, ReviewItem, utc_now
from tuneforge.registry.store import Registry


class EchoEngine:
    """Answers with a fixed text that contains a phone number (to check response redaction).
    It declares response_format (the server refuses json requests to engines that do not) and
    ignores it: the log records that JSON was asked, whatever came back."""

    SUPPORTS = frozenset({"response_format"})

    async def stream(self, req):
        yield Chunk("Call me at +1 415 555 0132 ")
        yield Chunk("ok", "stop", prompt_tokens=7, completion_tokens=4)

    async def close(self):
        pass


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A registrable run folder; the fake engine never loads its weights."""
    d = tmp_path_factory.mktemp("prodlog-run") / "r"
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    (d / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "tiny"}, "method": {"name": "lora"}}))
    return d


@pytest.fixture
def reg(tmp_path, run_dir):
    r = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    r.add(run_dir, "bot")
    return r


@pytest.fixture
def served(reg):
    """(client, logger, registry) for a gateway with request logging on."""
    made = []

    def make(**logging):
        cfg = ServeConfig(logging=LoggingConfig(**logging))
        logger = RequestLogger(reg.engine, cfg.logging)
        made.append(logger)
        return TestClient(create_app(cfg, reg, EchoEngine(), on_request=logger)), logger

    yield make
    for lg in made:
        lg.close()


def chat(c, text="hi", key=None, **body):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return c.post("/v1/chat/completions", headers=headers,
                  json={"model": "bot", "messages": [{"role": "user", "content": text}], **body})


def rows(reg) -> list[RequestLog]:
    with Session(reg.engine) as s:
        return list(s.scalars(select(RequestLog).order_by(RequestLog.at)))


def test_logged_request_is_redacted_and_its_id_is_the_response_id(served, reg):
    c, logger = served()
    r = chat(c, "my email is ana.lopez@example.com, token sk-proj-abcdefghijklmnopqrstuvwx",
             response_format={"type": "json_object"}, user="u-7")
    assert r.status_code == 200
    assert logger.flush()
    [row] = rows(reg)
    assert row.id == r.json()["id"]  # the id a client sends feedback with
    content = row.messages[0]["content"]
    assert "ana.lopez" not in content and "<EMAIL>" in content and "<SECRET>" in content
    assert row.response == "Call me at <PHONE> ok" and row.redactions == 3
    assert (row.version, row.status, row.prompt_tokens, row.completion_tokens) == ("bot:v1", 200, 7, 4)
    assert row.json_requested and row.finish_reason == "stop" and row.user == "u-7"
    bad = c.post("/v1/chat/completions", json={"model": "bot", "messages": "not a list"})
    assert bad.status_code == 400
    assert logger.flush()
    assert [x.status for x in rows(reg)] == [200, 400]  # failed requests are logged too (error rates)
    assert logger.stats()["written"] == 2 and not logger.stats()["dropped"]


def test_redaction_off_and_metrics_only_modes(served, reg):
    c, logger = served(redact_pii=False)
    chat(c, "mail ana@example.com")
    logger.flush()
    assert rows(reg)[-1].messages[0]["content"] == "mail ana@example.com"
    c, logger = served(store_text=False)
    chat(c, "mail ana@example.com")
    logger.flush()
    row = rows(reg)[-1]
    assert row.messages is None and row.response is None and row.completion_tokens == 4


def test_opted_out_key_stores_metrics_but_no_text(served, reg):
    _, private = reg.create_key("private-app", ["*"])
    _, public = reg.create_key("public-app", ["*"])
    c, logger = served(opt_out_keys=["private-app"])
    chat(c, "secret plans", key=private)
    chat(c, "public question", key=public)
    logger.flush()
    by_text = {(r.messages or [{}])[0].get("content"): r for r in rows(reg)}
    assert set(by_text) == {None, "public question"}
    assert by_text[None].status == 200 and by_text[None].latency_s > 0  # still counted in monitoring


def _record(i: int) -> RequestRecord:
    return RequestRecord(endpoint="chat", model="bot", request_id=f"chatcmpl-{i}", response="x")


def test_overflow_is_counted_not_hidden(reg):
    gate = threading.Event()

    class StuckWriter(RequestLogger):
        def _write(self, records):
            gate.wait()  # the database is slow: the queue fills up
            super()._write(records)

    logger = StuckWriter(reg.engine, LoggingConfig(queue_size=2, batch_size=1))
    for i in range(10):
        logger(_record(i))  # returns at once even though nothing can be written
    gate.set()
    assert logger.flush()
    logger.close()
    st = logger.stats()
    # The writer holds at most one record and the queue two; every other one is an overflow.
    assert st["dropped"]["overflow"] >= 7 and st["written"] + st["dropped"]["overflow"] == 10
    assert len(rows(reg)) == st["written"]


def test_database_locked_retries_then_counted_drop(tmp_path):
    path = tmp_path / "locked.db"
    Registry(f"sqlite:///{path}")  # creates the tables
    db = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.01})
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")  # another writer holds the database
    logger = RequestLogger(db, LoggingConfig(lock_retries=2))
    logger(_record(1))
    assert logger.flush(timeout=30)
    assert logger.stats()["dropped"] == {"locked": 1} and logger.stats()["written"] == 0

    # Released while the logger is retrying: the batch gets through, nothing is dropped.
    logger2 = RequestLogger(db, LoggingConfig(lock_retries=10))
    threading.Timer(0.2, other.execute, args=("COMMIT",)).start()
    logger2(_record(2))
    assert logger2.flush(timeout=60)
    assert logger2.stats()["written"] == 1 and not logger2.stats()["dropped"]
    logger.close(), logger2.close()


def test_retention_purge_keeps_decided_review_items(reg):
    old = utc_now() - timedelta(days=40)
    with Session(reg.engine) as s, s.begin():
        for rid, at in (("old-a", old), ("old-decided", old), ("new", utc_now())):
            s.add(RequestLog(id=rid, at=at, endpoint="chat", model="bot"))
        s.flush()
        s.add_all([Feedback(request_id="old-a", score=0.0), ReviewItem(request_id="old-a", reason="drift"),
                   ReviewItem(request_id="old-decided", reason="drift", decision="accept", reviewer="ana")])
    assert purge(reg.engine, retention_days=30) == 1
    assert purge(reg.engine, retention_days=30) == 0
    assert {r.id for r in rows(reg)} == {"old-decided", "new"}
    with Session(reg.engine) as s:
        assert s.scalar(select(Feedback.id)) is None
        assert list(s.scalars(select(ReviewItem.request_id))) == ["old-decided"]


# --- POST /v1/feedback ---------------------------------------------------------------------------

def test_feedback_attaches_and_normalises_scores(served, reg):
    c, _ = served()
    rid = chat(c).json()["id"]  # sent at once: the endpoint flushes the log before looking up
    cases = [({"score": 0.8}, 0.8), ({"score": 4, "scale": "1-5"}, 0.75), ({"score": 1, "scale": "1-5"}, 0.0),
             ({"score": 10, "scale": "1-10"}, 1.0), ({"thumbs": "down"}, 0.0),
             ({"thumbs": "up", "correction": "Better answer", "comment": "close"}, 1.0)]
    for body, want in cases:
        r = c.post("/v1/feedback", json={"request_id": rid, **body})
        assert r.status_code == 200, r.text
        assert r.json()["score"] == pytest.approx(want) and r.json()["object"] == "feedback"
    with Session(reg.engine) as s:
        stored = list(s.scalars(select(Feedback).order_by(Feedback.id)))
    assert [f.score for f in stored] == pytest.approx([w for _, w in cases])
    assert stored[-1].correction == "Better answer" and stored[-1].thumbs == "up"


@pytest.mark.parametrize("body, says", [
    ({"score": 7}, "outside the scale 0-1"),
    ({"score": 0, "scale": "1-5"}, "outside the scale 1-5"),
    ({}, "give 'score' or 'thumbs'"),
    ({"thumbs": "maybe"}, "thumbs"),
    ({"score": 0.5, "stars": 3}, "stars"),
    ({"score": "good"}, "score"),
])
def test_feedback_bad_fields_are_400_in_openai_shape(served, body, says):
    c, _ = served()
    rid = chat(c).json()["id"]
    r = c.post("/v1/feedback", json={"request_id": rid, **body})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and says in err["message"]


def test_feedback_unknown_request_and_key_scoping(served, reg):
    _, key_a = reg.create_key("app-a", ["*"])
    _, key_b = reg.create_key("app-b", ["*"])
    _, admin = reg.create_key("ops", ["*"])
    c, _ = served(admin_keys=["ops"])
    auth = lambda k: {"Authorization": f"Bearer {k}"}  # noqa: E731
    r = c.post("/v1/feedback", headers=auth(key_a), json={"request_id": "chatcmpl-nope", "score": 1})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert c.post("/v1/feedback", json={"request_id": "x", "score": 1}).status_code == 401  # keys exist now
    rid = chat(c, key=key_a).json()["id"]
    r = c.post("/v1/feedback", headers=auth(key_b), json={"request_id": rid, "thumbs": "down"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert c.post("/v1/feedback", headers=auth(key_a), json={"request_id": rid, "thumbs": "up"}).status_code == 200
    assert c.post("/v1/feedback", headers=auth(admin), json={"request_id": rid, "thumbs": "up"}).status_code == 200
    with Session(reg.engine) as s:
        assert len(list(s.scalars(select(Feedback)))) == 2  # the refused one stored nothing


def test_serve_logs_by_default(reg, monkeypatch):
    """`tuneforge serve` wires the logger in and writes what is queued when it stops."""
    import uvicorn

    import tuneforge.deploy.server as server

    ids = []

    def fake_run(app, **kw):
        with TestClient(app) as c:
            ids.append(chat(c, "from serve").json()["id"])

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setattr(server, "build_engine", lambda cfg: EchoEngine())
    server.serve(ServeConfig(registry=str(reg.engine.url)))
    assert [r.id for r in rows(reg)] == ids


def test_logger_purges_expired_rows_when_it_starts(reg):
    with Session(reg.engine) as s, s.begin():
        s.add(RequestLog(id="ancient", at=utc_now() - timedelta(days=400), endpoint="chat", model="bot"))
    logger = RequestLogger(reg.engine, LoggingConfig(retention_days=365))
    logger.close()
    assert logger.stats()["purged"] == 1 and rows(reg) == []
