"""Row formats: detection (with an explanation) and conversion to canonical rows.

Every format converts to the canonical row of its *kind*:

- ``sft``: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...],
  "tools"?: [...]}`` ending with a trained assistant turn (formats chat, sharegpt, instruction,
  prompt_completion); assistant turns may carry ``tool_calls`` and ``weight`` 0|1, tool
  results ``tool_call_id`` and ``name`` (formats_tools.py has the shapes).
- ``unpaired``: ``{"prompt": [...], "completion": [assistant message], "label": bool}``, KTO's
  desirable (True) / undesirable (False) answers (formats_other.py); never trained as SFT.
- ``segments``: ``{"segments": [{"text": str, "label": bool}, ...]}`` (Axolotl's template-free
  input_output rows), trained by the sft objective on the segments whose label is true.
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

from tuneforge.data.errors import RowError
from tuneforge.data.formats_tools import check_turns, convert_messages, tools_of, with_tools
from tuneforge.data.rows import kind_of, map_texts, prompt_text, row_texts, structure_key

# Re-exported: formats raise RowError; the row helpers were born here and are imported from here.
__all__ = ["RowError", "kind_of", "map_texts", "prompt_text", "row_texts", "structure_key"]


@dataclass(frozen=True)
class Format:
    name: str
    required: tuple[str, ...]
    convert: Callable[..., dict]  # (row, columns) -> canonical row; (row, columns, MessagesOptions) if options
    description: str
    kind: str = "sft"
    optional: tuple[str, ...] = ()  # other fields it reads: they are not reported as unknown
    options: bool = False  # convert takes data.messages (MessagesOptions) as a third argument
    wants_source: bool = False  # the row reaches convert with "_source" (its file: relative image paths)

    def consumes(self, columns: dict) -> set[str]:
        return {columns.get(f, f) for f in self.required + self.optional}


# The row kinds an objective's kind accepts: the sft objective also trains segments rows
# (per-segment labels render to the same ids/labels, render.render_segments).
TRAINS = {"sft": {"sft", "segments"}}


def kind_fits(wanted: str | None, kind: str) -> bool:
    return wanted is None or kind in TRAINS.get(wanted, {wanted})


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    if fmt.name in FORMATS:
        raise ValueError(f"format '{fmt.name}' is already registered")
    FORMATS[fmt.name] = fmt
    return fmt




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


_check_turns = check_turns


def _messages_field(columns: dict, opts, default: str) -> str:
    return columns.get(default, opts.field if opts is not None and opts.field else default)


def _chat(row, columns, opts=None):
    field = _messages_field(columns, opts, "messages")
    raw = _get(row, {"messages": field}, "messages", kind=list)
    msgs = convert_messages(raw, field, opts)
    return with_tools(_check_turns(msgs, field), tools_of(row, columns), row)


def _sharegpt(row, columns, opts=None):
    field = _messages_field(columns, opts, "conversations")
    raw = _get(row, {"conversations": field}, "conversations", kind=list)
    msgs = convert_messages(raw, field, opts)
    msgs = _with_system_column(msgs, row, columns)
    return with_tools(_check_turns(msgs, field), tools_of(row, columns), row)


def _with_system_column(msgs: list[dict], row: dict, columns: dict) -> list[dict]:
    """LLaMA-Factory's ``system`` column: the system prompt of a row whose turns have none."""
    system = row.get(columns.get("system", "system"))
    if isinstance(system, str) and system.strip() and (not msgs or msgs[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *msgs]
    return msgs


def _history(row, columns) -> list[dict]:
    """Alpaca ``history``: [[user, assistant], ...] turns before the instruction (LLaMA-Factory)."""
    key = columns.get("history", "history")
    value = row.get(key)
    if value is None or value == []:
        return []
    if not isinstance(value, list):
        raise RowError(key, f"expected a list of [user, assistant] pairs, got {type(value).__name__}")
    out = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise RowError(f"{key}[{i}]", "expected a [user, assistant] pair of strings")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return out


def _instruction(row, columns):
    instruction = _get(row, columns, "instruction")
    key = columns.get("input", "input")
    extra = row.get(key) or ""
    if not isinstance(extra, str):
        raise RowError(key, f"expected str, got {type(extra).__name__}")
    output = _get(row, columns, "output")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    msgs = [*_history(row, columns), {"role": "user", "content": user}, {"role": "assistant", "content": output}]
    system_key = columns.get("system", "system")
    if isinstance(row.get(system_key), str) and row[system_key].strip():
        msgs.insert(0, {"role": "system", "content": row[system_key]})
    return {"messages": msgs}


def _prompt_completion(row, columns):
    prompt = _get(row, columns, "prompt")
    completion = _get(row, columns, "completion")
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}


