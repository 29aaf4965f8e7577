"""Attention-matched slots (faedkv.fit) and the per-layer diagnostics (analysis.harness.diagnostics)."""
import math
import random

import pytest
import torch
from transformers import DynamicCache

from conftest import make_tiny_llama
from faedkv import FAEDKVPress
from faedkv.budget import layout
from faedkv.fit import class_members, fit_slots
from faedkv.variants import class_means

VOCAB = 128


def draw(seed, batch=2, heads=4, kv_heads=2, probes=6, tokens=90, slots=20, dim=8):
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, heads, probes, dim, generator=gen)
    keys = torch.randn(batch, kv_heads, tokens, dim, generator=gen)
    values = torch.randn(batch, kv_heads, tokens, dim, generator=gen)
    return queries, keys, values, class_means(keys, slots), class_members(tokens, slots, keys.device)


def test_fitted_slots_take_the_probes_mass_of_their_classes():
    seed = random.randrange(2**31)
    queries, keys, values, slot_keys, members = draw(seed)
    scaling = 0.35
    bias, fitted = fit_slots(queries, scaling, keys, values, slot_keys, members)
    grouped = queries.reshape(2, 2, -1, 8)
    logits = grouped @ keys.transpose(-1, -2) * scaling
    weights = torch.softmax(logits, dim=-1)
    class_mass = torch.zeros(2, 2, grouped.shape[2], 20).index_add_(-1, members, weights).sum(2)
    norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    slot_mass = torch.exp(grouped @ slot_keys.transpose(-1, -2) * scaling + bias.unsqueeze(2) - norm).sum(2)
    assert torch.allclose(slot_mass, class_mass, rtol=1e-4), seed
    # Jensen: the fitted bias is never below the log-count mass for exact class means
    counts = torch.bincount(members, minlength=20).float()
    assert (bias >= torch.log(counts) - 1e-5).all(), seed
    # the values are convex combinations of each class's members
    for m in (0, 7, 19):
        member_values = values[:, :, members == m]
        assert (fitted[:, :, m] <= member_values.amax(2) + 1e-5).all()
        assert (fitted[:, :, m] >= member_values.amin(2) - 1e-5).all()


def test_fitted_press_restores_the_middle_mass_and_keeps_the_budget():
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    model = make_tiny_llama()
    tokens = int(torch.randint(150, 250, (1,), generator=gen))
    ids = torch.randint(0, VOCAB, (2, tokens), generator=gen)
    press = FAEDKVPress(variant="iwdft", compression_ratio=0.6, window=16, slot_fit="probes", fit_probes=16)
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, past_key_values=cache)
    kept = layout(tokens, 0.6, 4, 16)
    assert [cache.get_seq_length(i) for i in range(3)] == [kept.rows] * 3, seed
    start, bias = model.model.layers[0].self_attn.faedkv_column_bias
    assert start == 4 and bias.shape == (2, 2, kept.slots), seed
    follow = torch.randint(0, VOCAB, (2, 3), generator=gen)
    with torch.no_grad():
        out = model(input_ids=follow, past_key_values=cache,
                    position_ids=torch.arange(tokens, tokens + 3).expand(2, 3)).logits
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="slot_fit"):
        FAEDKVPress(compression_ratio=0.5, slot_fit="probes", variant="resample")


def test_diagnostics_are_zero_for_the_full_cache_and_show_the_slots_mass(tiny_loaded):
    from analysis.harness.diagnostics import attention_diagnostics

    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    context = torch.randint(0, VOCAB, (1, 200), generator=gen)
    probes = torch.randint(0, VOCAB, (1, 7), generator=gen)
    full = attention_diagnostics(tiny_loaded, None, context, probes)
    assert full["probes"] == 7 and len(full["output_error"]) == 3 and len(full["output_error"][0]) == 2
    assert max(max(layer) for layer in full["output_error"]) < 1e-5, seed
    assert full["slot_mass"] == [None] * 3
    press = FAEDKVPress(variant="iwdft", compression_ratio=0.5, window=16)
    got = attention_diagnostics(tiny_loaded, press, context, probes)
    assert min(min(layer) for layer in got["output_error"]) > 1e-4, seed
    for layer in range(3):
        for head in range(2):
            # the compressed middle holds only slots here: all its mass is theirs
            assert got["slot_mass"][layer][head] == pytest.approx(got["middle_mass_compressed"][layer][head]), seed
            assert 0 < got["middle_mass_full"][layer][head] < 1


@pytest.fixture(scope="module")
def tiny_loaded():
    from analysis.harness.models import load_model

    return load_model("tiny-random-llama", dtype="float32")
