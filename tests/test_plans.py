"""FrequencyPlan: constructors, JSON, masks over bins, validation."""
import json
import math
import random

import pytest
import torch

from faedkv import FrequencyPlan
from faedkv.plans import bin_frequencies, chunk_of


def test_low_pass_keeps_lowest_chunks():
    ratio = random.choice([0.1, 0.25, 0.5, 1.0])
    plan = FrequencyPlan.low_pass(ratio, num_layers=3)
    kept = math.ceil(ratio * 22)
    assert plan.chunks == 22 and plan.num_layers == 3
    assert plan.kept_chunks(2, "value") == tuple(range(kept))
    assert plan.ratio == pytest.approx(kept / 22)
    mask = plan.mask(1, 100)
    freqs = bin_frequencies(100)
    assert torch.equal(mask, chunk_of(freqs, 22) < kept)


def test_full_plan_keeps_every_bin():
    plan = FrequencyPlan.low_pass(1.0, 2, chunks=22)
    for bins in (1, 2, 7, 64, 1000):
        assert plan.mask(0, bins).all()


def test_from_scores_keeps_highest_per_layer():
    scores = torch.rand(4, 10)
    plan = FrequencyPlan.from_scores(scores.tolist(), ratio=0.3)
    for layer in range(4):
        expected = sorted(scores[layer].topk(3).indices.tolist())
        assert list(plan.kept_chunks(layer)) == expected
    assert plan.chunks == 10
    # at least one chunk even for a tiny ratio
    assert len(FrequencyPlan.from_scores(scores, ratio=0.01).kept_chunks(0)) == 1


def test_masks_are_conjugate_symmetric_and_follow_chunks():
    chunks = random.randint(2, 30)
    plan = FrequencyPlan(layers=[sorted(random.sample(range(chunks), random.randint(1, chunks)))],
                         chunks=chunks)
    bins = random.randint(2, 300)
    mask = plan.mask(0, bins)
    mirror = (-torch.arange(bins)) % bins
    assert torch.equal(mask, mask[mirror])
    for k in range(bins):
        c = min(int(2 * chunks * min(k, bins - k) / bins), chunks - 1)
        assert bool(mask[k]) == (c in plan.kept_chunks(0))


def test_json_round_trip_with_per_head_and_kv():
    plan = FrequencyPlan(layers=[[0, 1], {"key": [0], "value": [[0, 2], [1]]}], chunks=4, name="mine")
    again = FrequencyPlan.from_json(plan.to_json())
    assert again == plan
    assert FrequencyPlan.from_json(json.loads(plan.to_json())) == plan
    assert again.is_per_head(1, "value") and not again.is_per_head(1, "key")
    assert again.kept_chunks(1, "value", head=1) == (1,)
    heads = again.keep_frequencies(1, torch.tensor([0.0, 0.2, 0.3, 0.49]), "value", num_heads=2)
    assert heads.tolist() == [[True, False, True, False], [False, True, False, False]]
    assert again.ratio == pytest.approx((2 / 4 + 2 / 4 + 1 / 4 + (2 / 4 + 1 / 4) / 2) / 4)


