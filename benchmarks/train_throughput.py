"""Fine-tuning speed and memory: tuneforge vs the peers users would pick instead, in one invocation.

Workload (issue "speed and memory"): an alpaca-style instruction set (real chatterbot-corpus
exchanges, 1-6 questions a row; see ``builtin:chatterbot_instructions``), the first
``steps x batch`` rows that fit ``--max-length`` for training and the next ``--eval-rows``
for an eval loss. Every runner trains exactly those rows once, with the same LoRA (r=8,
alpha 16, all linear layers), batch, lr and constant schedule, in its own process so its
peak RSS is its own. Printed per runner: real (non-padding) tokens/s, model FLOPs
utilisation, peak RSS, final train loss and eval loss (token-weighted mean over the eval
rows), then each peer's ratio to tuneforge.

MFU counts model FLOPs per computed token (the positions the model ran: tuneforge computes a
prefix its batch's rows share once, ``train.shared_prefix``, so it runs fewer than the rows'
tokens; real tokens/s stays the rows' tokens over the time; LoRA and QLoRA: 4 x params, forward + input
gradients; full: 6 x params; LM head included, attention products ignored) against the
matrix-product rate of this model's shapes in the dtype training runs in here (bf16 on CPUs
with bf16 units and on GPUs, fp32 elsewhere: ``hardware.pick_dtype``) measured on the same
cores in the same invocation, so the shared machine's speed of the day cancels out. The
header names the CPU kind (AMX, AVX512-BF16, AVX2...), flags, allocator and load average.

    python benchmarks/train_throughput.py                      # LoRA, 30 steps x 4 rows, 256 tokens
    python benchmarks/train_throughput.py --max-length 512 --method full
    python benchmarks/train_throughput.py --max-length 1024 --max-items 20   # rows of up to ~1000 tokens
    python benchmarks/train_throughput.py --runners tuneforge,tuneforge:data.packing=false

Runners: ``tuneforge`` (defaults, with tcmalloc preloaded when installed, as ``tuneforge
train`` does), ``tuneforge:KEY=VALUE,...`` (defaults with config overrides: how each speed-up
is measured; ``allocator=off`` runs it on glibc malloc), ``trainer`` (transformers Trainer + peft, fp32
weights, bf16=True where the CPU has bf16 units, else fp32 as a user of that CPU would run it),
``trainer_tcmalloc`` (same with tuneforge's allocator preloaded: tcmalloc, or the pip
mimalloc), ``sft_trainer`` (trl SFTTrainer + peft, bf16 as the Trainer); the peers take
``:seed=N`` (LoRA init and data order; tuneforge's is ``tuneforge:train.seed=N``). ``--model`` takes any model spec
tuneforge accepts (default: the embedded SmolLM2-135M-Instruct).

On a GPU (``--device cuda``) every runner trains there in bf16 autocast, peak GPU memory is
printed beside RSS, MFU is against the GPU's measured bf16 matrix rate, and tcmalloc is not
preloaded. Without hub access, build a model of a known architecture with random weights
(``benchmarks/random_model.py``): throughput does not depend on the weights.

    python benchmarks/random_model.py smollm2-1.7b /tmp/sm17
    python benchmarks/train_throughput.py --device cuda --model /tmp/sm17 --batch 16 --max-length 512 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_RUNNERS = "tuneforge,trainer,trainer_tcmalloc,sft_trainer"
# What caps this host's kernels to a narrower CPU's (torch's own kernels, oneDNN, MKL): an
# AVX2-only CPU stood in for by a wider one.
EMULATION = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


# --- the workload ------------------------------------------------------------------------------
def write_workload(a, folder: Path) -> dict:
    """train.jsonl / eval.jsonl (instruction format) holding only rows that fit max_length, so
    no runner drops or truncates anything and all train the same tokens."""
    from tuneforge.data.builtin import chatterbot_instructions
    from tuneforge.data.formats import FORMATS
    from tuneforge.data.render import encode_rows
    from tuneforge.models.load import load_tokenizer

    tok = load_tokenizer(a.model)
    keep = []
    for r in chatterbot_instructions(seed=0, max_items=a.max_items):
        enc = encode_rows(tok, [FORMATS["instruction"].convert(r, {})], a.max_length, "drop").rows
        if enc:
            keep.append((r, len(enc[0]["input_ids"]), sum(x != -100 for x in enc[0]["labels"])))
    n = a.steps * a.batch
    if len(keep) < n + a.eval_rows:
        raise SystemExit(f"only {len(keep)} rows fit {a.max_length} tokens; need {n + a.eval_rows}")
    for name, part in (("train", keep[:n]), ("eval", keep[n : n + a.eval_rows])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r, _, _ in part))
    lengths = [length for _, length, _ in keep[:n]]
    padded = sum(max(lengths[i : i + a.batch]) * len(lengths[i : i + a.batch]) for i in range(0, n, a.batch))
    return {"rows": n, "real_tokens": sum(lengths), "mean_tokens": sum(lengths) / n,
            "padding_share": 1 - sum(lengths) / padded,
            "response_share": sum(t for _, _, t in keep[:n]) / sum(lengths)}


def tokenized(a, name: str, tok) -> list[dict]:
    from tuneforge.data.formats import FORMATS
    from tuneforge.data.render import encode_rows

    raw = [json.loads(x) for x in (Path(a.workdir) / f"{name}.jsonl").read_text().splitlines()]
    enc = encode_rows(tok, [FORMATS["instruction"].convert(r, {}) for r in raw], a.max_length, "drop")
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in enc.rows]


def peer_seed(overrides: list[str]) -> int:
    """``trainer:seed=N``: the peers take one setting, the seed of their LoRA init and data
    order (the eval-loss spread across seeds is what "equal eval loss" is judged against)."""
    seed = 42  # TrainingArguments' default
    for o in overrides:
        key, _, value = o.partition("=")
        if key != "seed" or not value.isdigit():
            raise SystemExit(f"the Trainer runners take only seed=N, not {o!r}")
        seed = int(value)
    return seed


def train_dtype(a):
    """The dtype tuneforge trains in here (``--dtype auto``: bf16 with bf16 units or CUDA, else
    fp32); the peers get the same, as their users would choose on this machine."""
    from tuneforge.hardware import pick_dtype

    return pick_dtype(a.dtype, a.device)


def eval_loss(a, model, rows: list[dict], pad_id: int) -> float:
    """Token-weighted mean loss over the eval rows (in the training dtype, as tuneforge's validation)."""
    import torch

    from tuneforge.data.render import pad_batch
    from tuneforge.hardware import autocast

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast(a.device, train_dtype(a)):
        for i in range(0, len(rows), 8):
            b = {k: v.to(model.device) for k, v in pad_batch(rows[i : i + 8], pad_id).items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            labels = b["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total, count = total + float(loss), count + int((labels != -100).sum())
    return total / count


# --- runners (each in its own process) -----------------------------------------------------------
def run_tuneforge(a, overrides: list[str]) -> dict:
    from tuneforge.config import deep_merge, parse_overrides
    from tuneforge.plugins import validate_config
    from tuneforge.train.run import train

    method = {"lora": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
              "qlora": {"name": "qlora", "r": 8, "alpha": 16, "dropout": 0.0},
              "full": {"name": "full"}}[a.method]
    with tempfile.TemporaryDirectory() as out:
        raw = {"model": {"name": a.model},
               "data": {"train": [f"{a.workdir}/train.jsonl"], "validation": [f"{a.workdir}/eval.jsonl"],
                        "format": "instruction", "test_size": 0.0, "max_length": a.max_length},
               "method": method,
               "train": {"lr": a.lr, "dtype": a.dtype, "batch_size": a.batch, "epochs": a.epochs, "device": a.device, "eval_every": 0, "save_every": 0,
                         "scheduler": "constant", "warmup_ratio": 0.0, "max_grad_norm": None},
               "eval": {"metric": "none"}, "output_dir": out, "run_name": "bench"}
        cfg = validate_config(deep_merge(raw, parse_overrides(overrides)))
        run_dir = train(cfg, force=True)
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run_dir / "summary.json").read_text())
    trained = [m for m in metrics if m["kind"] == "train"]
    # tokens_per_s is taken at the last step, before the final validation and checkpoint, as the
    # peers' figures are (their timers stop when train() returns, before evaluation).
    # Rows that share a prefix compute it once: MFU counts the positions the model ran.
    computed = sum(m.get("computed_tokens", 0) for m in trained)
    return {"seconds": summary["train_seconds"], "tokens_per_s": summary["tokens_per_s"],
            **({"computed_tokens_per_s": computed / summary["train_seconds"]} if computed else {}),
            "final_loss": trained[-1]["loss"],
            "eval_loss": [m["val_loss"] for m in metrics if m["kind"] == "eval"][-1], "steps": len(trained)}


def _hf_model(a, dtype):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from tuneforge.models.load import load_causal_lm

    if a.method == "qlora":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        model = prepare_model_for_kbit_training(load_causal_lm(a.model, torch.bfloat16, a.device, quantization_config=q))
        return get_peft_model(model, LoraConfig(**LORA))
    model = load_causal_lm(a.model, dtype, a.device)
    return model if a.method == "full" else get_peft_model(model, LoraConfig(**LORA))


def run_trainer(a, overrides: list[str]) -> dict:
    import datasets
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tuneforge.models.load import load_tokenizer

    seed = peer_seed(overrides)
    tok = load_tokenizer(a.model)
    train_rows = tokenized(a, "train", tok)
    torch.manual_seed(seed)  # the LoRA init: get_peft_model runs before the Trainer seeds
    model = _hf_model(a, torch.float32)  # the Trainer's documented bf16=True path: fp32 weights + autocast
    bf16 = train_dtype(a) == torch.bfloat16  # bf16 emulated without bf16 units: no user picks it there
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch,
                             num_train_epochs=a.epochs, learning_rate=a.lr, lr_scheduler_type="constant", bf16=bf16,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=a.device == "cpu",
                             dataloader_num_workers=0, seed=seed,
                             max_grad_norm=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(train_rows),
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    last = [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]
    return {"seconds": seconds, "final_loss": last, "eval_loss": eval_loss(a, model, tokenized(a, "eval", tok),
                                                                          tok.pad_token_id)}


run_trainer_tcmalloc = run_trainer  # same code; the parent preloads the allocator


def run_sft_trainer(a, overrides: list[str]) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tuneforge.data.formats import FORMATS
    from tuneforge.models.load import load_tokenizer, resolve

    seed = peer_seed(overrides)
    tok = load_tokenizer(a.model)
    raw = [json.loads(x) for x in (Path(a.workdir) / "train.jsonl").read_text().splitlines()]
    convs = [FORMATS["instruction"].convert(r, {})["messages"] for r in raw]
    data = [{"prompt": m[:-1], "completion": m[-1:]} for m in convs]
    args = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch, num_train_epochs=a.epochs,
                     learning_rate=a.lr, lr_scheduler_type="constant",
                     bf16=train_dtype(a) == torch.bfloat16, logging_steps=1,
                     save_strategy="no", report_to=[], use_cpu=a.device == "cpu", max_length=a.max_length,
                     max_grad_norm=0.0, seed=seed)
    torch.manual_seed(seed)  # the LoRA init happens in SFTTrainer's constructor, before it seeds
    trainer = SFTTrainer(model=resolve(a.model).path, args=args, train_dataset=datasets.Dataset.from_list(data),
                         processing_class=tok, peft_config=LoraConfig(**LORA))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    last = [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]
    return {"seconds": seconds, "final_loss": last,
            "eval_loss": eval_loss(a, trainer.model, tokenized(a, "eval", tok), tok.pad_token_id)}


