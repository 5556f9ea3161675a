"""The OpenAI-compatible fine-tuning API: /v1/files validation, job requests, the persisted
queue (cancel, pagination, restart recovery), a locked database, and a job trained for real
(tiny model, a `tuneforge train` subprocess) through the official openai client, whose
fine-tuned model then answers on /v1/chat/completions."""

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from deploy_helpers import free_port, serve_in_thread
from fastapi.testclient import TestClient

from tuneforge.data.builtin import orders
from tuneforge.deploy.config import ServeConfig
from tuneforge.deploy.server import create_app
from tuneforge.production.api.job_queue import JobDB, Worker
from tuneforge.production.config import JobsConfig
from tuneforge.registry.tables import JobEventRow, JobRow
from tuneforge.registry.store import Registry


class NoEngine:
    """Request tests never generate; the e2e test uses the real LocalEngine."""

    async def close(self):
        pass


def chat_rows(n: int, seed: int = 3) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"},
                          {"role": "assistant", "content": r["output"]}]} for r in orders(n=n, seed=seed)]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


PREF = {"input": {"messages": [{"role": "user", "content": "Order: 2 pens"}]},
        "preferred_output": [{"role": "assistant", "content": '{"item": "pen", "qty": 2}'}],
        "non_preferred_output": [{"role": "assistant", "content": "You want pens."}]}


def make_app(tmp_path, tiny_model_dir, engine=None, **jobs):
    reg = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    cfg = ServeConfig.model_validate({"jobs": {"home": str(tmp_path / "home"), "base_models": {"tiny": tiny_model_dir},
                                               **jobs}})
    return create_app(cfg, reg, engine or NoEngine()), reg


def jobdb(tmp_path) -> JobDB:
    """The queue as stored: a second connection to the registry database."""
    return JobDB(f"sqlite:///{tmp_path / 'reg.db'}")


def upload(c, content: bytes, name="train.jsonl", purpose="fine-tune"):
    return c.post("/v1/files", files={"file": (name, content)}, data={"purpose": purpose})


def test_files_are_validated_by_the_data_stage_and_bad_lines_are_named(tmp_path, tiny_model_dir):
    app, _ = make_app(tmp_path, tiny_model_dir, max_file_mb=0.01)
    c = TestClient(app)  # no `with`: the worker does not start; nothing here trains
    good = jsonl(chat_rows(4))
    r = upload(c, good)
    assert r.status_code == 200 and r.json()["object"] == "file" and r.json()["bytes"] == len(good)
    fid = r.json()["id"]
    assert c.get(f"/v1/files/{fid}/content").content == good
    assert c.get(f"/v1/files/{fid}").json()["filename"] == "train.jsonl"

    lines = good.decode().splitlines()
    lines[1] = '{"messages": [oops'
    lines[2] = json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]})
    r = upload(c, "\n".join(lines).encode(), name="bad.jsonl")
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "bad.jsonl: 2 of 4 lines are invalid" in msg
    assert "line 2: invalid JSON" in msg and "line 3: field 'messages[1].role': unknown role 'bot'" in msg

    # OpenAI's preference rows: accepted; a row missing a side is named by its OpenAI field.
    r = upload(c, jsonl([PREF, PREF | {"non_preferred_output": [{"role": "assistant", "content": "Pens."}]}]))
    assert r.status_code == 200
    pref = {k: v for k, v in PREF.items() if k != "non_preferred_output"}
    r = upload(c, jsonl([PREF, pref]))
    assert r.status_code == 400 and "line 2: field 'non_preferred_output': missing" in r.json()["error"]["message"]

    assert "classification rows" in upload(c, jsonl([{"text": "a", "label": "x"}])).json()["error"]["message"]
    assert upload(c, b"\xff\xfe\n", name="x.jsonl").json()["error"]["message"].startswith("x.jsonl: line 1 is not UTF-8")
    assert upload(c, good, purpose="assistants").status_code == 400
    assert upload(c, b"x" * 20_000).status_code == 413  # max_file_mb=0.01

    # Refused uploads leave nothing behind: two files listed, two kept on disk (+1 converted).
    listed = c.get("/v1/files").json()
    assert len(listed["data"]) == 2 and not listed["has_more"]
    assert sorted(p.name.count(".") for p in (tmp_path / "home" / "files").iterdir()) == [1, 1, 2]
    assert c.delete(f"/v1/files/{fid}").json() == {"id": fid, "object": "file", "deleted": True}
    assert c.get(f"/v1/files/{fid}").status_code == 404
    assert c.delete(f"/v1/files/{fid}").status_code == 404


