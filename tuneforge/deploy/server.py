"""The OpenAI-compatible gateway: keys, limits, routes (alias / A/B arm / fallback chain), hook.

Request -> key check (scope, rate) -> plan (route -> sticky arm -> chain of targets) ->
resolve each target in the registry (so promote/rollback apply to the next request, no
restart) -> engine, with a per-target timeout; on error or timeout the next target is
tried and the reason recorded. Every response says which version and arm served it, in
the ``tuneforge`` field and in X-Tuneforge-* headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from pathlib import Path
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import lru_cache

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tuneforge.deploy.config import ServeConfig
from tuneforge.deploy.engines import Chunk, GenRequest, collect
from tuneforge.deploy.routing import RateLimiter, plan
from tuneforge.production.review import review_router
from tuneforge.registry.store import KeyInfo, Registry, RegistryError, VersionInfo, parse_ref


@dataclass
class RequestRecord:
    """What the request hook receives once per request (request logging plugs in here)."""

    endpoint: str
    model: str  # as requested
    request_id: str = ""  # the response id (chatcmpl-... / cmpl-...); POST /v1/feedback refers to it
    user: str | None = None
    route: str | None = None
    version: str | None = None  # the version that served it, e.g. support-bot:v2
    arm: str | None = None
    key_id: int | None = None
    status: int = 200
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    fallback_reason: str | None = None  # why earlier targets were skipped, if any were
    stream: bool = False
    error: str | None = None
    finish_reason: str | None = None
    json_requested: bool = False  # response_format {"type": "json_object"}
    messages: list | None = None  # chat input as received (the logger redacts before storing)
    prompt: str | None = None  # completion input
    response: str | None = None  # generated text
    extra: dict = field(default_factory=dict)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def _error(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}},
                        status_code=status)


def create_app(cfg: ServeConfig, registry: Registry, engine,
               on_request: Callable[[RequestRecord], None] | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        if hasattr(engine, "load"):
            # Load the base model(s) and every registered adapter before taking traffic, so the
            # first request's timeout is not spent loading weights.
            for name in registry.models():
                for v in registry.versions(name):
                    await engine.load(_gen_request(v, {}))
        yield
        await engine.close()  # stop the engine's worker / HTTP pool with the server

    app = FastAPI(title="tuneforge", docs_url=None, redoc_url=None, lifespan=lifespan)
    limiter = RateLimiter()

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error(exc.status, exc.message, exc.type, exc.param)

    def authenticate(request: Request) -> KeyInfo | None:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if cfg.auth == "optional" and not registry.has_keys():
            return None
        key = registry.check_key(token) if token else None
        if key is None:
            raise ApiError(401, "missing, unknown or revoked API key (tuneforge keys create --name APP)",
                           "authentication_error")
        if not limiter.allow(key.id, key.requests_per_minute or cfg.requests_per_minute):
            raise ApiError(429, f"rate limit of key {key.name} reached; retry in a minute", "rate_limit_error")
        return key

    def check_scope(key: KeyInfo | None, model: str) -> None:
        name = model if model in cfg.routes else parse_ref(model)[0]
        if key is not None and "*" not in key.models and name not in key.models:
            raise ApiError(403, f"key {key.name} may not call '{name}' (allowed: {', '.join(key.models)})",
                           "permission_error")

    @app.get("/v1/models")
    async def models(request: Request):
        key = authenticate(request)
        ids = list(cfg.routes)
        for name in registry.models():
            ids += [name, *(f"{name}@{a}" for a in registry.aliases(name)),
                    *(v.ref for v in registry.versions(name))]
        allowed = [i for i in ids if key is None or "*" in key.models
                   or (i if i in cfg.routes else parse_ref(i)[0]) in key.models]
        return {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "tuneforge"} for i in allowed]}

    async def handle(request: Request, endpoint: str):
        t0 = time.perf_counter()
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON", "invalid_request_error")
        chat = endpoint == "chat"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        fmt = body.get("response_format")
        record = RequestRecord(endpoint=endpoint, model=str(body.get("model", "")), stream=bool(body.get("stream")),
                               request_id=rid, user=str(body["user"]) if body.get("user") else None,
                               messages=body.get("messages") if chat else None,
                               prompt=body.get("prompt") if not chat else None,
                               json_requested=isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"))
        try:
            key = authenticate(request)
            record.key_id = key.id if key else None
            if not record.model:
                raise ApiError(400, "'model' is required")
            check_scope(key, record.model)
            if chat and not isinstance(body.get("messages"), list):
                raise ApiError(400, "'messages' must be a list of {role, content}")
            if not chat and not isinstance(body.get("prompt"), str):
                raise ApiError(400, "'prompt' must be a string")
            user = str(body.get("user") or (key.id if key else "") or uuid.uuid4())
            p = plan(record.model, cfg.routes, user, registry.route_arms(record.model))
            record.route, record.arm = p.route, p.arm
            params = dict(messages=_text_messages(body["messages"]) if chat else None, prompt=None if chat else body["prompt"],
                          max_tokens=min(int(body.get("max_tokens") or body.get("max_completion_tokens") or 128),
                                         cfg.max_tokens),
                          temperature=float(body.get("temperature") or 0.0), top_p=float(body.get("top_p") or 1.0))
            version, stream, first = await start(p.targets, params, record)
        except ApiError as e:
            record.status, record.error = e.status, e.message
            _emit(record, t0)
            raise
        meta = {"version": version, "arm": record.arm, "route": record.route, "fallback": record.fallback_reason}
        headers = {"X-Tuneforge-Version": version, "X-Tuneforge-Arm": record.arm or "",
                   "X-Tuneforge-Fallback": record.fallback_reason or ""}
        created = int(time.time())
        if body.get("stream"):
            return StreamingResponse(sse(stream, first, rid, created, version, chat, meta, record, t0),
                                     media_type="text/event-stream", headers=headers)
        try:
            rest = await asyncio.wait_for(collect(stream), cfg.timeout_s)
        except Exception as e:  # noqa: BLE001 - the first chunk came; a failure now cannot fall back
            record.status, record.error = 500, f"{type(e).__name__}: {e}"
            _emit(record, t0)
            raise ApiError(500, f"generation failed: {record.error}", "server_error") from None
        out = Chunk(first.text + rest.text, rest.finish_reason or first.finish_reason,
                    rest.prompt_tokens or first.prompt_tokens, rest.completion_tokens or first.completion_tokens)
        record.prompt_tokens, record.completion_tokens = out.prompt_tokens, out.completion_tokens
        record.response, record.finish_reason = out.text, out.finish_reason
        _emit(record, t0)
        choice = ({"index": 0, "message": {"role": "assistant", "content": out.text}} if chat
                  else {"index": 0, "text": out.text, "logprobs": None})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": version,
                             "choices": [choice | {"finish_reason": out.finish_reason}],
                             "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                                       "total_tokens": out.prompt_tokens + out.completion_tokens},
                             "tuneforge": meta}, headers=headers)

    async def start(targets: list[str], params: dict, record: RequestRecord):
        """Try targets in order until one yields its first chunk within the timeout."""
        reasons, unknown = [], []
        for target in targets:
            try:
                try:
                    v = registry.resolve(target)
                except RegistryError as e:
                    unknown.append(str(e))
                    raise
                stream = engine.stream(_gen_request(v, params)).__aiter__()
                first = await asyncio.wait_for(stream.__anext__(), cfg.timeout_s)
                record.version = v.ref
                record.fallback_reason = "; ".join(reasons) or None
                return v.ref, stream, first
            except TimeoutError:
                reasons.append(f"{target}: timed out after {cfg.timeout_s:g}s")
            except Exception as e:  # noqa: BLE001 - any failure moves down the chain
                reasons.append(f"{target}: {type(e).__name__}: {e}")
        record.fallback_reason = "; ".join(reasons)
        if len(unknown) == len(targets):
            raise ApiError(404, "; ".join(unknown), "not_found_error")
        raise ApiError(503, f"every target failed: {record.fallback_reason}", "server_error")

    async def sse(stream: AsyncIterator[Chunk], first: Chunk, rid, created, version, chat, meta, record, t0):
        def event(c: Chunk, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({"content": c.text} if c.text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": c.finish_reason}
            else:
                choice = {"index": 0, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                          "created": created, "model": version, "choices": [choice],
                                          "tuneforge": meta}) + "\n\n"

        last, texts = first, [first.text]
        try:
            yield event(first, role=True)
            if first.finish_reason is None:
                async for c in stream:
                    last = c
                    texts.append(c.text)
                    yield event(c)
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, as OpenAI does
            record.status, record.error = 500, f"{type(e).__name__}: {e}"
            yield "data: " + json.dumps({"error": {"message": record.error, "type": "server_error"}}) + "\n\n"
        record.prompt_tokens, record.completion_tokens = last.prompt_tokens, last.completion_tokens
        record.response, record.finish_reason = "".join(texts), last.finish_reason
        _emit(record, t0)
        yield "data: [DONE]\n\n"

    def _emit(record: RequestRecord, t0: float) -> None:
        record.latency_s = round(time.perf_counter() - t0, 4)
        if on_request is not None:
            on_request(record)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completion")

    from tuneforge.production.feedback import feedback_router

    app.include_router(feedback_router(registry, authenticate, ApiError, cfg.logging.admin_keys,
                                       getattr(on_request, "flush", None)))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    app.include_router(review_router(registry, authenticate))
    if cfg.jobs.enabled:  # /v1/files and /v1/fine_tuning/jobs (their worker starts with the app)
        from tuneforge.production.jobs import jobs_router

        app.include_router(jobs_router(cfg, registry, authenticate))
    app.state.registry, app.state.engine = registry, engine
    return app


def _gen_request(v: VersionInfo, params: dict) -> GenRequest:
    return GenRequest(adapter=v.ref, adapter_dir=f"{v.run_dir}/adapter", base_model=v.base_model,
                      system_prompt=_system_prompt(v.run_dir), **params)


@lru_cache(maxsize=256)
def _system_prompt(run_dir: str) -> str | None:
    import yaml

    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    return (cfg.get("data") or {}).get("system_prompt")


def _text_messages(messages: list) -> list[dict]:
    """OpenAI content may be a list of parts; the chat template wants one string per message."""
    out = []
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append({"role": m["role"], "content": content})
    return out


def build_engine(cfg: ServeConfig):
    from tuneforge.deploy.engines import LocalEngine, VLLMEngine

    e = cfg.engine
    if e.kind == "vllm":
        return VLLMEngine(e.url, e.api_key, cfg.timeout_s)
    return LocalEngine(e.device, e.dtype, e.max_batch, e.batch_wait_ms)


def serve(cfg: ServeConfig, on_request: Callable[[RequestRecord], None] | None = None) -> None:
    import uvicorn

    registry = Registry(cfg.registry)
    logger = None
    if cfg.logging.enabled and on_request is None:
        from tuneforge.production.logger import RequestLogger

        logger = on_request = RequestLogger(registry.engine, cfg.logging)
    app = create_app(cfg, registry, build_engine(cfg), on_request)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
    finally:
        if logger is not None:
            logger.close()  # write what is still queued before the process exits

