"""serve.yaml: the gateway (bind address, registry, auth, limits, routes) and the engine."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from tuneforge.config import ConfigError, Strict, format_errors, read_yaml
from tuneforge.production.config import JobsConfig, LoggingConfig
from tuneforge.registry.store import Arm


class VLLMLaunch(Strict):
    """Start vLLM from its own environment (it pins its own transformers/torch extras, so it
    does not live in tuneforge's): ``PYTHON -m vllm.entrypoints.openai.api_server --model BASE
    --enable-lora --lora-modules NAME:vN=RUN/adapter ...`` on 127.0.0.1:PORT."""

    python: str = Field(description="the vLLM environment's python, e.g. /opt/vllm/bin/python")
    port: int = Field(8001, gt=0, lt=65536)
    args: list[str] = Field([], description="extra vLLM arguments, e.g. [--max-model-len, '2048']")
    env: dict[str, str] = Field({}, description="extra environment, e.g. {VLLM_CPU_KVCACHE_SPACE: '2'}")
    startup_timeout_s: float = Field(900, gt=0, description="how long to wait for vLLM's /health")


class EngineConfig(Strict):
    kind: Literal["local", "vllm"] = "local"
    # local: one base model in this process, many LoRA adapters, micro-batched
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    max_batch: int = Field(16, gt=0, description="most requests run in one forward pass")
    batch_wait_ms: float = Field(10, ge=0, description="how long the first request waits for others to batch with")
    max_queue: int = Field(256, gt=0, description="most requests waiting for a batch; more are refused with 503 + "
                                                  "Retry-After (so is one whose estimated wait passes timeout_s)")
    max_adapters: int | None = Field(None, gt=0, description="LRU bound on resident adapters (default: no bound)")
    lora: Literal["gathered", "peft"] = Field(
        "gathered", description="how plain LoRA adapters share a batch: gathered (all of a batch's adapters in "
                                "two or three ops per layer) or peft (adapter_names=, one sub-batch per adapter per layer)")
    prefix_cache_mb: float = Field(
        256, ge=0, description="memory for the attention keys/values of served sequences, per adapter, reused by "
                               "prompts that start with the same tokens (system prompt, earlier turns); 0: off")
    prepack: Literal["auto", "on", "off"] = Field(
        "auto", description="bf16 Linear weights packed once for oneDNN on a CPU (faster decode; a second copy of "
                            "those weights in RAM): auto packs when that copy fits in half the available RAM")
    fp32_prefill: Literal["auto", "on", "off"] = Field(
        "auto", description="with prepacked weights, products of 64+ rows (prefill) on a float32 copy (twice the "
                            "bf16 weights' RAM): faster on CPUs without AMX; auto times one product both ways at load")
    # vllm: a running OpenAI-compatible vLLM server (url), or one tuneforge starts (launch)
    url: str | None = None
    api_key: str | None = None
    launch: VLLMLaunch | None = None
    vllm_tools: bool = Field(
        False, description="vLLM parses tool calls (started with --enable-auto-tool-choice --tool-call-parser NAME, "
                           "e.g. in launch.args): tools and tool_choice pass through; off: tool requests get a 400")

    @model_validator(mode="after")
    def _url_for_vllm(self):
        if self.kind == "vllm" and not self.url and self.launch is None:
            raise ValueError("engine.kind=vllm needs engine.url (e.g. http://127.0.0.1:8001) of a running vLLM, "
                             "or engine.launch.python (a vLLM environment's python) for tuneforge to start one")
        if self.url and self.launch is not None:
            raise ValueError("engine.url and engine.launch exclude each other: connect to a running vLLM, or start one")
        return self


class Guards(Strict):
    """Checks on a route's output; a failing one moves the request down the fallback chain."""

    empty: bool = Field(False, description="an output that is empty or only whitespace fails")
    json_object: bool = Field(False, description="when the request asked response_format json_object, "
                                                 "an output that is not a JSON object fails")
    blocklist: list[str] = Field([], description="Python regular expressions searched in the output "
                                                 "(prefix (?i) to ignore case); a match fails")

    @field_validator("blocklist")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"blocklist pattern {p!r} is not a regular expression: {e}") from None
        return patterns

    @property
    def active(self) -> bool:
        return self.empty or self.json_object or bool(self.blocklist)


class FixedReply(Strict):
    """The end of a fallback chain: answer with this text instead of an error."""

    reply: str


class Route(Strict):
    """A public model name served by weighted arms (A/B), then a fallback chain on error/timeout."""

    arms: list[Arm] = Field(min_length=1)
    fallback: list[str | FixedReply] = []
    guards: Guards = Guards()

    @field_validator("fallback")
    @classmethod
    def _reply_last(cls, chain: list) -> list:
        if any(isinstance(t, FixedReply) for t in chain[:-1]):
            raise ValueError("a fixed {reply: ...} always answers, so it can only be the last fallback")
        return chain


class ServeConfig(Strict):
    host: str = "127.0.0.1"
    port: int = 8000
    registry: str | None = Field(None, description="SQLAlchemy URL; default sqlite under ~/.cache/tuneforge")
    auth: Literal["required", "optional"] = Field(
        "optional", description="required: every request needs a key; optional: only once any key exists")
    requests_per_minute: int | None = Field(None, gt=0, description="per-key limit when the key sets none")
    timeout_s: float = Field(60, gt=0, description="per target; past it the request goes down the fallback chain")
    max_tokens: int = Field(512, gt=0, description="cap on a request's max_tokens")
    max_request_bytes: int = Field(1_000_000, gt=0, description="larger request bodies are refused with 413")
    max_prompt_tokens: int | None = Field(None, gt=0, description="longer prompts (after the chat template) "
                                                                  "are refused with 413 (local engine)")
    shutdown_grace_s: float = Field(30, ge=0, description="on SIGTERM/Ctrl-C, how long in-flight requests "
                                                          "may take to finish before the server exits")
    log_format: Literal["json", "text"] = Field("json", description="server logs: one JSON object per line, or text")
    base_model: str | None = Field(
        None, description="a base model (zoo alias such as smollm2-135m-instruct, or a folder) served without "
                          "an adapter under base_name; listed in /v1/models; keys need base_name (or *) in scope")
    base_name: str | None = Field(None, description="the public model id of base_model (default: the alias, or "
                                                    "the folder's name)")
    engine: EngineConfig = EngineConfig()
    routes: dict[str, Route] = {}

    @model_validator(mode="after")
    def _base_name(self):
        if self.base_model and not self.base_name:
            self.base_name = Path(self.base_model.rstrip("/")).name
        if self.base_name and not self.base_model:
            raise ValueError("base_name needs base_model (the model to serve under that name)")
        return self
    logging: LoggingConfig = LoggingConfig()  # request log, PII redaction, retention, opt-out
    jobs: JobsConfig = JobsConfig()


def load_serve_config(path: str | Path | None) -> ServeConfig:
    raw = read_yaml(Path(path)) if path else {}
    try:
        return ServeConfig.model_validate(raw or {})
    except ValidationError as e:
        raise ConfigError(format_errors(e, ServeConfig), str(path)) from None
