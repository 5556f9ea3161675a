"""Issue 25 (hardening) of the production endpoints: tenants stay apart, failed
authentication is throttled, and bad input (non-finite numbers, deep JSON, Unicode digits,
oversized uploads) is a 4xx, never a 500 or a poisoned row."""

import asyncio
import json

from fastapi.testclient import TestClient
from test_jobs import chat_rows, jobdb, jsonl, make_app

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
        body = ('{"model": "tiny", "training_file": "%s", "hyperparameters": {"learning_rate_multiplier": %s}}'
                % (fid, number))
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
    assert c.get(f"/v1/fine_tuning/jobs/{good}").json()["hyperparameters"]["n_epochs"] != "auto"