def test_job_requests_are_checked_before_they_are_queued(tmp_path, tiny_model_dir):
    app, _ = make_app(tmp_path, tiny_model_dir)
    c = TestClient(app)
    fid = upload(c, jsonl(chat_rows(8))).json()["id"]
    pid = upload(c, jsonl([PREF])).json()["id"]

    def create(**body):
        return c.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid} | body)

    r = create(training_file="file-missing")
    assert r.status_code == 404 and r.json()["error"]["param"] == "training_file"
    assert create(validation_file="file-missing").json()["error"]["param"] == "validation_file"
    r = create(model="gpt-4o-mini")
    assert r.status_code == 404 and "smollm2-135m-instruct" in r.json()["error"]["message"]
    r = create(hyperparameters={"n_epochs": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "hyperparameters.n_epochs"
    r = create(method={"type": "dpo"})  # a chat file cannot train DPO
    assert r.status_code == 400 and "trains on preference rows" in r.json()["error"]["message"]
    assert create(suffix="no spaces please").status_code == 400
    assert create(temperature=1).json()["error"]["param"] == "temperature"
    assert create(hyperparameters={"n_epochs": "many"}).json()["error"]["param"] == "hyperparameters.n_epochs"
    assert c.post("/v1/fine_tuning/jobs", content=b"{not json").status_code == 400
    assert c.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing was queued

    r = create(suffix="shop", seed=5, hyperparameters={"n_epochs": 2, "batch_size": 2,
                                                       "learning_rate_multiplier": 0.5})
    job = r.json()
    assert r.status_code == 200 and job["status"] == "queued" and job["object"] == "fine_tuning.job"
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 0.5}
    row = jobdb(tmp_path).run(lambda s: s.get(JobRow, job["id"]))
    assert row.run_config["train"]["lr"] == pytest.approx(1e-4) and row.run_config["method"]["name"] == "lora"
    assert row.registry_name.startswith("ft-") and "-shop-" in row.registry_name
    r = c.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": pid,
                                             "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}})
    assert r.status_code == 200 and r.json()["method"]["dpo"]["hyperparameters"]["beta"] == 0.2
    row = jobdb(tmp_path).run(lambda s: s.get(JobRow, r.json()["id"]))
    assert row.run_config["objective"] == {"name": "dpo", "beta": 0.2, **{k: v for k, v in
                                           row.run_config["objective"].items() if k not in ("name", "beta")}}
    assert row.run_config["data"]["train"][0].endswith(".train.jsonl")  # the converted preference rows


def test_a_job_on_a_registered_model_continues_that_version(tmp_path, tiny_model_dir):
    from deploy_helpers import fake_run

    app, reg = make_app(tmp_path, tiny_model_dir)
    run = fake_run(tiny_model_dir, tmp_path / "support-run", seed=1, system_prompt="Be brief.")
    reg.add(run, "support")
    reg.promote("support:v1", "prod")
    c = TestClient(app)
    fid = upload(c, jsonl(chat_rows(8))).json()["id"]
    job = c.post("/v1/fine_tuning/jobs", json={"model": "support@prod", "training_file": fid, "suffix": "v2"}).json()
    row = jobdb(tmp_path).run(lambda s: s.get(JobRow, job["id"]))
    cfg = row.run_config
    assert cfg["model"]["name"] == tiny_model_dir and cfg["train"]["init_from"] == str(run.resolve())
    assert cfg["data"]["system_prompt"] == "Be brief." and cfg["method"]["name"] == "lora"
    assert row.registry_name.startswith("ft-support-v2-")


def test_run_defaults_are_checked_when_the_server_config_loads():
    with pytest.raises(ValueError, match="did you mean 'train.lr'"):
        ServeConfig.model_validate({"jobs": {"run_defaults": {"train": {"lrr": 1e-4}}}})


def test_queue_pagination_cancel_and_file_in_use(tmp_path, tiny_model_dir):
    app, _ = make_app(tmp_path, tiny_model_dir)
    c = TestClient(app)
    fid = upload(c, jsonl(chat_rows(8))).json()["id"]
    ids = [c.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid}).json()["id"] for _ in range(3)]
    page = c.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]  # newest first
    rest = c.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": ids[1]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]

    r = c.delete(f"/v1/files/{fid}")
    assert r.status_code == 409 and ids[0] in r.json()["error"]["message"]  # queued jobs need it
    r = c.post(f"/v1/fine_tuning/jobs/{ids[0]}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    assert c.post(f"/v1/fine_tuning/jobs/{ids[0]}/cancel").status_code == 400  # already finished
    assert c.post("/v1/fine_tuning/jobs/ftjob-nope/cancel").status_code == 404
    events = c.get(f"/v1/fine_tuning/jobs/{ids[0]}/events").json()["data"]
    assert events[0]["message"].startswith("Cancel requested") and events[-1]["message"].startswith("Created")
    assert all(e["object"] == "fine_tuning.job.event" for e in events)
    second = c.get(f"/v1/fine_tuning/jobs/{ids[0]}/events", params={"limit": 1, "after": events[0]["id"]}).json()
    assert second["data"][0]["id"] == events[1]["id"] and second["has_more"]
    # The cancelled job is never claimed: the worker takes the oldest queued one.
    worker = Worker(jobdb(tmp_path), Registry(f"sqlite:///{tmp_path / 'reg.db'}"), JobsConfig())
    assert worker._claim().id == ids[1]


def test_a_locked_database_gets_a_clear_503_then_a_retry_succeeds(tmp_path, tiny_model_dir):
    app, _ = make_app(tmp_path, tiny_model_dir, busy_timeout_s=0.2, busy_attempts=3)
    c = TestClient(app)
    fid = upload(c, jsonl(chat_rows(8))).json()["id"]
    other = sqlite3.connect(tmp_path / "reg.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the write lock (readers still read)
    other.execute("INSERT INTO models (name, created) VALUES ('x', '2026-01-01')")
    try:
        r = c.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid})
        assert r.status_code == 503 and "locked by another writer" in r.json()["error"]["message"]
        assert upload(c, jsonl(chat_rows(2))).status_code == 503
    finally:
        other.execute("ROLLBACK")
    assert c.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing half-written
    assert len(c.get("/v1/files").json()["data"]) == 1
    assert len(list((tmp_path / "home" / "files").iterdir())) == 1  # the refused upload's bytes are gone

    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.3, lambda: other.execute("ROLLBACK")).start()  # released during the retries
    r = c.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid})
    assert r.status_code == 200 and r.json()["status"] == "queued"


