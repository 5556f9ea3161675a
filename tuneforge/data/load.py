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

from tuneforge.config import MessagesOptions
from tuneforge.data import formats_other  # noqa: F401 - registers the preference, KTO and segments formats
from tuneforge.data import images  # noqa: F401 - registers the vision formats (rows with images)
from tuneforge.data.builtin import generate
from tuneforge.data.dataset_info import DatasetInfoError, is_dataset_info, names_error, resolve
from tuneforge.data.fields import unread_field
from tuneforge.data.formats import FORMATS, RowError, detect, kind_fits
from tuneforge.data.formats_tools import unknown_message_keys


class DataError(ValueError):
    """A problem that stops data loading (missing file, no usable rows, --strict)."""


class UnreadFieldError(DataError):
    """Rows carry a field with meaning that the chosen format does not read (MEANINGFUL)."""


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
    unknown_fields: Counter = field(default_factory=Counter)  # row field no format reads -> rows
    ignored_fields: Counter = field(default_factory=Counter)  # data.ignore_fields dropped -> rows
    split_pairs: int = 0  # preference pairs split into two unpaired rows each (KTO)

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
                "kind": self.kind, "sources": self.sources, "skipped_files": self.skipped,
                "unknown_fields": dict(self.unknown_fields), "ignored_fields": dict(self.ignored_fields),
                "split_pairs": self.split_pairs}

    def notes(self) -> list[str]:
        """What a reader should know besides drops: unknown, ignored fields and split pairs."""
        out = []
        if self.unknown_fields:
            out.append("unknown fields (not trained on): " + ", ".join(
                f"{k} ({n} rows)" for k, n in self.unknown_fields.most_common()))
        if self.ignored_fields:
            out.append("ignored fields (data.ignore_fields): " + ", ".join(
                f"{k} ({n} rows)" for k, n in self.ignored_fields.most_common()))
        if self.split_pairs:
            out.append(f"{self.split_pairs} pairs split into {2 * self.split_pairs} unpaired rows")
        return out


# A row this long is almost always a mistake (a whole corpus on one line, a binary blob);
# it is dropped and counted before parsing so it cannot exhaust memory downstream.
MAX_ROW_CHARS = 8_000_000


def _too_big(n: int) -> str:
    return f"row too large: {n / 1e6:.1f}M characters > {MAX_ROW_CHARS / 1e6:.0f}M limit"


NESTED = "nested too deeply: more levels of [ and { than Python's JSON reader follows"


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
        except RecursionError:  # json's decoder recurses once per level of [ or {
            yield Record(str(path), i, None, NESTED)
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
    except RecursionError:
        raise DataError(f"{path}: {NESTED}; a JSON array file is read whole, so one such row stops it: write the "
                        f"rows one object per line (.jsonl) to have them dropped and counted instead") from None
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
    if is_dataset_info(path):  # a catalogue of datasets, not rows: never read it as a JSON array
        try:
            raise DataError(names_error(path))
        except DatasetInfoError as e:
            raise DataError(str(e)) from None
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
                    kind: str | None = None, forced_by: str = "set by the user") -> dict[str, tuple[str, str]]:
    """The format of each source and why. Detection is per source so a folder may mix
    files of different shapes (alpaca JSONL beside a prompt/completion CSV)."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise DataError(f"unknown data.format '{fmt}'; known: {', '.join(FORMATS)}")
        if not kind_fits(kind, FORMATS[fmt].kind):
            fits = ", ".join(f.name for f in FORMATS.values() if kind_fits(kind, f.kind))
            raise DataError(f"data.format '{fmt}' holds {FORMATS[fmt].kind} rows but this objective trains on "
                            f"{kind} rows: use {fits}")
        return {r.source: (fmt, forced_by) for r in records}
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
    return out


def _refuse_meaningful(records: list[Record], formats: dict, how: dict, kind: str) -> None:
    """Before any row is converted (a row of another kind would only be dropped as malformed):
    a field with meaning that the source's format does not read stops loading."""
    seen: set = set()
    for rec in records:
        if rec.data is None or not formats[rec.source][0]:
            continue
        shape = (rec.source, frozenset(rec.data))  # rows of one shape are checked once
        if shape in seen:
            continue
        seen.add(shape)
        fmt = FORMATS[formats[rec.source][0]]
        problem = unread_field(rec.data.keys(), fmt.consumes(how[rec.source].columns), fmt.name, kind)
        if problem:
            raise UnreadFieldError(f"{rec.where}: {problem}")


