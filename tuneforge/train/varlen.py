"""Padding-free attention: several examples laid end to end in one row, each attending only to itself.

A padded batch of 4 rows of 60-250 tokens spends about a quarter of every matrix product on
padding. Laid end to end (position ids restarting at 0 for each example) the same rows cost
only their real tokens. transformers understands such rows, but its SDPA path turns them into
a dense [L, L] block-diagonal mask: attention then costs (sum of lengths)^2 instead of the sum
of squares, which at 1024-token rows is more than the padding saved. flash-attn's varlen
kernels do it right but exist only on CUDA; on CPUs nothing maintained does. So this module
registers one small attention function with transformers' AttentionInterface: it finds the
example boundaries from the position ids and runs causal SDPA per example (one fused kernel
each, no mask). Anything else (a padding mask, a KV cache, decoding) goes to the stock SDPA
function unchanged, so generation and evaluation behave exactly as before.

On CPUs the per-example attention is one autograd function (`VarlenAttentionFn`): torch's CPU
flash kernel for the forward, and for the backward of examples up to `EXPLICIT_BACKWARD_MAX`
tokens the textbook gradient as four bf16 batched matmuls from the saved log-sum-exp. The CPU
flash backward is built for long rows: on SmolLM2-135M's heads it took 3.5 ms at 130 tokens
against 1.0 ms explicit (0.6 vs 0.4 ms at 32, 3.8 vs 2.2 at 256, 9.0 vs 9.9 at 512; 2 cores,
`benchmarks/attention_backward.py`), and it was a fifth of a LoRA step's time. Longer
examples, and fp32 ones (CPUs without bf16 units, where the flash backward wins at every
length), keep the flash backward. Its gradients match the flash backward's to bf16 rounding
(tested against float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "tuneforge_varlen"


def segments(position_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every example in rows whose positions restart per example: at 0, or
    (rows that share a prefix, data/render.py's shared_prefix_batch) at the prefix's length."""
    out = []
    for b, row in enumerate(position_ids.tolist()):
        starts = [0] + [i for i in range(1, len(row)) if row[i] != row[i - 1] + 1]
        out += [(b, s, e) for s, e in zip(starts, [*starts[1:], len(row)], strict=True)]
    return out


def prefix_shared_attention(query, key, value, bounds, firsts, scaling, groups):
    """[B, L, H, D] per-example attention for rows that share a prefix (data/render.py's
    shared_prefix_batch): a segment whose positions start at P > 0 attends to its row's first
    P tokens, then causally to itself; a segment starting at 0 is an ordinary example. The
    prefix is computed once; its keys and values get every continuation's gradient."""
    pieces = []
    prefix_end = {b: e for (b, s, e), p in zip(bounds, firsts, strict=True) if s == 0 and not p}  # per row, once
    for (b, s, e), p in zip(bounds, firsts, strict=True):
        q = query[b : b + 1, :, s:e]
        if not p:
            o = F.scaled_dot_product_attention(q, key[b : b + 1, :, s:e], value[b : b + 1, :, s:e], is_causal=True,
                                               scale=scaling, enable_gqa=groups > 1)
        else:
            if prefix_end.get(b, 0) < p:
                raise ValueError(f"a segment continues a {p}-token prefix its row does not start with")
            k = torch.cat((key[b : b + 1, :, :p], key[b : b + 1, :, s:e]), dim=2)
            v = torch.cat((value[b : b + 1, :, :p], value[b : b + 1, :, s:e]), dim=2)
            mask = torch.ones(e - s, p + e - s, dtype=torch.bool, device=q.device)
            mask[:, p:].tril_()
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=groups > 1)
        pieces.append(o.transpose(1, 2))
    rows = [torch.cat([o for (r, _, _), o in zip(bounds, pieces, strict=True) if r == b], dim=1)
            for b in range(query.shape[0])]
    return torch.cat(rows, dim=0).contiguous()


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None,
                     **kwargs):
    """query/key/value [B, H, L, D] -> ([B, L, H, D], None), per-example causal attention."""
    plain = attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]
    if plain:  # padded batch, decoding with a cache: nothing to split
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # Without a padding mask transformers passes one [1, L] row of default positions for a
    # whole batch of full-length rows (CPT blocks): each row is then one example.
    position_ids = position_ids.expand(query.shape[0], -1)
    bounds = segments(position_ids)
    firsts = [int(position_ids[b, s]) for b, s, _ in bounds]
    if any(firsts):
        if dropout and module.training:
            raise ValueError("attention dropout with rows sharing a prefix: set train.shared_prefix=false")
        dtype = torch.get_autocast_dtype(query.device.type) if torch.is_autocast_enabled(query.device.type) \
            else query.dtype
        query, key, value = (t.to(dtype) for t in (query, key, value))
        return prefix_shared_attention(query, key, value, bounds, firsts, scaling,
                                       getattr(module, "num_key_value_groups", 1)), None
    if query.device.type == "cpu" and not (dropout and module.training):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        # The kernel is called below autocast, so cast as autocast casts SDPA: fp32 weights
        # under bf16 autocast (full fine-tuning) give bf16 queries beside fp32 rotated keys.
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
        query, key, value = (t.to(dtype) for t in (query, key, value))
        return VarlenAttentionFn.apply(query, key, value, tuple(bounds), scale), None
    groups = getattr(module, "num_key_value_groups", 1)
    out = torch.empty_like(query)
    for b, s, e in bounds:
        out[b : b + 1, :, s:e] = F.scaled_dot_product_attention(
            query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e], dropout_p=dropout,
            scale=scaling, is_causal=True, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