def test_restart_resumes_a_job_that_was_running_or_fails_it_with_the_reason(tmp_path, tiny_model_dir):
    app, reg = make_app(tmp_path, tiny_model_dir, max_restarts=1)
    c = TestClient(app)
    fid = upload(c, jsonl(chat_rows(8))).json()["id"]
    a, b, q = (c.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid}).json()["id"]
               for _ in range(3))
    db: JobDB = jobdb(tmp_path)

    def died_running(job_id, restarts, step=None):  # what a server killed mid-job leaves behind
        def put(s):
            j = s.get(JobRow, job_id)
            j.status, j.restarts = "running", restarts
            return j.run_dir

        run_dir = Path(db.run(put))
        if step is not None:
            (run_dir / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)

    died_running(a, 0, step=4)
    died_running(b, 1)
    Worker(db, reg, JobsConfig(max_restarts=1)).recover()
    ja, jb, jq = (c.get(f"/v1/fine_tuning/jobs/{i}").json() for i in (a, b, q))
    assert ja["status"] == "queued" and jq["status"] == "queued"
    assert "resume from checkpoint step 4" in c.get(f"/v1/fine_tuning/jobs/{a}/events").json()["data"][0]["message"]
    assert jb["status"] == "failed" and jb["error"]["code"] == "server_restarts"
    assert "stopped 2 times" in jb["error"]["message"] and "no checkpoint" in jb["error"]["message"]


# --- a real server, a real training subprocess, the official client ----------------------------------
def wait_for(client, job_id, statuses, timeout=240):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        assert time.monotonic() < deadline, f"job still {job.status}: {job}"
        time.sleep(0.5)