@dataclass
class _Group:
    """The records of one data spec and how to read them (a dataset_info.json#NAME entry sets
    its own format, columns and message spelling)."""
    records: list
    fmt: str
    columns: dict
    messages: MessagesOptions | None
    forced_by: str = "set by the user"


def _group(spec: str, fmt: str, columns: dict, messages, text_unit: str, skipped,
           kind: str | None = None, ignore=()) -> _Group:
    try:
        info = resolve(spec)
    except DatasetInfoError as e:
        raise DataError(str(e)) from None
    if info is None:
        return _Group(list(read_records(spec, text_unit, skipped)), fmt, columns, messages)
    if info.rows is not None:
        records = [Record(spec, i, r) for i, r in enumerate(info.rows, 1)]
    else:
        records = [r for p in info.paths for r in read_records(p, text_unit, skipped)]
    entry_fmt, entry_cols = info.format, info.columns
    # An sft objective reads a KTO or ranking entry's conversation alone: its tag or answers
    # columns are then refused as meaningful (or dropped when ignored), never silently lost.
    tag = entry_cols.get("kto_tag")
    if entry_fmt in ("kto", "sharegpt_preference") and (
            (kind is not None and kind_fits(kind, "sft")) or (tag is not None and tag in ignore)):
        entry_fmt, entry_cols = "sharegpt", info.plain_columns
    return _Group(records, entry_fmt if fmt == "auto" else fmt, {**entry_cols, **columns},
                  info.messages or messages, f"{spec}: LLaMA-Factory dataset_info.json entry")


def _ignore(records: list[Record], ignore: set[str], report: LoadReport) -> None:
    if not ignore:
        return
    for rec in records:
        if rec.data is not None and ignore & rec.data.keys():
            for k in ignore & rec.data.keys():
                report.ignored_fields[k] += 1
            rec.data = {k: v for k, v in rec.data.items() if k not in ignore}


def _detect_group(g: _Group, kind: str | None) -> tuple[dict, bool]:
    """Formats per source, and whether preference pairs are split for an unpaired (KTO) objective."""
    try:
        return _detect_sources(g.records, g.fmt, g.columns, kind, g.forced_by), False
    except DataError as first:
        if kind != "unpaired":
            raise
        try:
            return _detect_sources(g.records, g.fmt, g.columns, "preference", g.forced_by), True
        except DataError:
            raise first from None  # neither kind: say what the unpaired objective wanted


def _split_pair(row: dict) -> list[dict]:
    """One preference pair -> a desirable and an undesirable unpaired row (KTO)."""
    extra = {"tools": row["tools"]} if row.get("tools") else {}
    return [{"prompt": row["prompt"], "completion": row["chosen"], "label": True, **extra},
            {"prompt": row["prompt"], "completion": row["rejected"], "label": False, **extra}]


