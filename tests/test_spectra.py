"""Spectra: the maths on synthetic signals, the layer-by-layer capture, and the stored run."""
import random
import weakref

import numpy as np
import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from analysis.api.params import SpectraParams
from analysis.harness.capture import stream_kv
from analysis.tasks.spectral import spectra
from faedkv.plans import FrequencyPlan


def _rng():
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


@pytest.mark.parametrize("transform", ["iwdft", "dft"])
def test_pure_cosine_peaks_at_its_frequency(transform):
    gen, seed = _rng()
    t = int(torch.randint(300, 1500, (1,), generator=gen))
    f0 = float(torch.empty(1).uniform_(0.03, 0.47, generator=gen))
    points = 129
    direction = torch.randn(16, generator=gen, dtype=torch.float64)
    n = torch.arange(t, dtype=torch.float64)
    x = torch.cos(2 * torch.pi * f0 * n + 0.7)[:, None] * direction     # (tokens, head_dim)
    power = spectra.iwdft_power(x) if transform == "iwdft" else spectra.dft_power(x)
    freqs, energy = spectra.one_sided(power)
    density = spectra.grid_density(freqs, energy[None], t, points)[0]
    peak = spectra.grid(points)[density.argmax()]
    step = 0.5 / (points - 1)
    assert abs(peak - f0) <= step / 2 + 1.0 / t, (seed, t, f0, peak)
    # and nearly all of the energy lies within two grid cells of f0
    near = np.abs(spectra.grid(points) - f0) <= 2 * step
    assert density[near].sum() > 0.9 * density.sum(), seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_iwdft_and_dft_spectra_agree_and_obey_parseval(dtype):
    """Identity tested: with M = T bins, |iwdft(x, T)_k|^2 = |DFT(x)_k|^2 / T^2 for every bin k
    (summed over head_dim), and both sum to the mean energy per token (1/T) sum_n ||x_n||^2;
    the one-sided fold, the grid density (integrated) and the chunk energies keep that total."""
    gen, seed = _rng()
    heads, t, d = 3, int(torch.randint(65, 700, (1,), generator=gen)), 8
    x = (torch.randn(heads, t, d, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    iw, df = spectra.iwdft_power(x), spectra.dft_power(x)
    mean_energy = (x.double() ** 2).sum(-1).mean(-1)
    torch.testing.assert_close(iw.double(), df.double(), rtol=tol, atol=tol * mean_energy.max().item() / t)
    torch.testing.assert_close(iw.double().sum(-1), mean_energy, rtol=tol, atol=0)
    freqs, folded = spectra.one_sided(iw)
    np.testing.assert_allclose(folded.sum(-1), mean_energy.numpy(), rtol=tol)
    points = int(torch.randint(17, 300, (1,), generator=gen))
    density = spectra.grid_density(freqs, folded, t, points)
    g = spectra.grid(points)
    widths = np.diff(np.concatenate([[0.0], (g[:-1] + g[1:]) / 2, [0.5]]))
    np.testing.assert_allclose(density @ widths, mean_energy.numpy(), rtol=tol, err_msg=str(seed))
    chunks = spectra.chunk_energy(freqs, folded, 22)
    np.testing.assert_allclose(chunks.sum(-1), mean_energy.numpy(), rtol=tol, err_msg=str(seed))


def test_chunk_energy_uses_the_plans_chunks():
    """Energy of chunk c equals the energy of the bins FrequencyPlan keeps for chunk c alone,
    so an energy plan ranks exactly the bins it keeps."""
    gen, seed = _rng()
    t, chunks = int(torch.randint(100, 900, (1,), generator=gen)), int(torch.randint(2, 30, (1,), generator=gen))
    x = torch.randn(t, 4, generator=gen, dtype=torch.float64)
    power = spectra.iwdft_power(x)
    freqs, folded = spectra.one_sided(power)
    per_chunk = spectra.chunk_energy(freqs, folded, chunks)
    for c in range(chunks):
        mask = FrequencyPlan(layers=[[c]], chunks=chunks).mask(0, t)
        assert per_chunk[c] == pytest.approx(power[mask].sum().item(), rel=1e-10, abs=1e-14), (seed, c)


def test_capture_streams_one_layer_and_pre_rope_keys_rotate_to_the_cached_keys(tiny_lm):
    tiny_llama = tiny_lm      # and the tiny Qwen2, whose k_proj adds a bias before RoPE
    gen, seed = _rng()
    t = int(torch.randint(20, 80, (1,), generator=gen))
    ids = torch.randint(0, 128, (1, t), generator=gen)
    reference = DynamicCache()
    with torch.no_grad():
        tiny_llama(input_ids=ids, past_key_values=reference, use_cache=True)
    seen, alive_before, layers = [], [], []

    def consume(kv):
        alive_before.append(sum(r() is not None for r in seen))
        seen.extend(weakref.ref(x) for x in (kv.keys, kv.values, kv.pre_rope_keys))
        layers.append(kv.layer)
        cached = reference.layers[kv.layer]
        assert torch.equal(kv.keys, cached.keys) and torch.equal(kv.values, cached.values)
        cos, sin = tiny_llama.model.rotary_emb(kv.keys, torch.arange(t)[None])
        rotated, _ = apply_rotary_pos_emb(kv.pre_rope_keys, kv.pre_rope_keys, cos, sin)
        torch.testing.assert_close(rotated, kv.keys, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(kv.pre_rope_keys[..., 1:, :], kv.keys[..., 1:, :])

    stream_kv(tiny_llama, ids, consume)
    assert layers == [0, 1, 2], seed
    # When layer l arrives, nothing of layers < l is referenced any more: one layer at a time.
    assert alive_before == [0, 0, 0]
    assert all(r() is None for r in seen)


@pytest.fixture(scope="module", params=["tiny-random-llama", "tiny-random-qwen2"])
def tiny_loaded(request):
    """The tiny random Llama, then the tiny random Qwen2 (q/k/v biases)."""
    from analysis.harness.models import load_model

    return load_model(request.param, dtype="float32")


def test_run_spectra_stores_the_layout_and_is_cached(tiny_loaded, tmp_path):
    from analysis.results.store import ResultsStore

    store = ResultsStore(tmp_path)
    params = SpectraParams(num_tokens=96, grid_points=33, chunks=6)
    calls = []
    key = spectra.run_spectra(tiny_loaded, store, params, progress=lambda d, t: calls.append((d, t)))
    run = store.get(key)
    arrays = run.get_array("spectra")
    info = tiny_loaded.info
    assert arrays["freqs"].shape == (33,)
    assert arrays["energy"].shape == (info.num_layers, info.num_kv_heads, 2, 2, 2, 33)
    assert arrays["chunk_energy"].shape == (info.num_layers, info.num_kv_heads, 2, 2, 2, 6)
    # values have no rotation; keys do, so their two spaces differ
    np.testing.assert_array_equal(arrays["energy"][:, :, 1, 0], arrays["energy"][:, :, 1, 1])
    assert not np.allclose(arrays["energy"][:, :, 0, 0], arrays["energy"][:, :, 0, 1])
    np.testing.assert_allclose(arrays["energy"][..., 0, :], arrays["energy"][..., 1, :], rtol=1e-3, atol=1e-6)
    m = run.metrics()
    assert run.status == "complete" and m["text"]["num_tokens"] == 96
    assert len(m["centroid"]["keys_pre_rope"]) == info.num_layers
    assert all(0 <= c <= 0.5 for c in m["centroid"]["values_post_rope"])
    assert calls[-1] == (info.num_layers, info.num_layers)
    # Same request again: the stored run, nothing recomputed.
    assert spectra.run_spectra(tiny_loaded, store, params, progress=lambda d, t: calls.append("again")) == key
    assert "again" not in calls
