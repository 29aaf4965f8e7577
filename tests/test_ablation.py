"""Frequency ablation on the tiny random Llama: the cheap path equals continuation_nll under the
press, unfiltered cells are exact no-ops, the run stores its layout and resumes."""
import json
import random

import numpy as np
import pytest

from analysis.api.params import AblateParams
from analysis.tasks.ablate import parse_layers
from analysis.tasks.ppl import continuation_nll
from analysis.tasks.spectral import ablation
from faedkv.filter_press import FrequencyFilterPress
from faedkv.plans import FrequencyPlan


@pytest.fixture(scope="module", params=["tiny-random-llama", "tiny-random-qwen2"])
def tiny_loaded(request):
    """The tiny random Llama, then the tiny random Qwen2 (q/k/v biases)."""
    from analysis.harness.models import load_model

    return load_model(request.param, dtype="float32")


def _params(**kw):
    base = dict(chunks=4, layers=[0, 2], prefix_tokens=160, continuation_tokens=16, num_texts=2,
                needle_samples=1, sink_tokens=4, window=16, seed=random.randrange(1000))
    base.update(kw)
    return AblateParams(**base)


def test_cheap_path_equals_continuation_nll_under_the_press(tiny_loaded):
    params = _params()
    seq = ablation.text_sequences(tiny_loaded.tokenizer, params)
    ablation.prefill_base(tiny_loaded.model, seq)
    layer, chunk = random.choice([0, 1, 2]), random.randrange(params.chunks)
    target = random.choice(["kv", "keys", "values"])
    plan = ablation.drop_plan(3, params.chunks, layer, chunk)
    press = FrequencyFilterPress(plan=plan, sink_tokens=4, window=16, target=target)
    cheap = ablation.filtered_nll(tiny_loaded.model, seq, press, layer)
    base = ablation.filtered_nll(tiny_loaded.model, seq)
    for row in range(params.num_texts):
        ref = continuation_nll(tiny_loaded, press, seq.prefix[row], seq.continuation[row])
        ref_base = continuation_nll(tiny_loaded, None, seq.prefix[row], seq.continuation[row])
        assert cheap[row] == pytest.approx(ref, abs=2e-4), (layer, chunk, target)
        assert base[row] == pytest.approx(ref_base, abs=2e-4)
    # the needle's answer NLL through the same path
    needle = ablation.needle_sequences(tiny_loaded, params)[0]
    ablation.prefill_base(tiny_loaded.model, needle)
    assert needle.scored >= 3 and needle.continuation.shape[1] > needle.scored
    got = ablation.filtered_nll(tiny_loaded.model, needle, press, layer)[0]
    from analysis.tasks.ppl import continuation_token_nll

    ref, _ = continuation_token_nll(tiny_loaded, press, needle.prefix, needle.continuation)
    assert got == pytest.approx(float(ref[-needle.scored:].mean()), abs=2e-4)


def test_kept_chunks_are_no_ops_and_removed_ones_are_not(tiny_loaded):
    params = _params()
    seq = ablation.text_sequences(tiny_loaded.tokenizer, params)
    ablation.prefill_base(tiny_loaded.model, seq)
    base = ablation.filtered_nll(tiny_loaded.model, seq)
    layer = random.randrange(3)
    full = FrequencyFilterPress(plan=FrequencyPlan.low_pass(1.0, 3, params.chunks), sink_tokens=4,
                                window=16)
    # a plan that keeps the chunk: only float rounding of the lossless IWDFT round trip
    np.testing.assert_allclose(ablation.filtered_nll(tiny_loaded.model, seq, full, layer), base,
                               atol=1e-5)
    # removing the lowest chunk (it holds the mean key/value) changes the prediction
    drop = FrequencyFilterPress(plan=ablation.drop_plan(3, params.chunks, layer, 0), sink_tokens=4,
                                window=16)
    assert np.all(np.abs(ablation.filtered_nll(tiny_loaded.model, seq, drop, layer) - base) > 1e-6)


