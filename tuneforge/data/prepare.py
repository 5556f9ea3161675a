"""Turn the config's data section into train/validation/test rows, seeded and leak-free."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from tuneforge.config import DataConfig, MessagesOptions, Strict
from tuneforge.data.builtin import paraphrase_rows
from tuneforge.data.clean import CleanOptions, clean_rows
from tuneforge.data.dedup import DedupOptions, exact_dedup, near_dedup
from tuneforge.data.formats import kind_fits, row_texts
from tuneforge.data.lengths import length_histogram, length_stats, overlength_stage, shape_stats, token_lengths
from tuneforge.data.load import DataError, LoadReport, UnreadFieldError, load_rows
from tuneforge.data.manifest import (
    MANIFEST,
    SPLITS,
    Stage,
    is_prepared,
    made_by_prepare,
    read_manifest,
    rows_sha256,
    source_entry,
    timed,
)
from tuneforge.data.pii import PIIOptions, pii_rows
from tuneforge.data.report import plot_lengths, render_report
from tuneforge.data.split import SplitOptions, leakage_stage, prompt_signatures, split_indices, stratum_targets
from tuneforge.io import atomic_dir, check_output, sha256_file, write_json
from tuneforge.models.load import load_tokenizer


@dataclass
class Splits:
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    reports: dict[str, LoadReport]
    prepared: dict | None = None  # {"path", "manifest_sha256"} when read from a prepared folder
    pii: dict = field(default_factory=dict)  # split -> the PII stage's counts (raw files only)

    def manifest_hash(self) -> str:
        """sha256 over the canonical rows of every split: the data's identity in the lineage."""
        h = hashlib.sha256()
        for name in ("train", "validation", "test"):
            for row in getattr(self, name):
                h.update(name.encode())
                h.update(json.dumps(_content(row), sort_keys=True).encode())
        return h.hexdigest()


def _content(row: dict):
    # A chat row without tools hashes as its messages alone (as before tools existed).
    if "messages" in row and not any(k in row for k in ("tools", "parallel_tool_calls")):
        return row["messages"]
    return {k: v for k, v in row.items() if k not in ("_where", "_columns")}


def _prompt_key(row: dict) -> str:
    # Chat rows group by the conversation before the answer (and the tools it may call);
    # other kinds by their input.
    if "messages" in row:
        key = row["messages"][:-1] if "tools" not in row else [row["tools"], row["messages"][:-1]]
        return json.dumps(key, sort_keys=True)
    if "segments" in row:
        return json.dumps([s for s in row["segments"] if not s["label"]], sort_keys=True)
    key = row.get("prompt", row.get("text"))
    return json.dumps(key if "tools" not in row else [row["tools"], key], sort_keys=True)


