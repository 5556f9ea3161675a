"""Issue 25 (hardening) of the production endpoints: tenants stay apart, failed
authentication is throttled, and bad input (non-finite numbers, deep JSON, Unicode digits,
oversized uploads) is a 4xx, never a 500 or a poisoned row."""

import asyncio
import json

import pytest
from deploy_helpers import fake_run
from fastapi.testclient import TestClient
from test_jobs import chat_rows, jobdb, jsonl, make_app

from tuneforge.cli import main
from tuneforge.production.http import ApiError, AuthThrottle
from tuneforge.registry.store import Registry, RegistryError, parse_ref
from tuneforge.registry.tables import JobRow


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def upload(c, content: bytes, headers=None):
    return c.post("/v1/files", files={"file": ("t.jsonl", content)}, data={"purpose": "fine-tune"},
                  headers=headers or {})


# --- 5: non-finite numbers ------------------------------------------------------------------
def test_an_infinite_learning_rate_multiplier_is_refused_before_anything_is_stored(tmp_path, tiny_model_dir):
    app, _ = make_app(tmp_path, tiny_model_dir)
    c = TestClient(app, raise_server_exceptions=False)
    fid = upload(c, jsonl(chat_rows(8))).json()["id"]
    for number in ("1e309", "-1e309", "NaN", "Infinity"):  # json.loads reads all four as non-finite floats
        body = (f'{{"model": "tiny", "training_file": "{fid}", '
                f'"hyperparameters": {{"learning_rate_multiplier": {number}}}}}')
        r = c.post("/v1/fine_tuning/jobs", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (number, r.text)
        assert r.json()["error"]["param"] == "hyperparameters.learning_rate_multiplier"
    assert c.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing was queued


def test_a_stored_job_that_cannot_be_read_shows_as_failed_and_does_not_break_the_list(tmp_path, tiny_model_dir):
    app, _ = make_app(tmp_path, tiny_model_dir)
    c = TestClient(app, raise_server_exceptions=False)
    fid = upload(c, jsonl(chat_rows(8))).json()["id"]
    good = c.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid}).json()["id"]
    bad = c.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid}).json()["id"]

    def poison(s):  # what an older server stored for learning_rate_multiplier: 1e309
        row = s.get(JobRow, bad)
        row.method = {"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": float("inf")}}}

    jobdb(tmp_path).run(poison)
    listed = c.get("/v1/fine_tuning/jobs")
    assert listed.status_code == 200
    by_id = {j["id"]: j for j in listed.json()["data"]}
    assert by_id[good]["status"] == "queued"
    assert by_id[bad]["status"] == "failed" and "cannot be read" in by_id[bad]["error"]["message"]
    assert c.get(f"/v1/fine_tuning/jobs/{bad}").json()["status"] == "failed"
    assert c.post(f"/v1/fine_tuning/jobs/{bad}/cancel").status_code == 200
    # a queued job shows what auto will decide as "auto" (the run decides it from the data)
    assert c.get(f"/v1/fine_tuning/jobs/{good}").json()["hyperparameters"]["n_epochs"] == "auto"



# --- 3: a job trains only from models the key may use ---------------------------------------
def test_a_scoped_key_cannot_fine_tune_from_another_tenants_model(tmp_path, tiny_model_dir):
    app, reg = make_app(tmp_path, tiny_model_dir)
    reg.add(fake_run(tiny_model_dir, tmp_path / "a-run", seed=1), "bot-a")
    reg.add(fake_run(tiny_model_dir, tmp_path / "b-run", seed=2), "bot-b")
    reg.promote("bot-b:v1", "prod")
    _, key_a = reg.create_key("tenant-a", ["bot-a"])
    c = TestClient(app, raise_server_exceptions=False)
    fid = upload(c, jsonl(chat_rows(8)), bearer(key_a)).json()["id"]

    def create(model):
        return c.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": fid}, headers=bearer(key_a))

    for model in ("bot-b", "bot-b:v1", "bot-b@prod", "no-such-model"):  # existing or not: the same 403
        r = create(model)
        assert r.status_code == 403, (model, r.text)
        err = r.json()["error"]
        assert err["type"] == "permission_error" and err["param"] == "model"
        assert f"may not fine-tune from '{model.split('@')[0].split(':')[0]}'" in err["message"]
    assert create("bot-b:2").status_code == 400  # not a reference at all
    assert c.get("/v1/fine_tuning/jobs", headers=bearer(key_a)).json()["data"] == []  # nothing queued
    assert create("bot-a:v1").status_code == 200  # its own model
    assert create("tiny").status_code == 200  # a base model the server offers every key


