"""Batches of token rows for the token-loss objectives (sft, cpt, distill): micro-batches in a
seeded order, the count of trained tokens every step is normalised by, and the mean token
loss on held-out batches."""

from __future__ import annotations

import torch

from tuneforge.data.render import IGNORE, pack_rows, packed_batch, pad_batch, shared_prefix_batch
from tuneforge.hardware import autocast, to_device


def epoch_batches(rows: list[dict], epoch: int, seed: int, batch_size: int, packing: bool, max_length: int,
                  pad_id: int, padding_free: bool = False, shared_prefix: bool = False) -> list[dict]:
    """The epoch's micro-batches in an order fixed by (seed, epoch), so a resumed run sees
    exactly the batches the uninterrupted run would have seen.

    packing: rows fill bins of max_length (fewer, fuller sequences). padding_free: each
    micro-batch keeps its rows but lays them end to end in one row (needs the per-example
    attention of train/varlen.py), so the step is the same and no padding is computed.
    shared_prefix (with padding_free): a micro-batch whose rows begin with the same untrained
    tokens (a system prompt, an instruction) computes them once (data/render.py)."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    ordered = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
    if packing:
        bins = pack_rows(ordered, max_length)
        return [packed_batch(bins[i : i + batch_size], pad_id) for i in range(0, len(bins), batch_size)]
    chunks = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    if padding_free:
        return [(shared_prefix and shared_prefix_batch(c, pad_id)) or packed_batch([c], pad_id) for c in chunks]
    return [pad_batch(c, pad_id) for c in chunks]


def trained_tokens(batch: dict) -> int:
    """Tokens that carry loss (targets are labels shifted by one)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@torch.no_grad()
def validation_losses(model, objective, opts, batches: list[dict], *, device, dtype,
                      hidden_path) -> list[tuple[float, int]]:
    """(summed token loss, counted tokens) per batch; with batches of one row, per row (what a
    bootstrap over rows resamples)."""
    model.eval()
    out = []
    for b in batches:
        with autocast(device, dtype):
            loss_sum, count = objective.loss(model, to_device(b, device), opts, hidden_path=hidden_path)
        out.append((float(loss_sum), int(count)))
    model.train()
    return out


def validation_loss(model, objective, opts, batches: list[dict], *, device, dtype, hidden_path) -> float:
    parts = validation_losses(model, objective, opts, batches, device=device, dtype=dtype, hidden_path=hidden_path)
    return sum(t for t, _ in parts) / max(sum(n for _, n in parts), 1)
