"""Fine-tuning jobs in the registry database: uploaded files, the job queue and job events.

The queue lives in the database (not in memory) so a server restart finds every queued
job and every job that was running when the server stopped. Writes go through
``JobDB.run``: one transaction each, retried while another writer holds SQLite's lock, and
``DatabaseBusy`` with a clear message when the lock is not released in time (nothing is
half-written: the transaction rolled back).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, model_validator
from sqlalchemy import JSON, Boolean, ForeignKey, Integer, String, Text, create_engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Mapped, Session, mapped_column

from tuneforge.config import Strict
from tuneforge.registry.store import Base

T = TypeVar("T")


class JobsConfig(Strict):
    """serve.yaml `jobs:` — the OpenAI-compatible /v1/files and /v1/fine_tuning/jobs endpoints."""

    enabled: bool = True
    home: str | None = Field(
        None, description="files/ and jobs/ go here; default $TUNEFORGE_HOME or ~/.cache/tuneforge")
    max_file_mb: float = Field(512, gt=0, description="larger uploads get 413")
    base_models: dict[str, str] = Field(
        {}, description="extra base models a job may name: public name -> model.name (a local folder or hub id)")
    run_defaults: dict[str, Any] = Field(
        {}, description="run-config keys applied to every job before its own (e.g. {data: {max_length: 1024}})")
    save_every: int = Field(
        20, gt=0, description="checkpoint every N steps, so a restart resumes close to where it was")
    max_restarts: int = Field(2, ge=0, description="a job interrupted by more server stops than this is failed")
    busy_timeout_s: float = Field(5.0, gt=0, description="SQLite: how long one attempt waits for another writer's lock")
    busy_attempts: int = Field(3, gt=0, description="attempts before answering 503 'database locked'")
    cancel_grace_s: float = Field(120, gt=0, description="after a cancel, wait this long for a checkpoint, then kill")

    @model_validator(mode="after")
    def _run_defaults_make_a_run(self):
        # Checked when the server starts, not at the first job: a typo here would refuse every job.
        from tuneforge.config import ConfigError, deep_merge
        from tuneforge.plugins import validate_config

        try:
            validate_config(deep_merge({"data": {"train": ["upload.jsonl"]}}, self.run_defaults))
        except ConfigError as e:
            raise ValueError(f"jobs.run_defaults is not a valid run config part: {'; '.join(e.problems)}") from None
        return self


def jobs_home(cfg: JobsConfig) -> Path:
    return Path(cfg.home or os.environ.get("TUNEFORGE_HOME", Path.home() / ".cache" / "tuneforge")).expanduser()


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


def visible(row, key) -> bool:
    """Files and jobs belong to the API key that made them; without keys everything is shared."""
    return key is None or row.key_id == key.id


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

    def event(self, job_id: str, message: str, level: str = "info", type_: str = "message",
              data: dict | None = None) -> None:
        self.run(lambda s: s.add(JobEventRow(job_id=job_id, created_at=int(time.time()), level=level,
                                             message=message, type=type_, data=data)))
