"""The gateway: everything between a decoded request and the engine, written once for every
engine (in-process or vLLM).

authenticate (key, scope, rate) -> route (plan: route -> sticky A/B arm -> chain of targets)
-> generate (resolve each target in the registry, so promote/rollback apply to the next
request with no restart; engine, with a per-target timeout; on error, timeout or a failed
output guard the next target is tried and the reason recorded) -> log (metrics, a JSON log
line, the request hook).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from functools import lru_cache
from pathlib import Path

import yaml
from fastapi import Request

from tuneforge.deploy import prometheus as metrics
from tuneforge.deploy.admission import Overloaded
from tuneforge.deploy.config import FixedReply, ServeConfig
from tuneforge.deploy.engines import Chunk, GenRequest, PromptTooLong, collect
from tuneforge.deploy.routing import Plan, RateLimiter, guard_failure, plan
from tuneforge.production.http import ApiError, RequestRecord, auth_throttle, client_address, may_call
from tuneforge.registry.store import KeyInfo, Registry, RegistryError, VersionInfo, parse_ref

log = logging.getLogger("tuneforge.serve")
FIXED_REPLY = "fixed-reply"  # the version label of a route's final {reply: ...} fallback


class Gateway:
    def __init__(self, cfg: ServeConfig, registry: Registry, engine,
                 on_request: Callable[[RequestRecord], None] | None = None):
        self.cfg, self.registry, self.engine, self.on_request = cfg, registry, engine, on_request
        self.limiter = RateLimiter()
        self.ready = False  # /readyz: base model(s) and adapters loaded

    # --- authenticate -------------------------------------------------------------------------
    def authenticate(self, request: Request, admin: bool = False) -> KeyInfo | None:
        """The request's key (None while auth is optional and no key exists); 401 without a
        valid key, 403 for a non-admin key on an admin endpoint, 429 past the key's rate or
        past 20 failed authentications a minute from the client's address (http.AuthThrottle)."""
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not admin and self.cfg.auth == "optional" and not self.registry.has_keys():
            return None
        throttle, client = auth_throttle(self), client_address(request)
        throttle.check(client)  # 429 while this address is over its failed authentications
        key = self.registry.check_key(token) if token else None
        if key is None:
            throttle.failed(client)
            hint = "tuneforge keys create --name OPS --admin" if admin else "tuneforge keys create --name APP"
            raise ApiError(401, f"missing, unknown or revoked API key ({hint})", "authentication_error")
        if admin and not key.admin:
            raise ApiError(403, f"key {key.name} is not an admin key (tuneforge keys create --admin)",
                           "permission_error")
        if not self.limiter.allow(key.id, key.requests_per_minute or self.cfg.requests_per_minute):
            raise ApiError(429, f"rate limit of key {key.name} reached; retry in a minute", "rate_limit_error")
        return key

    def authenticate_admin(self, request: Request) -> KeyInfo | None:
        return self.authenticate(request, admin=True)

    def model_name(self, model: str) -> str:
        """The name a key's scope lists: a route name, the base model's name, or the registry
        model of a reference. The base model is scoped like an adapter: a key calls it only when
        its models list base_name (or "*"), so a tenant's key sees and calls its own models only."""
        return model if model in self.cfg.routes or model == self.cfg.base_name else parse_ref(model)[0]

    def check_scope(self, key: KeyInfo | None, model: str) -> None:
        try:
            name = self.model_name(model)
        except RegistryError as e:  # e.g. "bot:2" for "bot:v2"
            raise ApiError(400, str(e)) from None
        if not may_call(key, name):
            raise ApiError(403, f"key {key.name} may not call '{name}' (allowed: {', '.join(key.models)})",
                           "permission_error")

    def model_ids(self, key: KeyInfo | None) -> list[str]:
        """Routes, model names, their aliases and versions that ``key`` may call."""
        ids = [self.cfg.base_name] if self.cfg.base_name else []
        ids += list(self.cfg.routes)
        for name in self.registry.models():
            ids += [name, *(f"{name}@{a}" for a in self.registry.aliases(name)),
                    *(v.ref for v in self.registry.versions(name))]
        return [i for i in ids if may_call(key, self.model_name(i))]

    # --- route --------------------------------------------------------------------------------
    def route(self, record: RequestRecord, user: str) -> Plan:
        p = plan(record.model, self.cfg.routes, user, self.registry.route_arms(record.model))
        record.route, record.arm = p.route, p.arm
        return p

    # --- generate -----------------------------------------------------------------------------
    async def generate(self, p: Plan, params: dict, record: RequestRecord,
                       check: Callable[[Chunk], str | None] | None = None, whole: bool = False
                       ) -> tuple[str, AsyncIterator[Chunk], Chunk]:
        """Try the plan's targets in order until one yields its first chunk within the timeout
        (and, when the route has guards, its whole output passes them): (version, the rest of
        the stream, the first chunk). ``check``: the request's own test of the whole output
        (a required tool call must be one valid call); a failure moves down the chain like a
        guard, and for a plain model name (no chain) is answered 422 when max_tokens cut the
        output short, else 500. ``whole`` (a JSON answer): the whole output must come within
        the target's timeout, else the next target is tried.

        An engine with ``admit`` (local) first says whether the target can answer within the
        timeout behind the work it has queued; refused, the next target is tried. When every
        target was refused the answer is 503 with Retry-After; when they timed out, 504."""
        reasons, unknown, failed_check, classes, retry = [], [], None, [], []

        def skip(target, why: str, reason_class: str) -> None:
            reasons.append(f"{target}: {why}")
            classes.append(reason_class)
            log.warning("fallback", extra={"request_id": record.request_id, "route": record.route,
                                           "target": str(target), "reason": reason_class, "detail": why})
            if record.route:  # a plain model name has no chain: its failure is an error, not a fallback
                metrics.FALLBACKS.labels(record.route, reason_class).inc()

        for target in p.targets:
            if isinstance(target, FixedReply):
                record.version, record.fallback_reason = FIXED_REPLY, "; ".join(reasons) or None
                return FIXED_REPLY, no_more(), Chunk(target.reply, "stop")
            try:
                try:
                    ref, req = self.request_for(target, params)
                except RegistryError as e:
                    unknown.append(str(e))
                    skip(target, str(e), "unknown_model")
                    continue
                deadline = time.monotonic() + self.cfg.timeout_s
                if hasattr(self.engine, "admit"):
                    self.engine.admit(req, self.cfg.timeout_s)
                first, stream = await self._first(req)
                if p.guards is not None or check is not None or whole:
                    # A guard judges the whole output, so it is generated (within the timeout)
                    # before anything is sent; a stream is then sent as one chunk.
                    rest = await asyncio.wait_for(collect(stream), max(0.0, deadline - time.monotonic()))
                    first, stream = joined(first, rest), no_more()
                    failed = p.guards and guard_failure(p.guards, first.text, record.json_requested)
                    if failed:
                        skip(target, f"guard {failed}", "guard_" + failed.split(":")[0])
                        continue
                    failed_check = check(first) if check is not None else None
                    if failed_check:
                        skip(target, failed_check, "tool_call")
                        continue
                record.version = ref
                record.fallback_reason = "; ".join(reasons) or None
                return ref, stream, first
            except PromptTooLong as e:
                raise ApiError(413, str(e)) from None  # the request is too long for any target
            except TimeoutError:
                skip(target, f"timed out after {self.cfg.timeout_s:g}s", "timeout")
            except Overloaded as e:
                retry.append(e.retry_after)
                skip(target, str(e), "overloaded")
            except Exception as e:  # noqa: BLE001 - any failure moves down the chain
                skip(target, f"{type(e).__name__}: {e}", "error")
        record.fallback_reason = "; ".join(reasons)
        raise _failure(p, record.fallback_reason, failed_check, unknown, classes, retry)

    def request_for(self, target: str, params: dict) -> tuple[str, GenRequest]:
        """(the version label that answers, the engine request): the base model alone under
        its own name, else a registry version (RegistryError when there is none)."""
        if self.cfg.base_name and target == self.cfg.base_name:
            return target, GenRequest(adapter=target, adapter_dir=None, base_model=self.cfg.base_model, **params)
        v = self.registry.resolve(target)
        return v.ref, gen_request(v, params)

    async def _first(self, req: GenRequest) -> tuple[Chunk, AsyncIterator[Chunk]]:
        stream = self.engine.stream(req).__aiter__()
        return await asyncio.wait_for(stream.__anext__(), self.cfg.timeout_s), stream

    async def preload(self) -> None:
        """Load the base model(s) and registered adapters (up to the engine's LRU bound) before
        /readyz says ready, so a balancer's first request does not spend its timeout loading."""
        if hasattr(self.engine, "load"):
            if self.cfg.base_name:
                try:
                    await self.engine.load(self.request_for(self.cfg.base_name, {})[1])
                except Exception as e:  # noqa: BLE001 - adapters on other bases may still serve
                    log.error("preload failed", extra={"version": self.cfg.base_name,
                                                       "error": f"{type(e).__name__}: {e}"})
            room = getattr(self.engine, "max_adapters", None)
            refs = [v for name in self.registry.models() for v in self.registry.versions(name)]
            for v in refs[:room] if room else refs:
                try:
                    await self.engine.load(gen_request(v, {}))
                except Exception as e:  # noqa: BLE001 - one broken run must not keep the server unready
                    log.error("preload failed", extra={"version": v.ref, "error": f"{type(e).__name__}: {e}"})
        self.ready = True
        log.info("ready", extra={"resident_adapters": self.resident()})

    def resident(self) -> list[str]:
        return self.engine.resident() if hasattr(self.engine, "resident") else []

    # --- log ----------------------------------------------------------------------------------
    def emit(self, record: RequestRecord, t0: float) -> None:
        """Once per request, whatever its outcome: metrics, a log line, the request hook."""
        record.latency_s = round(time.perf_counter() - t0, 4)
        metrics.observe(record)
        log.info("request", extra={
            "request_id": record.request_id, "endpoint": record.endpoint, "model": record.model,
            "route": record.route, "version": record.version, "arm": record.arm, "key_id": record.key_id,
            "status": record.status, "latency_s": record.latency_s, "stream": record.stream,
            "prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
            "fallback_reason": record.fallback_reason, "error": record.error})
        if self.on_request is not None:
            self.on_request(record)