def test_run_ablation_layout_exact_baseline_plans_and_resume(tiny_loaded, tmp_path, monkeypatch):
    from analysis.results.store import ResultsStore

    store = ResultsStore(tmp_path)
    params = _params()
    key = ablation.run_ablation(tiny_loaded, store, params, progress=lambda d, t: None)
    run = store.get(key)
    arrays = run.get_array("ablation")
    assert arrays["delta_mean"].shape == arrays["delta_sem"].shape == (2, params.chunks)
    assert arrays["needle_delta_mean"].shape == (2, params.chunks)
    assert arrays["layers"].tolist() == [0, 2]
    records = run.done()
    assert records["baseline"]["delta"] == [0.0, 0.0] and records["baseline"]["needle_delta"] == [0.0]
    assert np.isfinite(arrays["delta_mean"]).all() and (arrays["delta_sem"] >= 0).all()
    m = run.metrics()
    assert set(m["plans"]) == {"0.25", "0.5", "0.75"}
    for ratio, data in m["plans"].items():
        plan = FrequencyPlan.from_json(data)
        assert plan.num_layers == 3 and plan.chunks == params.chunks
        kept = plan.kept_chunks(0)
        assert len(kept) == int(np.ceil(float(ratio) * params.chunks - 1e-9))
        # the plan keeps layer 0's highest-delta chunks; layer 1 copies its nearest layer (0)
        assert set(kept) == set(np.argsort(-arrays["delta_mean"][0], kind="stable")[:len(kept)])
        assert plan.kept_chunks(1) == kept
    # resume: remove one cell; a rerun recomputes exactly that cell
    victim = ablation.cell_id(2, 1)
    (run.path / "cells" / f"{victim}.json").unlink()
    (run.path / "metrics.json").unlink()
    calls = []
    original = ablation.AblationCell.__call__
    monkeypatch.setattr(ablation.AblationCell, "__call__",
                        lambda self, cell: calls.append(cell["id"]) or original(self, cell))
    assert ablation.run_ablation(tiny_loaded, store, params, progress=lambda d, t: None) == key
    assert calls == [victim]
    np.testing.assert_allclose(store.get(key).get_array("ablation")["delta_mean"],
                               arrays["delta_mean"], atol=1e-6)
    json.dumps(store.get(key).metrics())


def test_bad_layers_and_short_prefix_are_rejected(tiny_loaded, tmp_path):
    from analysis.results.store import ResultsStore

    store = ResultsStore(tmp_path)
    with pytest.raises(ValueError, match="layers"):
        ablation.run_ablation(tiny_loaded, store, _params(layers=[0, 7]))
    with pytest.raises(ValueError, match="middle tokens"):
        ablation.run_ablation(tiny_loaded, store, _params(prefix_tokens=64, chunks=40))
    assert parse_layers("0:30:10") == [0, 10, 20] and parse_layers("all") is None


