"""The fine-tuning job queue: its database access and the worker that runs the jobs.

A job is a tuneforge run trained by `tuneforge train` in a subprocess (its own memory; a
crash there cannot take the server down). One job runs at a time. The queue is the
``ft_jobs`` table (tuneforge/registry/tables.py), so a restarted server picks up queued
jobs, and a job that was running when the server died is resumed from its last checkpoint
(exact resume: `tuneforge train --resume`) or, past ``jobs.max_restarts``, failed with the
reason. Cancel sends the trainer SIGINT: it stops between optimizer steps and writes a
checkpoint. A finished run is registered as ``ft-...:v1`` and is servable at once.

The queue lives in the database (not in memory) so a server restart finds every queued
job and every job that was running when the server stopped. Writes go through
``JobDB.run``: one transaction each, retried while another writer holds SQLite's lock, and
``DatabaseBusy`` with a clear message when the lock is not released in time (nothing is
half-written: the transaction rolled back).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml
from sqlalchemy import create_engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from tuneforge.io import atomic_write_text
from tuneforge.production.config import JobsConfig, jobs_home
from tuneforge.production.http import ApiError
from tuneforge.registry.store import Registry, RegistryError
from tuneforge.registry.tables import Base, FileRow, JobEventRow, JobRow

T = TypeVar("T")
ACTIVE = ("queued", "running")
TRAINER = [sys.executable, "-m", "tuneforge"]  # + ["train", CONFIG] or ["train", "--resume", RUN_DIR]


class DatabaseBusy(RuntimeError):
    pass


def _locked(e: OperationalError) -> bool:
    text = str(e.orig).lower()
    return "locked" in text or "busy" in text


class JobDB:
    """The jobs tables on the registry's database, with lock-aware transactions."""

    def __init__(self, url: str, busy_timeout_s: float = 5.0, attempts: int = 3):
        # A separate engine (same URL) so SQLite's busy timeout is ours to set.
        args = {"timeout": busy_timeout_s} if url.startswith("sqlite") else {}
        self.engine = create_engine(url, connect_args=args)
        self.attempts, self.busy_timeout_s = attempts, busy_timeout_s
        Base.metadata.create_all(self.engine, tables=[FileRow.__table__, JobRow.__table__, JobEventRow.__table__])

    def run(self, fn: Callable[[Session], T]) -> T:
        """``fn(session)`` in one transaction; retried while the database is locked."""
        for attempt in range(1, self.attempts + 1):
            try:
                with Session(self.engine, expire_on_commit=False) as s, s.begin():
                    return fn(s)
            except OperationalError as e:
                if not _locked(e):
                    raise
                if attempt == self.attempts:
                    raise DatabaseBusy(
                        f"the registry database is locked by another writer (waited {attempt} x "
                        f"{self.busy_timeout_s:g}s); nothing was written: retry shortly") from None
                time.sleep(0.1 * attempt)
        raise AssertionError("unreachable")

    def run_or_503(self, fn: Callable[[Session], T]) -> T:
        """``run`` for request handlers: a database still locked after the retries is a 503
        the client can retry (the transaction rolled back), not a 500."""
        try:
            return self.run(fn)
        except DatabaseBusy as e:
            raise ApiError(503, str(e), "server_error") from None

    def event(self, job_id: str, message: str, level: str = "info", type_: str = "message",
              data: dict | None = None) -> None:
        self.run(lambda s: s.add(JobEventRow(job_id=job_id, created_at=int(time.time()), level=level,
                                             message=message, type=type_, data=data)))


def metrics_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written right now
            rows.append(json.loads(line))
    return rows


def _checkpoint_step(run_dir: Path) -> int | None:
    steps = [int(d.name.removeprefix("step-")) for d in (run_dir / "checkpoints").glob("step-*")]
    return max(steps) if steps else None


def _log_tail(path: Path, n: int = 12) -> str:
    if not path.exists():
        return "(no log)"
    lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    errors = [x for x in lines if re.search(r"(Error|Exception|problem)", x)]
    return (errors[-1] if errors else " | ".join(lines[-n:]))[-2000:]


