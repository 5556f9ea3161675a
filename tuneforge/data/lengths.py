"""Token report for a chosen tokenizer: length percentiles, rows over max_length (and
what happens to them), label balance, turns per conversation.

Lengths of sft and preference rows are measured on the chat template's rendering (what
training sees), computed in batches: render to text, then one fast-tokenizer call.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from tuneforge.data.formats import kind_of
from tuneforge.data.manifest import Stage
from tuneforge.data.tools import chat_text

PERCENTILES = (50, 90, 95, 99)


def _render(tok, conversations: list[list[dict]], rows: list[dict]) -> list[str]:
    # Each row with its own tools, rendered as training renders them (data/tools.py).
    return [chat_text(tok, msgs, r.get("tools")) for msgs, r in zip(conversations, rows)]


def token_lengths(tok, rows: list[dict], batch: int = 1024) -> np.ndarray:
    out = []
    for s in range(0, len(rows), batch):
        part = rows[s:s + batch]
        kind = kind_of(part[0]) if part else "text"
        if kind == "sft":
            texts = _render(tok, [r["messages"] for r in part], part)
        elif kind == "unpaired":
            texts = _render(tok, [r["prompt"] + r["completion"] for r in part], part)
        elif kind == "segments":  # the rendering is the segments themselves (no template)
            texts = ["".join(s["text"] for s in r["segments"]) for r in part]
        elif kind == "preference":  # the longer of the two completions is what must fit
            chosen = _render(tok, [r["prompt"] + r["chosen"] for r in part], part)
            rejected = _render(tok, [r["prompt"] + r["rejected"] for r in part], part)
            texts = [max(c, r_, key=len) for c, r_ in zip(chosen, rejected)]
        else:
            texts = [r["text"] for r in part]
        ids = tok(texts, add_special_tokens=kind in ("text", "classification", "segments"))["input_ids"]
        out.extend(map(len, ids))
    return np.asarray(out, dtype=np.int64)


def length_stats(lengths: np.ndarray) -> dict:
    if not len(lengths):
        return {"rows": 0}
    return {"rows": int(len(lengths)), "mean": round(float(lengths.mean()), 1), "min": int(lengths.min()),
            **{f"p{p}": int(np.percentile(lengths, p)) for p in PERCENTILES}, "max": int(lengths.max()),
            "total": int(lengths.sum())}


def length_histogram(lengths, bins: int = 20) -> dict:
    """Rows per length bin (``edges`` has one more entry than ``counts``; whole-number
    edges, at most ``bins`` bins): the shape of the lengths, which percentiles alone hide."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return {"edges": [], "counts": []}
    lo, hi = int(lengths.min()), int(lengths.max()) + 1
    step = max(1, -(-(hi - lo) // bins))  # ceil: whole-number bins covering lo..hi
    edges = np.arange(lo, hi + step, step)
    counts, _ = np.histogram(lengths, bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def shape_stats(rows: list[dict]) -> dict:
    """Label balance (classification) and turns per conversation (sft)."""
    if not rows:
        return {}
    kind = kind_of(rows[0])
    if kind == "classification":
        return {"labels": dict(Counter(r["label"] for r in rows).most_common())}
    if kind == "sft":
        turns = Counter(sum(m["role"] != "system" for m in r["messages"]) for r in rows)
        return {"turns": {str(k): v for k, v in sorted(turns.items())},
                "with_system_prompt": sum(r["messages"][0]["role"] == "system" for r in rows)}
    if kind == "preference":
        return {"multi_turn_prompts": sum(len(r["prompt"]) > 1 for r in rows)}
    if kind == "unpaired":
        good = sum(r["label"] for r in rows)
        return {"labels": {"desirable": good, "undesirable": len(rows) - good}}
    return {}


def overlength_stage(rows: list[dict], lengths: np.ndarray, max_length: int, action: str,
                     min_length: int = 0) -> tuple[list[dict], Stage]:
    """Rows shorter than min_length are dropped; rows longer than max_length are dropped
    here (``drop``) or kept and counted as rows the trainer will truncate (``truncate``, as
    data.overlength=truncate does)."""
    stage = Stage("token_length", input=len(rows), info={"max_length": max_length, "action": action,
                                                          "min_length": min_length})
    out = []
    for row, n in zip(rows, lengths.tolist()):
        if n < min_length:
            stage.drop("shorter than min_tokens", f"{row.get('_where', '?')}: {n} tokens < {min_length}")
            continue
        if n > max_length:
            detail = f"{row.get('_where', '?')}: {n} tokens > {max_length}"
            if action == "drop":
                stage.drop("longer than max_length", detail)
                continue
            stage.changed["longer than max_length (truncated at training)"] += 1
            stage.note("longer than max_length (truncated at training)", detail)
        out.append(row)
    stage.kept = len(out)
    return out, stage.check()
