"""Plotly figure builders: pure functions from plain data (lists, dicts, numpy, pandas) to go.Figure.

No Streamlit and no backend here, so every figure can be built in a test or a notebook from the
same arrays the backend stores. Titles are set by the caller (app.ui adds the provenance line
"model · text · method · budget" under every figure); builders set axes, hover and colour scales.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

# Above this many points per line, spectra are decimated (max-preserving) before plotting:
# the browser stays responsive with 30 layers x 9 heads x 4097 grid points.
MAX_POINTS_PER_LINE = 600
LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50),
              font=dict(family="Inter, Helvetica, Arial, sans-serif", size=13),
              hoverlabel=dict(font_size=12))


def chunk_edges(chunks: int) -> np.ndarray:
    """Boundaries of `chunks` equal chunks of normalised frequency on [0, 0.5], shape (chunks + 1,)."""
    return np.linspace(0.0, 0.5, chunks + 1)


def downsample(x: Sequence[float], ys: np.ndarray, max_points: int = MAX_POINTS_PER_LINE):
    """Decimate (x, ys) along the last axis to at most ~max_points, keeping each bucket's
    maximum (spectral peaks stay visible). ys: (..., G). Returns (x', ys')."""
    x = np.asarray(x, dtype=float)
    ys = np.asarray(ys, dtype=float)
    n = x.shape[0]
    if n <= max_points:
        return x, ys
    step = math.ceil(n / max_points)
    pad = (-n) % step
    xp = np.concatenate([x, np.full(pad, np.nan)]).reshape(-1, step)
    yp = np.concatenate([ys, np.full(ys.shape[:-1] + (pad,), np.nan)], axis=-1)
    yp = yp.reshape(ys.shape[:-1] + (-1, step))
    return np.nanmean(xp, axis=-1), np.nanmax(yp, axis=-1)


def log_energy(energy: np.ndarray) -> np.ndarray:
    """log10 of energy with zeros mapped to the smallest positive value (no -inf in a heatmap)."""
    energy = np.asarray(energy, dtype=float)
    positive = energy[energy > 0]
    floor = positive.min() if positive.size else 1.0
    return np.log10(np.maximum(energy, floor))


CHUNK_LINE_ON_WHITE = "rgba(60,60,60,0.35)"
CHUNK_LINE_ON_HEATMAP = "rgba(255,255,255,0.75)"     # visible on every Viridis colour


def _chunk_lines(fig: go.Figure, chunks: int, color: str = CHUNK_LINE_ON_WHITE) -> None:
    """Dotted vertical lines at the chunk boundaries (the grid a plan keeps or drops)."""
    for edge in chunk_edges(chunks)[1:-1]:
        fig.add_vline(x=float(edge), line=dict(color=color, width=1.2, dash="dot"), layer="above")


def spectra_heatmap(freqs: Sequence[float], energy: np.ndarray, layers: Sequence[int],
                    chunks: int, title: str = "") -> go.Figure:
    """Layer x frequency heatmap of log10 energy. energy: (len(layers), G); freqs: (G,)."""
    x, z = downsample(freqs, np.asarray(energy, dtype=float))
    fig = go.Figure(go.Heatmap(
        x=x, y=[f"L{l}" for l in layers], z=log_energy(z), colorscale="Viridis",
        colorbar=dict(title="log₁₀ energy"),
        hovertemplate="layer %{y}<br>freq %{x:.4f}<br>log₁₀ energy %{z:.3f}<extra></extra>"))
    _chunk_lines(fig, chunks, CHUNK_LINE_ON_HEATMAP)
    fig.update_layout(**LAYOUT, title=title, xaxis_title="normalised frequency (cycles / token)",
                      yaxis_title="layer", height=max(320, 18 * len(layers) + 140))
    fig.update_yaxes(autorange="reversed")
    return fig


def spectra_lines(freqs: Sequence[float], lines: Mapping[str, Sequence[float]], chunks: int,
                  title: str = "", log_y: bool = True) -> go.Figure:
    """One WebGL line per label (e.g. "L3 H1"), energy against normalised frequency."""
    labels = list(lines)
    ys = np.asarray([lines[k] for k in labels], dtype=float).reshape(len(labels), -1)
    x, ys = downsample(freqs, ys)
    fig = go.Figure()
    for label, y in zip(labels, ys):
        fig.add_trace(go.Scattergl(
            x=x, y=y, mode="lines", name=label, line=dict(width=1.5),
            hovertemplate=f"{label}<br>freq %{{x:.4f}}<br>energy %{{y:.4g}}<extra></extra>"))
    _chunk_lines(fig, chunks)
    fig.update_layout(**LAYOUT, title=title, xaxis_title="normalised frequency (cycles / token)",
                      yaxis_title="energy", height=420, showlegend=len(labels) <= 30)
    if log_y:
        fig.update_yaxes(type="log", dtick=1, exponentformat="power")
    return fig


def mask_heatmap(mask: np.ndarray, title: str = "", scores: np.ndarray | None = None,
                 score_name: str = "score") -> go.Figure:
    """Layers x chunks plan: kept chunks dark, dropped light; optional scores in the hover."""
    mask = np.asarray(mask, dtype=bool)
    layers, chunks = mask.shape
    edges = chunk_edges(chunks)
    custom = np.stack(np.broadcast_arrays(
        edges[:-1][None, :], edges[1:][None, :],
        scores if scores is not None else np.full(mask.shape, np.nan)), axis=-1)
    hover = "layer %{y}, chunk %{x}<br>freq %{customdata[0]:.3f}–%{customdata[1]:.3f}<br>%{text}"
    if scores is not None:
        hover += f"<br>{score_name} %{{customdata[2]:.4g}}"
    fig = go.Figure(go.Heatmap(
        z=mask.astype(int), x=list(range(chunks)), y=list(range(layers)), customdata=custom,
        text=np.where(mask, "kept", "dropped"), zmin=0, zmax=1, xgap=1, ygap=1,
        colorscale=[[0, "#eef1f6"], [1, "#2f5fb3"]], showscale=False,
        hovertemplate=hover + "<extra></extra>"))
    fig.update_layout(**LAYOUT, title=title, xaxis_title="frequency chunk (low → high)",
                      yaxis_title="layer", height=max(260, 16 * layers + 120))
    fig.update_yaxes(autorange="reversed", dtick=max(1, layers // 15))
    fig.update_xaxes(dtick=1 if chunks <= 32 else None)
    return fig


def layer_bars(values: Sequence[float], name: str, title: str = "",
               reference: Sequence[float] | None = None, reference_name: str = "full") -> go.Figure:
    """Per-layer bars (cache size, reconstruction error), optionally beside a reference series."""
    layers = list(range(len(values)))
    fig = go.Figure()
    if reference is not None:
        fig.add_trace(go.Bar(x=layers, y=list(reference), name=reference_name,
                             marker_color="#b8c2d3"))
    fig.add_trace(go.Bar(x=layers, y=list(values), name=name, marker_color="#2f5fb3"))
    fig.update_layout(**LAYOUT, title=title, xaxis_title="layer", yaxis_title=name, height=340,
                      barmode="group", legend=dict(orientation="h", x=1, xanchor="right", y=-0.25))
    fig.update_xaxes(dtick=1 if len(layers) <= 40 else None)
    return fig


def contribution_lines(curves: Mapping[str, Sequence[float]], title: str = "") -> go.Figure:
    """Contribution against token position, one line per method label, on one axis."""
    fig = go.Figure()
    for label, y in curves.items():
        y = np.asarray(y, dtype=float)
        x = np.arange(y.shape[0])
        x, y = downsample(x, y[None, :], max_points=1500)
        fig.add_trace(go.Scattergl(x=x, y=y[0], mode="lines", name=label,
                                   hovertemplate=f"{label}<br>position %{{x:.0f}}<br>"
                                                 "contribution %{y:.4g}<extra></extra>"))
    fig.update_layout(**LAYOUT, title=title, xaxis_title="token position (oldest → newest)",
                      yaxis_title="contribution (column norm)", height=420,
                      legend=dict(orientation="h", y=-0.2))
    return fig


def summary_bars(summary: pd.DataFrame, title: str = "") -> go.Figure:
    """Grouped bars: one group per summary column, one bar per method (summary indexed by method)."""
    fig = go.Figure()
    for label, row in summary.iterrows():
        fig.add_trace(go.Bar(x=list(summary.columns), y=row.to_list(), name=str(label),
                             hovertemplate=f"{label}<br>%{{x}} %{{y:.4f}}<extra></extra>"))
    fig.add_hline(y=1.0, line=dict(color="rgba(0,0,0,0.35)", dash="dash"))
    fig.update_layout(**LAYOUT, title=title, barmode="group", yaxis_title="value (1 = equal)",
                      height=360, legend=dict(orientation="h", y=-0.2))
    return fig


def needle_table(records: Sequence[Mapping], metric: str = "exact") -> pd.DataFrame:
    """Mean `metric` per (method label, depth, length) over samples, with the sample count.
    Records carry the method's label in "label" (e.g. "snapkv@0.75"; "method" is its name)."""
    frame = pd.DataFrame(list(records))
    if frame.empty:
        return pd.DataFrame(columns=["method", "depth", "length", metric, "n"])
    if "label" in frame:
        frame["method"] = frame["label"]
    frame["depth"] = frame["depth"].astype(float)
    frame["length"] = frame["length"].astype(int)
    grouped = frame.groupby(["method", "depth", "length"])[metric]
    return grouped.agg(["mean", "count"]).rename(columns={"mean": metric, "count": "n"}).reset_index()


