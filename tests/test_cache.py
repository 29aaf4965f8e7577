"""FAEDKVCache: fixed budget during generation, state = batch IWDFT, true positions, memory."""
import gc
import math
import random
import weakref

import pytest
import torch
from transformers import DynamicCache

from conftest import TINY_ARCHS, make_tiny, make_tiny_llama
from faedkv import FAEDKVCache, FrequencyPlan, iwdft
from faedkv.attention import log_mass
from faedkv.budget import kept_rows
from faedkv.decode.cache import FAEDKVLayer, InPlaceSteps, KernelSteps, TorchSteps, half_spectrum_mask
from faedkv.decode.slots import Handoff, post, posted
from faedkv.iwdft import band_limit
from faedkv.plans import bin_frequencies
from faedkv.variants import compress, plan_keep

VOCAB = 128


def record(cache: FAEDKVCache) -> tuple[dict, dict]:
    """Wrap cache.update: per layer, what the model handed in and what attention got back."""
    received, returned = {}, {}
    update = cache.update

    def recording_update(key_states, value_states, layer_idx, cache_kwargs=None):
        received.setdefault(layer_idx, []).append((key_states, value_states))
        keys, values = update(key_states, value_states, layer_idx, cache_kwargs)
        returned.setdefault(layer_idx, []).append((keys.shape, values.shape))
        return keys, values

    cache.update = recording_update
    return received, returned


def all_received(received: dict, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    keys = torch.cat([k for k, _ in received[layer_idx]], dim=2)
    values = torch.cat([v for _, v in received[layer_idx]], dim=2)
    return keys, values


def distance_rows(folded: int, slots: int) -> torch.Tensor:
    """Ring row of each distance bin b = 0..M-1: (folded - b) mod M."""
    return (folded - torch.arange(slots)) % slots


def test_bf16_decoding_keeps_the_budget_and_tracks_the_float32_state():
    # bf16 here, fp32 in the generate test below (also 200 tokens)
    model = make_tiny_llama(dtype=torch.bfloat16)
    tokens, ratio, sink, window = random.randint(150, 250), random.choice([0.5, 0.75]), 4, 16
    cache = FAEDKVCache(compression_ratio=ratio, sink_tokens=sink, window=window)
    received, returned = record(cache)
    ids = torch.randint(0, VOCAB, (2, tokens))
    size = kept_rows(tokens, ratio)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache)
        assert cache.stored_lengths() == [size] * 3
        token = out.logits[:, -1:].argmax(-1)
        for step in range(200):
            out = model(input_ids=token, past_key_values=cache)
            assert cache.stored_lengths() == [size] * 3, step
            # what attention saw: the budget's rows, and nothing of it kept on the layer
            assert all(returned[i][-1][0][2] == size for i in range(3)), step
            assert all(layer.keys is None for layer in cache.layers)
            assert cache.get_seq_length() == tokens + step + 1
            token = out.logits[:, -1:].argmax(-1)
    slots = size - sink - window
    for layer_idx in range(3):
        layer = cache.layers[layer_idx]
        assert layer.mean_keys.dtype == torch.bfloat16 and layer.mean_keys.shape[2] == slots
        keys, values = all_received(received, layer_idx)
        state_k, state_v, folded = cache.states(layer_idx)
        assert folded == tokens + 200 - sink - window
        for state, x in ((state_k, keys), (state_v, values)):
            batch = iwdft(x[:, :, sink:sink + folded].float(), slots)
            assert (state - batch).abs().max() <= 2e-2 * batch.abs().max()


