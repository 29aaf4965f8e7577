"""DimsplitCache with exact tokens: the dimension-split hybrid (the KVzip-ranked split the search
found best) stored physically, against the press that hands attention its reconstructed rows.

Each head keeps its own number of whole middle tokens when the pool is per layer or global, so
the store has one group per head there; the attention joins them by one log-sum-exp.
"""
import random

import pytest
import torch
from transformers import DynamicCache

from conftest import make_tiny, next_logits, prefill
from faedkv import DimsplitCache, FAEDKVPress
from faedkv.budget import exact_token_masks, kept_rows, layout
from faedkv.decode.dimsplit import dimsplit_attention, split_middle
from faedkv.variants import compress_dimsplit_rest

VOCAB = 128


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def ragged_mask(batch: int, heads: int, tokens: int, counts: list[int]) -> torch.Tensor:
    """(batch, heads, tokens) bool: counts[h] random tokens of head h (in every batch row)."""
    mask = torch.zeros(batch, heads, tokens, dtype=torch.bool)
    for b in range(batch):
        for h, count in enumerate(counts):
            mask[b, h, torch.randperm(tokens)[:count]] = True
    return mask


@pytest.mark.parametrize("batch, counts", [(1, [3, 17]), (1, [0, 25]), (2, [9, 9]), (1, [40, 2])])
def test_attention_over_the_groups_equals_sdpa_over_the_press_rows(batch, counts):
    # counts [40, 2]: head 0's other tokens fit in the rows, so it keeps all of them whole
    kv_heads, groups, dim, tokens, rows = 2, random.choice([1, 2]), 16, 48, 10
    middle_keys, middle_values = torch.randn(2, batch, kv_heads, tokens, dim)
    keys, values = torch.randn(2, batch, kv_heads, 7, dim)
    q_len = random.randint(1, 3)
    query = torch.randn(batch, kv_heads * groups, q_len, dim)
    exact = ragged_mask(batch, kv_heads, tokens, counts)
    stored = split_middle(middle_keys, middle_values, rows, 0.5, exact)
    assert len(stored) == (1 if len(set(counts)) == 1 else kv_heads)
    out = dimsplit_attention(query, keys, values, stored, 0.25)
    # the press's rows: the exact tokens whole at their places, the others rebuilt
    press_k, _, key_numbers, _ = compress_dimsplit_rest(middle_keys, exact, rows, 0.5)
    press_v, _, value_numbers, _ = compress_dimsplit_rest(middle_values, exact, rows, 0.5)
    all_k = torch.cat([press_k, keys], dim=2).repeat_interleave(groups, dim=1)
    all_v = torch.cat([press_v, values], dim=2).repeat_interleave(groups, dim=1)
    length = all_k.shape[-2]
    mask = torch.arange(length) <= torch.arange(q_len).unsqueeze(-1) + (length - q_len)
    ref = torch.nn.functional.scaled_dot_product_attention(query, all_k, all_v, attn_mask=mask, scale=0.25)
    assert rel(out, ref.transpose(1, 2)) < 1e-5
    # the store holds what the press counts: its split numbers plus the whole tokens, per head
    numbers = sum(g.numbers() for g in stored)
    whole = int(exact.sum()) * dim * 2
    assert numbers == int(key_numbers.sum() + value_numbers.sum()) + whole


