"""How close `tuneforge plan`'s peak-memory estimate is to the measured peak, on the
embedded SmolLM2-135M (or any model), for full, LoRA and QLoRA.

Each method runs in its own process: load the base as the recipe does, apply the method,
run a few AdamW steps of the SFT loss on full-length batches (every position trained, the
case the plan assumes), and sample the process RSS every 2 ms (CPU) or read
torch.cuda.max_memory_allocated (GPU). Measured peak = max RSS during the training steps
minus the RSS before the model was loaded (the load's own transient peak, from file pages
and dtype casts, is printed apart). Prints estimate / measured per method (the test
bound is 0.75-1.25).

    python benchmarks/plan_accuracy.py [--model smollm2-135m-instruct] [--batch 2] [--seq 96]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

METHODS = {"full": {"name": "full"}, "lora": {"name": "lora", "r": 16}, "qlora": {"name": "qlora", "r": 16}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--methods", default="full,lora,qlora")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--verbose", action="store_true", help="print the estimate's parts")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        from tuneforge.plan import measure_peak

        print(json.dumps(measure_peak(a.model, METHODS[a.one], a.batch, a.seq, a.steps, a.device)))
        return
    print(f"plan accuracy: {a.model}, batch {a.batch} x {a.seq} tokens, {a.device}")
    print(f"{'method':8} {'estimate GB':>12} {'measured GB':>12} {'est/meas':>9} {'step s':>7} {'load peak GB':>13}")
    for name in a.methods.split(","):
        r = subprocess.run([sys.executable, __file__, "--one", name, "--model", a.model, "--batch", str(a.batch),
                            "--seq", str(a.seq), "--steps", str(a.steps), "--device", a.device],
                           capture_output=True, text=True)
        if r.returncode:
            print(f"{name:8} failed: {r.stderr.strip().splitlines()[-1]}")
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{name:8} {row['estimate_gb']:12.3f} {row['measured_gb']:12.3f} {row['ratio']:9.2f} {row['step_s']:7.2f}"
              f" {row['load_peak_gb']:13.3f}")
        if a.verbose:
            print("   ", {k: round(v, 3) for k, v in row["estimate"].items()})


if __name__ == "__main__":
    main()