def test_generate_works_and_state_equals_batch_iwdft():
    model = make_tiny_llama()
    tokens, ratio, sink, window, new = random.randint(120, 200), 0.6, 4, 16, 200
    plan = FrequencyPlan(layers=[[0, 1, 2, 3], list(range(22)), [0, 5]])
    cache = FAEDKVCache(compression_ratio=ratio, sink_tokens=sink, window=window, plan=plan)
    received, _ = record(cache)
    ids = torch.randint(0, VOCAB, (2, tokens))
    out = model.generate(ids, past_key_values=cache, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=2)
    assert out.shape == (2, tokens + new)
    size = kept_rows(tokens, ratio)
    assert cache.stored_lengths() == [size] * 3
    slots = size - sink - window
    for layer_idx in range(3):
        keys, values = all_received(received, layer_idx)
        state_k, state_v, folded = cache.states(layer_idx)
        assert folded == keys.shape[2] - sink - window
        for state, x in ((state_k, keys), (state_v, values)):
            batch = iwdft(x[:, :, sink:sink + folded], slots)
            assert torch.allclose(state, batch, atol=1e-5 * batch.abs().max().item())
        layer = cache.layers[layer_idx]
        ring = torch.arange(folded) % slots
        assert torch.equal(layer.counts, torch.bincount(ring, minlength=slots))
        assert torch.equal(layer.window_keys, keys[:, :, -window:])
        assert torch.equal(layer.sink_keys, keys[:, :, :sink])
        # ring-order slots are the spec's distance-order class means, permuted (plan applied)
        ring_slots = layer.slots()[0].index_select(2, distance_rows(folded, slots))
        means = compress("iwdft", keys[:, :, sink:sink + folded], slots, plan_keep(plan, layer_idx, "key", 2))
        assert torch.allclose(ring_slots, means, atol=1e-5 * ring_slots.abs().max().item())
    # Layer 0's keys depend only on the token and its position: an independent full forward over
    # the generated sequence gives the same keys, so the cache used true positions for RoPE.
    full = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=out[:, :-1], past_key_values=full)
    reference = full.layers[0].keys
    state_k, _, folded = cache.states(0)
    assert torch.allclose(cache.layers[0].window_keys, reference[:, :, -window:], atol=1e-5)
    assert torch.allclose(state_k, iwdft(reference[:, :, sink:sink + folded], slots), atol=1e-5)


def test_calls_longer_than_the_window_fold_more_than_a_lap_exactly():
    """A 100-token call (more than W) then a 1-token call folding 85 tokens > M = 40: the fold
    wraps around the ring and gives rows a second token in one call."""
    model = make_tiny_llama()
    cache = FAEDKVCache(compression_ratio=0.5, sink_tokens=4, window=16)
    received, returned = record(cache)
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (1, 120)), past_key_values=cache)
        model(input_ids=torch.randint(0, VOCAB, (1, 100)), past_key_values=cache)
        assert cache.stored_lengths() == [4 + 40 + 100] * 3
        model(input_ids=torch.randint(0, VOCAB, (1, 1)), past_key_values=cache)
    assert cache.stored_lengths() == [60] * 3
    assert [r[0][2] for r in returned[0]] == [120, 4 + 40 + 100, 4 + 40 + 16]
    for layer_idx in range(3):
        keys, values = all_received(received, layer_idx)
        state_k, state_v, folded = cache.states(layer_idx)
        assert folded == 221 - 4 - 16
        for state, x in ((state_k, keys), (state_v, values)):
            batch = iwdft(x[:, :, 4:4 + folded], 40)
            assert torch.allclose(state, batch, atol=1e-5 * batch.abs().max().item())


class DistanceOrderCache(FAEDKVCache):
    """The spec's order: slot b holds the class at distance b from the newest middle token
    (band-limited class means, their counts permuted alike)."""

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        layer = self.layers[layer_idx]
        if layer.folded and key_states.shape[2] < keys.shape[2]:  # not the prefill
            start, stop = self.sink_tokens, self.sink_tokens + layer.num_slots
            rows = distance_rows(layer.folded, layer.num_slots)
            for index, (out, kind) in enumerate(((keys, "key"), (values, "value"))):
                means = layer.means[index].index_select(2, rows).float()
                if self.plan is not None:
                    keep = self.plan.keep_some_frequencies(layer_idx, bin_frequencies(layer.num_slots), kind, 2)
                    means = band_limit(means, half_spectrum_mask(keep, layer.num_slots), dim=-2)
                out[:, :, start:stop] = means.to(out.dtype)
            mass = (start, log_mass(layer.counts.index_select(0, rows)))
            post(layer_idx, Handoff.of(keys, layer.slot_state, mass=mass))   # replaces the ring-order mass
        return keys, values


