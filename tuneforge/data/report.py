"""The prepared folder's human-readable side: report.md and the length histogram."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_lengths(lengths: dict[str, np.ndarray], unit: str, path: Path) -> None:
    import matplotlib  # deferred: the plotting stack loads only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: the plotting stack loads only when a plot is drawn

    fig, ax = plt.subplots(figsize=(7, 4))
    filled = [v for v in lengths.values() if len(v)]
    low = min((int(v.min()) for v in filled), default=0)
    top = max((int(v.max()) for v in filled), default=1)
    bins = np.linspace(low, max(top, low + 1), 41)
    for name, v in lengths.items():
        if len(v):
            ax.hist(v, bins=bins, alpha=0.6, label=f"{name} ({len(v)})")
    ax.set_xlabel(f"length ({unit})")
    ax.set_ylabel("rows")
    ax.set_title("row lengths per split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


def render_report(m: dict) -> str:
    out = [f"# Prepared data ({m['kind']})", "",
           f"Created {m['created']} by tuneforge {m['tuneforge_version']}. Lengths in {m['length_unit']}"
           + (f" ({m['tokenizer']} tokenizer)." if m["tokenizer"] else ".") + " Synthetic rows: "
           + ("yes" if m["synthetic"] else "no") + ".", "", "## Sources", ""]
    out += _table(["source", "format", "read", "kept", "synthetic", "sha256"],
                  [[s["source"], s.get("format", ""), s["read"], s["kept"], s["synthetic"], s.get("sha256", "-")[:12]]
                   for s in m["sources"]])
    for pool, f in m["format"].items():
        out += ["", f"Format of {pool}: **{f['format']}**: {f['reason']}"]
    if m["skipped_files"]:
        out += ["", "Skipped files:", "", *(f"- `{f}`: {why}" for f, why in m["skipped_files"].items())]
    out += ["", "## What each stage did", "", "Every stage: input = kept + dropped (asserted).", ""]
    out += _table(["pool", "stage", "input", "kept", "dropped", "changed", "seconds"],
                  [[s.get("info", {}).get("pool", ""), s["name"], s["input"], s["kept"],
                    "; ".join(f"{k}: {v}" for k, v in s["dropped"].items()) or "-",
                    "; ".join(f"{k}: {v}" for k, v in s["changed"].items()) or "-",
                    s.get("info", {}).get("seconds", "-")] for s in m["stages"]])
    for pool, a in m["accounting"].items():
        added = f" + {a['added']} added by splitting pairs" if a.get("added") else ""
        out += ["", f"**{pool}**: {a['read']} read{added} = {a['written']} written + "
                f"{sum(a['dropped'].values())} dropped."]
    for s in m["stages"]:
        if s["name"] == "load":
            out += [f"- {s['info'].get('pool', '')}: {note}" for note in s.get("info", {}).get("notes", [])]
    found = [s for s in m["stages"] if s["name"] == "pii" and s.get("info", {}).get("found")]
    for s in found:
        out += ["", "Personal data found (" + s["info"]["action"] + "): "
                + ", ".join(f"{k} {v}" for k, v in s["info"]["found"].items())]
    out += ["", "## Splits", ""]
    stats = ["rows", "mean", "p50", "p90", "p95", "p99", "max"]
    out += _table(["split", *stats, "synthetic"],
                  [[name, *(sp["lengths"].get(k, "-") for k in stats), sp["synthetic_rows"]]
                   for name, sp in m["splits"].items()])
    for name, sp in m["splits"].items():
        for key in ("labels", "turns"):
            if key in sp:
                out += ["", f"{name} {key}: " + ", ".join(f"{k}: {v}" for k, v in sp[key].items())]
    over = [s for s in m["stages"] if s["name"] == "token_length"]
    for s in over:
        n = sum(s["dropped"].values()) + sum(s["changed"].values())
        out += ["", f"Rows outside the token limits ({s['info']['pool']}): {n} "
                f"(max_length {s['info']['max_length']}, action {s['info']['action']})."]
    out += ["", "## Examples of dropped and changed rows", ""]
    for s in m["stages"]:
        for reason, shown in s["examples"].items():
            out += [f"- {s['name']} / {reason}: " + "; ".join(f"`{e[:200]}`" for e in shown)]
    out += ["", "![lengths](lengths.png)", ""]
    return "\n".join(out)
