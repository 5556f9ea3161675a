"""The OpenAI inference surface: /v1/chat/completions, /v1/completions, /v1/models.

Each completion is three steps (litgpt's LitAPI): ``decode`` the body into a request record
and generation parameters, ``predict`` through the gateway (authenticate, route, generate),
``encode`` the answer as one JSON object or as server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tuneforge.deploy.api import ChatRequest, CompletionRequest
from tuneforge.deploy.engines import Chunk, collect, cut_at_stop
from tuneforge.deploy.gateway import Gateway, joined, new_id
from tuneforge.production.http import ApiError, RequestRecord


def chat_router(gateway: Gateway) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def models(request: Request):
        ids = gateway.model_ids(gateway.authenticate(request))
        return {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "tuneforge"} for i in ids]}

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        return await complete(gateway, request, body, "chat")

    @router.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await complete(gateway, request, body, "completion")

    return router


async def complete(gateway: Gateway, request: Request, body: ChatRequest | CompletionRequest, endpoint: str):
    t0 = time.perf_counter()
    record = decode(body, endpoint)
    try:
        version, first, stream = await predict(gateway, request, body, record)
    except ApiError as e:
        record.status, record.error = e.status, e.message
        e.request_id = record.request_id
        gateway.emit(record, t0)
        raise
    if body.stream:
        return encode_stream(gateway, record, version, first, stream, t0)
    return await encode_json(gateway, record, version, first, stream, t0)


# --- decode -----------------------------------------------------------------------------------
def decode(body: ChatRequest | CompletionRequest, endpoint: str) -> RequestRecord:
    chat = endpoint == "chat"
    fmt = body.response_format if chat else None
    return RequestRecord(endpoint=endpoint, model=body.model, stream=bool(body.stream), request_id=new_id(chat),
                         user=body.user or None,
                         messages=[m.model_dump(exclude_none=True) for m in body.messages] if chat else None,
                         prompt=None if chat else body.prompt,
                         json_requested=fmt is not None and fmt.type in ("json_object", "json_schema"))


def generation_params(body: ChatRequest | CompletionRequest, record: RequestRecord, max_tokens: int) -> dict:
    chat = record.endpoint == "chat"
    asked = body.max_tokens or (body.max_completion_tokens if chat else None) or 128
    return dict(messages=_text_messages(record.messages) if chat else None, prompt=None if chat else body.prompt,
                max_tokens=min(asked, max_tokens), temperature=body.temperature or 0.0,
                top_p=body.top_p or 1.0, seed=body.seed)


def _text_messages(messages: list) -> list[dict]:
    """OpenAI content may be a list of parts; the chat template wants one string per message."""
    out = []
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append({"role": m["role"], "content": content})
    return out


# --- predict ----------------------------------------------------------------------------------
async def predict(gateway: Gateway, request: Request, body, record: RequestRecord
                  ) -> tuple[str, Chunk, AsyncIterator[Chunk]]:
    """(version that answers, its first chunk, the rest of its stream)."""
    key = gateway.authenticate(request)
    record.key_id = key.id if key else None
    gateway.check_scope(key, record.model)
    user = str(body.user or (key.id if key else "") or uuid.uuid4())  # the A/B arm sticks to it
    p = gateway.route(record, user)
    params = generation_params(body, record, gateway.cfg.max_tokens)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or "" in stops:
        raise ApiError(400, "'stop' takes up to 4 non-empty strings")
    version, stream, first = await gateway.generate(p, params, record)
    if stops:
        stream = cut_at_stop(_chain(first, stream), stops)
        first = await stream.__anext__()
    return version, first, stream


async def _chain(first: Chunk, rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    yield first
    if first.finish_reason is None:
        async for c in rest:
            yield c


# --- encode -----------------------------------------------------------------------------------
def _meta(record: RequestRecord, version: str) -> tuple[dict, dict]:
    """Which version and arm served it: the ``tuneforge`` field and the X-Tuneforge-* headers."""
    meta = {"version": version, "arm": record.arm, "route": record.route, "fallback": record.fallback_reason}
    headers = {"X-Tuneforge-Version": version, "X-Tuneforge-Arm": record.arm or "",
               "X-Tuneforge-Fallback": record.fallback_reason or "", "X-Request-Id": record.request_id}
    return meta, headers


async def encode_json(gateway: Gateway, record: RequestRecord, version: str, first: Chunk,
                      stream: AsyncIterator[Chunk], t0: float) -> JSONResponse:
    chat, rid = record.endpoint == "chat", record.request_id
    meta, headers = _meta(record, version)
    created = int(time.time())
    try:
        rest = await asyncio.wait_for(collect(stream), gateway.cfg.timeout_s)
    except Exception as e:  # noqa: BLE001 - the first chunk came; a failure now cannot fall back
        record.status, record.error = 500, f"{type(e).__name__}: {e}"
        gateway.emit(record, t0)
        err = ApiError(500, f"generation failed: {record.error}", "server_error")
        err.request_id = rid
        raise err from None
    out = joined(first, rest)
    record.prompt_tokens, record.completion_tokens = out.prompt_tokens, out.completion_tokens
    record.response, record.finish_reason = out.text, out.finish_reason
    gateway.emit(record, t0)
    choice = ({"index": 0, "message": {"role": "assistant", "content": out.text}} if chat
              else {"index": 0, "text": out.text, "logprobs": None})
    return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                         "created": created, "model": version,
                         "choices": [choice | {"finish_reason": out.finish_reason}],
                         "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                                   "total_tokens": out.prompt_tokens + out.completion_tokens},
                         "tuneforge": meta}, headers=headers)


def encode_stream(gateway: Gateway, record: RequestRecord, version: str, first: Chunk,
                  stream: AsyncIterator[Chunk], t0: float) -> StreamingResponse:
    meta, headers = _meta(record, version)
    return StreamingResponse(_sse(gateway, record, version, meta, first, stream, int(time.time()), t0),
                             media_type="text/event-stream", headers=headers)


async def _sse(gateway: Gateway, record: RequestRecord, version: str, meta: dict, first: Chunk,
               stream: AsyncIterator[Chunk], created: int, t0: float):
    chat = record.endpoint == "chat"

    def event(c: Chunk, role: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": c.text} if c.text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": c.finish_reason}
        else:
            choice = {"index": 0, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
        return "data: " + json.dumps({"id": record.request_id,
                                      "object": "chat.completion.chunk" if chat else "text_completion",
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
    gateway.emit(record, t0)
    yield "data: [DONE]\n\n"
