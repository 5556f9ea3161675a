"""Encode a completion as OpenAI does: one JSON object (n choices, tool calls, logprobs, usage)
or server-sent events (content deltas, then tool_call deltas, a final chunk with the finish
reason, and with ``stream_options.include_usage`` a last chunk carrying usage)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.responses import JSONResponse, StreamingResponse

from tuneforge.deploy.engines import Chunk, collect
from tuneforge.deploy.gateway import Gateway, joined
from tuneforge.deploy.tool_calls import ToolPlan, ToolStream
from tuneforge.production.http import ApiError, RequestRecord


@dataclass
class Asked:
    """What a request asks of the engine beyond its text (decoded once, used by every step)."""

    tools: ToolPlan
    grammar: str | None = None  # the output's grammar (a required call's, or response_format's)
    logprobs: int | None = None  # None: no logprobs; k: with the k most likely alternatives
    n: int = 1
    include_usage: bool = False


def _meta(record: RequestRecord, version: str) -> tuple[dict, dict]:
    """Which version and arm served it: the ``tuneforge`` field and the X-Tuneforge-* headers."""
    meta = {"version": version, "arm": record.arm, "route": record.route, "fallback": record.fallback_reason}
    headers = {"X-Tuneforge-Version": version, "X-Tuneforge-Arm": record.arm or "",
               "X-Tuneforge-Fallback": record.fallback_reason or "", "X-Request-Id": record.request_id}
    return meta, headers


def chat_logprobs(entries: list[dict] | None) -> dict | None:
    return None if entries is None else {"content": entries, "refusal": None}


def text_logprobs(entries: list[dict] | None, offset: int = 0) -> dict | None:
    """The completions endpoint's (legacy) shape: parallel lists."""
    if entries is None:
        return None
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def encode_json(gateway: Gateway, record: RequestRecord, version: str,
                      choices: list[tuple[Chunk, AsyncIterator[Chunk]]], asked: Asked, t0: float) -> JSONResponse:
    chat, rid = record.endpoint == "chat", record.request_id
    meta, headers = _meta(record, version)
    created = int(time.time())
    try:
        rests = await asyncio.wait_for(asyncio.gather(*(collect(s) for _, s in choices)), gateway.cfg.timeout_s)
    except Exception as e:  # noqa: BLE001 - the first chunk came; a failure now cannot fall back
        record.status, record.error = 500, f"{type(e).__name__}: {e}"
        gateway.emit(record, t0)
        err = ApiError(500, f"generation failed: {record.error}", "server_error")
        err.request_id = rid
        raise err from None
    outs = [joined(first, rest) for (first, _), rest in zip(choices, rests, strict=True)]
    body_choices, errors = [], {}
    for i, out in enumerate(outs):
        if chat:
            message, reason, errs = asked.tools.reply(out.text, out.finish_reason)
            if errs:
                errors[i] = errs
            body_choices.append({"index": i, "message": message, "logprobs": chat_logprobs(out.logprobs),
                                 "finish_reason": reason})
        else:
            body_choices.append({"index": i, "text": out.text, "logprobs": text_logprobs(out.logprobs),
                                 "finish_reason": out.finish_reason})
    completion = sum(o.completion_tokens for o in outs)
    record.prompt_tokens, record.completion_tokens = outs[0].prompt_tokens, completion
    record.response, record.finish_reason = outs[0].text, body_choices[0]["finish_reason"]
    gateway.emit(record, t0)
    if errors:  # auto tool calls that did not parse: returned as content, said here
        meta = meta | {"tool_call_errors": errors[0] if list(errors) == [0] and len(outs) == 1 else errors}
    return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                         "created": created, "model": version, "choices": body_choices,
                         "usage": _usage(outs[0].prompt_tokens, completion), "tuneforge": meta}, headers=headers)


def encode_stream(gateway: Gateway, record: RequestRecord, version: str, choice: tuple[Chunk, AsyncIterator[Chunk]],
                  asked: Asked, t0: float) -> StreamingResponse:
    meta, headers = _meta(record, version)
    return StreamingResponse(_sse(gateway, record, version, meta, choice, asked, int(time.time()), t0),
                             media_type="text/event-stream", headers=headers)


async def _sse(gateway: Gateway, record: RequestRecord, version: str, meta: dict,
               choice: tuple[Chunk, AsyncIterator[Chunk]], asked: Asked, created: int, t0: float):
    chat = record.endpoint == "chat"
    first, stream = choice
    tools = ToolStream(asked.tools)
    offset = 0  # completions: text_offset of the chunk's first token

    def event(delta: dict | None = None, text: str = "", reason: str | None = None, lps=None, **extra) -> str:
        nonlocal offset
        if chat:
            c = {"index": 0, "delta": delta or {}, "logprobs": chat_logprobs(lps), "finish_reason": reason}
        else:
            c = {"index": 0, "text": text, "logprobs": text_logprobs(lps, offset), "finish_reason": reason}
            offset += len(text)
        return "data: " + json.dumps({"id": record.request_id, "object": "chat.completion.chunk" if chat
                                      else "text_completion", "created": created, "model": version,
                                      "choices": [c], "tuneforge": meta} | extra) + "\n\n"

    def piece(c: Chunk, role: bool = False) -> str | None:
        text = tools.feed(c.text)  # completions: a ToolPlan without tools passes text through
        if not (role or text or c.logprobs):
            return None
        delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text else {})
        return event(delta, text, lps=c.logprobs)

    last = first
    try:
        for c in [first]:
            out = piece(c, role=chat)
            if out:
                yield out
        if first.finish_reason is None:
            async for c in stream:
                last = c
                out = piece(c)
                if out:
                    yield out
        for ev in _ending(event, tools, last.finish_reason or "stop", chat, meta):
            yield ev
        if asked.include_usage:
            yield "data: " + json.dumps({"id": record.request_id, "object": "chat.completion.chunk" if chat
                                         else "text_completion", "created": created, "model": version,
                                         "choices": [], "usage": _usage(last.prompt_tokens,
                                                                        last.completion_tokens)}) + "\n\n"
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, as OpenAI does
        record.status, record.error = 500, f"{type(e).__name__}: {e}"
        yield "data: " + json.dumps({"error": {"message": record.error, "type": "server_error"}}) + "\n\n"
    record.prompt_tokens, record.completion_tokens = last.prompt_tokens, last.completion_tokens
    record.response, record.finish_reason = tools.text, last.finish_reason
    gateway.emit(record, t0)
    yield "data: [DONE]\n\n"


def _ending(event, tools: ToolStream, finish_reason: str, chat: bool, meta: dict) -> list[str]:
    """Held content, one delta per tool call (name first, then arguments), the finish chunk."""
    if not chat:
        return [event(reason=finish_reason)]
    rest, calls, reason = tools.finish(finish_reason)
    out = [event({"content": rest})] if rest else []
    for c in calls:
        fn = c["function"]
        out.append(event({"tool_calls": [{"index": c["index"], "id": c["id"], "type": "function",
                                          "function": {"name": fn["name"], "arguments": ""}}]}))
        out.append(event({"tool_calls": [{"index": c["index"], "function": {"arguments": fn["arguments"]}}]}))
    extra = {"tuneforge": meta | {"tool_call_errors": tools.errors}} if tools.errors else {}
    out.append(event(reason=reason, **extra))
    return out
