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

Two more tensors of every block need not be kept at all: RMSNorm's output (saved by the
q/k/v or gate/up projections, for their LoRA or weight gradients) and silu(gate) * up (saved by
down_proj) are one elementwise op away from tensors backward keeps anyway (the norm's input and
scale; gate and up). Inside each block a saved-tensor hook (``torch.autograd.graph.
saved_tensors_hooks``) hands autograd a recipe instead of those two tensors, and backward
recomputes each once, with the same ops on the same inputs: the same bits. On CPUs without bf16
units (fp32 activations) they were a third of the saved activations: measured on SmolLM2-135M at
the benchmark's largest step (679 tokens), the step's peak RSS fell by ~240 MB, the step no slower (docs/speed.md).
Not under gradient checkpointing, which already keeps none of them.

Only the architectures whose RMSNorm and MLP are exactly this code are changed (NORMS, MLPS);
anything else keeps its own forward.
"""

from __future__ import annotations

import threading
import types
import weakref

import torch
import torch.nn.functional as F

BLOCKS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}
NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}


class RMSNormFn(torch.autograd.Function):
    """weight * (x / rms(x)).to(x.dtype), rms in fp32, as transformers' LlamaRMSNorm."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        out = _norm_output(x, weight, rstd)
        recomputable(out, _norm_output, x, weight, rstd)
        return out

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
        out = _silu_mul(gate, up)
        recomputable(out, _silu_mul, gate, up)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        # The kernels autograd runs for silu(gate) * up, with silu(gate) recomputed: the same
        # gradients bit for bit, for one extra silu.
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(g * up, gate), g * F.silu(gate)


def _norm_output(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    return weight * (x.float() * rstd).to(x.dtype)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# --- recomputed instead of saved ------------------------------------------------------------
# The block forward running now (this thread) notes here the outputs backward can recompute:
# {storage address: (weak reference to the output, its recipe)}. The recipe belongs to the
# note, not to the address: an output saved as a recipe is freed, and a later output of the
# same block may be allocated at its address (then the first one's recipe, of another size or
# other values, had been handed to the second: seen as a failed view in backward, depending on
# the allocator's reuse of addresses).
_block = threading.local()


def recomputable(out: torch.Tensor, fn, *inputs: torch.Tensor) -> None:
    """Note that ``out`` is ``fn(*inputs)``, inputs that backward keeps anyway, so a layer that
    saves ``out`` (or a view of all of it) for backward gets a recipe to recompute it instead."""
    notes = getattr(_block, "notes", None)  # None: not in a block forward that records a graph
    if notes is not None:
        notes[out.untyped_storage().data_ptr()] = (weakref.ref(out), Recompute(fn, inputs))


class Recompute:
    """What autograd keeps instead of a noted output: its recipe, run once in backward (the
    value lives until the last node that saved it has run, e.g. q, k and v projections)."""

    __slots__ = ("fn", "inputs", "value")

    def __init__(self, fn, inputs):
        self.fn, self.inputs, self.value = fn, inputs, None

    def get(self) -> torch.Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.fn(*self.inputs)
        return self.value


class _Saved:
    """A saved view of a noted output: its recipe and the view's shape."""

    __slots__ = ("recompute", "shape")

    def __init__(self, recompute: Recompute, shape: torch.Size):
        self.recompute, self.shape = recompute, shape


def _pack_in(notes: dict):
    def pack(t: torch.Tensor):
        # Noted outputs are plain strided tensors; weights (Parameters) and tensor subclasses
        # (some have no storage to look up) are kept as they are.
        if type(t) is not torch.Tensor or t.layout != torch.strided or t.device.type == "meta":
            return t
        key = t.untyped_storage().data_ptr()
        note = notes.get(key)
        out = note[0]() if note else None
        # Only a live noted output (so nothing else can sit at its address) and only the whole
        # of it, in its own layout: anything else is kept as autograd would keep it.
        if (out is None or t.dtype != out.dtype or t.numel() != out.numel() or not t.is_contiguous()
                or not out.is_contiguous() or t.storage_offset() != out.storage_offset()):
            return t
        return _Saved(note[1], t.shape)

    return pack


def _unpack(saved):
    return saved.recompute.get().view(saved.shape) if isinstance(saved, _Saved) else saved


def _block_forward(self, *args, **kwargs):
    forward = type(self).forward
    if (not torch.is_grad_enabled() or getattr(self, "gradient_checkpointing", False)
            or not torch._C._autograd._saved_tensors_hooks_is_enabled()):
        return forward(self, *args, **kwargs)
    outer, notes = getattr(_block, "notes", None), {}
    _block.notes = notes
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack_in(notes), _unpack):
            return forward(self, *args, **kwargs)
    finally:
        _block.notes = outer


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNormFn.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMulFn.apply(self.gate_proj(x), self.up_proj(x)))


def enable(model: torch.nn.Module) -> int:
    """Switch the model's known RMSNorm and SiLU-MLP modules to the lean forwards, and their
    blocks to recompute norm outputs and MLP products in backward; returns how many norms and
    MLPs changed (0: an architecture this does not know, left as it was)."""
    n = 0
    for module in model.modules():
        name = type(module).__name__
        if name in BLOCKS:
            module.forward = types.MethodType(_block_forward, module)
        elif name in NORMS:
            module.forward = types.MethodType(_norm_forward, module)
            n += 1
        elif name in MLPS and getattr(module.config, "hidden_act", None) == "silu":
            module.forward = types.MethodType(_mlp_forward, module)
            n += 1
    return n
