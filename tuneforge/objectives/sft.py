"""Supervised fine-tuning: next-token cross-entropy on the response tokens only."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from tuneforge.config import Strict
from tuneforge.objectives.base import Objective, register_objective

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
    if chunkable(head):
        return ChunkedHeadCE.apply(h, head.weight, targets[mask]), mask.sum()
    logits = head(h).float()  # [N, V]
    return F.cross_entropy(logits, targets[mask], reduction="sum"), mask.sum()


# Rows of [rows, vocabulary] fp32 logits per chunk: 2^23 values = 32 MB (170 rows at V=49152).
CHUNK_VALUES = 2**23


def chunkable(head: torch.nn.Module) -> bool:
    """A frozen, bias-free Linear head (every PEFT method's): its chunked CE needs no weight
    gradient. A trained head (full fine-tuning; DP-SGD's per-example hooks on it) keeps the
    plain path, and so does a head sharded by FSDP (a DTensor weight is gathered by the module's
    own call only)."""
    return (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
            and type(head.weight.data) is torch.Tensor)


class ChunkedHeadCE(torch.autograd.Function):
    """Sum of cross-entropy of ``h @ weight.T`` against ``targets``, computed a chunk of rows at a
    time, with the gradient for ``h`` computed in the same pass.

    Unchunked, the head's [N, V] logits exist three times over (bf16, fp32, fp32 log-softmax kept
    for backward) plus their gradients: on SmolLM2 (V=49152) at 400 trained tokens that is
    ~190 MB at the step's memory peak, for a [N, 576] result. Here each chunk's logits live
    only while its rows' loss and d(loss)/dh = (softmax - onehot) @ weight are taken, so the
    saved state is the [N, D] gradient. The arithmetic is the plain path's: logits from the
    head's matmul in the autocast dtype, softmax in fp32, the gradient cast back to the
    matmul dtype before its product with the weight (as autocast's backward does). Written by
    hand because the maintained fused kernels (Liger, Apple's cut-cross-entropy) are
    Triton/CUDA-only and tuneforge trains on CPUs too.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(h) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        step = max(1, CHUNK_VALUES // weight.shape[0])
        # The head's matmul dtype (autocast's when it is on), cast once rather than per chunk.
        device = h.device.type
        w = weight.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else weight
        for s in range(0, h.shape[0], step):
            logits = F.linear(h[s : s + step], w)
            t = targets[s : s + step]
            logp = torch.log_softmax(logits.float(), dim=-1)
            total += -logp.gather(1, t[:, None]).sum()
            if need_grad:
                g = logp.exp_()  # softmax, in place of the log-probabilities
                g[torch.arange(len(t), device=g.device), t] -= 1
                grad_h[s : s + step] = (g.to(w.dtype) @ w).to(h.dtype)
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), None, None


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
