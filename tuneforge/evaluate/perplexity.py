"""Teacher-forced loss and perplexity: on the reference answers of a test split, and on
general-domain text (the forgetting probe)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from tuneforge.data.render import IGNORE, pad_batch, prompt_ids, render_chat


def answer_rows(tok, convs: list[list[dict]], tools: list[list[dict]] | None = None) -> list[dict]:
    """Token ids with labels on the final assistant turn only (the reference answer);
    ``tools``: each conversation's tool schemas (rows with tools)."""
    rows = []
    for conv, t in zip(convs, tools or [None] * len(convs)):
        ids, labels = render_chat(tok, conv, t)
        n_prompt = len(prompt_ids(tok, conv, t))
        rows.append({"input_ids": ids, "labels": [IGNORE] * n_prompt + labels[n_prompt:]})
    return rows


def text_rows(tok, texts: list[str], max_length: int) -> list[dict]:
    """Plain text (no chat template), every token after the first one scored."""
    rows = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"][:max_length]
        if len(ids) > 1:
            rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


@torch.no_grad()
def nll_per_row(model, rows: list[dict], pad_id: int, *, batch_size: int, device: str,
                autocast_dtype: torch.dtype | None = None) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, scored tokens) per row, in the input order."""
    model.eval()
    out: list[tuple[float, int]] = []
    ctx = (torch.autocast(device_type=device, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    for s in range(0, len(rows), batch_size):
        b = pad_batch(rows[s : s + batch_size], pad_id)
        with ctx:
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        # (B, T-1, V) predictions for the (B, T-1) next tokens; fp32 for the log-softmax.
        targets = b["labels"][:, 1:].to(device)
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE,
                              reduction="none")
        counts = (targets != IGNORE).sum(dim=1)
        out += [(float(n), int(c)) for n, c in zip(nll.sum(dim=1).tolist(), counts.tolist())]
    return out


def summarize(nll: list[tuple[float, int]]) -> dict:
    """Token-weighted loss and its perplexity, plus the per-example mean loss (for bootstrap)."""
    total, count = sum(n for n, _ in nll), sum(c for _, c in nll)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count,
            "per_example_loss": [n / c if c else 0.0 for n, c in nll],
            # scored tokens per example: the bootstrap re-weights resampled losses by them
            "per_example_tokens": [c for _, c in nll]}
