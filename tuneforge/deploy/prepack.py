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
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("tuneforge.serve")


def prepack(linears: list[nn.Linear], mode: str) -> bool:
    """Serve ``linears`` (bf16, on the CPU) from packed weights; ``mode``: "auto", "on" or "off".
    Returns whether they were packed."""
    if mode == "off" or not linears:
        return False
    weights = [lin.weight for lin in linears]
    why = None
    if any(w.device.type != "cpu" or w.dtype != torch.bfloat16 for w in weights):
        why = "only bf16 weights on a CPU are packed"
    elif not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        why = "this torch has no oneDNN linear"
    elif mode == "auto":
        import psutil

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
    for lin in linears:
        packed = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach())
        lin.forward = functools.partial(_packed_linear, packed, lin.bias)
    log.info("linear weights prepacked", extra={"linears": len(linears)})
    return True


def _packed_linear(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, bias, "none", [], "")


@torch.no_grad()
def _agrees(lin: nn.Linear) -> bool:
    x = torch.randn(3, lin.in_features, dtype=torch.bfloat16)
    try:
        got = _packed_linear(torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach()), lin.bias, x)
    except RuntimeError:
        return False
    return got.shape == (3, lin.out_features) and torch.allclose(got.float(), F.linear(x, lin.weight).float(),
                                                                 atol=1e-2, rtol=1e-2)
