"""Tools in chat rows: how tool schemas, tool calls and tool results become text, and how a
model's text becomes tool calls again. Training (render.py), evaluation and serving all go
through these functions, so a model is asked and parsed the same way it was trained.

A tokenizer whose own chat template renders ``tools`` and ``tool_calls`` (Qwen2.5, Llama 3.1,
Mistral, Hermes ...) gets them natively through transformers' ``apply_chat_template(tools=...)``.
Other templates (SmolLM2's ChatML has no tool support) get the **fallback format**, the text
Qwen2.5 and Hermes-2-Pro produce, written with the template's own system/user/assistant roles:

- the tools are listed in the system message::

      # Tools

      You may call one or more functions to assist with the user query.

      You are provided with function signatures within <tools></tools> XML tags:
      <tools>
      {"type": "function", "function": {"name": ..., "description": ..., "parameters": ...}}
      </tools>

      For each function call, return a json object with function name and arguments within
      <tool_call></tool_call> XML tags: ...

- an assistant call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one
  block per call, after the turn's text (if any);
- tool results become a user turn of ``<tool_response>\\n...\\n</tool_response>`` blocks
  (consecutive results share one turn).

``parse_tool_calls`` reads the ``<tool_call>`` blocks back (both formats emit them for the
templates tuneforge knows); ``call_schema`` is the JSON schema of one call, for decoding a
required call under a grammar.
"""

from __future__ import annotations

import json
import re

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"

_SYSTEM_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.S)
# Keys a chat template may read from a message; tuneforge's own ("weight") stay out of the prompt.
_TEMPLATE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")


def tool_template(tok) -> bool:
    """Whether the tokenizer's own chat template renders ``tools`` and ``tool_calls``."""
    tpl = tok.chat_template
    if isinstance(tpl, dict):  # named templates: transformers picks "tool_use" when tools are given
        tpl = tpl.get("tool_use") or tpl.get("default") or ""
    return isinstance(tpl, str) and "tools" in tpl and "tool_call" in tpl


def call_text(call: dict) -> str:
    """One call in the fallback format (the same text Qwen2.5's template writes)."""
    fn = call["function"]
    body = json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def tools_text(tools: list[dict]) -> str:
    return _SYSTEM_TOOLS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def _fallback(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    out: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_turn": True})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            parts = ([m["content"]] if m.get("content") else []) + [call_text(c) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    out = [{"role": m["role"], "content": m["content"]} for m in out]
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{tools_text(tools)}"}
        else:
            out.insert(0, {"role": "system", "content": tools_text(tools)})
    return out


def render_messages(tok, messages: list[dict], tools: list[dict] | None = None) -> list[dict]:
    """Messages ready for ``tok.apply_chat_template`` (with ``tools=`` when the template is
    native): the template's keys only, or the fallback format's system/user/assistant turns.
    A leading system turn goes into the first user turn where the template refuses one."""
    if tool_template(tok):
        out = [{k: m[k] for k in _TEMPLATE_KEYS if k in m} for m in messages]
    elif tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        out = _fallback(messages, tools)
    else:
        out = [{"role": m["role"], "content": m["content"]} for m in messages]
    return _fold_system(out) if out and out[0]["role"] == "system" and refuses_system(tok) else out


_REFUSES_SYSTEM: dict[str, bool] = {}  # template text -> whether it raises on a system turn


def refuses_system(tok) -> bool:
    """Whether the chat template raises on a system turn that a lone user turn renders without
    (Gemma 1/2: "System role not supported", Mistral v0.1: "Only user and assistant roles")."""
    tpl = tok.chat_template
    if not isinstance(tpl, str) or "raise_exception" not in tpl:
        return False
    if tpl not in _REFUSES_SYSTEM:
        from jinja2.exceptions import TemplateError  # deferred: jinja2 comes with transformers

        user = [{"role": "user", "content": "u"}]
        try:
            tok.apply_chat_template(user, tokenize=False)
        except TemplateError:
            _REFUSES_SYSTEM[tpl] = False  # refuses more than the system turn: let its own error speak
            return False
        try:
            tok.apply_chat_template([{"role": "system", "content": "s"}, *user], tokenize=False)
            _REFUSES_SYSTEM[tpl] = False
        except TemplateError:
            _REFUSES_SYSTEM[tpl] = True
    return _REFUSES_SYSTEM[tpl]


def _fold_system(messages: list[dict]) -> list[dict]:
    """The system text at the head of the first user turn, a blank line between (what Gemma 3's
    own template does), so the instructions still reach a model whose template has no system role."""
    system, rest = messages[0], messages[1:]
    if rest and rest[0]["role"] == "user":
        return [{**rest[0], "content": f"{system['content']}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "user", "content": system["content"]}, *rest]


def chat_ids(tok, messages: list[dict], tools: list[dict] | None = None,
             add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation, its tools rendered natively or in the fallback format."""
    extra = {"tools": tools} if tools and tool_template(tok) else {}
    out = tok.apply_chat_template(render_messages(tok, messages, tools), tokenize=True,
                                  add_generation_prompt=add_generation_prompt, **extra)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def chat_text(tok, messages: list[dict], tools: list[dict] | None = None,
              add_generation_prompt: bool = False) -> str:
    """The same conversation as text (what a prompt looks like; for logs and the served engine)."""
    extra = {"tools": tools} if tools and tool_template(tok) else {}
    return tok.apply_chat_template(render_messages(tok, messages, tools), tokenize=False,
                                   add_generation_prompt=add_generation_prompt, **extra)


def _as_call(obj) -> tuple[dict | None, str | None]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None, "a call needs a non-empty string 'name'"
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string, as OpenAI's API does
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            return None, f"arguments of {obj['name']!r} are not JSON ({e.msg})"
    if not isinstance(args, dict):
        return None, f"arguments of {obj['name']!r} are not a JSON object"
    return {"name": obj["name"], "arguments": args}, None


def parse_tool_calls(text: str, names: set[str] | None = None) -> tuple[str, list[dict], list[str]]:
    """(text outside the calls, the calls ``{"name", "arguments"}``, why each bad block failed).

    Reads ``<tool_call>`` blocks (an unclosed last block counts: generation may stop at eos
    right after the JSON). Without blocks, a reply that is only one JSON object with a
    ``name`` among ``names`` counts as a call (small models often drop the tags)."""
    calls, errors = [], []
    for m in _BLOCK.finditer(text):
        try:
            obj = json.loads(m.group(1).strip())
        except json.JSONDecodeError as e:
            errors.append(f"{TOOL_CALL_OPEN} block is not JSON ({e.msg})")
            continue
        call, why = _as_call(obj)
        if call is None:
            errors.append(why)
        elif names is not None and call["name"] not in names:
            errors.append(f"unknown function {call['name']!r} (tools: {', '.join(sorted(names))})")
        else:
            calls.append(call)
    content = _BLOCK.sub("", text).strip()
    if not calls and not errors and names and content.startswith("{"):
        try:
            call, _ = _as_call(json.loads(content))
        except json.JSONDecodeError:
            call = None
        if call is not None and call["name"] in names:
            return "", [call], []
    return content, calls, errors


def call_schema(tools: list[dict], names: set[str] | None = None) -> dict:
    """JSON schema of one call ``{"name", "arguments"}`` to one of the tools (or of ``names``)."""
    options = []
    for t in tools:
        fn = t["function"]
        if names is not None and fn["name"] not in names:
            continue
        params = fn.get("parameters") or {"type": "object"}
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    if not options:
        raise ValueError(f"no tool named {sorted(names or [])}")
    return options[0] if len(options) == 1 else {"anyOf": options}
