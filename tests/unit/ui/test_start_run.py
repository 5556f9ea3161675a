"""A run started from the New run form trains on the fine-tuning job worker (a tiny model,
6 steps) and its page follows it to the end: the same queue as /v1/fine_tuning/jobs."""

from __future__ import annotations

import re
import time

from fastapi.testclient import TestClient

EXTRA = """\
data: {val_size: 0.1, test_size: 0.1}
method: {r: 4, alpha: 8}
train: {lr: 0.005, eval_every: 3, save_every: 3, seed: 7, dtype: fp32}
eval: {max_new_tokens: 8, limit: 4, batch_size: 4}
"""


def form(model: str, **over) -> dict:
    return {"model.name": model, "data.train": "builtin:orders?n=120&seed=3", "method.name": "lora",
            "train.max_steps": "6", "train.batch_size": "4", "data.max_length": "160", "run_name": "from-form",
            "extra_yaml": EXTRA, **over}


def test_a_config_error_is_refused_with_the_problem_at_its_field(ui_app, tiny_model_dir):
    with TestClient(ui_app) as c:
        r = c.post("/ui/api/runs", json=form(tiny_model_dir, **{"train.batch_size": "0"}))
        assert r.status_code == 400
        assert [p["field"] for p in r.json()["problems"]] == ["train.batch_size"]
        assert c.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing was queued


def test_a_run_started_from_the_form_trains_on_the_job_worker_and_its_page_follows_it(ui_app, tiny_model_dir):
    with TestClient(ui_app) as c:
        r = c.post("/ui/api/runs", json=form(tiny_model_dir))
        assert r.status_code == 200, r.text
        job_id, url = r.json()["id"], r.json()["url"]
        assert url == f"/ui/runs/{job_id}" and job_id.startswith("ftjob-")
        assert f'data-id="{job_id}"' in c.get("/ui/runs").text
        deadline, status = time.monotonic() + 400, ""
        while time.monotonic() < deadline:
            live = c.get(f"{url}/live")
            status = re.search(r'data-status="(\w+)"', live.text).group(1)
            if status not in ("queued", "running"):
                break
            time.sleep(2)
        page = c.get(url).text
        assert status == "succeeded", page
        job = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()  # the same job, through the jobs API
    assert job["status"] == "succeeded" and job["fine_tuned_model"].startswith("ui-from-form-")
    assert 'data-active="no"' in live.text and live.text.count("<polyline") == 3
    assert ">6 / 6<" in page and f"registered as <code>{job['fine_tuned_model']}</code>" in page


def test_a_queued_run_can_be_stopped_and_resumed_from_its_page(ui_app, tiny_model_dir, monkeypatch):
    # deferred: only this test swaps the trainer for a process that just waits (no training)
    import sys

    from tuneforge.production.api import job_queue
    from tuneforge.production.api.jobs import cancel_job, requeue_job

    monkeypatch.setattr(job_queue, "TRAINER", [sys.executable, "-c", "import time; time.sleep(60)"])

    def status_of(c, url):
        return re.search(r'data-status="(\w+)"', c.get(f"{url}/live").text).group(1)

    def wait(c, url, want):
        # generous: under a loaded CI machine the worker's poll and the process start can take long
        deadline = time.monotonic() + 120
        while status_of(c, url) != want:
            assert time.monotonic() < deadline, f"never {want}"
            time.sleep(0.3)

    with TestClient(ui_app) as c:
        url = c.post("/ui/api/runs", json=form(tiny_model_dir)).json()["url"]
        wait(c, url, "running")
        assert 'id="stop"' in c.get(url).text
        assert c.post(f"{url}/resume").status_code == 400  # only a cancelled run resumes
        assert c.post(f"{url}/stop").json()["status"] == "cancelled"
        page = c.get(url).text
        assert 'id="resume"' in page and 'id="stop"' not in page
        assert c.post(f"{url}/resume").json()["status"] == "queued"
        wait(c, url, "running")  # the worker took it again
        # Stop and resume faster than the worker polls (one transaction: it never sees "cancelled"):
        # the old process must still stop and the run start again, not keep running while "queued".
        job_id, db = url.rsplit("/", 1)[1], ui_app.state.jobs_worker.db
        db.run(lambda s: (cancel_job(s, job_id, None), s.flush(), requeue_job(s, job_id, None)))
        wait(c, url, "running")
        events = [e["message"] for e in c.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]]
        assert sum(m.startswith("Job cancelled; training stopped") for m in events) == 2, events
        c.post(f"{url}/stop")
        assert c.post(f"{url}/pause").status_code == 404