# --- 4: failed authentication is throttled; every 429 says when to retry ---------------------
def test_failed_authentications_are_throttled_per_address(tmp_path, tiny_model_dir):
    app, reg = make_app(tmp_path, tiny_model_dir)
    _, good = reg.create_key("app", [])
    c = TestClient(app, raise_server_exceptions=False)
    codes = [c.get("/v1/files", headers=bearer(f"tf-wrong-{i}")).status_code for i in range(25)]
    assert codes[:20] == [401] * 20 and codes[20:] == [429] * 5
    r = c.get("/v1/files", headers=bearer(good))  # the address is throttled, whatever key it tries now
    assert r.status_code == 429 and r.headers["Retry-After"] == "60"
    assert r.json()["error"]["type"] == "rate_limit_error" and "failed authentications" in r.json()["error"]["message"]
    other = TestClient(app, raise_server_exceptions=False, client=("10.1.2.3", 5000))
    assert other.get("/v1/files", headers=bearer(good)).status_code == 200  # another address is not


def test_the_throttle_forgets_failures_after_its_window():
    now = [0.0]
    t = AuthThrottle(limit=3, window_s=60, clock=lambda: now[0])
    for _ in range(3):
        t.check("1.2.3.4")
        t.failed("1.2.3.4")
    with pytest.raises(ApiError) as e:
        t.check("1.2.3.4")
    assert e.value.status == 429
    t.check("5.6.7.8")  # per address
    now[0] = 60.0
    t.check("1.2.3.4")  # the failures left the window


