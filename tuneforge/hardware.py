"""Detect the hardware and pick device and dtype; describe the environment for the run dir."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
from functools import lru_cache

import psutil
import torch

import tuneforge
from tuneforge.allocator import INSTALL_HINT, allocator_in_use, allocator_name

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@lru_cache
def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


KINDS = ("AMX", "AVX512-BF16", "AVX512", "AVX2")  # widest first
BF16_KINDS = ("AMX", "AVX512-BF16")


def cpu_has_bf16() -> bool:
    # AVX512-BF16 / AMX run bf16 matmuls 2.5-4x faster than fp32 on the machines measured;
    # without them bf16 is emulated and slower than fp32.
    return cpu_kind() in BF16_KINDS


def _isa_cap() -> str | None:
    """The kind oneDNN is capped to by ONEDNN_MAX_CPU_ISA (its ISA names: AVX2, AVX2_VNNI,
    AVX512_CORE, AVX512_CORE_BF16, AVX512_CORE_AMX, ...), None when unset or ALL. Whoever caps it
    (a debugging user, an AVX2 emulation on a wider host) gets no bf16 units from oneDNN, so the
    dtype choice and the path's name must follow the cap, not the flags."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if not isa or isa == "ALL":
        return None
    if "AMX" in isa:
        return "AMX"
    if "BF16" in isa or "FP16" in isa or isa.startswith("AVX10"):
        return "AVX512-BF16"
    if isa.startswith("AVX512"):
        return "AVX512"
    return "AVX2" if isa.startswith("AVX2") else isa


def _flags_kind() -> str:
    """The kind the CPU's flags say, before any cap."""
    flags = cpu_flags()
    return next((k for f, k in zip(("amx_bf16", "avx512_bf16", "avx512f", "avx2"), KINDS) if f in flags),
                platform.machine() or "unknown")


def cpu_kind() -> str:
    """The CPU's widest matrix path, as docs/speed.md's tables name CPU kinds: "AMX",
    "AVX512-BF16" (bf16 units), "AVX512", "AVX2" (fp32 only) or the machine's name; never wider
    than ONEDNN_MAX_CPU_ISA allows."""
    kind = _flags_kind()
    cap = _isa_cap()
    if cap is None or kind not in KINDS:
        return kind
    return cap if cap not in KINDS or KINDS.index(cap) > KINDS.index(kind) else kind


def compute_path(device: str, dtype: torch.dtype) -> str:
    """One line naming the path training or serving runs on, e.g. "CPU AVX2, fp32"."""
    name = next((k for k, v in DTYPES.items() if v == dtype), str(dtype).replace("torch.", ""))
    if device == "cuda":
        return f"CUDA {torch.cuda.get_device_name()}, {name}"
    return f"CPU {cpu_kind()}, {name}"


def speed_hints(device: str, dtype: torch.dtype) -> list[str]:
    """What would make this machine train faster, for the progress bar and closing table."""
    if device != "cpu":
        return []
    hints = []
    if dtype == torch.float32 and not cpu_has_bf16():
        if _flags_kind() in BF16_KINDS:  # the units are there, the cap hides them
            hints.append(f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')} unset (it hides this "
                         "CPU's bf16 units: bf16 matmuls at 2.5-4x fp32)")
        else:
            hints.append("bf16 units (AVX512-BF16 or AMX: bf16 matmuls at 2.5-4x fp32)")
    if allocator_in_use() == "system malloc":
        hints.append(f"a fast allocator ({INSTALL_HINT})")
    return hints


def path_note(device: str, dtype: torch.dtype) -> str:
    """The path, allocator and what would make it faster, for the closing tables."""
    note = compute_path(device, dtype) + (f", {allocator_name(allocator_in_use())}" if device == "cpu" else "")
    hints = speed_hints(device, dtype)
    return note + (f"; faster with {'; '.join(hints)}" if hints else "")


def pick_device(requested: str) -> str:
    """The device to run on; picking CUDA also applies the process-wide CUDA settings."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available; use train.device=auto")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested
    if device == "cuda":
        configure_cuda()
    return device


def configure_cuda() -> None:
    # cuDNN's attention backend builds an execution plan for every new sequence length, ~2.5 ms
    # of CPU each: padding-free rows (one attention call per example) and KV-cache decoding
    # (a new length every token) meet a new length at nearly every call. Measured on an H200
    # (torch 2.11, SmolLM2-1.7B shapes, LoRA, 16 rows x <=512 tokens; benchmarks/profile_step.py):
    # 2125 ms/step with it, 347 ms/step without (flash attention takes over), 635 ms/step padded.
    torch.backends.cuda.enable_cudnn_sdp(False)


def pick_dtype(requested: str, device: str) -> torch.dtype:
    if requested == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if requested == "fp16" and device == "cpu":
        raise RuntimeError("train.dtype=fp16 needs CUDA; on a CPU use bf16 (with bf16 units) or fp32")
    return DTYPES[requested]


def environment(device: str, dtype: torch.dtype) -> dict:
    import peft  # only their versions: not worth loading for every caller of pick_device
    import transformers  # deferred: transformers takes seconds to import; only code that builds a model pays

    info = {
        "tuneforge": tuneforge.__version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "platform": platform.platform(),
        "processor": platform.processor(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_bf16": cpu_has_bf16(), "cpu_kind": cpu_kind(), "allocator": allocator_in_use(), "device": device, "dtype": str(dtype).replace("torch.", ""),
    }
    info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    if device == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB. Linux's VmHWM starts again at exec, while
    ru_maxrss keeps the peak of the process that forked it: a run started by a large parent
    (the jobs worker, the dashboard, a test session at 1.5 GB) reported the parent's figure."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(device: str) -> dict:
    """The run summary's peak memory: process RSS always, and the GPU's peak allocation on CUDA
    (the figure that decides whether a run fits there)."""
    peaks = {"peak_rss_mb": round(peak_rss_mb())}
    if device == "cuda":
        peaks["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return peaks


def autocast(device: str, dtype: torch.dtype):
    """The mixed-precision region of every forward pass: none in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=dtype)


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}
