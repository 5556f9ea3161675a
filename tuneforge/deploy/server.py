"""The OpenAI-compatible server: a gateway object plus small routers mounted on one app.

One chat request, from the socket to the engine:
  1. deploy/server.py  serve -> uvicorn -> create_app's FastAPI app (BodyLimit, error handlers)
  2. deploy/chat.py    chat_router: POST /v1/chat/completions -> complete: decode -> predict -> encode
  3. deploy/gateway.py Gateway.authenticate (key, scope, rate) -> route (routing.plan: alias / A-B arm
                       / fallback chain) -> generate (registry.resolve each target, engine.stream)
  4. deploy/engines.py LocalEngine.stream (micro-batched, mixed adapters) or vllm_engine.VLLMEngine.stream (HTTP)
  5. deploy/encode.py  encode_json / encode_stream (tool_calls.py, logprobs) -> Gateway.emit (metrics, log line, request hook:
                       production/request_log.py writes the request log)

Also mounted: ops.py (/healthz, /readyz, /metrics), admin.py (/admin: adapters, aliases), and
production's routers (production/api: /v1/feedback, /v1/review, /v1/files, /v1/fine_tuning/jobs).
Every response says which version and arm served it, in the ``tuneforge`` field and in
X-Tuneforge-* headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneforge.deploy.admin import admin_router
from tuneforge.deploy.chat import chat_router
from tuneforge.deploy.config import ServeConfig
from tuneforge.deploy.engines import LocalEngine
from tuneforge.deploy.gateway import Gateway, new_id
from tuneforge.deploy.logs import log_config
from tuneforge.deploy.ops import ops_router
from tuneforge.deploy.vllm_engine import VLLMEngine
from tuneforge.deploy.vllm_launch import launch_vllm
from tuneforge.production.api.feedback import feedback_router
from tuneforge.production.api.jobs import jobs_router
from tuneforge.production.api.review import review_router
from tuneforge.production.http import ApiError, RequestRecord, error_response
from tuneforge.production.request_log import RequestLogger
from tuneforge.registry.store import Registry, tuneforge_home


def create_app(cfg: ServeConfig, registry: Registry, engine,
               on_request: Callable[[RequestRecord], None] | None = None) -> FastAPI:
    gateway = Gateway(cfg, registry, engine, on_request)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # /healthz answers while the models load in the background; /readyz waits for them.
        task = asyncio.create_task(gateway.preload())
        yield
        task.cancel()
        await engine.close()  # stop the engine's worker / HTTP pool with the server

    app = FastAPI(title="tuneforge", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes)
    add_error_handlers(app, gateway)
    app.include_router(chat_router(gateway))
    app.include_router(ops_router(gateway))
    app.include_router(admin_router(gateway))
    app.include_router(feedback_router(registry, gateway.authenticate, cfg.logging.admin_keys,
                                       getattr(on_request, "flush", None)))
    app.include_router(review_router(registry, gateway.authenticate))
    if cfg.jobs.enabled:  # /v1/files and /v1/fine_tuning/jobs (their worker starts with the app)
        app.include_router(jobs_router(cfg.jobs, registry, gateway.authenticate))
    app.state.gateway, app.state.registry, app.state.engine = gateway, registry, engine
    return app


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error"}


def add_error_handlers(app: FastAPI, gateway: Gateway) -> None:
    """Every error in OpenAI's shape, whichever layer raised it."""

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        response = error_response(exc.status, exc.message, exc.type, exc.param, exc.request_id)
        if getattr(exc, "retry_after", None) is not None:  # an overloaded engine says when to come back
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError):
        # FastAPI's default is a 422 in its own shape; OpenAI clients expect a 400 in theirs.
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}"
                            for e in exc.errors()) or "invalid request body"
        endpoint = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}.get(request.url.path)
        if endpoint:  # a completion that never got decoded is still logged
            record = RequestRecord(endpoint=endpoint, model="", request_id=new_id(endpoint == "chat"),
                                   status=400, error=message)
            gateway.emit(record, time.perf_counter())
        return error_response(400, message, "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        # Unknown paths, wrong methods and bodies over the limit, in OpenAI's error shape too.
        if exc.status_code == 413:
            return _too_big(gateway.cfg.max_request_bytes)
        return error_response(exc.status_code, str(exc.detail), _TYPES.get(exc.status_code, "invalid_request_error"))


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
        # Over 18 digits is over any limit (and int() refuses past 4300 digits: a 500, not a 413).
        if declared.isdigit() and (len(declared) > 18 or int(declared) > self.limit):
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
    return error_response(413, f"the request body is over the server's limit of {limit} bytes (max_request_bytes)",
                          "invalid_request_error")


def build_engine(cfg: ServeConfig):
    e = cfg.engine
    if e.kind == "vllm" and e.launch is not None:
        # the versions to serve as LoRA modules come from the registry
        proc = launch_vllm(e.launch, Registry(cfg.registry), tuneforge_home() / "logs" / f"vllm-{e.launch.port}.log")
        return VLLMEngine(proc.url, e.api_key, cfg.timeout_s, process=proc, tools=e.vllm_tools)
    if e.kind == "vllm":
        return VLLMEngine(e.url, e.api_key, cfg.timeout_s, tools=e.vllm_tools)
    return LocalEngine(e.device, e.dtype, e.max_batch, e.batch_wait_ms, e.max_adapters, cfg.max_prompt_tokens,
                       lora=e.lora, prefix_cache_mb=e.prefix_cache_mb, prepack=e.prepack,
                       fp32_prefill=e.fp32_prefill, max_queue=e.max_queue)


def serve(cfg: ServeConfig, on_request: Callable[[RequestRecord], None] | None = None,
          app_factory: Callable[..., FastAPI] = create_app) -> None:
    """Run the server; ``app_factory`` (same arguments as create_app) lets the dashboard
    (tuneforge.ui.create_ui_app, a layer above) add its pages to the same app."""
    registry = Registry(cfg.registry)
    logger = None
    if cfg.logging.enabled and on_request is None:
        logger = on_request = RequestLogger(registry.engine, cfg.logging)
    engine = build_engine(cfg)
    app = app_factory(cfg, registry, engine, on_request)
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

