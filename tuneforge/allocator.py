"""Process-level speed settings applied before training starts.

A faster allocator must be preloaded before the process starts, so ``tuneforge train``
re-executes itself once with ``LD_PRELOAD`` when tcmalloc (or jemalloc) is installed:
the many short-lived activation tensors of a CPU training step make glibc malloc a
bottleneck (tcmalloc measured +30% training throughput on the 2-core machines here).
``TUNEFORGE_ALLOCATOR=off`` disables it; without the library training works as before.

The same re-exec caps oneDNN's primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, read
when the library starts). Padding-free batches change shape every step, and the default
cache of 1024 primitives keeps each shape's kernels and scratch memory: peak RSS of the
benchmark job grew 1.5 -> 2.35 GB over 30 steps. 128 keeps one step's shapes (same speed,
2.0 GB); 32 halved the speed (benchmarks/train_throughput.py, docs/speed.md).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

CANDIDATES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libjemalloc.so.2")
MARK = "TUNEFORGE_ALLOCATOR_SET"
ONEDNN_CACHE = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")


def find_allocator() -> str | None:
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for name in CANDIDATES:
        for line in listing.splitlines():
            if line.strip().startswith(name + " ") and "=>" in line:
                return line.split("=>", 1)[1].strip()
    return None


def reexec_with_allocator(argv: list[str]) -> None:
    """Re-run this command with a fast allocator preloaded (returns only when not re-executing)."""
    if os.environ.get("TUNEFORGE_ALLOCATOR", "").lower() == "off" or os.environ.get(MARK):
        return
    if sys.platform != "linux":
        return
    lib = find_allocator()
    env = dict(os.environ, **{MARK: lib or "system malloc"})
    env.setdefault(*ONEDNN_CACHE)
    if lib is None:
        print("note: no tcmalloc/jemalloc found; CPU training is ~70% faster with it "
              "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4)", file=sys.stderr)
    else:
        preload = os.environ.get("LD_PRELOAD", "")
        env["LD_PRELOAD"] = f"{lib}:{preload}" if preload else lib
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tuneforge", *argv], env)


def allocator_in_use() -> str:
    return os.environ.get(MARK) or "system malloc"


def free_memory_releaser():
    """A function that hands tcmalloc's free pages back to the system, or None (another allocator).

    tcmalloc keeps freed pages for reuse, and padding-free steps change shape every step, so
    the freed pages of one step's activations often do not fit the next one's, and RSS grows
    by the fragments. Releasing them after each optimizer step took the benchmark job's peak
    from 1.84 to 1.77 GB with no measurable slowdown (the pages are faulted in again in the
    next step; docs/speed.md).
    """

    try:
        fn = ctypes.CDLL(None).MallocExtension_ReleaseFreeMemory
    except (OSError, AttributeError):
        return None
    fn.restype = None
    return fn