@pytest.mark.parametrize("build,message", [
    (lambda: FrequencyPlan(layers=[[0, 22]]), "out of range"),
    (lambda: FrequencyPlan(layers=[[0], []]), "keeps no chunk"),
    (lambda: FrequencyPlan(layers=[]), "at least one layer"),
    (lambda: FrequencyPlan(layers=[{"key": [0]}]), "value"),
    (lambda: FrequencyPlan(layers=[[0.5]]), "not an integer"),
    (lambda: FrequencyPlan.low_pass(0.0, 2), r"\(0, 1\]"),
    (lambda: FrequencyPlan.low_pass(1.5, 2), r"\(0, 1\]"),
    (lambda: FrequencyPlan.from_scores([[1, float("nan")]], 0.5), "NaN"),
    (lambda: FrequencyPlan.from_scores([1, 2, 3], 0.5), "layers, chunks"),
    (lambda: FrequencyPlan.from_json("{not json"), "malformed"),
    (lambda: FrequencyPlan.from_json('{"chunks": 3}'), "layers"),
    (lambda: FrequencyPlan.from_json('{"layers": [[0]], "extra": 1}'), "unknown plan fields"),
    (lambda: FrequencyPlan.low_pass(0.5, 2).mask(2, 10), "layer 2"),
    (lambda: FrequencyPlan.low_pass(0.5, 2).mask(0, 10, kind="query"), "kind"),
    (lambda: FrequencyPlan(layers=[[[0], [1]]]).mask(0, 10), "per head"),
])
def test_invalid_plans_raise_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_from_scores_ties_prefer_lower_frequency():
    plan = FrequencyPlan.from_scores([[1.0, 1.0, 1.0, 0.0, 1.0]], ratio=0.4)
    assert plan.kept_chunks(0) == (0, 1)


def test_a_plan_that_keeps_no_bin_of_a_small_compression_is_a_clear_error():
    """M = 8 bins have normalised frequencies 0, 1/8, 1/4, 3/8, 1/2: chunks 0, 5, 11, 16, 21 of
    22. A plan keeping only chunk 3 keeps none of them: every compression path refuses it
    instead of returning an all-zero middle, and names the layer, the chunks and the fix."""
    from faedkv import FAEDKVCache
    from faedkv.variants import compress_iwdft, plan_keep

    plan = FrequencyPlan(layers=[[0, 5], [3]])
    x = torch.randn(1, 2, 40, 16)
    assert compress_iwdft(x, 8, plan_keep(plan, 0, "key")).abs().max() > 0    # chunks 0 and 5 hold bins
    with pytest.raises(ValueError, match=r"layer 1 keys keeps chunks \[3\] of 22, but none of the 8 "
                                         r"frequency bins.*compress a longer context or at a lower ratio"):
        compress_iwdft(x, 8, plan_keep(plan, 1, "key"))
    # the same plan keeps bins of a larger compression (M = 64: a bin every 1/64)
    assert compress_iwdft(torch.randn(1, 2, 200, 16), 64, plan_keep(plan, 1, "key")).abs().max() > 0
    cache = FAEDKVCache(compression_ratio=0.75, sink_tokens=4, window=8, plan=plan)
    cache.update(torch.randn(1, 2, 80, 16), torch.randn(1, 2, 80, 16), 0)   # M = 8, layer 0: fine
    with pytest.raises(ValueError, match="layer 1 keys keeps chunks"):
        cache.update(torch.randn(1, 2, 80, 16), torch.randn(1, 2, 80, 16), 1)


def test_the_torch_free_plans_write_what_frequency_plan_writes():
    """analysis.api.plans (the app's plan editor) builds the same plans as faedkv.FrequencyPlan."""
    import numpy as np

    from analysis.api import plans

    rng = np.random.default_rng(int(torch.initial_seed()) % 2**32)
    for layers, chunks in ((3, 22), (28, 7), (1, 1)):
        for ratio in (0.05, 0.25, 0.5, 0.75, 1.0):
            assert plans.to_json_dict(plans.low_pass(ratio, layers, chunks), f"low-pass-{ratio:g}") == \
                FrequencyPlan.low_pass(ratio, layers, chunks).to_dict()
            scores = rng.integers(0, 4, size=(layers, chunks)).astype(float)   # ties on purpose
            assert plans.to_json_dict(plans.from_scores(scores, ratio), "s") == \
                FrequencyPlan.from_scores(scores, ratio, name="s").to_dict()
            assert plans.ratio(plans.from_scores(scores, ratio)) == pytest.approx(
                FrequencyPlan.from_scores(scores, ratio).ratio)
    mask = plans.from_scores(rng.random((4, 22)), 0.5)
    assert plans.from_json(FrequencyPlan.from_json(plans.to_json(mask, "x")).to_json())[0].tolist() == mask.tolist()
