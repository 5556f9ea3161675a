"""The OpenAI-compatible gateway: keys, limits, routes (alias / A/B arm / fallback chain), hook.

Request -> key check (scope, rate) -> plan (route -> sticky arm -> chain of targets) ->
resolve each target in the registry (so promote/rollback apply to the next request, no
restart) -> engine, with a per-target timeout; on error or timeout the next target is
tried and the reason recorded; a route's output guards (empty, not JSON, blocklist) move it
down the chain the same way. Every response says which version and arm served it, in the
``tuneforge`` field and in X-Tuneforge-* headers. Operations: /healthz, /readyz, /metrics
(Prometheus), JSON logs with request ids, admin endpoints (tuneforge.deploy.admin).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from pathlib import Path
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import lru_cache

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneforge.deploy import metrics
from tuneforge.deploy.api import ChatRequest, CompletionRequest
from tuneforge.deploy.config import FixedReply, ServeConfig
from tuneforge.deploy.engines import Chunk, GenRequest, PromptTooLong, collect, cut_at_stop
from tuneforge.deploy.routing import RateLimiter, guard_failure, plan
from tuneforge.production.review import review_router
from tuneforge.registry.store import KeyInfo, Registry, RegistryError, VersionInfo, parse_ref

log = logging.getLogger("tuneforge.serve")
FIXED_REPLY = "fixed-reply"  # the version label of a route's final {reply: ...} fallback


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
        self.request_id: str | None = None


def _error(status: int, message: str, type_: str, param: str | None = None,
           request_id: str | None = None) -> JSONResponse:
    headers = {"X-Request-Id": request_id} if request_id else None
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}},
                        status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets a 413, by its Content-Length
    or, for a chunked body, as soon as the bytes read pass the limit (the rest is not read).

    Not FastAPI's ``max_body_size``: its middleware sits outside the exception handlers and
    answers a declared-too-long body in plain text, where OpenAI clients expect their shape.
    """

    # File uploads for fine-tuning jobs have their own, much larger limit (jobs.max_file_mb).
    EXEMPT = ("/v1/files",)

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith(self.EXEMPT):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await _too_big(self.limit)(scope, receive, send)
        seen = 0

        async def counting():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                # FastAPI re-raises HTTPExceptions met while reading the body: the 413 handler answers
                raise StarletteHTTPException(413)
            return message

        await self.app(scope, counting, send)


def _too_big(limit: int) -> JSONResponse:
    return _error(413, f"the request body is over the server's limit of {limit} bytes (max_request_bytes)",
                  "invalid_request_error")


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error"}


