"""Row formats: detection (with an explanation) and conversion to canonical rows.

Every format converts to the canonical row of its *kind*:

- ``sft``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
  ending with an assistant turn (formats chat, sharegpt, instruction, prompt_completion).
- ``preference``: ``{"prompt": [messages...], "chosen": [messages...], "rejected": [messages...]}``,
  TRL's conversational preference shape; plain strings become one user / assistant turn.
- ``classification``: ``{"text": str, "label": str}`` (labels are class names, kept as strings
  so every split file has one column type).
- ``text``: ``{"text": str}``, one document for continued pre-training.

Rows may also carry bookkeeping keys starting with ``_`` (``_where`` = "file:line",
``_synthetic``); they are never trained on. A format is a plug point (``register_format``):
it names the fields it needs (``columns`` in the config renames them) and raises
``RowError`` with the offending field for a bad row. The train recipe consumes sft rows.
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
    kind: str = "sft"


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


def _turns(value, field: str, default_role: str) -> list[dict]:
    """A plain string as one turn, or a list of {role, content} messages (checked)."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(field, "empty")
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise RowError(field, f"expected str or a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"{field}[{i}]", "each message needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RowError(f"{field}[{i}].role", f"unknown role {m['role']!r} (expected one of {sorted(ROLES)})")
        if not isinstance(m["content"], str):
            raise RowError(f"{field}[{i}].content", f"expected str, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _preference(row, columns):
    fields = {f: columns.get(f, f) for f in ("prompt", "chosen", "rejected")}
    for f, key in fields.items():
        if row.get(key) is None:
            raise RowError(key, "missing")
    prompt = _turns(row[fields["prompt"]], fields["prompt"], "user")
    if prompt[-1]["role"] == "assistant":
        raise RowError(fields["prompt"], "prompt ends with an assistant turn")
    out = {"prompt": prompt}
    for side in ("chosen", "rejected"):
        turns = _turns(row[fields[side]], fields[side], "assistant")
        if turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
            raise RowError(fields[side], "does not end with a non-empty assistant turn")
        out[side] = turns
    if out["chosen"] == out["rejected"]:
        raise RowError(fields["rejected"], "identical to chosen (no preference signal)")
    return out


def _classification(row, columns):
    text = _get(row, columns, "text")
    key = columns.get("label", "label")
    label = row.get(key)
    if label is None or (isinstance(label, str) and not label.strip()):
        raise RowError(key, "missing")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise RowError(key, f"expected str or int, got {type(label).__name__}")
    return {"text": text, "label": str(label).strip()}


def _text(row, columns):
    return {"text": _get(row, columns, "text")}


register_format(Format("preference", ("prompt", "chosen", "rejected"), _preference,
                       "preference pairs: prompt, chosen, rejected (strings or message lists)", "preference"))
register_format(Format("classification", ("text", "label"), _classification, "text, label", "classification"))
register_format(Format("text", ("text",), _text, "raw text for continued pre-training", "text"))

def _map_turns(turns: list[dict], fn) -> list[dict]:
    return [{**m, "content": fn(m["content"])} for m in turns]


def map_texts(row: dict, fn) -> dict:
    """The canonical row with ``fn`` applied to every text string (message contents,
    text, prompts); roles, labels and ``_`` bookkeeping keys are left alone."""
    if "messages" in row:
        return {**row, "messages": _map_turns(row["messages"], fn)}
    if "chosen" in row:
        return {**row, **{k: _map_turns(row[k], fn) for k in ("prompt", "chosen", "rejected")}}
    return {**row, "text": fn(row["text"])}


def row_texts(row: dict) -> list[str]:
    """Every text string of a canonical row, in order."""
    if "messages" in row:
        return [m["content"] for m in row["messages"]]
    if "chosen" in row:
        return [m["content"] for k in ("prompt", "chosen", "rejected") for m in row[k]]
    return [row["text"]]


def kind_of(row: dict) -> str:
    if "messages" in row:
        return "sft"
    if "chosen" in row:
        return "preference"
    return "classification" if "label" in row else "text"


def prompt_text(row: dict) -> str:
    """What a model is asked: the key for leakage checks and for keeping alike prompts on
    one side of a split (an sft row's turns before the answer; a document's whole text)."""
    kind = kind_of(row)
    if kind == "sft":
        return "\n".join(m["content"] for m in row["messages"][:-1])
    if kind == "preference":
        return "\n".join(m["content"] for m in row["prompt"])
    return row["text"]


def detect(keys: set[str], columns: dict, kind: str | None = None) -> tuple[str, str]:
    """The format whose required fields the rows carry, and why it was chosen. ``kind``
    limits the choice to formats an objective trains on (sft, preference, ...)."""
    candidates = [f for f in FORMATS.values() if kind is None or f.kind == kind]
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
