"""The vllm engine: forwards each request to a vLLM OpenAI-compatible server (started with
--enable-lora and one --lora-modules NAME:vN=RUN_DIR/adapter per version; vllm_launch.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx

from tuneforge.data.render import with_system
from tuneforge.data.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from tuneforge.deploy.engines import Chunk, EngineError, GenRequest


def _vllm_logprobs(lp: dict | None) -> list[dict]:
    """vLLM's logprobs of one streamed choice as OpenAI chat entries (chat: ``content`` already
    is; completions: parallel ``tokens``/``token_logprobs``/``top_logprobs`` lists)."""
    if not lp:
        return []
    if "content" in lp:
        return list(lp["content"] or [])
    tops = lp.get("top_logprobs") or [None] * len(lp.get("tokens") or [])
    return [{"token": t, "logprob": v, "bytes": list(t.encode()),
             "top_logprobs": [{"token": k, "logprob": x, "bytes": list(k.encode())} for k, x in (top or {}).items()]}
            for t, v, top in zip(lp.get("tokens") or [], lp.get("token_logprobs") or [], tops, strict=False)]


def _block(name: str, arguments: str) -> str:
    try:
        args = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        args = arguments  # parse_tool_calls reports it as a call whose arguments are not JSON
    return "\n" + TOOL_CALL_OPEN + "\n" + json.dumps({"name": name, "arguments": args}) + "\n" + TOOL_CALL_CLOSE


class VLLMEngine:
    """``process``: the vLLM server tuneforge launched (stopped on close), or None for a URL.

    ``SUPPORTS``: what chat.py may ask of it; logprobs and response_format pass through to vLLM
    (which computes and enforces them itself). Tools pass through only with ``tools=True``
    (serve.yaml ``engine.vllm_tools``: vLLM was started with ``--enable-auto-tool-choice
    --tool-call-parser NAME``, so it renders them with the model's template, parses the calls
    and constrains a required one); its calls come back as ``<tool_call>`` blocks that chat.py
    parses like the local engine's. Without it tools are refused (400): vLLM renders tools only
    with templates that know them (SmolLM2's does not) and parses calls only with a tool parser."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 60, process=None,
                 tools: bool = False):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.process = process
        self.SUPPORTS = frozenset({"logprobs", "response_format"} | ({"tools", "tool_choice"} if tools else set()))

    def body(self, req: GenRequest) -> tuple[str, dict]:
        """(path, JSON body) of the vLLM request."""
        body = {"model": req.adapter, "max_tokens": req.max_tokens, "temperature": req.temperature,
                "top_p": req.top_p, "stream": True, "stream_options": {"include_usage": True}}
        if req.seed is not None:
            body["seed"] = req.seed
        if req.tools and "tools" not in self.SUPPORTS:  # chat.py refuses them for this engine
            raise EngineError("this vLLM engine does not take tools (engine.vllm_tools is off)")
        chat = req.messages is not None
        if chat:
            path, body["messages"] = "/v1/chat/completions", with_system(req.messages, req.system_prompt)
            body |= {k: v for k, v in (req.passthrough or {}).items() if v is not None}  # tool_choice ...
            if req.tools:
                body["tools"] = req.tools
            if req.response_format is not None:  # vLLM's own structured output enforces it
                body["response_format"] = req.response_format
        else:
            path, body["prompt"] = "/v1/completions", req.prompt
        if req.logprobs is not None:  # vLLM computes them itself: passed through
            body |= {"logprobs": True, "top_logprobs": req.logprobs} if chat else {"logprobs": req.logprobs}
        return path, body

    async def stream(self, req: GenRequest) -> AsyncIterator[Chunk]:
        path, body = self.body(req)
        finish, usage, calls = None, {}, {}  # calls: index -> [name, arguments text]
        async with self.client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                raise EngineError(f"vLLM answered {resp.status_code}: {(await resp.aread())[:300]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                event = json.loads(line[5:])
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    text = choice.get("text") or delta.get("content") or ""
                    finish = choice.get("finish_reason") or finish
                    for tc in delta.get("tool_calls") or []:
                        fn = tc.get("function") or {}
                        call = calls.setdefault(tc.get("index", 0), ["", ""])
                        call[0] += fn.get("name") or ""
                        call[1] += fn.get("arguments") or ""
                    if text:
                        yield Chunk(text, logprobs=_vllm_logprobs(choice.get("logprobs"))
                                    if req.logprobs is not None else None)
        if calls:  # as the text the local engine's model writes; chat.py parses it back into tool_calls
            yield Chunk("".join(_block(name, args) for _, (name, args) in sorted(calls.items())))
            finish = "stop" if finish == "tool_calls" else finish
        yield Chunk("", finish or "stop", usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))

    async def close(self) -> None:
        await self.client.aclose()
        if self.process is not None:
            await asyncio.to_thread(self.process.stop)