@pytest.mark.parametrize("plan", [None, FrequencyPlan(layers=[[0, 1, 2], [0, 7, 8], [0, 21]])],
                         ids=["all-bins", "plan"])
def test_ring_order_gives_the_logits_of_distance_order_slots(plan):
    model = make_tiny_llama()
    tokens, steps = random.randint(120, 200), 40
    ids = torch.randint(0, VOCAB, (2, tokens + steps))
    logits, caches = [], []
    for cache_type in (FAEDKVCache, DistanceOrderCache):
        cache = cache_type(compression_ratio=0.6, sink_tokens=4, window=16, plan=plan)
        with torch.no_grad():
            model(input_ids=ids[:, :tokens], past_key_values=cache)
            steps_logits = [model(input_ids=ids[:, tokens + i:tokens + i + 1], past_key_values=cache).logits
                            for i in range(steps)]
        logits.append(torch.cat(steps_logits, dim=1))
        caches.append(cache)
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
    # the two caches really handed attention different row orders
    layer = caches[0].layers[1]
    distance = layer.slots()[0].index_select(2, distance_rows(layer.folded, layer.num_slots))
    assert (layer.slots()[0] - distance).abs().max() > 1e-2 * distance.abs().max()


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_fused_decode_step_matches_the_torch_path(monkeypatch, dtype, atol):
    """The one-kernel decode step (faedkv.decode.kernels.decode_step_into, run by Triton's CPU
    interpreter here, on CUDA in real use) against the torch path: same logits, same ring means
    and window, with single-token steps, multi-token calls, calls longer than the window (torch
    path) and back, and a small M (calls of q > M take the torch path)."""
    pytest.importorskip("triton", reason="triton is in requirements.txt; its interpreter runs the kernel")
    from faedkv.decode import kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    kernel_step = kernels.decode_step_into
    monkeypatch.setattr(kernels, "decode_step_into", lambda *a: calls.append(a[4].shape[-2]) or kernel_step(*a))
    # one-token calls would take the fold-only step under faedkv's attention: test the one-kernel step
    monkeypatch.setattr(FAEDKVLayer, "slot_attention_ready", lambda self: False)
    model = make_tiny_llama(dtype=dtype)
    tokens, sink, window = random.randint(100, 140), random.choice([0, 4]), 8
    sizes = [1, 1, 1, 3, 1, 8, 11, 1, 1, 3, 1, 1, 1]
    ids = torch.randint(0, VOCAB, (2, tokens + sum(sizes)))
    results = []
    for use_kernel in (False, True):
        cache = FAEDKVCache(compression_ratio=0.85, sink_tokens=sink, window=window, fused=use_kernel)
        logits, position = [], tokens
        with torch.no_grad():
            model(input_ids=ids[:, :tokens], past_key_values=cache)
            for size in sizes:
                logits.append(model(input_ids=ids[:, position:position + size], past_key_values=cache).logits)
                position += size
                assert cache.stored_lengths() == [cache.layers[0].sink_tokens + cache.layers[0].num_slots
                                                  + max(window, size)] * 3
        results.append((torch.cat(logits, dim=1), cache))
    (reference, torch_cache), (got, kernel_cache) = results
    slots = kernel_cache.layers[0].num_slots
    # the kernel ran (3 layers each) for every call of q <= min(W, M) after a call that left
    # exactly W window rows; a call of q > W leaves q rows, which the next call folds in torch
    held, head, expected = window, 0, []
    for size in sizes:
        if size <= min(window, slots) and held == window:
            expected += [size] * 3
            head = (head + size) % window
        else:
            head = 0
        held = max(window, size)
    assert calls == expected and len(expected) >= 3 * 6
    assert torch.allclose(got.float(), reference.float(), atol=atol, rtol=0)
    for mine, theirs in zip(kernel_cache.layers, torch_cache.layers):
        assert mine.folded == theirs.folded == position - sink - window
        assert torch.allclose(mine.means.float(), theirs.means.float(), atol=atol, rtol=0)
        assert torch.allclose(mine.window_keys.float(), theirs.window_keys.float(), atol=atol, rtol=0)
        assert torch.allclose(mine.window_values.float(), theirs.window_values.float(), atol=atol, rtol=0)
    # the window really is a ring on the kernel path (the torch path keeps it oldest-first)
    assert [layer.head for layer in kernel_cache.layers] == [head] * 3 and head != 0