def test_exact_token_masks_per_pool():
    seed = random.randrange(10**6)
    torch.manual_seed(seed)
    layers, batch, heads, tokens = 3, 1, 2, 100
    scores = torch.rand(layers, batch, heads, tokens)
    scores[1, :, 0] += 1                        # layer 1, head 0: the best everywhere
    kept = layout(tokens, 0.5, 4, 8, 0.5)
    n = kept.middle
    per_head = exact_token_masks(scores, kept, "head")
    per_layer = exact_token_masks(scores, kept, "layer")
    overall = exact_token_masks(scores, kept, "global")
    assert per_head.shape == per_layer.shape == overall.shape == (layers, batch, heads, n), seed
    assert (per_head.sum(-1) == kept.exact).all(), seed
    assert (per_layer.sum((-1, -2)) == kept.exact * heads).all(), seed
    assert int(overall.sum()) == kept.exact * heads * layers, seed
    assert per_layer[1, 0, 0].sum() > kept.exact > per_layer[1, 0, 1].sum(), seed
    assert overall[1].sum() > kept.exact * heads, seed
    # the top scores are the chosen ones, and the sink and the window never are
    middle = scores[..., kept.sink:tokens - kept.window]
    chosen_low = middle.masked_fill(~per_head, float("inf")).amin(-1)
    other_high = middle.masked_fill(per_head, float("-inf")).amax(-1)
    assert (chosen_low > other_high).all(), seed
    assert middle[overall].min() >= middle[~overall].max(), seed
    with pytest.raises(ValueError, match="exact_pool must be one of"):
        exact_token_masks(scores, kept, "model")


@pytest.mark.parametrize("pool, batch, window_share", [("global", 1, 0.0), ("layer", 1, 0.0), ("head", 2, 0.0),
                                                       ("global", 1, 0.3)])
def test_hybrid_store_decodes_as_the_press(tiny_lm, pool, batch, window_share):
    seed = random.randrange(10**6)
    torch.manual_seed(seed)
    tokens = random.randint(160, 240)
    ids = torch.randint(0, VOCAB, (batch, tokens))
    scores = torch.rand(3, batch, 2, tokens)
    scores[2] += 0.5                            # layer 2 ranks higher: the global pool favours it
    press = FAEDKVPress(compression_ratio=0.75, variant="dimsplit", dim_share=0.5, window=8, exact_share=0.5,
                        exact_scorer="kvzip", exact_pool=pool, window_share=window_share)
    press.post_init_from_model(tiny_lm)
    with torch.no_grad():
        press_cache = prefill(tiny_lm, ids)
        press.compress_scored(tiny_lm, press_cache, scores)
        cache = DimsplitCache(0.75, dim_share=0.5, window=8, exact_share=0.5, exact_scores=scores, exact_pool=pool,
                              window_share=window_share)
        tiny_lm(input_ids=ids, past_key_values=cache)
        window = max(8, int(window_share * kept_rows(tokens, 0.75)))
        assert [layer.window for layer in cache.layers] == [window] * 3, seed
        start = tokens
        for q_len in (1, 3, 1, 1):
            new = torch.randint(0, VOCAB, (batch, q_len))
            expected = next_logits(tiny_lm, press_cache, new, start)
            got = next_logits(tiny_lm, cache, new, start)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
            start += q_len
    full = prefill(tiny_lm, ids)
    with torch.no_grad():
        full_logits = next_logits(tiny_lm, full, new, start - 1)
    assert (full_logits - expected).abs().max() > 1e-4, seed       # compression changed something
    stats = [press.last_stats[i] for i in range(3)]
    groups = [len(layer.groups) for layer in cache.layers]
    ragged = [len(set(mask.sum(-1).flatten().tolist())) > 1 for mask in cache.exact_masks]
    assert groups == [2 if r else 1 for r in ragged], seed
    if not window_share:     # with the large window's smaller middle, the pools may come out even
        assert any(ragged) == (pool != "head"), seed
    for layer, stat in zip(cache.layers, stats):
        assert layer.equivalent_rows() - 6 == pytest.approx(stat["equivalent_rows"]), seed   # + 6 decoded
    if pool == "global":
        assert stats[2]["exact"] > stats[0]["exact"], seed
    # bytes: kvpress's budget over the model (the pool moves it between layers), plus dim indices
    dim = cache.layers[0].exact_keys.shape[-1]
    row_bytes = 2 * batch * 2 * dim * 4
    indices = sum(t.numel() * 8 for layer in cache.layers for g in layer.groups if g.split is not None
                  for t in [g.split.order])
    decoded = 6 * row_bytes * 3
    assert cache.memory_bytes() <= kept_rows(tokens, 0.75) * row_bytes * 3 + indices + decoded, seed


