"""Pictures of a study: latency vs throughput with the Pareto front, as PNG and as an HTML page with SVG
charts (no library: the page opens offline)."""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

from tuner.records.objectives import THROUGHPUT, Objectives
from tuner.records.pareto import Point, pareto_front

NO_PNG = "no PNG figures: matplotlib is not installed (pip install 'servetune[plots]')"


def pyplot():
    """matplotlib's pyplot on the headless Agg backend; None where matplotlib is not installed (it is the
    `plots` extra: about 100 MB with its fonts and Pillow)."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> Path:
    fig.tight_layout(rect=rect)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def pareto_png(points: list[Point], front: list[Point], objectives: Objectives, path: Path,
               title: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    metrics = list(objectives.latency)
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 5.5), squeeze=False)
    front_numbers = {p.number for p in front}
    for ax, metric in zip(axes[0], metrics):
        others = [p for p in points if p.number not in front_numbers]
        ax.scatter([p.value(metric) for p in others], [p.value(THROUGHPUT) for p in others],
                   c=["tab:gray" if p.feasible else "tab:red" for p in others], alpha=0.6, label="trials")
        ax.scatter([p.value(metric) for p in front], [p.value(THROUGHPUT) for p in front], color="tab:blue",
                   label="Pareto-optimal (all objectives)")
        ordered = sorted(pareto_front(points, Objectives((THROUGHPUT, metric))), key=lambda p: p.value(metric))
        ax.step([p.value(metric) for p in ordered], [p.value(THROUGHPUT) for p in ordered], where="post",
                color="tab:blue", alpha=0.6, label=f"front: throughput vs {metric}")
        for p in points:
            if p.baseline:
                ax.scatter([p.value(metric)], [p.value(THROUGHPUT)], marker="*", s=250, color="tab:orange",
                           label="defaults (baseline)", zorder=5)
        ax.set_xlabel(f"{metric} (ms)")
        ax.set_ylabel("output tokens/s")
        ax.grid(alpha=0.3)
    # below the axes, so it hides no point (the defaults' star least of all)
    legend = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title)
    return save_png(fig, path, rect=(0, 0.1, 1, 1))


def _ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten) covering [low, high]."""
    if high <= low:
        low, high = low - 1, high + 1
    low, high = low - (high - low) * 0.05, high + (high - low) * 0.05  # no mark on the frame
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def _svg_chart(points: list[Point], front: list[Point], metric: str) -> str:
    """One scatter of output tokens/s against `metric` as SVG; each mark's tooltip names the trial and knobs."""
    width, height, left, right, top, bottom = 860, 500, 90, 20, 20, 50
    xs = _ticks(min(p.value(metric) for p in points), max(p.value(metric) for p in points))
    ys = _ticks(min(p.value(THROUGHPUT) for p in points), max(p.value(THROUGHPUT) for p in points))

    def at(p: Point) -> tuple[float, float]:
        x = left + (p.value(metric) - xs[0]) / (xs[-1] - xs[0]) * (width - left - right)
        y = height - bottom - (p.value(THROUGHPUT) - ys[0]) / (ys[-1] - ys[0]) * (height - top - bottom)
        return round(x, 1), round(y, 1)

    def tip(p: Point) -> str:
        knobs = "\n".join(f"{k}={v}" for k, v in p.config.items())
        return escape(f"trial {p.number}{' (defaults)' if p.baseline else ''} ({p.engine})\n"
                      f"{p.value(THROUGHPUT):.1f} output tokens/s, {metric} {p.value(metric):.1f} ms\n{knobs}")

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="12">']
    for x in xs:
        px = left + (x - xs[0]) / (xs[-1] - xs[0]) * (width - left - right)
        parts.append(f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{height - bottom}" stroke="#ddd"/>'
                     f'<text x="{px:.1f}" y="{height - bottom + 16}" text-anchor="middle">{x:g}</text>')
    for y in ys:
        py = height - bottom - (y - ys[0]) / (ys[-1] - ys[0]) * (height - top - bottom)
        parts.append(f'<line x1="{left}" y1="{py:.1f}" x2="{width - right}" y2="{py:.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end">{y:g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 10}" text-anchor="middle">'
                 f'{escape(metric)} (ms)</text><text transform="translate(16 {(top + height - bottom) / 2}) '
                 f'rotate(-90)" text-anchor="middle">output tokens/s</text>')
    ordered = sorted(pareto_front(points, Objectives((THROUGHPUT, metric))), key=lambda p: p.value(metric))
    steps = []
    for a, b in zip(ordered, ordered[1:]):  # a step line, as in the PNG
        steps += [at(a), (at(b)[0], at(a)[1])]
    steps += [at(ordered[-1])] if ordered else []
    parts.append(f'<polyline class="front" fill="none" stroke="royalblue" stroke-opacity="0.6" '
                 f'points="{" ".join(f"{x},{y}" for x, y in steps)}"/>')
    front_numbers = {p.number for p in front}
    for p in sorted(points, key=lambda p: (p.baseline, p.number in front_numbers)):  # the star on top
        x, y = at(p)
        if p.baseline:
            star = " ".join(f"{x + r * math.sin(i * math.pi / 5):.1f},{y - r * math.cos(i * math.pi / 5):.1f}"
                            for i, r in zip(range(10), [11, 4.5] * 5))
            parts.append(f'<polygon class="defaults" points="{star}" fill="orange"><title>{tip(p)}</title></polygon>')
        else:
            color = "royalblue" if p.number in front_numbers else "gray" if p.feasible else "crimson"
            parts.append(f'<circle class="trial" cx="{x}" cy="{y}" r="6" fill="{color}" fill-opacity="0.75">'
                         f'<title>{tip(p)}</title></circle>')
    return "\n".join(parts + ["</svg>"])