TINY_RUN = {"data": {"max_length": 160, "val_size": 0.2}, "train": {"dtype": "fp32", "lr": 5e-3, "eval_every": 2},
            "method": {"r": 4, "alpha": 8}}


def test_openai_client_uploads_trains_and_chats_with_the_result(tmp_path, tiny_model_dir):
    openai = pytest.importorskip("openai")
    from tuneforge.deploy.engines import LocalEngine

    engine = LocalEngine("cpu", "fp32", max_batch=4, batch_wait_ms=5)
    app, reg = make_app(tmp_path, tiny_model_dir, engine, run_defaults=TINY_RUN, save_every=2)
    with serve_in_thread(app, stop_timeout=60) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        train = client.files.create(file=("orders.jsonl", jsonl(chat_rows(20))), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError, match="line 1"):
            client.files.create(file=("bad.jsonl", b'{"messages": []}\n'), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=train.id, suffix="orders", seed=1,
                                             hyperparameters={"n_epochs": 2, "batch_size": 4})
        done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"))
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model.startswith("ft-tiny-llama") and done.fine_tuned_model.endswith(":v1")
        assert done.trained_tokens > 0 and done.finished_at >= done.created_at
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        assert messages[0] == "The job has successfully completed"
        steps = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"
                 and "train_loss" in e.data]
        assert sorted(e.data["step"] for e in steps) == list(range(1, len(steps) + 1)) and len(steps) == 8
        cps = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert cps[0].step_number == 8 and cps[0].fine_tuned_model_checkpoint == done.fine_tuned_model
        assert cps[0].metrics.train_loss is not None and cps[0].metrics.valid_loss is not None

        reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=6,
                                               messages=[{"role": "user", "content": "Order: 2 pens"}])
        assert reply.model == done.fine_tuned_model and reply.usage.completion_tokens > 0
        assert reg.resolve(done.fine_tuned_model).run_dir.endswith(f"{job.id}/run")
        assert done.fine_tuned_model in [m.id for m in client.models.list().data]
        csv = client.files.content(done.result_files[0]).text.splitlines()
        assert csv[0] == "step,train_loss,valid_loss" and [int(x.split(",")[0]) for x in csv[1:]] == list(range(1, 9))
        assert client.files.retrieve(done.result_files[0]).purpose == "fine-tune-results"

    import asyncio

    asyncio.run(engine.close())




# --- a server process killed mid-job -------------------------------------------------------------
def _start_server(cfg_path: Path, port: int, log: Path):
    import os
    import subprocess
    import sys

    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", "--config", str(cfg_path), "--port", str(port)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=os.environ.copy())
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.3)


def _events(client, job_id) -> list:
    return list(client.fine_tuning.jobs.list_events(job_id, limit=1000))[::-1]  # oldest first


def _wait_event(client, job_id, test, timeout=240):
    deadline = time.monotonic() + timeout
    while not any(test(e) for e in _events(client, job_id)):
        assert time.monotonic() < deadline, [e.message for e in _events(client, job_id)]
        time.sleep(0.3)


