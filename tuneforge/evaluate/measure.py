"""Measure one system (a model with a way of prompting it) on a list of conversations:
generated answers, task metrics, latency, prompt size and teacher-forced loss."""

from __future__ import annotations

import time

import torch
from pydantic import BaseModel

from tuneforge.data.render import prompt_ids
from tuneforge.evaluate.generate import generate_texts
from tuneforge.evaluate.metrics import task_metrics
from tuneforge.evaluate.perplexity import answer_rows, nll_per_row, summarize


class GenSettings(BaseModel):
    """Recorded with every result: numbers are only comparable under the same settings."""

    do_sample: bool = False
    max_new_tokens: int = 64
    batch_size: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    stop: str = "end-of-turn token (eos)"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.dtype == "float32" else getattr(torch, self.dtype)


def measure(model, tok, convs: list[list[dict]], *, kind: str, labels: list[str] | None, gen: GenSettings,
            label: str, with_loss: bool = True) -> dict:
    """``convs`` end with the reference assistant turn; the model sees everything before it.
    ``with_loss``: also score the references teacher-forced (not for in-context prompts,
    whose loss would mostly measure the examples' length)."""
    prompts = [prompt_ids(tok, c) for c in convs]
    refs = [c[-1]["content"] for c in convs]
    t0 = time.perf_counter()
    preds = generate_texts(model, tok, prompts, max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
                           device=gen.device, autocast_dtype=gen.autocast_dtype, label=label)
    seconds = time.perf_counter() - t0
    result = task_metrics(kind, preds, refs, labels)
    if with_loss:
        lm = summarize(nll_per_row(model, answer_rows(tok, convs), tok.pad_token_id, batch_size=gen.batch_size,
                                   device=gen.device, autocast_dtype=gen.autocast_dtype))
        result["scores"] |= {"loss": lm["loss"], "perplexity": lm["perplexity"]}
        result["per_example"]["loss"] = lm["per_example_loss"]
    output_tokens = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in preds)
    return result | {
        "n": len(convs), "preds": preds, "refs": refs, "prompts": [c[-2]["content"] for c in convs],
        "seconds": seconds,
        # Requests ran in batches of gen.batch_size: this is throughput-based latency.
        "seconds_per_request": seconds / max(len(convs), 1),
        "prompt_tokens_per_request": sum(map(len, prompts)) / max(len(prompts), 1),
        "output_tokens_per_request": output_tokens / max(len(preds), 1),
    }