def test_plan_comparison_builds_three_plans_and_a_table(tiny_loaded, tmp_path):
    from analysis.api.params import SpectraParams
    from analysis.results.store import ResultsStore
    from analysis.tasks.spectral import spectra

    store = ResultsStore(tmp_path)
    spectra.run_spectra(tiny_loaded, store, SpectraParams(num_tokens=128, chunks=8, grid_points=17))
    ablation.run_ablation(tiny_loaded, store, _params(needle_samples=0), progress=lambda d, t: None)
    out = ablation.compare_plans(
        tiny_loaded, store, [0.75], [0.5],
        dict(lengths=[512], depths=[50.0], samples=1, max_new_tokens=4),
        dict(tasks=["variable_tracking"], context_length=512, samples=1, max_new_tokens=4))
    plans = {r["plan"]: r for r in out["rows"]}
    assert set(plans) == {"full cache", "none (all bins)", "ablation", "low-pass", "energy"}
    assert store.get(out["ablation_key"]).metrics()["plan_comparison"] == out["rows"]
    table = out["markdown"].splitlines()
    assert len(table) == 2 + 1 + 4 and "| - | full cache |" in table[2]
    # the plans carried by the methods are the ones derived from the stored runs
    abl = store.get(out["ablation_key"])
    built = ablation.comparison_plans(abl, store.get(out["spectra_key"]), 3, 0.5)
    assert built["low-pass"].kept_chunks(0) == (0, 1)
    energy = ablation.energy_scores(store.get(out["spectra_key"]).get_array("spectra"), 4)
    assert energy.shape == (3, 4)
    assert set(built["energy"].kept_chunks(2)) == set(np.argsort(-energy[2])[:2].tolist())
    needle = store.get(out["needle_key"]).metrics()
    assert {m["label"] for m in needle["by_method"]} >= {r["label"] for r in out["rows"]}
    with pytest.raises(ValueError, match="chunks"):
        ablation.energy_scores(store.get(out["spectra_key"]).get_array("spectra"), 3)


def test_layer_budget_from_an_ablation_run_drives_a_per_layer_faedkv(tiny_loaded, tmp_path, capsys):
    """layer-budget: sensitivities from the stored deltas, ratios averaging the asked ratio, written
    as JSON that a faedkv method spec reads; the press then keeps those rows per layer."""
    from analysis.__main__ import main
    from analysis.api.params import MethodSpec
    from analysis.harness.methods import build_press, expected_cache_lengths
    from analysis.results.store import ResultsStore
    from analysis.tasks.ppl import prefill
    from analysis.harness.haystack import text_tokens
    from faedkv.budget import layer_ratios
    import torch

    store = ResultsStore(tmp_path)
    key = ablation.run_ablation(tiny_loaded, store, _params(needle_samples=0), progress=lambda d, t: None)
    run = store.get(key)
    delta = np.clip(run.get_array("ablation")["delta_mean"], 0, None)
    sensitivity = ablation.layer_sensitivity(run, 3)
    assert sensitivity == pytest.approx([delta[0].sum(), delta[0].sum(), delta[1].sum()])  # layer 1: nearest is 0
    out = tmp_path / "ratios.json"
    assert main(["layer-budget", "--model", tiny_loaded.info.name, "--dtype", "float32", "--out", str(tmp_path), "--ratio", "0.5",
                 "--write", str(out), "--no-progress"]) == 0
    ratios = json.loads(out.read_text())
    assert ratios == pytest.approx(layer_ratios(sensitivity, 0.5), abs=1e-6)
    assert sum(ratios) / 3 == pytest.approx(0.5, abs=1e-6) and key in capsys.readouterr().out
    spec = MethodSpec(name="faedkv", compression_ratio=0.5, params={"layer_ratios": ratios, "window": 16})
    press = build_press(spec, tiny_loaded.model)
    ids = torch.tensor([text_tokens(tiny_loaded.tokenizer, 240, 1)])
    _, lengths = prefill(tiny_loaded, press, ids)      # checks the lengths against the budget too
    assert lengths == expected_cache_lengths(press, tiny_loaded.model, ids.shape[1])
    assert lengths == [press.press.press.layout(ids.shape[1], r).rows for r in ratios]
    with pytest.raises(ValueError, match="has 2 ratios but the model has 3"):
        build_press(MethodSpec(name="faedkv", compression_ratio=0.5, params={"layer_ratios": [0.5, 0.5]}),
                    tiny_loaded.model)
    with pytest.raises(ValueError, match="average 0.2000 but its compression_ratio is 0.5"):
        MethodSpec(name="faedkv", compression_ratio=0.5, params={"layer_ratios": [0.2, 0.2, 0.2]})
    with pytest.raises(ValueError, match="list of compression ratios"):
        MethodSpec(name="faedkv", compression_ratio=0.5, params={"layer_ratios": [0.5, 1.0, 0.5]})
