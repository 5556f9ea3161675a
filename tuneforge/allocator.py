"""Process-level speed settings applied before training starts.

A faster allocator must be preloaded before the process starts, so ``tuneforge train``
re-executes itself once with ``LD_PRELOAD``: the many short-lived activation tensors of a
CPU training step make glibc malloc a bottleneck (tcmalloc measured +30% training throughput
on the 2-core machines here). tcmalloc or jemalloc from the system's packages is taken when
installed; otherwise mimalloc from the ``cmeel-mimalloc`` wheel, a pinned dependency, so the
README's two install commands give every glibc Linux x86_64/aarch64 user a fast allocator
without apt (docs/speed.md has both measured). ``TUNEFORGE_ALLOCATOR=off`` disables it;
without any of them training works as before.

On a machine already busy when training starts (1-minute load average at or above the core
count) the re-exec also sets ``OMP_WAIT_POLICY=PASSIVE`` (unless set): OpenMP threads then
sleep between parallel regions instead of spinning for a peer the scheduler has taken away.
Measured on a shared 2-core AVX2 host at load 10-13: the benchmark LoRA step at 25 real
tokens/s passive against 4-7 spinning, the 520 x 576 x 1536 product 36 ms against 80 (1
thread: 32). A quiet machine keeps OpenMP's default, where spinning is the faster.

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
from importlib import metadata
from pathlib import Path

CANDIDATES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libjemalloc.so.2")
# The wheel that ships mimalloc as a shared library (pyproject.toml pins it); cmeel wheels
# install their CMake prefix under site-packages/cmeel.prefix.
PIP_ALLOCATOR = ("cmeel-mimalloc", "cmeel.prefix/lib/libmimalloc.so.3")
MARK = "TUNEFORGE_ALLOCATOR_SET"
ONEDNN_CACHE = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")
INSTALL_HINT = "pip install cmeel-mimalloc==3.4.3, or apt-get install libtcmalloc-minimal4"


def system_allocator() -> str | None:
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for name in CANDIDATES:
        for line in listing.splitlines():
            if line.strip().startswith(name + " ") and "=>" in line:
                return line.split("=>", 1)[1].strip()
    return None


def pip_allocator() -> str | None:
    dist, rel = PIP_ALLOCATOR
    try:
        lib = Path(metadata.distribution(dist).locate_file(rel))
    except metadata.PackageNotFoundError:
        return None
    return str(lib) if lib.is_file() else None


def find_allocator() -> str | None:
    """The library to preload: the system's tcmalloc/jemalloc first (a user who installed one
    chose it), then the pip-installed mimalloc."""
    return system_allocator() or pip_allocator()


def allocator_name(lib: str | None) -> str:
    """A short name for a library path ("tcmalloc", "mimalloc (pip)"), or "system malloc"."""
    if not lib or lib == "system malloc":
        return "system malloc"
    base = Path(lib).name
    name = next((n for n in ("tcmalloc", "jemalloc", "mimalloc") if n in base), base)
    return f"{name} (pip)" if "site-packages" in lib else name


def machine_busy() -> bool:
    """Whether other processes already keep every core busy (1-minute load average)."""
    try:
        return os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:
        return False


def reexec_with_allocator(argv: list[str]) -> None:
    """Re-run this command with a fast allocator preloaded (returns only when not re-executing)."""
    if os.environ.get("TUNEFORGE_ALLOCATOR", "").lower() == "off" or os.environ.get(MARK):
        return
    if sys.platform != "linux":
        return
    lib = find_allocator()
    env = dict(os.environ, **{MARK: lib or "system malloc"})
    env.setdefault(*ONEDNN_CACHE)
    if machine_busy() and "OMP_WAIT_POLICY" not in env:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        print(f"note: the machine is busy (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): "
              "OMP_WAIT_POLICY=PASSIVE", file=sys.stderr)
    if lib is None:
        print(f"note: allocator: system malloc; CPU training is ~70% faster with a fast one ({INSTALL_HINT})",
              file=sys.stderr)
    else:
        print(f"allocator: {allocator_name(lib)} ({lib})", file=sys.stderr)
        preload = os.environ.get("LD_PRELOAD", "")
        env["LD_PRELOAD"] = f"{lib}:{preload}" if preload else lib
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tuneforge", *argv], env)


def allocator_in_use() -> str:
    return os.environ.get(MARK) or "system malloc"


def free_memory_releaser():
    """A function that hands the allocator's free pages back to the system, or None (glibc).

    tcmalloc and mimalloc keep freed pages for reuse, and padding-free steps change shape
    every step, so the freed pages of one step's activations often do not fit the next one's,
    and RSS grows by the fragments. Releasing them after each optimizer step took the
    benchmark job's peak from 1.84 to 1.77 GB with tcmalloc, with no measurable slowdown (the
    pages are faulted in again in the next step; docs/speed.md). mimalloc's ``mi_collect(true)``
    is the same call (a freed 400 MB tensor: 639 -> 251 MB RSS).
    """

    process = ctypes.CDLL(None)
    try:
        fn = process.MallocExtension_ReleaseFreeMemory
        fn.restype = None
        return fn
    except AttributeError:
        pass
    try:
        collect = process.mi_collect
    except AttributeError:
        return None
    collect.argtypes, collect.restype = [ctypes.c_bool], None
    return lambda: collect(True)
