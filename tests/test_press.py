"""FAEDKVPress / FrequencyFilterPress inside a real (tiny random Llama) model and kvpress."""
import copy
import random
from types import SimpleNamespace

import pytest
import torch
from kvpress import PerLayerCompressionPress
from transformers import DynamicCache, pipeline

from conftest import make_tiny_llama
from faedkv import VARIANTS, FAEDKVPress, FrequencyFilterPress, FrequencyPlan
from faedkv.attention import BIAS_ATTR, FAEDKV_SDPA
from faedkv.iwdft import fold_counts
from faedkv.plans import bin_frequencies, chunk_of
from faedkv.press import minimum_context

VOCAB = 128


@torch.no_grad()
def prefill(model, ids, press=None):
    cache = DynamicCache()
    if press is None:
        model.model(input_ids=ids, past_key_values=cache)
    else:
        with press(model):
            model.model(input_ids=ids, past_key_values=cache)
    return cache


def next_logits(model, cache, ids, start):
    """Logits of the tokens after the prefill, read from the (compressed) cache at their true
    positions (what kvpress's pipeline does)."""
    positions = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids, past_key_values=cache, position_ids=positions).logits.float()


def lengths(cache):
    return [cache.get_seq_length(i) for i in range(len(cache))]


def test_defaults_and_zero_ratio_is_a_no_op():
    press = FAEDKVPress()
    assert press.compression_ratio == 0.0 and press.variant == "iwdft"
    assert (press.sink_tokens, press.window, press.plan, press.key_space, press.mass_correction) == \
        (4, 64, None, "post_rope", False)
    keys, values = torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16)
    out = press.compress(SimpleNamespace(layer_idx=0), None, keys, values, None, {})
    assert out[0] is keys and out[1] is values


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
    slots = round((1 - ratio) * tokens) - 4 - 16
    for layer in range(3):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values
        assert keys.shape == values.shape == (2, 2, 4 + slots + 16, 16), (tokens, ratio)
        assert keys.dtype == values.dtype == dtype and torch.isfinite(keys).all()
        stats = press.last_stats[layer]
        assert stats["cache_len"] == 4 + slots + 16 and stats["slots"] == slots
        assert stats["middle"] == tokens - 20 and 0 < stats["reconstruction_error"] < 1.5


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_nothing_removed_gives_the_same_next_logits(variant, key_space):
    model = make_tiny_llama()
    tokens = random.randint(120, 200)
    ids = torch.randint(0, VOCAB, (2, tokens))
    follow = torch.randint(0, VOCAB, (2, 6))
    reference = next_logits(model, prefill(model, ids), follow, tokens)
    # ratio 0, and a ratio so small that M equals the middle length (every bin kept)
    for ratio in (0.0, 0.4 / tokens):
        for mass in (False, True):
            press = FAEDKVPress(compression_ratio=ratio, variant=variant, window=16,
                                key_space=key_space, mass_correction=mass)
            cache = prefill(model, ids, press)
            assert lengths(cache) == [tokens] * 3
            got = next_logits(model, cache, follow, tokens)
            assert torch.allclose(got, reference, atol=1e-4), (ratio, mass, (got - reference).abs().max())
    press = FAEDKVPress(compression_ratio=0.5, variant=variant, window=16, key_space=key_space)
    got = next_logits(model, prefill(model, ids, press), follow, tokens)
    assert (got - reference).abs().max() > 1e-3


def test_mass_correction_equals_repeating_each_slot_by_its_token_count():
    model = make_tiny_llama()
    tokens, sink, window, ratio = random.randint(150, 250), 4, 16, 0.6
    ids, follow = torch.randint(0, VOCAB, (1, tokens)), torch.randint(0, VOCAB, (1, 5))
    plain = prefill(model, ids, FAEDKVPress(compression_ratio=ratio, sink_tokens=sink, window=window))
    slots = round((1 - ratio) * tokens) - sink - window
    counts = fold_counts(tokens - sink - window, slots)
    for layer in plain.layers:  # softmax weight x count == count identical copies of the slot
        for name in ("keys", "values"):
            rows = getattr(layer, name)
            middle = rows[:, :, sink:sink + slots].repeat_interleave(counts, dim=2)
            setattr(layer, name, torch.cat([rows[:, :, :sink], middle, rows[:, :, sink + slots:]], dim=2))
    reference = next_logits(model, plain, follow, tokens)
    press = FAEDKVPress(compression_ratio=ratio, sink_tokens=sink, window=window, mass_correction=True)
    corrected = prefill(model, ids, press)
    assert model.config._attn_implementation == FAEDKV_SDPA
    got = next_logits(model, corrected, follow, tokens)
    assert torch.allclose(got, reference, atol=1e-4), (got - reference).abs().max()
    # and it is not a no-op
    uncorrected = prefill(model, ids, FAEDKVPress(compression_ratio=ratio, sink_tokens=sink, window=window))
    assert (next_logits(model, uncorrected, follow, tokens) - got).abs().max() > 1e-4
    # a fresh prefill without the press clears the recorded bias
    prefill(model, ids)
    assert all(getattr(layer.self_attn, BIAS_ATTR) is None for layer in model.model.layers)


