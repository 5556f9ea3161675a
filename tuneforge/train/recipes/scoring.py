"""What the recipes that score whole answers under the policy and a reference share (pairs:
dpo/simpo/orpo; unpaired: kto): the tokenizer and the method-wrapped model with its
reference, summed answer log-probs, held-out scoring before and after training, saving.

The reference model is the policy with its adapter disabled: no second copy of the
weights. Methods without an adapter, and runs that start from an earlier run's adapter
(train.init_from: the reference is where training starts), get a frozen copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from rich.console import Console

from tuneforge.config import RunConfig
from tuneforge.hardware import autocast
from tuneforge.methods import count_trainable
from tuneforge.models.load import load_causal_lm, load_tokenizer
from tuneforge.models.tokenizer import fix_chat_tokenizer
from tuneforge.objectives.preference import sequence_logps
from tuneforge.objectives.sft import body_and_head
from tuneforge.plugins import method_of, objective_of
from tuneforge.train.continual import init_from
from tuneforge.train.run_folder import RunStart


class Reference:
    """Log-probs under the reference model: the adapter switched off, or a frozen copy (no
    adapter to switch off, or ``frozen``: the starting weights are not the base model's)."""

    def __init__(self, model, frozen: bool = False):
        self.copy = (copy.deepcopy(model).eval().requires_grad_(False) if frozen or not hasattr(model, "disable_adapter")
                     else None)
        self.model = model

    @torch.no_grad()
    def logps(self, batch: dict):
        if self.copy is not None:
            return batch_logps(self.copy, batch)
        with self.model.disable_adapter():
            return batch_logps(self.model, batch)


def batch_logps(model, batch: dict):
    """(summed answer log-prob [N], answer length [N]) for a padded batch of N rendered rows."""
    body, head = body_and_head(model)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return sequence_logps(hidden.last_hidden_state, batch["labels"], head)


def tokenizer_of(cfg: RunConfig):
    return load_tokenizer(cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)


@dataclass
class Policy:
    model: object
    reference: Reference | None  # None: a reference-free loss
    n_train: int
    n_total: int


def load_policy(cfg: RunConfig, run: RunStart, tok, needs_reference: bool, console: Console) -> Policy:
    """The method-wrapped model (from train.init_from when set) and its reference, taken from
    the starting weights, before the loop restores a checkpoint of a resumed run."""
    method = method_of(cfg)
    model = load_causal_lm(cfg.model.name, method.base_dtype(cfg.method, run.dtype), run.device,
                           cfg.model.attn_implementation, cfg.model.revision, cfg.model.trust_remote_code)
    fix_chat_tokenizer(tok, model)
    model = method.apply(model, cfg.method)
    if cfg.train.init_from:
        console.print(f"continuing from {cfg.train.init_from} ({init_from(model, cfg.train.init_from)} tensors)")
    n_train, n_total = count_trainable(model)
    reference = Reference(model, frozen=bool(cfg.train.init_from)) if needs_reference else None
    console.print(f"[bold]{cfg.method.name}[/] + {objective_of(cfg).name}: {n_train:,} trainable of {n_total:,}; "
                  f"reference: {'adapter disabled' if reference and reference.copy is None else 'frozen copy' if reference else 'none (reference-free loss)'}")
    return Policy(model, reference, n_train, n_total)


def score_held_out(model, run: RunStart, evaluate: Callable[[], dict]) -> dict:
    """``evaluate()`` with the model in eval mode (no dropout: the before/after comparison is
    of the weights, not of a dropout sample), without gradients, under the run's autocast."""
    model.eval()
    with torch.no_grad(), autocast(run.device, run.dtype):
        return evaluate()


def save_policy(cfg: RunConfig, run: RunStart, model, tok) -> None:
    method_of(cfg).save(model, run.run_dir / "adapter")
    tok.save_pretrained(run.run_dir / "adapter")
