"""Histograms drawn as small standalone SVG files at build time.

Written by hand (rects and text) rather than with a plotting library: one
chart costs microseconds, the site needs no extra dependency, and the
output is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT = 360, 200
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 28, 34
BAR = "#3f51b5"


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.2g}"
    return f"{v:.2f}".rstrip("0").rstrip(".")


def histogram_svg(values: Sequence[float | None], title: str, xlabel: str, bins: int = 20) -> str:
    """An SVG histogram of ``values`` (``None`` and non-finite values are dropped).

    ``title`` and ``xlabel`` are XML-escaped, so untrusted layer names are
    safe; an empty input gives a chart that says "no data".
    """
    data = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#fff"/>',
        f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" font-size="12" font-weight="bold">'
        f"{escape(title)}</text>",
    ]
    if not data:
        parts.append(f'<text x="{WIDTH / 2}" y="{TOP + h / 2}" text-anchor="middle" '
                     'fill="#777">no data</text></svg>')
        return "".join(parts)
    lo, hi = min(data), max(data)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts = [0] * bins
    for v in data:
        counts[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1
    top = max(counts)
    bw = w / bins
    for i, c in enumerate(counts):
        if c:
            bh = h * c / top
            parts.append(f'<rect x="{LEFT + i * bw + 0.5:.1f}" y="{TOP + h - bh:.1f}" '
                         f'width="{bw - 1:.1f}" height="{bh:.1f}" fill="{BAR}">'
                         f"<title>{c}</title></rect>")
    axis = TOP + h
    parts += [
        f'<line x1="{LEFT}" y1="{axis}" x2="{LEFT + w}" y2="{axis}" stroke="#333"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{axis}" stroke="#333"/>',
        f'<text x="{LEFT}" y="{axis + 13}" text-anchor="start">{_fmt(lo)}</text>',
        f'<text x="{LEFT + w}" y="{axis + 13}" text-anchor="end">{_fmt(hi)}</text>',
        f'<text x="{LEFT + w / 2}" y="{axis + 27}" text-anchor="middle">{escape(xlabel)} '
        f"(n={len(data)})</text>",
        f'<text x="{LEFT - 4}" y="{TOP + 4}" text-anchor="end">{top}</text>',
        f'<text x="{LEFT - 4}" y="{axis}" text-anchor="end">0</text>',
        "</svg>",
    ]
    return "".join(parts)
