"""/v1/fine_tuning/jobs: OpenAI's fine-tuning API over tuneforge runs.

A job is a tuneforge run: the request is mapped to a RunConfig (LoRA by default, SFT or
DPO), validated before it is queued, and trained by `tuneforge train` in a subprocess
(its own memory; a crash there cannot take the server down). One job runs at a time.
The queue is the ``ft_jobs`` table, so a restarted server picks up queued jobs, and a
job that was running when the server died is resumed from its last checkpoint (exact
resume: `tuneforge train --resume`) or, past ``jobs.max_restarts``, failed with the
reason. Cancel sends the trainer SIGINT: it stops between optimizer steps and writes a
checkpoint. A finished run is registered as ``ft-...:v1`` and is servable at once (the
gateway resolves model names in the registry on every request).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

import yaml
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import func, select

from tuneforge.config import ConfigError, TrainConfig, deep_merge

from tuneforge.plugins import validate_config
from tuneforge.io import atomic_write_text
from tuneforge.production.files import answer_503_when_locked, files_router, q_page
from tuneforge.production.jobstore import (DatabaseBusy, FileRow, JobDB, JobEventRow, JobRow, JobsConfig,
                                           jobs_home, visible)
from tuneforge.registry.store import Registry, RegistryError

ACTIVE = ("queued", "running")
TRAINER = [sys.executable, "-m", "tuneforge"]  # + ["train", CONFIG] or ["train", "--resume", RUN_DIR]


# --- the request --------------------------------------------------------------------------
class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Req):
    n_epochs: int | Literal["auto"] = Field("auto", ge=1)
    batch_size: int | Literal["auto"] = Field("auto", ge=1)
    learning_rate_multiplier: float | Literal["auto"] = Field("auto", gt=0)
    beta: float | Literal["auto"] = Field("auto", gt=0)  # dpo only


class _MethodPart(_Req):
    hyperparameters: Hyperparameters = Hyperparameters()


class Method(_Req):
    type: Literal["supervised", "dpo"] = "supervised"
    supervised: _MethodPart | None = None
    dpo: _MethodPart | None = None


class CreateJob(_Req):
    model: str = Field(min_length=1)
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None  # OpenAI's older place for them
    method: Method = Method()
    suffix: str | None = Field(None, max_length=40, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list | None = None


# --- request -> RunConfig -----------------------------------------------------------------
def resolve_base(model: str, registry: Registry, cfg: JobsConfig) -> tuple[str, dict | None]:
    """(model.name, config of the registry version to continue from, or None)."""
    from tuneforge.models.zoo import EMBEDDED

    with contextlib.suppress(RegistryError):
        v = registry.resolve(model)
        return v.base_model, yaml.safe_load((Path(v.run_dir) / "config.yaml").read_text()) | {"_run_dir": v.run_dir}
    if model in cfg.base_models:
        return cfg.base_models[model], None
    if model in EMBEDDED and EMBEDDED[model].kind == "causal-lm":
        return model, None
    known = [a for a, e in EMBEDDED.items() if e.kind == "causal-lm"] + list(cfg.base_models)
    raise LookupError(f"model '{model}' is neither in the registry nor a base model this server offers "
                      f"({', '.join(known)}; more in serve.yaml jobs.base_models)")


def build_run_config(req: CreateJob, base: str, parent: dict | None, train_path: str, val_path: str | None,
                     seed: int, job_dir: Path, cfg: JobsConfig) -> tuple[dict, dict]:
    """The job's RunConfig (as a dict) and the hyperparameters it resolved to (OpenAI names)."""
    dpo = req.method.type == "dpo"
    hp = (req.method.dpo if dpo else req.method.supervised) or _MethodPart()
    given = {**(req.hyperparameters.model_dump(exclude_defaults=True) if req.hyperparameters else {}),
             **hp.hyperparameters.model_dump(exclude_defaults=True)}
    # No test split and no generation eval: OpenAI jobs train on the file as given; the
    # validation file (or a 10% hold-out) gives the validation loss.
    raw = {"method": {"name": "lora"}, "data": {"test_size": 0.0}, "eval": {"metric": "none"},
           "train": {"save_every": cfg.save_every}}
    if parent is not None:  # continue the registered version: same method, its trained weights
        raw = deep_merge(raw, {"method": parent["method"], "train": {"init_from": parent["_run_dir"]},
                               "data": {"system_prompt": (parent.get("data") or {}).get("system_prompt")}})
    raw = deep_merge(raw, cfg.run_defaults)
    base_lr = (raw.get("train") or {}).get("lr", TrainConfig.model_fields["lr"].default)
    job = {"model": {"name": base}, "data": {"train": [train_path], "validation": [val_path] if val_path else []},
           "objective": {"name": "dpo"} if dpo else {"name": "sft"},
           "train": {"seed": seed}, "output_dir": str(job_dir), "run_name": "run"}
    if "n_epochs" in given:
        job["train"]["epochs"] = given["n_epochs"]
    if "batch_size" in given:
        job["train"]["batch_size"] = given["batch_size"]
    if "learning_rate_multiplier" in given:
        job["train"]["lr"] = base_lr * given["learning_rate_multiplier"]
    if dpo and "beta" in given:
        job["objective"]["beta"] = given["beta"]
    raw = deep_merge(raw, job)
    run = validate_config(raw, "the fine-tuning job").model_dump(mode="json")
    resolved = {"n_epochs": int(run["train"]["epochs"]) if float(run["train"]["epochs"]).is_integer()
                else run["train"]["epochs"], "batch_size": run["train"]["batch_size"],
                "learning_rate_multiplier": given.get("learning_rate_multiplier", run["train"]["lr"] / base_lr)}
    if dpo:
        resolved["beta"] = run["objective"]["beta"]
    return run, resolved


