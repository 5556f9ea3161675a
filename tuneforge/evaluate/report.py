"""Reports: one list of blocks rendered twice, as report.md (images beside it) and as a
self-contained report.html (images base64-embedded, so the file can be mailed alone)."""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass
from pathlib import Path

from tuneforge.io import atomic_write_text


@dataclass
class Block:
    kind: str  # heading | text | table | image | code
    content: object  # str; (header, rows) for tables; a Path for images
    level: int = 2


def heading(text: str, level: int = 2) -> Block:
    return Block("heading", text, level)


def text(s: str) -> Block:
    return Block("text", s)


def table(header: list[str], rows: list[list]) -> Block:
    return Block("table", (header, rows))


def image(path: Path | None) -> Block | None:
    return Block("image", Path(path)) if path and Path(path).exists() else None


def code(s: str) -> Block:
    return Block("code", s)


def _md_cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block], base: Path) -> str:
    out = []
    for b in blocks:
        if b.kind == "heading":
            out.append(f"{'#' * b.level} {b.content}")
        elif b.kind == "text":
            out.append(str(b.content))
        elif b.kind == "table":
            header, rows = b.content
            out.append("\n".join([f"| {' | '.join(map(_md_cell, header))} |", f"|{'---|' * len(header)}",
                                  *(f"| {' | '.join(map(_md_cell, r))} |" for r in rows)]))
        elif b.kind == "image":
            rel = os.path.relpath(Path(b.content).resolve(), base.resolve())
            out.append(f"![{Path(b.content).stem}]({rel})")
        elif b.kind == "code":
            out.append(f"```\n{b.content}\n```")
    return "\n\n".join(out) + "\n"


def to_html(blocks: list[Block], title: str) -> str:
    e = html.escape
    body = []
    for b in blocks:
        if b.kind == "heading":
            body.append(f"<h{b.level}>{e(b.content)}</h{b.level}>")
        elif b.kind == "text":
            body.append(f"<p>{e(b.content)}</p>")
        elif b.kind == "table":
            header, rows = b.content
            head = "".join(f"<th>{e(str(h))}</th>" for h in header)
            trs = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
        elif b.kind == "image":
            data = base64.b64encode(Path(b.content).read_bytes()).decode()
            body.append(f'<img alt="{e(Path(b.content).stem)}" src="data:image/png;base64,{data}">')
        elif b.kind == "code":
            body.append(f"<pre>{e(b.content)}</pre>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}"
             "pre{background:#f6f6f6;padding:1em;overflow:auto}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{style}</style>"
            f"</head><body><h1>{e(title)}</h1>{''.join(body)}</body></html>\n")


def write_report(blocks: list[Block | None], out_dir: Path, title: str) -> tuple[Path, Path]:
    blocks = [b for b in blocks if b is not None]
    md, page = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md, f"# {title}\n\n" + to_markdown(blocks, out_dir))
    atomic_write_text(page, to_html(blocks, title))
    return md, page


def confusion_png(confusion: dict, out: Path, title: str) -> Path:
    import matplotlib  # deferred: the plotting stack loads only when a plot is drawn

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt  # deferred: the plotting stack loads only when a plot is drawn

    labels, matrix = confusion["labels"], confusion["matrix"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(labels), 1 + 0.6 * len(matrix)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(matrix)), labels[: len(matrix)])
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(title)
    top = max((v for row in matrix for v in row), default=0)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
