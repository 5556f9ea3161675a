"""Benchmark: `tuneforge data prepare` on synthetic short rows with near-duplicate removal.

Prints rows/s, peak memory, seconds per stage and how time grows with the row count; the
baseline is linear growth (time ratio == row ratio). CPU time is printed beside wall time
because on a shared machine wall time measures the neighbours too. Each size runs in a fresh process so peak RSS
is that size's own.

    python benchmarks/data_prepare.py --sizes 100000 300000 1000000
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VERBS = ["summarise", "explain", "translate", "classify", "rewrite", "shorten", "review", "check", "list", "compare"]
NOUNS = ["invoice", "contract", "email", "report", "recipe", "poem", "ticket", "review", "policy", "memo", "letter"]
WORDS = [f"word{i}" for i in range(20000)]
# Import the checkout this script sits in, not whichever tuneforge is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_rows(n: int, seed: int = 0):
    """Short prompt/completion rows: ~5% near duplicates (one word changed), ~2% exact
    duplicates, ~1% with an email address."""
    rng = random.Random(seed)
    made = []
    for i in range(n):
        r = rng.random()
        if made and r < 0.05:
            p, c = rng.choice(made[-1000:])
            w = p.split()
            w[rng.randrange(len(w))] = "changed"
            p = " ".join(w)
        elif made and r < 0.07:
            p, c = rng.choice(made[-1000:])
        else:
            body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 30)))
            p = f"Please {rng.choice(VERBS)} this {rng.choice(NOUNS)}: {body}"
            if r > 0.99:
                p += f" (from user{i}@example.com)"
            c = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))
        made.append((p, c))
        yield {"prompt": p, "completion": c}


def run_one(n: int) -> dict:
    from tuneforge.data.prepare import PrepareOptions, prepare

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "rows.jsonl"
        with open(src, "w") as f:
            for row in synthetic_rows(n):
                f.write(json.dumps(row) + "\n")
        t, cpu = time.perf_counter(), time.process_time()
        m = prepare(PrepareOptions(inputs=[str(src)]), Path(tmp) / "out")
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    stages = {s["name"]: s for s in m["stages"]}
    return {"rows": n, "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "rows_per_s": round(n / wall),
            "rows_per_cpu_s": round(n / cpu),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "near_dup_dropped": stages["near_dedup"]["dropped"].get("near duplicate", 0),
            "exact_dropped": stages["exact_dedup"]["dropped"].get("exact duplicate", 0),
            "written": m["accounting"]["inputs"]["written"],
            "stage_seconds": {s["name"]: s["info"]["seconds"] for s in m["stages"] if "seconds" in s.get("info", {})}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    results = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{n:>9,} rows: {r['seconds']:7.1f} s wall ({r['rows_per_s']:>6,} rows/s), {r['cpu_seconds']:.1f} s CPU "
              f"({r['rows_per_cpu_s']:,} rows/CPU-s)  peak RSS {r['peak_rss_mb']:,} MB  "
              f"(exact dups {r['exact_dropped']:,}, near dups {r['near_dup_dropped']:,}, written {r['written']:,})",
              flush=True)
        print("           seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in r["stage_seconds"].items()),
              flush=True)
    base = results[0]
    for r in results[1:]:
        print(f"{r['rows'] / base['rows']:.0f}x rows -> {r['seconds'] / base['seconds']:.2f}x wall time, "
              f"{r['cpu_seconds'] / base['cpu_seconds']:.2f}x CPU time "
              f"(linear baseline: {r['rows'] / base['rows']:.2f}x)")


if __name__ == "__main__":
    main()