# --- machine figures ---------------------------------------------------------------------------------
def matmul_gflops(hidden: int, inter: int, device: str, dtype, tokens: int = 1024, seconds: float = 3.0) -> float:
    """Matrix-product rate of this model's MLP shapes in ``dtype`` on this device, right now."""
    import torch

    if device == "cuda":
        tokens *= 8  # a GPU needs more rows than a CPU to reach its rate on these shapes
    x = torch.randn(tokens, hidden, dtype=dtype, device=device)
    w = torch.randn(hidden, inter, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(5):
        x @ w
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            x @ w
        n += 10
        sync()
    return 2 * tokens * hidden * inter * n / (time.perf_counter() - t0) / 1e9


def model_shape(model: str) -> tuple[int, int, int]:
    """(parameters counting tied weights once, hidden size, MLP size) from the config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneforge.models.load import resolve

    cfg = AutoConfig.from_pretrained(resolve(model).path)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in m.parameters()), cfg.hidden_size, cfg.intermediate_size


from tuneforge.allocator import ONEDNN_CACHE, machine_busy  # noqa: E402 - the launcher's settings
from tuneforge.hardware import peak_rss_mb  # noqa: E402 - VmHWM: the run's own peak, not its parent's


def find_tcmalloc() -> str | None:
    from tuneforge.allocator import find_allocator

    return find_allocator()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--method", choices=["lora", "qlora", "full"], default="lora")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--eval-rows", type=int, default=40)
    p.add_argument("--max-items", type=int, default=6,
                   help="exchanges per row, 1..N (longer rows for --max-length 1024: e.g. 20)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--epochs", type=int, default=1, help="passes over the rows (more on a GPU, where 30 steps are short)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 with bf16 units (or CUDA), else fp32. ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 "
                        "MKL_ENABLE_INSTRUCTIONS=AVX2 on a host with bf16 units emulates an AVX2-only CPU (auto "
                        "then picks fp32, as tuneforge does)")
    p.add_argument("--runners", default=DEFAULT_RUNNERS)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--only", help=argparse.SUPPRESS)  # child process: one runner, prints RESULT json
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    a = p.parse_args()
    from tuneforge.hardware import pick_device

    a.device = pick_device(a.device)
    if a.only:
        name, _, sets = a.only.partition(":")
        result = globals()[f"run_{name}"](a, [s for s in sets.split(",") if s])
        extra = {"peak_rss_mb": peak_rss_mb()}
        if a.device == "cuda":
            import torch

            extra["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        print("RESULT " + json.dumps(result | extra), flush=True)
        return

    workdir = tempfile.mkdtemp(prefix="tf-bench-")
    a.workdir = workdir
    work = write_workload(a, Path(workdir))
    params, hidden, inter = model_shape(a.model)
    flops_per_token = (6 if a.method == "full" else 4) * params
    import torch

    from tuneforge.allocator import allocator_name
    from tuneforge.hardware import compute_path, cpu_flags

    dtype = train_dtype(a)
    model_name = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                       if x.startswith("model name")), "?") if Path("/proc/cpuinfo").exists() else "?"
    wide = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))
    print(f"path {compute_path(a.device, dtype)} (MFU against this dtype's matmul rate); CPU {model_name}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, flags {' '.join(wide) or 'none'}; "
          f"allocator for tuneforge: {allocator_name(find_tcmalloc())}; "
          f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
          + "".join(f"{v}={os.environ[v]} (emulated); " for v in EMULATION if v in os.environ) +
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"workload: {work['rows']} rows, {work['real_tokens']} real tokens (mean {work['mean_tokens']:.0f}/row, "
          f"{100 * work['padding_share']:.0f}% of a padded batch is padding, {100 * work['response_share']:.0f}% of "
          f"real tokens are response), method {a.method}, batch {a.batch}, max_length {a.max_length}", flush=True)
    results = {}
    for runner in a.runners.split(","):
        env = dict(os.environ)
        name, _, sets = runner.partition(":")
        if name == "tuneforge" and "allocator=off" not in sets.split(",") and a.device == "cpu":
            lib = find_tcmalloc()  # what `tuneforge train` does by default (tuneforge/allocator.py)
            if lib:
                env |= {"LD_PRELOAD": lib, "TUNEFORGE_ALLOCATOR_SET": lib}
            env.setdefault(*ONEDNN_CACHE)
            if machine_busy():  # as the launcher does: OpenMP waits passively on a busy machine
                env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        child = ",".join(s for s in sets.split(",") if s and s != "allocator=off")
        if name == "trainer_tcmalloc" and a.device == "cuda":
            continue  # the allocator matters for CPU training only
        if name == "trainer_tcmalloc":
            lib = find_tcmalloc()
            if lib is None:
                print("trainer_tcmalloc skipped: no fast allocator (pip install cmeel-mimalloc==3.4.3)")
                continue
            env["LD_PRELOAD"] = lib
        if name == "sft_trainer" and a.method != "lora":
            continue
        gflops = matmul_gflops(hidden, inter, a.device, dtype)  # right before each runner: the host's speed drifts
        cmd = [sys.executable, __file__, "--only", f"{name}:{child}", "--model", a.model, "--method", a.method,
               "--steps", str(a.steps), "--batch", str(a.batch), "--max-length", str(a.max_length),
               "--lr", str(a.lr), "--epochs", str(a.epochs), "--dtype", a.dtype, "--device", a.device, "--workdir", workdir]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{runner} failed:\n{out.stderr[-3000:]}", flush=True)
            continue
        r = json.loads(line[7:])
        r.setdefault("tokens_per_s", a.epochs * work["real_tokens"] / r["seconds"])
        r["mfu"] = r.get("computed_tokens_per_s", r["tokens_per_s"]) * flops_per_token / (gflops * 1e9)
        r["matmul_gflops"], r["load_avg"] = gflops, os.getloadavg()[0]
        results[runner] = r
        print(f"{runner:34s} {r['tokens_per_s']:7.1f} real tok/s  MFU {100 * r['mfu']:4.1f}% (of {gflops:.0f} "
              f"{str(dtype)[6:]} GFLOP/s)  load {r['load_avg']:.1f}  peak RSS {r['peak_rss_mb'] / 1024:5.2f} GB"
              + (f"  peak GPU {r['peak_gpu_mb'] / 1024:5.2f} GB" if "peak_gpu_mb" in r else "")
              + f"  train loss {r['final_loss']:.4f}  "
              f"eval loss {r['eval_loss']:.4f}", flush=True)
    if "tuneforge" in results:
        base = results["tuneforge"]
        for runner, r in results.items():
            if runner != "tuneforge":
                print(f"tuneforge vs {runner}: {base['tokens_per_s'] / r['tokens_per_s']:.2f}x tokens/s, "
                      f"{base['peak_rss_mb'] / r['peak_rss_mb']:.2f}x peak RSS"
                      + (f", {base['peak_gpu_mb'] / r['peak_gpu_mb']:.2f}x peak GPU memory" if "peak_gpu_mb" in r else ""))
    if a.json:
        Path(a.json).write_text(json.dumps({"workload": work, "args": vars(a), "results": results}, indent=1))


if __name__ == "__main__":
    main()