@pytest.mark.slow
def test_server_killed_mid_job_resumes_from_its_checkpoint_and_cancel_and_clean_stop_lose_nothing(tmp_path, tiny_model_dir):
    import os
    import signal

    import psutil
    import yaml
    from sqlalchemy import select

    openai = pytest.importorskip("openai")
    cfg = {"registry": f"sqlite:///{tmp_path / 'reg.db'}", "engine": {"device": "cpu", "dtype": "fp32"},
           "jobs": {"home": str(tmp_path / "home"), "base_models": {"tiny": tiny_model_dir},
                    "run_defaults": TINY_RUN, "save_every": 4}}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    port, log = free_port(), tmp_path / "server.log"
    server = _start_server(tmp_path / "serve.yaml", port, log)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    try:
        train = client.files.create(file=("orders.jsonl", jsonl(chat_rows(20))), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=train.id, hyperparameters={"n_epochs": 60})
        _wait_event(client, job.id, lambda e: e.message.startswith("Checkpoint created at step")
                    and e.data["step"] >= 8)
        run_dir = jobdb(tmp_path).run(lambda s: s.get(JobRow, job.id).run_dir)
        job_dir = str(Path(run_dir).parent)
        trainers = [p for p in psutil.process_iter(["cmdline"]) if job_dir in " ".join(p.info["cmdline"] or [])]
        assert len(trainers) == 1
        server.send_signal(signal.SIGKILL)  # no shutdown hook runs
        server.wait()
        psutil.wait_procs(trainers, timeout=10)
        assert not trainers[0].is_running()  # the trainer died with the server (PR_SET_PDEATHSIG)
        assert client_status_in_db(tmp_path, job.id) == "running"  # what the dead server left

        server = _start_server(tmp_path / "serve.yaml", port, log)
        done = wait_for(client, job.id, ("succeeded", "failed"), timeout=400)
        assert done.status == "succeeded", done.error
        messages = [e.message for e in _events(client, job.id)]
        resumed = [m for m in messages if m.startswith("The server stopped while this job was running")]
        assert len(resumed) == 1 and "resume from checkpoint step" in resumed[0]
        assert any(m.startswith("Resuming training from checkpoint step") for m in messages)
        rows = [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 241))  # every step once
        reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=4,
                                               messages=[{"role": "user", "content": "Order: 2 pens"}])
        assert reply.model == done.fine_tuned_model

        # Cancel mid-training: SIGINT stops the trainer long before its last step; no model is made.
        long = client.fine_tuning.jobs.create(model="tiny", training_file=train.id, hyperparameters={"n_epochs": 300})
        _wait_event(client, long.id, lambda e: e.type == "metrics" and e.data.get("step", 0) >= 3)
        long_dir = Path(jobdb(tmp_path).run(lambda s: s.get(JobRow, long.id).run_dir))
        trainers = [p for p in psutil.process_iter(["cmdline"])
                    if str(long_dir.parent) in " ".join(p.info["cmdline"] or [])]
        client.fine_tuning.jobs.cancel(long.id)
        _wait_event(client, long.id, lambda e: e.message.startswith("Job cancelled"))
        psutil.wait_procs(trainers, timeout=10)
        assert trainers and not any(p.is_running() for p in trainers)
        trained = [json.loads(x)["step"] for x in (long_dir / "metrics.jsonl").read_text().splitlines()
                   if json.loads(x)["kind"] == "train"]
        assert 3 <= trained[-1] < 1200 and not (long_dir / "adapter").exists()
        assert client.fine_tuning.jobs.retrieve(long.id).status == "cancelled" and len(client.models.list().data) == 2

        # A clean stop (SIGTERM) puts the running job back in the queue for the next start.
        last = client.fine_tuning.jobs.create(model="tiny", training_file=train.id, hyperparameters={"n_epochs": 300})
        _wait_event(client, last.id, lambda e: e.type == "metrics" and e.data.get("step", 0) >= 2)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=180)
        assert client_status_in_db(tmp_path, last.id) == "queued"
        stopped = jobdb(tmp_path).run(lambda s: s.scalars(select(JobEventRow.message).where(
            JobEventRow.job_id == last.id).order_by(JobEventRow.id.desc())).first())
        assert stopped.startswith("The server is stopping; the job will resume from checkpoint step")
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGTERM)
            server.wait(timeout=120)


def client_status_in_db(tmp_path, job_id) -> str:
    return jobdb(tmp_path).run(lambda s: s.get(JobRow, job_id).status)


def test_a_job_whose_trainer_cannot_start_fails_with_the_reason_and_the_queue_goes_on(tmp_path, tiny_model_dir,
                                                                                      monkeypatch):
    import subprocess

    app, reg = make_app(tmp_path, tiny_model_dir)
    c = TestClient(app)
    fid = upload(c, jsonl(chat_rows(8))).json()["id"]
    ids = [c.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid}).json()["id"] for _ in range(2)]

    def no_python(*a, **kw):
        raise OSError("[Errno 2] No such file or directory: 'python'")

    monkeypatch.setattr(subprocess, "Popen", no_python)
    worker = Worker(jobdb(tmp_path), reg, JobsConfig())
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while any(c.get(f"/v1/fine_tuning/jobs/{i}").json()["status"] != "failed" for i in ids):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        worker.close()
    job = c.get(f"/v1/fine_tuning/jobs/{ids[1]}").json()
    assert job["error"] == {"code": "internal_error", "param": None,
                            "message": "OSError: [Errno 2] No such file or directory: 'python'"}
    assert c.get(f"/v1/fine_tuning/jobs/{ids[1]}/events").json()["data"][0]["level"] == "error"


