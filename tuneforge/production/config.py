"""Typed settings of production: request logging (serve.yaml ``logging:``), the files and
fine-tuning jobs API (serve.yaml ``jobs:``) and monitoring thresholds (monitor.yaml)."""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from tuneforge.config import ConfigError, Strict, deep_merge, format_errors, read_yaml
from tuneforge.plugins import validate_config


class LoggingConfig(Strict):
    """serve.yaml ``logging:`` — what the server records about each request."""

    enabled: bool = Field(True, description="record every request in the registry database")
    redact_pii: bool = Field(True, description="replace emails, phones, cards, keys... with <TYPE> before storing")
    store_text: bool = Field(True, description="store prompts and responses (false: metrics only)")
    retention_days: float | None = Field(30, gt=0, description="delete logged requests older than this (null: keep)")
    opt_out_keys: list[str] = Field(
        [], description="API key names or ids whose prompts and responses are never stored (metrics still are)")
    admin_keys: list[str] = Field(
        [], description="API key names or ids that may send feedback on any request (others: only their own)")
    queue_size: int = Field(10_000, gt=0, description="records waiting to be written; beyond it they are dropped and counted")
    batch_size: int = Field(200, gt=0, description="records written per transaction")
    lock_retries: int = Field(5, ge=0, description="retries of a batch when the database is locked, before dropping it")


DEFAULT_REFUSALS = [
    r"\bI(?:'m| am) (?:sorry|afraid),? (?:but )?I (?:can(?:'|no)t|cannot|am unable|won't)",
    r"\bI can(?:'|no)t (?:help|assist|answer|provide|do) (?:with )?that",
    r"\bI(?:'m| am) (?:not able|unable) to\b",
    r"\bAs an AI(?: language model)?\b",
]


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
        try:
            validate_config(deep_merge({"data": {"train": ["upload.jsonl"]}}, self.run_defaults))
        except ConfigError as e:
            raise ValueError(f"jobs.run_defaults is not a valid run config part: {'; '.join(e.problems)}") from None
        return self


def jobs_home(cfg: JobsConfig) -> Path:
    return Path(cfg.home or os.environ.get("TUNEFORGE_HOME", Path.home() / ".cache" / "tuneforge")).expanduser()


class Thresholds(Strict):
    """An alert fires when a figure crosses its threshold (null: not checked)."""

    error_rate: float | None = Field(0.05, ge=0, le=1, description="share of requests that ended in a 5xx")
    latency_p95_s: float | None = Field(10.0, gt=0)
    fallback_rate: float | None = Field(0.05, ge=0, le=1, description="share served by a fallback target")
    empty_rate: float | None = Field(0.05, ge=0, le=1)
    truncated_rate: float | None = Field(0.2, ge=0, le=1, description="finish_reason 'length'")
    refusal_rate: float | None = Field(0.1, ge=0, le=1)
    repetition_rate: float | None = Field(0.1, ge=0, le=1, description="answers whose repeated n-gram ratio passes repetition.max_ratio")
    length_shift: float | None = Field(0.5, gt=0, description="relative change of mean answer length vs the earlier window")
    json_invalid_rate: float | None = Field(0.05, ge=0, le=1, description="among requests that asked for JSON")
    feedback_min: float | None = Field(0.5, ge=0, le=1, description="mean normalised feedback score below this")
    judge_min: float | None = Field(0.5, ge=0, le=1, description="mean judge score below this (with a judge)")
    drift_p: float | None = Field(0.01, gt=0, lt=1, description="alert when the drift test's p-value is below this")


class Repetition(Strict):
    n: int = Field(3, ge=1, description="n-gram size (words)")
    max_ratio: float = Field(0.5, gt=0, le=1, description="an answer is repetitive when this share of its n-grams repeats")


class DriftSettings(Strict):
    enabled: bool = True
    max_prompts: int = Field(400, gt=1, description="most prompts per side (recent and training), sampled with the seed")
    min_prompts: int = Field(20, gt=1, description="fewer recent prompts than this: drift is not tested")
    permutations: int = Field(500, ge=50)
    top: int = Field(5, ge=0, description="drifted prompts shown (farthest from their nearest training prompt)")
    queue_for_review: bool = Field(True, description="put the most drifted prompts on the human review queue")
    seed: int = 0


class JudgeSettings(Strict):
    """A plug point: ``callable`` is 'module:function' taking (prompt, response, rubric) -> score in [0, 1]."""

    callable: str | None = None
    rubric: str = "Is the answer correct, helpful and in the requested format? 1 = yes, 0 = no."
    sample: int = Field(20, gt=0, description="logged requests judged per route")
    seed: int = 0


class MonitorConfig(Strict):
    since: str = Field("7d", description="the recent window: 30m, 12h, 7d, 2w")
    min_requests: int = Field(20, gt=0, description="fewer requests than this in a window: rates are shown, not alerted on")
    thresholds: Thresholds = Thresholds()
    refusal_patterns: list[str] = Field(DEFAULT_REFUSALS, description="regular expressions (case-insensitive)")
    repetition: Repetition = Repetition()
    drift: DriftSettings = DriftSettings()
    judge: JudgeSettings = JudgeSettings()
    webhook: str | None = Field(None, description="alerts are POSTed here as JSON {alerts: [...]}")
    webhook_timeout_s: float = Field(10, gt=0)

    @field_validator("since")
    @classmethod
    def _since(cls, v: str) -> str:
        parse_window(v)
        return v

    @field_validator("refusal_patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"refusal pattern {p!r} is not a regular expression: {e}") from None
        return v


_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_window(text: str) -> timedelta:
    """'30m' | '12h' | '7d' | '2w' -> timedelta."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*", text or "")
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"a window is a positive number and a unit m/h/d/w, e.g. 7d or 12h (got {text!r})")
    return timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})


def load_monitor_config(path: str | Path | None, overrides: dict | None = None) -> MonitorConfig:
    raw = read_yaml(Path(path)) if path else {}
    raw |= {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return MonitorConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, MonitorConfig), str(path) if path else None) from None
