"""Run folders for deploy tests without training: a random (non-zero) LoRA adapter on the tiny
Llama, the run's config.yaml and an eval.json with chosen scores."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml


def fake_run(tiny_model_dir: str, run_dir: Path, seed: int, score: float | None = 0.5,
             system_prompt: str | None = None) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules="all-linear",
                                            init_lora_weights=False))
    run_dir = Path(run_dir)
    model.save_pretrained(run_dir / "adapter")
    cfg = {"model": {"name": tiny_model_dir}, "method": {"name": "lora"}, "data": {"system_prompt": system_prompt}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    if score is not None:
        (run_dir / "eval.json").write_text(json.dumps({"base": {"scores": {"exact_match": 0.1}},
                                                       "tuned": {"scores": {"exact_match": score}}}))
    return run_dir


def with_eval(run_dir: Path, scores: list[float], rows: str) -> Path:
    """eval.json + eval_samples.jsonl as training writes them: per-example scores on rows named ``rows``."""
    mean = sum(scores) / len(scores)
    (run_dir / "eval.json").write_text(json.dumps({"tuned": {
        "n": len(scores), "scores": {"exact_match": mean}, "per_example": {"exact_match": scores},
        "rows_sha256": rows * 64}}))
    (run_dir / "eval_samples.jsonl").write_text("".join(
        json.dumps({"model": "tuned", "prompt": f"{rows} q{i}", "reference": "a", "score": s}) + "\n"
        for i, s in enumerate(scores)))
    return run_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app, stop_timeout: float = 10):
    """Run ``app`` under uvicorn on a free 127.0.0.1 port; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=stop_timeout)


POSTGRES = os.environ.get("TUNEFORGE_TEST_POSTGRES")  # e.g. postgresql+psycopg://tf:tf@127.0.0.1/tfreg


def fresh_url(kind: str, tmp_path) -> str:
    """A new empty registry database: a SQLite file, or the PostgreSQL database named by
    TUNEFORGE_TEST_POSTGRES (a throwaway one: its public schema is dropped first)."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'reg.db'}"
    if not POSTGRES:
        pytest.skip("no PostgreSQL: set TUNEFORGE_TEST_POSTGRES to a throwaway database's URL "
                    "(postgresql+psycopg://USER:PASSWORD@HOST/DB; pip install 'psycopg[binary]')")
    from sqlalchemy import create_engine

    engine = create_engine(POSTGRES)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    engine.dispose()
    return POSTGRES
