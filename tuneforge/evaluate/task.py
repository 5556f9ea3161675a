"""Generation eval of a model on held-out chat rows: the final assistant turn is the reference.

Rows about tools (``tools``, ``tool_calls`` or tool results: ``is_tool_row``) are scored as
tool calling instead (``measure.measure_tools``): the first assistant turn after the user,
call or not, and the final answer after the tool result."""

from __future__ import annotations

import hashlib
import json
import time

from tuneforge.config import EvalConfig
from tuneforge.data.render import prompt_ids, with_system
from tuneforge.evaluate.generate import generate_texts
from tuneforge.evaluate.measure import GenSettings, measure_tools
from tuneforge.evaluate.intervals import system_intervals
from tuneforge.evaluate.metrics import score_per_example
from tuneforge.evaluate.tool_metrics import is_tool_row


def evaluate_rows(model, tok, rows: list[dict], ev: EvalConfig, *, device: str, autocast_dtype, system_prompt,
                  label: str) -> dict:
    rows = rows[: ev.limit] if ev.limit else rows
    convs = [with_system(r["messages"], system_prompt) for r in rows]
    if any(is_tool_row(r) for r in rows):
        return evaluate_tool_rows(model, tok, rows, convs, ev, device=device, autocast_dtype=autocast_dtype,
                                  label=label)
    prompts = [prompt_ids(tok, c) for c in convs]
    refs = [c[-1]["content"] for c in convs]
    t0 = time.perf_counter()
    preds = generate_texts(model, tok, prompts, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                           device=device, autocast_dtype=autocast_dtype, label=label)
    seconds = time.perf_counter() - t0
    per = score_per_example(ev.metric, preds, refs)
    agg = {k: sum(v) / len(v) for k, v in per.items()}
    samples = [{"prompt": c[-2]["content"] if len(c) > 1 else "", "reference": r, "prediction": p, "score": s}
               for c, r, p, s in zip(convs, refs, preds, next(iter(per.values())))]
    return {"n": len(rows), "scores": agg, "per_example": per,
            "intervals": system_intervals({"n": len(rows), "scores": agg, "per_example": per}),
            "rows_sha256": rows_sha256(convs), "seconds": round(seconds, 1), "samples": samples,
            "generation": {"do_sample": False, "max_new_tokens": ev.max_new_tokens}}


def rows_sha256(convs: list[list[dict]]) -> str:
    """One hash of the scored conversations (system prompt included): two evaluations with the
    same hash scored the same rows in the same order, so their per-example scores pair up."""
    return hashlib.sha256(json.dumps(convs, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def evaluate_tool_rows(model, tok, rows: list[dict], convs: list[list[dict]], ev: EvalConfig, *, device: str,
                       autocast_dtype, label: str) -> dict:
    """Tool-calling scores (the same result shape as ``evaluate_rows``, plus per-example scores
    for paired intervals)."""
    dtype = str(autocast_dtype).replace("torch.", "") if autocast_dtype is not None else "float32"
    gen = GenSettings(max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, device=device, dtype=dtype)
    t0 = time.perf_counter()
    m = measure_tools(model, tok, convs, [r.get("tools") or [] for r in rows], gen=gen, label=label, with_loss=False)
    samples = [{"prompt": q, "reference": r, "prediction": p, "score": s}
               for q, r, p, s in zip(m["prompts"], m["refs"], m["preds"], m["per_example"][m["main"]])]
    return {"n": len(rows), "kind": "tools", "scores": m["scores"], "per_example": m["per_example"],
            "intervals": system_intervals(m), "rows_sha256": rows_sha256(convs),
            "seconds": round(time.perf_counter() - t0, 1), "samples": samples,
            "generation": {"do_sample": False, "max_new_tokens": ev.max_new_tokens}}
