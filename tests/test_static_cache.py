"""StaticFAEDKVCache: FAEDKVCache's tokens and state from a fixed-shape decode step that compiles
in one graph and does not recompile; its memory; its refusals."""
import random

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig

from conftest import TINY_ARCHS, make_tiny, make_tiny_llama
from faedkv import FAEDKVCache, FrequencyPlan, StaticFAEDKVCache
from faedkv.attention import FAEDKV_STATIC_SDPA, restore_sdpa
from faedkv.budget import kept_rows
from faedkv.decode.static import StaticFAEDKVLayer

VOCAB = 128


def generate(model, ids, cache, new_tokens, **kwargs):
    with torch.inference_mode():
        return model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=2, output_logits=True, return_dict_in_generate=True,
                              **kwargs)


def logits_gap(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.logits, b.logits))


def ring_order_window(layer) -> torch.Tensor:
    """A static layer's window keys, oldest first."""
    start = layer.sink_tokens + layer.num_slots
    return layer.stored_keys[:, :, start:].roll(-int(layer.head), dims=-2)


@pytest.mark.parametrize("arch,dtype,atol", [("llama", torch.float32, 1e-4), ("qwen2", torch.float32, 1e-4),
                                             ("qwen2", torch.bfloat16, 5e-2)], ids=["llama", "qwen2", "qwen2-bf16"])
def test_greedy_generation_gives_faedkv_caches_tokens_and_state(arch, dtype, atol):
    model = make_tiny(arch, dtype=dtype)
    tokens, ratio, sink, window = random.randint(60, 90), random.choice([0.6, 0.75]), 3, 6
    slots = kept_rows(tokens, ratio) - sink - window
    new = slots + window + random.randint(5, 15)          # the folds wrap the ring and the window turns over
    ids = torch.randint(0, VOCAB, (2, tokens))
    reference = FAEDKVCache(compression_ratio=ratio, sink_tokens=sink, window=window)
    expected = generate(model, ids, reference, new)
    restore_sdpa(model.config)
    cache = StaticFAEDKVCache(compression_ratio=ratio, sink_tokens=sink, window=window)
    got = generate(model, ids, cache, new)
    assert model.config._attn_implementation == FAEDKV_STATIC_SDPA
    assert torch.equal(got.sequences, expected.sequences)
    assert logits_gap(got, expected) <= atol
    for index, (faedkv, static) in enumerate(zip(reference.layers, cache.layers)):
        assert static.num_slots == slots and int(static.folded) == faedkv.folded == tokens + new - 1 - sink - window
        parts = [(faedkv.sink_keys, static.stored_keys[:, :, :sink]),
                 (faedkv.mean_keys, static.stored_keys[:, :, sink:sink + slots]),
                 (faedkv.mean_values, static.stored_values[:, :, sink:sink + slots]),
                 (faedkv.window_keys, ring_order_window(static))]
        for want, have in parts:
            # layer 0's keys depend on the tokens alone: the same folds give the same bits
            assert torch.equal(have, want) if index == 0 else torch.allclose(have, want, atol=atol)


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_generate_compiles_the_decode_step_in_one_graph_and_reuses_it(arch):
    """generate's own compiled path (on CPU only with transformers' switch for other devices;
    dynamo alone, fullgraph): one graph for every decode step, no recompile for a reset cache
    or a new one, FAEDKVCache's tokens."""
    model = make_tiny(arch)
    ids = torch.randint(0, VOCAB, (1, random.randint(50, 70)))
    expected = generate(model, ids, FAEDKVCache(compression_ratio=0.6, sink_tokens=2, window=5), 30)
    restore_sdpa(model.config)
    traced = CompileConfig(backend="eager", fullgraph=True, mode=None)
    traced._compile_all_devices = True
    cache = StaticFAEDKVCache(compression_ratio=0.6, sink_tokens=2, window=5)
    counters.clear()
    try:
        runs = [generate(model, ids, cache, 30, compile_config=traced)]
        assert model._compiled_call is not None
        with torch._dynamo.config.patch(error_on_recompile=True):
            cache.reset()
            runs.append(generate(model, ids, cache, 30, compile_config=traced))
            runs.append(generate(model, ids, StaticFAEDKVCache(compression_ratio=0.6, sink_tokens=2, window=5), 30,
                                 compile_config=traced))
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch.compiler.reset()
        del model._compiled_call
    for run in runs:
        assert torch.equal(run.sequences, expected.sequences) and logits_gap(run, expected) <= 1e-4


def test_the_compiled_step_decodes_like_the_eager_one_without_recompiling():
    """The one-token forward compiled by hand (aot_eager: functionalised, the buffers' in-place
    updates included) over more steps than W + M gives the eager step's logits."""
    model = make_tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 40))
    caches = [StaticFAEDKVCache(compression_ratio=0.5, sink_tokens=2, window=4) for _ in range(2)]

    def decode(cache, token, position):
        return model(input_ids=token, past_key_values=cache, cache_position=position,
                     position_ids=position.expand(token.shape[0], 1)).logits

    steps = 20                                           # W + M = 4 + 14
    with torch.no_grad():
        token = model(input_ids=ids, past_key_values=caches[0]).logits[:, -1:].argmax(-1)
        fed, eager = [], []
        for i in range(steps):
            fed.append(token)
            eager.append(decode(caches[0], token, torch.tensor([40 + i])))
            token = eager[-1][:, -1:].argmax(-1)
        model(input_ids=ids, past_key_values=caches[1])    # takes the model's attention over
        step = torch.compile(decode, fullgraph=True, backend="aot_eager")
        counters.clear()
        try:
            for i in range(steps):
                with torch._dynamo.config.patch(error_on_recompile=i > 0):
                    assert torch.allclose(step(caches[1], fed[i], torch.tensor([40 + i])), eager[i], atol=1e-5), i
            assert counters["stats"]["unique_graphs"] == 1
        finally:
            torch.compiler.reset()
    assert caches[1].layers[0].num_slots + 4 < steps
    assert int(caches[1].layers[0].folded) == int(caches[0].layers[0].folded) == 40 + steps - 2 - 4


