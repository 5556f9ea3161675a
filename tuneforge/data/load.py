"""Read rows from files (JSONL, JSON array, CSV/TSV) or built-in generators, validate
them against a format, and account for every row: read = kept + sum of drop reasons."""

from __future__ import annotations

import csv
import re
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from tuneforge.data.formats import FORMATS, RowError, detect


class DataError(ValueError):
    """A problem that stops data loading (missing file, no usable rows, --strict)."""


@dataclass
class Record:
    source: str
    line: int  # 1-based line (JSONL), row (CSV, after the header) or index (JSON array)
    data: dict | None  # None when the row could not be parsed
    error: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class LoadReport:
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict = field(default_factory=dict)  # reason -> up to 3 "file:line field ..." strings
    format: str = ""
    format_reason: str = ""

    def drop(self, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(detail)

    def check(self) -> None:
        assert self.read == self.kept + sum(self.dropped.values()), "row accounting is off"

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "dropped": dict(self.dropped),
                "examples": self.examples, "format": self.format, "format_reason": self.format_reason}


def _read_jsonl(path: Path, text: str):
    lines = text.split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            last = i == len(lines) or (i == len(lines) - 1 and not lines[-1])
            why = "truncated last line" if last else "invalid JSON"
            yield Record(str(path), i, None, f"{why}: {e.msg} at column {e.colno}")
            continue
        if not isinstance(obj, dict):
            yield Record(str(path), i, None, f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield Record(str(path), i, obj)


def _read_json(path: Path, text: str):
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); for one object per line use .jsonl") from None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))  # {"data": [...]}
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of objects")
    for i, row in enumerate(obj, 1):
        if isinstance(row, dict):
            yield Record(str(path), i, row)
        else:
            yield Record(str(path), i, None, f"expected a JSON object, got {type(row).__name__}")


def _read_csv(path: Path, text: str, delimiter: str):
    reader = csv.reader(text.splitlines(), delimiter=delimiter)
    header = next(reader, None)
    if not header:
        return
    for i, row in enumerate(reader, 1):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            yield Record(str(path), i, None, f"ragged row: {len(row)} cells, header has {len(header)}")
            continue
        yield Record(str(path), i, dict(zip(header, row)))


def read_records(spec: str):
    """Yield Records from a file path or ``builtin:TASK?n=N&seed=S``."""
    if spec.startswith("builtin:"):
        from tuneforge.data.builtin import generate

        task, _, query = spec[len("builtin:"):].partition("?")
        try:
            rows = list(generate(task, **{k: int(v) for k, v in parse_qsl(query)}))
        except (ValueError, TypeError) as e:
            raise DataError(f"{spec}: {e} (form: builtin:TASK?n=800&seed=0)") from None
        for i, row in enumerate(rows, 1):
            yield Record(spec, i, row)
        return
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data file {path} does not exist (working directory: {Path.cwd()})")
    if path.is_dir():
        raise DataError(f"{path} is a folder; name the files (e.g. {path}/train.jsonl)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#x} at offset {e.start}); re-encode the file as UTF-8"
        ) from None
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl(path, text)
    elif suffix == ".json":
        yield from _read_json(path, text)
    elif suffix in (".csv", ".tsv"):
        yield from _read_csv(path, text, "\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json, .csv or .tsv)")


def _reason_key(field: str, reason: str) -> str:
    """A reason without row-specific details, to count alike rows together."""
    head = re.split(r" \(|'|:|\d", reason)[0].strip()
    return f"{field.split('[')[0]}: {head}"


def load_rows(specs: list[str], fmt: str = "auto", columns: dict | None = None, strict: bool = False,
              kind: str = "chat"):
    """Canonical rows (with their source and line) and the report of what was dropped.
    ``kind`` is what the objective trains on (see ``Format.kind``)."""
    columns = columns or {}
    records = [r for spec in specs for r in read_records(spec)]
    report = LoadReport(read=len(records))
    if not records:
        raise DataError(f"no rows in {', '.join(specs)}: the data is empty")
    if fmt == "auto":
        keys = set().union(*(r.data.keys() for r in records[:200] if r.data))
        try:
            fmt, report.format_reason = detect(keys, columns, kind)
        except RowError as e:
            raise DataError(f"{specs[0]}: {e.reason}") from None
    elif fmt not in FORMATS:
        raise DataError(f"unknown data.format '{fmt}'; known: {', '.join(FORMATS)}")
    elif FORMATS[fmt].kind != kind:
        fits = ", ".join(f.name for f in FORMATS.values() if f.kind == kind)
        raise DataError(f"data.format '{fmt}' holds {FORMATS[fmt].kind} rows but this objective trains on "
                        f"{kind} rows: use {fits}")
    else:
        report.format_reason = "set in config"
    report.format = fmt
    convert = FORMATS[fmt].convert
    rows = []
    for rec in records:
        if rec.data is None:
            reason, detail = _reason_key("row", rec.error), f"{rec.where}: {rec.error}"
        else:
            try:
                row = convert(rec.data, columns)
            except RowError as e:
                reason, detail = _reason_key(e.field, e.reason), f"{rec.where}: field '{e.field}': {e.reason}"
            else:
                row["_where"] = rec.where
                rows.append(row)
                continue
        if strict:
            raise DataError(detail)
        report.drop(reason, detail)
    report.kept = len(rows)
    report.check()
    if not rows:
        shown = "; ".join(ex for exs in report.examples.values() for ex in exs[:1])
        raise DataError(f"no usable rows in {', '.join(specs)} ({report.read} read, all dropped): {shown}")
    return rows, report
