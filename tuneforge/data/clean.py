"""Cleaning: unicode normalisation, control characters, whitespace, length and language
filters. Every text field of a canonical row is cleaned (``formats.map_texts``); names
(roles, labels) are left alone. Each function is pure; ``clean_rows`` counts what it did."""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tuneforge.data.formats import map_texts, row_texts
from tuneforge.data.manifest import Stage


class CleanOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normalize: Literal["NFC", "NFKC", "none"] = Field(
        "NFC", description="NFKC also folds compatibility forms (full-width letters, ligatures, superscripts)")
    control_chars: bool = Field(True, description="remove control and zero-width characters (keeps \\n and \\t)")
    whitespace: bool = Field(True, description="strip fields, collapse runs of spaces and of blank lines")
    min_chars: int = Field(1, ge=0, description="drop rows whose text fields total fewer characters")
    max_chars: int | None = Field(None, gt=0, description="drop rows whose text fields total more characters")
    languages: list[str] = Field([], description="keep only rows in these ISO 639-1 languages (py3langid)")


# Cc (controls) except tab/newline, plus the format characters that are invisible noise in
# scraped text (zero-width space/joiners, BOM, soft hyphen, bidi marks).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060\ufeff]")
_SPACES = re.compile(r"[^\S\n]+")  # horizontal whitespace (incl. NBSP) but not newlines
_BLANKS = re.compile(r"\n\s*\n(\s*\n)+")


def clean_text(s: str, opts: CleanOptions) -> str:
    if opts.normalize != "none" and not s.isascii():  # ASCII is already in every normal form
        s = unicodedata.normalize(opts.normalize, s)
    if opts.control_chars:
        s = _CONTROL.sub("", s.replace("\r\n", "\n").replace("\r", "\n"))
    if opts.whitespace:
        s = _BLANKS.sub("\n\n", _SPACES.sub(" ", s))
        s = "\n".join(line.strip() for line in s.split("\n")).strip()
    return s


def language_of(text: str) -> str:
    import py3langid  # deferred: loads its language model on import; only the language filter needs it

    return py3langid.classify(text[:2000])[0]


def clean_rows(rows: list[dict], opts: CleanOptions) -> tuple[list[dict], Stage]:
    stage = Stage("clean", input=len(rows), info=opts.model_dump())
    out = []
    for row in rows:
        new = map_texts(row, lambda s: clean_text(s, opts))
        where = row.get("_where", "?")
        if new != row:
            stage.changed["normalised"] += 1
        texts = row_texts(new)
        n = sum(map(len, texts))
        # Emptiness is judged on the fields that must carry text (a conversation's last answer,
        # a document), after cleaning; an empty optional system prompt is harmless.
        if any(not t for t in _required_texts(new)):
            stage.drop("empty after cleaning", f"{where}: a required text field is empty after cleaning")
        elif n < opts.min_chars:
            stage.drop("shorter than min_chars", f"{where}: {n} characters < {opts.min_chars}")
        elif opts.max_chars and n > opts.max_chars:
            stage.drop("longer than max_chars", f"{where}: {n} characters > {opts.max_chars}")
        elif opts.languages and (lang := language_of(" ".join(texts))) not in opts.languages:
            stage.drop(f"language not in {','.join(opts.languages)}", f"{where}: detected '{lang}'")
        else:
            out.append(new)
    stage.kept = len(out)
    return out, stage.check()


def _said(m: dict) -> str:
    # A turn that calls tools says it with the calls (its content may be ""): it counts as text.
    return m["content"] or ("(tool call)" if m.get("tool_calls") else "")


def _required_texts(row: dict) -> list[str]:
    # Tool results may be empty (a function that returns nothing); other turns must say something.
    if "messages" in row:
        return [_said(m) for m in row["messages"] if m["role"] not in ("system", "tool")]
    if "chosen" in row or "completion" in row:
        answers = ("chosen", "rejected") if "chosen" in row else ("completion",)
        last = row["prompt"][-1]
        return [_said(row[k][-1]) for k in answers] + ([] if last["role"] == "tool" else [_said(last)])
    if "segments" in row:
        return ["".join(s["text"] for s in row["segments"] if s["label"])]
    return [row["text"]]
