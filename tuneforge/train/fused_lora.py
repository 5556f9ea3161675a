"""One autograd node per LoRA layer: y = x W^T (+ b) + scale * (dropout(x) A^T) B^T.

peft's LoRA forward is a chain of modules: the frozen base Linear, then dropout, lora_A,
lora_B, a multiply by the scale and an add, each its own autograd node, and in backward one
more add where the base and adapter paths meet at x. On a CPU a step of a 135M model is
bound by these ~2,000 small ops, not by its matrix products (MFU under 10%). Here the base
product, the rank-r products and the scale fold into two matmuls and an in-place addmm
forward, and five matmuls backward, with the scale applied to the rank-r tensors instead of
a [tokens, out] one. Same arithmetic up to bf16 rounding order (tested against peft's
forward and gradients). Written by hand because the maintained fused LoRA kernels (Unsloth's)
are Triton-only and tuneforge trains on CPUs.

Only the plain case is fused: one active vanilla LoRA adapter (not DoRA or another peft
variant) on a frozen torch Linear, unmerged, no mixed-adapter batch, and inputs already in
the compute dtype. Anything else (4-bit bases, several adapters, fp32 weights under bf16
autocast) runs peft's own forward, so behaviour never changes, only the number of ops.
"""

from __future__ import annotations

import types

import torch
from torch import nn


# The keep mask comes from 16-bit slices of 64-bit random integers: one draw from torch's
# generator per 4 elements, where nn.Dropout's bernoulli_ draws per element. On the 2-core
# AVX2 host that is ~24 vs ~4 ns an element (a [300, 1536] input: 11 vs 1.8 ms), and LoRA
# dropout (auto's and the jobs API's 0.05) had been a fifth of a LoRA step's CPU time
# (docs/speed.md). Same distribution as nn.Dropout, p rounded to a multiple of 1/65536.
_HALF = 32768


class DropoutFn(torch.autograd.Function):
    """Inverted dropout with a given keep mask: saves the bool mask, as nn.Dropout does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * scale * keep

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return g * ctx.scale * keep, None, None


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of ``x`` with probability ``p`` (seeded by torch's generator)."""
    n = x.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    threshold = round(p * 2 * _HALF) - _HALF  # a uniform int16 falls below it with probability ~p
    keep = words.view(torch.int16)[:n].view(x.shape) >= threshold
    return DropoutFn.apply(x, keep, 2 * _HALF / (_HALF - threshold))


class LoraLinearFn(torch.autograd.Function):
    """x [..., in], xd = dropout(x) or None (no dropout), frozen weight [out, in] and bias,
    trainable lora_a [r, in] and lora_b [out, r] (any dtype; computed in x's dtype)."""

    @staticmethod
    def forward(ctx, x, xd, weight, bias, lora_a, lora_b, scale):
        x2 = x.reshape(-1, x.shape[-1])
        xd2 = x2 if xd is None else xd.reshape(-1, x.shape[-1])
        a_w, b_w = lora_a.to(x.dtype), lora_b.to(x.dtype)
        a = xd2 @ a_w.t()
        y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
        y.addmm_(a, b_w.t(), alpha=scale)
        ctx.save_for_backward(xd2, weight, a_w, b_w, a)
        ctx.scale, ctx.dropout = scale, xd is not None
        ctx.x_shape, ctx.a_dtype, ctx.b_dtype = x.shape, lora_a.dtype, lora_b.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        xd2, weight, a_w, b_w, a = ctx.saved_tensors
        x_shape, a_dtype, b_dtype = ctx.x_shape, ctx.a_dtype, ctx.b_dtype
        g2 = grad.reshape(-1, grad.shape[-1])
        gb = (g2 @ b_w).mul_(ctx.scale)  # d loss / d (x A^T): [tokens, r]
        dx = dxd = None
        if ctx.needs_input_grad[0]:
            dx = g2 @ weight
            if ctx.dropout:
                dxd = (gb @ a_w).view(x_shape)
            else:
                dx.addmm_(gb, a_w)
            dx = dx.view(x_shape)
        da = (gb.t() @ xd2).to(a_dtype) if ctx.needs_input_grad[4] else None
        db = (g2.t() @ a).mul_(ctx.scale).to(b_dtype) if ctx.needs_input_grad[5] else None
        return dx, dxd, None, None, da, db, None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    peft_forward = type(self).forward
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return peft_forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.base_layer
    weight, bias = base.weight, base.bias
    autocast_dtype = (torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type)
                      else x.dtype)
    if (name not in self.lora_A or name in self.lora_variant or weight.requires_grad or x.dtype != weight.dtype
            or autocast_dtype != x.dtype or (bias is not None and bias.requires_grad)):
        return peft_forward(self, x, *args, **kwargs)
    drop = self.lora_dropout[name]
    if isinstance(drop, nn.Identity) or not self.training:
        xd = None
    else:
        xd = dropout(x, drop.p) if type(drop) is nn.Dropout else drop(x)
    return LoraLinearFn.apply(x, xd, weight, bias, self.lora_A[name].weight, self.lora_B[name].weight,
                              self.scaling[name])


def enable(model: nn.Module) -> int:
    """Route every peft LoRA Linear over a plain torch Linear through LoraLinearFn (falling
    back to peft's forward call by call where it does not apply); returns how many."""
    # deferred: peft imports transformers; config validation and --help stay quick
    from peft.tuners.lora import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is nn.Linear:
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n
