"""Canonical rows of any kind (formats.py documents them): which kind a row is, its texts
(for cleaning, redaction, de-duplication and lengths), and the keys that tell rows apart.
Every helper reaches the text inside tool calls and tool descriptions, so PII redaction
and cleaning see what training sees."""

from __future__ import annotations

import json


def _map_leaves(value, fn):
    """``fn`` on every string inside a JSON value (tool-call arguments), keys untouched."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_leaves(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_leaves(v, fn) for v in value]
    return value


def _content(content, fn):
    """``fn`` on a message's text: the string, or each text part of a vision row's content
    parts (image parts are data, never rewritten: redacting inside base64 would break them)."""
    if isinstance(content, list):
        return [{**p, "text": fn(p["text"])} if p.get("type") == "text" else p for p in content]
    return fn(content)


def _map_message(m: dict, fn) -> dict:
    out = {**m, "content": _content(m["content"], fn)}
    if m.get("tool_calls"):
        out["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _map_leaves(c["function"]["arguments"], fn)}}
                             for c in m["tool_calls"]]
    return out


def _map_turns(turns: list[dict], fn) -> list[dict]:
    return [_map_message(m, fn) for m in turns]


def _map_tools(tools: list[dict], fn) -> list[dict]:
    # Descriptions are free text a user wrote (PII can hide there); names and schemas are code.
    return [{**t, "function": {**t["function"], "description": fn(t["function"]["description"])}} for t in tools]


# The message-list keys of each kind of canonical row, in order.
TURN_KEYS = {"sft": ("messages",), "preference": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "completion")}


def map_texts(row: dict, fn) -> dict:
    """The canonical row with ``fn`` applied to every text string (message contents, string
    leaves of tool-call arguments, tool descriptions, text, segments); roles, labels, names
    and ``_`` bookkeeping keys are left alone."""
    kind = kind_of(row)
    out = dict(row)
    if kind in TURN_KEYS:
        out.update({k: _map_turns(row[k], fn) for k in TURN_KEYS[kind]})
    elif kind == "segments":
        out["segments"] = [{**s, "text": fn(s["text"])} for s in row["segments"]]
    else:
        out["text"] = fn(row["text"])
    if row.get("tools"):
        out["tools"] = _map_tools(row["tools"], fn)
    return out


def _leaves(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _leaves(v)]
    if isinstance(value, list):
        return [s for v in value for s in _leaves(v)]
    return []


def _message_texts(m: dict) -> list[str]:
    return [m["content"], *(s for c in m.get("tool_calls", ()) for s in _leaves(c["function"]["arguments"]))]


def row_texts(row: dict) -> list[str]:
    """Every text string of a canonical row, in order (the strings ``map_texts`` maps)."""
    kind = kind_of(row)
    if kind in TURN_KEYS:
        out = [s for k in TURN_KEYS[kind] for m in row[k] for s in _message_texts(m)]
    elif kind == "segments":
        out = [s["text"] for s in row["segments"]]
    else:
        out = [row["text"]]
    return out + [t["function"]["description"] for t in row.get("tools", ())]


def structure_key(row: dict) -> str:
    """What tells two rows with equal texts apart besides them: tools, call names, tool results'
    ids, weights and segment labels ("" for a plain row, so older keys do not change)."""
    kind = kind_of(row)
    extra = {k: row[k] for k in ("tools", "parallel_tool_calls") if k in row}
    msgs = [m for k in TURN_KEYS.get(kind, ()) for m in row[k]]
    if any(len(m) > 2 for m in msgs):
        extra["messages"] = [{k: v for k, v in m.items() if k != "content"} for m in msgs]
    if kind == "segments":
        extra["labels"] = [s["label"] for s in row["segments"]]
    return json.dumps(extra, sort_keys=True) if extra else ""


def kind_of(row: dict) -> str:
    if "messages" in row:
        return "sft"
    if "chosen" in row:
        return "preference"
    if "completion" in row:
        return "unpaired"
    if "segments" in row:
        return "segments"
    return "classification" if "label" in row else "text"


def _turns_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] + "".join(json.dumps(c["function"], sort_keys=True) for c in m.get("tool_calls", ()))
                     for m in messages)


def prompt_text(row: dict) -> str:
    """What a model is asked: the key for leakage checks and for keeping alike prompts on
    one side of a split (an sft row's turns before the answer, tool calls and results
    included; a document's whole text; a segments row's untrained segments)."""
    kind = kind_of(row)
    if kind == "sft":
        return _turns_text(row["messages"][:-1])
    if kind in ("preference", "unpaired"):
        return _turns_text(row["prompt"])
    if kind == "segments":
        return "".join(s["text"] for s in row["segments"] if not s["label"]) or "".join(
            s["text"] for s in row["segments"])
    return row["text"]
