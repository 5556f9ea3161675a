"""Tool calling on /v1/chat/completions: OpenAI's request fields in, OpenAI's ``tool_calls`` out.

The prompt is rendered by ``data.tools.chat_ids`` (in the engine) exactly as in training; the
model's text is read back by ``data.tools.parse_tool_calls``. This module is the OpenAI side:

- ``ToolPlan.of(body)``: which tools are rendered, which names may be called, and the grammar
  of a required call (``tool_choice`` "required" or a named function: exactly one
  ``<tool_call>`` block whose JSON matches ``data.tools.call_schema``, then eos);
  ``tool_choice`` "none": tools are not rendered and nothing is parsed (OpenAI's "none" means
  the model must not call; not showing them is how a small model reliably does not);
- ``history``: OpenAI messages -> canonical rows (arguments strings -> dicts);
- ``reply``: a finished text -> (message, finish_reason, errors); ``ToolStream``: the same,
  incrementally, for server-sent events (content deltas until ``<tool_call>`` opens, then
  held; at the end one delta per call: index, id, type, name, arguments).

With ``auto``, a block that does not parse (not JSON, unknown function) is returned in
``content`` and described in the response's ``tuneforge.tool_call_errors``; it never fails the
request. With ``parallel_tool_calls: false`` only the first call is kept (the others are
reported in ``tool_call_errors``).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from tuneforge.data.tools import TOOL_CALL_OPEN, call_schema, parse_tool_calls
from tuneforge.deploy.grammar import GrammarError, check_grammar, tool_call_grammar
from tuneforge.production.http import ApiError


@dataclass
class ToolPlan:
    tools: list[dict] | None = None  # rendered into the prompt
    names: set[str] | None = None  # parsed calls must name one of these (None: no parsing)
    grammar: str | None = None  # a required call's grammar
    parallel: bool = True
    choice: str = "none"  # none | auto | required (a named function counts as required)

    @classmethod
    def of(cls, body) -> ToolPlan:
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        choice = body.tool_choice
        if not tools:
            if choice not in (None, "none"):
                raise ApiError(400, "tool_choice needs tools", param="tool_choice")
            if body.parallel_tool_calls is not None:
                raise ApiError(400, "parallel_tool_calls needs tools", param="parallel_tool_calls")
            return cls()
        names = [t["function"]["name"] for t in tools]
        if len(set(names)) < len(names):
            raise ApiError(400, "tools: two functions have the same name", param="tools")
        parallel = body.parallel_tool_calls is not False
        if choice == "none":
            return cls(choice="none")
        if choice in (None, "auto"):
            return cls(tools, set(names), parallel=parallel, choice="auto")
        wanted = set(names) if choice == "required" else {choice.function.name}
        if not wanted <= set(names):
            raise ApiError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                           param="tool_choice")
        grammar = tool_call_grammar(call_schema(tools, wanted))
        try:
            check_grammar(grammar)
        except GrammarError as e:
            raise ApiError(400, f"the parameters of the tools cannot be enforced for tool_choice: {e}",
                           param="tools") from None
        return cls(tools, wanted, grammar, parallel, "required")

    def reply(self, text: str, finish_reason: str) -> tuple[dict, str, list[str]]:
        """(message, finish_reason, errors) for a finished text."""
        if self.names is None:
            return {"role": "assistant", "content": text}, finish_reason, []
        content, calls, errors = parse_tool_calls(text, self.names)
        if not self.parallel and len(calls) > 1:
            errors.append(f"parallel_tool_calls is false: {len(calls) - 1} more call(s) dropped")
            calls = calls[:1]
        if not calls:
            return {"role": "assistant", "content": text}, finish_reason, errors
        return ({"role": "assistant", "content": content or None, "tool_calls": openai_calls(calls)},
                "tool_calls", errors)

    def failure(self, text: str, finish_reason: str) -> str | None:
        """Why a required call's output is not one valid call (None: it is)."""
        if self.choice != "required":
            return None
        _, calls, errors = parse_tool_calls(text, self.names)
        if calls and not errors:
            return None
        if finish_reason == "length":
            return "the required tool call was cut off at max_tokens before it was complete (raise max_tokens)"
        return "the output is not a valid call: " + ("; ".join(errors) or "no <tool_call> block")


def openai_calls(calls: list[dict]) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def history(messages: list[dict], images: bool = False) -> list[dict]:
    """OpenAI messages as canonical rows (SPEC.md): text content, arguments as dicts. With
    ``images`` (a vision-language base; chat.py has checked every image part) a content with
    image parts stays a list of text and ``{"type": "image", "image": data-URI}`` parts."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") or ""
        if images and isinstance(content, list) and any(p.get("type") == "image_url" for p in content):
            content = [{"type": "image", "image": p["image_url"]["url"]} if p.get("type") == "image_url"
                       else {"type": "text", "text": p.get("text") or ""} for p in content]
        elif isinstance(content, list):  # content parts: text only here (chat.py refuses any other part)
            content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
        row = {"role": m["role"], "content": content}
        if m["role"] == "assistant" and m.get("tool_calls"):
            row["tool_calls"] = [_call(i, j, c) for j, c in enumerate(m["tool_calls"])]
        if m["role"] == "tool":
            row |= {k: m[k] for k in ("tool_call_id", "name") if m.get(k)}
        out.append(row)
    return out


def _call(i: int, j: int, c: dict) -> dict:
    args = c["function"]["arguments"]
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ApiError(400, f"arguments are not JSON ({e.msg})",
                           param=f"messages.{i}.tool_calls.{j}.function.arguments") from None
    if not isinstance(args, dict):
        raise ApiError(400, "arguments must be a JSON object", param=f"messages.{i}.tool_calls.{j}.function.arguments")
    return {"id": c.get("id") or f"call_{j}", "type": "function",
            "function": {"name": c["function"]["name"], "arguments": args}}


@dataclass
class ToolStream:
    """Server-sent deltas for one choice: content streams until a ``<tool_call>`` may be opening
    (or the reply starts with ``{``, a possible bare call), then the rest is held and parsed at
    the end."""

    plan: ToolPlan
    text: str = ""
    sent: int = 0  # characters of ``text`` already sent as content
    holding: bool = False
    errors: list[str] = field(default_factory=list)

    def feed(self, piece: str) -> str:
        """Content that may be sent now."""
        self.text += piece
        if self.plan.names is None:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        if not self.holding:
            at = self.text.find(TOOL_CALL_OPEN, self.sent)
            if at >= 0 or self.text.lstrip().startswith("{"):
                self.holding = True
            else:  # keep back what could be the start of "<tool_call>"
                safe = len(self.text)
                for k in range(1, len(TOOL_CALL_OPEN)):
                    if self.text.endswith(TOOL_CALL_OPEN[:k]):
                        safe = len(self.text) - k
                out, self.sent = self.text[self.sent:safe], safe
                return out
        return ""

    def finish(self, finish_reason: str) -> tuple[str, list[dict], str]:
        """(content not sent yet, tool_call deltas, finish_reason) at the end of the stream."""
        message, reason, self.errors = self.plan.reply(self.text, finish_reason)
        calls = message.get("tool_calls") or []
        if not calls:
            rest, self.sent = self.text[self.sent:], len(self.text)
            return rest, [], reason
        content = message["content"] or ""
        rest = content[self.sent:] if content.startswith(self.text[:self.sent]) else ""
        deltas = [{"index": k, "id": c["id"], "type": "function", "function": c["function"]}
                  for k, c in enumerate(calls)]
        return rest, deltas, reason
