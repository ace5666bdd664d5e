"""The figures of report.html, drawn with matplotlib's Agg canvas and returned as PNG data URIs
(the page stays one self-contained file: no image files, no external requests).

Every figure labels both axes and says in its title what it shows and from how many samples.
Figures are built on `matplotlib.figure.Figure` directly, never through pyplot: no global backend
or figure state, so builds in threads and the user's own pyplot session are left alone.
"""
from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAX_BARS = 30  # a bar chart taller than this stops being readable; the title says what was left out
WIDTH_IN = 9.0
BEFORE, AFTER, BAR, BOX = "#b8c4d6", "#2f5d9e", "#c0504d", "#2f5d9e"


def data_uri(fig: Figure) -> str:
    """The figure as a `data:image/png;base64,...` URI."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _height(n: int, per: float = 0.32, base: float = 1.6) -> float:
    return base + per * max(n, 1)


def latency(series: Sequence[tuple[str, Sequence[float]]], title: str) -> str | None:
    """Box plot of every timed run per series (label, samples in ms), every run drawn as a dot."""
    series = [(label, np.asarray(s, dtype=float)) for label, s in series if s]
    if not series:
        return None
    fig = Figure(figsize=(WIDTH_IN, _height(len(series), 0.55, 1.8)))
    ax = fig.add_subplot()
    data = [s for _, s in series][::-1]  # first series on top
    labels = [f"{label} (n={len(s)})" for label, s in series][::-1]
    ax.boxplot(data, vert=False, widths=0.5, showfliers=False, medianprops={"color": BAR, "linewidth": 2})
    rng = np.random.default_rng(0)  # the jitter is fixed: the same build draws the same figure
    for i, s in enumerate(data, start=1):
        ax.scatter(s, i + rng.uniform(-0.18, 0.18, len(s)), s=6, alpha=0.45, color=BOX, linewidths=0)
    ax.set_yticks(range(1, len(data) + 1), labels)
    lo, hi = min(float(s.min()) for s in data), max(float(s.max()) for s in data)
    if lo > 0 and hi / lo > 20:  # a few slow outliers would squash every box into one pixel
        ax.set_xscale("log")
    ax.set_xlabel("latency of one timed run (ms)" + (", log scale" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel("measured")
    ax.set_title(f"{title}\nbox: quartiles and median, whiskers 1.5 IQR, dots: every timed run "
                 f"({sum(len(s) for s in data)} runs)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return data_uri(fig)


def sensitivity(rows: Sequence[dict], title: str) -> str | None:
    """SQNR each node loses under int8, worst first (rows: node or op, op, sqnr_db, lost_db)."""
    rows = sorted((r for r in rows if r.get("lost_db") is not None), key=lambda r: -float(r["lost_db"]))
    if not rows:
        return None
    shown = rows[:MAX_BARS]
    fig = Figure(figsize=(WIDTH_IN, _height(len(shown))))
    ax = fig.add_subplot()
    labels = [_node_label(r) for r in shown][::-1]
    values = [float(r["lost_db"]) for r in shown][::-1]
    ax.barh(range(len(shown)), values, color=BAR)
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.set_xlabel("SQNR lost in the node under int8 (dB; higher: more sensitive)")
    ax.set_ylabel("node (operator)")
    more = f", worst {len(shown)} of {len(rows)} shown" if len(rows) > len(shown) else ""
    ax.set_title(f"{title}\n{len(rows)} nodes ranked{more}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return data_uri(fig)


def _node_label(r: dict) -> str:
    name, op = str(r.get("node") or r.get("module") or r.get("name") or r.get("op") or "?"), r.get("op")
    name = name if len(name) <= 40 else "..." + name[-37:]
    return f"{name} ({op})" if op and op != name else name


def channels(layers: Sequence[dict], title: str) -> str | None:
    """Output channels (and MACs, when the record has them per layer) before and after pruning."""
    layers = list(layers)
    if not layers:
        return None
    shown = layers[:MAX_BARS]
    has_macs = all(layer.get("macs_before") is not None and layer.get("macs_after") is not None for layer in shown)
    fig = Figure(figsize=(WIDTH_IN * (1.4 if has_macs else 1), _height(len(shown), 0.4)))
    axes = fig.subplots(1, 2, sharey=True) if has_macs else [fig.add_subplot()]
    y = np.arange(len(shown))[::-1]
    labels = [f"{layer['name']} ({layer.get('type', '?')})" for layer in shown]
    panels = [("out_before", "out_after", "output channels")]
    if has_macs:
        panels.append(("macs_before", "macs_after", "multiply-accumulates per inference"))
    for ax, (before, after, xlabel) in zip(axes, panels):
        ax.barh(y + 0.2, [layer[before] for layer in shown], height=0.4, color=BEFORE, label="before pruning")
        ax.barh(y - 0.2, [layer[after] for layer in shown], height=0.4, color=AFTER, label="after pruning")
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].set_ylabel("layer (type)")
    axes[0].legend(loc="lower right", fontsize=8)
    more = f", first {len(shown)} of {len(layers)} shown" if len(layers) > len(shown) else ""
    fig.suptitle(f"{title}\n{len(layers)} conv/linear layers{more}", fontsize=10)
    return data_uri(fig)


def op_profile(rows: Sequence[dict], title: str) -> str | None:
    """Kernel time per model run for each operator type (rows as the agent's op_profile)."""
    rows = sorted(rows, key=lambda r: -float(r.get("ms_per_run") or 0))
    if not rows:
        return None
    shown = rows[:MAX_BARS]
    fig = Figure(figsize=(WIDTH_IN, _height(len(shown))))
    ax = fig.add_subplot()
    y = np.arange(len(shown))[::-1]
    values = [float(r.get("ms_per_run") or 0) for r in shown]
    ax.barh(y, values, color=BOX)
    for yi, v, r in zip(y, values, shown):
        ax.annotate(f" {100 * float(r.get('share') or 0):.1f}%", (v, yi), va="center", fontsize=8)
    ax.set_yticks(y, [str(r.get("op")) for r in shown], fontsize=8)
    ax.set_xlabel("kernel time per model run (ms); label: share of all kernel time")
    ax.set_ylabel("operator type")
    calls = sum(int(r.get("calls") or 0) for r in rows)
    ax.set_title(f"{title}\n{len(rows)} operator types, {calls} kernel calls profiled", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.12)
    return data_uri(fig)


def save_png(fig: Figure, path) -> None:
    """The figure as a PNG file (the search's trade-off plot beside its trial table)."""
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})


