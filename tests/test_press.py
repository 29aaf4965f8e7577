"""FAEDKVPress / FrequencyFilterPress inside a real (tiny random Llama) model and kvpress."""
import copy
import random
from types import SimpleNamespace

import pytest
import torch
from kvpress import PerLayerCompressionPress
from transformers import pipeline

from conftest import TINY_ARCHS, MinusKeyNorm, make_tiny, make_tiny_llama, next_logits, prefill
from faedkv import VARIANTS, FAEDKVPress, FrequencyFilterPress, FrequencyPlan
from faedkv.attention import BIAS_ATTR, FAEDKV_SDPA
from faedkv.budget import kept_rows, layout
from faedkv.iwdft import fold_counts
from faedkv.plans import bin_frequencies, chunk_of
from faedkv.variants import compress, iwdft_expand, plan_keep

VOCAB = 128


def lengths(cache):
    return [cache.get_seq_length(i) for i in range(len(cache))]


def test_defaults_and_zero_ratio_is_a_no_op():
    press = FAEDKVPress()
    assert press.compression_ratio == 0.0
    assert (press.sink_tokens, press.plan, press.key_space, press.slot_fit) == (4, None, "post_rope", "mean")
    keys, values = torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16)
    for press in (press, FAEDKVPress(variant="iwdft")):
        out = press.compress(SimpleNamespace(layer_idx=0), None, keys, values, None, {})
        assert out[0] is keys and out[1] is values


def test_the_default_is_the_searchs_winner_and_the_slot_variants_keep_theirs():
    """FAEDKVPress() is what the app's lab and the CLI's faedkv-default send (analysis.api.params.FAEDKV_DEFAULT);
    a hybrid knob left out takes its variant's default, so naming a slot variant gives that variant plain."""
    from analysis.api.params import FAEDKV_DEFAULT

    press = FAEDKVPress()
    assert {name: getattr(press, name) for name in FAEDKV_DEFAULT} == FAEDKV_DEFAULT
    for variant in VARIANTS:
        plain = FAEDKVPress(variant=variant)
        assert (plain.exact_share, plain.exact_scorer, plain.exact_pool, plain.window_share, plain.window) == (
            0.0, "expected_attention", "head", 0.0, 64), variant
    # the global pool needs KVzip's scores of every layer: another scorer competes per head
    assert FAEDKVPress(exact_scorer="keydiff").exact_pool == "head"
    assert FAEDKVPress(exact_share=0.0).exact_pool == "head"
    assert FAEDKVPress(variant="iwdft", exact_share=0.5, exact_scorer="kvzip").exact_pool == "head"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_cache_length_is_sink_slots_window_on_every_layer(dtype, variant, key_space):
    model = make_tiny_llama(dtype=dtype)
    tokens = random.randint(150, 260)
    ratio = random.choice([0.3, 0.5, 0.6])
    plan = FrequencyPlan(layers=[[0, 1, 2], {"key": [0], "value": [[0, 5], [1, 2, 3]]}, list(range(22))])
    press = FAEDKVPress(compression_ratio=ratio, variant=variant, sink_tokens=4, window=16,
                        plan=plan, key_space=key_space)
    cache = prefill(model, torch.randint(0, VOCAB, (2, tokens)), press)
    slots = int((1 - ratio) * tokens) - 4 - 16
    for layer in range(3):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values
        assert keys.shape == values.shape == (2, 2, 4 + slots + 16, 16), (tokens, ratio)
        assert keys.dtype == values.dtype == dtype and torch.isfinite(keys).all()
        stats = press.last_stats[layer]
        assert stats["cache_len"] == 4 + slots + 16 and stats["slots"] == slots
        assert stats["middle"] == tokens - 20 and 0 < stats["reconstruction_error"] < 1.5


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_ratio_zero_gives_the_same_next_logits_and_compression_changes_them(variant, key_space):
    model = make_tiny_llama()
    tokens = random.randint(120, 200)
    ids = torch.randint(0, VOCAB, (2, tokens))
    follow = torch.randint(0, VOCAB, (2, 6))
    reference = next_logits(model, prefill(model, ids), follow, tokens)
    for mass in (False, True):
        press = FAEDKVPress(compression_ratio=0.0, variant=variant, window=16, key_space=key_space,
                            mass_correction=mass)
        cache = prefill(model, ids, press)
        assert lengths(cache) == [tokens] * 3
        got = next_logits(model, cache, follow, tokens)
        assert torch.allclose(got, reference, atol=1e-4), (mass, (got - reference).abs().max())
    press = FAEDKVPress(compression_ratio=0.5, variant=variant, window=16, key_space=key_space)
    got = next_logits(model, prefill(model, ids, press), follow, tokens)
    assert (got - reference).abs().max() > 1e-3


