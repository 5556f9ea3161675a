"""/v1/fine_tuning/jobs: OpenAI's fine-tuning API over tuneforge runs.

A job is a tuneforge run: the request is mapped to a RunConfig (LoRA by default, SFT or
DPO) and validated before it is queued; the queue and the worker that trains it are in
job_queue.py. A finished run is registered as ``ft-...:v1`` and is servable at once (the
gateway resolves model names in the registry on every request).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
import uuid
from pathlib import Path
from typing import Annotated, Literal

import yaml
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import func, select

from tuneforge.config import AUTO_KNOBS, ConfigError, TrainConfig, deep_merge
from tuneforge.models.zoo import EMBEDDED
from tuneforge.plugins import validate_config
from tuneforge.production.api.files import files_router
from tuneforge.production.api.job_queue import ACTIVE, JobDB, Worker, metrics_rows
from tuneforge.production.config import JobsConfig, jobs_home
from tuneforge.production.http import ApiError, Authenticate, may_call, page, read_json, visible
from tuneforge.registry.store import KeyInfo, Registry, RegistryError, parse_ref
from tuneforge.registry.tables import FileRow, JobEventRow, JobRow
from tuneforge.train.tracking import missing_trackers


# --- the request --------------------------------------------------------------------------
class _Req(BaseModel):
    # inf/NaN (JSON's 1e309 parses as inf) would be stored and then fail every read of the job
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Hyperparameters(_Req):
    # The bound is on the number only: on the union it was applied to an explicit "auto" too (a 500).
    n_epochs: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"
    beta: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"  # dpo only


class _MethodPart(_Req):
    hyperparameters: Hyperparameters = Hyperparameters()


class Method(_Req):
    type: Literal["supervised", "dpo"] = "supervised"
    supervised: _MethodPart | None = None
    dpo: _MethodPart | None = None


class WandbIntegration(_Req):
    project: str = Field(min_length=1)
    name: str | None = None
    entity: str | None = None
    tags: list[str] | None = None


class Integration(_Req):
    """OpenAI's W&B integration: the run reports to W&B (train.report_to: [wandb]) under these
    settings; any other type, or a key W&B has no use for, is a 400 naming it."""

    type: Literal["wandb"]
    wandb: WandbIntegration


class CreateJob(_Req):
    model: str = Field(min_length=1)
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None  # OpenAI's older place for them
    method: Method = Method()
    suffix: str | None = Field(None, max_length=40, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[Integration] | None = Field(None, max_length=1)  # one W&B run per job


# --- request -> RunConfig -----------------------------------------------------------------
def resolve_base(model: str, registry: Registry, cfg: JobsConfig) -> tuple[str, dict | None]:
    """(model.name, config of the registry version to continue from, or None)."""
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
    for integration in req.integrations or []:
        job["train"]["report_to"] = [integration.type]
        job["train"]["tracking"] = integration.wandb.model_dump(exclude_none=True)
    raw = deep_merge(raw, job)
    if not dpo:  # what neither the request nor the server's run_defaults set is decided from the data
        raw["auto"] = job_auto(raw, cfg.run_defaults, continued=parent is not None)
    checked = validate_config(raw, "the fine-tuning job")
    if missing_trackers(checked):  # found now, not when the queued job starts
        raise ConfigError(missing_trackers(checked))
    run = checked.model_dump(mode="json")
    auto = set(run["auto"])
    resolved = {"n_epochs": "auto" if "epochs" in auto else int(run["train"]["epochs"])
                if float(run["train"]["epochs"]).is_integer() else run["train"]["epochs"],
                "batch_size": "auto" if "batch_size" in auto else run["train"]["batch_size"],
                "learning_rate_multiplier": "auto" if "lr" in auto else
                given.get("learning_rate_multiplier", run["train"]["lr"] / base_lr)}
    if dpo:
        resolved["beta"] = run["objective"]["beta"]
    return run, resolved


# The auto knobs (config.AUTO_KNOBS) a supervised job leaves to the data when nothing sets them.
JOB_KNOBS = ("epochs", "batch_size", "lr", "max_length", "early_stopping", "lora")


def job_auto(raw: dict, run_defaults: dict, continued: bool) -> list[str]:
    """The knobs a supervised job leaves to auto (train/auto.py): those whose keys neither the
    request nor the server's run_defaults set. A job continuing a registered version keeps its
    LoRA shape (the adapter it starts from has that rank)."""
    asked = {k for k in (raw.get("train") or {}) if k in ("epochs", "batch_size", "lr")}
    set_by = deep_merge(run_defaults, {"train": dict.fromkeys(asked, 1)})
    out = []
    for knob in JOB_KNOBS:
        keys = [k.split(".") for k in AUTO_KNOBS[knob]]
        if any(field in (set_by.get(section) or {}) for section, field in keys) or (knob == "lora" and continued):
            continue
        out.append(knob)
    return out


# --- objects ------------------------------------------------------------------------------
def job_object(j: JobRow) -> dict:
    """The job as OpenAI shows it. A stored row that does not make a valid JSON object (a
    value written before today's checks, e.g. an inf hyperparameter) is shown as failed with
    the reason, so one bad row never turns the key's whole job list into a 500."""
    try:
        obj = _job_object(j)
        json.dumps(obj, allow_nan=False)  # what the response will do
        return obj
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        return {"id": j.id, "object": "fine_tuning.job", "created_at": j.created_at, "model": j.model,
                "status": "failed", "fine_tuned_model": None, "finished_at": j.finished_at,
                "error": {"code": "invalid_stored_job", "param": None,
                          "message": f"the stored job cannot be read ({type(e).__name__}: {e}); create it again"},
                "hyperparameters": None, "method": None, "organization_id": "tuneforge", "result_files": [],
                "seed": j.seed if isinstance(j.seed, int) else None, "trained_tokens": None,
                "training_file": j.training_file, "validation_file": j.validation_file, "estimated_finish": None,
                "integrations": [], "metadata": None, "user_provided_suffix": j.suffix}


def _job_object(j: JobRow) -> dict:
    return {"id": j.id, "object": "fine_tuning.job", "created_at": j.created_at, "model": j.model,
            "status": j.status, "error": j.error, "fine_tuned_model": j.fine_tuned_model,
            "finished_at": j.finished_at, "hyperparameters": _hp(j), "method": j.method,
            "auto": _auto(j) if (j.run_config or {}).get("auto") else None,
            "organization_id": "tuneforge", "result_files": j.result_files or [], "seed": j.seed,
            "trained_tokens": j.trained_tokens,
            "training_file": j.training_file, "validation_file": j.validation_file, "estimated_finish": None,
            "integrations": integrations(j.run_config), "metadata": j.metadata_, "user_provided_suffix": j.suffix}


def integrations(run: dict | None) -> list[dict]:
    """The job's W&B integration as OpenAI shows it, from the run config it trains."""
    train = (run or {}).get("train") or {}
    if "wandb" not in (train.get("report_to") or []):
        return []
    t = train.get("tracking") or {}
    return [{"type": "wandb", "wandb": {k: t.get(k) for k in ("project", "name", "entity", "tags")}}]


def _hp(j: JobRow) -> dict:
    """The job's hyperparameters; those left to auto show "auto" until the run has decided
    them (its auto.json), then the values it trains with."""
    hp = j.method[j.method["type"]]["hyperparameters"]
    out = {k: hp[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    decided = {d["key"]: d["value"] for d in _auto(j) or []}
    if "train.epochs" in decided:
        e = decided["train.epochs"]
        out["n_epochs"] = int(e) if float(e).is_integer() else e
    if "train.batch_size" in decided:
        out["batch_size"] = decided["train.batch_size"]
    if "train.lr" in decided:
        out["learning_rate_multiplier"] = decided["train.lr"] / j.run_config["train"]["lr"]
    return out


def _auto(j: JobRow) -> list[dict] | None:
    """What auto decided for the job, each with its reason (the run's auto.json); None until
    the run has decided or when nothing was left to auto."""
    path = Path(j.run_dir) / "auto.json" if j.run_dir else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())["decisions"]


def event_object(e: JobEventRow) -> dict:
    return {"id": f"ftevent-{e.id}", "object": "fine_tuning.job.event", "created_at": e.created_at,
            "level": e.level, "message": e.message, "type": e.type, "data": e.data or {}}


def checkpoints(j: JobRow) -> list[dict]:
    """The checkpoints the run keeps (train.keep_checkpoints), newest first, with their metrics."""
    run_dir = Path(j.run_dir)
    metrics = metrics_rows(run_dir / "metrics.jsonl")
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


# --- the router ---------------------------------------------------------------------------
def jobs_router(cfg: JobsConfig, registry: Registry, authenticate: Authenticate) -> APIRouter:
    """/v1/files and /v1/fine_tuning/jobs, with the worker started and stopped by the app."""
    db = JobDB(registry.engine.url.render_as_string(hide_password=False), cfg.busy_timeout_s, cfg.busy_attempts)
    worker = Worker(db, registry, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(worker.start)
        app.state.jobs_worker = worker
        yield
        await asyncio.to_thread(worker.close)  # a running job checkpoints and waits for the next start

    router = APIRouter(lifespan=lifespan)
    busy = db.run_or_503

    @router.post("/v1/fine_tuning/jobs")
    async def create(request: Request):
        key = authenticate(request)
        req = await _create_request(request)
        job = busy(_job_row(req, key, busy, registry, cfg))
        worker.wake.set()
        return job_object(job)

    @router.get("/v1/fine_tuning/jobs")
    async def list_jobs(request: Request, after: str | None = None, limit: int = 20):
        key = authenticate(request)
        stmt = select(JobRow).order_by(JobRow.seq)
        rows = busy(lambda s: list(s.scalars(stmt if key is None else stmt.where(JobRow.key_id == key.id))))
        data, more = page(rows, after, limit)
        return {"object": "list", "data": [job_object(j) for j in data], "has_more": more}

    @router.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve(request: Request, job_id: str):
        key = authenticate(request)
        return job_object(busy(lambda s: get_job(s, job_id, key)))

    @router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel(request: Request, job_id: str):
        key = authenticate(request)
        job = busy(lambda s: cancel_job(s, job_id, key))
        worker.wake.set()  # the worker sends the trainer SIGINT within half a second
        return job_object(job)

    @router.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def events(request: Request, job_id: str, after: str | None = None, limit: int = 20):
        key = authenticate(request)

        def q(s):
            get_job(s, job_id, key)
            return list(s.scalars(select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.id)))

        data, more = page([event_object(e) for e in busy(q)], after, limit, key=lambda e: e["id"])
        return {"object": "list", "data": data, "has_more": more}

    @router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def list_checkpoints(request: Request, job_id: str, after: str | None = None, limit: int = 10):
        key = authenticate(request)
        data, more = page(checkpoints(busy(lambda s: get_job(s, job_id, key))), after, limit, reverse=False,
                          key=lambda c: c["id"])
        return {"object": "list", "data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    router.include_router(files_router(db, cfg, authenticate))
    router.worker = worker
    return router


def get_job(s, job_id: str, key: KeyInfo | None) -> JobRow:
    j = s.get(JobRow, job_id)
    if j is None or not visible(j, key):
        raise ApiError(404, f"no fine-tuning job with id '{job_id}'", "invalid_request_error")
    return j


async def _create_request(request: Request) -> CreateJob:
    body = await read_json(request)  # 400 when not JSON or nested too deep
    try:
        req = CreateJob.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        # loc names union members too (n_epochs.constrained-int, .literal[...]): keep the field path.
        # (whole names: a prefix test dropped "integrations" for starting with "int")
        param = ".".join(str(p) for p in err["loc"]
                         if str(p) not in ("int", "float") and not str(p).startswith(("literal[", "constrained-")))
        raise ApiError(400, f"'{param}': {err['msg']}", param=param) from None
    return req


def _job_file(s, file_id: str | None, param: str, kind: str, req: CreateJob, key: KeyInfo | None) -> FileRow | None:
    """The job's training or validation file: the key's own, holding the rows the method trains on."""
    if file_id is None:
        return None
    f = s.get(FileRow, file_id)
    if f is None or f.deleted or not visible(f, key):
        raise ApiError(404, f"{param} '{file_id}' does not exist (upload it to /v1/files)", "not_found_error", param)
    if f.kind != kind:
        raise ApiError(400, f"{param} {file_id} ({f.filename}) holds {f.kind} rows ({f.format}); method "
                            f"'{req.method.type}' trains on {kind} rows", param=param)
    return f


def _offered(model: str, cfg: JobsConfig) -> bool:
    """A base model the server offers every key (serve.yaml jobs.base_models, the zoo's chat models)."""
    return model in cfg.base_models or (model in EMBEDDED and EMBEDDED[model].kind == "causal-lm")


def _check_base_scope(model: str, key: KeyInfo | None, cfg: JobsConfig, registered: bool = False) -> None:
    """A job trains from a registered model only if the key may call it (else 403 naming it),
    checked before the registry is asked, so a key learns nothing of models it may not use.
    The server's base models are offered to every key."""
    try:
        name = parse_ref(model)[0]
    except RegistryError as e:  # e.g. "bot:2" for "bot:v2"
        raise ApiError(400, str(e), param="model") from None
    if (registered or not _offered(model, cfg)) and not may_call(key, name):
        raise ApiError(403, f"key {key.name} may not fine-tune from '{name}': it may use only "
                            f"{', '.join(key.models)} and the server's base models", "permission_error", "model")


def _job_row(req: CreateJob, key: KeyInfo | None, busy, registry: Registry, cfg: JobsConfig):
    """Check the request's files and model, build its run config; returns the transaction
    that inserts the queued job and its first events."""
    kind = "preference" if req.method.type == "dpo" else "sft"
    train, val = busy(lambda s: (_job_file(s, req.training_file, "training_file", kind, req, key),
                                 _job_file(s, req.validation_file, "validation_file", kind, req, key)))
    _check_base_scope(req.model, key, cfg)
    try:
        base, parent = resolve_base(req.model, registry, cfg)
    except LookupError as e:
        raise ApiError(404, str(e), "not_found_error", "model") from None
    if parent is not None:  # a registered model (another tenant's weights): the key must be scoped to it
        _check_base_scope(req.model, key, cfg, registered=True)
    job_id = f"ftjob-{uuid.uuid4().hex[:24]}"
    job_dir = jobs_home(cfg) / "jobs" / job_id
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    try:
        run, resolved = build_run_config(req, base, parent, train.train_path, val.train_path if val else None,
                                         seed, job_dir, cfg)
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
                    f"Validated training file {req.training_file}: {train.rows} rows ({train.format})",
                    f"Run config: {run['method']['name']} + {run['objective']['name']} on {base}"):
            s.add(JobEventRow(job_id=job_id, created_at=j.created_at, message=msg))
        return j

    return insert


def cancel_job(s, job_id: str, key: KeyInfo | None) -> JobRow:
    j = get_job(s, job_id, key)
    if j.status not in ACTIVE:
        raise ApiError(400, f"job {job_id} has already finished ({j.status}); only queued or running "
                            "jobs can be cancelled")
    was = j.status
    j.status, j.finished_at = "cancelled", int(time.time())
    s.add(JobEventRow(job_id=job_id, created_at=j.finished_at, level="warn",
                      message=f"Cancel requested (the job was {was})"))
    return j


# --- runs from any run config (the dashboard's New run form) -------------------------------
def queue_run_config(db: JobDB, raw: dict, key: KeyInfo | None, cfg: JobsConfig, label: str = "run") -> JobRow:
    """Queue a full run config (anything `tuneforge train` accepts) on the same worker as the
    fine-tuning jobs. The run goes where jobs go (its output_dir and run_name are the
    queue's); its config is stored as the job's input file (kind "config"), so the job row
    keeps the shape /v1/fine_tuning/jobs shows. Raises ConfigError when the config is invalid."""
    job_id = f"ftjob-{uuid.uuid4().hex[:24]}"
    job_dir = jobs_home(cfg) / "jobs" / job_id
    checked = validate_config(deep_merge(raw, {"output_dir": str(job_dir), "run_name": "run"}), "the run config")
    if missing_trackers(checked):
        raise ConfigError(missing_trackers(checked), "the run config")
    run = checked.model_dump(mode="json")
    file_id = f"file-{uuid.uuid4().hex[:24]}"
    path = jobs_home(cfg) / "files" / f"{file_id}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(run, sort_keys=False))
    now = int(time.time())
    kind = "dpo" if run["objective"]["name"] == "dpo" else "supervised"
    hp = {"n_epochs": run["train"]["epochs"], "batch_size": run["train"]["batch_size"],
          "learning_rate_multiplier": 1.0}
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", label)[:40] or "run"

    def insert(s):
        s.add(FileRow(id=file_id, created_at=now, filename=f"{safe}.yaml", purpose="run-config", bytes=path.stat().st_size,
                      path=str(path), train_path=str(path), kind="config", format="yaml", rows=0,
                      key_id=key.id if key else None))
        s.flush()
        seq = (s.scalar(select(func.max(JobRow.seq))) or 0) + 1
        j = JobRow(id=job_id, seq=seq, created_at=now, model=run["model"]["name"], training_file=file_id,
                   method={"type": kind, kind: {"hyperparameters": hp}}, suffix=None, seed=run["train"]["seed"],
                   metadata_={"source": "ui", "label": safe}, run_config=run, registry_name=f"ui-{safe}-{job_id[-8:]}",
                   status="queued", run_dir=str(job_dir / "run"), key_id=key.id if key else None)
        s.add(j)
        s.flush()
        s.add(JobEventRow(job_id=job_id, created_at=now, message=f"Created run from a config: {job_id} "
                                                                  f"({run['method']['name']} + {run['objective']['name']} "
                                                                  f"on {run['model']['name']})"))
        return j

    return db.run(insert)


def requeue_job(s, job_id: str, key: KeyInfo | None) -> JobRow:
    """Queue a cancelled run again: the worker resumes it from its last checkpoint (exact
    resume, `tuneforge train --resume`), or starts it afresh when none was written."""
    j = get_job(s, job_id, key)
    if j.status != "cancelled":
        raise ApiError(400, f"job {job_id} is {j.status}; only a cancelled job can be resumed")
    j.status, j.finished_at = "queued", None
    s.add(JobEventRow(job_id=job_id, created_at=int(time.time()), message="Resume requested: queued again"))
    return j
