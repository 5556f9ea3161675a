"""Plan a run before loading any weights: memory (weights, gradients, optimizer states,
activations with and without gradient checkpointing, peak) and step time per method,
whether it fits this machine, and what to change when it does not. (``tuneforge.plan(config)``
calls ``tuneforge.api.plan``: see tuneforge/__init__.py.)

Everything comes from the model's config: the model is built on the ``meta`` device (no
memory, no compute), the method is applied to it (exact trainable counts for any method),
and one forward pass on meta tensors records every tensor autograd saves for backward
(exact activation shapes for this architecture and method). The LM head's logits and
loss are added by formula, since the loss indexes the trained positions (data-dependent
shapes that meta tensors cannot run).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import psutil
import torch
from rich.table import Table

import tuneforge
from tuneforge.allocator import allocator_in_use
from tuneforge.config import ConfigError
from tuneforge.hardware import autocast, cpu_flags, peak_rss_mb, pick_device, pick_dtype
from tuneforge.methods import METHODS
from tuneforge.methods.lora import LoraOptions
from tuneforge.data.prepare import build_splits
from tuneforge.data.render import epoch_batches, trained_tokens
from tuneforge.io import write_json
from tuneforge.models.load import load_causal_lm, load_config, load_tokenizer
from tuneforge.models.moe import describe
from tuneforge.objectives import OBJECTIVES
from tuneforge.objectives.sft import CHUNK_VALUES, body_and_head, chunkable
from tuneforge.plugins import objective_of, validate_config

GB = 2**30
FIT_MARGIN = 0.9  # leave 10% of free memory for the runtime, the allocator and data
# Share of a matmul probe's throughput a training step reaches (kernel mix, small
# matrices, elementwise ops), the step's FLOPs counted at the data's mean batch as training
# lays it out (mean_batch). Measured with that count on the 2-core AVX2 EPYC in fp32: 0.35-0.38
# (the 400-row reviews job, LoRA r 16, ~290 computed tokens a step, 3.1-3.7 s a step against a
# best probe of ~105 GFLOP/s). Earlier, with the largest batch and logits at every position
# counted, 0.25-0.45 on an AMX host in bf16; not re-measured there with the mean batch.
STEP_EFFICIENCY = 0.35
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, each the size of the parameter
# What a CPU training process holds beyond the live tensors this module counts is measured, not
# assumed: see cpu_overhead(). It used to be a fixed 64 MiB ("thread pools, oneDNN/MKL
# workspaces, the autograd engine", measured on an AMX host in bf16), added to the SUM of
# weights + grads + states + activations. Measured on an AMD EPYC with AVX2 only (no avx512,
# avx512_bf16 or AMX: fp32 training), 2 threads, glibc malloc, phase by phase with mallinfo2:
# - the live tensors peak in forward/backward, not in the sum: backward frees activations as it
#   creates gradients (set_to_none), opt.step runs after they are gone. SmolLM2-135M full,
#   batch 4 x 256: in use at the peak 3.5 GB (weights 0.5 + AdamW states 1.0 + activations),
#   opt.step adds 0.21 GB beside 0.5 GB of gradients (per-tensor AdamW on CPU);
# - the fixed part is 10-80 MB, not 64 MiB everywhere;
# - the rest is the heap keeping freed memory: it depends on the tensor sizes and op mix, so it
#   is measured at the target's own layer shapes. Nothing above glibc's mmap threshold (32 MiB)
#   stays resident: SmolLM2 full's 0.4 GB of logits go back to the OS, while every body tensor
#   at 4 x 256 (2-9 MB) stays in the heap. A slack fitted on tiny models (plan-fit: hidden 64
#   and 256, 0.5 x activations for full, 0.9-1.3 x for LoRA) does not carry to them.
# Why LoRA measured MORE than full on SmolLM2 at 4 x 256 (RSS 3.9-4.6 vs 3.5-3.8 GB) although
# fewer tensors live (in use at the peak 2.8 vs 3.5 GB): its frozen head takes the chunked loss
# (no [N, V] logits: the old estimate charged it 0.6 GB it never held), its dropout outputs and
# masks and r-wide adapter outputs (counted in the meta trace) interleave small long-lived
# tensors with the freed ones, and the heap grows by 1.3 GB over what is in use (slack 0.43-0.57
# x small activations measured by the probe at that shape; full: 0-0.24).
# Estimate / measured RSS peak on this machine (benchmarks/plan_accuracy.py, fp32):
#   SmolLM2 4 x 256:  full 3.66/3.83 = 0.96, lora 3.95/3.92 = 1.01, qlora 4.00/4.95 = 0.81
#     (before: full 4.26/3.53-3.78 = 1.13-1.21, lora 3.47/4.47-4.63 = 0.75-0.78, qlora 3.52/4.76 = 0.74)
#   SmolLM2 2 x 96:   full 2.65/2.47 = 1.07, lora 1.03/1.30 = 0.79, qlora 1.08/1.07 = 1.01
#   tests/unit/test_plan.py's hidden-256 Llama, 8 x 128: full, lora and qlora within 0.75-1.25
#     (before: full 118/80 MB = 1.48).
# Not checked on an AMX host (there the probe runs in bf16 and measures that path; the old sum
# measured 0.94-0.96 on SmolLM2 2 x 96 bf16, mostly weights, states and autocast copies, which
# the phase model keeps; the opt.step phase is now grads + two copies of the largest tensor).
# The figures above are the step's part (peak above the RSS before the model loads). The process's
# peak (summary.json's peak_rss_mb) adds what it holds before that: ~0.51 GB of imports and
# tokenizer here (issue 30: a plan without it said 1.14 GB for a run that peaked at 1.74 GB),
# measured once per environment by process_baseline().
CPU_FALLBACK = (64 * 2**20, 0.5)  # (fixed bytes, slack) when the probe cannot run or is off
# glibc's malloc serves a request above its mmap threshold with its own mapping, unmapped on
# free; the threshold adapts up to 32 MiB on 64-bit. Freed memory the heap keeps (the slack)
# can only come from tensors below it.
MMAP_THRESHOLD_MAX = 32 * 2**20
# A probe model bigger than this (peak bytes of its 2-layer step, or FLOPs of one step) is not
# run: `tuneforge plan` must stay fast. CPU_FALLBACK is used instead.
PROBE_MAX_BYTES, PROBE_MAX_FLOPS = 2 * GB, 2e11
# Part of the cache key: a probe that measures differently must not reuse older results.
PROBE_VERSION = 1


@dataclass
class FlopModel:
    """Matmul FLOPs of one micro-batch of a method on a model, for any token layout."""
    body_params: int  # matmul weights a token passes through (a mixture of experts: its top_k share)
    head_params: int  # the LM head: vocab x hidden
    attention: int  # 4 x hidden x layers: QK^T and AV, per query-key pair
    weight_grad_share: float  # trained share of the body's matmul weights

    def flops(self, positions: float, head_positions: float, pairs: float, checkpointing: bool) -> float:
        """``positions`` computed tokens, ``head_positions`` of them through the head, ``pairs``
        query-key pairs (a row of L tokens: L^2). Forward, input gradients and the weight
        gradients of what trains; checkpointing recomputes the forward once more."""
        fwd = 2 * (positions * self.body_params + head_positions * self.head_params) + self.attention * pairs
        return fwd * (2 + self.weight_grad_share) + (fwd if checkpointing else 0)


@dataclass
class Estimate:
    method: str
    trainable: int
    total: int
    weights: int  # bytes
    grads: int
    optimizer: int
    autocast_copies: int  # bf16 copies of fp32 trained weights that autocast keeps for the step
    load_transient: int  # what loading leaves behind (4-bit load on CPU: the unquantised weights' heap)
    runtime: int  # fixed cost of a training process on the device (CPU: measured by cpu_overhead)
    activations: int
    activations_ckpt: int
    flops: float  # per micro-batch of the estimate's shape (batch x seq, logits everywhere), no recomputation
    flops_ckpt: float
    grads_in_flight: int = 0  # gradients backward creates while most activations still live (one layer's)
    step_transient: int = 0  # what opt.step allocates beside the gradients (its per-tensor or foreach temporaries)
    small_activations: int = 0  # the body's saved tensors below MMAP_THRESHOLD_MAX (what the heap can keep)
    small_activations_ckpt: int = 0
    slack: float = 0.0  # freed memory the CPU heap keeps (RSS), as a share of small_activations
    probe: tuple | None = None  # cpu_overhead's arguments: runtime and slack measured on first peak()
    # CPU: what the training process holds before its model loads (imports, tokenizer; see
    # process_baseline). 0 unless the caller knows the model's name and sets it: estimate() alone
    # gives the step's part, which cpu_overhead's fit and the GPU path (device memory) use.
    baseline: int = 0
    baseline_source: str = ""
    flop_model: FlopModel | None = None

    def peak(self, checkpointing: bool) -> int:
        """The largest of a step's phases (from the second step on, when optimizer states exist):
        forward/backward holds the activations (and autocast's weight copies saved for backward);
        backward frees them layer by layer as it creates gradients (set_to_none), so only about
        one layer's gradients coexist with them; opt.step holds all gradients, the states and
        its temporaries, after the activations are gone. On CPU the heap also keeps part of the
        freed activation memory resident (slack, measured)."""
        if self.probe is not None:  # measured lazily: counts and shapes need no probe process
            self.runtime, self.slack = cpu_overhead(*self.probe)
            self.runtime, self.probe = int(self.runtime), None
        act = self.activations_ckpt if checkpointing else self.activations
        small = self.small_activations_ckpt if checkpointing else self.small_activations
        fixed = self.weights + self.optimizer + self.load_transient + self.runtime
        step = max(act + self.autocast_copies + self.grads_in_flight, self.grads + self.step_transient)
        return int(self.baseline + fixed + step + self.slack * small)


def meta_model(model_config, dtype: torch.dtype):
    # deferred: transformers takes seconds to import; only code that builds a model pays
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, dtype=dtype)


def quantized_bytes(numel: int, double_quant: bool) -> float:
    """4-bit weights: half a byte each + one absmax scale per 64 weights (fp32, or 8-bit
    with one fp32 per 256 scales under double quantisation)."""
    scales = 1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64
    return numel * (0.5 + scales)


def quantized_params(model, opts) -> set[int]:
    """ids of the weights a 4-bit or 8-bit load quantises: every nn.Linear of the base but the output head."""
    if opts.name != "qlora" and not getattr(opts, "load_in_8bit", False):
        return set()
    head = model.get_output_embeddings()
    return {id(m.weight) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and "lora_" not in n}


def int8_bytes(weight: torch.Tensor) -> int:
    """LLM.int8() weights: one byte each + one fp32 scale per output row (bitsandbytes' SCB)."""
    return weight.numel() + 4 * weight.shape[0]


def weight_bytes(model, opts) -> int:
    quantized = quantized_params(model, opts)
    if getattr(opts, "load_in_8bit", False):
        return int(sum(int8_bytes(p) if id(p) in quantized else p.numel() * p.element_size()
                       for p in model.parameters()))
    return int(sum(quantized_bytes(p.numel(), opts.double_quant) if id(p) in quantized
                   else p.numel() * p.element_size() for p in model.parameters()))


def saved_activation_bytes(model, batch: int, seq: int) -> tuple[int, int]:
    """Bytes autograd saves for backward in one forward pass of the transformer body (run on meta
    tensors), and the part of them in tensors below MMAP_THRESHOLD_MAX. Parameters (and views of
    them) that autograd also saves are not activations. Every saved tensor is counted, LoRA's
    dropout outputs and masks and its r-wide intermediates included."""
    params = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in params:
            saved[id(base)] = max(saved.get(id(base), 0), base.numel() * base.element_size())
        return t

    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    # An explicit causal mask: the default mask builder inspects values (not possible on meta).
    mask = torch.ones(batch, 1, seq, seq, dtype=torch.bool, device="meta").tril()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        body_and_head(model)[0](input_ids=ids, attention_mask=mask, use_cache=False)
    return sum(saved.values()), sum(b for b in saved.values() if b < MMAP_THRESHOLD_MAX)


def moe_safe_activation_bytes(model, model_config, compute_dtype: torch.dtype, batch: int, seq: int) -> tuple[int, int]:
    """saved_activation_bytes, also for a mixture of experts, whose fused experts cannot always run
    on meta tensors (fp32 grouped_mm, and peft's expert LoRA opens an autocast on the meta
    device): then the frozen base is traced in bf16 and scaled to the compute dtype, so the
    adapters' own (rank-r) activations are left out of the estimate."""
    try:
        return saved_activation_bytes(model, batch, seq)
    except RuntimeError:
        if describe(model) is None:
            raise
    body, small = saved_activation_bytes(meta_model(model_config, torch.bfloat16), batch, seq)
    scale = (torch.finfo(compute_dtype).bits // 8) / 2
    return int(body * scale), int(small * scale)


def loss_bytes(n_positions: int, vocab: int, compute_bytes: int) -> int:
    # logits in the compute dtype, their fp32 copy (none when that is the compute dtype), and the
    # fp32 log-softmax kept for backward
    return n_positions * vocab * (compute_bytes + (4 if compute_bytes < 4 else 0) + 4)


def chunked_loss_bytes(n_positions: int, dim: int, vocab: int, compute_bytes: int) -> int:
    """The frozen head's chunked loss (objectives.sft.ChunkedHeadCE): the gathered hidden rows
    and the saved d(loss)/d(hidden), [N, D] each, and one chunk's logits at a time: in the compute
    dtype, in fp32 (a copy unless that is the compute dtype) for the log-softmax, and the
    gradient cast back to the compute dtype (again a copy only below fp32)."""
    values = min(CHUNK_VALUES, n_positions * vocab)
    per_value = 4 + (compute_bytes + 4 + compute_bytes if compute_bytes < 4 else 4)
    return 2 * n_positions * dim * compute_bytes + values * per_value


_estimates: dict[tuple, Estimate] = {}


def estimate(model_config, opts, batch: int, seq: int, compute_dtype: torch.dtype, device: str = "cpu",
             overhead: tuple[int, float] | None = None) -> Estimate:
    """``overhead``: (fixed runtime bytes, heap slack); on CPU measured by cpu_overhead() when omitted.

    Kept per process: `tuneforge train` with auto asks for the same estimate when choosing the
    batch and again when checking the run fits (~3 s each on the embedded model: the method
    applied to a meta model and a meta forward pass). A copy is returned: callers set its
    baseline, and peak() fills in the measured overhead."""
    key = (model_config.to_json_string(), type(opts).__name__, opts.model_dump_json(), batch, seq, str(compute_dtype),
           device, overhead)
    if key not in _estimates:
        _estimates[key] = _estimate(model_config, opts, batch, seq, compute_dtype, device, overhead)
    return replace(_estimates[key])


def _estimate(model_config, opts, batch: int, seq: int, compute_dtype: torch.dtype, device: str,
              overhead: tuple[int, float] | None) -> Estimate:
    method = METHODS[opts.name]
    base_dtype = method.base_dtype(opts, compute_dtype)
    model = method.apply(meta_model(model_config, base_dtype), opts)
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    n_train, n_total = sum(p.numel() for p in trained), sum(p.numel() for p in params)
    state = sum(p.numel() * p.element_size() for p in trained)
    autocast = sum(p.numel() * 2 for p in trained if p.dim() >= 2) if compute_dtype != torch.float32 else 0

    # Activations in the compute dtype (autocast's matmul outputs): dry-run a model in it.
    hidden_path = getattr(method, "supports_hidden_path", True)
    virtual = getattr(opts, "num_virtual_tokens", 0)
    if hidden_path:
        act_model = model if base_dtype == compute_dtype else method.apply(meta_model(model_config, compute_dtype), opts)
        body, small = moe_safe_activation_bytes(act_model, model_config, compute_dtype, batch, seq)
    else:  # prompt methods: the frozen base over input + virtual tokens (their forward needs real masks)
        body, small = saved_activation_bytes(meta_model(model_config, compute_dtype), batch, seq + virtual)
    compute_bytes = torch.finfo(compute_dtype).bits // 8
    vocab, dim, layers = model_config.vocab_size, model_config.hidden_size, model_config.num_hidden_layers
    n_positions = batch * (seq + (0 if hidden_path else virtual))
    if hidden_path and chunkable(body_and_head(model)[1]):  # a frozen head: the SFT loss chunks it
        head = chunked_loss_bytes(n_positions, dim, vocab, compute_bytes)
    else:
        head = loss_bytes(n_positions, vocab, compute_bytes)
    # Checkpointing keeps each block's input and recomputes one block at a time in backward.
    per_layer, block_input = body / layers, batch * seq * dim * compute_bytes
    body_ckpt = layers * block_input + per_layer
    small_ckpt = layers * block_input * (block_input < MMAP_THRESHOLD_MAX) + small / layers

    # The head is counted by formula (vocab x hidden): an untied head's weight is left out here.
    head_weight = getattr(body_and_head(model)[1], "weight", None)
    matmul_params = sum(p.numel() for n, p in model.named_parameters()
                        if p.dim() >= 2 and "embed" not in n and p is not head_weight)
    moe = describe(model)
    if moe is not None:  # a token passes through top_k of the routed experts only
        matmul_params -= moe.routed_expert_params * (moe.num_experts - moe.top_k) // moe.num_experts
    flop_model = FlopModel(matmul_params, vocab * dim, 4 * dim * layers, min(1.0, n_train / max(matmul_params, 1)))
    flops = flop_model.flops(batch * seq, batch * seq, batch * seq * seq, False)
    # A 4-bit load reads each weight in the compute dtype before quantising it; on CPU the
    # process heap keeps about that much afterwards (measured: SmolLM2 QLoRA, RSS +0.3 GB).
    quantized = quantized_params(model, opts)
    transient = sum(p.numel() for p in params if id(p) in quantized) * compute_bytes if device == "cpu" else 0
    # Gradients of one decoder layer (or one tensor outside the layers: embeddings, head).
    per_group: dict[str, int] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            key = n.split(".layers.")[1].split(".")[0] if ".layers." in n else n
            per_group[key] = per_group.get(key, 0) + p.numel() * p.element_size()
    # AdamW on CPU runs tensor by tensor (torch picks foreach only for CUDA tensors): a couple of
    # temporaries of the largest trained tensor (measured: SmolLM2 full fp32, opt.step +0.21 GB
    # beside 0.5 GB of gradients, embeddings 0.11 GB). On CUDA foreach: a gradient-sized list.
    largest = max((p.numel() * p.element_size() for p in trained), default=0)
    step_transient = 2 * largest if device == "cpu" else state
    probe = (model_config, opts, compute_dtype, batch, seq) if overhead is None and device == "cpu" else None
    overhead = overhead or (0, 0.0)
    return Estimate(opts.name, n_train, n_total, weight_bytes(model, opts), state, ADAMW_STATES * state, autocast,
                    transient, int(overhead[0]), int(body + head), int(body_ckpt + head), flops, flop_model.flops(batch * seq, batch * seq, batch * seq * seq, True),
                    max(per_group.values(), default=0), step_transient, int(small), int(small_ckpt),
                    float(overhead[1]), probe, flop_model=flop_model)


# --- what a CPU process holds beyond its tensors --------------------------------------

PROBE_LAYERS = (1, 2)  # the target's own layer shapes, batch and sequence, with this many layers
PROBE_REPEATS = 2  # runs per layer count; the fit uses their median (here the mean): SmolLM2 4 x 256 probe ~14 s
PROBE_VOCAB = 512  # the head is modelled by formula; its tensors are above the mmap threshold or small
_overheads: dict[str, tuple[int, float]] = {}


def _probe_config(model_config, layers: int):
    cfg = type(model_config).from_dict(model_config.to_dict())
    cfg.num_hidden_layers, cfg.vocab_size = layers, PROBE_VOCAB
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(cfg, k, None), int) and getattr(cfg, k) >= PROBE_VOCAB:
            setattr(cfg, k, 0)
    if isinstance(getattr(cfg, "layer_types", None), list):  # per-layer attention kinds (sliding/full)
        cfg.layer_types = cfg.layer_types[:layers]
    return cfg


def _probe_method(opts) -> dict:
    # The 4-bit base needs a checkpoint to load; its adapter's ops are LoRA's (same rank, targets).
    # An 8-bit base is the same: the probe trains LoRA's ops on a plain base (bitsandbytes' int8
    # code pages are not counted; measured by benchmarks/plan_accuracy.py).
    raw = opts.model_dump()
    if raw["name"] == "qlora":
        raw = {k: v for k, v in raw.items() if k in LoraOptions.model_fields} | {"name": "lora"}
    if raw.get("load_in_8bit"):
        raw["load_in_8bit"] = False
    return raw


def probe_child(configs: list[str], raw: dict, dtype_name: str, batch: int, seq: int, four_bit: bool = False,
                repeats: int = 1) -> None:
    """Run in a fresh process: for each model config (JSON), the peak of resident anonymous memory
    in two training steps above that before the model is built, plus the library pages the step
    faults in that the process had not touched (printed as a JSON list of lists, ``repeats`` runs
    per config). Each run trains in a process forked after the imports (no OpenMP pool exists
    yet): one interpreter start for all of them, and each starts from the same untouched heap.
    ``four_bit``: the run also pushes a small tensor through bitsandbytes' 4-bit quantise,
    forward and backward, so that the pages of that code path are counted (QLoRA's load and its
    matmuls run it; the probe's adapters are LoRA's on a plain base)."""
    # deferred: transformers takes seconds to import; only code that builds a model pays
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype, opts = getattr(torch, dtype_name), validate_method(raw)
    method, sft = METHODS[opts.name], OBJECTIVES["sft"]
    cfgs = [AutoConfig.for_model(**json.loads(c)) for c in configs]
    # As in a training process, the estimate has run before the model loads: it pays the method's
    # lazy imports (peft's LoRA: ~55 MB of RSS), which are not part of the step.
    estimate(cfgs[0], opts, batch, seq, dtype, "cpu", overhead=(0, 0.0))
    try:
        parent_pages = _file_pages()
    except OSError:  # no pagemap (not Linux, or restricted): anonymous memory only
        parent_pages = None

    def one(cfg) -> int:
        peak, stop = [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _anon_bytes())
                time.sleep(0.001)

        base = _anon_bytes()
        threading.Thread(target=sample, daemon=True).start()
        torch.manual_seed(0)
        if four_bit:
            _touch_4bit(dtype)
        m = method.apply(AutoModelForCausalLM.from_config(cfg).to(method.base_dtype(opts, dtype)), opts)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
        for _ in range(2):
            ids = torch.randint(3, PROBE_VOCAB, (batch, seq))
            b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            with autocast("cpu", dtype):
                loss, n = sft.loss(m, b, sft.options(), hidden_path=getattr(method, "supports_hidden_path", True))
            (loss / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        time.sleep(0.01)
        stop.set()
        code = len(_file_pages() - parent_pages) * _PAGE if parent_pages is not None else 0
        return peak[0] - base + code

    out = [_in_child(one, cfg) for cfg in cfgs for _ in range(repeats)]
    print(json.dumps([out[i:i + repeats] for i in range(0, len(out), repeats)]))


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _anon_bytes() -> int:
    """Resident anonymous memory (resident - file-backed): a forked child faults in the library
    pages its parent had already touched again, which a fresh training process would not count."""
    with open("/proc/self/statm") as f:
        _, resident, shared = f.read().split()[:3]
    return (int(resident) - int(shared)) * _PAGE


def _file_pages() -> set[int]:
    """Pages of file mappings (libraries' code and data, the checkpoint) present in this process's
    page table. A fresh training process counts in its RSS the library pages its first step faults
    in (measured on the tiny test model: ~9 MB of libtorch_cpu.so, 8% of its peak), which anonymous
    memory misses. A forked child must fault in again even the pages its parent had; only those the
    parent had not are new to a training process."""
    present = set()
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pm:
        for line in maps:
            f = line.split()
            if len(f) < 6 or not f[5].startswith("/"):
                continue
            a, b = (int(x, 16) // _PAGE for x in f[0].split("-"))
            pm.seek(a * 8)
            bits = np.frombuffer(pm.read((b - a) * 8), dtype=np.uint64) >> np.uint64(63)
            present.update((a + np.flatnonzero(bits)).tolist())
    return present


def _touch_4bit(dtype: torch.dtype) -> None:
    """One small 4-bit layer forward and backward: faults in bitsandbytes' code pages."""
    import bitsandbytes as bnb  # deferred: optional extra (tuneforge[qlora])

    lin = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type="nf4")
    lin.load_state_dict(torch.nn.Linear(64, 64, bias=False).state_dict())
    lin = lin.to("cpu")
    x = torch.randn(2, 64, dtype=dtype, requires_grad=True)
    lin(x).sum().backward()


def _in_child(measure, cfg) -> int:
    """``measure(cfg)`` in a forked child, its result read back through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report through the pipe, exit without Python's teardown
        code = 1
        try:
            os.write(w, str(measure(cfg)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        got = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise SystemExit(f"probe child failed ({status})")
    return int(got)


def _overhead_key(model_config, raw: dict, dtype: torch.dtype, batch: int, seq: int) -> str:
    cpu = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "sse4")))
    shape = _probe_config(model_config, 1).to_json_string(use_diff=False)
    parts = [tuneforge.__version__, str(PROBE_VERSION), torch.__version__, str(torch.get_num_threads()),
             allocator_in_use(), os.environ.get("LD_PRELOAD", ""),
             str(dtype), json.dumps(raw, sort_keys=True), ",".join(cpu), shape, f"{batch}x{seq}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cpu_overhead(model_config, opts, dtype: torch.dtype, batch: int, seq: int) -> tuple[int, float]:
    """(fixed bytes, slack) of a CPU training process here: what its RSS holds beyond the live
    tensors this module counts, as  fixed + slack x small_activations.

    Measured, not assumed: a fresh process per layer count (its runtime cold, as in training)
    trains the target's own decoder layers (same widths, heads, batch and sequence; 1 and 2
    layers, a 512-token vocabulary) for two steps with the method in the compute dtype. Their RSS
    peaks p1, p2 against this module's estimates give  p = estimate + fixed + slack x small  for
    both, solved for fixed and slack. The slack is measured at the target's tensor sizes because
    it depends on them (what the heap keeps of freed tensors varies with their size and order,
    and nothing above the mmap threshold is kept). Cached per machine, torch, thread count,
    allocator, dtype, method options, layer shape, batch and sequence in
    $TUNEFORGE_HOME/plan-overhead.json (first run: ~10-20 s for a SmolLM2-sized layer).
    TUNEFORGE_PLAN_PROBE=off, a probe too big to be quick (PROBE_MAX_*) or a failed probe use
    CPU_FALLBACK."""

    raw, four_bit = _probe_method(opts), opts.name == "qlora"
    key = _overhead_key(model_config, raw | ({"four_bit": True} if four_bit else {}), dtype, batch, seq)
    if key in _overheads:
        return _overheads[key]
    if os.environ.get("TUNEFORGE_PLAN_PROBE", "").lower() == "off":
        return CPU_FALLBACK
    path = _home() / "plan-overhead.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        _overheads[key] = tuple(cache[key])
        return _overheads[key]
    o = validate_method(raw)
    cfgs = [_probe_config(model_config, n) for n in PROBE_LAYERS]
    try:
        e1, e2 = (estimate(c, o, batch, seq, dtype, "cpu", overhead=(0, 0.0)) for c in cfgs)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError):  # cannot be cut down
        return CPU_FALLBACK
    if e2.peak(False) > PROBE_MAX_BYTES or e2.flops > PROBE_MAX_FLOPS:
        return CPU_FALLBACK
    configs = [c.to_json_string() for c in cfgs]
    code = (f"from tuneforge.plan import probe_child; probe_child({configs!r}, {raw!r}, "
            f"{str(dtype).replace('torch.', '')!r}, {batch}, {seq}, {four_bit}, {PROBE_REPEATS})")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=False)
        # the median of each model's runs: one run's peak varies by ~5-10% (when glibc grows and
        # trims its heap, which thread's arena a tensor lands in)
        peaks = [statistics.median(int(p) for p in runs) for runs in json.loads(r.stdout.strip().splitlines()[-1])]
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError, TypeError, statistics.StatisticsError):
        return CPU_FALLBACK
    (p1, p2), (l1, l2) = peaks, (e1.peak(False), e2.peak(False))
    slack = max(0.0, ((p2 - p1) - (l2 - l1)) / max(e2.small_activations - e1.small_activations, 1))
    fixed = max(0, int(p1 - l1 - slack * e1.small_activations))
    _overheads[key] = (fixed, slack)
    _cache_put(path, key, [fixed, slack])
    return _overheads[key]


def _cache_put(path: Path, key: str, value) -> None:
    """Add one entry to a JSON cache shared by concurrent processes (several plans, test runs):
    read-modify-write under an exclusive lock, so no process drops another's entry, and an atomic
    replace, so no reader sees half a file. A cache that cannot be written is only slower."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                cache = json.loads(path.read_text())
            except (OSError, ValueError):
                cache = {}
            write_json(path, cache | {key: value})
    except OSError:
        pass


# --- what a training process holds before its model loads ------------------------------

# What `tuneforge train` imports before it loads weights (the CLI, the run, the token recipe with
# transformers, peft and the data stack). A code string, run in a probe process: this module sits
# below train and cli and must not import them.
BASELINE_IMPORTS = "tuneforge.cli.train, tuneforge.train.run, tuneforge.train.recipes.tokens, peft"
BASELINE_VERSION = 1  # part of the cache key: a probe that measures differently must not reuse older results
_baselines: dict[str, tuple[int, str]] = {}


def _home() -> Path:
    return Path(os.environ.get("TUNEFORGE_HOME", Path.home() / ".cache" / "tuneforge"))


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _baseline_key(name: str, revision: str | None) -> str:
    from importlib.metadata import PackageNotFoundError, version  # deferred: only a probe's key needs it

    def v(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "-"

    cpu = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "sse4")))
    parts = [tuneforge.__version__, str(BASELINE_VERSION), sys.version.split()[0], torch.__version__,
             *(v(p) for p in ("transformers", "peft", "tokenizers", "numpy", "datasets")),
             os.uname().machine if hasattr(os, "uname") else "", ",".join(cpu), allocator_in_use(),
             os.environ.get("LD_PRELOAD", ""), name, str(revision)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def process_baseline(name: str, revision: str | None = None, trust_remote_code: bool = False) -> tuple[int, str]:
    """(bytes, where the figure comes from): the RSS of a CPU training process before its model
    loads (interpreter, torch, transformers, peft, the data stack, the model's tokenizer), on top
    of which the step's memory comes. ~0.5 GB on this project's hosts, more than the model itself
    for a 135M model: a plan without it promised 0.67 of the measured peak (issue 30).

    Measured once per environment: a fresh process imports what `tuneforge train` imports and
    loads the tokenizer; its RSS is cached in $TUNEFORGE_HOME/plan-baseline.json keyed by the
    package versions, Python, machine, CPU flags, allocator and tokenizer (a few seconds, once).
    TUNEFORGE_PLAN_PROBE=off or a failed probe use this process's own RSS, which has imported
    most of the same (not the training recipe or the tokenizer), and say so."""
    key = _baseline_key(name, revision)
    if key in _baselines:
        return _baselines[key]
    path = _home() / "plan-baseline.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), dict) and isinstance(cache[key].get("bytes"), int):
        _baselines[key] = (cache[key]["bytes"], f"measured here on {cache[key].get('date', '?')}, cached in {path}")
        return _baselines[key]
    if os.environ.get("TUNEFORGE_PLAN_PROBE", "").lower() == "off":
        return _rss(), "this process's RSS (TUNEFORGE_PLAN_PROBE=off)"
    code = (f"import {BASELINE_IMPORTS}; from tuneforge.models.load import load_tokenizer; "
            f"load_tokenizer({name!r}, {revision!r}, {trust_remote_code!r}); "
            "from tuneforge.plan import _rss; print(_rss())")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return _rss(), f"this process's RSS (the baseline probe did not run: {type(e).__name__})"
    try:
        measured = int(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        why = (r.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return _rss(), f"this process's RSS (the baseline probe failed: {why})"
    date = time.strftime("%Y-%m-%d")
    _cache_put(path, key, {"bytes": measured, "date": date, "model": name})
    _baselines[key] = (measured, f"measured here on {date} (imports + tokenizer in a fresh process), cached in {path}")
    return _baselines[key]


# --- the batch the data can produce ------------------------------------------------------


@dataclass
class MeanBatch:
    """The mean micro-batch of a pass as training lays it out: what step time scales with."""
    positions: float  # computed tokens (padding included; a shared prefix once)
    head_positions: float  # of them through the LM head (only the trained ones on the hidden path)
    pairs: float  # query-key pairs attention computes
    micro_batches: int  # in a pass over all the training rows
    source: str


@dataclass
class StepShape:
    """The micro-batch the plan sizes activations for: ``batch`` rows of ``seq`` tokens (the
    largest the data can form); ``mean``: the mean one, for step time (None: data not read)."""
    batch: int
    seq: int
    source: str  # how it was found: from the data, or data.max_length and why
    mean: MeanBatch | None = None


# Rows the plan lays out into batches to find the mean micro-batch: enough for a stable mean,
# bounded so a large dataset's plan stays quick.
MEAN_BATCH_ROWS = 4096


def mean_batch(rows: list[dict], cfg, padding_free: bool) -> MeanBatch:
    """One shuffled pass of (up to MEAN_BATCH_ROWS of) the training rows, batched exactly as
    the token recipe does (data/render.py epoch_batches), averaged per micro-batch."""
    t, d, n_rows = cfg.train, cfg.data, len(rows)
    if len(rows) > MEAN_BATCH_ROWS:
        g = torch.Generator().manual_seed(t.seed)
        rows = [rows[i] for i in torch.randperm(len(rows), generator=g)[:MEAN_BATCH_ROWS].tolist()]
    shared = padding_free and t.shared_prefix and cfg.objective.name == "sft"
    batches = epoch_batches(rows, 0, t.seed, t.batch_size, d.packing, d.max_length, 0, padding_free, shared)
    hidden_path = t.logits_at_trained_only and getattr(METHODS[cfg.method.name], "supports_hidden_path", True)
    positions = head = pairs = 0
    for b in batches:
        n = b["input_ids"].numel()
        positions += n
        head += trained_tokens(b) if hidden_path else n
        # Causal attention over a row of L tokens: ~L^2/2 pairs, counted as the plan's L^2 (the
        # kernels compute whole tiles): sum(2p + 1) over positions p = L^2; padded rows: the
        # whole padded width.
        pos = b.get("position_ids")
        pairs += float((2 * pos + 1).sum()) if pos is not None else n * b["input_ids"].shape[1]
    k = max(len(batches), 1)
    layout = "packed" if d.packing else "padding-free" + (", shared prefix once" if shared else "") \
        if padding_free else "padded"
    return MeanBatch(positions / k, head / k, pairs / k, math.ceil(len(batches) * n_rows / len(rows)),
                     f"the data's mean batch: {positions / k:.0f} tokens computed ({layout}), "
                     f"{head / k:.0f} through the LM head" + (" (the trained ones)" if hidden_path else ""))


def longest_batch(lengths: list[int], batch_size: int, max_length: int, packing: bool,
                  padding_free: bool) -> StepShape:
    """The largest micro-batch these training rows can form, whatever the shuffle: padded, the
    longest row padded to, times the batch; padding-free, the longest rows laid end to end (the
    tokens, not the padding, are what the step holds; counted as ``batch`` rows of their mean
    length, which keeps every per-token activation exact); packed, bins of up to max_length."""
    lengths = sorted((min(n, max_length) for n in lengths), reverse=True)
    if not lengths:
        return StepShape(batch_size, max_length, "data.max_length (no training row)")
    if packing:
        total = sum(lengths)
        bins = -(-total // max_length)
        return StepShape(min(batch_size, bins), min(max_length, total),
                         f"the data: packed bins of up to {max_length} tokens ({len(lengths)} rows, {total} tokens)")
    b = min(batch_size, len(lengths))
    if padding_free:
        tokens = sum(lengths[:b])
        return StepShape(b, -(-tokens // b), f"the data: its {b} longest rows end to end, {tokens} tokens "
                                             "(padding-free batch)")
    return StepShape(b, lengths[0], f"the data: its longest row ({lengths[0]} tokens) padded, x {b} rows")


def train_lengths(cfg) -> tuple[list[int] | None, str]:
    """Token lengths of the run's training rows as training encodes them (chat template,
    system prompt, data.overlength's drop or truncation), or None and why they were not read."""
    rows, why = train_rows(cfg)
    return (None, why) if rows is None else ([len(r["input_ids"]) for r in rows], "")


def train_rows(cfg) -> tuple[list[dict] | None, str]:
    """The run's training rows as training encodes them, or None and why they were not read."""
    d = cfg.data
    if d.tasks or cfg.continual.previous:
        return None, "several tasks: their data is not read by the plan"
    if "-" in d.train:
        return None, "data from standard input"
    try:
        tok = load_tokenizer(cfg.model.name, revision=cfg.model.revision,
                             trust_remote_code=cfg.model.trust_remote_code)
        objective = objective_of(cfg)
        rows = objective.encode(tok, build_splits(d, cfg.train.seed, objective.data_kind).train, d).rows
    # Broad on purpose: whatever stops the data from loading (a missing file, a bad row, an objective
    # whose rows are not token rows), the plan still answers, sized by max_length and saying why;
    # `tuneforge train` reports the data's own errors where it loads them.
    except Exception as e:
        return None, f"data not read: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return rows, ""


def step_shape(cfg) -> StepShape:
    t, d = cfg.train, cfg.data
    rows, why = train_rows(cfg)
    if rows is None:
        return StepShape(t.batch_size, d.max_length, f"data.max_length ({why})")
    # As the token recipe decides: padding-free unless packing, DP-SGD or a method without it (prompt
    # methods); a model without per-example attention falls back to padded batches (varlen.py).
    padding_free = (t.padding_free and not d.packing and cfg.privacy is None
                    and getattr(METHODS[cfg.method.name], "padding_free", True))
    shape = longest_batch([len(r["input_ids"]) for r in rows], t.batch_size, d.max_length, d.packing, padding_free)
    if rows:
        shape.mean = mean_batch(rows, cfg, padding_free)
    return shape


# --- hardware ------------------------------------------------------------------------


@dataclass
class Memory:
    name: str
    free: int
    total: int


def device_memory(device: str) -> list[Memory]:
    if device == "cuda":
        return [Memory(torch.cuda.get_device_name(i), *torch.cuda.mem_get_info(i))
                for i in range(torch.cuda.device_count())]

    vm = psutil.virtual_memory()
    return [Memory("CPU RAM", vm.available, vm.total)]


def matmul_flops_per_s(device: str, dtype: torch.dtype, n: int = 1024, reps: int = 5, rounds: int = 3) -> float:
    """A quick probe of the device's matmul throughput in the compute dtype: the best of
    ``rounds`` (a shared or virtual machine's neighbours only ever slow a round down; single
    rounds ranged 39-106 GFLOP/s on the 2-core EPYC host)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(rounds):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


# --- measuring what the plan estimates ------------------------------------------------


def measure_peak(model: str, raw: dict, batch: int, seq: int, steps: int, device: str, dtype: str = "auto") -> dict:
    """Ground truth for the estimate (run it in a fresh process that first imports BASELINE_IMPORTS,
    as `tuneforge train` does): see benchmarks/plan_accuracy.py. ``measured_gb``: the step's part
    (peak RSS during the steps above the RSS before the model loads); ``process_peak_gb``: the whole
    process's peak RSS, what a run's summary.json reports as peak_rss_mb."""
    opts = validate_config({"model": {"name": model}, "data": {"train": ["-"]}, "method": raw}).method
    method, sft = METHODS[opts.name], OBJECTIVES["sft"]
    dtype = pick_dtype(dtype, device)
    load_tokenizer(model)  # a run holds its tokenizer through training: part of its baseline
    est = estimate(load_config(model), opts, batch, seq, dtype, device)
    if device == "cpu":
        est.baseline, est.baseline_source = process_baseline(model)

    proc, peak, stop = psutil.Process(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    base_rss = proc.memory_info().rss
    process_peak = peak[0] = base_rss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    m = load_causal_lm(model, method.base_dtype(opts, dtype), device,
                       quantization_config=method.quantization_config(opts, dtype))
    m = method.apply(m, opts)
    load_peak, peak[0] = peak[0], 0  # loading has its own transient peak (file pages, casts): reported apart
    process_peak = max(process_peak, load_peak)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    t0 = None
    for step in range(steps):
        if step == 1:
            t0 = time.perf_counter()
        ids = torch.randint(3, m.config.vocab_size, (batch, seq), generator=g).to(device)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        with autocast(device, dtype):
            loss, n = sft.loss(m, b, sft.options(), hidden_path=getattr(method, "supports_hidden_path", True))
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step_s = (time.perf_counter() - t0) / (steps - 1)
    stop.set()
    sampler.join()
    measured = (torch.cuda.max_memory_allocated() if device == "cuda" else peak[0] - base_rss)
    # the process's peak as summary.json reports it (kernel-kept, no sampling gap), and the
    # estimate of it (the step's part on top of the measured baseline)
    process_peak = max(process_peak, peak[0], int(peak_rss_mb() * 2**20))
    step_est = est.peak(False) - est.baseline
    return {"method": opts.name, "estimate_gb": step_est / 2**30, "measured_gb": measured / 2**30,
            "ratio": step_est / measured, "process_estimate_gb": est.peak(False) / 2**30,
            "process_peak_gb": process_peak / 2**30, "process_ratio": est.peak(False) / process_peak,
            "baseline_gb": est.baseline / 2**30, "baseline_source": est.baseline_source,
            "step_s": step_s, "trainable": est.trainable,
            "load_peak_gb": (load_peak - base_rss) / 2**30, "estimate": {k: v / 2**30 for k, v in vars(est).items()
                                                                         if k.endswith(("s", "copies")) and
                                                                         isinstance(v, int) and k != "trainable"}}


# --- the plan ------------------------------------------------------------------------


def comparison_methods(cfg, n_layers: int, moe: bool = False) -> dict[str, dict]:
    """The configured method plus the usual alternatives for this model (a mixture of experts:
    LoRA through method.moe on attention + experts, no QLoRA row; see methods/moe.py)."""
    rows = {"full": {"name": "full"}, "freeze": {"name": "freeze", "top_k": max(1, n_layers // 4)},
            "lora": {"name": "lora", "r": 16}, "lora 8-bit": {"name": "lora", "r": 16, "load_in_8bit": True},
            "qlora": {"name": "qlora", "r": 16}}
    if moe:
        rows = {**rows, "lora": {"name": "lora", "r": 16, "moe": {"lora_on": "both"}}}
        rows.pop("qlora")
        rows.pop("lora 8-bit")  # bitsandbytes quantises linears, not fused 3-D experts (lora.py refuses it)
    configured = cfg.method.model_dump()
    return {f"{cfg.method.name} (config)": configured} | {k: v for k, v in rows.items()
                                                           if validate_method(v) != cfg.method}


def validate_method(raw: dict):
    return validate_config({"data": {"train": ["-"]}, "method": raw}).method


def suggestions(cfg, est: Estimate, free: int, compute_dtype: torch.dtype) -> list[str]:
    t, out = cfg.train, []
    budget = free * FIT_MARGIN
    ckpt = t.gradient_checkpointing
    if est.peak(ckpt) <= budget:
        return out
    if not ckpt and est.peak(True) <= budget:
        out.append("train.gradient_checkpointing=true (activations "
                   f"{est.activations / GB:.2f} -> {est.activations_ckpt / GB:.2f} GB, ~30% slower)")
    per_row = est.activations_ckpt if ckpt else est.activations
    fixed = est.peak(ckpt) - per_row
    if fixed < budget and t.batch_size > 1:
        rows = max(1, int(t.batch_size * (budget - fixed) / per_row))
        if rows < t.batch_size:
            accum = t.grad_accum * -(-t.batch_size // rows)
            out.append(f"train.batch_size={rows} train.grad_accum={accum} (same effective batch)")
    if fixed >= budget and cfg.method.name not in ("lora", "qlora"):
        out.append("method.name=lora or method.name=qlora (train a small adapter; the base stays frozen)")
    if compute_dtype == torch.float32:
        out.append("train.dtype=bf16 where the device supports it (half the activation memory)")
    return out or [f"a machine with more memory: the smallest setting still needs {est.peak(True) / GB:.1f} GB"]


def plan(cfg, device: str | None = None, probe: bool = True) -> dict:
    device = device or pick_device(cfg.train.device)
    dtype = pick_dtype(cfg.train.dtype, device)
    mc = load_config(cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    shape = step_shape(cfg)
    batch, seq = shape.batch, shape.seq
    # On a GPU the peak that decides is the device's; the process's RSS is host memory.
    baseline = process_baseline(cfg.model.name, cfg.model.revision, cfg.model.trust_remote_code) \
        if device == "cpu" else (0, "")
    rows = {}
    moe = describe(meta_model(mc, dtype))  # None: a dense model
    for label, raw in comparison_methods(cfg, mc.num_hidden_layers, moe is not None).items():
        rows[label] = estimate(mc, validate_method(raw), batch, seq, dtype, device)
        rows[label].baseline, rows[label].baseline_source = baseline
    speed = matmul_flops_per_s(device, dtype) * STEP_EFFICIENCY if probe else None
    return {"device": device, "dtype": dtype, "memory": device_memory(device), "rows": rows, "speed": speed,
            "batch": batch, "seq": seq, "shape": shape, "baseline": baseline,
            "moe": None if moe is None else {"model_type": moe.model_type, "experts": moe.num_experts,
                                             "top_k": moe.top_k, "moe_layers": len(moe.layers),
                                             "total_params": moe.total_params, "active_params": moe.active_params,
                                             "routed_expert_params": moe.routed_expert_params}}


def fits(est: Estimate, memory: list[Memory], checkpointing: bool, held: int = 0) -> bool:
    """``held``: bytes of the peak this process already holds, so no longer in the free memory
    (the training process itself checking: its imports, part of the baseline)."""
    return est.peak(checkpointing) - held <= FIT_MARGIN * min(m.free for m in memory)


def ensure_fits(cfg, device: str) -> None:
    """Refuse (with the fix) a run whose estimated peak does not fit free memory."""
    dtype = pick_dtype(cfg.train.dtype, device)
    mc = load_config(cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    memory = device_memory(device)
    ckpt = cfg.train.gradient_checkpointing
    if device == "cpu":
        # A run far from the limit is settled with the fallback overhead, without the probe
        # process (seconds on a new shape): within half the allowed memory, the measured
        # overhead (slack up to ~1.1 x small activations here vs 0.5) cannot push it over.
        quick = estimate(mc, cfg.method, cfg.train.batch_size, cfg.data.max_length, dtype, device,
                         overhead=CPU_FALLBACK)
        if quick.peak(ckpt) <= 0.5 * FIT_MARGIN * min(m.free for m in memory):
            return
    # Sized by the batches the data can form, not max_length: 120-token rows under
    # max_length 2048 must not be refused for a 2048-token batch they never make.
    shape = step_shape(cfg)
    est = estimate(mc, cfg.method, shape.batch, shape.seq, dtype, device)
    held = 0
    if device == "cpu":  # this process is the training process: it already holds its imports
        est.baseline, est.baseline_source = process_baseline(cfg.model.name, cfg.model.revision,
                                                             cfg.model.trust_remote_code)
        held = min(_rss(), est.baseline)
    if fits(est, memory, ckpt, held):
        return
    free = min(m.free for m in memory)
    fixes = "; or ".join(suggestions(cfg, est, free + int(held / FIT_MARGIN), dtype))
    raise ConfigError([f"this run needs ~{est.peak(ckpt) / GB:.1f} GB at its peak (batch {shape.batch} x "
                       f"{shape.seq} tokens, sized by {shape.source}) but {memory[0].name} has {free / GB:.1f} GB "
                       f"free (see `tuneforge plan`). Fix: {fixes}. Or pass --force to try anyway"])


def step_seconds(e: Estimate, p: dict, cfg) -> float | None:
    """One optimizer step (grad_accum micro-batches) at the data's mean batch (at the largest
    when the data was not read), from the matmul probe; None without the probe."""
    if not p["speed"]:
        return None
    mean, ckpt = p["shape"].mean, cfg.train.gradient_checkpointing
    if mean is None or e.flop_model is None:
        flops = e.flops_ckpt if ckpt else e.flops
    else:
        flops = e.flop_model.flops(mean.positions, mean.head_positions, mean.pairs, ckpt)
    return cfg.train.grad_accum * flops / p["speed"]


def run_steps(cfg, mean: MeanBatch | None) -> int | None:
    """Optimizer steps the run takes (max_steps, or its epochs over the data), as the loop counts."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    if mean is None:
        return None
    return math.ceil(cfg.train.epochs * math.ceil(mean.micro_batches / cfg.train.grad_accum))


def print_plan(cfg, console) -> dict:
    p = plan(cfg)
    mem, ckpt = p["memory"], cfg.train.gradient_checkpointing
    console.print(f"[bold]plan[/] {cfg.model.name} on {p['device']} ({str(p['dtype']).replace('torch.', '')}), "
                  f"batch {p['batch']} x {p['seq']} tokens, gradient checkpointing {'on' if ckpt else 'off'}")
    console.print(f"  activations sized by {p['shape'].source}")
    if p["baseline"][0]:
        console.print(f"  process baseline {p['baseline'][0] / GB:.2f} GB (imports, tokenizer; in every peak): "
                      f"{p['baseline'][1]}")
    for m in mem:
        console.print(f"  {m.name}: {m.free / GB:.1f} GB free of {m.total / GB:.1f} GB")
    if p["moe"]:
        e = p["moe"]
        console.print(f"  mixture of experts ({e['model_type']}): {e['experts']} experts, top-{e['top_k']}, "
                      f"{e['moe_layers']} MoE layers; parameters: {e['total_params']:,} total (all in memory), "
                      f"{e['active_params']:,} active per token ({100 * e['active_params'] / e['total_params']:.1f}%,"
                      " what step time scales with)")
    table = Table(title="estimated memory per training step (GB) and step time")
    for col in ("method", "trainable", "weights", "grads", "optimizer", "activations", "act. (ckpt)", "peak",
                "step s", "fits"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for label, e in p["rows"].items():
        step = step_seconds(e, p, cfg)
        table.add_row(label, f"{e.trainable:,} ({100 * e.trainable / e.total:.2f}%)", f"{e.weights / GB:.2f}",
                      f"{e.grads / GB:.2f}", f"{(e.optimizer + e.autocast_copies) / GB:.2f}",
                      f"{e.activations / GB:.2f}", f"{e.activations_ckpt / GB:.2f}", f"{e.peak(ckpt) / GB:.2f}",
                      f"{step:.2f}", "[green]yes[/]" if fits(e, mem, ckpt) else "[red]no[/]")
    console.print(table)
    est = next(iter(p["rows"].values()))
    tips = suggestions(cfg, est, min(m.free for m in mem), p["dtype"])
    console.print("[green]the configured run fits[/]" if not tips else "[red]does not fit[/]; try: " + "; ".join(tips))
    mean, steps = p["shape"].mean, run_steps(cfg, p["shape"].mean)
    console.print(f"  step time at {mean.source if mean else p['shape'].source}")
    if steps and p["speed"]:
        total = steps * step_seconds(est, p, cfg)
        upto = "up to " if cfg.train.early_stopping_patience and not cfg.train.max_steps else ""
        console.print(f"  the configured run: {upto}{steps} steps, ~{total / 60:.1f} min of training "
                      "(validation, loading and saving not included)")
    console.print("[dim]optimizer column includes autocast's bf16 weight copies; step time from a matmul probe "
                  f"x {STEP_EFFICIENCY} efficiency (rough)[/]")
    return p