def test_slot_attention_kernel_matches_the_float32_definition(monkeypatch):
    """The split-KV Triton attention (Triton's CPU interpreter here) against
    slot_attention_torch: GQA, several splits (the last one short for most row counts),
    slot rows with two log counts. float32 only: the interpreter's bf16 tl.dot is broken (bench gpu checks bf16)."""
    pytest.importorskip("triton", reason="triton is in requirements.txt; its interpreter runs the kernel")
    from faedkv.decode.kernels import SlotAttention
    from faedkv.decode.slots import SlotState, slot_attention_torch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    batch, heads, kv_heads, rows, dim = 2, 4, 2, random.randint(50, 90), 16
    query = torch.randn(batch, 1, heads, dim).transpose(1, 2)   # the layout q_proj + RoPE give
    keys, values = torch.randn(2, batch, kv_heads, rows, dim).unbind(0)
    scales = SlotState(start=4, count=rows - 20, filled=random.randint(0, rows - 20),
                        more=math.log(3), less=math.log(2))
    expected = slot_attention_torch(query, keys, values, scales, scaling=0.25)
    out = torch.empty(batch, 1, heads, dim)
    attention = SlotAttention(keys, values, scales.start, scales.count, block_n=16, target_programs=16)
    assert attention.splits >= 3 and attention.rows_per_split % 16 == 0   # several splits of whole tiles
    attention(out, query, scales.filled, scales.more, scales.less, scaling=0.25)
    assert torch.allclose(out, expected, atol=1e-5)
    # the mass matters: plain attention over the means differs
    plain = slot_attention_torch(query, keys, values, SlotState(4, rows - 20, 0, 0.0, 0.0), 0.25)
    assert (plain - expected).abs().max() > 1e-3