def needle_grid(records: Sequence[Mapping], methods: Sequence[str], lengths: Sequence[int],
                depths: Sequence[float], metric: str = "exact", title: str = "") -> go.Figure:
    """Depth x length heatmaps, one per method, side by side; cells not yet done stay blank."""
    table = needle_table(records, metric)
    cols = min(3, max(1, len(methods)))
    rows = math.ceil(len(methods) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=list(methods), shared_yaxes=True,
                        horizontal_spacing=0.04,
                        vertical_spacing=min(0.3, 0.5 / rows) if rows > 1 else 0.0)
    lengths = sorted(int(l) for l in lengths)
    depths = sorted(float(d) for d in depths)
    for i, method in enumerate(methods):
        z = np.full((len(depths), len(lengths)), np.nan)
        n = np.zeros_like(z)
        sub = table[table["method"] == method]
        for _, r in sub.iterrows():
            if r["depth"] in depths and r["length"] in lengths:
                z[depths.index(r["depth"]), lengths.index(r["length"])] = r[metric]
                n[depths.index(r["depth"]), lengths.index(r["length"])] = r["n"]
        fig.add_trace(go.Heatmap(
            z=z, x=[str(l) for l in lengths], y=[f"{d:g}%" for d in depths], customdata=n,
            zmin=0, zmax=1, colorscale="RdYlGn", xgap=2, ygap=2, showscale=(i == 0),
            colorbar=dict(title=metric, len=0.8),
            text=np.where(np.isnan(z), "", np.vectorize(lambda v: f"{v:.2f}")(np.nan_to_num(z))),
            texttemplate="%{text}",
            hovertemplate=f"{method}<br>length %{{x}}<br>depth %{{y}}<br>{metric} %{{z:.2f}}"
                          " (n=%{customdata:.0f})<extra></extra>"),
            row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(type="category")
    fig.update_xaxes(title_text="context length (tokens)", row=rows)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_yaxes(title_text="needle depth", col=1)
    fig.update_layout(**LAYOUT, title=title, height=max(340, 300 * rows + 60))
    fig.update_layout(margin=dict(t=135))
    return fig


def layer_chunk_heatmap(z: np.ndarray, what: str, title: str = "",
                        sem: np.ndarray | None = None, layers: Sequence[int] | None = None,
                        diverging: bool = True) -> go.Figure:
    """Layer x chunk heatmap of one quantity (ablation loss increase, energy share); with `sem`
    the hover shows mean ± standard error. z: (layers, chunks)."""
    z = np.asarray(z, dtype=float)
    rows, chunks = z.shape
    layers = list(layers) if layers is not None else list(range(rows))
    edges = chunk_edges(chunks)
    err = np.zeros_like(z) if sem is None else np.asarray(sem, dtype=float)
    custom = np.stack(np.broadcast_arrays(err, edges[:-1][None, :], edges[1:][None, :]), axis=-1)
    hover = "layer %{y}, chunk %{x}<br>freq %{customdata[1]:.3f}–%{customdata[2]:.3f}<br>"
    hover += f"{what} %{{z:.4g}}" + (" ± %{customdata[0]:.2g} (s.e.)" if sem is not None else "")
    finite = z[np.isfinite(z)]
    if diverging:
        bound = float(np.abs(finite).max()) if finite.size else 1.0
        scale = dict(colorscale="RdBu_r", zmid=0, zmin=-bound, zmax=bound)
    else:
        scale = dict(colorscale="Viridis")
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(chunks)), y=[str(l) for l in layers], customdata=custom, xgap=1, ygap=1,
        colorbar=dict(title=what), hovertemplate=hover + "<extra></extra>", **scale))
    fig.update_layout(**LAYOUT, title=title, xaxis_title="frequency chunk (low → high)",
                      yaxis_title="layer", height=max(300, 16 * rows + 130))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(dtick=1 if chunks <= 32 else None)
    return fig