def tradeoff_figure(trials: Sequence[dict], pareto: Sequence[int], best: int | None, title: str) -> Figure | None:
    """A search's trials: quality against latency, marker area by size, the Pareto front ringed,
    the best build starred, trials that miss a budget hollow."""
    done = [t for t in trials if t.get("metric") is not None and t.get("latency_ms") is not None]
    if not done:
        return None
    fig = Figure(figsize=(WIDTH_IN, 5.6))
    ax = fig.add_subplot()
    sizes = np.array([float(t.get("size_mb") or 0) for t in done])
    area = 40 + 360 * (sizes / sizes.max() if sizes.max() > 0 else 0)
    x = np.array([float(t["latency_ms"]) for t in done])
    y = np.array([float(t["metric"]) for t in done])
    ok = np.array([bool(t.get("feasible")) for t in done])
    ax.scatter(x[ok], y[ok], s=area[ok], color=AFTER, alpha=0.55, label="meets every judged budget")
    if (~ok).any():
        ax.scatter(x[~ok], y[~ok], s=area[~ok], facecolors="none", edgecolors=BAR, linewidths=1.2,
                   label="misses a budget")
    front = sorted((t for t in done if t["number"] in set(pareto)), key=lambda t: float(t["latency_ms"]))
    if front:
        # Ringed, not joined: the front is over three objectives (size too), so in this plane its
        # points need not form a staircase.
        fx, fy = [float(t["latency_ms"]) for t in front], [float(t["metric"]) for t in front]
        ax.scatter(fx, fy, s=[area[done.index(t)] + 80 for t in front], facecolors="none", edgecolors="#222222",
                   linewidths=1.6, label=f"Pareto front over quality, latency, size ({len(front)})")
    for t in done:
        ax.annotate(str(t["number"]), (float(t["latency_ms"]), float(t["metric"])), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    star = next((t for t in done if t["number"] == best), None)
    if star is not None:
        ax.scatter([float(star["latency_ms"])], [float(star["metric"])], marker="*", s=320, color="#e8a33d",
                   edgecolors="#222222", zorder=5, label=f"best build (trial {best})")
    where = sorted({str(t.get("latency_where") or "?") for t in done})
    ax.set_xlabel(f"p50 latency (ms), measured on {', '.join(where)}")
    ax.set_ylabel(next((t.get("metric_name") for t in done if t.get("metric_name")), None) or "quality")
    ax.set_title(f"{title}\nmarker area: size of the judged artifact, {sizes.min():.3g} to {sizes.max():.3g} MB",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def tradeoff(trials: Sequence[dict], pareto: Sequence[int], best: int | None, title: str) -> str | None:
    """tradeoff_figure as a data URI (report.html)."""
    fig = tradeoff_figure(trials, pareto, best, title)
    return data_uri(fig) if fig is not None else None