def _die_with_parent() -> None:
    """Runs in the trainer before exec: SIGKILL it when the server process dies, so a killed
    server never leaves a trainer writing into a run folder that the restart resumes."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# --- the worker ---------------------------------------------------------------------------
class Worker:
    """One thread, one job at a time, the queue in the database."""

    def __init__(self, db: JobDB, registry: Registry, cfg: JobsConfig):
        self.db, self.registry, self.cfg = db, registry, cfg
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="tuneforge-jobs", daemon=True)

    def start(self) -> None:
        self._patiently(self.recover)
        self.thread.start()

    def close(self) -> None:
        self.stopping.set()
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=self.cfg.cancel_grace_s + 10)

    def recover(self) -> None:
        """Jobs marked running belong to a server that stopped without finishing them."""
        for j in self.db.run(lambda s: list(s.scalars(select(JobRow).where(JobRow.status == "running")))):
            step = _checkpoint_step(Path(j.run_dir))
            where = f"checkpoint step {step}" if step else "the start (no checkpoint was written yet)"
            if j.restarts >= self.cfg.max_restarts:
                self._finish(j.id, "failed", error={
                    "code": "server_restarts", "param": None,
                    "message": f"the server stopped {j.restarts + 1} times while this job ran; not resumed again "
                               f"(jobs.max_restarts={self.cfg.max_restarts}); its run folder {j.run_dir} holds "
                               f"{where}"})
                continue

            def requeue(s, job_id=j.id):
                row = s.get(JobRow, job_id)
                row.status, row.restarts = "queued", row.restarts + 1

            self.db.run(requeue)
            self.db.event(j.id, f"The server stopped while this job was running; it will resume from {where}",
                          level="warn")

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                job = self._claim()
            except DatabaseBusy:
                job = None
            if job is None:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001 - a bug in one job must not stop the queue
                self._finish(job.id, "failed", error={"code": "internal_error", "param": None,
                                                      "message": f"{type(e).__name__}: {e}"})

    def _claim(self) -> JobRow | None:
        def take(s):
            j = s.scalars(select(JobRow).where(JobRow.status == "queued").order_by(JobRow.seq).limit(1)).first()
            if j is not None:
                j.status = "running"
            return j

        return self.db.run(take)

    def _run(self, job: JobRow) -> None:
        run_dir, job_dir = Path(job.run_dir), Path(job.run_dir).parent
        step = _checkpoint_step(run_dir)
        if step is not None:
            cmd = ["train", "--resume", str(run_dir)]
            self._event(job.id, f"Resuming training from checkpoint step {step}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)  # a start that died before its first checkpoint
            job_dir.mkdir(parents=True, exist_ok=True)
            (job_dir / "config.yaml").write_text(yaml.safe_dump(job.run_config, sort_keys=False))
            cmd = ["train", str(job_dir / "config.yaml")]
            self._event(job.id, "Fine-tuning job started")
        log_path = job_dir / "train.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([*TRAINER, *cmd], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        tail = _Tail(run_dir, self._last_steps(job.id))
        cancelled = stopped = False
        deadline = None
        while proc.poll() is None:
            self.wake.wait(0.5)
            self.wake.clear()
            for msg, data, type_ in tail.new():
                self._event(job.id, msg, type_=type_, data=data)
            status = self._status(job.id)
            # Not "running" any more: cancelled, or cancelled and already queued again by a resume
            # that came before this poll saw the cancel (the process must stop all the same; the
            # queued row is then claimed again and resumes from its checkpoint).
            if not (cancelled or stopped) and (status != "running" or self.stopping.is_set()):
                cancelled, stopped = status != "running", status == "running"
                proc.send_signal(signal.SIGINT)  # the loop checkpoints between steps and exits
                deadline = time.monotonic() + self.cfg.cancel_grace_s
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
        for msg, data, type_ in tail.new():
            self._event(job.id, msg, type_=type_, data=data)
        step = _checkpoint_step(run_dir)
        if cancelled or self._status(job.id) == "cancelled":
            self._event(job.id, f"Job cancelled; training stopped at step {step or 0} (checkpoint kept in {run_dir})")
        elif proc.returncode == 0:
            self._succeed(job, run_dir)
        elif stopped:
            self._patiently(lambda: self.db.run(lambda s: setattr(s.get(JobRow, job.id), "status", "queued")))
            self._event(job.id, f"The server is stopping; the job will resume from checkpoint step {step or 0} "
                                "when it starts again", level="warn")
        else:
            self._finish(job.id, "failed", error={"code": "training_failed", "param": None,
                                                  "message": f"training exited with code {proc.returncode}: "
                                                             f"{_log_tail(log_path)} (log: {log_path})"})

    def _succeed(self, job: JobRow, run_dir: Path) -> None:
        try:
            ref = self._patiently(lambda: self._register(job.registry_name, run_dir))
        except Exception as e:  # noqa: BLE001 - the reason goes to the job, not into the void
            self._finish(job.id, "failed", error={"code": "registration_failed", "param": None,
                                                  "message": f"trained, but registering {run_dir} failed: {e}"})
            return
        metrics = metrics_rows(run_dir / "metrics.jsonl")
        tokens = sum(r.get("trained_tokens", 0) for r in metrics if r["kind"] == "train")
        results = self._results_file(job, metrics)
        self._event(job.id, f"New fine-tuned model created: {ref}")
        self._finish(job.id, "succeeded", add=[results], fine_tuned_model=ref, trained_tokens=tokens or None,
                     result_files=[results.id], event="The job has successfully completed")

    def _results_file(self, job: JobRow, metrics: list[dict]) -> FileRow:
        """OpenAI's result file: per-step losses as CSV, served by /v1/files like an upload."""
        valid = {r["step"]: r.get("val_loss") for r in metrics if r["kind"] == "eval"}
        lines = ["step,train_loss,valid_loss"] + [
            f"{r['step']},{r['loss']},{'' if valid.get(r['step']) is None else valid[r['step']]}"
            for r in metrics if r["kind"] == "train"]
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        path = jobs_home(self.cfg) / "files" / f"{file_id}.csv"
        atomic_write_text(path, "\n".join(lines) + "\n")
        return FileRow(id=file_id, created_at=int(time.time()), filename=f"{job.id}-results.csv", key_id=job.key_id,
                       purpose="fine-tune-results", bytes=path.stat().st_size, path=str(path), train_path=str(path),
                       kind="results", format="csv", rows=len(lines) - 1)

    def _register(self, name: str, run_dir: Path) -> str:
        # Idempotent: a server that died between registering and marking the job reuses the version.
        with contextlib.suppress(RegistryError):
            for v in self.registry.versions(name):
                if Path(v.run_dir) == run_dir.resolve():
                    return v.ref
        return self.registry.add(run_dir, name).ref

    def _finish(self, job_id: str, status: str, add: list = (), event: str | None = None, **fields) -> None:
        """Set the job's final status (and add ``add`` rows and the closing event) in one
        transaction: a client that sees the final status also sees the event that says so."""
        if status == "failed":
            event = f"Job failed: {fields['error']['message']}"

        def done(s):
            j = s.get(JobRow, job_id)
            if j.status in ACTIVE:  # a cancel that came first wins
                j.status, j.finished_at = status, int(time.time())
                for k, v in fields.items():
                    setattr(j, k, v)
                s.add_all(add)
                if event is not None:
                    s.add(JobEventRow(job_id=job_id, created_at=j.finished_at, message=event,
                                      level="error" if status == "failed" else "info"))

        self._patiently(lambda: self.db.run(done))

    def _status(self, job_id: str) -> str | None:
        try:
            return self.db.run(lambda s: s.get(JobRow, job_id).status)
        except DatabaseBusy:
            return None  # asked again in half a second

    def _last_steps(self, job_id: str) -> dict[str, int]:
        def q(s):
            rows = s.scalars(select(JobEventRow.data).where(JobEventRow.job_id == job_id,
                                                            JobEventRow.type == "metrics"))
            out: dict[str, int] = {}
            for d in rows:
                out[d["kind"]] = max(out.get(d["kind"], 0), d["step"])
            return out

        return self._patiently(lambda: self.db.run(q))

    def _event(self, job_id: str, message: str, **kw) -> None:
        self._patiently(lambda: self.db.event(job_id, message, **kw))

    def _patiently(self, fn):
        """The worker waits out a locked database (a request would get 503; a job must not be lost)."""
        while True:
            try:
                return fn()
            except DatabaseBusy:
                time.sleep(1.0)
            except Exception as e:  # SQLAlchemy errors from the registry's own engine
                if "locked" not in str(e).lower():
                    raise
                time.sleep(1.0)


class _Tail:
    """New rows of a run's metrics.jsonl and new checkpoints, as job events."""

    def __init__(self, run_dir: Path, last: dict[str, int]):
        self.run_dir, self.last = run_dir, dict(last)

    def new(self):
        for r in metrics_rows(self.run_dir / "metrics.jsonl"):
            kind, step = r.get("kind"), r.get("step", 0)
            if kind not in ("train", "eval") or step <= self.last.get(kind, 0):
                continue
            self.last[kind] = step
            if kind == "train":
                yield (f"Step {step}: training loss={r['loss']:.4f}",
                       {"kind": kind, "step": step, "train_loss": r["loss"]}, "metrics")
            else:
                yield (f"Step {step}: validation loss={r['val_loss']:.4f}",
                       {"kind": kind, "step": step, "valid_loss": r["val_loss"]}, "metrics")
        step = _checkpoint_step(self.run_dir) or 0
        if step > self.last.get("checkpoint", 0):
            self.last["checkpoint"] = step
            yield f"Checkpoint created at step {step}", {"kind": "checkpoint", "step": step}, "metrics"
