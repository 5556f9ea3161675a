"""The OpenAI inference surface: /v1/chat/completions, /v1/completions, /v1/models.

Each completion is three steps (litgpt's LitAPI): ``decode`` the body into a request record
and what it asks for (tools, grammar, logprobs, n; refusing by name what cannot be honoured,
api.py), ``predict`` through the gateway (authenticate, route, generate n choices), ``encode``
the answer as one JSON object or as server-sent events (tool calls and logprobs in OpenAI's
shape: tool_calls.py, encode.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Request, Response

from tuneforge.data.errors import RowError
from tuneforge.data.images import check_image
from tuneforge.deploy.api import ChatRequest, CompletionRequest, refusals
from tuneforge.deploy.encode import Asked, encode_json, encode_stream
from tuneforge.deploy.engines import Chunk, cut_at_stop
from tuneforge.deploy.gateway import Gateway, new_id
from tuneforge.deploy.grammar import GrammarError, check_grammar, json_grammar
from tuneforge.deploy.tool_calls import ToolPlan, history
from tuneforge.models.vision import is_vision_model
from tuneforge.production.http import ApiError, RequestRecord


def chat_router(gateway: Gateway) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def models(request: Request):
        key = gateway.authenticate(request)
        base = gateway.cfg.base_name
        data = [{"id": i, "object": "model", "owned_by": "tuneforge"}
                | ({"tuneforge": {"base": True, "model": gateway.cfg.base_model}} if i == base else {})
                for i in gateway.model_ids(key)]
        return {"object": "list", "data": data}

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        return await complete(gateway, request, body, "chat")

    @router.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await complete(gateway, request, body, "completion")

    return router


async def complete(gateway: Gateway, request: Request, body: ChatRequest | CompletionRequest, endpoint: str):
    """Answer the request; a client that disconnects before its answer (or its stream) starts
    cancels the work (its queued job is dropped, its batch row stops: admission.py) and is
    logged as status 499."""
    t0 = time.perf_counter()
    record = decode(body, endpoint)
    work = asyncio.ensure_future(_complete(gateway, request, body, record, t0))
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # The handler itself is cancelled: the server is past its shutdown grace. The generation
        # is this handler's child and goes with it; left running it kept the engine (and the
        # server's exit) busy until it finished, minutes for a long answer.
        work.cancel()
        raise
    finally:
        gone.cancel()
    if work.done():
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    record.status, record.error = 499, "client disconnected"
    gateway.emit(record, t0)
    return Response(status_code=499)


async def disconnected(request: Request, every_s: float = 1.0) -> None:
    """Return once the client has disconnected (polled: the ASGI server reports it only when asked;
    seldom, as every wake-up takes the GIL from the engine's decode loop)."""
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)


async def _complete(gateway: Gateway, request: Request, body: ChatRequest | CompletionRequest,
                    record: RequestRecord, t0: float):
    try:
        asked = decode_asked(body, record, getattr(gateway.engine, "SUPPORTS", frozenset()))
        version, choices = await predict(gateway, request, body, record, asked)
    except ApiError as e:
        record.status, record.error = e.status, e.message
        e.request_id = record.request_id
        gateway.emit(record, t0)
        raise
    if body.stream:
        return encode_stream(gateway, record, version, choices, asked, t0)
    return await encode_json(gateway, record, version, choices, asked, t0)


# --- decode -----------------------------------------------------------------------------------
def decode(body: ChatRequest | CompletionRequest, endpoint: str) -> RequestRecord:
    chat = endpoint == "chat"
    fmt = body.response_format if chat else None
    return RequestRecord(endpoint=endpoint, model=body.model, stream=bool(body.stream), request_id=new_id(chat),
                         user=body.user or None,
                         messages=[m.model_dump(exclude_none=True) for m in body.messages] if chat else None,
                         prompt=None if chat else body.prompt,
                         json_requested=fmt is not None and fmt.type in ("json_object", "json_schema"))


def decode_asked(body: ChatRequest | CompletionRequest, record: RequestRecord, supports: frozenset) -> Asked:
    """Tools, grammar, logprobs, n; a 400 naming each field that cannot be honoured."""
    refused = refusals(body)
    if refused:
        raise ApiError(400, "; ".join(f"'{name}' is not supported: {why}" for name, why in refused),
                       param=refused[0][0])
    chat = record.endpoint == "chat"
    plan = ToolPlan.of(body) if chat else ToolPlan()
    grammar = plan.grammar
    fmt = body.response_format if chat else None
    if fmt is not None and fmt.type != "text":
        if plan.grammar is not None:
            raise ApiError(400, "response_format and a required tool call cannot both constrain the output",
                           param="response_format")
        if fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema_ is None):
            raise ApiError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        grammar = json_grammar(fmt.json_schema.schema_ if fmt.type == "json_schema" else None)
        try:
            check_grammar(grammar)
        except GrammarError as e:
            raise ApiError(400, f"response_format.json_schema.schema cannot be enforced: {e}",
                           param="response_format") from None
    logprobs = (body.top_logprobs or 0) if chat and body.logprobs else (None if chat else body.logprobs)
    if chat and body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    used = {"tools": plan.tools is not None, "tool_choice": plan.grammar is not None,
            "response_format": grammar is not None and plan.grammar is None, "logprobs": logprobs is not None}
    for field in (f for f, on in used.items() if on and f not in supports):
        have = ", ".join(sorted(supports)) or "none of tools, tool_choice, response_format, logprobs"
        raise ApiError(400, f"'{field}' is not supported by this server's engine (it supports: {have})", param=field)
    return Asked(plan, grammar, logprobs, body.n or 1,
                 bool(body.stream_options and body.stream_options.include_usage))


