"""Every table of the registry database, in one place: what alembic migrates.

- the registry's own: models, versions, aliases and their history, API keys, route overrides;
- what the server and the production loop write beside them: the request log, user
  feedback, the human review queue (one database holds which version served a request,
  what the user said about it and what a reviewer decided, so `tuneforge improve` can trace
  a new version back to the rows that made it);
- fine-tuning jobs: uploaded files, the job queue and job events (the queue lives in the
  database so a restarted server finds every queued and interrupted job).

Prompts and responses are stored after PII redaction when the server enables it. A table
change needs an alembic revision (tuneforge/registry/migrate.py says how).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Model(Base):
    __tablename__ = "models"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utc_now)


class Version(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("model_id", "number"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    number: Mapped[int] = mapped_column(Integer)
    run_dir: Mapped[str] = mapped_column(String(1000))
    base_model: Mapped[str] = mapped_column(String(1000))
    adapter_sha256: Mapped[str] = mapped_column(String(64))
    scores: Mapped[dict] = mapped_column(JSON, default=dict)
    main_metric: Mapped[str | None] = mapped_column(String(100), nullable=True)
    main_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utc_now)


class Alias(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("model_id", "alias"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    alias: Mapped[str] = mapped_column(String(100))
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))


class AliasEvent(Base):
    __tablename__ = "alias_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    alias: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(20))  # promote | rollback
    from_version: Mapped[int | None] = mapped_column(Integer, nullable=True)  # version numbers
    to_version: Mapped[int] = mapped_column(Integer)
    note: Mapped[str] = mapped_column(String(500), default="")
    at: Mapped[datetime] = mapped_column(DateTime, default=utc_now)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # Keys are 256-bit random strings, so a plain SHA-256 is enough (no brute-forceable password).
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(12))
    models: Mapped[list] = mapped_column(JSON)  # model names this key may call; ["*"] = all
    requests_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utc_now)
    revoked: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # admin keys may call the server's /admin endpoints (adapter load/unload, alias changes)
    admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # reviewer keys may read and decide review items of the models they may call (`models`)
    reviewer: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class RouteOverride(Base):
    """Arms that replace a route's serve.yaml arms while present (`tuneforge improve` sets a
    canary here): read per request, so a new weight reaches a running server without restart."""

    __tablename__ = "route_overrides"
    id: Mapped[int] = mapped_column(primary_key=True)
    route: Mapped[str] = mapped_column(String(200), unique=True)
    arms: Mapped[list] = mapped_column(JSON)  # [{name, target, weight}], as serve.yaml's Arm
    note: Mapped[str] = mapped_column(String(500), default="")
    started: Mapped[datetime] = mapped_column(DateTime, default=utc_now)  # when the override was first set
    updated: Mapped[datetime] = mapped_column(DateTime, default=utc_now)


# --- request log, feedback, review ------------------------------------------------------

class RequestLog(Base):
    __tablename__ = "request_logs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the response id, e.g. chatcmpl-...
    at: Mapped[datetime] = mapped_column(DateTime, default=utc_now, index=True)
    endpoint: Mapped[str] = mapped_column(String(20))  # chat | completion
    model: Mapped[str] = mapped_column(String(200))  # as requested
    route: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    version: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)  # e.g. support-bot:v2
    arm: Mapped[str | None] = mapped_column(String(100), nullable=True)
    key_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    user: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[int] = mapped_column(Integer, default=200)
    latency_s: Mapped[float] = mapped_column(Float, default=0.0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    finish_reason: Mapped[str | None] = mapped_column(String(20), nullable=True)
    fallback_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    json_requested: Mapped[bool] = mapped_column(Boolean, default=False)  # response_format json
    messages: Mapped[list | None] = mapped_column(JSON, nullable=True)  # chat input, redacted
    prompt: Mapped[str | None] = mapped_column(Text, nullable=True)  # completion input / rendered text, redacted
    response: Mapped[str | None] = mapped_column(Text, nullable=True)  # redacted
    redactions: Mapped[int] = mapped_column(Integer, default=0)  # PII spans replaced before storage


class Feedback(Base):
    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("request_logs.id"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utc_now)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)  # normalised to [0, 1]
    thumbs: Mapped[str | None] = mapped_column(String(4), nullable=True)  # up | down
    correction: Mapped[str | None] = mapped_column(Text, nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    key_id: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ReviewItem(Base):
    """One logged request queued for a human. Nothing enters training data without a decision."""

    __tablename__ = "review_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("request_logs.id"), index=True, unique=True)
    reason: Mapped[str] = mapped_column(String(40))  # low_feedback | guard | fallback | drift | sample
    detail: Mapped[str] = mapped_column(Text, default="")
    queued_at: Mapped[datetime] = mapped_column(DateTime, default=utc_now)
    decision: Mapped[str | None] = mapped_column(String(10), nullable=True)  # accept | correct | reject
    corrected: Mapped[str | None] = mapped_column(Text, nullable=True)  # the right answer, for 'correct'
    reviewer: Mapped[str | None] = mapped_column(String(200), nullable=True)
    decided_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    used_in: Mapped[str | None] = mapped_column(String(200), nullable=True)  # version trained on it (lineage)


# --- fine-tuning jobs -----------------------------------------------------------------------

class FileRow(Base):
    __tablename__ = "ft_files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # file-...
    created_at: Mapped[int] = mapped_column(Integer)
    filename: Mapped[str] = mapped_column(String(500))
    purpose: Mapped[str] = mapped_column(String(40))
    bytes: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(1000))  # the upload as received
    train_path: Mapped[str] = mapped_column(String(1000))  # what the data stage reads (converted if needed)
    kind: Mapped[str] = mapped_column(String(20))  # sft | preference (uploads) | results (a job's metrics CSV)
    format: Mapped[str] = mapped_column(String(40))
    rows: Mapped[int] = mapped_column(Integer)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    key_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the API key that uploaded it


class JobRow(Base):
    __tablename__ = "ft_jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # ftjob-...
    seq: Mapped[int] = mapped_column(Integer, unique=True)  # creation order (ids are random)
    created_at: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(500))  # as requested
    training_file: Mapped[str] = mapped_column(ForeignKey("ft_files.id"))
    validation_file: Mapped[str | None] = mapped_column(ForeignKey("ft_files.id"), nullable=True)
    method: Mapped[dict] = mapped_column(JSON)  # OpenAI shape: {type, supervised|dpo: {hyperparameters}}
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(Integer)
    metadata_: Mapped[dict | None] = mapped_column("metadata", JSON, nullable=True)
    run_config: Mapped[dict] = mapped_column(JSON)  # the validated tuneforge RunConfig
    registry_name: Mapped[str] = mapped_column(String(200))  # the name the result is registered under
    status: Mapped[str] = mapped_column(String(20), index=True)  # queued|running|succeeded|failed|cancelled
    run_dir: Mapped[str] = mapped_column(String(1000))
    fine_tuned_model: Mapped[str | None] = mapped_column(String(300), nullable=True)
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # {code, message, param}
    finished_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    restarts: Mapped[int] = mapped_column(Integer, default=0)  # server stops survived (resumed)
    result_files: Mapped[list | None] = mapped_column(JSON, nullable=True)  # file ids: per-step metrics CSV
    key_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the API key that created it


class JobEventRow(Base):
    __tablename__ = "ft_job_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("ft_jobs.id"), index=True)
    created_at: Mapped[int] = mapped_column(Integer)
    level: Mapped[str] = mapped_column(String(10), default="info")
    message: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(10), default="message")  # message | metrics
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)
