"""serve.yaml: the gateway (bind address, registry, auth, limits, routes) and the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from tuneforge.config import ConfigError, Strict, format_errors
from tuneforge.production.config import LoggingConfig
from tuneforge.production.jobstore import JobsConfig


class EngineConfig(Strict):
    kind: Literal["local", "vllm"] = "local"
    # local: one base model in this process, many LoRA adapters, micro-batched
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    max_batch: int = Field(16, gt=0, description="most requests run in one forward pass")
    batch_wait_ms: float = Field(10, ge=0, description="how long the first request waits for others to batch with")
    # vllm: an OpenAI-compatible vLLM server launched with --enable-lora --lora-modules NAME:vN=RUN/adapter
    url: str | None = None
    api_key: str | None = None

    @model_validator(mode="after")
    def _url_for_vllm(self):
        if self.kind == "vllm" and not self.url:
            raise ValueError("engine.kind=vllm needs engine.url (e.g. http://127.0.0.1:8001)")
        return self


class Arm(Strict):
    name: str
    target: str = Field(description="a registry reference: name, name:vN or name@alias")
    weight: float = Field(gt=0)


class Route(Strict):
    """A public model name served by weighted arms (A/B), then a fallback chain on error/timeout."""

    arms: list[Arm] = Field(min_length=1)
    fallback: list[str] = []


class ServeConfig(Strict):
    host: str = "127.0.0.1"
    port: int = 8000
    registry: str | None = Field(None, description="SQLAlchemy URL; default sqlite under ~/.cache/tuneforge")
    auth: Literal["required", "optional"] = Field(
        "optional", description="required: every request needs a key; optional: only once any key exists")
    requests_per_minute: int | None = Field(None, gt=0, description="per-key limit when the key sets none")
    timeout_s: float = Field(60, gt=0, description="per target; past it the request goes down the fallback chain")
    max_tokens: int = Field(512, gt=0, description="cap on a request's max_tokens")
    engine: EngineConfig = EngineConfig()
    routes: dict[str, Route] = {}
    logging: LoggingConfig = LoggingConfig()  # request log, PII redaction, retention, opt-out
    jobs: JobsConfig = JobsConfig()


def load_serve_config(path: str | Path | None) -> ServeConfig:
    raw = yaml.safe_load(Path(path).read_text()) if path else {}
    try:
        return ServeConfig.model_validate(raw or {})
    except ValidationError as e:
        raise ConfigError(format_errors(e, ServeConfig), str(path)) from None
