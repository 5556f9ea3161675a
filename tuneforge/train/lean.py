"""Leaner saved activations for llama-style blocks: RMSNorm and the SwiGLU MLP keep less for backward.

What a LoRA step keeps for backward is mostly activations, and two cheap elementwise parts of
every block keep more than they need. RMSNorm (computed in fp32) keeps an fp32 copy of its
input, twice the bf16 input's size, 61 times per SmolLM2 forward; the MLP keeps silu(gate)
beside gate and up although it is one elementwise op away. Here RMSNorm keeps its input in
the input's dtype plus one fp32 scale per token, and the MLP's silu(gate) * up keeps only gate
and up; both recompute the rest in backward. Same forward arithmetic (the same ops in the
same dtypes); the MLP's backward runs autograd's own kernels (bit-identical), RMSNorm's
differs from autograd's only in rounding. Measured on SmolLM2-135M at a 755-token step:
~120 MB less at the step's peak (docs/speed.md). Written by hand because
the maintained fused versions (Liger kernels) are Triton-only and tuneforge trains on CPUs.

Only the architectures whose RMSNorm and MLP are exactly this code are changed (NORMS, MLPS);
anything else keeps its own forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}


class RMSNormFn(torch.autograd.Function):
    """weight * (x / rms(x)).to(x.dtype), rms in fp32, as transformers' LlamaRMSNorm."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        g = (gy * weight).float()  # d loss / d xhat
        dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (gy * xhat.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        return dx.to(x.dtype), dw, None


class SiluMulFn(torch.autograd.Function):
    """silu(gate) * up keeping only gate and up for backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        # The kernels autograd runs for silu(gate) * up, with silu(gate) recomputed: the same
        # gradients bit for bit, for one extra silu.
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(g * up, gate), g * F.silu(gate)


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNormFn.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMulFn.apply(self.gate_proj(x), self.up_proj(x)))


def enable(model: torch.nn.Module) -> int:
    """Switch the model's known RMSNorm and SiLU-MLP modules to the lean forwards; returns how
    many modules changed (0: an architecture this does not know, left as it was)."""
    n = 0
    for module in model.modules():
        name = type(module).__name__
        if name in NORMS:
            module.forward = types.MethodType(_norm_forward, module)
            n += 1
        elif name in MLPS and getattr(module.config, "hidden_act", None) == "silu":
            module.forward = types.MethodType(_mlp_forward, module)
            n += 1
    return n