def test_prefill_from_a_kvzip_prefill_decodes_as_the_kvzip_ranked_press():
    """kvzip_prefill + prefill_from: KVzip's scores and the prefilled keys reach the store with
    no further model call, and decoding reads what the press (exact_scorer='kvzip') hands attention."""
    from analysis.harness.models import load_model
    from analysis.tasks import needle
    from faedkv.kvzip import kvzip_prefill

    tiny = load_model("tiny-random-qwen2", dtype="float32")
    model = tiny.model
    ids = torch.tensor([needle.haystack.text_tokens(tiny.tokenizer, 300, 5)])
    tokens = ids.shape[1]
    prefilled, scores = kvzip_prefill(model, ids)
    full = prefill(model, ids)
    assert scores.shape == (3, 1, model.config.num_key_value_heads, tokens) and scores.dtype == torch.float32
    assert prefilled.get_seq_length() == tokens
    for got, want in zip(prefilled.layers, full.layers):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    cache = DimsplitCache(0.75, window=16, exact_share=0.9, exact_scores=scores, exact_pool="global")
    cache.prefill_from(model, prefilled)
    hook.remove()
    assert not calls and cache.get_seq_length() == tokens
    press = FAEDKVPress(compression_ratio=0.75, variant="dimsplit", window=16, exact_share=0.9,
                        exact_scorer="kvzip", exact_pool="global", window_share=0.0)
    with torch.no_grad():
        press_cache = prefill(model, ids, press)
        start = tokens
        for q_len in (4, 1, 1):
            new = torch.randint(0, model.config.vocab_size, (1, q_len), generator=torch.Generator().manual_seed(q_len))
            torch.testing.assert_close(next_logits(model, cache, new, start), next_logits(model, press_cache, new, start),
                                       rtol=1e-5, atol=1e-5)
            start += q_len
    with pytest.raises(ValueError, match="needs an empty DimsplitCache"):
        cache.prefill_from(model, prefilled)
    with pytest.raises(ValueError, match=r"context_ids must be \(1, tokens\)"):
        kvzip_prefill(model, ids.repeat(2, 1))


def test_hybrid_mistakes_are_refused_before_work():
    scores = torch.rand(3, 1, 2, 200)
    for kwargs, needle in [({"exact_share": 0.5}, "needs exact_scores"),
                           ({"exact_scores": scores}, "exact_scores need exact_share > 0"),
                           ({"exact_share": 1.0, "exact_scores": scores}, "exact_share must be in"),
                           ({"exact_share": 0.5, "exact_scores": scores[0]}, r"\(layers, batch, kv_heads, tokens\)"),
                           ({"exact_share": 0.5, "exact_scores": scores, "compression_ratio": 0.0}, "compression_ratio > 0"),
                           ({"exact_share": 0.5, "exact_scores": scores, "exact_pool": "model"}, "exact_pool must be one of"),
                           ({"window_share": 1.0}, "window_share must be in")]:
        with pytest.raises(ValueError, match=needle):
            DimsplitCache(**{"compression_ratio": 0.5, **kwargs})
    model = make_tiny("llama")
    with torch.no_grad():
        with pytest.raises(ValueError, match="score the batch and context that you prefill"):
            model(input_ids=torch.randint(0, VOCAB, (1, 150)),
                  past_key_values=DimsplitCache(0.5, window=8, exact_share=0.5, exact_scores=scores))
        with pytest.raises(ValueError, match="cover 2 layers"):
            model(input_ids=torch.randint(0, VOCAB, (1, 200)),
                  past_key_values=DimsplitCache(0.5, window=8, exact_share=0.5, exact_scores=scores[:2]))
        ragged = torch.rand(3, 2, 2, 200)
        ragged[:, :, 0] += 1
        with pytest.raises(ValueError, match="batch size 1 only"):
            model(input_ids=torch.randint(0, VOCAB, (2, 200)),
                  past_key_values=DimsplitCache(0.5, window=8, exact_share=0.5, exact_scores=ragged,
                                                exact_pool="global"))
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        DimsplitCache(0.5, window=8).prefill_from(model, DynamicCache())