def test_the_per_key_rate_limit_429_carries_retry_after(tmp_path, tiny_model_dir):
    app, reg = make_app(tmp_path, tiny_model_dir)
    _, key = reg.create_key("app", [], requests_per_minute=2)
    c = TestClient(app, raise_server_exceptions=False)
    codes = [c.get("/v1/files", headers=bearer(key)) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert codes[2].headers["Retry-After"] == "60"


def test_keys_create_refuses_a_zero_or_negative_rate(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    for rpm in ("0", "-5"):
        assert main(["keys", "create", "--name", "app", "--rpm", rpm, "--registry", url]) == 2
        err = capsys.readouterr().err
        assert "requests per minute must be at least 1" in err and f"got {rpm}" in err
    reg = Registry(url)
    assert reg.keys() == []  # nothing was created
    with pytest.raises(RegistryError, match="at least 1"):
        reg.create_key("app", [], requests_per_minute=0)
    assert main(["keys", "create", "--name", "app", "--rpm", "30", "--registry", url]) == 0
    assert [k["requests_per_minute"] for k in reg.keys()] == [30]


# --- 6: input that used to be a 500 ------------------------------------------------------------
DEEP = b"[" * 100_000 + b"]" * 100_000


def test_deeply_nested_json_is_a_400_on_every_production_endpoint(tmp_path, tiny_model_dir):
    app, _ = make_app(tmp_path, tiny_model_dir)
    c = TestClient(app, raise_server_exceptions=False)
    for path in ("/v1/feedback", "/v1/fine_tuning/jobs", "/v1/review/items/1"):
        for body in (DEEP, b'{"request_id": ' + b"[" * 65 + b"]" * 65 + b"}"):
            r = c.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (path, len(body), r.text[:200])
            assert "deeper than 64 levels" in r.json()["error"]["message"]
    r = upload(c, jsonl(chat_rows(2)) + DEEP + b"\n")
    assert r.status_code == 400 and "line(s) 3 nest deeper than 64 levels" in r.json()["error"]["message"]
    # brackets inside strings are text, not nesting
    r = c.post("/v1/feedback", json={"request_id": "x", "score": 1, "comment": "[{" * 200})
    assert r.status_code == 404


def test_unicode_digits_are_not_numbers(tmp_path, tiny_model_dir):
    app, _ = make_app(tmp_path, tiny_model_dir)
    c = TestClient(app, raise_server_exceptions=False)
    assert c.get("/v1/review/items/²").status_code == 404
    assert c.post("/v1/review/items/٣", json={"decision": "accept", "reviewer": "x"}).status_code == 404
    for limit in ("²", "٣", "1" * 5000):
        assert c.get("/v1/review/items", params={"limit": limit}).status_code == 400
        assert c.get("/v1/fine_tuning/jobs", params={"limit": limit}).status_code == 400
        assert c.get("/v1/files", params={"limit": limit}).status_code == 400
    fid = upload(c, jsonl(chat_rows(8))).json()["id"]
    r = c.post("/v1/fine_tuning/jobs", json={"model": "bot-a:v²", "training_file": fid})
    assert r.status_code in (400, 404) and "name:vN" in r.json()["error"]["message"]
    for ref in ("bot-a:v²", "bot-a:v٣", "bot-a:v" + "1" * 5000):
        with pytest.raises(RegistryError, match="name:vN"):
            parse_ref(ref)
    assert parse_ref("bot-a:v12") == ("bot-a", None, 12)


# --- 7: an upload stops at the limit ----------------------------------------------------------
def _post_chunked(app, path: str, headers: dict, chunks):
    """Drive the ASGI app directly, one body chunk per receive(): (status, headers, body, bytes
    the app pulled). The test client reads a whole body before the app sees any of it."""
    pulled, out = 0, {"body": b""}
    it = iter(chunks)

    async def receive():
        nonlocal pulled
        chunk = next(it, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"], out["headers"] = message["status"], dict(message["headers"])
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1234), "server": ("testserver", 80), "state": {}}
    asyncio.run(app(scope, receive, send))
    return out["status"], out["headers"], json.loads(out["body"]), pulled


def test_a_chunked_upload_past_the_limit_is_abandoned_at_the_limit(tmp_path, tiny_model_dir):
    app, _ = make_app(tmp_path, tiny_model_dir, max_file_mb=1)
    boundary = "xyz"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    line = jsonl(chat_rows(1))
    chunk = line * (65536 // len(line))

    def body(mb: int):
        yield head
        for _ in range(mb * 1024 * 1024 // len(chunk)):
            yield chunk

    ctype = {"content-type": f"multipart/form-data; boundary={boundary}"}
    status, _, err, pulled = _post_chunked(app, "/v1/files", ctype, body(300))
    assert status == 413 and "1 MB limit (jobs.max_file_mb)" in err["error"]["message"]
    assert pulled < 1.2 * 1024 * 1024, pulled  # not the 300 MB sent
    files = tmp_path / "home" / "files"
    assert not files.exists() or list(files.iterdir()) == []  # no partial file kept

    # a declared Content-Length over the limit: refused before a byte is read
    status, _, err, pulled = _post_chunked(app, "/v1/files", ctype | {"content-length": str(300 << 20)}, body(300))
    assert status == 413 and pulled == 0


def test_an_explicit_auto_hyperparameter_is_accepted(tmp_path, tiny_model_dir):
    # found by the fuzz: the numeric bound was applied to "auto" too (TypeError, a 500)
    app, _ = make_app(tmp_path, tiny_model_dir)
    c = TestClient(app, raise_server_exceptions=False)
    fid = upload(c, jsonl(chat_rows(8))).json()["id"]
    hp = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    r = c.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid, "hyperparameters": hp})
    assert r.status_code == 200, r.text
    r = c.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid,
                                             "hyperparameters": {"batch_size": 0}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "hyperparameters.batch_size"