def test_band_limited_slot_attention_is_attention_over_the_filtered_slots():
    """With plan masks (per KV head for values) slot_attention_torch filters the ring rows'
    logits and probabilities; that must equal attention over the materialised band-limited
    slots C means (the torch path's slot rows) with their log-count mass."""
    from faedkv.decode.slots import SlotState, slot_attention_torch
    from faedkv.iwdft import ring_log_counts

    batch, heads, kv_heads, dim, sink, window = 2, 4, 2, 16, 4, 8
    slots, folded = random.randint(20, 60), random.randint(200, 400)
    rows = sink + slots + window
    query = torch.randn(batch, heads, 1, dim)
    keys, values = torch.randn(2, batch, kv_heads, rows, dim).unbind(0)
    freqs = bin_frequencies(slots)
    plan = FrequencyPlan(layers=[{"key": [0, 3, 9], "value": [[0, 1, 2], [0, 12, 20]]}])
    masks = torch.stack(torch.broadcast_tensors(*[
        half_spectrum_mask(plan.keep_some_frequencies(0, freqs, kind, kv_heads), slots)
        for kind in ("key", "value")])).unsqueeze(1)
    filled, more, less = ring_log_counts(folded, slots)
    scales = SlotState(sink, slots, filled, more, less, masks=masks)
    got = slot_attention_torch(query, keys, values, scales, scaling=0.3)

    ring = slice(sink, sink + slots)
    materialised = []
    for index, x in enumerate((keys, values)):
        x = x.clone()
        x[..., ring, :] = band_limit(x[..., ring, :], masks[index], dim=-2)
        materialised.append(x.repeat_interleave(heads // kv_heads, dim=1))
    bias = scales.column_bias(rows, "cpu")
    weights = torch.softmax(query @ materialised[0].transpose(-1, -2) * 0.3 + bias, dim=-1)
    expected = (weights @ materialised[1]).transpose(1, 2)
    assert torch.allclose(got, expected, atol=1e-5)
    # the masks matter: without them the answer differs
    unfiltered = slot_attention_torch(query, keys, values, SlotState(sink, slots, filled, more, less), 0.3)
    assert (unfiltered - expected).abs().max() > 1e-3


@pytest.mark.parametrize("plan", [None, FrequencyPlan(layers=[[0, 1, 2], {"key": [0, 7], "value": [[0, 5], [1, 2, 3]]},
                                                              [0, 21]])], ids=["all-bins", "plan"])
def test_slot_scaled_attention_decodes_like_the_materialised_slots(monkeypatch, plan):
    """With faedkv's attention on the model, one-token calls hand attention the stored ring
    means and their log counts (no slot written) and give the logits of the torch path; a
    multi-token call in between materialises; switching the model back to sdpa makes the cache
    materialise once (and switch it back). With a plan the attention band-limits the ring rows."""
    pytest.importorskip("triton", reason="triton is in requirements.txt; its interpreter runs the kernel")
    from faedkv.attention import restore_sdpa, use_faedkv_attention
    from faedkv.decode import kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    folds = []
    fold_step = kernels.FoldStep.__call__
    monkeypatch.setattr(kernels.FoldStep, "__call__", lambda *a: folds.append(1) or fold_step(*a))
    model = make_tiny_llama()
    use_faedkv_attention(model.config)
    tokens = random.randint(100, 140)
    sizes = [1, 1, 1, 4, 1, 1, "sdpa", 1, 1]
    ids = torch.randint(0, VOCAB, (1, tokens + 20))
    results = []
    for use_kernel in (False, True):
        use_faedkv_attention(model.config)
        cache = FAEDKVCache(compression_ratio=0.75, sink_tokens=4, window=8, fused=use_kernel, plan=plan)
        logits, position, scaled_calls = [], tokens, []
        with torch.no_grad():
            model(input_ids=ids[:, :tokens], past_key_values=cache)
            for size in sizes:
                if size == "sdpa":
                    restore_sdpa(model.config)
                    continue
                before = len(folds)
                logits.append(model(input_ids=ids[:, position:position + size], past_key_values=cache).logits)
                scaled_calls.append(len(folds) > before)
                position += size
        results.append((torch.cat(logits, dim=1), cache, scaled_calls))
    (reference, torch_cache, _), (got, kernel_cache, scaled_calls) = results
    # the prefill answered the probe; the 4-token call materialises; after sdpa is back layer 0
    # materialises once and its marked keys switch the model to faedkv's attention again, so
    # layers 1 and 2 of that call are slot-scaled already, like every other call (3 layers each)
    assert scaled_calls == [True, True, True, False, True, True, True, True]
    assert len(folds) == 6 * 3 + 2
    assert torch.allclose(got, reference, atol=1e-5)
    for mine, theirs in zip(kernel_cache.layers, torch_cache.layers):
        assert mine.folded == theirs.folded
        assert torch.allclose(mine.means, theirs.means, atol=1e-6)
        assert torch.allclose(mine.window_keys, theirs.window_keys, atol=1e-5)
    assert kernel_cache.memory_bytes() == torch_cache.memory_bytes()


def test_decode_steps_are_chosen_at_the_prefill_and_handoffs_keep_nothing_alive(monkeypatch):
    """fused=False, no kernel device, or a plan pick TorchSteps / InPlaceSteps / KernelSteps once;
    the handoffs a cache posted neither keep it alive nor match another cache's keys."""
    pytest.importorskip("triton", reason="triton is in requirements.txt; its interpreter runs the kernel")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = make_tiny_llama()
    ids = torch.randint(0, VOCAB, (1, random.randint(60, 90)))
    plan = FrequencyPlan(layers=[[0, 1, 2]] * 3)
    for kwargs, steps in (({"fused": False}, TorchSteps), ({"fused": None}, TorchSteps),   # None: CUDA only
                          ({"fused": True}, KernelSteps), ({"fused": True, "plan": plan}, InPlaceSteps)):
        cache = FAEDKVCache(compression_ratio=0.5, window=8, **kwargs)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache)
        assert all(type(layer.steps) is steps for layer in cache.layers), kwargs
    module = model.model.layers[0].self_attn
    stored_keys = cache.layers[0].stored_keys
    full = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=full)
    assert posted(module, full.layers[0].keys) is None and posted(module, stored_keys) is None
    gc.disable()   # freed by reference counts alone, not by a collection
    try:
        alive = weakref.ref(cache), weakref.ref(cache.layers[0].kv)
        del cache, stored_keys
        assert all(ref() is None for ref in alive)
    finally:
        gc.enable()


