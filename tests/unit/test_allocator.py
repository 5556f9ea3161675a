"""The fast allocator without apt (mimalloc from the pinned cmeel-mimalloc wheel) and the CPU
path named to the user (hardware.compute_path / speed_hints)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tuneforge import allocator, hardware


def test_the_system_allocator_is_preferred_over_the_pip_one(monkeypatch):
    monkeypatch.setattr(allocator, "system_allocator", lambda: "/usr/lib/libtcmalloc_minimal.so.4")
    assert allocator.find_allocator() == "/usr/lib/libtcmalloc_minimal.so.4"
    monkeypatch.setattr(allocator, "system_allocator", lambda: None)
    assert allocator.find_allocator() == allocator.pip_allocator()
    assert allocator.allocator_name("/usr/lib/libtcmalloc_minimal.so.4") == "tcmalloc"
    assert allocator.allocator_name(None) == "system malloc"


def _tcmalloc():
    lib = allocator.system_allocator()
    return lib if lib and "tcmalloc" in lib else None


@pytest.mark.parametrize("find, name, missing", [
    (allocator.pip_allocator, "mimalloc (pip)",
     "cmeel-mimalloc not installed (not Linux, or installed without the project's dependencies)"),
    (_tcmalloc, "tcmalloc", "tcmalloc not installed (apt-get install libtcmalloc-minimal4)"),
])
def test_preloaded_allocators_free_pages_go_back_when_released(find, name, missing):
    # Under a preloaded allocator a freed 400 MB tensor stays in the process until the releaser
    # the training loop calls after each step runs. (Under glibc there is nothing to call.)
    assert allocator.free_memory_releaser() is None  # this test process runs on glibc malloc
    lib = find()
    if lib is None:
        pytest.skip(missing)
    assert allocator.allocator_name(lib) == name
    code = (
        "import torch\n"
        "from tuneforge.allocator import free_memory_releaser\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20\n"
        "x = torch.ones(100 * 2**20); del x\n"
        "held = rss(); free_memory_releaser()(); print(held, rss())\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LD_PRELOAD": lib},
                         capture_output=True, text=True, check=True).stdout.split()
    held, after = map(int, out[-2:])
    assert held - after > 300, (held, after)


def test_the_path_and_what_would_make_it_faster_follow_the_cpu_kind(monkeypatch):
    monkeypatch.setattr(allocator, "MARK", "TUNEFORGE_TEST_NO_SUCH_VARIABLE")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # the flags below decide, not a cap in this shell
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"fma", "avx", "avx2"})
    assert hardware.pick_dtype("auto", "cpu") == torch.float32
    assert hardware.compute_path("cpu", torch.float32) == "CPU AVX2, fp32"
    hints = hardware.speed_hints("cpu", torch.float32)
    assert any("bf16 units" in h for h in hints) and any("cmeel-mimalloc" in h for h in hints)
    assert "faster with" in hardware.path_note("cpu", torch.float32)

    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    monkeypatch.setenv("TUNEFORGE_TEST_NO_SUCH_VARIABLE", "/usr/lib/libtcmalloc_minimal.so.4")
    assert hardware.pick_dtype("auto", "cpu") == torch.bfloat16
    assert hardware.compute_path("cpu", torch.bfloat16) == "CPU AMX, bf16"
    assert hardware.speed_hints("cpu", torch.bfloat16) == []
    assert hardware.path_note("cpu", torch.bfloat16) == "CPU AMX, bf16, tcmalloc"


def test_the_reexec_preloads_the_allocator_and_waits_passively_only_on_a_busy_machine(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda exe, args, env: calls.append((args, env)))
    for var in (allocator.MARK, "TUNEFORGE_ALLOCATOR", "OMP_WAIT_POLICY", "LD_PRELOAD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(allocator, "find_allocator", lambda: "/opt/lib/libmimalloc.so.3")
    for load in (0.3, 2.0 * (os.cpu_count() or 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        allocator.reexec_with_allocator(["train", "x.yaml"])
    (args, quiet), (_, busy) = calls
    assert args[-3:] == ["tuneforge", "train", "x.yaml"]
    assert quiet["LD_PRELOAD"] == busy["LD_PRELOAD"] == "/opt/lib/libmimalloc.so.3"
    assert "OMP_WAIT_POLICY" not in quiet and busy["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice stands
    allocator.reexec_with_allocator(["train", "x.yaml"])
    assert calls[-1][1]["OMP_WAIT_POLICY"] == "ACTIVE"


def test_a_capped_onednn_isa_is_the_kind_the_run_gets(monkeypatch):
    # ONEDNN_MAX_CPU_ISA=AVX2 on a bf16 host (the AVX2 emulation docs/speed.md uses): oneDNN has
    # no bf16 units then, so auto must pick fp32 and the path must not claim them.
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert hardware.cpu_kind() == "AVX512-BF16" and hardware.pick_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert hardware.cpu_kind() == "AVX2" and hardware.pick_dtype("auto", "cpu") == torch.float32
    assert hardware.compute_path("cpu", torch.float32) == "CPU AVX2, fp32"
    hints = hardware.speed_hints("cpu", torch.float32)
    assert any("ONEDNN_MAX_CPU_ISA=AVX2 unset" in h for h in hints) and not any(h.startswith("bf16 units") for h in hints)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core")
    assert hardware.cpu_kind() == "AVX512"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")  # a cap above the CPU changes nothing
    assert hardware.cpu_kind() == "AVX512-BF16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    assert hardware.cpu_kind() == "AVX512-BF16"
