"""Tiny inline-SVG charts for the report (no plotting library, no external files)."""

from __future__ import annotations

from html import escape


def _fmt(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:.3g}"


def bars(labels: list[str], values: list[float], title: str, reference: list[float] | None = None,
         unit: str = "", width: int = 640, bar_height: int = 16) -> str:
    """Horizontal bars, one per label; `reference` (e.g. the paper's figure) drawn as a tick on each bar."""
    if not labels:
        return f'<p class="na">{escape(title)}: no data</p>'
    label_w, value_w = 190, 80
    plot_w = width - label_w - value_w
    top = max(list(values) + list(reference or [])) or 1
    height = 24 + len(labels) * (bar_height + 4)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{escape(title)}"><text x="0" y="14" class="t">{escape(title)}</text>']
    for i, (label, value) in enumerate(zip(labels, values)):
        y = 24 + i * (bar_height + 4)
        w = max(0.0, plot_w * value / top)
        out.append(f'<text x="{label_w - 6}" y="{y + bar_height - 4}" text-anchor="end">{escape(str(label))}</text>'
                   f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_height}" class="b"/>'
                   f'<text x="{label_w + w + 4:.1f}" y="{y + bar_height - 4}">{_fmt(value)}{unit}</text>')
        if reference is not None:
            rx = label_w + plot_w * reference[i] / top
            out.append(f'<line x1="{rx:.1f}" x2="{rx:.1f}" y1="{y - 2}" y2="{y + bar_height + 2}" class="r"/>')
    out.append("</svg>")
    return "".join(out)


def histogram(edges: list[float], counts: list[int], title: str, mark: float | None = None,
              mark_label: str = "", width: int = 640, height: int = 180) -> str:
    """Vertical bars over bins [edges[i], edges[i+1]); `mark` draws a dashed reference line (e.g. the paper's mean)."""
    if not counts or not any(counts):
        return f'<p class="na">{escape(title)}: no data</p>'
    left, bottom, top_pad = 40, 30, 22
    plot_w, plot_h = width - left - 10, height - bottom - top_pad
    lo, hi = edges[0], edges[-1]
    span = (hi - lo) or 1
    peak = max(counts)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{escape(title)}"><text x="0" y="14" class="t">{escape(title)}</text>']
    for i, n in enumerate(counts):
        x0 = left + plot_w * (edges[i] - lo) / span
        x1 = left + plot_w * (edges[i + 1] - lo) / span
        h = plot_h * n / peak
        out.append(f'<rect x="{x0:.1f}" y="{top_pad + plot_h - h:.1f}" width="{max(x1 - x0 - 1, 0.5):.1f}" '
                   f'height="{h:.1f}" class="b"><title>{_fmt(edges[i])}-{_fmt(edges[i + 1])}: {n:,}</title></rect>')
    base = top_pad + plot_h
    out.append(f'<text x="{left}" y="{base + 14}">{_fmt(lo)}</text>'
               f'<text x="{left + plot_w}" y="{base + 14}" text-anchor="end">{_fmt(hi)}</text>'
               f'<text x="{left - 4}" y="{top_pad + 8}" text-anchor="end">{peak:,}</text>')
    if mark is not None and lo <= mark <= hi:
        mx = left + plot_w * (mark - lo) / span
        out.append(f'<line x1="{mx:.1f}" x2="{mx:.1f}" y1="{top_pad}" y2="{base}" class="r"/>'
                   f'<text x="{mx + 3:.1f}" y="{top_pad + 10}" class="rt">{escape(mark_label)}</text>')
    out.append("</svg>")
    return "".join(out)


def line(xs: list[float], ys: list[float], title: str, x_label: str, y_label: str,
         width: int = 640, height: int = 200) -> str:
    if len(xs) < 2:
        return f'<p class="na">{escape(title)}: not enough data</p>'
    left, bottom, top_pad = 60, 34, 22
    plot_w, plot_h = width - left - 10, height - bottom - top_pad
    x_hi, y_hi = max(xs) or 1, max(ys) or 1
    pts = " ".join(f"{left + plot_w * x / x_hi:.1f},{top_pad + plot_h - plot_h * y / y_hi:.1f}" for x, y in zip(xs, ys))
    base = top_pad + plot_h
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{escape(title)}"><text x="0" y="14" class="t">{escape(title)}</text>'
            f'<polyline points="{pts}" class="l"/>'
            f'<line x1="{left}" x2="{left + plot_w}" y1="{base}" y2="{base}" class="a"/>'
            f'<text x="{left}" y="{base + 14}">0</text>'
            f'<text x="{left + plot_w}" y="{base + 14}" text-anchor="end">{_fmt(x_hi)}</text>'
            f'<text x="{left + plot_w / 2:.0f}" y="{base + 28}" text-anchor="middle">{escape(x_label)}</text>'
            f'<text x="{left - 4}" y="{top_pad + 8}" text-anchor="end">{_fmt(y_hi)}</text>'
            f'<text x="{left - 4}" y="{base}" text-anchor="end">{escape(y_label)}</text></svg>')
