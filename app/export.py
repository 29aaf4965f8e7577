"""Figure and data export: PNG/SVG/PDF through plotly + kaleido 1.x (which drives Chromium),
CSV for data, JSON for configs and plans, and a zip of everything the session showed.

kaleido starts a headless Chromium; the first image of a process takes ~3 s, later ones
~0.2 s because we keep one kaleido server open for the life of the process.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
import warnings
import zipfile
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go

IMAGE_FORMATS = ("png", "svg", "pdf")
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
_server_lock = threading.Lock()
_server_started = False


class ExportError(RuntimeError):
    """An image could not be rendered; the message says what to install or change."""


@dataclass
class FigureEntry:
    """One figure the session showed: what it is, where it came from, its data and config."""
    name: str                       # short slug, e.g. "spectra-heatmap"
    title: str
    figure: go.Figure
    provenance: dict                # model, text, method, budget
    data: pd.DataFrame | None = None
    config: dict = field(default_factory=dict)

    def stem(self) -> str:
        return file_stem(self.name, self.provenance)

    def key(self) -> str:
        """Identity in the session's registry: the figure and the run it shows."""
        run = self.provenance.get("run")
        return f"{self.name}@{run}" if run else self.name


def entry(name: str, title: str, fig: go.Figure, provenance: dict,
          data: pd.DataFrame | None = None, config: dict | None = None) -> FigureEntry:
    """A FigureEntry whose figure carries its title and, as subtitle, the provenance line, so
    exported files say what they show."""
    line = " · ".join(str(provenance[k]) for k in ("model", "text", "method", "budget")
                      if provenance.get(k))
    fig.update_layout(title=dict(text=f"<b>{title}</b>", x=0.01, xanchor="left",
                                 subtitle=dict(text=line)))
    fig.update_layout(margin=dict(t=max(90, fig.layout.margin.t or 0)))
    return FigureEntry(name=name, title=title, figure=fig, provenance=provenance, data=data,
                       config=config or {})


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.@+-]+", "-", str(text)).strip("-").lower() or "x"


def file_stem(name: str, provenance: dict) -> str:
    """"<name>_<model>_<method>_r<ratio>_<run>": filenames say what they hold, and two runs
    (or two generations) never export to the same name."""
    parts = [slug(name), slug(provenance.get("model", "model"))]
    if provenance.get("method"):
        parts.append(slug(provenance["method"])[:80])
    if provenance.get("ratio") is not None:
        parts.append(f"r{float(provenance['ratio']):g}")
    if provenance.get("run"):
        parts.append(slug(str(provenance["run"]))[:12])
    return "_".join(parts)


def _ensure_browser() -> None:
    """kaleido finds Chromium through BROWSER_PATH; point it at Debian's package when unset."""
    if os.environ.get("BROWSER_PATH"):
        return
    for path in CHROMIUM_CANDIDATES:
        if os.path.exists(path):
            os.environ["BROWSER_PATH"] = path
            return
    if shutil.which("chromium") is None:
        raise ExportError("image export needs Chromium: install it (`sudo apt-get install "
                          "chromium`, or `make chromium` as root) or set BROWSER_PATH to a "
                          "Chrome/Chromium binary. CSV and JSON export work without it.")


def _start_server() -> None:
    global _server_started
    import kaleido

    with _server_lock:
        if not _server_started:
            kaleido.start_sync_server(silence_warnings=True)
            _server_started = True


def figure_bytes(fig: go.Figure, fmt: str, width: int = 1100, height: int | None = None,
                 scale: float = 2.0) -> bytes:
    """Render fig as png/svg/pdf bytes."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; use one of {IMAGE_FORMATS}")
    _ensure_browser()
    _start_server()
    height = height or int(fig.layout.height or 500)
    try:
        with warnings.catch_warnings():
            # plotly warns that per-call kaleido options are ignored once a server runs.
            warnings.simplefilter("ignore", UserWarning)
            return fig.to_image(format=fmt, width=width, height=height,
                                scale=scale if fmt == "png" else 1)
    except Exception as exc:  # noqa: BLE001 - kaleido raises several types; one message for all
        raise ExportError(f"could not render {fmt.upper()} ({exc.__class__.__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}). Check that Chromium "
                          "runs (`chromium --headless --version`); CSV and JSON still work.") from exc


def csv_bytes(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


def json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def zip_bytes(entries: list[FigureEntry], images: tuple[str, ...] = IMAGE_FORMATS) -> bytes:
    """A zip with, per figure, the images, the data as CSV, and figure + provenance + config as JSON."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for entry in entries:
            stem = entry.stem()
            for fmt in images:
                archive.writestr(f"{stem}.{fmt}", figure_bytes(entry.figure, fmt))
            if entry.data is not None:
                archive.writestr(f"{stem}.csv", csv_bytes(entry.data))
            archive.writestr(f"{stem}.json", json_bytes(
                {"title": entry.title, "provenance": entry.provenance, "config": entry.config}))
            archive.writestr(f"{stem}.plotly.json", entry.figure.to_json())
    return buffer.getvalue()