def create_app(cfg: ServeConfig, registry: Registry, engine,
               on_request: Callable[[RequestRecord], None] | None = None) -> FastAPI:
    async def preload():
        # Load the base model(s) and registered adapters (up to the engine's LRU bound) before
        # /readyz says ready, so a balancer's first request does not spend its timeout loading.
        if hasattr(engine, "load"):
            room = getattr(engine, "max_adapters", None)
            refs = [v for name in registry.models() for v in registry.versions(name)]
            for v in refs[:room] if room else refs:
                try:
                    await engine.load(_gen_request(v, {}))
                except Exception as e:  # noqa: BLE001 - one broken run must not keep the server unready
                    log.error("preload failed", extra={"version": v.ref, "error": f"{type(e).__name__}: {e}"})
        app.state.ready = True
        log.info("ready", extra={"resident_adapters": _resident(engine)})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # /healthz answers while the models load in the background; /readyz waits for them.
        task = asyncio.create_task(preload())
        yield
        task.cancel()
        await engine.close()  # stop the engine's worker / HTTP pool with the server

    app = FastAPI(title="tuneforge", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes)
    app.state.ready = False
    limiter = RateLimiter()

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.request_id)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError):
        # FastAPI's default is a 422 in its own shape; OpenAI clients expect a 400 in theirs.
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}"
                            for e in exc.errors()) or "invalid request body"
        endpoint = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}.get(request.url.path)
        if endpoint:
            record = RequestRecord(endpoint=endpoint, model="", request_id=_new_id(endpoint == "chat"),
                                   status=400, error=message)
            _emit(record, time.perf_counter())
        return _error(400, message, "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        # Unknown paths, wrong methods and bodies over the limit, in OpenAI's error shape too.
        if exc.status_code == 413:
            return _too_big(cfg.max_request_bytes)
        return _error(exc.status_code, str(exc.detail), _TYPES.get(exc.status_code, "invalid_request_error"))

    def authenticate(request: Request, admin: bool = False) -> KeyInfo | None:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not admin and cfg.auth == "optional" and not registry.has_keys():
            return None
        key = registry.check_key(token) if token else None
        if key is None:
            hint = "tuneforge keys create --name OPS --admin" if admin else "tuneforge keys create --name APP"
            raise ApiError(401, f"missing, unknown or revoked API key ({hint})", "authentication_error")
        if admin and not key.admin:
            raise ApiError(403, f"key {key.name} is not an admin key (tuneforge keys create --admin)",
                           "permission_error")
        if not limiter.allow(key.id, key.requests_per_minute or cfg.requests_per_minute):
            raise ApiError(429, f"rate limit of key {key.name} reached; retry in a minute", "rate_limit_error")
        return key

    def check_scope(key: KeyInfo | None, model: str) -> None:
        try:
            name = model if model in cfg.routes else parse_ref(model)[0]
        except RegistryError as e:  # e.g. "bot:2" for "bot:v2"
            raise ApiError(400, str(e)) from None
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

    async def handle(request: Request, body: ChatRequest | CompletionRequest, endpoint: str):
        t0 = time.perf_counter()
        chat = endpoint == "chat"
        rid = _new_id(chat)
        fmt = body.response_format if chat else None
        record = RequestRecord(endpoint=endpoint, model=body.model, stream=bool(body.stream), request_id=rid,
                               user=body.user or None,
                               messages=[m.model_dump(exclude_none=True) for m in body.messages] if chat else None,
                               prompt=None if chat else body.prompt,
                               json_requested=fmt is not None and fmt.type in ("json_object", "json_schema"))
        try:
            key = authenticate(request)
            record.key_id = key.id if key else None
            check_scope(key, record.model)
            user = str(body.user or (key.id if key else "") or uuid.uuid4())
            p = plan(record.model, cfg.routes, user, registry.route_arms(record.model))
            record.route, record.arm = p.route, p.arm
            asked = body.max_tokens or (body.max_completion_tokens if chat else None) or 128
            params = dict(messages=_text_messages(record.messages) if chat else None, prompt=None if chat else body.prompt,
                          max_tokens=min(asked, cfg.max_tokens), temperature=body.temperature or 0.0,
                          top_p=body.top_p or 1.0, seed=body.seed)
            stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
            if len(stops) > 4 or "" in stops:
                raise ApiError(400, "'stop' takes up to 4 non-empty strings")
            version, stream, first = await start(p.targets, params, record, p.guards)
            if stops:
                stream = cut_at_stop(_chain(first, stream), stops)
                first = await stream.__anext__()
        except ApiError as e:
            record.status, record.error = e.status, e.message
            e.request_id = rid
            _emit(record, t0)
            raise
        meta = {"version": version, "arm": record.arm, "route": record.route, "fallback": record.fallback_reason}
        headers = {"X-Tuneforge-Version": version, "X-Tuneforge-Arm": record.arm or "",
                   "X-Tuneforge-Fallback": record.fallback_reason or "", "X-Request-Id": rid}
        created = int(time.time())
        if body.stream:
            return StreamingResponse(sse(stream, first, rid, created, version, chat, meta, record, t0),
                                     media_type="text/event-stream", headers=headers)
        try:
            rest = await asyncio.wait_for(collect(stream), cfg.timeout_s)
        except Exception as e:  # noqa: BLE001 - the first chunk came; a failure now cannot fall back
            record.status, record.error = 500, f"{type(e).__name__}: {e}"
            _emit(record, t0)
            err = ApiError(500, f"generation failed: {record.error}", "server_error")
            err.request_id = rid
            raise err from None
        out = _joined(first, rest)
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

    async def start(targets: list, params: dict, record: RequestRecord, guards):
        """Try targets in order until one yields its first chunk within the timeout (and, when
        the route has guards, its whole output passes them)."""
        reasons, unknown = [], []

        def skip(target, why: str, reason_class: str) -> None:
            reasons.append(f"{target}: {why}")
            log.warning("fallback", extra={"request_id": record.request_id, "route": record.route,
                                           "target": str(target), "reason": reason_class, "detail": why})
            if record.route:  # a plain model name has no chain: its failure is an error, not a fallback
                metrics.FALLBACKS.labels(record.route, reason_class).inc()

        for target in targets:
            if isinstance(target, FixedReply):
                record.version, record.fallback_reason = FIXED_REPLY, "; ".join(reasons) or None
                return FIXED_REPLY, _no_more(), Chunk(target.reply, "stop")
            try:
                try:
                    v = registry.resolve(target)
                except RegistryError as e:
                    unknown.append(str(e))
                    skip(target, str(e), "unknown_model")
                    continue
                stream = engine.stream(_gen_request(v, params)).__aiter__()
                first = await asyncio.wait_for(stream.__anext__(), cfg.timeout_s)
                if guards is not None:
                    # A guard judges the whole output, so it is generated (within the timeout)
                    # before anything is sent; a stream is then sent as one chunk.
                    rest = await asyncio.wait_for(collect(stream), cfg.timeout_s)
                    first, stream = _joined(first, rest), _no_more()
                    failed = guard_failure(guards, first.text, record.json_requested)
                    if failed:
                        skip(target, f"guard {failed}", "guard_" + failed.split(":")[0])
                        continue
                record.version = v.ref
                record.fallback_reason = "; ".join(reasons) or None
                return v.ref, stream, first
            except PromptTooLong as e:
                raise ApiError(413, str(e)) from None  # the request is too long for any target
            except TimeoutError:
                skip(target, f"timed out after {cfg.timeout_s:g}s", "timeout")
            except Exception as e:  # noqa: BLE001 - any failure moves down the chain
                skip(target, f"{type(e).__name__}: {e}", "error")
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
        metrics.observe(record)
        log.info("request", extra={
            "request_id": record.request_id, "endpoint": record.endpoint, "model": record.model,
            "route": record.route, "version": record.version, "arm": record.arm, "key_id": record.key_id,
            "status": record.status, "latency_s": record.latency_s, "stream": record.stream,
            "prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
            "fallback_reason": record.fallback_reason, "error": record.error})
        if on_request is not None:
            on_request(record)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        return await handle(request, body, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await handle(request, body, "completion")

    from tuneforge.production.feedback import feedback_router

    app.include_router(feedback_router(registry, authenticate, ApiError, cfg.logging.admin_keys,
                                       getattr(on_request, "flush", None)))

    @app.get("/health")
    @app.get("/healthz")
    async def health():
        """The process is up (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def ready():
        """The base model(s) and adapters are loaded (readiness); 503 until then."""
        if not app.state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "resident_adapters": _resident(engine)}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        if hasattr(engine, "resident"):
            metrics.RESIDENT_ADAPTERS.set(len(engine.resident()))
        if getattr(engine, "prefix", None) is not None:
            metrics.PREFIX_REUSED.set(engine.prefix.reused_tokens)
            metrics.PREFIX_BYTES.set(engine.prefix.bytes)
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    from tuneforge.deploy.admin import admin_routes

    app.include_router(admin_routes(registry, engine, lambda request: authenticate(request, admin=True),
                                    lambda v: _gen_request(v, {})))
    app.include_router(review_router(registry, authenticate))
    if cfg.jobs.enabled:  # /v1/files and /v1/fine_tuning/jobs (their worker starts with the app)
        from tuneforge.production.jobs import jobs_router

        app.include_router(jobs_router(cfg, registry, authenticate))
    app.state.registry, app.state.engine = registry, engine
    return app


def _new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def _resident(engine) -> list[str]:
    return engine.resident() if hasattr(engine, "resident") else []


async def _no_more():
    return
    yield  # an async generator that yields nothing: the whole answer was in the first chunk


def _joined(first: Chunk, rest: Chunk) -> Chunk:
    return Chunk(first.text + rest.text, rest.finish_reason or first.finish_reason,
                 rest.prompt_tokens or first.prompt_tokens, rest.completion_tokens or first.completion_tokens)


async def _chain(first: Chunk, rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    yield first
    if first.finish_reason is None:
        async for c in rest:
            yield c


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
    if e.kind == "vllm" and e.launch is not None:
        from tuneforge.deploy.vllm_launch import launch_vllm
        from tuneforge.registry.store import tuneforge_home

        # the versions to serve as LoRA modules come from the registry
        proc = launch_vllm(e.launch, Registry(cfg.registry), tuneforge_home() / "logs" / f"vllm-{e.launch.port}.log")
        return VLLMEngine(proc.url, e.api_key, cfg.timeout_s, process=proc)
    if e.kind == "vllm":
        return VLLMEngine(e.url, e.api_key, cfg.timeout_s)
    return LocalEngine(e.device, e.dtype, e.max_batch, e.batch_wait_ms, e.max_adapters, cfg.max_prompt_tokens,
                       lora=e.lora, prefix_cache_mb=e.prefix_cache_mb, prepack=e.prepack,
                       fp32_prefill=e.fp32_prefill)


def serve(cfg: ServeConfig, on_request: Callable[[RequestRecord], None] | None = None) -> None:
    import uvicorn

    from tuneforge.deploy.logs import log_config

    registry = Registry(cfg.registry)
    logger = None
    if cfg.logging.enabled and on_request is None:
        from tuneforge.production.logger import RequestLogger

        logger = on_request = RequestLogger(registry.engine, cfg.logging)
    engine = build_engine(cfg)
    app = create_app(cfg, registry, engine, on_request)
    # On SIGTERM/SIGINT uvicorn stops accepting, lets in-flight requests (streams included)
    # finish for up to shutdown_grace_s, then runs the lifespan shutdown (engine close).
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_config=log_config(cfg.log_format),
                    timeout_graceful_shutdown=cfg.shutdown_grace_s)
    finally:
        if logger is not None:
            logger.close()  # write what is still queued before the process exits
        if getattr(engine, "process", None) is not None:
            engine.process.stop()  # a launched vLLM goes with the gateway, even if uvicorn never started