# --- objects ------------------------------------------------------------------------------
def job_object(j: JobRow) -> dict:
    return {"id": j.id, "object": "fine_tuning.job", "created_at": j.created_at, "model": j.model,
            "status": j.status, "error": j.error, "fine_tuned_model": j.fine_tuned_model,
            "finished_at": j.finished_at, "hyperparameters": _hp(j), "method": j.method,
            "organization_id": "tuneforge", "result_files": j.result_files or [], "seed": j.seed,
            "trained_tokens": j.trained_tokens,
            "training_file": j.training_file, "validation_file": j.validation_file, "estimated_finish": None,
            "integrations": [], "metadata": j.metadata_, "user_provided_suffix": j.suffix}


def _hp(j: JobRow) -> dict:
    hp = j.method[j.method["type"]]["hyperparameters"]
    return {k: hp[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}


def event_object(e: JobEventRow) -> dict:
    return {"id": f"ftevent-{e.id}", "object": "fine_tuning.job.event", "created_at": e.created_at,
            "level": e.level, "message": e.message, "type": e.type, "data": e.data or {}}


def checkpoints(j: JobRow) -> list[dict]:
    """The checkpoints the run keeps (train.keep_checkpoints), newest first, with their metrics."""
    run_dir = Path(j.run_dir)
    metrics = _metrics(run_dir / "metrics.jsonl")
    out = []
    for d in sorted((run_dir / "checkpoints").glob("step-*"), reverse=True):
        step = int(d.name.removeprefix("step-"))
        if step == 0:  # the untrained start state (the NaN guard's fallback), not a result
            continue
        m = {"step": float(step)}
        for r in metrics:
            if r.get("step") == step:
                if r["kind"] == "train":
                    m["train_loss"] = r.get("loss")
                elif r["kind"] == "eval":
                    m["valid_loss"] = r.get("val_loss")
        final = j.status == "succeeded" and d == max((run_dir / "checkpoints").glob("step-*"))
        out.append({"id": f"ftckpt-{j.id.removeprefix('ftjob-')}-{step}", "object": "fine_tuning.job.checkpoint",
                    "created_at": int(d.stat().st_mtime), "fine_tuning_job_id": j.id, "step_number": step,
                    "metrics": m, "fine_tuned_model_checkpoint":
                    j.fine_tuned_model if final else f"{j.registry_name}:step-{step}"})
    return out


def _metrics(path: Path) -> list[dict]:
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
        import ctypes

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
            if not (cancelled or stopped) and (status == "cancelled" or self.stopping.is_set()):
                cancelled, stopped = status == "cancelled", status != "cancelled"
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
        metrics = _metrics(run_dir / "metrics.jsonl")
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
        for r in _metrics(self.run_dir / "metrics.jsonl"):
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


# --- the router ---------------------------------------------------------------------------
def jobs_router(serve_cfg, registry: Registry, authenticate) -> APIRouter:
    """/v1/files and /v1/fine_tuning/jobs, with the worker started and stopped by the app."""
    from tuneforge.deploy.server import ApiError

    cfg: JobsConfig = serve_cfg.jobs
    db = JobDB(registry.engine.url.render_as_string(hide_password=False), cfg.busy_timeout_s, cfg.busy_attempts)
    worker = Worker(db, registry, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        import asyncio

        await asyncio.to_thread(worker.start)
        app.state.jobs_worker = worker
        yield
        await asyncio.to_thread(worker.close)  # a running job checkpoints and waits for the next start

    router = APIRouter(lifespan=lifespan)

    busy = answer_503_when_locked(db, ApiError)

    def get_job(s, job_id: str, key) -> JobRow:
        j = s.get(JobRow, job_id)
        if j is None or not visible(j, key):
            raise ApiError(404, f"no fine-tuning job with id '{job_id}'", "invalid_request_error")
        return j

    @router.post("/v1/fine_tuning/jobs")
    async def create(request: Request):
        key = authenticate(request)
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not JSON") from None
        try:
            req = CreateJob.model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            # loc names union members too (n_epochs.int, n_epochs.literal['auto']): keep the field path.
            param = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("int", "float", "literal")))
            raise ApiError(400, f"'{param}': {err['msg']}", param=param) from None
        if req.integrations:
            raise ApiError(400, "integrations are not supported by this server", param="integrations")
        kind = "preference" if req.method.type == "dpo" else "sft"

        def file(s, file_id: str | None, param: str) -> FileRow | None:
            if file_id is None:
                return None
            f = s.get(FileRow, file_id)
            if f is None or f.deleted or not visible(f, key):
                raise ApiError(404, f"{param} '{file_id}' does not exist (upload it to /v1/files)", "not_found_error",
                               param)
            if f.kind != kind:
                raise ApiError(400, f"{param} {file_id} ({f.filename}) holds {f.kind} rows ({f.format}); method "
                                    f"'{req.method.type}' trains on {kind} rows", param=param)
            return f

        files = busy(lambda s: (file(s, req.training_file, "training_file"),
                                file(s, req.validation_file, "validation_file")))
        try:
            base, parent = resolve_base(req.model, registry, cfg)
        except LookupError as e:
            raise ApiError(404, str(e), "not_found_error", "model") from None
        job_id = f"ftjob-{uuid.uuid4().hex[:24]}"
        job_dir = jobs_home(cfg) / "jobs" / job_id
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        try:
            run, resolved = build_run_config(req, base, parent, files[0].train_path,
                                             files[1].train_path if files[1] else None, seed, job_dir, cfg)
        except ConfigError as e:
            raise ApiError(400, f"the job does not make a valid run: {'; '.join(e.problems)}") from None
        method = {"type": req.method.type, req.method.type: {"hyperparameters": resolved}}
        stem = Path(base).name if parent is None else req.model.split("@")[0].split(":")[0]
        name = "-".join(p for p in ("ft", re.sub(r"[^A-Za-z0-9_.-]+", "-", stem), req.suffix, job_id[-8:]) if p)

        def insert(s):
            seq = (s.scalar(select(func.max(JobRow.seq))) or 0) + 1
            j = JobRow(id=job_id, seq=seq, created_at=int(time.time()), model=req.model,
                       training_file=req.training_file, validation_file=req.validation_file, method=method,
                       suffix=req.suffix, seed=seed, metadata_=req.metadata, run_config=run, registry_name=name,
                       status="queued", run_dir=str(job_dir / "run"), key_id=key.id if key else None)
            s.add(j)
            s.flush()
            for msg in (f"Created fine-tuning job: {job_id}",
                        f"Validated training file {req.training_file}: {files[0].rows} rows ({files[0].format})",
                        f"Run config: {run['method']['name']} + {run['objective']['name']} on {base}"):
                s.add(JobEventRow(job_id=job_id, created_at=j.created_at, message=msg))
            return j

        job = busy(insert)
        worker.wake.set()
        return job_object(job)

    @router.get("/v1/fine_tuning/jobs")
    async def list_jobs(request: Request, after: str | None = None, limit: int = 20):
        key = authenticate(request)
        stmt = select(JobRow).order_by(JobRow.seq)
        rows = busy(lambda s: list(s.scalars(stmt if key is None else stmt.where(JobRow.key_id == key.id))))
        page, more = q_page(rows, after, limit)
        return {"object": "list", "data": [job_object(j) for j in page], "has_more": more}

    @router.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve(request: Request, job_id: str):
        key = authenticate(request)
        return job_object(busy(lambda s: get_job(s, job_id, key)))

    @router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel(request: Request, job_id: str):
        key = authenticate(request)

        def stop(s):
            j = get_job(s, job_id, key)
            if j.status not in ACTIVE:
                raise ApiError(400, f"job {job_id} has already finished ({j.status}); only queued or running "
                                    "jobs can be cancelled")
            was = j.status
            j.status, j.finished_at = "cancelled", int(time.time())
            s.add(JobEventRow(job_id=job_id, created_at=j.finished_at, level="warn",
                              message=f"Cancel requested (the job was {was})"))
            return j

        job = busy(stop)
        worker.wake.set()  # the worker sends the trainer SIGINT within half a second
        return job_object(job)

    @router.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def events(request: Request, job_id: str, after: str | None = None, limit: int = 20):
        key = authenticate(request)

        def q(s):
            get_job(s, job_id, key)
            return list(s.scalars(select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.id)))

        page, more = q_page([event_object(e) for e in busy(q)], after, limit, key=lambda e: e["id"])
        return {"object": "list", "data": page, "has_more": more}

    @router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def list_checkpoints(request: Request, job_id: str, after: str | None = None, limit: int = 10):
        key = authenticate(request)
        page, more = q_page(checkpoints(busy(lambda s: get_job(s, job_id, key))), after, limit, reverse=False,
                            key=lambda c: c["id"])
        return {"object": "list", "data": page, "has_more": more, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None}

    router.include_router(files_router(db, cfg, authenticate, ApiError))
    router.worker = worker
    return router
