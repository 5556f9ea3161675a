"""Counting what every stage does to the rows, and the prepared folder's manifest.

A ``Stage`` is one filter or transformation; its invariant, asserted every run, is
input = kept + sum of drop reasons. Changes that keep a row (normalised, redacted) are
counted separately in ``changed``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.io import sha256_file

MANIFEST = "manifest.json"
SPLITS = ("train", "validation", "test")


@dataclass
class Stage:
    name: str
    input: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    changed: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> up to 3 "file:line ..." strings
    info: dict = field(default_factory=dict)  # stage-specific settings and figures

    def drop(self, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        self.note(reason, detail)

    def note(self, reason: str, detail: str) -> None:
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(detail)

    def check(self) -> Stage:
        assert self.input == self.kept + sum(self.dropped.values()), (
            f"stage {self.name}: {self.input} in != {self.kept} kept + {sum(self.dropped.values())} dropped")
        return self

    def as_dict(self) -> dict:
        return {"name": self.name, "input": self.input, "kept": self.kept, "dropped": dict(self.dropped),
                "changed": dict(self.changed), "examples": self.examples, **({"info": self.info} if self.info else {})}


def timed(fn, *args):
    """Run a stage function ``fn(*args) -> (rows, Stage)`` and record its wall and CPU time
    (CPU time too: on a shared machine wall time also measures the neighbours)."""
    t, cpu = time.perf_counter(), time.process_time()
    rows, stage = fn(*args)
    stage.info["seconds"] = round(time.perf_counter() - t, 3)
    stage.info["cpu_seconds"] = round(time.process_time() - cpu, 3)
    return rows, stage


def rows_sha256(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def source_entry(source: str, counts: dict) -> dict:
    """sha256 of a source file (or folder, over its files), so the manifest pins exact inputs."""
    path = Path(source.split("[")[0])
    entry = {"source": source, **counts}
    if path.is_file():
        entry["sha256"] = sha256_file(path)
    elif path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode())
            h.update(sha256_file(f).encode())
        entry["sha256"] = h.hexdigest()
    return entry


def is_prepared(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def made_by_prepare(path) -> bool:
    """A folder ``tuneforge data prepare`` wrote: its manifest.json carries the stages and
    the accounting (a manifest.json of another tool does not)."""
    try:
        m = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and {"stages", "accounting", "splits"} <= m.keys()


def read_manifest(folder) -> dict:
    return json.loads((Path(folder) / MANIFEST).read_text())
