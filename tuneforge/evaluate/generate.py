"""Batched greedy generation with left padding, stopping at the end-of-turn token."""

from __future__ import annotations

import contextlib

import torch
from rich.progress import Progress


@torch.no_grad()
def generate_texts(model, tok, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
                   device: str, autocast_dtype: torch.dtype | None = None, label: str = "generating") -> list[str]:
    model.eval()
    pad = tok.pad_token_id
    outs: list[str] = [""] * len(prompts)
    # Longest first: similar lengths share a batch, so less padding is computed.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    ctx = (torch.autocast(device_type=device, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with Progress(transient=True) as progress, ctx:
        task = progress.add_task(label, total=len(prompts))
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(idx):
                p = prompts[i]
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=pad)
            for row, i in enumerate(idx):
                outs[i] = tok.decode(gen[row, width:], skip_special_tokens=True).strip()
            progress.advance(task, len(idx))
    return outs
