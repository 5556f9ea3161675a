"""Read rows from files (JSONL, JSON array, CSV/TSV, Parquet, plain text), saved Hugging
Face ``datasets`` folders, folders of mixed files or built-in generators; validate them
against a format (detected per source) and account for every row:
read = kept + sum of drop reasons. Files a folder holds that cannot be read are listed
with the reason (``LoadReport.skipped``), never silently passed over."""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from tuneforge.data.builtin import generate
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
    kind: str = ""  # sft | preference | classification | text (see formats.py)
    sources: dict = field(default_factory=dict)  # source -> {"read", "kept", "format", "synthetic"}
    skipped: dict = field(default_factory=dict)  # file in a folder -> why it was not read

    def drop(self, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(detail)

    def check(self) -> None:
        assert self.read == self.kept + sum(self.dropped.values()), "row accounting is off"

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "dropped": dict(self.dropped),
                "examples": self.examples, "format": self.format, "format_reason": self.format_reason,
                "kind": self.kind, "sources": self.sources, "skipped_files": self.skipped}


# A row this long is almost always a mistake (a whole corpus on one line, a binary blob);
# it is dropped and counted before parsing so it cannot exhaust memory downstream.
MAX_ROW_CHARS = 8_000_000


def _too_big(n: int) -> str:
    return f"row too large: {n / 1e6:.1f}M characters > {MAX_ROW_CHARS / 1e6:.0f}M limit"


def _read_jsonl(path: Path, text: str):
    lines = text.split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if len(line) > MAX_ROW_CHARS:
            yield Record(str(path), i, None, _too_big(len(line)))
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
    # The csv module refuses fields over 128 KB with an exception; size is checked per row below.
    csv.field_size_limit(sys.maxsize)
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
        if sum(map(len, row)) > MAX_ROW_CHARS:
            yield Record(str(path), i, None, _too_big(sum(map(len, row))))
            continue
        yield Record(str(path), i, dict(zip(header, row)))


def _read_text(path: Path, text: str, unit: str):
    """Plain text as ``{"text": ...}`` rows: the whole file, or each blank-line-separated block."""
    if unit == "file":
        blocks = [(1, text)]
    else:
        blocks, start, buf = [], 1, []
        for i, line in enumerate(text.split("\n"), 1):
            if line.strip():
                if not buf:
                    start = i
                buf.append(line)
            elif buf:
                blocks.append((start, "\n".join(buf)))
                buf = []
        if buf:
            blocks.append((start, "\n".join(buf)))
    for line, block in blocks:
        if not block.strip():
            continue
        if len(block) > MAX_ROW_CHARS:
            yield Record(str(path), line, None, _too_big(len(block)))
        else:
            yield Record(str(path), line, {"text": block.strip("\n")})


def _read_parquet(path: Path):
    import pyarrow as pa  # deferred: only parquet files need it
    import pyarrow.parquet as pq  # deferred: only parquet files need it

    try:
        pf = pq.ParquetFile(path)
        i = 0
        for batch in pf.iter_batches(batch_size=10_000):
            for row in batch.to_pylist():
                i += 1
                yield Record(str(path), i, row)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _read_hf_dir(path: Path):
    """A folder written by ``datasets``' ``save_to_disk``; each split is its own source.
    ClassLabel columns are read as their names (the canonical label is a class name)."""
    from datasets import ClassLabel, DatasetDict, load_from_disk  # deferred: heavy, and only this path needs it

    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the message is what matters
        raise DataError(f"{path}: could not load the saved datasets folder ({e})") from None
    parts = ds.items() if isinstance(ds, DatasetDict) else [(None, ds)]
    for split, part in parts:
        source = f"{path}[{split}]" if split else str(path)
        names = {k: f.names for k, f in part.features.items() if isinstance(f, ClassLabel)}
        for i, row in enumerate(part, 1):
            for k, labels in names.items():
                if isinstance(row.get(k), int) and 0 <= row[k] < len(labels):
                    row[k] = labels[row[k]]
            yield Record(source, i, row)


READERS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
           ".parquet": "parquet", ".txt": "text", ".md": "text"}