def test_short_prompts_pass_unchanged_and_too_small_budgets_raise():
    press = FAEDKVPress(compression_ratio=0.75, sink_tokens=4, window=64)
    module = SimpleNamespace(layer_idx=0)
    keys = torch.randn(1, 2, 68, 8)
    assert press.compress(module, None, keys, keys, None, {})[0] is keys  # no middle
    minimum = minimum_context(0.75, 4, 64)
    assert round(0.25 * minimum) >= 69 > round(0.25 * (minimum - 1))
    keys = torch.randn(1, 2, minimum, 8)
    assert press.compress(module, None, keys, keys, None, {})[0].shape[2] == 69
    keys = torch.randn(1, 2, minimum - 1, 8)
    with pytest.raises(ValueError, match=f"minimum context at this ratio is {minimum}"):
        press.compress(module, None, keys, keys, None, {})


@pytest.mark.parametrize("kwargs,message", [
    ({"compression_ratio": 1.0}, r"\[0, 1\)"),
    ({"variant": "fft"}, "unknown variant"),
    ({"key_space": "both"}, "key_space"),
    ({"window": -1}, "window"),
    ({"plan": {"layers": [[0]]}}, "FrequencyPlan"),
])
def test_invalid_press_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FAEDKVPress(**kwargs)


def test_plan_for_another_model_and_eager_mass_correction_are_refused():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="plan .* has 2 layers but the model has 3"):
        prefill(model, torch.randint(0, VOCAB, (1, 100)),
                FAEDKVPress(compression_ratio=0.5, window=8, plan=FrequencyPlan.low_pass(0.5, 2)))
    eager = make_tiny_llama(attn_implementation="eager")
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        prefill(eager, torch.randint(0, VOCAB, (1, 100)),
                FAEDKVPress(compression_ratio=0.5, window=8, mass_correction=True))


def test_reconstruction_error_stats():
    keys, values = torch.randn(1, 2, 200, 16), torch.randn(1, 2, 200, 16)
    module = SimpleNamespace(layer_idx=0)
    lossless = FAEDKVPress(compression_ratio=0.4 / 200, window=16)
    lossless.compress(module, None, keys, values, None, {})
    assert lossless.last_stats[0]["reconstruction_error"] < 1e-5
    press = FAEDKVPress(compression_ratio=0.5, window=16)
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
    press = PerLayerCompressionPress(FAEDKVPress(window=16).as_scorer(), compression_ratios=ratios)
    cache = prefill(model, ids, press)
    assert lengths(cache) == [round((1 - r) * tokens) if r else tokens for r in ratios]
    assert model.config._attn_implementation == FAEDKV_SDPA
    assert press.press.last_stats[1]["slots"] == round(0.4 * tokens) - 20
    # a multi-token pass (one causal mask built from layer 0, re-aligned per layer) equals
    # feeding the same tokens one at a time (no mask needed)
    together = next_logits(model, copy.deepcopy(cache), question, tokens)[:, -1]
    single = copy.deepcopy(cache)
    for i in range(question.shape[1]):
        alone = next_logits(model, single, question[:, i:i + 1], tokens + i)[:, -1]
    assert torch.allclose(together, alone, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_loaded():
    from analysis.models import load_model

    return load_model("tiny-random-llama", dtype="float32")


@pytest.mark.parametrize("wrap", ["plain", "per-layer"])
def test_kvpress_pipeline_answers_a_string(tiny_loaded, wrap):
    press = FAEDKVPress(compression_ratio=0.5, window=16, variant=random.choice(VARIANTS))
    if wrap == "per-layer":
        press = PerLayerCompressionPress(press.as_scorer(), compression_ratios=[0.5, 0.3, 0.7])
    pipe = pipeline("kv-press-text-generation", model=tiny_loaded.model, tokenizer=tiny_loaded.tokenizer)
    context = " ".join(random.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(300))
    result = pipe(context, question="Which word comes first?", press=press, max_new_tokens=5)
    assert isinstance(result["answer"], str) and result["answer"]


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

    def reference_fold_into(out, x, num_slots):
        out.copy_(fold_by_distance(x, num_slots) * (num_slots / x.shape[-2]))

    model = make_tiny_llama(dtype=torch.bfloat16)
    module = model.model.layers[1].self_attn
    tokens = random.randint(300, 500)
    keys = torch.randn(2, 2, tokens, 16, dtype=torch.bfloat16)
    values = torch.randn(2, 2, tokens, 16, dtype=torch.bfloat16)
    slow = FAEDKVPress(compression_ratio=0.75, window=16, record_errors=False, fused=False)
    expected_k, expected_v = slow.compress(module, None, keys, values, None, {})
    monkeypatch.setattr(fused, "can_fuse", lambda x: True)
    monkeypatch.setattr(fused, "fold_into", reference_fold_into)
    fast = FAEDKVPress(compression_ratio=0.75, window=16, record_errors=False)
    assert fast.fusable(keys, values)
    got_k, got_v = fast.compress(module, None, keys, values, None, {})
    assert torch.equal(got_k, expected_k) and torch.equal(got_v, expected_v)
    assert fast.last_stats[1]["cache_len"] == slow.last_stats[1]["cache_len"] == got_k.shape[2]
    # Plans, pre-RoPE keys and recorded errors need the torch path.
    for kwargs in ({"record_errors": True}, {"key_space": "pre_rope"}, {"fused": False}):
        press = FAEDKVPress(compression_ratio=0.75, window=16, **{"record_errors": False, **kwargs})
        assert not press.fusable(keys, values)


def test_fused_kernel_is_not_used_on_cpu():
    from faedkv import fused

    assert not fused.can_fuse(torch.randn(1, 2, 64, 16))