def split_by_prompt(rows: list[dict], sizes: list[float], seed: int) -> list[list[dict]]:
    """Seeded split into len(sizes)+1 parts; rows sharing a prompt stay on one side
    (otherwise a duplicated prompt in train and test leaks the answer).

    Classification rows (they carry a ``label``) are split per label, each part taking
    its share of every class: unstratified, a small held-out split can miss a class or
    take most of one, and its accuracy then says little about the model. A group of equal
    prompts counts under its first row's label (one prompt under two labels is rare).
    Other rows form a single stratum, which is the plain seeded split."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(_prompt_key(r), []).append(r)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    stratified = bool(rows) and all("label" in r for r in rows)
    strata: dict[str, list[str]] = {}
    for k in keys:
        strata.setdefault(str(groups[k][0]["label"]) if stratified else "", []).append(k)
    counts = {s: sum(len(groups[k]) for k in ks) for s, ks in strata.items()}
    targets = [stratum_targets(size, len(rows), counts) for size in sizes]  # per stratum, summing to size * rows
    parts: list[list[dict]] = [[] for _ in range(len(sizes) + 1)]
    for s in sorted(strata):
        got = [0] * len(sizes)
        for k in strata[s]:
            for i, t in enumerate(targets):
                if got[i] < t[s]:
                    parts[i].extend(groups[k])
                    got[i] += len(groups[k])
                    break
            else:
                parts[-1].extend(groups[k])
    return parts


# The format that reads back each kind of canonical row from a prepared folder.
CANONICAL_FORMAT = {"sft": "chat", "vision": "vision_chat", "preference": "preference", "classification": "classification",
                    "text": "text", "unpaired": "unpaired", "segments": "segments"}


def load_prepared(folder: str, data: DataConfig, kind: str = "sft") -> Splits:
    """The splits of a folder written by ``tuneforge data prepare`` (its own split is kept)."""
    manifest = read_manifest(folder)
    if not kind_fits(kind, manifest.get("kind", "")):
        raise DataError(f"{folder} holds {manifest.get('kind')} rows; this objective trains on {kind} rows")
    if data.validation or data.test:
        raise DataError(f"{folder} is a prepared folder with its own validation/test splits; "
                        "remove data.validation and data.test")
    parts, reports = {}, {}
    for name in SPLITS:
        path = Path(folder) / f"{name}.jsonl"
        has_rows = path.is_file() and path.stat().st_size > 0
        parts[name], reports[name] = (load_rows([str(path)], CANONICAL_FORMAT[manifest["kind"]]) if has_rows
                                      else ([], LoadReport()))
    if not parts["train"]:
        raise DataError(f"{folder}: train.jsonl is empty")
    return Splits(parts["train"], parts["validation"], parts["test"], reports,
                  prepared={"path": str(folder), "manifest_sha256": sha256_file(Path(folder) / MANIFEST)})


def build_splits(data: DataConfig, seed: int, kind: str = "sft", keep_columns: list[str] | tuple = ()) -> Splits:
    """``kind``: the rows the objective trains on (sft, preference, classification, text);
    ``keep_columns``: raw row fields carried in each row's ``_columns`` (not in the manifest
    hash: asking for them does not change the data's identity). A prepared folder has none:
    its rows hold only what the format reads."""
    if len(data.train) == 1 and is_prepared(data.train[0]):
        return load_prepared(data.train[0], data, kind)
    reports, pii = {}, {}
    how = {"kind": kind, "messages": data.messages, "ignore_fields": data.ignore_fields,
           "keep_columns": keep_columns}

    def load(name: str, specs: list[str]) -> list[dict]:
        rows, reports[name] = load_rows(specs, data.format, data.columns, **how)
        if data.pii == "off":
            return rows
        # The same pass as `data prepare`, so training on raw files never learns personal data unseen.
        rows, stage = pii_rows(rows, PIIOptions(action=data.pii))
        pii[name] = stage.as_dict()
        return rows

    train = load("train", data.train)
    validation = load("validation", data.validation) if data.validation else []
    test = load("test", data.test) if data.test else []
    carve = [(name, size) for name, size, given in (("validation", data.val_size, data.validation),
                                                    ("test", data.test_size, data.test)) if not given and size > 0]
    if carve:
        *held, train = split_by_prompt(train, [s for _, s in carve], seed)
        for (name, _), part in zip(carve, held):
            if name == "validation":
                validation = part
            else:
                test = part
    if not train:
        raise DataError("no training rows left after holding out validation/test rows")
    return Splits(train, validation, test, reports, pii=pii)


# --- the `tuneforge data prepare` recipe ------------------------------------------------
# load -> clean -> redact -> de-duplicate -> token lengths -> split -> leakage -> augment
# -> report -> write. Each step returns its rows and a Stage with its counts; the folder
# is written in one atomic rename at the end.


class PrepareOptions(Strict):
    inputs: list[str]
    validation_inputs: list[str] = Field([], description="held-out rows given as files (not carved from inputs)")
    test_inputs: list[str] = []
    task: Literal["auto", "sft", "preference", "unpaired", "classification", "text"] = Field(
        "auto", description="the row kind expected: detection picks among its formats (unpaired: preference "
        "pairs are split into a desirable and an undesirable row)")
    format: str = "auto"
    columns: dict[str, str] = {}
    messages: MessagesOptions = MessagesOptions()
    ignore_fields: list[str] = Field([], description="row fields dropped before loading (counted)")
    text_unit: Literal["block", "file"] = Field("block", description="plain text: one row per blank-line block or per file")
    strict: bool = Field(False, description="fail on the first bad row instead of dropping and counting it")
    clean: CleanOptions = CleanOptions()
    pii: PIIOptions = PIIOptions()
    dedup: DedupOptions = DedupOptions()
    split: SplitOptions = SplitOptions()
    tokenizer: str | None = Field(None, description="embedded alias, local folder or hub id for the token report")
    max_length: int = Field(2048, gt=0)
    min_tokens: int = Field(0, ge=0)
    overlength: Literal["drop", "truncate"] = "drop"
    augment: int = Field(0, ge=0, description="template paraphrases added per train row (sft only), marked synthetic")


def _filter(rows: list[dict], opts: PrepareOptions, pool: str, tok, known: dict[str, int]
            ) -> tuple[list[dict], list[Stage]]:
    """Clean, redact, de-duplicate and length-filter one pool. ``known`` collects each row's
    token count (by ``_where``) so the report does not tokenize the rows a second time."""
    stages = []
    rows, st = timed(clean_rows, rows, opts.clean)
    stages.append(st)
    if opts.pii.action != "off":
        rows, st = timed(pii_rows, rows, opts.pii)
        stages.append(st)
    if opts.dedup.exact:
        rows, st = timed(exact_dedup, rows)
        stages.append(st)
    if opts.dedup.near and len(rows) > 1:
        rows, st = timed(near_dedup, rows, opts.dedup)
        stages.append(st)
    if tok is not None and rows:
        def measure_and_filter(rows):
            lengths = token_lengths(tok, rows)
            known.update(zip((r["_where"] for r in rows), lengths.tolist()))
            return overlength_stage(rows, lengths, opts.max_length, opts.overlength, opts.min_tokens)

        rows, st = timed(measure_and_filter, rows)
        stages.append(st)
    for st in stages:
        st.info["pool"] = pool
    return rows, stages


def _load(specs: list[str], opts: PrepareOptions, pool: str) -> tuple[list[dict], LoadReport, Stage]:
    t, cpu = time.perf_counter(), time.process_time()
    how = {"strict": opts.strict, "text_unit": opts.text_unit, "messages": opts.messages,
           "ignore_fields": opts.ignore_fields}
    try:  # --task picks among its kind's formats (and splits pairs for unpaired)
        rows, rep = load_rows(specs, opts.format, opts.columns, kind=None if opts.task == "auto" else opts.task,
                              **how)
    except UnreadFieldError:
        raise
    except DataError:
        if opts.task == "auto":
            raise
        rows, rep = load_rows(specs, opts.format, opts.columns, **how)  # to say what the rows are instead
    if opts.task != "auto" and not kind_fits(opts.task, rep.kind):
        raise DataError(f"{pool}: --task {opts.task} but the rows are {rep.kind} rows ({rep.format_reason}); "
                        f"set --format or map columns with --column FIELD=COLUMN")
    for r in rows:
        r["_synthetic"] = r.get("_synthetic", False) or rep.sources[r["_where"].rsplit(":", 1)[0]]["synthetic"]
    # Split pairs (KTO) add rows: the load stage keeps the rows it hands on, and says how many were added.
    stage = Stage("load", input=rep.read + rep.split_pairs, kept=len(rows), dropped=Counter(rep.dropped),
                  examples=rep.examples,
                  info={"pool": pool, "format": rep.format, "format_reason": rep.format_reason,
                        "unknown_fields": dict(rep.unknown_fields), "ignored_fields": dict(rep.ignored_fields),
                        "split_pairs": rep.split_pairs, "notes": rep.notes(),
                        "seconds": round(time.perf_counter() - t, 3),
                        "cpu_seconds": round(time.process_time() - cpu, 3)})
    return rows, rep, stage.check()


@contextlib.contextmanager
def _no_cyclic_gc():
    """Rows are acyclic dicts freed by reference counting; the cyclic collector would only
    rescan millions of them again and again (time growing faster than the row count)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def input_paths(opts: PrepareOptions) -> list[Path]:
    """The files and folders the inputs are read from (builtin: tasks have none)."""
    specs = [*opts.inputs, *opts.validation_inputs, *opts.test_inputs]
    return [Path(s.split("#", 1)[0]) for s in specs if not s.startswith("builtin:")]