def _bases(gateway: Gateway, p) -> list[str]:
    """The base model of each target the plan may try (targets that do not resolve are left to
    the gateway, which reports them)."""
    out = []
    for target in (t for t in p.targets if isinstance(t, str)):
        try:
            out.append(gateway.request_for(target, {})[1].base_model)
        except Exception:  # noqa: BLE001 - an unknown target is the gateway's error to report
            continue
    return list(dict.fromkeys(b for b in out if b))


def check_content_parts(record: RequestRecord, bases, supports: frozenset) -> bool:
    """Whether the chat carries images, each checked: an ``image_url`` part needs a vision-language
    base (a text-only one would answer without seeing it: 400, with the reason) and an engine that
    takes images, and its url must be a data: URI of an image Pillow reads (nothing is fetched,
    no server file is read). Any other non-text part is refused by name."""
    found, text_only = False, None
    for i, m in enumerate(record.messages or []):
        content = m.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            kind, where = part.get("type"), f"messages.{i}.content.{j}"
            if kind == "text":
                continue
            if kind != "image_url":
                raise ApiError(400, f"content part type {kind!r} is not supported (text, image_url)", param=where)
            text_only = [b for b in bases() if not is_vision_model(b)] if text_only is None else text_only
            if text_only:
                raise ApiError(400, f"image content parts need a vision-language base; '{record.model}' is served "
                                    f"by the text-only base '{text_only[0]}', which would answer without seeing "
                                    f"the image (send text only, or ask for a vision-language model)", param=where)
            if "images" not in supports:
                raise ApiError(400, "this server's engine does not take images (the local engine does)", param=where)
            if m.get("role") != "user":
                raise ApiError(400, "images go in user messages", param=where)
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url.startswith("data:"):
                raise ApiError(400, "image_url.url must be a data: URI (data:image/png;base64,...): the server "
                                    "fetches no URL and reads no file of its own", param=f"{where}.image_url.url")
            try:
                part["image_url"] = {"url": check_image(url, where, Path("."))}
            except RowError as e:
                raise ApiError(400, e.reason, param=f"{where}.image_url.url") from None
            found = True
    return found


def generation_params(body: ChatRequest | CompletionRequest, record: RequestRecord, asked: Asked,
                      max_tokens: int, images: bool = False) -> dict:
    chat = record.endpoint == "chat"
    asked_tokens = body.max_tokens or (body.max_completion_tokens if chat else None) or 128
    return dict(messages=history(record.messages, images) if chat else None, prompt=None if chat else body.prompt,
                max_tokens=min(asked_tokens, max_tokens), temperature=body.temperature or 0.0,
                top_p=body.top_p or 1.0, seed=body.seed, tools=asked.tools.tools, grammar=asked.grammar,
                logprobs=asked.logprobs,
                passthrough={"tool_choice": _dump(body.tool_choice), "parallel_tool_calls": body.parallel_tool_calls}
                if chat and asked.tools.tools else None,
                response_format=body.response_format.model_dump(by_alias=True, exclude_none=True)
                if chat and body.response_format is not None and asked.tools.grammar is None else None)


def _dump(value):
    return value.model_dump() if hasattr(value, "model_dump") else value


SESSION_HEADER = "X-Session-Id"


# --- predict ----------------------------------------------------------------------------------
async def predict(gateway: Gateway, request: Request, body, record: RequestRecord, asked: Asked
                  ) -> tuple[str, list[tuple[Chunk, AsyncIterator[Chunk]]]]:
    """(version that answers, each choice's first chunk and the rest of its stream)."""
    key = gateway.authenticate(request)
    record.key_id = key.id if key else None
    gateway.check_scope(key, record.model)
    # The A/B arm sticks to the user: the `user` field, else a session header (apps without
    # user ids, on an open server or one shared key), else the key; with none, each request
    # draws its arm afresh.
    user = str(body.user or request.headers.get(SESSION_HEADER) or (key.id if key else "") or uuid.uuid4())
    p = gateway.route(record, user)
    images = check_content_parts(record, lambda: _bases(gateway, p), getattr(gateway.engine, "SUPPORTS", frozenset()))
    params = generation_params(body, record, asked, gateway.cfg.max_tokens, images)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or "" in stops:
        raise ApiError(400, "'stop' takes up to 4 non-empty strings")

    def check(out: Chunk) -> str | None:  # a required call must be one valid call
        if out.finish_reason == "grammar_error":
            return "the output could not follow its grammar"
        return asked.tools.failure(out.text, out.finish_reason or "stop")

    async def one(i: int) -> tuple[str, Chunk, AsyncIterator[Chunk]]:
        seeded = params | {"seed": params["seed"] + i} if params["seed"] is not None and i else params
        version, stream, first = await gateway.generate(p, seeded, record, check if asked.grammar else None,
                                                        whole=not body.stream)
        if stops:
            stream = cut_at_stop(_chain(first, stream), stops)
            first = await stream.__anext__()
        return version, first, stream

    out = await asyncio.gather(*(one(i) for i in range(asked.n)))  # n rows batch together in the engine
    return out[0][0], [(first, stream) for _, first, stream in out]


async def _chain(first: Chunk, rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    yield first
    if first.finish_reason is None:
        async for c in rest:
            yield c