def load_rows(specs: list[str], fmt: str = "auto", columns: dict | None = None, strict: bool = False,
              text_unit: str = "block", kind: str | None = None, messages: MessagesOptions | None = None,
              ignore_fields: list[str] | tuple = (), keep_columns: list[str] | tuple = ()):
    """Canonical rows (with their source and line) and the report of what was dropped.
    ``kind``: only formats of that kind (what the objective trains on); None: any.
    ``messages``: how chat rows spell their messages; ``ignore_fields``: row fields dropped first;
    ``keep_columns``: row fields no format reads that each row carries as bookkeeping in
    ``_columns`` (the group columns of a fairness evaluation), where the row has them."""
    columns = dict(columns or {})
    if messages is not None and messages.field and "messages" not in columns:
        columns["messages"] = messages.field
    skipped: dict | None = None if strict else {}
    groups = [_group(spec, fmt, columns, messages, text_unit, skipped, kind, ignore_fields) for spec in specs]
    records = [r for g in groups for r in g.records]
    report = LoadReport(read=len(records), skipped=skipped or {})
    if not records:
        raise DataError(f"no rows in {', '.join(specs)}: the data is empty"
                        + (f" (skipped: {skipped})" if skipped else ""))
    formats, how, split = {}, {}, set()
    for g in groups:
        _ignore(g.records, set(ignore_fields), report)
        found, pairs = _detect_group(g, kind)
        formats.update(found)
        how.update({r.source: g for r in g.records})
        split |= set(found) if pairs else set()
    kinds = {FORMATS[f].kind: s for s, (f, _) in formats.items() if f}
    if len(kinds) > 1:
        shown = ", ".join(f"{k} ({s})" for k, s in kinds.items())
        raise DataError(f"the inputs mix row kinds: {shown}; prepare each kind separately or set --format")
    names = list(dict.fromkeys(f for f, _ in formats.values() if f))
    report.format = "+".join(names)
    report.kind = "unpaired" if split else (FORMATS[names[0]].kind if names else "")
    reasons = list(dict.fromkeys(r for f, r in formats.values() if f))
    report.format_reason = reasons[0] if len(reasons) == 1 else "; ".join(
        f"{s}: {r}" for s, (f, r) in formats.items() if f)
    for source, (f, _) in formats.items():
        report.sources[source] = {"read": 0, "kept": 0, "format": f,
                                  "synthetic": source.startswith("builtin:")}
    _refuse_meaningful(records, formats, how, report.kind)
    rows = _convert_all(records, formats, how, split, report, strict, tuple(keep_columns))
    report.kept = sum(s["kept"] for s in report.sources.values())
    report.check()
    if not rows:
        shown = "; ".join(ex for exs in report.examples.values() for ex in exs[:1])
        raise DataError(f"no usable rows in {', '.join(specs)} ({report.read} read, all dropped): {shown}")
    return rows, report


def _count_unknown(data: dict, fmt, g: _Group, report: LoadReport) -> None:
    """Row fields, and message keys of a conversation, that the format does not read."""
    consumed = fmt.consumes(g.columns)
    report.unknown_fields.update(k for k in data if k not in consumed and not k.startswith("_"))
    if fmt.options:
        field = g.columns.get(fmt.required[0]) or (g.messages.field if g.messages and g.messages.field
                                                     else fmt.required[0])
        report.unknown_fields.update(f"{field}[].{k}" for k in unknown_message_keys(data.get(field), g.messages))


def _convert_all(records: list[Record], formats: dict, how: dict, split: set, report: LoadReport,
                 strict: bool, keep_columns: tuple = ()) -> list[dict]:
    rows = []
    for rec in records:
        src = report.sources[rec.source]
        src["read"] += 1
        if rec.data is None:
            reason, detail = _reason_key("row", rec.error), f"{rec.where}: {rec.error}"
        else:
            g = how[rec.source]
            fmt = FORMATS[formats[rec.source][0]]
            data = {**rec.data, "_source": rec.source} if fmt.wants_source else rec.data
            try:
                row = fmt.convert(data, g.columns, g.messages) if fmt.options else fmt.convert(data, g.columns)
            except RowError as e:
                reason, detail = _reason_key(e.field, e.reason), f"{rec.where}: field '{e.field}': {e.reason}"
            else:
                _count_unknown(rec.data, fmt, g, report)
                out = _split_pair(row) if rec.source in split else [row]
                report.split_pairs += len(out) > 1
                for i, r in enumerate(out):
                    # Each row keeps a unique "source:line" (prepare keys token lengths by it).
                    r["_where"] = rec.where if len(out) == 1 else f"{rec.where}{'ab'[i]}"
                    if rec.data.get("_synthetic") is True:  # written by `tuneforge data generate`
                        r["_synthetic"] = True
                    kept = {c: rec.data[c] for c in keep_columns if c in rec.data}
                    if kept:  # only the columns asked for: other fields may hold what no one should keep
                        r["_columns"] = kept
                rows.extend(out)
                src["kept"] += 1
                continue
        if strict:
            raise DataError(detail)
        report.drop(reason, detail)
    return rows
