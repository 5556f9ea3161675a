"""Plan a run before loading any weights: memory (weights, gradients, optimizer states,
activations with and without gradient checkpointing, peak) and step time per method,
whether it fits this machine, and what to change when it does not.

Everything comes from the model's config: the model is built on the ``meta`` device (no
memory, no compute), the method is applied to it (exact trainable counts for any method),
and one forward pass on meta tensors records every tensor autograd saves for backward
(exact activation shapes for this architecture and method). The LM head's logits and
loss are added by formula, since the loss indexes the trained positions (data-dependent
shapes that meta tensors cannot run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


GB = 2**30
FIT_MARGIN = 0.9  # leave 10% of free memory for the runtime, the allocator and data
# Share of a matmul probe's throughput a training step reaches (kernel mix, small
# matrices, elementwise ops); measured on the embedded model here: 0.25-0.45.
STEP_EFFICIENCY = 0.35
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, each the size of the parameter
# What the first training step adds to a CPU process whatever the model: thread pools,
# oneDNN/MKL workspaces, the autograd engine (measured here: 50-100 MB of RSS on models of
# 1.6M and 135M parameters). On CUDA the context is already out of the free memory read.
CPU_RUNTIME_BYTES = 64 * 2**20


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
    runtime: int  # fixed cost of a training process on the device
    activations: int
    activations_ckpt: int
    flops: float  # per optimizer step, without recomputation
    flops_ckpt: float

    def peak(self, checkpointing: bool) -> int:
        act = self.activations_ckpt if checkpointing else self.activations
        return (self.weights + self.grads + self.optimizer + self.autocast_copies + self.load_transient
                + self.runtime + act)


def meta_model(model_config, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, dtype=dtype)


def quantized_bytes(numel: int, double_quant: bool) -> float:
    """4-bit weights: half a byte each + one absmax scale per 64 weights (fp32, or 8-bit
    with one fp32 per 256 scales under double quantisation)."""
    scales = 1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64
    return numel * (0.5 + scales)


def quantized_params(model, opts) -> set[int]:
    """ids of the weights a 4-bit load quantises: every nn.Linear of the base but the output head."""
    if opts.name != "qlora":
        return set()
    head = model.get_output_embeddings()
    return {id(m.weight) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and "lora_" not in n}


def weight_bytes(model, opts) -> int:
    quantized = quantized_params(model, opts)
    return int(sum(quantized_bytes(p.numel(), opts.double_quant) if id(p) in quantized
                   else p.numel() * p.element_size() for p in model.parameters()))


def saved_activation_bytes(model, batch: int, seq: int) -> int:
    """Bytes autograd saves for backward in one forward pass of the transformer body (run on meta tensors).
    Parameters (and views of them) that autograd also saves are not activations."""
    from tuneforge.objectives.sft import body_and_head

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
    return sum(saved.values())


def loss_bytes(n_positions: int, vocab: int, compute_bytes: int) -> int:
    # logits in the compute dtype, their fp32 copy, and fp32 log-softmax kept for backward
    return n_positions * vocab * (compute_bytes + 4 + 4)


def estimate(model_config, opts, batch: int, seq: int, compute_dtype: torch.dtype, device: str = "cpu") -> Estimate:
    from tuneforge.methods import METHODS

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
        body = saved_activation_bytes(act_model, batch, seq)
    else:  # prompt methods: the frozen base over input + virtual tokens (their forward needs real masks)
        body = saved_activation_bytes(meta_model(model_config, compute_dtype), batch, seq + virtual)
    compute_bytes = torch.finfo(compute_dtype).bits // 8
    vocab, dim, layers = model_config.vocab_size, model_config.hidden_size, model_config.num_hidden_layers
    head = loss_bytes(batch * (seq + (0 if hidden_path else virtual)), vocab, compute_bytes)
    # Checkpointing keeps each block's input and recomputes one block at a time in backward.
    per_layer = body / layers
    body_ckpt = layers * batch * seq * dim * compute_bytes + per_layer

    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n)
    fwd = 2 * batch * seq * (matmul_params + vocab * dim) + 4 * batch * seq * seq * dim * layers
    weight_grad_share = min(1.0, n_train / max(matmul_params, 1))
    flops = fwd * (2 + weight_grad_share)  # forward + input grads + weight grads of what trains
    # A 4-bit load reads each weight in the compute dtype before quantising it; on CPU the
    # process heap keeps about that much afterwards (measured: SmolLM2 QLoRA, RSS +0.3 GB).
    quantized = quantized_params(model, opts)
    transient = sum(p.numel() for p in params if id(p) in quantized) * compute_bytes if device == "cpu" else 0
    return Estimate(opts.name, n_train, n_total, weight_bytes(model, opts), state, ADAMW_STATES * state, autocast,
                    transient, CPU_RUNTIME_BYTES if device == "cpu" else 0, int(body + head), int(body_ckpt + head),
                    flops, flops + fwd)


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
    import psutil

    vm = psutil.virtual_memory()
    return [Memory("CPU RAM", vm.available, vm.total)]


def matmul_flops_per_s(device: str, dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    """A quick probe of the device's matmul throughput in the compute dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


# --- measuring what the plan estimates ------------------------------------------------