def prepare(opts: PrepareOptions, out_dir: Path, console=None, overwrite: bool = False) -> dict:
    """Run the whole preparation and write ``out_dir``; returns the manifest.

    ``out_dir`` must be new, empty, or (with ``overwrite``) a folder this command wrote; it
    may not be, contain or lie inside an input. Checked before any work and again at the write."""
    out_dir = Path(out_dir)
    check_output(out_dir, made_by_prepare, overwrite=overwrite, what="prepared folder", inputs=input_paths(opts))
    with _no_cyclic_gc():
        return _prepare(opts, out_dir, console, overwrite)


def _prepare(opts: PrepareOptions, out_dir: Path, console=None, overwrite: bool = False) -> dict:
    say = console.print if console else (lambda *a, **k: None)
    tok = None
    if opts.tokenizer:
        tok = load_tokenizer(opts.tokenizer)

    # --- load and filter each pool (the inputs, and any held-out files) -----------------
    pools: dict[str, list[str]] = {"inputs": opts.inputs, "validation": opts.validation_inputs,
                                   "test": opts.test_inputs}
    rows, stages, reports, kinds, known = {}, [], {}, set(), {}
    for pool, specs in pools.items():
        if not specs:
            continue
        loaded, reports[pool], st = _load(specs, opts, pool)
        kinds.add(reports[pool].kind)
        rows[pool], more = _filter(loaded, opts, pool, tok, known)
        stages += [st, *more]
        say(f"{pool}: {reports[pool].read} read -> {len(rows[pool])} kept after filters")
        for note in reports[pool].notes():
            say(f"{pool}: {note}")
    if len(kinds) > 1:
        raise DataError(f"inputs and held-out files hold different row kinds: {sorted(kinds)}")
    kind = kinds.pop()

    # --- split and leakage --------------------------------------------------------------
    split_opts = opts.split.model_copy(update={name: 0 for name in ("validation", "test") if pools[name]})
    if not rows["inputs"]:
        drops = "; ".join(f"{s.name}: {dict(s.dropped)}" for s in stages if s.dropped)
        raise DataError(f"every input row was dropped ({drops})")
    # Prompt signatures are computed once: the split groups alike prompts with them and the
    # leakage check compares test prompts to train prompts with the same numbers.
    def signatures_and_split(rows):
        sig = prompt_signatures(rows, opts.split.seed)
        idx, st = split_indices(rows, split_opts, sig)
        return (idx, sig), st

    try:
        (idx, sig), st = timed(signatures_and_split, rows["inputs"])
    except ValueError as e:
        raise DataError(str(e)) from None
    st.info["pool"] = "inputs"
    stages.append(st)
    parts = {name: [rows["inputs"][k] for k in idx[name]] for name in SPLITS}
    for name in ("validation", "test"):
        if pools[name]:
            parts[name] = rows[name]
    both = None if pools["test"] else np.concatenate([sig[idx["train"]], sig[idx["test"]]])
    parts["test"], st = timed(leakage_stage, parts["train"], parts["test"], opts.split, both)
    st.info["pool"] = "test" if pools["test"] else "inputs"
    stages.append(st)
    accounting = _accounting(stages, parts, pools)
    if opts.augment:
        if kind != "sft":
            raise DataError(f"--augment paraphrases sft prompts; these are {kind} rows")
        extra = paraphrase_rows(parts["train"], opts.augment, opts.split.seed)
        parts["train"] = parts["train"] + extra
        stages.append(Stage("augment", input=len(extra), kept=len(extra),
                            info={"added_to_train": len(extra), "per_row": opts.augment}).check())
    if not parts["train"]:
        raise DataError("no training rows left after the split")

    # --- report and write ---------------------------------------------------------------
    lengths = {name: _lengths(part, tok, known) for name, part in parts.items()}
    manifest = {
        "tuneforge_version": __import__("tuneforge").__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kind": kind,
        "format": {pool: {"format": r.format, "reason": r.format_reason} for pool, r in reports.items()},
        "sources": [source_entry(s, c) for r in reports.values() for s, c in r.sources.items()],
        "skipped_files": {f: why for r in reports.values() for f, why in r.skipped.items()},
        "options": opts.model_dump(),
        "tokenizer": opts.tokenizer,
        "length_unit": "tokens" if tok is not None else "characters",
        "stages": [s.as_dict() for s in stages],
        "accounting": accounting,
        "splits": {name: {"rows": len(part), "synthetic_rows": sum(bool(r.get("_synthetic")) for r in part),
                          "sha256": rows_sha256(part), "lengths": length_stats(lengths[name]),
                          "histogram": length_histogram(lengths[name]),
                          **shape_stats(part)} for name, part in parts.items()},
    }
    manifest["synthetic"] = any(s["synthetic_rows"] for s in manifest["splits"].values())
    write_prepared(out_dir, parts, manifest, lengths, overwrite=overwrite, inputs=input_paths(opts))
    return manifest