register_format(Format("chat", ("messages",), _chat, "OpenAI chat: messages=[{role, content}], tools?",
                       optional=("tools", "functions", "parallel_tool_calls"), options=True))
register_format(Format("sharegpt", ("conversations",), _sharegpt,
                       "ShareGPT: conversations=[{from, value}], system?, tools?",
                       optional=("system", "tools"), options=True))
register_format(Format("instruction", ("instruction", "output"), _instruction,
                       "alpaca: instruction, input?, output, system?, history?", optional=("input", "system", "history")))
register_format(Format("prompt_completion", ("prompt", "completion"), _prompt_completion, "prompt, completion"))


def _turns(value, field: str, default_role: str) -> list[dict]:
    """A plain string as one turn, or a list of messages (checked; tool calls and results kept)."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(field, "empty")
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise RowError(field, f"expected str or a list of messages, got {type(value).__name__}")
    return convert_messages(value, field)


def _answered(turns: list[dict]) -> bool:
    return turns[-1]["role"] == "assistant" and bool(turns[-1]["content"].strip() or turns[-1].get("tool_calls"))


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
        if not _answered(turns):
            raise RowError(fields[side], "does not end with a non-empty assistant turn")
        out[side] = turns
    if out["chosen"] == out["rejected"]:
        raise RowError(fields["rejected"], "identical to chosen (no preference signal)")
    return with_tools_only(out, tools_of(row, columns))


def with_tools_only(out: dict, tools: list[dict]) -> dict:
    return {**out, "tools": tools} if tools else out


def _unpaired(row, columns):
    """TRL's unpaired preference rows (what KTO trains on): prompt, completion, label bool."""
    fields = {f: columns.get(f, f) for f in ("prompt", "completion", "label")}
    for key in fields.values():
        if row.get(key) is None:
            raise RowError(key, "missing")
    prompt = _turns(row[fields["prompt"]], fields["prompt"], "user")
    if prompt[-1]["role"] == "assistant":
        raise RowError(fields["prompt"], "prompt ends with an assistant turn")
    completion = _turns(row[fields["completion"]], fields["completion"], "assistant")
    if not _answered(completion):
        raise RowError(fields["completion"], "does not end with a non-empty assistant turn")
    if not isinstance(row[fields["label"]], bool):
        raise RowError(fields["label"], f"expected true (desirable) or false, got {row[fields['label']]!r}")
    return with_tools_only({"prompt": prompt, "completion": completion, "label": row[fields["label"]]},
                           tools_of(row, columns))


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
                       "preference pairs: prompt, chosen, rejected (strings or message lists)", "preference",
                       optional=("tools",)))
register_format(Format("unpaired", ("prompt", "completion", "label"), _unpaired,
                       "unpaired (KTO): prompt, completion, label true|false", "unpaired", optional=("tools",)))
register_format(Format("classification", ("text", "label"), _classification, "text, label", "classification"))
register_format(Format("text", ("text",), _text, "raw text for continued pre-training", "text"))

def detect(keys: set[str], columns: dict, kind: str | None = None) -> tuple[str, str]:
    """The format whose required fields the rows carry, and why it was chosen. ``kind``
    limits the choice to formats an objective trains on (sft, preference, ...)."""
    candidates = [f for f in FORMATS.values() if kind_fits(kind, f.kind)]
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
