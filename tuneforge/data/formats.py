"""Row formats: detection (with an explanation) and conversion to canonical chat rows.

Canonical SFT row: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
ending with an assistant turn. A format is a plug point (``register_format``): it names
the fields it needs (``columns`` in the config renames them) and raises ``RowError`` with
the offending field for a bad row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


class RowError(ValueError):
    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"field '{field}': {reason}")


@dataclass(frozen=True)
class Format:
    name: str
    required: tuple[str, ...]
    convert: Callable[[dict, dict], dict]  # (row, columns) -> canonical row
    description: str
    # What the canonical row is for: "chat" (SFT), "preference", "classification", "text".
    # Auto-detection only picks formats of the kind the objective trains on.
    kind: str = "chat"


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    if fmt.name in FORMATS:
        raise ValueError(f"format '{fmt.name}' is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "bot": "assistant", "model": "assistant"}


def _get(row: dict, columns: dict, field: str, *, kind=str, allow_empty=False):
    key = columns.get(field, field)
    if key not in row or row[key] is None:
        raise RowError(key, "missing")
    value = row[key]
    if not isinstance(value, kind):
        raise RowError(key, f"expected {kind.__name__}, got {type(value).__name__}")
    if kind is str and not allow_empty and not value.strip():
        raise RowError(key, "empty")
    return value


def _check_turns(messages: list[dict], field: str) -> list[dict]:
    if not messages:
        raise RowError(field, "empty conversation")
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise RowError(f"{field}[{i}].role", f"unknown role {m['role']!r} (expected one of {sorted(ROLES)})")
        if not isinstance(m["content"], str):
            raise RowError(f"{field}[{i}].content", f"expected str, got {type(m['content']).__name__}")
    if messages[-1]["role"] != "assistant":
        raise RowError(field, "conversation does not end with an assistant turn")
    if not messages[-1]["content"].strip():
        raise RowError(f"{field}[{len(messages) - 1}].content", "empty response")
    return messages


def _chat(row, columns):
    field = columns.get("messages", "messages")
    raw = _get(row, columns, "messages", kind=list)
    msgs = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"{field}[{i}]", "each message needs 'role' and 'content'")
        msgs.append({"role": m["role"], "content": m["content"]})
    return {"messages": _check_turns(msgs, field)}


def _sharegpt(row, columns):
    field = columns.get("conversations", "conversations")
    raw = _get(row, columns, "conversations", kind=list)
    msgs = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or "from" not in m or "value" not in m:
            raise RowError(f"{field}[{i}]", "each turn needs 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(m["from"]).lower())
        if role is None:
            raise RowError(f"{field}[{i}].from", f"unknown role {m['from']!r}")
        msgs.append({"role": role, "content": m["value"]})
    return {"messages": _check_turns(msgs, field)}


def _instruction(row, columns):
    instruction = _get(row, columns, "instruction")
    key = columns.get("input", "input")
    extra = row.get(key) or ""
    if not isinstance(extra, str):
        raise RowError(key, f"expected str, got {type(extra).__name__}")
    output = _get(row, columns, "output")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    system_key = columns.get("system", "system")
    if isinstance(row.get(system_key), str) and row[system_key].strip():
        msgs.insert(0, {"role": "system", "content": row[system_key]})
    return {"messages": msgs}


def _prompt_completion(row, columns):
    prompt = _get(row, columns, "prompt")
    completion = _get(row, columns, "completion")
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}


register_format(Format("chat", ("messages",), _chat, "OpenAI chat: messages=[{role, content}]"))
register_format(Format("sharegpt", ("conversations",), _sharegpt, "ShareGPT: conversations=[{from, value}]"))
register_format(Format("instruction", ("instruction", "output"), _instruction, "alpaca: instruction, input?, output"))
register_format(Format("prompt_completion", ("prompt", "completion"), _prompt_completion, "prompt, completion"))


# --- rows for objectives beyond SFT ------------------------------------------------------


def _prompt_messages(row, columns) -> list[dict]:
    """A prompt given as a string (one user turn) or as chat messages without the answer."""
    key = columns.get("prompt", "prompt")
    value = row.get(key)
    if isinstance(value, list):
        msgs = [{"role": m.get("role"), "content": m.get("content")} for m in value if isinstance(m, dict)]
        if len(msgs) != len(value) or not msgs or any(m["role"] not in ROLES or not isinstance(m["content"], str)
                                                      for m in msgs):
            raise RowError(key, "a list prompt must hold {role, content} messages")
        return msgs
    return [{"role": "user", "content": _get(row, columns, "prompt")}]


def _preference(row, columns):
    chosen, rejected = _get(row, columns, "chosen"), _get(row, columns, "rejected")
    if chosen == rejected:
        raise RowError(columns.get("rejected", "rejected"), "identical to chosen (the pair carries no preference)")
    return {"prompt": _prompt_messages(row, columns), "chosen": chosen, "rejected": rejected}


def _classification(row, columns):
    key = columns.get("label", "label")
    label = row.get(key)
    if label is None or isinstance(label, (dict, list)) or not str(label).strip():
        raise RowError(key, "missing" if label is None else "expected a class name or number")
    return {"text": _get(row, columns, "text"), "label": str(label).strip()}


def _text(row, columns):
    return {"text": _get(row, columns, "text")}


register_format(Format("preference", ("prompt", "chosen", "rejected"), _preference,
                       "preference pairs: prompt (text or messages), chosen, rejected", kind="preference"))
register_format(Format("classification", ("text", "label"), _classification, "text, label",
                       kind="classification"))
register_format(Format("text", ("text",), _text, "raw text (continued pre-training)", kind="text"))


def detect(keys: set[str], columns: dict, kind: str = "chat") -> tuple[str, str]:
    """The format (of this kind) whose required fields the rows carry, and why it was chosen."""
    candidates = [f for f in FORMATS.values() if f.kind == kind]
    matches = [f for f in candidates if all(columns.get(r, r) in keys for r in f.required)]
    if not matches:
        wanted = "; ".join(f"{f.name}: {', '.join(f.required)}" for f in candidates)
        raise RowError(
            ",".join(sorted(keys)) or "(none)",
            f"no known format fits these fields. Formats and the fields they need: {wanted}. "
            "Rename with data.columns (e.g. {instruction: question, output: answer}) or set data.format",
        )
    best = max(matches, key=lambda f: len(f.required))
    return best.name, f"rows have {', '.join(columns.get(r, r) for r in best.required)} -> {best.name} ({best.description})"
