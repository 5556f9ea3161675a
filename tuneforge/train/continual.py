"""Continual learning: start from an earlier run's weights, and EWC against forgetting.

EWC (Kirkpatrick et al. 2017) adds ``lambda/2 * sum_i F_i (theta_i - theta*_i)^2``: weights
that mattered for the earlier tasks (large diagonal Fisher F) are held near their values at
the end of those tasks (theta*), the others move freely. Replay lives in multitask.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from tuneforge.hardware import autocast, to_device
from tuneforge.data.render import trained_tokens


def ewc_penalty(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
                fisher: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum_i F_i (theta_i - theta*_i)^2 over the named tensors (the caller scales by lambda/2)."""
    return sum(((params[n] - anchor[n].to(params[n])) ** 2 * fisher[n].to(params[n])).sum() for n in fisher)


def diagonal_fisher(model, objective, opts, batches: list[dict], *, device, dtype, hidden_path
                    ) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher of the trainable weights: the mean over examples of the
    squared gradient of each example's mean token loss. ``batches`` hold one example each
    (a squared batch gradient would underestimate F by the batch size)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: F describes the weights, not a dropout sample
    for b in batches:
        model.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss_sum, _ = objective.loss(model, to_device(b, device), opts, hidden_path=hidden_path)
        (loss_sum / max(trained_tokens(b), 1)).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach().float() ** 2
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {n: f / max(len(batches), 1) for n, f in fisher.items()}


class EWC:
    """The loop's extra-loss hook: ``lambda/2 * ewc_penalty`` against the weights at the start."""

    key = "ewc_penalty"  # its column in metrics.jsonl

    def __init__(self, model, fisher: dict[str, torch.Tensor], lam: float):
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}
        self.fisher, self.lam = fisher, lam

    def __call__(self) -> torch.Tensor:
        return 0.5 * self.lam * ewc_penalty(self.params, self.anchor, self.fisher)


def adapter_weights_path(path: str | Path) -> Path:
    """A run folder or an adapter folder -> its adapter_model.safetensors."""
    path = Path(path)
    for candidate in (path / "adapter" / "adapter_model.safetensors", path / "adapter_model.safetensors"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"train.init_from={path}: no adapter_model.safetensors in it or in its adapter/ folder")


def init_from(model, path: str | Path) -> int:
    """Load an earlier run's peft adapter into the freshly wrapped model (same method options).

    Returns the number of tensors loaded; every trainable tensor must be covered, else the
    earlier run used different adapter options and continuing from it would be silently wrong.
    """
    # deferred: peft imports transformers; config validation and --help stay quick
    from peft import set_peft_model_state_dict

    weights = load_file(str(adapter_weights_path(path)))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"train.init_from={path} does not match this run's method options "
                         f"(unexpected {list(result.unexpected_keys)[:3]}, missing {missing[:3]})")
    return len(weights)
