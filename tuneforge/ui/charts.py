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


def bar_chart(bins: list[tuple[float, float, int]], title: str = "", x_label: str = "",
              marker: tuple[float, str] | None = None, width: int = 640, height: int = 240) -> str:
    """A histogram: ``bins`` = [(low, high, count)] side by side on a linear x axis, each bar's
    count written above it (no axis to read values off). ``marker`` = (x, label): a dashed
    vertical line, e.g. max_length, labelled beside it; the axis stretches to show it."""
    head = (f'<svg class="chart bars" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
            f'<text x="8" y="16" class="chart-title">{escape(title)}</text>')
    if not bins:
        return head + f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no rows</text></svg>'
    left, right, top, bottom = 16, 16, 50, 34  # top margin: the marker label, then the counts above the bars
    x0 = min(lo for lo, _, _ in bins)
    x1 = max(max(hi for _, hi, _ in bins), marker[0] if marker else x0)
    x0 = min(x0, marker[0]) if marker else x0
    x1 = x1 if x1 > x0 else x0 + 1
    peak = max(n for _, _, n in bins) or 1

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(n: float) -> float:
        return top + (1 - n / peak) * (height - top - bottom)

    base = height - bottom
    parts = [head, f'<line x1="{left}" x2="{width - right}" y1="{base}" y2="{base}" class="axis"/>']
    for lo, hi, n in bins:
        x, w = px(lo), max(px(hi) - px(lo) - 1, 1)
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{py(n):.1f}" width="{w:.1f}" height="{base - py(n):.1f}">'
                     f'<title>{_fmt(lo)}-{_fmt(hi)}: {n}</title></rect>')
        if n:
            parts.append(f'<text x="{x + w / 2:.1f}" y="{py(n) - 3:.1f}" text-anchor="middle" class="bar-value">'
                         f'{n}</text>')
    for t in _ticks(x0, x1, 6):
        parts.append(f'<text x="{px(t):.1f}" y="{base + 14}" text-anchor="middle">{_fmt(t)}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 4}" text-anchor="middle">{escape(x_label)}</text>')
    if marker:
        x = px(marker[0])
        anchor = "end" if x > width / 2 else "start"
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 28}" y2="{base}" class="marker"/>'
                     f'<text x="{x + (-4 if anchor == "end" else 4):.1f}" y="{top - 20}" text-anchor="{anchor}" '
                     f'class="marker-label">{escape(marker[1])}</text>')
    return "".join(parts) + "</svg>"