def pareto_html(points: list[Point], front: list[Point], objectives: Objectives, path: Path, title: str) -> Path:
    """A page that needs nothing else (it opens offline): one SVG chart per latency objective, each mark
    with a tooltip, and a table of every trial that sorts by any column on a click."""
    metrics = list(objectives.latency)
    front_numbers = {p.number for p in front}
    header = ["trial", "engine", "output tokens/s", *metrics, "on the front", "meets the SLO", "knobs"]
    rows = [[str(p.number) + (" (defaults)" if p.baseline else ""), p.engine, f"{p.value(THROUGHPUT):.1f}",
             *(f"{p.get(m):.1f}" if p.get(m) is not None else "-" for m in metrics),
             "yes" if p.number in front_numbers else "", "yes" if p.feasible else "no",
             " ".join(f"{k}={v}" for k, v in p.config.items())] for p in points]
    legend = ('<p><span style="color:orange">&#9733;</span> defaults (baseline) &nbsp; '
              '<span style="color:royalblue">&#9679;</span> Pareto-optimal (all objectives) &nbsp; '
              '<span style="color:gray">&#9679;</span> other trials &nbsp; '
              '<span style="color:crimson">&#9679;</span> misses the SLO &nbsp; '
              '<span style="color:royalblue">&#9472;</span> front of throughput against that latency. '
              "Point at a mark for its trial and knobs.</p>")
    table = "\n".join(["<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr></thead>",
                        "<tbody>", *("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows),
                        "</tbody></table>"])
    charts = "\n".join(f"<h2>output tokens/s against {escape(m)}</h2>\n{_svg_chart(points, front, m)}"
                        for m in metrics if points and all(p.get(m) is not None for p in points))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>body{{font-family:sans-serif;margin:20px}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px}} th{{cursor:pointer;background:#f4f4f4}}</style></head>
<body><h1>{escape(title)}</h1>
{legend}
{charts}
<h2>Trials</h2>
{table}
<script>
for (const th of document.querySelectorAll("th")) th.onclick = () => {{
  const body = th.closest("table").tBodies[0], i = th.cellIndex, up = th.dataset.up !== "1";
  const key = (r) => {{ const t = r.cells[i].textContent, n = parseFloat(t); return isNaN(n) ? t : n; }};
  [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (up ? 1 : -1))
    .forEach((r) => body.appendChild(r));
  th.dataset.up = up ? "1" : "0";
}};
</script>
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
