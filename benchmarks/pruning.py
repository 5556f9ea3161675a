"""Pruning the quick-start run (SmolLM2-135M + LoRA on builtin:orders): `tuneforge export
--format pruned` and its table — size on disk, parameters, greedy CPU tokens/s and the task
metric on the run's test rows for the dense (merged) model, the pruned one and the pruned one
after a LoRA recovery fine-tune. Baseline of the ratios: the dense row.

    bash scripts/quickstart.sh                      # or any finished quick-start run folder
    python benchmarks/pruning.py runs/RUN [--sparsity 0.25] [--structured mlp,heads] [--recover 40]

Prints the table as Markdown with the machine and its load average (figures from a shared
machine move with its load: rerun it quietly before quoting a speed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tuneforge.deploy.export import export
from tuneforge.deploy.prune import PruneOptions


def markdown(p: dict) -> str:
    dense = p["table"][0]
    lines = [f"sparsity {p['sparsity']} ({'+'.join(p['structures'])}), recovery: "
             f"{p['recovery']['steps'] if 'recovery' in p else 0} steps; metric on {p['metric_rows']} test rows; "
             f"{p['machine']['cpu']}, {p['machine']['torch_threads']} threads, load average "
             f"{' '.join(map(str, p['machine']['load_average'] or []))}",
             "",
             "| model | size on disk | parameters | CPU tokens/s | " + dense["metric"] + " |",
             "|---|---|---|---|---|"]
    for r in p["table"]:
        lines.append(f"| {r['model']} | {r['size_bytes'] / 2**20:.1f} MiB ({r['size_bytes'] / dense['size_bytes']:.2f}x) "
                     f"| {r['parameters'] / 1e6:.1f} M ({r['parameters'] / dense['parameters']:.2f}x) "
                     f"| {r['cpu_tokens_per_s']:.1f} ({r['cpu_tokens_per_s'] / dense['cpu_tokens_per_s']:.2f}x) "
                     f"| {r['score']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--sparsity", type=float, default=0.25)
    ap.add_argument("--structured", default="mlp,heads")
    ap.add_argument("--recover", type=int, default=40)
    ap.add_argument("--out", help="export folder (default RUN/export/pruned)")
    a = ap.parse_args()
    out = export(a.run_dir, "pruned", a.out, prune=PruneOptions(a.sparsity, tuple(a.structured.split(",")),
                                                                 a.recover or None))
    print(markdown(json.loads((Path(out) / "manifest.json").read_text())["pruning"]))


if __name__ == "__main__":
    main()