def test_memory_at_ratio_075_is_under_030_of_a_dynamic_cache():
    model = make_tiny_llama(dtype=torch.bfloat16)
    tokens, steps, sink, window = random.randint(380, 420), 50, 4, 16
    cache = FAEDKVCache(compression_ratio=0.75, sink_tokens=sink, window=window)
    ids = torch.randint(0, VOCAB, (1, tokens + steps))
    with torch.no_grad():
        model(input_ids=ids[:, :tokens], past_key_values=cache)
        for i in range(steps):
            model(input_ids=ids[:, tokens + i:tokens + i + 1], past_key_values=cache)
        full = DynamicCache()
        model(input_ids=ids, past_key_values=full)
    full_bytes = sum(t.numel() * t.element_size() for layer in full.layers for t in (layer.keys, layer.values))
    rows = kept_rows(tokens, 0.75)
    row_bytes = 2 * 16 * 2  # kv_heads * head_dim * bf16
    # K and V rows in bf16 (sink + ring means + window, each its own storage), nothing else
    assert cache.memory_bytes() == 3 * 2 * rows * row_bytes
    assert full_bytes == 3 * 2 * (tokens + steps) * row_bytes
    ratio = cache.memory_bytes() / full_bytes
    print(f"\nmemory: FAEDKV {cache.memory_bytes()} B, DynamicCache {full_bytes} B, ratio {ratio:.3f}")
    assert ratio <= 0.3


def test_multi_token_calls_are_causal_at_true_positions():
    """A 6-token call after the prefill: token i must not see tokens after it (the mask built
    from get_mask_sizes lines the new columns up with the true positions)."""
    model = make_tiny_llama()
    tokens = random.randint(120, 200)
    ids = torch.randint(0, VOCAB, (1, tokens))
    follow = torch.randint(0, VOCAB, (1, 6))
    changed = follow.clone()
    changed[0, -1] = (follow[0, -1] + 1) % VOCAB
    logits = []
    for question in (follow, changed):
        cache = FAEDKVCache(compression_ratio=0.5, window=16)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache)
            # later transformers pass the query length instead of cache_position
            # (6 window tokens fold first: kv_length = S + M + W, the new columns at tokens..+5)
            past = kept_rows(tokens, 0.5) - 6
            expected = (past + 6, tokens - past)
            assert cache.layers[0].get_mask_sizes(torch.arange(tokens, tokens + 6)) == expected
            assert cache.layers[0].get_mask_sizes(6) == expected
            logits.append(model(input_ids=question, past_key_values=cache).logits)
        assert cache.stored_lengths() == [kept_rows(tokens, 0.5)] * 3
        assert cache.get_seq_length() == tokens + 6
    assert torch.allclose(logits[0][:, :-1], logits[1][:, :-1], atol=1e-6)
    assert (logits[0][:, -1] - logits[1][:, -1]).abs().max() > 1e-4


def test_zero_ratio_generates_like_a_dynamic_cache():
    model = make_tiny_llama()
    ids = torch.randint(0, VOCAB, (1, random.randint(20, 80)))
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=2)
    expected = model.generate(ids, past_key_values=DynamicCache(), **kwargs)
    cache = FAEDKVCache(compression_ratio=0.0)
    got = model.generate(ids, past_key_values=cache, **kwargs)
    assert torch.equal(got, expected)
    rows = ids.shape[1] + 19  # the last generated token is never fed back
    assert cache.memory_bytes() == 3 * 2 * rows * 2 * 16 * 4


