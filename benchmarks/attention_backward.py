"""Per-example causal attention backward on CPUs: torch's flash kernel against the explicit
bf16 backward in `tuneforge/train/varlen.py`, by example length. Picks
`varlen.EXPLICIT_BACKWARD_MAX` (the crossover). Best of N calls each, one process, so the
columns are comparable even on a shared machine.

    python benchmarks/attention_backward.py                 # SmolLM2-135M heads: 9 query, 3 key, 64 dims
    python benchmarks/attention_backward.py --dtype fp32     # CPUs without bf16 units
    python benchmarks/attention_backward.py --heads 14 --kv-heads 2 --dim 64
"""

from __future__ import annotations

import argparse
import time

import torch

from tuneforge.train.varlen import _flash, _flash_backward, attention_backward


def best_ms(f, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def main(a) -> None:
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    print(f"{torch.get_num_threads()} threads, {a.dtype}, heads {a.heads}/{a.kv_heads} x {a.dim}")
    print("tokens  flash fwd  flash bwd  explicit bwd")
    for length in a.lengths:
        q = torch.randn(1, a.heads, length, a.dim, dtype=dtype)
        k, v = (torch.randn(1, a.kv_heads, length, a.dim, dtype=dtype) for _ in range(2))
        g = torch.randn(1, a.heads, length, a.dim, dtype=dtype)
        scale = a.dim ** -0.5
        out, lse = _flash(q, k, v, 0.0, True, scale=scale)
        fwd = best_ms(lambda: _flash(q, k, v, 0.0, True, scale=scale), a.repeats)
        flash = best_ms(lambda: _flash_backward(g, q, k, v, out, lse, 0.0, True, scale=scale), a.repeats)
        explicit = best_ms(lambda: attention_backward(q, k, v, out, lse, g, scale), a.repeats)
        print(f"{length:6d}  {fwd:9.2f}  {flash:9.2f}  {explicit:12.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 192, 256, 320, 400, 512, 768])
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="fp32: what training runs in on CPUs without bf16 units (AVX2 hosts)")
    p.add_argument("--repeats", type=int, default=15)
    main(p.parse_args())
