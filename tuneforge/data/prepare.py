"""Turn the config's data section into train/validation/test rows, seeded and leak-free."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from tuneforge.config import DataConfig
from tuneforge.data.load import DataError, LoadReport, load_rows


@dataclass
class Splits:
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    reports: dict[str, LoadReport]

    def manifest_hash(self) -> str:
        """sha256 over the canonical rows of every split: the data's identity in the lineage."""
        h = hashlib.sha256()
        for name in ("train", "validation", "test"):
            for row in getattr(self, name):
                h.update(name.encode())
                h.update(json.dumps(_content(row), sort_keys=True).encode())
        return h.hexdigest()


def _content(row: dict):
    return row["messages"] if "messages" in row else {k: v for k, v in row.items() if k != "_where"}


def _prompt_key(row: dict) -> str:
    # Chat rows group by the conversation before the answer; other kinds by their input.
    if "messages" in row:
        return json.dumps(row["messages"][:-1], sort_keys=True)
    return json.dumps(row.get("prompt", row.get("text")), sort_keys=True)


def split_by_prompt(rows: list[dict], sizes: list[float], seed: int) -> list[list[dict]]:
    """Seeded split into len(sizes)+1 parts; rows sharing a prompt stay on one side
    (otherwise a duplicated prompt in train and test leaks the answer)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(_prompt_key(r), []).append(r)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    parts: list[list[dict]] = [[] for _ in range(len(sizes) + 1)]
    targets = [round(s * len(rows)) for s in sizes]
    for k in keys:
        for i, t in enumerate(targets):
            if len(parts[i]) < t:
                parts[i].extend(groups[k])
                break
        else:
            parts[-1].extend(groups[k])
    return parts


def build_splits(data: DataConfig, seed: int, kind: str = "chat") -> Splits:
    reports = {}
    train, reports["train"] = load_rows(data.train, data.format, data.columns, kind=kind)
    validation = test = []
    if data.validation:
        validation, reports["validation"] = load_rows(data.validation, data.format, data.columns, kind=kind)
    if data.test:
        test, reports["test"] = load_rows(data.test, data.format, data.columns, kind=kind)
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
    return Splits(train, validation, test, reports)
