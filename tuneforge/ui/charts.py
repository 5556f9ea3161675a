"""Line charts as inline SVG, drawn on the server: no JS chart library to vendor, readable
offline, and each line is labelled at its end (no legend to hunt for)."""

from __future__ import annotations

import itertools
import math
from html import escape

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def line_chart(series: dict[str, list[tuple[float, float]]], title: str = "", x_label: str = "step",
               width: int = 640, height: int = 260) -> str:
    """``series``: name -> [(x, y)]. Non-finite points are skipped; an empty chart says so."""
    clean = {k: [(x, y) for x, y in v if math.isfinite(x) and math.isfinite(y)] for k, v in series.items()}
    clean = {k: v for k, v in clean.items() if v}
    head = (f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
            f'<text x="8" y="16" class="chart-title">{escape(title)}</text>')
    if not clean:
        return head + f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data yet</text></svg>'
    left, right, top, bottom = 52, 160, 26, 34  # right margin: the line labels
    xs = [x for v in clean.values() for x, _ in v]
    ys = [y for v in clean.values() for _, y in v]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    pad = (max(ys) - min(ys)) * 0.05 or abs(max(ys)) * 0.05 or 1.0
    y0, y1 = min(ys) - pad, max(ys) + pad

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    parts = [head, (f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
                   f'class="chart-frame"/>')]
    for t in _ticks(y0, y1):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="grid"/>'
                     f'<text x="{left - 4}" y="{py(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for t in _ticks(x0, x1):
        parts.append(f'<text x="{px(t):.1f}" y="{height - bottom + 14}" text-anchor="middle">{_fmt(t)}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 4}" text-anchor="middle">'
                 f'{escape(x_label)}</text>')
    labels = []
    for i, (name, pts) in enumerate(clean.items()):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}">'
                     f'<title>{escape(name)}</title></polyline>')
        if len(pts) < 30:
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in pts]
        labels.append([py(pts[-1][1]) + 4, px(pts[-1][0]) + 6, colour, f"{name} {_fmt(pts[-1][1])}"])
    parts += _labels(labels)
    return "".join(parts) + "</svg>"


def _labels(labels: list[list]) -> list[str]:
    """Line-end labels ([y, x, colour, text]), moved apart vertically so none overlaps another."""
    labels.sort()
    for a, b in itertools.pairwise(labels):
        b[0] = max(b[0], a[0] + 13)
    return [f'<text x="{x:.1f}" y="{y:.1f}" fill="{colour}" class="line-label">{escape(text)}</text>'
            for y, x, colour, text in labels]
