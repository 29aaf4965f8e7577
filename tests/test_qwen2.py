"""Qwen2 (q/k/v biases, GQA, tied embeddings) through faedkv's press and FAEDKVCache: the
tiny random Qwen2 must behave as the tiny Llama does (the registry, spectra, ablation and
contribution tests run on both; this file covers the compressor's own entry points)."""
import random

import pytest
import torch
from transformers import DynamicCache

from analysis.harness.methods import faedkv_cache_length
from conftest import make_tiny_qwen2, next_logits, prefill
from faedkv import FAEDKVCache, FAEDKVPress

VOCAB = 128


@pytest.mark.parametrize("variant", ["iwdft", "resample"])
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_press_on_qwen2_keeps_its_budget_and_ratio_zero_changes_nothing(variant, key_space):
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    model = make_tiny_qwen2()
    tokens = int(torch.randint(120, 220, (1,), generator=gen))
    ids = torch.randint(0, VOCAB, (2, tokens), generator=gen)
    follow = torch.randint(0, VOCAB, (2, 6), generator=gen)
    reference = next_logits(model, prefill(model, ids), follow, tokens)
    same = FAEDKVPress(compression_ratio=0.0, variant=variant, window=16, key_space=key_space)
    got = next_logits(model, prefill(model, ids, same), follow, tokens)
    assert torch.allclose(got, reference, atol=1e-5), (seed, (got - reference).abs().max())
    press = FAEDKVPress(compression_ratio=0.5, variant=variant, sink_tokens=4, window=16,
                        key_space=key_space)
    cache, original = prefill(model, ids, press), prefill(model, ids)
    rows = faedkv_cache_length(press, tokens)
    slots = rows - 4 - 16
    for layer, exact in zip(cache.layers, original.layers):
        assert layer.keys.shape == layer.values.shape == (2, 2, rows, 16), seed
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
        # sink and window stay exact, the slots stand for the middle (not a copy of its head)
        assert torch.allclose(layer.keys[:, :, :4], exact.keys[:, :, :4], atol=1e-5), seed
        assert torch.allclose(layer.values[:, :, -16:], exact.values[:, :, -16:], atol=1e-5), seed
        assert not torch.allclose(layer.values[:, :, 4:4 + slots], exact.values[:, :, 4:4 + slots]), seed
    assert torch.isfinite(next_logits(model, cache, follow, tokens)).all(), seed


def test_faedkv_cache_on_qwen2_generates_like_a_dynamic_cache_at_ratio_zero():
    model = make_tiny_qwen2()
    ids = torch.randint(0, VOCAB, (1, random.randint(20, 80)))
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=2)
    expected = model.generate(ids, past_key_values=DynamicCache(), **kwargs)
    got = model.generate(ids, past_key_values=FAEDKVCache(compression_ratio=0.0), **kwargs)
    assert torch.equal(got, expected)


def test_faedkv_cache_on_qwen2_decodes_at_a_fixed_budget():
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    model = make_tiny_qwen2()
    tokens = int(torch.randint(150, 250, (1,), generator=gen))
    ids = torch.randint(0, VOCAB, (1, tokens), generator=gen)
    cache = FAEDKVCache(compression_ratio=0.75, sink_tokens=4, window=16, fused=False)
    sizes = []
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache)
        for i in range(40):
            token = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=token, past_key_values=cache,
                        position_ids=torch.tensor([[tokens + i]]))
            assert torch.isfinite(out.logits).all(), (seed, i)
            sizes.append(cache.memory_bytes())
    assert len(set(sizes)) == 1, seed                 # the budget does not grow while decoding
    full = 3 * 2 * (tokens + 40) * 2 * 16 * 4          # a DynamicCache: layers x (k, v) x rows x heads x dim x fp32
    assert sizes[0] < 0.35 * full, (seed, sizes[0], full)
    assert cache.get_seq_length() == tokens + 40


@pytest.mark.parametrize("heads,head_dim", [(14, 64), (12, 128)], ids=["0.5B-heads", "1.5B-heads"])
def test_real_qwen25_head_geometry_through_press_and_cache(heads, head_dim):
    """Qwen2.5-0.5B / 1.5B attention geometry (2 KV heads, groups of 7 / 6, head_dim 64 / 128) on
    two random layers: the press keeps its budget, FAEDKVCache decodes at a fixed size."""
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    model = make_tiny_qwen2(num_layers=2, hidden_size=heads * head_dim, num_attention_heads=heads,
                            num_kv_heads=2)
    assert model.model.layers[0].self_attn.head_dim == head_dim
    tokens = int(torch.randint(150, 220, (1,), generator=gen))
    ids = torch.randint(0, VOCAB, (1, tokens), generator=gen)
    press = FAEDKVPress(variant="iwdft", compression_ratio=0.5, sink_tokens=4, window=16)
    cache = prefill(model, ids, press)
    assert [layer.keys.shape for layer in cache.layers] == \
        [(1, 2, faedkv_cache_length(press, tokens), head_dim)] * 2, seed
    decoding = FAEDKVCache(compression_ratio=0.5, sink_tokens=4, window=16, fused=False)
    sizes = []
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=decoding)
        for i in range(8):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=decoding,
                        position_ids=torch.tensor([[tokens + i]]))
            assert torch.isfinite(out.logits).all(), (seed, i)
            sizes.append(decoding.memory_bytes())
    assert len(set(sizes)) == 1, seed