def test_bad_use_raises_value_error():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="cannot compress a 1-token prefill"):
        with torch.no_grad():
            model(input_ids=torch.randint(0, VOCAB, (1, 1)), past_key_values=FAEDKVCache(compression_ratio=0.5))
    with pytest.raises(ValueError, match="of one shape"):
        FAEDKVCache(compression_ratio=0.5, window=8).update(torch.zeros(1, 2, 60, 16),
                                                            torch.zeros(1, 2, 60, 8), 0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        FAEDKVCache(compression_ratio=1.0)
    cache = FAEDKVCache(compression_ratio=0.5, window=8)
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (1, 60)), past_key_values=cache)
    with pytest.raises(ValueError, match="beam search"):
        cache.reorder_cache(torch.tensor([0]))
    with pytest.raises(ValueError, match="cropped"):
        cache.crop(10)


def test_a_short_prefill_shrinks_the_window_to_the_budget():
    model = make_tiny_llama()
    cache = FAEDKVCache(compression_ratio=0.5, sink_tokens=4, window=64)
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (1, 60)), past_key_values=cache)
        model(input_ids=torch.randint(0, VOCAB, (1, 1)), past_key_values=cache)
    layer = cache.layers[0]
    assert (layer.sink_tokens, layer.num_slots, layer.window) == (4, 1, 25)
    assert cache.stored_lengths() == [30] * 3


class ClassMeanCache(DynamicCache):
    """A full cache whose attention sees every middle token replaced by its ring class mean
    (class = middle index mod M, band-limited by the plan): what FAEDKVCache must equal."""

    def __init__(self, sink, window, slots, prefill, plan=None):
        super().__init__()
        self.sink, self.window, self.slots, self.prefill, self.plan = sink, window, slots, prefill, plan

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        if keys.shape[2] <= self.prefill:
            return keys, values
        out = []
        for x, kind in ((keys, "key"), (values, "value")):
            middle = x[:, :, self.sink:x.shape[2] - self.window].double()
            ring = torch.arange(middle.shape[2]) % self.slots
            sums = torch.zeros(*middle.shape[:2], self.slots, middle.shape[3], dtype=torch.float64)
            sums.index_add_(2, ring, middle)
            means = sums / torch.bincount(ring, minlength=self.slots).double()[:, None]
            if self.plan is not None:
                heads = x.shape[1]
                mask = half_spectrum_mask(self.plan.keep_some_frequencies(layer_idx, bin_frequencies(self.slots),
                                                                          kind, heads), self.slots)
                means = band_limit(means, mask.double(), dim=-2)
            out.append(torch.cat([x[:, :, :self.sink], means.index_select(2, ring).to(x.dtype),
                                  x[:, :, x.shape[2] - self.window:]], dim=2))
        return out[0], out[1]


# every kept set holds chunk 0 (bin 0), so no layer or head keeps none of a small M's bins
@pytest.mark.parametrize("plan", [None, FrequencyPlan(layers=[[0, 1, 2, 5], {"key": [0, 7, 8], "value": [[0, 5], [0, 2, 3]]},
                                                              list(range(0, 22, 2))])], ids=["every-bin", "plan"])
@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_decoding_equals_attention_over_the_class_mean_cache(plan, arch):
    """Over 200 decoded tokens (a fused=False torch path, one token a call), FAEDKVCache's logits
    equal those of the full cache in which every middle token is replaced by its class mean."""
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    model = make_tiny(arch)
    tokens = int(torch.randint(100, 160, (1,), generator=gen))
    ratio = float(torch.empty(1).uniform_(0.4, 0.8, generator=gen))
    ids = torch.randint(0, VOCAB, (2, tokens + 200), generator=gen)
    logits = []
    slots = kept_rows(tokens, ratio) - 4 - 16
    for cache in (FAEDKVCache(compression_ratio=ratio, sink_tokens=4, window=16, plan=plan, fused=False),
                  ClassMeanCache(4, 16, slots, tokens, plan)):
        with torch.no_grad():
            model(input_ids=ids[:, :tokens], past_key_values=cache)
            logits.append(torch.cat([model(input_ids=ids[:, tokens + i:tokens + i + 1], past_key_values=cache,
                                           position_ids=torch.full((2, 1), tokens + i)).logits
                                     for i in range(200)], dim=1))
    error = float((logits[0] - logits[1]).norm() / logits[1].norm())
    assert error < 1e-5, (seed, error)
