"""Encode a completion as OpenAI does: one JSON object (n choices, tool calls, logprobs, usage)
or server-sent events (content deltas, then tool_call deltas, a final chunk with the finish
reason, and with ``stream_options.include_usage`` a last chunk carrying usage)."""

from __future__ import annotations

import asyncio
import functools
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
    try:  # the gateway collected each choice within its timeout (generate's ``whole``): no waiting here
        rests = await asyncio.wait_for(asyncio.gather(*(collect(s) for _, s in choices)), gateway.cfg.timeout_s)
    except Exception as e:  # noqa: BLE001 - the first chunk came; a failure now cannot fall back
        late = isinstance(e, TimeoutError)
        record.status, record.error = (504, "timed out") if late else (500, f"{type(e).__name__}: {e}")
        gateway.emit(record, t0)
        err = ApiError(record.status, f"generation failed: {record.error}", "server_error")
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


def encode_stream(gateway: Gateway, record: RequestRecord, version: str,
                  choices: list[tuple[Chunk, AsyncIterator[Chunk]]], asked: Asked, t0: float) -> StreamingResponse:
    meta, headers = _meta(record, version)
    return StreamingResponse(_sse(gateway, record, version, meta, choices, asked, int(time.time()), t0),
                             media_type="text/event-stream", headers=headers)


async def _merged(choices: list[tuple[Chunk, AsyncIterator[Chunk]]]) -> AsyncIterator[tuple[int, Chunk]]:
    """(choice index, chunk) from every choice's stream as they come (n > 1 streams interleave)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def drain(i: int, stream: AsyncIterator[Chunk]) -> None:
        try:
            async for c in stream:
                await queue.put((i, c))
        except Exception as e:  # noqa: BLE001 - re-raised in the reader
            await queue.put((i, e))
        await queue.put((i, None))

    tasks = [asyncio.create_task(drain(i, s)) for i, (first, s) in enumerate(choices) if first.finish_reason is None]
    try:
        for _ in range(len(tasks)):
            while True:
                i, c = await queue.get()
                if c is None:
                    break
                if isinstance(c, Exception):
                    raise c
                yield i, c
    finally:
        for t in tasks:
            t.cancel()


async def _sse(gateway: Gateway, record: RequestRecord, version: str, meta: dict,
               choices: list[tuple[Chunk, AsyncIterator[Chunk]]], asked: Asked, created: int, t0: float):
    chat = record.endpoint == "chat"
    tools = [ToolStream(asked.tools) for _ in choices]
    offsets = [0] * len(choices)  # completions: text_offset of each choice's next token
    lasts = [first for first, _ in choices]

    def event(i: int, delta: dict | None = None, text: str = "", reason: str | None = None, lps=None,
              **extra) -> str:
        if chat:
            c = {"index": i, "delta": delta or {}, "logprobs": chat_logprobs(lps), "finish_reason": reason}
        else:
            c = {"index": i, "text": text, "logprobs": text_logprobs(lps, offsets[i]), "finish_reason": reason}
            offsets[i] += len(text)
        return "data: " + json.dumps({"id": record.request_id, "object": "chat.completion.chunk" if chat
                                      else "text_completion", "created": created, "model": version,
                                      "choices": [c], "tuneforge": meta} | extra) + "\n\n"

    def piece(i: int, c: Chunk, role: bool = False) -> str | None:
        text = tools[i].feed(c.text)  # completions: a ToolPlan without tools passes text through
        if not (role or text or c.logprobs):
            return None
        delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text else {})
        return event(i, delta, text, lps=c.logprobs)

    try:
        for out in (piece(i, first, role=chat) for i, (first, _) in enumerate(choices)):
            if out:
                yield out
        async for i, c in _merged(choices):
            lasts[i] = c
            out = piece(i, c)
            if out:
                yield out
        for i, last in enumerate(lasts):
            for ev in _ending(functools.partial(event, i), tools[i], last.finish_reason or "stop", chat, meta):
                yield ev
        if asked.include_usage:
            yield "data: " + json.dumps({"id": record.request_id, "object": "chat.completion.chunk" if chat
                                         else "text_completion", "created": created, "model": version,
                                         "choices": [], "usage": _usage(lasts[0].prompt_tokens, sum(
                                             c.completion_tokens for c in lasts))}) + "\n\n"
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, as OpenAI does
        record.status, record.error = 500, f"{type(e).__name__}: {e}"
        yield "data: " + json.dumps({"error": {"message": record.error, "type": "server_error"}}) + "\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        # The client disconnected (the server cancels or closes this generator); leaving here
        # closes the engine streams (_merged), which cancels their generation.
        record.status, record.error = 499, "client disconnected"
        gateway.emit(record, t0)
        raise
    record.prompt_tokens, record.completion_tokens = lasts[0].prompt_tokens, sum(c.completion_tokens for c in lasts)
    record.response, record.finish_reason = tools[0].text, lasts[0].finish_reason
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
