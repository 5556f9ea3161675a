"""Measure one system (a model with a way of prompting it) on a list of conversations:
generated answers, task metrics, latency, prompt size and teacher-forced loss."""

from __future__ import annotations

import time

import torch
from pydantic import BaseModel

from tuneforge.data.render import prompt_ids
from tuneforge.data.tools import call_text
from tuneforge.evaluate.generate import generate_texts
from tuneforge.evaluate.metrics import exact_match, task_metrics, token_f1
from tuneforge.evaluate.perplexity import answer_rows, nll_per_row, summarize
from tuneforge.evaluate.tool_metrics import has_answer_after_tool, scored_turn, tool_task_scores


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
            label: str, with_loss: bool = True, tools: list[list[dict]] | None = None) -> dict:
    """``convs`` end with the reference assistant turn; the model sees everything before it.
    ``with_loss``: also score the references teacher-forced (not for in-context prompts,
    whose loss would mostly measure the examples' length). ``kind`` "tools": see
    ``measure_tools`` (``tools``: each row's tool schemas)."""
    if kind == "tools":
        return measure_tools(model, tok, convs, tools or [[] for _ in convs], gen=gen, label=label, with_loss=with_loss)
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
        result["loss_tokens"] = lm["per_example_tokens"]
    output_tokens = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in preds)
    return result | {
        "n": len(convs), "preds": preds, "refs": refs, "prompts": [c[-2]["content"] for c in convs],
        "seconds": seconds,
        # Requests ran in batches of gen.batch_size: this is throughput-based latency.
        "seconds_per_request": seconds / max(len(convs), 1),
        "prompt_tokens_per_request": sum(map(len, prompts)) / max(len(prompts), 1),
        "output_tokens_per_request": output_tokens / max(len(preds), 1),
    }


def reference_text(message: dict) -> str:
    """A reference assistant turn as the fallback format writes it (its text, then its calls)."""
    return "\n".join([*([message["content"]] if message.get("content") else []),
                      *(call_text(c) for c in message.get("tool_calls") or ())])


def _generate(model, tok, prompts, gen: GenSettings, label: str) -> list[str]:
    return generate_texts(model, tok, prompts, max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
                          device=gen.device, autocast_dtype=gen.autocast_dtype, label=label)


def measure_tools(model, tok, convs: list[list[dict]], tools: list[list[dict]], *, gen: GenSettings, label: str,
                  with_loss: bool = True) -> dict:
    """Tool rows: the first assistant turn after the last user message is generated (prompt:
    the conversation before it, with the row's tools) and scored as a call or a plain answer
    (``tool_metrics``); rows with a final answer after a tool result also get that answer
    generated (prompt: everything before it, the reference call and result included) and
    scored with token F1 (``answer_after_tool``) and exact match."""
    firsts = [c[: scored_turn(c) + 1] for c in convs]
    prompts = [prompt_ids(tok, c, t) for c, t in zip(firsts, tools)]
    t0 = time.perf_counter()
    preds = _generate(model, tok, prompts, gen, label)
    seconds = time.perf_counter() - t0
    per = tool_task_scores(preds, [c[-1] for c in firsts], tools)
    after = [i for i, c in enumerate(convs) if has_answer_after_tool(c)]
    answers = _generate(model, tok, [prompt_ids(tok, convs[i], tools[i]) for i in after], gen, f"{label} (answers)")
    if after:
        gold = [convs[i][-1]["content"] for i in after]
        per["answer_after_tool"] = [token_f1(p, r) for p, r in zip(answers, gold)]
        per["answer_after_tool_exact"] = [exact_match(p, r) for p, r in zip(answers, gold)]
    result = {"kind": "tools", "main": "first_turn_correct",
              "scores": {k: sum(v) / len(v) for k, v in per.items() if v}, "per_example": per}
    if with_loss:
        lm = summarize(nll_per_row(model, answer_rows(tok, firsts, tools), tok.pad_token_id,
                                   batch_size=gen.batch_size, device=gen.device, autocast_dtype=gen.autocast_dtype))
        result["scores"] |= {"loss": lm["loss"], "perplexity": lm["perplexity"]}
        result["per_example"]["loss"] = lm["per_example_loss"]
        result["loss_tokens"] = lm["per_example_tokens"]
    output_tokens = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in preds)
    return result | {
        "n": len(convs), "preds": preds, "refs": [reference_text(c[-1]) for c in firsts],
        "prompts": [c[-2]["content"] for c in firsts], "answers_after_tool": answers, "seconds": seconds,
        "seconds_per_request": seconds / max(len(convs), 1),
        "prompt_tokens_per_request": sum(map(len, prompts)) / max(len(prompts), 1),
        "output_tokens_per_request": output_tokens / max(len(preds), 1),
    }