def class_mean_cache(cache, sink: int, window: int, slots: int, keep=None):
    """The full cache with every middle token replaced by its class mean (band-limited by keep):
    the cache that attention over FAEDKV's slots with their log-count mass is equivalent to."""
    for index, layer in enumerate(cache.layers):
        for name in ("keys", "values"):
            rows = getattr(layer, name)
            middle = rows[:, :, sink:rows.shape[2] - window].double()
            means = compress("iwdft", middle, slots, keep(index, name) if keep else None)
            expanded = iwdft_expand(means, middle.shape[2]).to(rows.dtype)
            setattr(layer, name, torch.cat([rows[:, :, :sink], expanded, rows[:, :, rows.shape[2] - window:]], dim=2))
    return cache


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got - reference).norm() / reference.norm())


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
@pytest.mark.parametrize("planned", [False, True], ids=["every-bin", "plan"])
def test_slots_with_their_mass_attend_like_the_class_mean_cache(planned, arch):
    """FAEDKV's defining property: attention over [sink | class means + log c | window] equals
    attention over the full cache with each middle token replaced by its class mean."""
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    model = make_tiny(arch)
    tokens = int(torch.randint(150, 260, (1,), generator=gen))
    ratio = float(torch.empty(1).uniform_(0.3, 0.8, generator=gen))
    ids = torch.randint(0, VOCAB, (2, tokens), generator=gen)
    follow = torch.randint(0, VOCAB, (2, 5), generator=gen)
    plan = FrequencyPlan(layers=[[0, 1, 2, 3, 9], {"key": list(range(11)), "value": [0, 2, 4, 6, 8, 10]},
                                 list(range(0, 22, 3))]) if planned else None
    kept = layout(tokens, ratio, 4, 16)
    keep = (lambda layer, name: plan_keep(plan, layer, name[:-1], 2)) if planned else None
    reference = next_logits(model, class_mean_cache(prefill(model, ids), 4, 16, kept.slots, keep), follow, tokens)
    press = FAEDKVPress(variant="iwdft", compression_ratio=ratio, sink_tokens=4, window=16, plan=plan)
    cache = prefill(model, ids, press)
    assert lengths(cache) == [kept_rows(tokens, ratio)] * 3, seed
    assert model.config._attn_implementation == FAEDKV_SDPA
    got = next_logits(model, cache, follow, tokens)
    assert relative_error(got, reference) < 1e-5, (seed, relative_error(got, reference))
    # without the mass the slots are not that cache (unequal classes weigh their tokens less)
    plain = prefill(model, ids, FAEDKVPress(variant="iwdft", compression_ratio=ratio, sink_tokens=4, window=16, plan=plan,
                                            mass_correction=False))
    assert relative_error(next_logits(model, plain, follow, tokens), reference) > 1e-4, seed
    # a fresh prefill without the press clears the recorded bias
    prefill(model, ids)
    assert all(getattr(layer.self_attn, BIAS_ATTR) is None for layer in model.model.layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_small_ratio_stays_close_to_the_full_cache_and_the_old_sums_do_not(dtype):
    """Ratio 0.05: most classes hold one token, a few two. Class means with their mass barely
    move the logits; the old (M/t) x class sums give the two-token classes twice the key and
    value, which floods the softmax (what broke Qwen2.5: +6 nats)."""
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    # a common key component that queries align with (as in real models: a large logit baseline)
    model = make_tiny_llama(dtype=dtype)
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            # on the slowest rotary pair, so it survives RoPE as a common component
            key_bias = torch.zeros(attention.k_proj.out_features // attention.head_dim, attention.head_dim)
            key_bias[:, [attention.head_dim // 2 - 1, -1]] = 3 + torch.rand(key_bias.shape[0], 2, generator=gen)
            key_bias = key_bias.reshape(-1)
            group = attention.q_proj.out_features // attention.k_proj.out_features
            query_bias = key_bias.view(-1, 1, attention.head_dim).expand(-1, group, -1).reshape(-1)
            attention.k_proj.bias = torch.nn.Parameter(key_bias.to(dtype))
            attention.q_proj.bias = torch.nn.Parameter(query_bias.to(dtype))
    tokens = int(torch.randint(200, 300, (1,), generator=gen))
    ids = torch.randint(0, VOCAB, (2, tokens), generator=gen)
    follow = torch.randint(0, VOCAB, (2, 4), generator=gen)
    full = next_logits(model, prefill(model, ids), follow, tokens)

    def error(**kwargs):
        press = FAEDKVPress(variant="iwdft", compression_ratio=0.05, sink_tokens=4, window=16, **kwargs)
        return relative_error(next_logits(model, prefill(model, ids, press), follow, tokens), full)

    means, sums = error(), error(slot_normalization="sum", mass_correction=False)
    # measured over 6 draws: means 0.004-0.009 (fp32 and bf16), sums 0.45-0.60
    assert means < 0.03, (seed, means)
    assert sums > 10 * means, (seed, means, sums)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_length_and_ratio_gets_kvpress_budget(variant):
    """Any prefill length at any ratio compresses to kvpress's budget and never raises: a budget
    too small for sink + window + 1 slot shrinks the window, then the sink."""
    from kvpress.utils import compute_n_kept

    module = SimpleNamespace(layer_idx=0)
    lengths_ = sorted(set(range(1, 80)) | set(range(80, 601, 13)))
    for tokens in lengths_:
        x = torch.randn(1, 1, tokens, 4)
        for ratio in [round(0.1 * i, 1) for i in range(1, 10)]:
            press = FAEDKVPress(compression_ratio=ratio, variant=variant, sink_tokens=4, window=64,
                                record_errors=False)
            keys, values = press.compress(module, None, x, x, None, {})
            budget = compute_n_kept(tokens, ratio)
            assert keys.shape[2] == values.shape[2] == budget, (variant, tokens, ratio, keys.shape)
            stats = press.last_stats[0]
            assert stats["cache_len"] == budget, (tokens, ratio)
            if budget < tokens:
                assert stats["slots"] >= 1 and stats["sink_tokens"] + stats["window"] + stats["slots"] == budget
                assert stats["window"] <= 64 and stats["sink_tokens"] <= 4
                assert stats["window"] == 64 or stats["sink_tokens"] == 4 or stats["window"] == 0


def test_hybrid_keeps_scored_tokens_exact_and_summarises_the_rest():
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    model = make_tiny_llama()
    tokens = int(torch.randint(200, 300, (1,), generator=gen))
    ids = torch.randint(0, VOCAB, (2, tokens), generator=gen)
    full = prefill(model, ids)
    press = FAEDKVPress(variant="iwdft", compression_ratio=0.5, sink_tokens=4, window=16, exact_share=0.5, exact_scorer="knorm")
    cache = prefill(model, ids, press)
    kept = press.layout(tokens)
    assert kept.exact > 0 and kept.slots > 0 and kept.rows == kept_rows(tokens, 0.5)
    assert lengths(cache) == [kept.rows] * 3, seed
    for layer, original in zip(cache.layers, full.layers):
        exact = layer.keys[:, :, 4:4 + kept.exact]
        middle = original.keys[:, :, 4:tokens - 16]
        # every exact row is a copy of a middle row: the lowest-norm keys (knorm's choice)
        norms = middle.norm(dim=-1)
        chosen = (-norms).topk(kept.exact, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(exact, middle.gather(2, chosen.unsqueeze(-1).expand(-1, -1, -1, 16))), seed
        assert torch.equal(layer.keys[:, :, -16:], original.keys[:, :, -16:])
    assert press.last_stats[0]["exact"] == kept.exact
    with pytest.raises(ValueError, match="post_rope"):
        FAEDKVPress(compression_ratio=0.5, exact_share=0.3, key_space="pre_rope")


@pytest.mark.parametrize("kwargs,message", [
    ({"compression_ratio": 1.0}, r"\[0, 1\)"),
    ({"variant": "fft"}, "unknown variant"),
    ({"key_space": "both"}, "key_space"),
    ({"window": -1}, "window"),
    ({"plan": {"layers": [[0]]}}, "FrequencyPlan"),
    ({"slot_normalization": "max"}, "slot_normalization"),
    ({"slot_normalization": "sum", "variant": "resample"}, "iwdft reading"),
    ({"exact_share": 1.0}, "exact_share"),
    ({"exact_scorer": "oracle"}, "exact_scorer"),
])
def test_invalid_press_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FAEDKVPress(**kwargs)


def test_plan_for_another_model_and_eager_mass_correction_are_refused():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="plan .* has 2 layers but the model has 3"):
        prefill(model, torch.randint(0, VOCAB, (1, 100)),
                FAEDKVPress(variant="iwdft", compression_ratio=0.5, window=8, plan=FrequencyPlan.low_pass(0.5, 2)))
    eager = make_tiny_llama(attn_implementation="eager")
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        prefill(eager, torch.randint(0, VOCAB, (1, 100)),
                FAEDKVPress(variant="iwdft", compression_ratio=0.5, window=8, mass_correction=True))


def test_reconstruction_error_stats():
    keys, values = torch.randn(1, 2, 200, 16), torch.randn(1, 2, 200, 16)
    module = SimpleNamespace(layer_idx=0)
    lossless = FAEDKVPress(variant="iwdft", compression_ratio=0.4 / 200, window=16)   # one class of two tokens
    lossless.compress(module, None, keys, values, None, {})
    assert lossless.last_stats[0]["reconstruction_error"] < 0.1
    press = FAEDKVPress(variant="iwdft", compression_ratio=0.5, window=16)
    press.compress(module, None, keys, values, None, {})
    stats = press.last_stats[0]
    # random tokens: the member mean of ~2 tokens keeps about 1/2 of the energy
    assert 0.5 < stats["key_error"] < 0.9 and 0.5 < stats["value_error"] < 0.9
    assert min(stats["key_error"], stats["value_error"]) <= stats["reconstruction_error"] \
        <= max(stats["key_error"], stats["value_error"])


def test_per_layer_compression_press_composes():
    model = make_tiny_llama()
    tokens = random.randint(150, 220)
    ids, question = torch.randint(0, VOCAB, (1, tokens)), torch.randint(0, VOCAB, (1, 7))
    ratios = [0.25, 0.6, 0.0]
    press = PerLayerCompressionPress(FAEDKVPress(variant="iwdft", window=16).as_scorer(), compression_ratios=ratios)
    cache = prefill(model, ids, press)
    assert lengths(cache) == [kept_rows(tokens, r) for r in ratios]
    assert model.config._attn_implementation == FAEDKV_SDPA
    assert press.press.last_stats[1]["slots"] == int(0.4 * tokens) - 20
    assert press.press.compression_ratio == 0.0      # the per-layer ratio is passed, never swapped in
    # a multi-token pass (one causal mask built from layer 0, re-aligned per layer) equals
    # feeding the same tokens one at a time (no mask needed)
    together = next_logits(model, copy.deepcopy(cache), question, tokens)[:, -1]
    single = copy.deepcopy(cache)
    for i in range(question.shape[1]):
        alone = next_logits(model, single, question[:, i:i + 1], tokens + i)[:, -1]
    assert torch.allclose(together, alone, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_loaded():
    from analysis.harness.models import load_model

    return load_model("tiny-random-llama", dtype="float32")


@pytest.mark.parametrize("wrap", ["default", "plain", "per-layer"])
def test_kvpress_pipeline_answers_a_string(tiny_loaded, wrap):
    """The default (KVzip's passes, then the split) and the slot variants, through kvpress's pipeline."""
    press = FAEDKVPress(compression_ratio=0.5, window=16, variant=random.choice(VARIANTS))
    if wrap == "default":
        press = FAEDKVPress(compression_ratio=0.5)
    if wrap == "per-layer":
        press = PerLayerCompressionPress(press.as_scorer(), compression_ratios=[0.5, 0.3, 0.7])
    pipe = pipeline("kv-press-text-generation", model=tiny_loaded.model, tokenizer=tiny_loaded.tokenizer)
    context = " ".join(random.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(300))
    result = pipe(context, question="Which word comes first?", press=press, max_new_tokens=5)
    assert isinstance(result["answer"], str) and result["answer"]
    if wrap == "default":      # the split ran on KVzip's ranking: whole tokens and split dims in every layer
        assert all(stats["exact"] > 0 and stats["exact_dims"] for stats in press.last_stats.values())


# --- FrequencyFilterPress -------------------------------------------------------------------

def test_filter_with_full_plan_is_identity():
    plan = FrequencyPlan.low_pass(1.0, 3)
    press = FrequencyFilterPress(plan=plan, sink_tokens=4, window=16)
    keys, values = torch.randn(2, 2, random.randint(40, 300), 16), torch.randn(2, 2, 100, 16)
    values = torch.randn_like(keys)
    out_k, out_v = press.compress(SimpleNamespace(layer_idx=1), None, keys, values, None, {})
    assert out_k.shape == keys.shape
    assert torch.allclose(out_k, keys, atol=1e-5) and torch.allclose(out_v, values, atol=1e-5)


@pytest.mark.parametrize("target", ["kv", "keys", "values"])
def test_removing_a_chunk_changes_exactly_that_band(target):
    chunks, dropped = 22, random.randrange(22)
    plan = FrequencyPlan(layers=[[c for c in range(chunks) if c != dropped]])
    press = FrequencyFilterPress(plan=plan, sink_tokens=4, window=16, target=target)
    tokens = random.randint(200, 400)
    keys, values = torch.randn(1, 2, tokens, 8), torch.randn(1, 2, tokens, 8)
    out_k, out_v = press.compress(SimpleNamespace(layer_idx=0), None, keys, values, None, {})
    middle = tokens - 20
    band = chunk_of(bin_frequencies(middle), chunks) == dropped
    for before, after, filtered in ((keys, out_k, target != "values"), (values, out_v, target != "keys")):
        assert torch.equal(before[:, :, :4], after[:, :, :4]) and torch.equal(before[:, :, -16:], after[:, :, -16:])
        if not filtered:
            assert torch.equal(before, after)
            continue
        change = torch.fft.fft((before - after)[:, :, 4:-16].double(), dim=2).abs().amax(dim=(0, 1, 3))
        original = torch.fft.fft(before[:, :, 4:-16].double(), dim=2).abs().amax(dim=(0, 1, 3))
        assert change[~band].max() < 1e-4 * original.max()
        assert torch.allclose(change[band], original[band], rtol=1e-4)


def test_filter_press_in_a_model_keeps_lengths():
    model = make_tiny_llama()
    plan = FrequencyPlan(layers=[list(range(22)), list(range(1, 22)), list(range(22))])
    press = FrequencyFilterPress(plan=plan, window=16)
    tokens = random.randint(100, 200)
    cache = prefill(model, torch.randint(0, VOCAB, (2, tokens)), press)
    assert lengths(cache) == [tokens] * 3
    with pytest.raises(ValueError, match="plan=FrequencyPlan"):
        FrequencyFilterPress()
    with pytest.raises(ValueError, match="target"):
        FrequencyFilterPress(plan=plan, target="queries")


def test_fused_path_assembles_the_same_cache_as_the_torch_path(monkeypatch):
    """The press's fused branch (CUDA + Triton in real use) around a reference fold: sink,
    slots and window land where the torch path puts them, stats and budget included."""
    from faedkv import fused
    from faedkv.iwdft import fold_by_distance

    def reference_fold_into(out, x, num_slots, mean=True):
        counts = fold_counts(x.shape[-2], num_slots).unsqueeze(-1)
        out.copy_(fold_by_distance(x, num_slots) / counts if mean else
                  fold_by_distance(x, num_slots) * (num_slots / x.shape[-2]))

    model = make_tiny_llama(dtype=torch.bfloat16)
    module = model.model.layers[1].self_attn
    tokens = random.randint(300, 500)
    keys = torch.randn(2, 2, tokens, 16, dtype=torch.bfloat16)
    values = torch.randn(2, 2, tokens, 16, dtype=torch.bfloat16)
    slow = FAEDKVPress(variant="iwdft", compression_ratio=0.75, window=16, record_errors=False, fused=False)
    expected_k, expected_v = slow.compress(module, None, keys, values, None, {})
    monkeypatch.setattr(fused, "can_fuse", lambda x: True)
    monkeypatch.setattr(fused, "fold_into", reference_fold_into)
    fast = FAEDKVPress(variant="iwdft", compression_ratio=0.75, window=16, record_errors=False)
    assert fast.fusable(keys, values)
    got_k, got_v = fast.compress(module, None, keys, values, None, {})
    assert torch.equal(got_k, expected_k) and torch.equal(got_v, expected_v)
    assert fast.last_stats[1]["cache_len"] == slow.last_stats[1]["cache_len"] == got_k.shape[2]
    # Plans, pre-RoPE keys and recorded errors need the torch path.
    for kwargs in ({"record_errors": True}, {"key_space": "pre_rope"}, {"fused": False}):
        press = FAEDKVPress(variant="iwdft", compression_ratio=0.75, window=16, **{"record_errors": False, **kwargs})
        assert not press.fusable(keys, values)


def test_fused_kernel_is_not_used_on_cpu():
    from faedkv import fused

    assert not fused.can_fuse(torch.randn(1, 2, 64, 16))


def test_the_torch_free_option_lists_match_the_press():
    """analysis.api.params (what the app and the CLI validate against) names the press's options."""
    from analysis.api import params
    from faedkv import budget, press, variants

    assert params.EXACT_SCORERS == press.EXACT_SCORERS
    assert params.SLOT_FITS == press.SLOT_FITS
    assert params.EXACT_POOLS == budget.EXACT_POOLS
    assert params.SLOT_NORMALIZATIONS == variants.SLOT_NORMALIZATIONS
    assert params.KEY_SPACES == press.KEY_SPACES and params.VARIANTS == press.PRESS_VARIANTS
    assert press.PRESS_VARIANTS[:len(VARIANTS)] == VARIANTS and params.DIM_SHARE == press.DIM_SHARE
    assert params.SLOT_HYBRID == press.SLOT_HYBRID
    assert {k: params.FAEDKV_DEFAULT[k] for k in press.SHIPPED_HYBRID} == press.SHIPPED_HYBRID


def test_last_stats_have_one_shape_on_every_path():
    """The same keys whether errors were recorded, a hybrid ran, or a layer kept everything."""
    from faedkv.press import ERROR_KEYS, STAT_KEYS

    module = SimpleNamespace(layer_idx=0)
    x = torch.randn(1, 2, 300, 8)
    for kwargs, tokens in (({}, 300), ({"record_errors": False}, 300), ({"window": 16}, 300),
                           ({}, 1)):
        press = FAEDKVPress(variant="iwdft", compression_ratio=0.5, **kwargs)
        press.compress(module, None, x[:, :, :tokens], x[:, :, :tokens], None, {})
        stats = press.last_stats[0]
        assert tuple(stats) == STAT_KEYS, (kwargs, tokens)
        recorded = press.record_errors and stats["slots"] > 0
        assert all((stats[k] is not None) == recorded for k in ERROR_KEYS), (kwargs, tokens, stats)


def test_layer_ratios_keep_the_mean_cap_at_everything_and_follow_sensitivity():
    from faedkv.budget import layer_ratios

    rng = random.Random(torch.initial_seed())
    for _ in range(200):
        layers = rng.randint(1, 30)
        sensitivity = [rng.choice([0.0, rng.random(), 10 * rng.random()]) for _ in range(layers)]
        ratio, share = rng.choice([0.05, 0.25, 0.5, 0.75, 0.9]), rng.choice([0.0, 0.5, 0.9])
        got = layer_ratios(sensitivity, ratio, share)
        assert sum(got) / layers == pytest.approx(ratio, abs=1e-9), (sensitivity, ratio, share)
        assert all(-1e-12 <= r < 1 for r in got), got
        # a more sensitive layer never keeps fewer rows
        order = sorted(range(layers), key=lambda i: sensitivity[i])
        assert all(got[a] >= got[b] - 1e-12 for a, b in zip(order, order[1:])), (sensitivity, got)
    assert layer_ratios([3.0, 3.0], 0.5) == [0.5, 0.5] and layer_ratios([0, 0], 0.4) == [0.4, 0.4]
    with pytest.raises(ValueError, match="share"):
        layer_ratios([1.0], 0.5, share=1.0)


@pytest.mark.parametrize("variant, share, shrink", [("iwdft", 0.5, 0.2), ("resample", 0.5, 0.2), ("iwdft", 0.9, 0.01)])
def test_layer_pool_slots_give_each_head_its_own_exact_count(variant, share, shrink):
    """exact_pool='layer' with slots: the layer's top E x heads tokens (a head keeps at most R - 1),
    each head's other tokens in R - E_h slots with their log counts as a per-head column bias."""
    seed = random.randrange(10**6)
    torch.manual_seed(seed)
    tokens, heads, d = 300, 4, 16
    keys, values = torch.randn(1, heads, tokens, d), torch.randn(1, heads, tokens, d)
    keys[:, 0] *= shrink                      # head 0's keys are small: minus-norm ranks them first
    press = FAEDKVPress(compression_ratio=0.5, variant=variant, window=16, exact_share=share,
                        exact_scorer="knorm", exact_pool="layer")
    press.scorer = MinusKeyNorm()
    module = SimpleNamespace(layer_idx=0)
    out_k, out_v = press.compress(module, None, keys, values, None, {})
    kept = press.layout(tokens)
    rows, start, end = kept.exact + kept.slots, kept.sink, tokens - kept.window
    assert out_k.shape == (1, heads, kept.rows, d) and kept.exact > 0, seed
    scores = -keys[0, :, start:end].norm(dim=-1)
    capped = scores.clone()
    capped[scores.argsort(-1, descending=True).argsort(-1) >= rows - 1] = float("-inf")
    top = capped.flatten().topk(kept.exact * heads).indices
    chosen = torch.zeros(heads * (end - start), dtype=torch.bool)
    chosen[top] = True
    chosen = chosen.view(heads, -1)
    counts = chosen.sum(-1)
    assert counts.sum() == kept.exact * heads and counts.max() <= rows - 1, seed
    assert counts[0] > kept.exact > counts[1:].min(), (seed, counts)
    if shrink < 0.1:
        assert counts[0] == rows - 1, (seed, counts)   # capped: one slot left for its other tokens
    start_bias, bias = getattr(module, BIAS_ATTR)
    assert start_bias == start and bias.shape == (1, heads, rows), seed
    for h in range(heads):
        count = int(counts[h])
        for out, x in ((out_k, keys), (out_v, values)):
            middle = x[0, h, start:end]
            assert torch.equal(out[0, h, start:start + count], middle[chosen[h]]), (seed, h)
            want = compress(variant, middle[~chosen[h]], rows - count)
            torch.testing.assert_close(out[0, h, start + count:start + rows], want, msg=f"seed {seed}")
        assert torch.equal(bias[0, h, :count], torch.zeros(count)), seed
        # the slots stand for every other middle token once: their counts sum to N - E_h
        assert torch.exp(bias[0, h, count:].double()).sum().item() == pytest.approx(end - start - count), seed
    assert torch.equal(out_k[:, :, :start], keys[:, :, :start]) and torch.equal(out_v[:, :, -16:], values[:, :, end:])
    assert press.last_stats[0]["exact"] == kept.exact   # the mean over heads


def test_layer_pool_slots_run_in_a_model_through_the_registry():
    from analysis.api.params import MethodSpec
    from analysis.harness import methods
    from analysis.harness.generation import answer_details
    from analysis.harness.models import load_model

    tiny = load_model("tiny-random-qwen2", dtype="float32")
    spec = MethodSpec(name="faedkv", compression_ratio=0.75, params={
        "exact_share": 0.5, "exact_scorer": "keydiff", "exact_pool": "layer", "window": 16})
    press = methods.build_press(spec, tiny.model)
    context = " ".join(random.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(300))
    a = answer_details(tiny, press, context, "Which word comes first?", max_new_tokens=3)
    assert a.cache_lengths == a.expected_cache_lengths and a.cache_lengths[0] < a.prompt_tokens and a.text
    assert all(press.last_stats[i]["exact"] > 0 for i in range(len(a.cache_lengths)))
    for spec_params, needle in [({"exact_pool": "layer"}, "set exact_share above 0"),
                                ({"exact_share": 0.5, "exact_pool": "global", "exact_scorer": "kvzip"},
                                 "only the dimension split stores"),
                                ({"exact_share": 0.5, "exact_pool": "layer", "slot_fit": "probes"}, "slot_fit 'mean'")]:
        with pytest.raises(ValueError, match=needle):
            MethodSpec(name="faedkv", compression_ratio=0.5, params=spec_params)


def test_the_window_share_asks_for_a_window_that_grows_with_the_budget():
    from faedkv.budget import asked_window

    # the search's candidate at 4K: half the kept rows, 1024 at ratio 0.5 and 512 at 0.75
    assert layout(4096, 0.5, 4, 0, window_share=0.5).window == 1024
    assert layout(4096, 0.75, 4, 0, window_share=0.5).window == 512
    assert layout(4096, 0.75, 4, 600, window_share=0.1).window == 600        # `window` is the least asked for
    assert layout(4096, 0.75, 4, 64).window == 64 and asked_window(1024, 64) == 64
    # a budget too small for it shrinks it as it shrinks a fixed window (one slot stays)
    small = layout(40, 0.5, 4, 0, window_share=0.9)
    assert (small.window, small.slots) == (15, 1)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="window_share must be in"):
            layout(4096, 0.5, 4, 64, window_share=bad)


@pytest.mark.parametrize("variant", ["iwdft", "resample", "dimsplit"])
def test_a_window_share_press_is_the_press_with_that_window(variant):
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    model = make_tiny_llama()
    tokens = int(torch.randint(150, 260, (1,), generator=gen))
    ratio = random.Random(seed).choice([0.5, 0.75])
    ids = torch.randint(0, VOCAB, (1, tokens), generator=gen)
    window = int(0.5 * kept_rows(tokens, ratio))
    shared = FAEDKVPress(compression_ratio=ratio, variant=variant, window=8, window_share=0.5, exact_share=0.0)
    fixed = FAEDKVPress(compression_ratio=ratio, variant=variant, window=window, window_share=0.0, exact_share=0.0)
    got, expected = prefill(model, ids, shared), prefill(model, ids, fixed)
    assert shared.last_stats[0]["window"] == window and shared.layout(tokens).window == window, seed
    for a, b in zip(got.layers, expected.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), seed


def test_bad_window_shares_are_refused_naming_the_fix():
    for bad in (1.0, -0.5, True, "0.5"):
        with pytest.raises(ValueError, match="window_share must be in"):
            FAEDKVPress(compression_ratio=0.5, window_share=bad)
    with pytest.raises(ValueError, match="dct-iterative re-compresses every `window` tokens"):
        FAEDKVPress(compression_ratio=0.5, variant="dct-iterative", window_share=0.5)