# bf16 examples up to this many tokens take the explicit backward; longer ones the flash
# kernel's (measured crossover between 256 and 400 tokens on SmolLM2-135M's 9 x 64 heads).
EXPLICIT_BACKWARD_MAX = 320
# In fp32 (CPUs without bf16 units) the flash backward is the faster one at every length:
# 0.15 vs 0.26 ms at 32 tokens, 0.39 vs 0.59 at 64, 1.15 vs 2.13 at 128 (best of 40, 2-core
# AVX2 AMD EPYC; benchmarks/attention_backward.py --dtype fp32).
EXPLICIT_BACKWARD_MAX_FP32 = 0

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def attention_backward(q, k, v, out, lse, grad, scale):
    """Gradients of causal softmax(q k^T * scale) v for one example ([1, H, L, D], k/v with
    H / G heads), recomputing the probabilities from the forward's log-sum-exp [1, H, L]."""
    _, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    # A query head's group shares one key head: fold the group into the rows, so each key
    # head is one batch entry of every matmul and GQA needs no repeated keys.
    qg = q.reshape(kv_heads, groups * length, dim)
    gg = grad.reshape(kv_heads, groups * length, dim)
    k0, v0 = k[0], v[0]
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu_(1)
    # Probabilities in fp32 (exp of a rounded score would lose the softmax's precision); the
    # matmuls take bf16 inputs as the flash kernel does.
    p = torch.bmm(qg, k0.transpose(1, 2)).float().mul_(scale).sub_(lse.reshape(kv_heads, groups * length, 1)).exp_()
    p.view(kv_heads, groups, length, length).masked_fill_(future, 0.0)
    dv = torch.bmm(p.to(q.dtype).transpose(1, 2), gg)
    dp = torch.bmm(gg, v0.transpose(1, 2)).float()
    delta = (grad.float() * out.float()).sum(-1).reshape(kv_heads, groups * length, 1)
    ds = p.mul_(dp.sub_(delta)).mul_(scale).to(q.dtype)
    dq = torch.bmm(ds, k0).reshape(1, heads, length, dim)
    dk = torch.bmm(ds.transpose(1, 2), qg)[None]
    return dq, dk, dv[None]


class VarlenAttentionFn(torch.autograd.Function):
    """Causal attention per example of [B, H, L, D] rows -> [B, L, H, D]; CPU only."""

    @staticmethod
    def forward(ctx, query, key, value, bounds, scale):
        batch, heads, length, dim = query.shape
        out = query.new_empty(batch, length, heads, dim)
        lses = []
        for b, s, e in bounds:
            o, lse = _flash(query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e], 0.0, True,
                            scale=scale)
            out[b, s:e] = o[0].transpose(0, 1)
            lses.append(lse)
        ctx.save_for_backward(query, key, value, out, *lses)
        ctx.bounds, ctx.scale = bounds, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, out, *lses = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        for (b, s, e), lse in zip(ctx.bounds, lses, strict=True):
            q, k, v = (t[b : b + 1, :, s:e].contiguous() for t in (query, key, value))
            o = out[b : b + 1, s:e].transpose(1, 2).contiguous()
            g = grad[b : b + 1, s:e].transpose(1, 2).contiguous()
            if e - s <= (EXPLICIT_BACKWARD_MAX if q.dtype == torch.bfloat16 else EXPLICIT_BACKWARD_MAX_FP32):
                grads = attention_backward(q, k, v, o, lse, g, ctx.scale)
            else:
                grads = _flash_backward(g, q, k, v, o, lse, 0.0, True, scale=ctx.scale)
            for full, part in zip((dq, dk, dv), grads, strict=True):
                full[b : b + 1, :, s:e] = part
        return dq, dk, dv, None, None


def varlen_mask(*args, attention_mask=None, **kwargs):
    # No 2D padding mask means every row is real tokens (one example, or several laid end to
    # end): the attention function splits them itself, so no [L, L] mask is built.
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(NAME, varlen_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, varlen_mask)


def supported(model) -> bool:
    """Decoder-only models on SDPA with full (not sliding-window) attention everywhere."""
    cfg = model.config
    windowed = getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
    layer_types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    return (getattr(cfg, "_attn_implementation", None) == "sdpa" and not windowed
            and layer_types == {"full_attention"} and not cfg.is_encoder_decoder)


def enable(model) -> bool:
    """Switch a (not yet peft-wrapped) model to padding-free attention; False when unsupported."""
    if not supported(model):
        return False
    model.set_attn_implementation(NAME)
    return True
