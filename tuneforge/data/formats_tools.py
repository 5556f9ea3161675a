"""Messages with tools, from the shapes other tools write, to canonical messages.

One converter serves OpenAI chat rows (``tools``, assistant ``tool_calls`` with JSON-string
arguments, ``tool`` results, per-turn ``weight``, the legacy ``functions`` /
``function_call`` / ``function`` shape), LLaMA-Factory's ShareGPT (``function_call`` and
``observation`` turns, a ``tools`` column that is often a JSON *string*) and Axolotl's
``chat_template`` rows (configurable message keys, role names and training flags): they all
differ only in spelling, which ``MessagesOptions`` (``data.messages``) names.

Canonical shapes (see /work/ref/SPEC.md): a message is ``{role, content}`` plus, when
present, ``tool_calls`` (assistant), ``tool_call_id`` and ``name`` (tool), ``weight`` 0|1
(assistant); a call is ``{id, type: function, function: {name, arguments: dict}}``; a tool is
``{type: function, function: {name, description, parameters}}``.
"""

from __future__ import annotations

import json

from tuneforge.config import MessagesOptions
from tuneforge.data.errors import RowError

ROLES = {"system", "user", "assistant", "tool"}
# Source role names (lower-cased) -> canonical role. "tool_call" is a turn whose text is the
# JSON of one call or a list of calls (LLaMA-Factory's function_call); OpenAI's legacy
# "function" role is a tool result named by its ``name``.
DEFAULT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                 "assistant": "assistant", "bot": "assistant", "model": "assistant", "tool": "tool",
                 "observation": "tool", "function": "tool", "ipython": "tool", "function_call": "tool_call"}
# Rows that spell roles under "role" (OpenAI) use OpenAI's names only: a "human" there is a
# mistake worth a RowError, not a ShareGPT synonym.
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                "tool": "tool", "function": "tool"}
NO_OPTIONS = MessagesOptions()