def test_memory_and_stored_rows_are_faedkv_caches():
    model = make_tiny_llama()
    tokens = random.randint(100, 150)
    ids = torch.randint(0, VOCAB, (2, tokens + 10))
    caches = [FAEDKVCache(compression_ratio=0.75, sink_tokens=4, window=8),
              StaticFAEDKVCache(compression_ratio=0.75, sink_tokens=4, window=8)]
    with torch.no_grad():
        for cache in caches:
            model(input_ids=ids[:, :tokens], past_key_values=cache)
            for i in range(10):
                model(input_ids=ids[:, tokens + i:tokens + i + 1], past_key_values=cache)
    faedkv, static = caches
    rows = kept_rows(tokens, 0.75)
    assert static.stored_lengths() == faedkv.stored_lengths() == [rows] * 3
    assert int(static.get_seq_length()) == faedkv.get_seq_length() == tokens + 10
    assert static.get_mask_sizes(torch.tensor([tokens + 10]), 0) == (rows, 0)
    # the same S + M + W rows of keys and values, plus per layer the rows' bias and two counters
    assert static.memory_bytes() == faedkv.memory_bytes() + 3 * (rows * 4 + 2 * 8)


def test_a_reset_cache_reuses_its_buffers_for_as_many_prompt_tokens():
    model = make_tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 80))
    cache = StaticFAEDKVCache(compression_ratio=0.75, sink_tokens=2, window=4)
    first = generate(model, ids, cache, 12)
    addresses = [t.data_ptr() for t in cache.layers[0].persistent_tensors()]
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.stored_lengths() == [0] * 3
    again = generate(model, ids, cache, 12)
    assert [t.data_ptr() for t in cache.layers[0].persistent_tensors()] == addresses
    assert torch.equal(again.sequences, first.sequences)
    cache.reset()
    generate(model, ids[:, :60], cache, 2)                # another length: other shapes
    assert cache.stored_lengths() == [kept_rows(60, 0.75)] * 3


def test_other_caches_get_faedkv_attention_after_a_static_run():
    model = make_tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 70))
    expected = generate(model, ids, FAEDKVCache(compression_ratio=0.6, window=8), 20)
    restore_sdpa(model.config)
    generate(model, ids, StaticFAEDKVCache(compression_ratio=0.6, window=8), 3)
    assert model.config._attn_implementation == FAEDKV_STATIC_SDPA
    # faedkv_static_sdpa hands FAEDKVCache's keys (and their mass) to faedkv_sdpa
    assert torch.equal(generate(model, ids, FAEDKVCache(compression_ratio=0.6, window=8), 20).sequences,
                       expected.sequences)
    restore_sdpa(model.config)
    assert model.config._attn_implementation == "sdpa"


def test_bad_inputs_raise_value_errors():
    for ratio in (0, 1, -0.5):
        with pytest.raises(ValueError, match=r"compression_ratio must be in \(0, 1\)"):
            StaticFAEDKVCache(compression_ratio=ratio)
    for sink, window in ((4, 0), (-1, 8)):
        with pytest.raises(ValueError, match="sink_tokens >= 0 and window >= 1"):
            StaticFAEDKVCache(sink_tokens=sink, window=window)
    with pytest.raises(ValueError, match="takes no plan"):
        StaticFAEDKVCache(plan=FrequencyPlan(layers=[[0, 1]] * 3))

    model = make_tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 80))
    with pytest.raises(ValueError, match="needs a prefill of at least 24 tokens at compression_ratio=0.75, "
                                         r"sink_tokens=4, window=8 \(one ring mean and one window row\), got 23"):
        generate(model, ids[:, :23], StaticFAEDKVCache(compression_ratio=0.75, sink_tokens=4, window=8), 2)
    generate(model, ids[:, :24], StaticFAEDKVCache(compression_ratio=0.75, sink_tokens=4, window=8), 2)
    padding = torch.ones(2, 80, dtype=torch.long)
    padding[1, :3] = 0
    with pytest.raises(ValueError, match="unpadded batches only"):
        generate(model, ids, StaticFAEDKVCache(compression_ratio=0.75), 2, attention_mask=padding)

    cache = StaticFAEDKVCache(compression_ratio=0.75, window=8)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
        with pytest.raises(ValueError, match="decodes one token per call, got 2"):
            model(input_ids=ids[:, :2], past_key_values=cache)
        model(input_ids=ids, past_key_values=StaticFAEDKVCache(compression_ratio=0.75, window=8))
        with pytest.raises(ValueError, match="reads another StaticFAEDKVCache, prefilled after this one"):
            model(input_ids=ids[:, :1], past_key_values=cache)

    query = torch.zeros(1, 4, 30, 16)
    with pytest.raises(ValueError, match="full-attention layers only"):
        StaticFAEDKVLayer(0, 0.75, 4, 8).attend(model.model.layers[0].self_attn, query, query, query,
                                                sliding_window=8)
    restore_sdpa(model.config)
    model.config._attn_implementation = "eager"   # would attend the ring means without their mass
    with pytest.raises(ValueError, match="load the model with attn_implementation='sdpa'"):
        generate(model, ids, StaticFAEDKVCache(compression_ratio=0.75), 2)