def measure_peak(model: str, raw: dict, batch: int, seq: int, steps: int, device: str, dtype: str = "auto") -> dict:
    """Ground truth for the estimate (run it in a fresh process): see benchmarks/plan_accuracy.py."""
    import threading

    import psutil

    from tuneforge.plugins import validate_config
    from tuneforge.methods import METHODS as REGISTRY
    from tuneforge.models.load import load_causal_lm, load_config
    from tuneforge.objectives import OBJECTIVES
    from tuneforge.hardware import pick_dtype
    from tuneforge.hardware import autocast

    opts = validate_config({"model": {"name": model}, "data": {"train": ["-"]}, "method": raw}).method
    method, sft = REGISTRY[opts.name], OBJECTIVES["sft"]
    dtype = pick_dtype(dtype, device)
    est = estimate(load_config(model), opts, batch, seq, dtype, device)

    proc, peak, stop = psutil.Process(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    base_rss = proc.memory_info().rss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    m = load_causal_lm(model, method.base_dtype(opts, dtype), device,
                       quantization_config=method.quantization_config(opts, dtype))
    m = method.apply(m, opts)
    load_peak, peak[0] = peak[0], 0  # loading has its own transient peak (file pages, casts): reported apart
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
    return {"method": opts.name, "estimate_gb": est.peak(False) / 2**30, "measured_gb": measured / 2**30,
            "ratio": est.peak(False) / measured, "step_s": step_s, "trainable": est.trainable,
            "load_peak_gb": (load_peak - base_rss) / 2**30, "estimate": {k: v / 2**30 for k, v in vars(est).items()
                                                                         if k.endswith(("s", "copies")) and
                                                                         isinstance(v, int) and k != "trainable"}}


# --- the plan ------------------------------------------------------------------------


def comparison_methods(cfg, n_layers: int) -> dict[str, dict]:
    """The configured method plus the usual alternatives for this model."""
    rows = {"full": {"name": "full"}, "freeze": {"name": "freeze", "top_k": max(1, n_layers // 4)},
            "lora": {"name": "lora", "r": 16}, "qlora": {"name": "qlora", "r": 16}}
    configured = cfg.method.model_dump()
    return {f"{cfg.method.name} (config)": configured} | {k: v for k, v in rows.items()
                                                           if validate_method(v) != cfg.method}


def validate_method(raw: dict):
    from tuneforge.plugins import validate_config

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
    from tuneforge.models.load import load_config
    from tuneforge.hardware import pick_device, pick_dtype

    device = device or pick_device(cfg.train.device)
    dtype = pick_dtype(cfg.train.dtype, device)
    mc = load_config(cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    batch, seq = cfg.train.batch_size, cfg.data.max_length
    rows = {}
    for label, raw in comparison_methods(cfg, mc.num_hidden_layers).items():
        rows[label] = estimate(mc, validate_method(raw), batch, seq, dtype, device)
    speed = matmul_flops_per_s(device, dtype) * STEP_EFFICIENCY if probe else None
    return {"device": device, "dtype": dtype, "memory": device_memory(device), "rows": rows, "speed": speed,
            "batch": batch, "seq": seq}


def fits(est: Estimate, memory: list[Memory], checkpointing: bool) -> bool:
    return est.peak(checkpointing) <= FIT_MARGIN * min(m.free for m in memory)


def ensure_fits(cfg, device: str) -> None:
    """Refuse (with the fix) a run whose estimated peak does not fit free memory."""
    from tuneforge.config import ConfigError
    from tuneforge.models.load import load_config
    from tuneforge.hardware import pick_dtype

    dtype = pick_dtype(cfg.train.dtype, device)
    mc = load_config(cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    est = estimate(mc, cfg.method, cfg.train.batch_size, cfg.data.max_length, dtype, device)
    memory = device_memory(device)
    if fits(est, memory, cfg.train.gradient_checkpointing):
        return
    free = min(m.free for m in memory)
    fixes = "; or ".join(suggestions(cfg, est, free, dtype))
    raise ConfigError([f"this run needs ~{est.peak(cfg.train.gradient_checkpointing) / GB:.1f} GB at its peak "
                       f"but {memory[0].name} has {free / GB:.1f} GB free (see `tuneforge plan`). "
                       f"Fix: {fixes}. Or pass --force to try anyway"])


def print_plan(cfg, console) -> dict:
    from rich.table import Table

    p = plan(cfg)
    mem, ckpt = p["memory"], cfg.train.gradient_checkpointing
    console.print(f"[bold]plan[/] {cfg.model.name} on {p['device']} ({str(p['dtype']).replace('torch.', '')}), "
                  f"batch {p['batch']} x {p['seq']} tokens, gradient checkpointing {'on' if ckpt else 'off'}")
    for m in mem:
        console.print(f"  {m.name}: {m.free / GB:.1f} GB free of {m.total / GB:.1f} GB")
    table = Table(title="estimated memory per training step (GB) and step time")
    for col in ("method", "trainable", "weights", "grads", "optimizer", "activations", "act. (ckpt)", "peak",
                "step s", "fits"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for label, e in p["rows"].items():
        step = (e.flops_ckpt if ckpt else e.flops) / p["speed"]
        table.add_row(label, f"{e.trainable:,} ({100 * e.trainable / e.total:.2f}%)", f"{e.weights / GB:.2f}",
                      f"{e.grads / GB:.2f}", f"{(e.optimizer + e.autocast_copies) / GB:.2f}",
                      f"{e.activations / GB:.2f}", f"{e.activations_ckpt / GB:.2f}", f"{e.peak(ckpt) / GB:.2f}",
                      f"{step:.2f}", "[green]yes[/]" if fits(e, mem, ckpt) else "[red]no[/]")
    console.print(table)
    est = next(iter(p["rows"].values()))
    tips = suggestions(cfg, est, min(m.free for m in mem), p["dtype"])
    console.print("[green]the configured run fits[/]" if not tips else "[red]does not fit[/]; try: " + "; ".join(tips))
    console.print("[dim]optimizer column includes autocast's bf16 weight copies; step time from a matmul probe "
                  f"x {STEP_EFFICIENCY} efficiency (rough)[/]")
    return p
