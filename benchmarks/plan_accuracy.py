"""How close `tuneforge plan`'s peak-memory estimate is to the measured peak, on the
embedded SmolLM2-135M (or any model), for each method of the plan's table at two lengths.

Each (method, length) runs in its own process, which first imports what `tuneforge train`
imports (tuneforge.plan.BASELINE_IMPORTS) and loads the tokenizer, as a run does; then it
loads the base as the recipe does, applies the method, runs a few AdamW steps of the SFT loss
on full-length batches (every position trained, the case the plan assumes), and samples the
process RSS every 2 ms (CPU) or reads torch.cuda.max_memory_allocated (GPU). Two figures per
row on a CPU:
- process: the whole process's peak RSS (ru_maxrss: what a run's summary.json reports as
  peak_rss_mb) against the plan's peak (the measured process baseline + the step);
- step: the peak during the training steps minus the RSS before the model was loaded, against
  the plan's peak without the baseline (what tests/unit/test_plan.py also checks).
The load's own transient peak is printed apart. The bound the plan aims at is 0.75-1.25.

    python benchmarks/plan_accuracy.py [--model smollm2-135m-instruct] [--batch 2] [--seq 96,256]
                                       [--methods full,freeze,lora,lora-8bit,qlora] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

METHODS = {"full": {"name": "full"}, "freeze": {"name": "freeze", "top_k": 7}, "lora": {"name": "lora", "r": 16},
           "lora-8bit": {"name": "lora", "r": 16, "load_in_8bit": True}, "qlora": {"name": "qlora", "r": 16},
           "dora": {"name": "dora", "r": 16}, "ia3": {"name": "ia3"}, "prompt": {"name": "prompt"}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", default="96,256", help="sequence lengths, comma-separated")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--methods", default="full,freeze,lora,lora-8bit,qlora", help=f"any of {','.join(METHODS)}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--verbose", action="store_true", help="print the estimate's parts")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        import importlib

        from tuneforge.plan import BASELINE_IMPORTS, measure_peak

        for module in BASELINE_IMPORTS.split(", "):  # what a `tuneforge train` process holds
            importlib.import_module(module)
        print(json.dumps(measure_peak(a.model, METHODS[a.one], a.batch, int(a.seq), a.steps, a.device)))
        return
    print(f"plan accuracy: {a.model}, batch {a.batch}, {a.device}, {a.steps} steps; GB = 2**30 bytes")
    print(f"{'method':10} {'tokens':>6} {'process est':>11} {'measured':>9} {'est/meas':>8}"
          f" {'step est':>9} {'measured':>9} {'est/meas':>8} {'load peak':>9} {'step s':>7}")
    baseline = None
    for seq in a.seq.split(","):
        for name in a.methods.split(","):
            r = subprocess.run([sys.executable, __file__, "--one", name, "--model", a.model, "--batch", str(a.batch),
                                "--seq", seq, "--steps", str(a.steps), "--device", a.device],
                               capture_output=True, text=True)
            if r.returncode:
                print(f"{name:10} {seq:>6} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            baseline = baseline or (row.get("baseline_gb"), row.get("baseline_source"))
            process = (f"{row['process_estimate_gb']:11.3f} {row['process_peak_gb']:9.3f} {row['process_ratio']:8.2f}"
                       if a.device == "cpu" else f"{'-':>11} {'-':>9} {'-':>8}")
            print(f"{name:10} {seq:>6} {process} {row['estimate_gb']:9.3f} {row['measured_gb']:9.3f}"
                  f" {row['ratio']:8.2f} {row['load_peak_gb']:9.3f} {row['step_s']:7.2f}", flush=True)
            if a.verbose:
                print("   ", {k: round(v, 3) for k, v in row["estimate"].items()})
    if baseline and baseline[0]:
        print(f"process baseline {baseline[0]:.3f} GB: {baseline[1]}")


if __name__ == "__main__":
    main()