def _lengths(rows: list[dict], tok, known: dict[str, int]) -> np.ndarray:
    """Token counts (characters without a tokenizer); only rows not measured yet
    (augmented ones) are tokenized here."""
    if tok is None:
        return np.asarray([sum(map(len, row_texts(r))) for r in rows], dtype=np.int64)
    new = [r for r in rows if r["_where"] not in known]
    if new:
        known.update(zip((r["_where"] for r in new), token_lengths(tok, new).tolist()))
    return np.asarray([known[r["_where"]] for r in rows], dtype=np.int64)


def _accounting(stages: list[Stage], parts: dict, pools: dict) -> dict:
    """Per pool: rows read = rows written + every stage's drops (asserted)."""
    out = {}
    for pool in (p for p, specs in pools.items() if specs):
        mine = [s for s in stages if s.info.get("pool") == pool]
        origin = {n: n if pools.get(n) else "inputs" for n in SPLITS}  # train always comes from the inputs
        written = sum(len(parts[n]) for n in SPLITS if origin[n] == pool)
        load = next(s for s in mine if s.name == "load")
        read = load.input - load.info.get("split_pairs", 0)
        added = load.info.get("split_pairs", 0)
        dropped = {f"{s.name}: {reason}": n for s in mine for reason, n in s.dropped.items()}
        assert read + added == written + sum(dropped.values()), (
            f"{pool}: {read} read + {added} added != {written} written + drops {dropped}")
        out[pool] = {"read": read, "written": written, "dropped": dropped, **({"added": added} if added else {})}
    return out


def write_prepared(out_dir: Path, parts: dict, manifest: dict, lengths: dict, overwrite: bool = False,
                   inputs: list[Path] = ()) -> None:
    with atomic_dir(Path(out_dir), made_by_prepare, overwrite=overwrite, what="prepared folder",
                    inputs=inputs) as tmp:
        for name, part in parts.items():
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for r in part:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        plot_lengths(lengths, manifest["length_unit"], tmp / "lengths.png")
        (tmp / "report.md").write_text(render_report(manifest), encoding="utf-8")
        write_json(tmp / MANIFEST, manifest)
