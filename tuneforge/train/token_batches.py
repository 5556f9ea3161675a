"""The mean token loss on held-out batches for the token-loss objectives (sft, cpt, distill).
The batches themselves (seeded micro-batches, trained-token counts) are data/render.py's."""

from __future__ import annotations

import torch

from tuneforge.hardware import autocast, to_device


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