def _files_in(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """Readable files of a folder (recursively, sorted) and the reason each other file is skipped."""
    files, skipped = [], {}
    for p in sorted(folder.rglob("*")):
        if p.is_dir() or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if p.suffix.lower() in READERS:
            files.append(p)
        else:
            skipped[str(p)] = f"unsupported file type '{p.suffix or '(none)'}'"
    return files, skipped


def read_records(spec: str, text_unit: str = "block", skipped: dict | None = None):
    """Yield Records from a file, a folder (saved ``datasets`` folder, or files of mixed
    formats) or ``builtin:TASK?n=N&seed=S``. Files of a folder that cannot be read are
    recorded in ``skipped`` (file -> reason) instead of stopping the whole load."""
    if spec.startswith("builtin:"):
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
        if is_hf_dataset_dir(path):
            yield from _read_hf_dir(path)
            return
        files, skip = _files_in(path)
        if skipped is None and skip:
            raise DataError(f"{path}: cannot read {', '.join(f'{k} ({v})' for k, v in skip.items())}")
        if skipped is not None:
            skipped.update(skip)
        if not files:
            raise DataError(f"{path}: no readable files (supported: {', '.join(sorted(READERS))})")
        for f in files:
            try:
                yield from read_records(str(f), text_unit, skipped)
            except DataError as e:
                if skipped is None:
                    raise
                skipped[str(f)] = str(e)
        return
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use {', '.join(sorted(READERS))})")
    if suffix == ".parquet":
        yield from _read_parquet(path)
        return
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#x} at offset {e.start}); re-encode the file as UTF-8"
        ) from None
    if not text.strip():
        # Said, not silently passed over: one empty file among several inputs is skipped and listed.
        if skipped is None:
            raise DataError(f"{path}: the file is empty")
        skipped[str(path)] = "empty file"
        return
    if suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl(path, text)
    elif suffix == ".json":
        yield from _read_json(path, text)
    elif suffix in (".csv", ".tsv"):
        yield from _read_csv(path, text, "\t" if suffix == ".tsv" else ",")
    else:
        yield from _read_text(path, text, text_unit)


def _reason_key(field: str, reason: str) -> str:
    """A reason without row-specific details, to count alike rows together."""
    head = re.split(r" \(|'|:|\d", reason)[0].strip()
    return f"{field.split('[')[0]}: {head}"


def _detect_sources(records: list[Record], fmt: str, columns: dict,
                    kind: str | None = None) -> dict[str, tuple[str, str]]:
    """The format of each source and why. Detection is per source so a folder may mix
    files of different shapes (alpaca JSONL beside a prompt/completion CSV)."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise DataError(f"unknown data.format '{fmt}'; known: {', '.join(FORMATS)}")
        if kind is not None and FORMATS[fmt].kind != kind:
            fits = ", ".join(f.name for f in FORMATS.values() if f.kind == kind)
            raise DataError(f"data.format '{fmt}' holds {FORMATS[fmt].kind} rows but this objective trains on "
                            f"{kind} rows: use {fits}")
        return {r.source: (fmt, "set by the user") for r in records}
    keys: dict[str, set] = {}
    for r in records:
        seen = keys.setdefault(r.source, set())
        if r.data is not None and len(seen) < 10_000:
            seen.update(r.data.keys())
    out = {}
    for source, ks in keys.items():
        if not ks:  # every row of the source is unreadable: each is dropped with its own reason
            out[source] = ("", "no readable row")
            continue
        try:
            out[source] = detect(ks, columns, kind)
        except RowError as e:
            if kind is not None:  # say so when the rows are fine, only of another kind
                try:
                    other, _ = detect(ks, columns)
                except RowError:
                    pass
                else:
                    raise DataError(f"{source} holds {FORMATS[other].kind} rows ({other}); this objective "
                                    f"trains on {kind} rows (set objective.name to match the data)") from None
            raise DataError(f"{source}: {e.reason}") from None
    kinds = {FORMATS[f].kind: s for s, (f, _) in out.items() if f}
    if len(kinds) > 1:
        shown = ", ".join(f"{k} ({s})" for k, s in kinds.items())
        raise DataError(f"the inputs mix row kinds: {shown}; prepare each kind separately or set --format")
    return out


def load_rows(specs: list[str], fmt: str = "auto", columns: dict | None = None, strict: bool = False,
              text_unit: str = "block", kind: str | None = None):
    """Canonical rows (with their source and line) and the report of what was dropped.
    ``kind``: only formats of that kind (what the objective trains on); None: any."""
    columns = columns or {}
    skipped: dict | None = None if strict else {}
    records = [r for spec in specs for r in read_records(spec, text_unit, skipped)]
    report = LoadReport(read=len(records), skipped=skipped or {})
    if not records:
        raise DataError(f"no rows in {', '.join(specs)}: the data is empty"
                        + (f" (skipped: {skipped})" if skipped else ""))
    formats = _detect_sources(records, fmt, columns, kind)
    names = list(dict.fromkeys(f for f, _ in formats.values() if f))
    report.format = "+".join(names)
    report.kind = FORMATS[names[0]].kind if names else ""
    reasons = list(dict.fromkeys(r for f, r in formats.values() if f))
    report.format_reason = reasons[0] if len(reasons) == 1 else "; ".join(
        f"{s}: {r}" for s, (f, r) in formats.items() if f)
    for source, (f, _) in formats.items():
        report.sources[source] = {"read": 0, "kept": 0, "format": f,
                                  "synthetic": source.startswith("builtin:")}
    rows = []
    for rec in records:
        src = report.sources[rec.source]
        src["read"] += 1
        if rec.data is None:
            reason, detail = _reason_key("row", rec.error), f"{rec.where}: {rec.error}"
        else:
            try:
                row = FORMATS[formats[rec.source][0]].convert(rec.data, columns)
            except RowError as e:
                reason, detail = _reason_key(e.field, e.reason), f"{rec.where}: field '{e.field}': {e.reason}"
            else:
                row["_where"] = rec.where
                if rec.data.get("_synthetic") is True:  # written by `tuneforge data generate`
                    row["_synthetic"] = True
                rows.append(row)
                src["kept"] += 1
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
