"""Prepacked bf16 Linear weights for serving on a CPU.

oneDNN's bf16 matrix product reorders its weight into a blocked layout on every call unless it
gets the weight already packed; at serving shapes (one to a few dozen rows per decode step) that
reorder is a large share of each product. Packing every Linear's weight once, at load, ran a
SmolLM2-135M decode step's 211 products in 43 instead of 57 ms at 16 rows and 18 instead of 31
ms at one row (2 cores without AMX), and the engine's 16-client throughput 15-20% higher.

torch's public route to the same kernels is ``torch.compile`` with inductor's freezing, which
lowers each Linear to ``mkldnn._linear_pointwise`` on a weight from
``mkldnn._reorder_linear_weight``: those two ops are used directly here, because compiling a
served model costs minutes per shape and its graph would have to be rebuilt whenever the
per-batch LoRA hooks change. They are private ops, so ``prepack`` checks them against
``F.linear`` on the model's first Linear and serves unpacked if they are missing or disagree.

The packed copy sits next to the original weight (kept for peft, DoRA norms and anything that
reads ``.weight``), so it doubles the memory of the Linear weights; "auto" packs only when that
fits in the RAM available.

Prefill in float32 where that is faster (``fp32_prefill``): bf16 products run on AMX tiles where
the CPU has them; without AMX (AVX512-BF16 only: many Xeons, AMD Zen 4) oneDNN's bf16 products
of many rows reach ~100-140 GFLOP/s against ~250 in float32 on the same cores. Decode steps
(one row per sequence) are bound by reading the weights, where bf16 wins; prefills (a row per
prompt token) are bound by arithmetic. So products of at least ``_FP32_ROWS`` rows can run on a
second, float32 packed copy, chosen by timing one product both ways at load. Measured on
SmolLM2-135M, 2 cores without AMX: the 210 products at 480 rows 491 vs 714 ms, the engine's
16-prompt prefill 0.55-0.76 vs 0.79-1.49 s. That copy takes twice the bf16 weights' RAM.
"""

from __future__ import annotations

import functools
import logging
import time

import psutil
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("tuneforge.serve")
# Products of at least this many rows take the float32 copy where there is one: at 64 rows
# float32 was already faster than packed bf16 on the non-AMX host (89 vs 108 ms for a step's
# 210 products), at 16 rows slower (41 vs 35 ms).
_FP32_ROWS = 64


def prepack(linears: list[nn.Linear], mode: str, fp32_prefill: str = "auto") -> bool:
    """Serve ``linears`` (bf16, on the CPU) from packed weights; ``mode``: "auto", "on" or "off".
    ``fp32_prefill`` ("auto": where timing says so and RAM allows, "on", "off"): products of many
    rows on a float32 packed copy (module docstring). Returns whether they were packed."""
    if mode == "off" or not linears:
        return False
    weights = [lin.weight for lin in linears]
    why = None
    if any(w.device.type != "cpu" or w.dtype != torch.bfloat16 for w in weights):
        why = "only bf16 weights on a CPU are packed"
    elif not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        why = "this torch has no oneDNN linear"
    elif mode == "auto":
        need = sum(w.nbytes for w in weights)
        if need > psutil.virtual_memory().available // 2:
            why = f"a packed copy ({need / 2**30:.1f} GiB) would take over half the available RAM"
    if why is None and not _agrees(linears[0]):
        why = "oneDNN's packed linear disagrees with F.linear in this torch"
    if why is not None:
        if mode == "on":
            raise RuntimeError(f"engine.prepack=on: {why}")
        log.info("linear weights not prepacked", extra={"why": why})
        return False
    wide = _fp32_prefill(linears, fp32_prefill)
    for lin in linears:
        w = lin.weight.detach()
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        fp32 = (torch.ops.mkldnn._reorder_linear_weight(w.float()), None if lin.bias is None else lin.bias.float()) \
            if wide else None
        lin.forward = functools.partial(_packed_linear, packed, lin.bias, fp32)
    log.info("linear weights prepacked", extra={"linears": len(linears), "fp32_prefill": wide})
    return True


def _packed_linear(packed: torch.Tensor, bias: torch.Tensor | None,
                   fp32: tuple[torch.Tensor, torch.Tensor | None] | None, x: torch.Tensor) -> torch.Tensor:
    if fp32 is not None and x.numel() >= _FP32_ROWS * x.shape[-1]:
        return torch.ops.mkldnn._linear_pointwise(x.float(), *fp32, "none", [], "").to(torch.bfloat16)
    return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, bias, "none", [], "")


@torch.no_grad()
def _fp32_prefill(linears: list[nn.Linear], mode: str) -> bool:
    """Whether many-row products should run on a float32 copy: "on", "off", or "auto" = the
    copy fits in a quarter of the available RAM and a 256-row product of a middle-sized Linear
    ran clearly faster in float32 than packed bf16 (best of 3 each), agreeing with F.linear."""
    if mode != "auto":
        return mode == "on"
    if 2 * sum(lin.weight.nbytes for lin in linears) > psutil.virtual_memory().available // 4:
        return False
    lin = sorted(linears, key=lambda m: m.weight.numel())[len(linears) // 2]
    x = torch.randn(256, lin.in_features, dtype=torch.bfloat16)
    times, out = {}, None
    for name, w, inp in (("bf16", lin.weight.detach(), x), ("fp32", lin.weight.detach().float(), x.float())):
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        runs = []
        for _ in range(4):  # the first call sets up oneDNN's primitive
            t = time.perf_counter()
            out = torch.ops.mkldnn._linear_pointwise(inp, packed, None, "none", [], "")
            runs.append(time.perf_counter() - t)
        times[name] = min(runs[1:])
    log.info("bf16 vs fp32 product of 256 rows", extra={k: f"{v * 1000:.2f} ms" for k, v in times.items()})
    # Only a clear win: the copy costs RAM, and a shared machine's timings jitter.
    return times["fp32"] < 0.8 * times["bf16"] and torch.allclose(out, F.linear(x.float(), lin.weight.float()),
                                                                   atol=1e-3, rtol=1e-3)


@torch.no_grad()
def _agrees(lin: nn.Linear) -> bool:
    x = torch.randn(3, lin.in_features, dtype=torch.bfloat16)
    try:
        got = _packed_linear(torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach()), lin.bias, None, x)
    except RuntimeError:
        return False
    return got.shape == (3, lin.out_features) and torch.allclose(got.float(), F.linear(x, lin.weight).float(),
                                                                 atol=1e-2, rtol=1e-2)