def _json(value, field: str):
    """A value that may be JSON text (LLaMA-Factory and OpenAI write strings) or already parsed."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise RowError(field, f"not valid JSON ({e.msg} at column {e.colno})") from None


def parse_tools(value, field: str) -> list[dict]:
    """Tool schemas: a list (or its JSON text) of OpenAI ``{type, function}`` entries or bare
    ``{name, description, parameters}`` ones (LLaMA-Factory). None, "" and "[]" are no tools."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    value = _json(value, field)
    if not isinstance(value, list):
        raise RowError(field, f"expected a list of function schemas, got {type(value).__name__}")
    out = []
    for i, t in enumerate(value):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else t
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise RowError(f"{field}[{i}]", "each tool needs a function name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise RowError(f"{field}[{i}].parameters", f"expected an object, got {type(params).__name__}")
        desc = fn.get("description", "")
        if not isinstance(desc, str):
            raise RowError(f"{field}[{i}].description", f"expected str, got {type(desc).__name__}")
        out.append({"type": "function", "function": {"name": fn["name"], "description": desc, "parameters": params}})
    return out


def _arguments(value, field: str) -> dict:
    if value is None or value == "":
        return {}
    args = _json(value, field)
    if not isinstance(args, dict):
        raise RowError(field, f"arguments must be a JSON object, got {type(args).__name__}")
    return args


def _call(fn, field: str, call_id) -> dict:
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
        raise RowError(field, "a tool call needs a function name")
    return {"id": call_id, "type": "function",
            "function": {"name": fn["name"], "arguments": _arguments(fn.get("arguments"), f"{field}.arguments")}}


class _Calls:
    """Deterministic ids for calls that have none (call_0, call_1... in row order), and the
    id each following tool result without one takes: the matching call's, in order."""

    def __init__(self):
        self.n, self.pending = 0, []

    def new_id(self, given) -> str:
        cid = given if isinstance(given, str) and given else f"call_{self.n}"
        self.n += 1
        self.pending.append(cid)
        return cid

    def result_id(self, given) -> str | None:
        if isinstance(given, str) and given:
            if given in self.pending:
                self.pending.remove(given)
            return given
        return self.pending.pop(0) if self.pending else None


def _content(m: dict, key: str, field: str) -> str:
    value = m.get(key)
    if value is None:
        return ""
    if isinstance(value, list):  # OpenAI content parts: text only
        parts = []
        for j, p in enumerate(value):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise RowError(f"{field}.{key}[{j}]", f"only text parts are trained here, got {kind!r} "
                                                      "(rows with images train with model.kind=vision; audio is "
                                                      "not trained)")
            parts.append(p["text"])
        return "".join(parts)
    if not isinstance(value, str):
        raise RowError(f"{field}.{key}", f"expected str, got {type(value).__name__}")
    return value


def _role_map(opts: MessagesOptions, role_key: str) -> dict[str, str]:
    out = dict(OPENAI_ROLES if role_key == "role" and not opts.roles else DEFAULT_ROLES)
    for role, names in opts.roles.items():
        out.update({str(n).lower(): role for n in names})
    return out


def _flag(m: dict, opts: MessagesOptions, role: str, field: str) -> int | None:
    """The turn's weight from OpenAI ``weight`` or an Axolotl training flag; None: not given."""
    keys = [opts.train_key] if opts.train_key else ["training", "train"]
    weight = m.get("weight")
    if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
        raise RowError(f"{field}.weight", f"expected 0 or 1, got {weight!r}")
    for key in keys:
        flag = m.get(key)
        if flag is None:
            continue
        if not isinstance(flag, bool):
            raise RowError(f"{field}.{key}", f"expected true or false, got {flag!r}")
        if weight is None:
            weight = int(flag)
    if weight is not None and role != "assistant":
        if weight == 1 and any(m.get(k) is not None for k in keys):
            raise RowError(f"{field}.{next(k for k in keys if m.get(k) is not None)}",
                           f"a {role} turn flagged for training: tuneforge trains assistant turns only "
                           "(roles_to_train=[assistant])")
        if "weight" in m:
            raise RowError(f"{field}.weight", f"weight is for assistant turns, not {role}")
        return None
    return weight


def convert_message(m, field: str, opts: MessagesOptions, calls: _Calls) -> dict:
    if not isinstance(m, dict):
        raise RowError(field, f"expected a message object, got {type(m).__name__}")
    role_key = opts.role_key or ("role" if "role" in m else "from")
    content_key = opts.content_key or ("content" if "content" in m or "role" in m else "value")
    if role_key not in m or (content_key not in m and not (m.get("tool_calls") or m.get("function_call"))):
        raise RowError(field, f"each message needs '{role_key}' and '{content_key}'")
    source = str(m[role_key]).lower()
    names = _role_map(opts, role_key)
    role = names.get(source)
    if role is None:
        raise RowError(f"{field}.{role_key}", f"unknown role {m[role_key]!r} (known: {sorted(names)}; "
                                              "map others with data.messages.roles)")
    content = _content(m, content_key, field)
    out: dict = {"role": "assistant" if role == "tool_call" else role, "content": content}
    if role == "tool_call":  # the turn's text is the call: one {name, arguments} or a list (parallel)
        value = _json(content, f"{field}.{content_key}")
        items = value if isinstance(value, list) else [value]
        out["content"] = ""
        out["tool_calls"] = [_call(c, f"{field}.{content_key}[{j}]", calls.new_id(None)) for j, c in enumerate(items)]
    elif role == "assistant" and (m.get("tool_calls") or m.get("function_call")):
        if m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise RowError(f"{field}.tool_calls", "expected a list of calls")
            out["tool_calls"] = [_call(c.get("function") if isinstance(c, dict) else c, f"{field}.tool_calls[{j}]",
                                       calls.new_id(c.get("id") if isinstance(c, dict) else None))
                                 for j, c in enumerate(m["tool_calls"])]
        else:
            out["tool_calls"] = [_call(m["function_call"], f"{field}.function_call", calls.new_id(None))]
    elif role == "tool":
        cid = calls.result_id(m.get("tool_call_id"))
        if cid:
            out["tool_call_id"] = cid
        if isinstance(m.get("name"), str) and m["name"]:
            out["name"] = m["name"]
    weight = _flag(m, opts, out["role"], field)
    if weight is not None:
        out["weight"] = weight
    return out


def convert_messages(raw, field: str, opts: MessagesOptions | None = None) -> list[dict]:
    """Canonical messages of one conversation (not yet checked for a trainable ending)."""
    if not isinstance(raw, list):
        raise RowError(field, f"expected a list of messages, got {type(raw).__name__}")
    opts, calls = opts or NO_OPTIONS, _Calls()
    return [convert_message(m, f"{field}[{i}]", opts, calls) for i, m in enumerate(raw)]


# Message keys some supported spelling gives meaning to; others are listed as unknown fields.
MESSAGE_KEYS = {"role", "from", "content", "value", "tool_calls", "function_call", "tool_call_id", "name",
                "weight", "training", "train"}


def unknown_message_keys(raw, opts: MessagesOptions | None = None) -> set[str]:
    """Keys of a conversation's messages that no converter reads (OpenAI's ``refusal``, a
    dataset's ``timestamp``...), for the load report."""
    if not isinstance(raw, list):
        return set()
    opts = opts or NO_OPTIONS
    known = MESSAGE_KEYS | {k for k in (opts.role_key, opts.content_key, opts.train_key) if k}
    return {k for m in raw if isinstance(m, dict) for k in m if k not in known}


def check_turns(messages: list[dict], field: str) -> list[dict]:
    """Roles and contents are valid and the conversation ends with a trained assistant answer."""
    if not messages:
        raise RowError(field, "empty conversation")
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise RowError(f"{field}[{i}].role", f"unknown role {m['role']!r} (expected one of {sorted(ROLES)})")
        if not isinstance(m["content"], str):
            raise RowError(f"{field}[{i}].content", f"expected str, got {type(m['content']).__name__}")
    last = messages[-1]
    if last["role"] != "assistant":
        raise RowError(field, "conversation does not end with an assistant turn")
    if last.get("weight", 1) != 1:
        raise RowError(f"{field}[{len(messages) - 1}].weight", "the last assistant turn is not trained (weight 0)")
    if not last["content"].strip() and not last.get("tool_calls"):
        raise RowError(f"{field}[{len(messages) - 1}].content", "empty response")
    return messages


def tools_of(row: dict, columns: dict) -> list[dict]:
    """The row's tools: ``tools`` (OpenAI, LLaMA-Factory) or legacy OpenAI ``functions``."""
    key = columns.get("tools", "tools")
    if row.get(key) not in (None, "", [], "[]"):
        return parse_tools(row[key], key)
    if row.get("functions"):
        return parse_tools(row["functions"], "functions")
    return []


def with_tools(messages: list[dict], tools: list[dict], row: dict) -> dict:
    """The canonical sft row. ``parallel_tool_calls: false`` is kept as information only: it
    changes no token we train (it tells an API whether to *allow* several calls per turn), so
    it is checked against the row (no turn with two calls) and carried, never rendered."""
    out: dict = {"messages": messages}
    if tools:
        out["tools"] = tools
    ptc = row.get("parallel_tool_calls")
    if ptc is not None:
        if not isinstance(ptc, bool):
            raise RowError("parallel_tool_calls", f"expected true or false, got {ptc!r}")
        if ptc is False:
            for i, m in enumerate(messages):
                if len(m.get("tool_calls", [])) > 1:
                    raise RowError(f"messages[{i}].tool_calls", "several calls in one turn but parallel_tool_calls "
                                                                 "is false")
            out["parallel_tool_calls"] = False
    return out
