"""Token-contribution profiles: the IWDFT is flat, iterative and eviction methods are biased to
recent tokens (both directions), and eviction profiles come from exact row matching."""
import random

import numpy as np
import pytest
import torch

from analysis.api.params import ContribParams, MethodSpec
from analysis.tasks.spectral import contrib


def _faedkv(variant, ratio, **params):
    return MethodSpec(name="faedkv", compression_ratio=ratio, params={"variant": variant, **params})


@pytest.mark.parametrize("trial", range(2))
def test_iwdft_profile_is_flat(trial):
    t = random.randrange(300, 1200)
    ratio = random.choice([0.5, 0.75, 0.875])
    prof = contrib.linear_profile(_faedkv("iwdft", ratio), t, num_layers=3, num_kv_heads=2)
    s = contrib.summarise(prof["contribution"], *prof["range"])
    assert prof["contribution"].shape == (t,)
    assert s["one_minus_gini"] == pytest.approx(1.0, abs=1e-6), (t, ratio)
    assert s["middle"]["one_minus_gini"] == pytest.approx(1.0, abs=1e-6)
    assert s["min_over_max"] == pytest.approx(1.0, abs=1e-6)
    assert s["oldest_over_newest"] == pytest.approx(1.0, abs=1e-6)


def test_dct_iterative_is_biased_to_recent_tokens():
    t = random.randrange(600, 1200)
    spec = MethodSpec(name="dct_iterative", compression_ratio=random.choice([0.5, 0.75]))
    prof = contrib.linear_profile(spec, t, num_layers=3, num_kv_heads=2)
    s = contrib.summarise(prof["contribution"], *prof["range"])
    assert s["one_minus_gini"] < 0.99 and s["middle"]["one_minus_gini"] < 0.99, t
    assert s["oldest_over_newest"] < 0.9 and s["middle"]["oldest_over_newest"] < 0.9, t


def test_a_plan_makes_the_profile_layer_averaged():
    from faedkv.plans import FrequencyPlan

    plan = FrequencyPlan.low_pass(0.5, 3, chunks=4)
    spec = _faedkv("iwdft", 0.75, plan=plan.to_dict())
    prof = contrib.linear_profile(spec, 500, num_layers=3, num_kv_heads=2)
    # band-limited class means treat tokens nearly alike (exactly when the classes are equal:
    # 500 tokens, sink 4, window 64 -> 432 middle tokens in 57 classes of 7 or 8)
    s = contrib.summarise(prof["contribution"], *prof["range"])
    assert s["one_minus_gini"] > 0.97
    equal = contrib.linear_profile(_faedkv("iwdft", 0.75), 500, num_layers=3, num_kv_heads=2)
    assert contrib.summarise(equal["contribution"], *equal["range"])["one_minus_gini"] == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(contrib.ContributionError, match="layers"):
        contrib.linear_profile(spec, 500, num_layers=4, num_kv_heads=2)


def test_kept_positions_matches_rows_exactly():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    original = torch.randn(1, 2, 50, 8, generator=gen).to(torch.bfloat16)
    original[0, 1, 7] = original[0, 1, 30]          # identical rows: each kept copy credited once
    others = [p for p in torch.randperm(50, generator=gen).tolist() if p not in (7, 30)]
    keep = [sorted(others[:20]), sorted(others[20:38] + [7, 30])]
    order = [torch.randperm(20, generator=gen) for _ in range(2)]  # kept rows in any order
    compressed = torch.stack([original[0, h, torch.tensor(keep[h])[order[h]]] for h in range(2)])[None]
    got = contrib.kept_positions(original, compressed)
    assert [g.tolist() for g in got] == keep
    with pytest.raises(contrib.ContributionError, match="not a copy"):
        contrib.kept_positions(original, compressed + 1)


@pytest.fixture(scope="module", params=["tiny-random-llama", "tiny-random-qwen2"])
def tiny_loaded(request):
    """The tiny random Llama, then the tiny random Qwen2 (q/k/v biases)."""
    from analysis.harness.models import load_model

    return load_model(request.param, dtype="float32")


def test_eviction_profiles_from_a_real_run(tiny_loaded, tmp_path):
    """streaming_llm and snapkv on the tiny model over real essay text: their kept sets recovered
    by matching rows have the press's cache length, and their profiles are biased to recent
    tokens; the iwdft profile in the same run is flat."""
    from analysis.results.store import ResultsStore

    methods = [MethodSpec(name="streaming_llm", compression_ratio=0.75),
               MethodSpec(name="snapkv", compression_ratio=0.75),
               _faedkv("iwdft", 0.75)]
    params = ContribParams(methods=methods, context_length=512, text_seed=random.randrange(40))
    store = ResultsStore(tmp_path)
    key = contrib.run_contrib(tiny_loaded, store, params, progress=lambda d, t: None)
    run = store.get(key)
    records = {r["method"]: r for r in run.records()}
    assert set(records) == {"streaming_llm@0.75", "snapkv@0.75", "faedkv-iwdft@0.75"}
    for label in ("streaming_llm@0.75", "snapkv@0.75"):
        r = records[label]
        assert r["source"] == "observed-eviction"
        assert r["cache_lengths"] == [128] * 3
        c = np.array(r["contribution"])
        assert c.shape == (512,) and r["positions"] == list(range(512))
        assert c.mean() == pytest.approx(128 / 512)
        assert r["one_minus_gini"] < 0.9 and r["oldest_over_newest"] < 1.0, label
    stream = np.array(records["streaming_llm@0.75"]["contribution"])
    assert stream[:4].tolist() == [1.0] * 4 and stream[-124:].tolist() == [1.0] * 124
    assert stream[4:-124].sum() == 0
    assert records["faedkv-iwdft@0.75"]["source"] == "attention-equivalent map"
    assert records["faedkv-iwdft@0.75"]["one_minus_gini"] == pytest.approx(1.0, abs=1e-6)
    assert run.metrics()["methods"]["snapkv@0.75"]["source"] == "observed-eviction"


@pytest.mark.parametrize("name", ["keydiff", "lagkv", "compactor"])
def test_the_newer_eviction_presses_keep_copies_of_rows_at_their_budget(tiny_loaded, tmp_path, name):
    """keydiff, lagkv and compactor keep exact rows: their kept sets are recovered by matching,
    one kvpress budget's worth per (layer, head)."""
    from analysis.results.store import ResultsStore

    params = ContribParams(methods=[MethodSpec(name=name, compression_ratio=0.5)], context_length=256,
                           text_seed=random.randrange(40))
    store = ResultsStore(tmp_path)
    run = store.get(contrib.run_contrib(tiny_loaded, store, params, progress=lambda d, t: None))
    record = run.records()[0]
    assert record["source"] == "observed-eviction" and record["cache_lengths"] == [128] * 3
    assert np.array(record["contribution"]).mean() == pytest.approx(128 / 256)
    assert record["min_over_max"] == 0.0      # some token was dropped everywhere
