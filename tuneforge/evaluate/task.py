"""Generation eval of a model on held-out chat rows: the final assistant turn is the reference."""

from __future__ import annotations

import time

from tuneforge.config import EvalConfig
from tuneforge.data.render import prompt_ids, with_system
from tuneforge.evaluate.generate import generate_texts
from tuneforge.evaluate.metrics import score


def evaluate_rows(model, tok, rows: list[dict], ev: EvalConfig, *, device: str, autocast_dtype, system_prompt,
                  label: str) -> dict:
    rows = rows[: ev.limit] if ev.limit else rows
    convs = [with_system(r["messages"], system_prompt) for r in rows]
    prompts = [prompt_ids(tok, c) for c in convs]
    refs = [c[-1]["content"] for c in convs]
    t0 = time.perf_counter()
    preds = generate_texts(model, tok, prompts, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                           device=device, autocast_dtype=autocast_dtype, label=label)
    seconds = time.perf_counter() - t0
    agg, per = score(ev.metric, preds, refs)
    samples = [{"prompt": c[-2]["content"] if len(c) > 1 else "", "reference": r, "prediction": p, "score": s}
               for c, r, p, s in zip(convs, refs, preds, per)]
    return {"n": len(rows), "scores": agg, "seconds": round(seconds, 1), "samples": samples,
            "generation": {"do_sample": False, "max_new_tokens": ev.max_new_tokens}}
