"""Formats of other tools' preference, KTO and template-free rows (registered on import;
``load.py`` imports this module so every loader sees them).

- ``sharegpt_preference`` / ``chat_preference``: LLaMA-Factory's ranking rows, a conversation
  (``conversations`` or ``messages``) and ``chosen`` / ``rejected`` answers, each one message
  object ``{"from": "gpt", "value": ...}`` (or a message list, or a string) -> preference.
- ``kto`` / ``kto_label``: a conversation ending with the answer and a bool ``kto_tag``
  (LLaMA-Factory's name; its demo file calls the column ``label``) -> unpaired.
- ``segments``: Axolotl's ``input_output`` rows ``{"segments": [{"label", "text"}]}``.
"""

from __future__ import annotations

from tuneforge.data.errors import RowError
from tuneforge.data.formats import Format, _with_system_column, register_format
from tuneforge.data.formats_tools import check_turns, convert_messages, tools_of


def _conversation(row, columns, opts, default: str) -> tuple[list[dict], str]:
    field = columns.get(default, opts.field if opts is not None and opts.field else default)
    if row.get(field) is None:
        raise RowError(field, "missing")
    return _with_system_column(convert_messages(row[field], field, opts), row, columns), field


def _answer(value, field: str, opts) -> list[dict]:
    """A chosen/rejected answer: one message object, a message list, or a plain string."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(field, "empty")
        return [{"role": "assistant", "content": value}]
    turns = convert_messages([value] if isinstance(value, dict) else value, field, opts)
    if not turns or turns[-1]["role"] != "assistant" or not (turns[-1]["content"].strip()
                                                               or turns[-1].get("tool_calls")):
        raise RowError(field, "does not end with a non-empty assistant turn")
    return turns


def _ranked(default: str):
    def convert(row, columns, opts=None):
        prompt, field = _conversation(row, columns, opts, default)
        if not prompt or prompt[-1]["role"] == "assistant":
            raise RowError(field, "the conversation before the answers must end with a user or tool turn")
        out: dict = {"prompt": prompt}
        for side in ("chosen", "rejected"):
            key = columns.get(side, side)
            if row.get(key) is None:
                raise RowError(key, "missing")
            out[side] = _answer(row[key], key, opts)
        if out["chosen"] == out["rejected"]:
            raise RowError(columns.get("rejected", "rejected"), "identical to chosen (no preference signal)")
        tools = tools_of(row, columns)
        return {**out, "tools": tools} if tools else out
    return convert


def _kto(tag: str):
    def convert(row, columns, opts=None):
        msgs, field = _conversation(row, columns, opts, "messages")
        check_turns(msgs, field)
        key = columns.get(tag, tag)
        label = row.get(key)
        if not isinstance(label, bool):
            raise RowError(key, f"expected true (desirable) or false (undesirable), got {label!r}")
        out = {"prompt": msgs[:-1], "completion": msgs[-1:], "label": label}
        if not out["prompt"]:
            raise RowError(field, "no prompt before the answer")
        tools = tools_of(row, columns)
        return {**out, "tools": tools} if tools else out
    return convert


def _segments(row, columns):
    key = columns.get("segments", "segments")
    value = row.get(key)
    if not isinstance(value, list) or not value:
        raise RowError(key, "expected a non-empty list of {label, text} segments")
    out = []
    for i, s in enumerate(value):
        if not isinstance(s, dict) or not isinstance(s.get("text"), str):
            raise RowError(f"{key}[{i}].text", "each segment needs a text string")
        if not isinstance(s.get("label"), bool):
            raise RowError(f"{key}[{i}].label", f"expected true (trained) or false, got {s.get('label')!r}")
        out.append({"text": s["text"], "label": s["label"]})
    if not any(s["label"] and s["text"].strip() for s in out):
        raise RowError(key, "no segment is trained (label true with text)")
    return {"segments": out}


register_format(Format("sharegpt_preference", ("conversations", "chosen", "rejected"), _ranked("conversations"),
                       "LLaMA-Factory ranking: conversations, chosen/rejected message objects", "preference",
                       optional=("system", "tools"), options=True))
register_format(Format("chat_preference", ("messages", "chosen", "rejected"), _ranked("messages"),
                       "messages, chosen/rejected message objects or lists", "preference",
                       optional=("system", "tools"), options=True))
register_format(Format("kto", ("messages", "kto_tag"), _kto("kto_tag"),
                       "KTO: messages ending with the answer, kto_tag true|false", "unpaired",
                       optional=("system", "tools"), options=True))
register_format(Format("kto_label", ("messages", "label"), _kto("label"),
                       "KTO (LLaMA-Factory's kto demo): messages ending with the answer, label true|false",
                       "unpaired", optional=("system", "tools"), options=True))
register_format(Format("segments", ("segments",), _segments,
                       "Axolotl input_output: segments=[{label, text}] (label true = trained)", "segments"))