def _failure(p: Plan, reasons: str, failed_check: str | None, unknown: list[str], classes: list[str],
             retry: list[int]) -> ApiError:
    """The error for a plan whose every target failed: 422/500 for a plain name's failed check,
    404 when no target exists, 503 + Retry-After when the engine refused every target as
    overloaded, 504 when they timed out (or were refused), else 503."""
    if failed_check and len(p.targets) == 1:
        cut = "max_tokens" in failed_check
        return ApiError(422 if cut else 500, failed_check, "invalid_request_error" if cut else "server_error")
    if len(unknown) == len(p.targets):
        return ApiError(404, "; ".join(unknown), "not_found_error")
    if classes and set(classes) == {"overloaded"}:
        err = ApiError(503, f"server overloaded, retry later: {reasons}", "server_error")
        err.retry_after = min(retry)  # the error handler sends it as Retry-After
        return err
    if "timeout" in classes and set(classes) <= {"timeout", "overloaded"}:
        return ApiError(504, f"timed out: {reasons}", "server_error")
    return ApiError(503, f"every target failed: {reasons}", "server_error")


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


async def no_more():
    return
    yield  # an async generator that yields nothing: the whole answer was in the first chunk


def joined(first: Chunk, rest: Chunk) -> Chunk:
    lps = None if first.logprobs is None and rest.logprobs is None else (first.logprobs or []) + (rest.logprobs or [])
    return Chunk(first.text + rest.text, rest.finish_reason or first.finish_reason,
                 rest.prompt_tokens or first.prompt_tokens, rest.completion_tokens or first.completion_tokens, lps)


def gen_request(v: VersionInfo, params: dict) -> GenRequest:
    return GenRequest(adapter=v.ref, adapter_dir=f"{v.run_dir}/adapter", base_model=v.base_model,
                      system_prompt=_system_prompt(v.run_dir), **params)


@lru_cache(maxsize=256)
def _system_prompt(run_dir: str) -> str | None:
    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    return (cfg.get("data") or {}).get("system_prompt")