def ablation_heatmap(delta_mean: np.ndarray, delta_sem: np.ndarray | None, title: str = "",
                     what: str = "Δ loss", layers: Sequence[int] | None = None) -> go.Figure:
    """Loss increase when one chunk of one layer is removed; hover shows mean ± standard error.
    delta_mean, delta_sem: (len(layers), chunks)."""
    fig = layer_chunk_heatmap(delta_mean, what, title, sem=delta_sem, layers=layers,
                              diverging=True)
    fig.update_xaxes(title_text="removed frequency chunk (low → high)")
    return fig


HEAD_TEXT_CELLS = 256


def head_heatmap(z: Sequence[Sequence[float | None] | None], what: str, title: str = "",
                 zmin: float | None = None, zmax: float | None = None,
                 colorscale: str = "Viridis") -> go.Figure:
    """Layer x KV head heatmap of one per-head quantity (attention-output error, mass ratio).
    z: one list per layer, one value per KV head; a layer given as None (a method without slots
    on that layer) or a None value stays blank."""
    heads = max((len(row) for row in z if row is not None), default=1)
    grid = np.full((len(z), heads), np.nan)
    for l, row in enumerate(z):
        for h, v in enumerate(row or []):
            if v is not None:
                grid[l, h] = v
    # values written in the cells while they fit (a ratio of 1 is near-white on RdBu)
    text = dict(text=np.where(np.isnan(grid), "", np.vectorize(lambda v: f"{v:.2f}")(np.nan_to_num(grid))),
                texttemplate="%{text}") if grid.size <= HEAD_TEXT_CELLS else {}
    fig = go.Figure(go.Heatmap(
        z=grid, x=[f"H{h}" for h in range(heads)], y=[f"L{l}" for l in range(len(z))], **text,
        colorscale=colorscale, zmin=zmin, zmax=zmax, xgap=1, ygap=1, colorbar=dict(title=what),
        hovertemplate=f"layer %{{y}}, KV head %{{x}}<br>{what} %{{z:.4g}}<extra></extra>"))
    fig.update_layout(**LAYOUT, title=title, xaxis_title="KV head", yaxis_title="layer",
                      height=max(300, 16 * len(z) + 140))
    fig.update_yaxes(autorange="reversed", type="category", dtick=max(1, len(z) // 15))
    fig.update_xaxes(type="category")
    return fig
