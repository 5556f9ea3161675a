"""The monitor's outputs: a terminal summary (rich) and a self-contained HTML report whose
plots are base64 PNGs inside the file (one file to mail or attach to a ticket)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tuneforge.production.loop.monitor import MonitorResult

COLUMNS = [("requests", "requests", "{:.0f}"), ("error_rate", "errors", "{:.1%}"),
           ("latency_p50_s", "p50 s", "{:.3f}"), ("latency_p95_s", "p95 s", "{:.3f}"),
           ("latency_p99_s", "p99 s", "{:.3f}"), ("fallback_rate", "fallback", "{:.1%}"),
           ("completion_tokens", "out tokens", "{:.0f}")]
QUALITY = [("empty_rate", "empty", "{:.1%}"), ("truncated_rate", "truncated", "{:.1%}"),
           ("refusal_rate", "refusal", "{:.1%}"), ("repetition_rate", "repetitive", "{:.1%}"),
           ("json_invalid_rate", "JSON invalid", "{:.1%}"), ("mean_answer_chars", "answer chars", "{:.0f}"),
           ("feedback_mean", "feedback", "{:.2f}"), ("judge_mean", "judge", "{:.2f}")]


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _drift_cell(d: dict | None) -> str:
    if not d:
        return "off"
    if "skipped" in d:
        return "skipped"
    return f"p={d['p_value']:.4f} mmd2={d['mmd2']:.4f}"


def print_summary(res: MonitorResult, console: Console) -> None:
    console.print(f"[bold]window[/] {res.window}")
    if not res.groups:
        console.print("no logged requests in this window")
        return
    for title, cols in (("operational", COLUMNS), ("quality", QUALITY)):
        t = Table(title=title)
        t.add_column("route")
        t.add_column("version")
        for _, head, _ in cols:
            t.add_column(head, justify="right")
        if title == "quality":
            t.add_column("drift")
        for g in res.groups:
            cells = [_cell(g["figures"].get(k), fmt) for k, _, fmt in cols]
            t.add_row(*map(escape, g["group"]), *cells, *([_drift_cell(g.get("drift"))] if title == "quality" else []))
        console.print(t)
    for g in res.groups:
        d = g.get("drift") or {}
        if "skipped" in d:
            console.print(escape(f"drift {' '.join(g['group'])}: {d['skipped']}"))
        for x in d.get("drifted", []):
            console.print(escape(f"  drifted ({x['distance']:.3f}) {x['request_id']}: {x['prompt'][:100]!r}"))
    for a in res.alerts:
        console.print(f"[red]ALERT[/] {escape(a.message)}")
    if res.webhook_error:
        console.print(f"[red]the alert webhook failed:[/] {escape(res.webhook_error)}")
    if res.queued_for_review:
        console.print(f"{res.queued_for_review} drifted prompt(s) queued for human review (tuneforge review)")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(res: MonitorResult) -> list[tuple[str, str]]:
    # deferred: matplotlib loads only for an HTML report, and its backend must be set before pyplot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: the plotting stack loads only when a plot is drawn

    out = []
    if any(g["latencies"] for g in res.groups):
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for g in res.groups:
            if g["latencies"]:
                ax.hist(g["latencies"], bins=30, alpha=0.6, label=" ".join(g["group"]))
        ax.set_xlabel("latency (s)")
        ax.set_ylabel("requests")
        ax.legend(fontsize=8)
        out.append(("Latency", _png(fig)))
        plt.close(fig)
    rates = [k for k, _, _ in QUALITY if k.endswith("_rate")]
    if res.groups:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        width = 0.8 / len(res.groups)
        for i, g in enumerate(res.groups):
            vals = [g["figures"].get(k) or 0.0 for k in rates]
            ax.bar([j + i * width for j in range(len(rates))], vals, width, label=" ".join(g["group"]))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rates))], [k.removesuffix("_rate") for k in rates])
        ax.set_ylabel("share of answers")
        ax.legend(fontsize=8)
        out.append(("Quality signals", _png(fig)))
        plt.close(fig)
    for g in res.groups:
        d = g.get("drift") or {}
        if "null" in d:
            fig, ax = plt.subplots(figsize=(7, 3.2))
            ax.hist(d["null"], bins=40, color="grey", label="MMD² under shuffled labels (no drift)")
            ax.axvline(d["mmd2"], color="red", label=f"observed (p={d['p_value']:.4f})")
            ax.set_xlabel("MMD² (RBF kernel, median bandwidth)")
            ax.legend(fontsize=8)
            out.append((f"Drift of {' '.join(g['group'])} against its training prompts", _png(fig)))
            plt.close(fig)
    return out


def write_html(res: MonitorResult, path: str | Path) -> Path:
    e = html.escape
    parts = [f"<h1>tuneforge monitor</h1><p>window {e(res.window)}</p>"]
    if res.alerts:
        parts.append("<h2>Alerts</h2><table><tr><th>route</th><th>version</th><th>metric</th><th>value</th>"
                     "<th>threshold</th><th>baseline</th><th>evidence</th></tr>")
        for a in res.alerts:
            parts.append(f"<tr class=alert><td>{e(a.route)}</td><td>{e(a.version)}</td><td>{e(a.metric)}</td>"
                         f"<td>{a.value:.4g}</td><td>{a.threshold:g}</td><td>{e(a.baseline)}</td>"
                         f"<td><code>{e(str(a.evidence))}</code></td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>No alerts.</p>")
    for title, cols in (("Operational", COLUMNS), ("Quality", QUALITY)):
        head = "".join(f"<th>{e(h)}</th>" for _, h, _ in cols)
        parts.append(f"<h2>{title}</h2><table><tr><th>route</th><th>version</th>{head}"
                     + ("<th>drift</th>" if title == "Quality" else "") + "</tr>")
        for g in res.groups:
            cells = "".join(f"<td>{_cell(g['figures'].get(k), fmt)}</td>" for k, _, fmt in cols)
            drift = f"<td>{e(_drift_cell(g.get('drift')))}</td>" if title == "Quality" else ""
            parts.append(f"<tr><td>{e(g['group'][0])}</td><td>{e(g['group'][1])}</td>{cells}{drift}</tr>")
        parts.append("</table>")
    drifted = [(g, x) for g in res.groups for x in (g.get("drift") or {}).get("drifted", [])]
    if drifted:
        parts.append("<h2>Prompts that drifted most</h2><p>Farthest (1 - cosine) from their nearest training "
                     "prompt.</p><table><tr><th>version</th><th>distance</th><th>request</th><th>prompt</th>"
                     "<th>nearest training prompt</th></tr>")
        for g, x in drifted:
            parts.append(f"<tr><td>{e(g['group'][1])}</td><td>{x['distance']:.3f}</td><td>{e(x['request_id'])}</td>"
                         f"<td>{e(x['prompt'][:300])}</td><td>{e(x['nearest'][:300])}</td></tr>")
        parts.append("</table>")
    for title, png in _plots(res):
        parts.append(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,{png}'>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:3px 6px;font-size:13px}tr.alert td{background:#fee}")
    page = f"<!doctype html><html><head><meta charset=utf-8><title>tuneforge monitor</title><style>{style}</style>" \
           f"</head><body>{''.join(parts)}</body></html>"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