# --- the worker's signals, with a stand-in trainer (starts in 0.1 s instead of ~10 s) ------------
FAKE_TRAINER = r"""
import json, signal, sys, time, pathlib, yaml
args = sys.argv[2:]
if args[0] == "--resume":
    run = pathlib.Path(args[1])
    step = max(int(d.name[5:]) for d in (run / "checkpoints").glob("step-*"))
else:
    cfg = yaml.safe_load(open(args[0]))
    run = pathlib.Path(cfg["output_dir"]) / cfg["run_name"]
    step = 0
(run / "checkpoints").mkdir(parents=True, exist_ok=True)
(run / "pid").write_text(str(__import__("os").getpid()))
def checkpoint():
    (run / "checkpoints" / f"step-{step:06d}").mkdir(exist_ok=True)
def stop(*_):  # what tuneforge train does on SIGINT: a checkpoint at the step reached, exit 130
    checkpoint()
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
while True:
    step += 1
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "step": step, "loss": 1.0 / step}) + "\n")
    if step % 2 == 0:
        checkpoint()
    time.sleep(0.05)
"""


def test_cancel_and_a_clean_stop_signal_the_trainer_and_a_restart_resumes(tmp_path, tiny_model_dir, monkeypatch):
    import psutil

    from tuneforge.production.api import job_queue

    (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
    monkeypatch.setattr(job_queue, "TRAINER", [job_queue.sys.executable, str(tmp_path / "fake_trainer.py")])
    app, reg = make_app(tmp_path, tiny_model_dir)
    c = TestClient(app)
    fid = upload(c, jsonl(chat_rows(8))).json()["id"]
    a, b = (c.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid}).json()["id"] for _ in range(2))
    events = lambda i: [e["message"] for e in c.get(f"/v1/fine_tuning/jobs/{i}/events",  # noqa: E731
                                                       params={"limit": 1000}).json()["data"]]

    def wait(test, what):
        deadline = time.monotonic() + 60
        while not test():
            assert time.monotonic() < deadline, what
            time.sleep(0.1)

    def run_dir(i):
        return Path(jobdb(tmp_path).run(lambda s: s.get(JobRow, i).run_dir))

    worker = Worker(jobdb(tmp_path), reg, JobsConfig())
    worker.start()
    try:
        wait(lambda: any(m.startswith("Step 3:") for m in events(a)), "job a reports steps")
        trainer = psutil.Process(int((run_dir(a) / "pid").read_text()))
        assert c.post(f"/v1/fine_tuning/jobs/{a}/cancel").json()["status"] == "cancelled"
        wait(lambda: events(a)[0].startswith("Job cancelled; training stopped at step"), "job a cancelled")
        assert not trainer.is_running()
        # The queue goes on: b runs next, and a clean stop sends it back to the queue.
        wait(lambda: any(m.startswith("Step 3:") for m in events(b)), "job b reports steps")
    finally:
        worker.close()
    assert c.get(f"/v1/fine_tuning/jobs/{b}").json()["status"] == "queued"
    assert events(b)[0].startswith("The server is stopping; the job will resume from checkpoint step")
    stopped_at = max(int(d.name[5:]) for d in (run_dir(b) / "checkpoints").glob("step-*"))

    worker = Worker(jobdb(tmp_path), reg, JobsConfig())
    worker.start()  # the next server start
    try:
        wait(lambda: f"Resuming training from checkpoint step {stopped_at}" in events(b), "job b resumes")
        wait(lambda: any(m.startswith(f"Step {stopped_at + 2}:") for m in events(b)), "b trains on")
        c.post(f"/v1/fine_tuning/jobs/{b}/cancel")
        wait(lambda: events(b)[0].startswith("Job cancelled"), "job b cancelled")
    finally:
        worker.close()
    steps = [m for m in events(b) if m.startswith("Step ")]
    assert len(steps) == len(set(steps))  # steps redone after the resume are not reported twice
    assert reg.models() == [] and c.get(f"/v1/fine_tuning/jobs/{a}").json()["status"] == "cancelled"


