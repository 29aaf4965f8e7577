"""DimsplitCache: the dimension split stored physically, read by attention without its rows.

Physical (this cache) against virtual (FAEDKVPress(variant="dimsplit") handing attention the
reconstructed rows): the same attention, the same generation, the bytes kvpress's budget allows.
"""
import math
import random

import pytest
import torch
from transformers import DynamicCache

from conftest import make_tiny, next_logits, prefill
from faedkv import DimsplitCache, FAEDKVPress
from faedkv.budget import kept_rows, layout
from faedkv.decode.dimsplit import DimsplitLayer, DimsplitMiddle, MiddleGroup, bin_weights, dimsplit_attention
from faedkv.variants import compress_dimsplit

VOCAB = 128


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def whole(middle: DimsplitMiddle) -> MiddleGroup:
    """A plain split of every KV head as the one stored group (no whole tokens)."""
    batch, heads, dim = middle.exact.shape[1], middle.exact.shape[2], middle.order.shape[-1]
    empty = torch.zeros(batch, heads, 0, dim)
    return MiddleGroup(slice(0, heads), middle, empty, empty)


def press_rows_attention(query, middle_keys, middle_values, keys, values, rows, share, scaling):
    """sdpa over [press-reconstructed middle | exact rows], the new tokens (last) causal."""
    mid_k, _, _ = compress_dimsplit(middle_keys, rows, share)
    mid_v, _, _ = compress_dimsplit(middle_values, rows, share)
    groups = query.shape[1] // keys.shape[1]
    all_k = torch.cat([mid_k.to(keys.dtype), keys], dim=2).repeat_interleave(groups, dim=1)
    all_v = torch.cat([mid_v.to(values.dtype), values], dim=2).repeat_interleave(groups, dim=1)
    q_len, length = query.shape[-2], all_k.shape[-2]
    mask = torch.arange(length) <= torch.arange(q_len).unsqueeze(-1) + (length - q_len)
    out = torch.nn.functional.scaled_dot_product_attention(query, all_k, all_v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


@pytest.mark.parametrize("tokens", [37, 40, 64, 81])
@pytest.mark.parametrize("share", [0.0, 0.25, 0.5])
def test_attention_over_the_store_equals_sdpa_over_the_press_rows(tokens, share):
    batch, kv_heads, groups, dim = 2, 2, random.choice([1, 2, 3]), 16
    rows, exact_rows, q_len = random.randint(3, tokens // 2), random.randint(1, 12), random.randint(1, 4)
    middle_keys, middle_values = torch.randn(2, batch, kv_heads, tokens, dim)
    keys, values = torch.randn(2, batch, kv_heads, exact_rows + q_len, dim)
    query = torch.randn(batch, kv_heads * groups, q_len, dim)
    middle = DimsplitMiddle.compress(middle_keys, middle_values, rows, share)
    # the stored split is the press's: same exact dims, the same rows once rebuilt
    rebuilt = middle.reconstruct()
    for index, x in enumerate((middle_keys, middle_values)):
        rows_press, dims, numbers = compress_dimsplit(x, rows, share)
        assert torch.equal(middle.order[index][..., :middle.exact_dims], dims)
        assert numbers == middle.coefficients.shape[-2] == 2 * middle.bins - 1
        torch.testing.assert_close(rebuilt[index], rows_press, rtol=0, atol=1e-6)
    scaling = 1 / math.sqrt(dim)
    out = dimsplit_attention(query, keys, values, [whole(middle)], scaling)
    ref = press_rows_attention(query, middle_keys, middle_values, keys, values, rows, share, scaling)
    assert out.shape == ref.shape == (batch, q_len, kv_heads * groups, dim)
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("tokens", [9, 10, 31, 32])
def test_output_bin_weights_match_irfft(tokens):
    # sum_n p(n) irfft(D, n=N)(n) = (1/N) sum_k a_k Re(D_k conj(P_k)), P = rfft(p), for every K
    # up to N//2 + 1 (the Nyquist bin, N even) and D with any imaginary part on bins 0 and N/2
    p = torch.rand(5, tokens, dtype=torch.float64)
    for bins in range(1, tokens // 2 + 2):
        spectrum = torch.randn(bins, 3, dtype=torch.complex128)
        direct = p @ torch.fft.irfft(spectrum, n=tokens, dim=0)
        weights = bin_weights(tokens, bins, "cpu").double()
        folded = torch.fft.rfft(p, dim=-1)[..., :bins] * weights
        formula = (folded.real @ spectrum.real + folded.imag @ spectrum.imag) / tokens
        torch.testing.assert_close(formula, direct, rtol=1e-10, atol=1e-12)
        nyquist = bins == tokens // 2 + 1 and tokens % 2 == 0
        assert weights.tolist() == [1.0] + [2.0] * (bins - 1 - nyquist) + [1.0] * nyquist


@pytest.mark.parametrize("tokens", [20, 21])
def test_every_bin_kept_attends_the_original_rows(tokens):
    # rows = N: every bin (the Nyquist one too for even N) is kept, the split is lossless
    middle_keys, middle_values = torch.randn(2, 1, 2, tokens, 8)
    keys, values = torch.randn(2, 1, 2, 3, 8)
    query = torch.randn(1, 4, 2, 8)
    middle = DimsplitMiddle.compress(middle_keys, middle_values, tokens, 0.5)
    assert middle.bins == tokens // 2 + 1
    out = dimsplit_attention(query, keys, values, [whole(middle)], 0.3)
    all_k = torch.cat([middle_keys, keys], dim=2).repeat_interleave(2, dim=1)
    all_v = torch.cat([middle_values, values], dim=2).repeat_interleave(2, dim=1)
    mask = torch.arange(tokens + 3) <= torch.arange(2).unsqueeze(-1) + tokens + 1
    ref = torch.nn.functional.scaled_dot_product_attention(query, all_k, all_v, attn_mask=mask, scale=0.3)
    assert rel(out, ref.transpose(1, 2)) < 1e-5


def generate(model, ids, cache, press=None, new_tokens=24):
    kwargs = dict(past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, output_logits=True, return_dict_in_generate=True,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.no_grad():
        if press is None:
            out = model.generate(ids, **kwargs)
        else:
            with press(model):
                out = model.generate(ids, **kwargs)
    return out.sequences, torch.stack(out.logits).float()


@pytest.mark.parametrize("ratio, share", [(0.5, 0.5), (0.75, 0.25), (0.5, 0.0)])
def test_generation_matches_the_press_end_to_end(tiny_lm, ratio, share):
    ids = torch.randint(0, VOCAB, (2, random.randint(120, 200)))
    cache = DimsplitCache(ratio, dim_share=share, sink_tokens=4, window=8)
    press = FAEDKVPress(compression_ratio=ratio, variant="dimsplit", dim_share=share, sink_tokens=4, window=8,
                        exact_share=0.0, window_share=0.0)
    tokens, logits = generate(tiny_lm, ids, cache)
    press_tokens, press_logits = generate(tiny_lm, ids, DynamicCache(), press)
    assert torch.equal(tokens, press_tokens)
    torch.testing.assert_close(logits, press_logits, rtol=1e-5, atol=1e-5)
    # compression changed something: the full cache's logits are not the press's
    _, full_logits = generate(tiny_lm, ids, DynamicCache())
    assert (full_logits - press_logits).abs().max() > 1e-4
    # the same exact dims per layer as the press chose, the tail grown by the decoded tokens
    kept = layout(ids.shape[1], ratio, 4, 8)
    for index, layer in enumerate(cache.layers):
        stats = press.last_stats[index]
        (group,) = layer.groups
        middle = group.split
        assert group.keys.shape[-2] == 0 and group.heads == slice(0, middle.order.shape[2])
        assert middle.order[0][..., :middle.exact_dims].tolist() == stats["key_exact_dims"]
        assert middle.order[1][..., :middle.exact_dims].tolist() == stats["value_exact_dims"]
        assert middle.tokens == kept.middle
    assert cache.stored_lengths() == [kept.sink + kept.window + 23] * 3
    assert cache.get_seq_length() == ids.shape[1] + 23


def test_multi_token_decode_calls_match_the_press(tiny_lm):
    # calls of several tokens: causal among themselves, every stored row in their past
    ids = torch.randint(0, VOCAB, (1, 160))
    press = FAEDKVPress(compression_ratio=0.5, variant="dimsplit", dim_share=0.5, window=8, exact_share=0.0,
                        window_share=0.0)
    press_cache = prefill(tiny_lm, ids, press)
    cache = DimsplitCache(0.5, dim_share=0.5, window=8)
    with torch.no_grad():
        tiny_lm(input_ids=ids, past_key_values=cache)
    start = ids.shape[1]
    for q_len in (3, 1, 5):
        new = torch.randint(0, VOCAB, (1, q_len))
        expected = next_logits(tiny_lm, press_cache, new, start)
        got = next_logits(tiny_lm, cache, new, start)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        start += q_len


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_memory_is_kvpress_budget_plus_the_dim_indices(tiny_lm, ratio):
    tokens = random.randint(150, 300)
    ids = torch.randint(0, VOCAB, (2, tokens))
    cache = DimsplitCache(ratio, dim_share=0.5, window=16)
    press = FAEDKVPress(compression_ratio=ratio, variant="dimsplit", dim_share=0.5, window=16, exact_share=0.0,
                        window_share=0.0)
    with torch.no_grad():
        tiny_lm(input_ids=ids, past_key_values=cache)
    full = prefill(tiny_lm, ids)
    prefill(tiny_lm, ids, press)
    layers = len(cache.layers)
    keys = full.layers[0].keys
    batch, kv_heads, _, dim = keys.shape
    row_bytes = 2 * batch * kv_heads * dim * keys.element_size()          # one row of keys + values
    budget = kept_rows(tokens, ratio) * row_bytes * layers                  # kvpress's rows
    indices = 2 * batch * kv_heads * dim * 8 * layers                       # the dims' order, int64
    assert cache.memory_bytes() <= budget + indices
    assert cache.memory_bytes() > 0.9 * budget          # the budget is spent, not left unused
    for index, layer in enumerate(cache.layers):
        assert layer.equivalent_rows() == pytest.approx(press.last_stats[index]["equivalent_rows"])
        middle_bytes = sum(t.numel() * t.element_size() for t in (layer.groups[0].split.exact, layer.groups[0].split.coefficients))
        kept = layout(tokens, ratio, 4, 16)
        assert middle_bytes <= kept.slots * row_bytes < 0.5 * kept.middle * row_bytes
    full_bytes = sum(t.numel() * t.element_size() for layer in full.layers for t in (layer.keys, layer.values))
    assert cache.memory_bytes() <= (1 - ratio) * full_bytes + indices + row_bytes * layers


def test_ratio_zero_is_a_plain_growing_cache(tiny_lm):
    ids = torch.randint(0, VOCAB, (1, 60))
    tokens, logits = generate(tiny_lm, ids, DimsplitCache(0.0), new_tokens=5)
    full_tokens, full_logits = generate(tiny_lm, ids, DynamicCache(), new_tokens=5)
    assert torch.equal(tokens, full_tokens)
    torch.testing.assert_close(logits, full_logits)


def test_eager_attention_is_refused():
    model = make_tiny("llama")
    model.config._attn_implementation = "eager"
    ids = torch.randint(0, VOCAB, (1, 100))
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        generate(model, ids, DimsplitCache(0.5, window=8), new_tokens=3)


def test_padded_batch_short_prefill_and_bad_arguments_are_refused(tiny_lm):
    ids = torch.randint(1, VOCAB, (2, 100))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad(), pytest.raises(ValueError, match="unpadded batches only"):
        tiny_lm.generate(ids, attention_mask=mask, past_key_values=DimsplitCache(0.5, window=8),
                         max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad(), pytest.raises(ValueError, match="prefill more tokens"):
        tiny_lm(input_ids=ids[:, :1], past_key_values=DimsplitCache(0.5, sink_tokens=4, window=8))
    for kwargs, needle in [({"compression_ratio": 1.0}, "compression_ratio"),
                           ({"dim_share": 1.0}, "dim_share must be in"),
                           ({"window": -1}, "must be >= 0")]:
        with pytest.raises(ValueError, match=needle):
            DimsplitCache(**kwargs)
    layer = DimsplitLayer(0, 0.5, 0.5, 4, 8)
    with pytest.raises(ValueError, match="beam search"):
        layer.reorder_cache(torch.tensor([0]))
    with pytest.raises(ValueError, match="cannot be cropped"):
        layer.crop(10)


def test_the_faedkv_name_is_lazy():
    import faedkv

    assert faedkv.DimsplitCache is DimsplitCache
