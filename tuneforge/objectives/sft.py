"""Supervised fine-tuning: next-token cross-entropy on the response tokens only."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from tuneforge.config import Strict
from tuneforge.objectives import Objective, register_objective

IGNORE = -100


def masked_ce_from_hidden(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module):
    """Sum of CE over trained positions, computing vocabulary logits only there.

    hidden: [B, T, D] final hidden states; labels: [B, T] token ids, IGNORE where untrained.
    Position t predicts token t+1. Gathering the N trained positions first means the head
    produces [N, V] instead of [B, T, V]: on SmolLM2 (V=49152) a padded batch's full
    logits in fp32 are the largest tensor of the step, and most of them are discarded.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE
    h = hidden[:, :-1][mask]  # [N, D]
    logits = head(h).float()  # [N, V]
    return F.cross_entropy(logits, targets[mask], reduction="sum"), mask.sum()


def masked_ce_from_logits(logits: torch.Tensor, labels: torch.Tensor):
    """Same loss from full logits [B, T, V] (reference path, and methods that need it)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    return F.cross_entropy(logits[:, :-1][mask].float(), targets[mask], reduction="sum"), mask.sum()


def body_and_head(model):
    """The transformer body and the LM head of a (possibly peft-wrapped) causal LM."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(hf, hf.base_model_prefix), hf.get_output_embeddings()


def model_inputs(batch: dict) -> dict:
    # Packed batches carry position_ids and no attention mask: transformers then builds a
    # block-diagonal causal mask from the position resets, so packed rows never attend
    # across examples. use_cache=False keeps that detection on (it is skipped with a cache).
    keys = ("input_ids", "attention_mask", "position_ids")
    return {k: batch[k] for k in keys if k in batch} | {"use_cache": False}


class SftOptions(Strict):
    name: Literal["sft"] = "sft"


@register_objective
class SFT(Objective):
    name = "sft"
    options = SftOptions

    def loss(self, model, batch, opts, *, hidden_path: bool):
        if hidden_path:
            body, head = body_and_head(model)
            hidden = body(**model_inputs(batch)).last_hidden_state
            return masked_ce_from_hidden(hidden, batch["labels"], head)
        logits = model(**model_inputs(batch)).logits
        # Prompt/p-tuning prepend virtual tokens and return logits for them too: keep the last T.
        return masked_ce_from_logits(logits[:, -batch["labels"].shape[1]:], batch["labels"])