@pytest.mark.slow
def test_a_dpo_job_trains_on_openai_preference_rows(tmp_path, tiny_model_dir):
    openai = pytest.importorskip("openai")
    app, reg = make_app(tmp_path, tiny_model_dir, run_defaults=TINY_RUN | {"train": {"dtype": "fp32", "max_steps": 3}})
    rows = [{"input": {"messages": [{"role": "user", "content": f"Order: {n} pens"}]},
             "preferred_output": [{"role": "assistant", "content": f'{{"item": "pen", "qty": {n}}}'}],
             "non_preferred_output": [{"role": "assistant", "content": f"You want {n} pens."}]} for n in range(2, 12)]
    with serve_in_thread(app, stop_timeout=60) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        f = client.files.create(file=("prefs.jsonl", jsonl(rows)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id,
                                             method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}})
        done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"))
        assert done.status == "succeeded", done.error
        losses = [e.data["train_loss"] for e in client.fine_tuning.jobs.list_events(job.id, limit=100)
                  if e.type == "metrics" and "train_loss" in e.data]
        assert len(losses) == 3
        run = yaml_load(Path(reg.resolve(done.fine_tuned_model).run_dir) / "config.yaml")
        assert run["objective"]["name"] == "dpo" and run["objective"]["beta"] == 0.2


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_files_and_jobs_belong_to_the_key_that_made_them(tmp_path, tiny_model_dir):
    app, reg = make_app(tmp_path, tiny_model_dir)
    _, key_a = reg.create_key("app-a", [])
    _, key_b = reg.create_key("app-b", [])
    c = TestClient(app)
    a, b = ({"Authorization": f"Bearer {k}"} for k in (key_a, key_b))
    assert c.get("/v1/files").status_code == 401  # keys exist: a key is needed
    fid = c.post("/v1/files", files={"file": ("t.jsonl", jsonl(chat_rows(8)))}, data={"purpose": "fine-tune"},
                 headers=a).json()["id"]
    job = c.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid}, headers=a).json()["id"]
    assert c.get(f"/v1/files/{fid}", headers=b).status_code == 404
    assert c.get(f"/v1/files/{fid}/content", headers=b).status_code == 404
    assert c.delete(f"/v1/files/{fid}", headers=b).status_code == 404
    assert c.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid}, headers=b).status_code == 404
    assert c.post(f"/v1/fine_tuning/jobs/{job}/cancel", headers=b).status_code == 404
    assert c.get("/v1/fine_tuning/jobs", headers=b).json()["data"] == []
    assert c.get("/v1/files", headers=b).json()["data"] == []
    assert [j["id"] for j in c.get("/v1/fine_tuning/jobs", headers=a).json()["data"]] == [job]
    assert c.post(f"/v1/fine_tuning/jobs/{job}/cancel", headers=a).json()["status"] == "cancelled"


def test_a_wandb_integration_reports_the_job_to_wandb_and_anything_else_is_refused(tmp_path, tiny_model_dir,
                                                                                    monkeypatch):
    from tuneforge.train import tracking

    app, _ = make_app(tmp_path, tiny_model_dir)
    c = TestClient(app)  # no `with`: nothing here trains
    fid = upload(c, jsonl(chat_rows(8))).json()["id"]

    def create(integrations):
        return c.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid,
                                                    "integrations": integrations})

    wandb = {"type": "wandb", "wandb": {"project": "shop", "name": "first", "entity": "team", "tags": ["v2"]}}
    for bad, param in (([{"type": "mlflow", "mlflow": {}}], "integrations.0.type"),
                       ([{"type": "wandb", "wandb": {"project": "p", "notes": "x"}}], "integrations.0.wandb.notes"),
                       ([{"type": "wandb", "wandb": {"name": "no project"}}], "integrations.0.wandb.project"),
                       ([wandb, wandb], "integrations")):
        r = create(bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.json()
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)  # wandb not installed here
    r = create([wandb])
    assert r.status_code == 400 and "wandb is not installed; pip install 'wandb==" in r.json()["error"]["message"]
    assert c.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing was queued
    monkeypatch.undo()

    job = create([wandb]).json()
    assert job["status"] == "queued" and job["integrations"] == [wandb]
    row = jobdb(tmp_path).run(lambda s: s.get(JobRow, job["id"]))
    assert row.run_config["train"]["report_to"] == ["wandb"]
    assert row.run_config["train"]["tracking"] == {"project": "shop", "name": "first", "entity": "team", "tags": ["v2"]}
