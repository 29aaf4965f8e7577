"""FAEDKV's dimension split (variant "dimsplit", FourierAttention arXiv 2506.11886): exact head
dims plus a low-pass reconstruction of the others at every middle token, at kvpress's bytes."""
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from analysis.api.params import MethodSpec
from conftest import MinusKeyNorm
from faedkv import FAEDKVPress, FrequencyPlan
from faedkv.budget import kept_rows
from faedkv.variants import compress_dimsplit, dimsplit_sizes, lowpass, lowpass_bins, lowpass_numbers
from tests.conftest import prefill

ROOT = Path(__file__).resolve().parent.parent
PLAIN = {"exact_share": 0.0, "window_share": 0.0}   # the split alone (the default adds KVzip's tokens, a wider window)


def _split(press, keys, values, layer=0, kwargs=None):
    return press.compress(SimpleNamespace(layer_idx=layer), None, keys, values, None, kwargs or {})


def test_exact_dims_are_bit_exact_copies_and_the_rest_is_low_passed():
    keys, values = torch.randn(2, 2, 400, 16), torch.randn(2, 2, 400, 16)
    press = FAEDKVPress(compression_ratio=0.5, variant="dimsplit", dim_share=0.6, window=16, **PLAIN)
    out_k, out_v = _split(press, keys, values)
    stats = press.last_stats[0]
    assert out_k.shape == keys.shape and stats["cache_len"] == 400 and stats["slots"] == 0
    start, end = stats["sink_tokens"], 400 - stats["window"]
    assert torch.equal(out_k[:, :, :start], keys[:, :, :start]) and torch.equal(out_v[:, :, end:], values[:, :, end:])
    for out, x, dims in ((out_k, keys, stats["key_exact_dims"]), (out_v, values, stats["value_exact_dims"])):
        dims = torch.tensor(dims)
        assert dims.shape == (2, 2, stats["exact_dims"][0]) and dims.shape[-1] > 0
        index = dims.unsqueeze(-2).expand(2, 2, end - start, dims.shape[-1])
        assert torch.equal(out[:, :, start:end].gather(-1, index), x[:, :, start:end].gather(-1, index))
        rest = torch.ones(2, 2, 16, dtype=torch.bool).scatter(-1, dims, False)
        changed = (out[:, :, start:end] != x[:, :, start:end]).any(-2)
        assert torch.equal(changed, rest)            # every other dim is reconstructed


def test_every_frequency_kept_reconstructs_the_middle():
    x = torch.randn(2, 3, random.randint(50, 200), 8, dtype=torch.float32)
    n = x.shape[-2]
    assert lowpass_numbers(n, lowpass_bins(n, n)) == n      # n real numbers: the whole spectrum
    assert torch.allclose(lowpass(x, n // 2 + 1), x, atol=1e-5)
    # rows >= N at dim_share 0: M = N numbers per dim
    out, dims, numbers = compress_dimsplit(x, n, 0.0)
    assert numbers == n and dims.shape[-1] == 0 and torch.allclose(out, x, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_equivalent_bytes_never_exceed_kvpress_budget(ratio):
    for tokens in (1, 2, 30, 81, 300, 1001):
        for share in (0.0, 0.3, 0.9):
            press = FAEDKVPress(compression_ratio=ratio, variant="dimsplit", dim_share=share, window=16, **PLAIN)
            for space_kwargs in ({},):
                keys = torch.randn(1, 2, tokens, 16)
                out_k, _ = _split(press, keys, keys.clone(), kwargs=space_kwargs)
                stats = press.last_stats[0]
                assert out_k.shape[2] == tokens
                assert stats["equivalent_rows"] <= kept_rows(tokens, ratio) + 1e-9, (tokens, share, stats)
                if stats["exact_dims"] is not None:
                    middle, d = stats["middle"], 16
                    for e, m in zip(stats["exact_dims"], stats["coefficients"]):
                        rows = kept_rows(tokens, ratio) - stats["sink_tokens"] - stats["window"]
                        assert middle * e + m * (d - e) <= rows * d
                        assert e == dimsplit_sizes(middle, rows, d, share)[0]


def test_dim_share_zero_is_a_plain_low_pass_at_every_position():
    keys, values = torch.randn(1, 2, 333, 16), torch.randn(1, 2, 333, 16)
    press = FAEDKVPress(compression_ratio=0.75, variant="dimsplit", dim_share=0.0, window=8, sink_tokens=4, **PLAIN)
    out_k, out_v = _split(press, keys, values)
    stats = press.last_stats[0]
    assert stats["exact_dims"] == [0, 0]
    middle = keys[:, :, 4:325]
    rows = kept_rows(333, 0.75) - 12                           # R = B - S - W
    bins = (rows + 1) // 2                                       # the lowest bins in R reals
    spectrum = torch.fft.rfft(middle, dim=-2)
    spectrum[..., bins:, :] = 0
    want = torch.fft.irfft(spectrum, n=321, dim=-2)
    assert stats["coefficients"] == [2 * bins - 1] * 2
    assert torch.allclose(out_k[:, :, 4:325], want, atol=1e-5)
    assert torch.equal(out_k[:, :, :4], keys[:, :, :4]) and torch.equal(out_k[:, :, 325:], keys[:, :, 325:])


def test_the_exact_dims_are_the_high_frequency_ones():
    tokens = 512
    t = torch.arange(tokens, dtype=torch.float32)
    x = torch.randn(1, 2, tokens, 16) * 0.1 + torch.sin(2 * torch.pi * t / 400)[:, None]  # slow everywhere
    planted = (5, 11)
    x[0, 0, :, planted[0]] += 3 * torch.cos(2.9 * t)                 # fast, in head 0
    x[0, 1, :, planted[1]] += 3 * torch.sign(torch.sin(2.5 * t))     # fast, in head 1
    press = FAEDKVPress(compression_ratio=0.5, variant="dimsplit", dim_share=0.3, window=16, **PLAIN)
    _split(press, x, x.clone())
    dims = press.last_stats[0]["key_exact_dims"][0]
    assert press.last_stats[0]["exact_dims"][0] == 2        # floor(0.3 * 236 * 16 / 492)
    assert planted[0] in dims[0] and planted[1] in dims[1]


def test_pre_rope_keys_split_rotate_half_pairs_and_copy_them():
    from analysis.harness.models import build_tiny_llama

    model = build_tiny_llama(seed=0, vocab_size=128, num_layers=2)
    ids = torch.randint(0, 128, (1, 200))
    full = prefill(model, ids)
    press = FAEDKVPress(compression_ratio=0.5, variant="dimsplit", key_space="pre_rope", window=8, **PLAIN)
    cache = prefill(model, ids, press)
    stats = press.last_stats[1]
    dims = torch.tensor(stats["key_exact_dims"])
    assert stats["exact_dims"][0] % 2 == 0 and cache.layers[1].keys.shape == full.layers[1].keys.shape
    assert set((dims[0, 0] % 8).tolist()) == set(dims[0, 0, : dims.shape[-1] // 2].tolist())  # pairs (i, i + 8)
    start, end = stats["sink_tokens"], 200 - stats["window"]
    index = dims.unsqueeze(-2).expand(1, 2, end - start, dims.shape[-1])
    assert torch.equal(cache.layers[1].keys[:, :, start:end].gather(-1, index),
                       full.layers[1].keys[:, :, start:end].gather(-1, index))


@pytest.mark.parametrize("ratio, share", [(0.5, 0.5), (0.75, 0.9), (0.625, 0.25)])
def test_hybrid_keeps_the_scorers_tokens_whole_and_splits_the_rest(ratio, share):
    seed = random.randrange(10**6)
    torch.manual_seed(seed)
    tokens, d = 400, 16
    keys, values = torch.randn(1, 2, tokens, d), torch.randn(1, 2, tokens, d)
    press = FAEDKVPress(compression_ratio=ratio, variant="dimsplit", dim_share=0.5, window=16,
                        exact_share=share, exact_scorer="knorm", window_share=0.0)
    press.scorer = MinusKeyNorm()
    out_k, out_v = _split(press, keys, values)
    stats, kept = press.last_stats[0], press.layout(tokens)
    start, end = kept.sink, tokens - kept.window
    assert kept.exact > 0 and stats["exact"] == kept.exact and out_k.shape == keys.shape, seed
    # the E middle tokens with the smallest key norm per head are bit-exact whole rows
    chosen = (-keys[:, :, start:end].norm(dim=-1)).topk(kept.exact, dim=-1).indices
    for out, x in ((out_k, keys), (out_v, values)):
        index = chosen.unsqueeze(-1).expand(*chosen.shape, d)
        assert torch.equal(out[:, :, start:end].gather(2, index), x[:, :, start:end].gather(2, index)), seed
    # the others: the split of the N - E remaining tokens, taken as one sequence in time order
    rest = torch.ones(1, 2, end - start, dtype=torch.bool).scatter(-1, chosen, False)
    x_rest = keys[:, :, start:end][rest].view(1, 2, -1, d)
    want, dims, numbers = compress_dimsplit(x_rest, kept.slots, 0.5)
    got = out_k[:, :, start:end][rest].view(1, 2, -1, d)
    assert torch.allclose(got, want, atol=1e-5), seed
    assert stats["key_exact_dims"] == dims.tolist() and stats["coefficients"][0] == numbers
    # bytes: S + W + E rows, plus (N - E) d_e + M (d - d_e) numbers, within kvpress's budget
    split = (end - start - kept.exact) * dims.shape[-1] + numbers * (d - dims.shape[-1])
    assert split <= kept.slots * d and stats["equivalent_rows"] <= kept_rows(tokens, ratio) + 1e-9, seed
    assert torch.equal(out_k[:, :, :start], keys[:, :, :start]) and torch.equal(out_v[:, :, end:], values[:, :, end:])
    assert x_rest.shape[-2] == end - start - kept.exact


@pytest.mark.parametrize("scorer, pool", [("keydiff", "head"), ("keydiff", "layer"), ("kvzip", "global")])
def test_hybrid_runs_in_a_model_through_the_registry(tiny_loaded, scorer, pool):
    from analysis.harness import methods
    from analysis.harness.generation import answer_details

    spec = MethodSpec(name="faedkv", compression_ratio=0.75, params={
        "variant": "dimsplit", "exact_share": 0.5, "exact_scorer": scorer, "exact_pool": pool, "window": 16})
    press = methods.build_press(spec, tiny_loaded.model)
    context = " ".join(random.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(300))
    a = answer_details(tiny_loaded, press, context, "Which word comes first?", max_new_tokens=3)
    assert a.cache_lengths == [a.prompt_tokens] * 3 and a.text
    stats = [press.last_stats[i] for i in range(3)]
    budget = kept_rows(a.prompt_tokens, 0.75)
    assert all(s["exact"] > 0 for s in stats)
    if pool == "global":
        assert sum(s["equivalent_rows"] for s in stats) <= 3 * budget + 1e-6
        press.last_stats[0]["equivalent_rows"] += 3 * budget        # a model over its budget is refused
        with pytest.raises(methods.CompressionError, match="over all layers"):
            methods.check_cache_lengths(press, tiny_loaded.model, a.prompt_tokens, a.cache_lengths)
    else:
        assert all(s["equivalent_rows"] <= budget + 1e-9 for s in stats)


def test_layer_pool_ranks_the_heads_together_and_keeps_the_layers_bytes():
    seed = random.randrange(10**6)
    torch.manual_seed(seed)
    tokens, d = 300, 16
    keys, values = torch.randn(1, 4, tokens, d), torch.randn(1, 4, tokens, d)
    keys[:, 0] *= 0.2                      # head 0's keys are small: knorm's top tokens gather there
    press = FAEDKVPress(compression_ratio=0.75, variant="dimsplit", window=16, exact_share=0.5,
                        exact_scorer="knorm", exact_pool="layer")
    press.scorer = MinusKeyNorm()
    out_k, out_v = _split(press, keys, values)
    stats, kept = press.last_stats[0], press.layout(tokens)
    start, end = kept.sink, tokens - kept.window
    scores = -keys[:, :, start:end].norm(dim=-1)
    top = scores.reshape(1, -1).topk(kept.exact * 4, dim=-1).indices
    chosen = torch.zeros(1, 4 * (end - start), dtype=torch.bool).scatter(-1, top, True).view(1, 4, -1)
    per_head = chosen.sum(-1)[0]
    assert per_head[0] > kept.exact > per_head[1:].min() and per_head.sum() == kept.exact * 4, seed
    assert torch.equal(out_k[:, :, start:end][chosen], keys[:, :, start:end][chosen]), seed
    assert torch.equal(out_v[:, :, start:end][chosen], values[:, :, start:end][chosen]), seed
    for h in range(4):   # each head's split has the same R rows for its other tokens
        rest = keys[0, h, start:end][~chosen[0, h]]
        want = compress_dimsplit(rest, kept.slots, 0.5)[0]
        assert torch.allclose(out_k[0, h, start:end][~chosen[0, h]], want, atol=1e-5), (seed, h)
    assert stats["exact"] == kept.exact and stats["equivalent_rows"] <= kept_rows(tokens, 0.75) + 1e-9, seed


def test_global_pool_ranks_every_layer_and_keeps_the_models_bytes():
    from analysis.harness.models import build_tiny_llama

    seed = random.randrange(10**6)
    torch.manual_seed(seed)
    model = build_tiny_llama(seed=0, vocab_size=128, num_layers=3)
    ids = torch.randint(0, 128, (1, 240))
    full = prefill(model, ids)
    cache = prefill(model, ids)
    layers, heads = 3, full.layers[0].keys.shape[1]
    scores = torch.rand(layers, 1, heads, 240)
    scores[1] += 1                                     # layer 1 scores highest: it gets most exact tokens
    press = FAEDKVPress(compression_ratio=0.75, variant="dimsplit", window=16, exact_share=0.5,
                        exact_scorer="kvzip", exact_pool="global")
    press.post_init_from_model(model)
    press.compress_scored(model, cache, scores)
    kept = press.layout(240)
    exact = [press.last_stats[i]["exact"] for i in range(layers)]
    assert exact[1] > kept.exact > min(exact[0], exact[2]), (seed, exact)
    assert abs(sum(exact) - kept.exact * layers) < 1e-9, seed
    stored = sum(press.last_stats[i]["equivalent_rows"] for i in range(layers))
    assert stored <= kept_rows(240, 0.75) * layers + 1e-6, seed
    assert press.last_stats[1]["equivalent_rows"] > kept_rows(240, 0.75)   # one layer above its share
    start, end = kept.sink, 240 - kept.window
    mid = scores[..., start:end].transpose(0, 1).reshape(1, -1)
    top = mid.topk(kept.exact * heads * layers, dim=-1).indices
    chosen = torch.zeros_like(mid, dtype=torch.bool).scatter(-1, top, True).view(1, layers, heads, -1)
    for layer in range(layers):
        mask = chosen[:, layer]
        got = cache.layers[layer].keys[:, :, start:end]
        assert got.shape[2] == end - start
        assert torch.equal(got[mask], full.layers[layer].keys[:, :, start:end][mask]), (seed, layer)


@pytest.mark.parametrize("kwargs, needle", [
    ({"variant": "iwdft", "exact_share": 0.5, "exact_pool": "global", "exact_scorer": "kvzip"},
     "only the dimension split can store"),
    ({"variant": "iwdft", "exact_share": 0.5, "exact_pool": "layer", "slot_fit": "probes"},
     "plan=None and slot_fit='mean'"),
    ({"exact_pool": "layer", "exact_share": 0.0}, "exact_share > 0"),
    ({"exact_share": 0.5, "exact_pool": "global", "exact_scorer": "keydiff"}, "use exact_scorer='kvzip'"),
    ({"exact_share": 0.5, "exact_pool": "everywhere"}, "exact_pool must be one of head, layer, global"),
])
def test_bad_exact_pools(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        FAEDKVPress(compression_ratio=0.5, **{"variant": "dimsplit", **kwargs})
    params = {"variant": "dimsplit", **{k: v for k, v in kwargs.items() if k != "exact_pool" or v != "everywhere"}}
    if "exact_pool" in params:
        with pytest.raises(ValueError, match="params.exact_pool"):
            MethodSpec(name="faedkv", compression_ratio=0.5, params=params)


def test_it_adds_no_mass_bias_and_leaves_an_eager_model_alone(tiny_lm):
    from faedkv.attention import BIAS_ATTR

    ids = torch.randint(0, 128, (1, 150))
    prefill(tiny_lm, ids, FAEDKVPress(variant="iwdft", compression_ratio=0.5, window=8))        # iwdft records a bias
    press = FAEDKVPress(compression_ratio=0.5, variant="dimsplit", window=8, **PLAIN)
    cache = prefill(tiny_lm, ids, press)
    assert all(getattr(layer.self_attn, BIAS_ATTR, None) is None for layer in tiny_lm.model.layers)
    assert [cache.get_seq_length(i) for i in range(len(cache))] == [150] * 3
    tiny_lm.config._attn_implementation = "eager"
    prefill(tiny_lm, ids, FAEDKVPress(compression_ratio=0.5, variant="dimsplit", window=8, **PLAIN))


@pytest.mark.parametrize("kwargs, needle", [
    ({"dim_share": 1.0}, "dim_share must be in \\[0, 1\\)"),
    ({"dim_share": -0.1}, "dim_share must be in \\[0, 1\\)"),
    ({"dim_share": 0.3, "variant": "iwdft"}, "use variant='dimsplit' or leave dim_share out"),
    ({"plan": FrequencyPlan.low_pass(0.5, 3)}, "use plan=None with dimsplit"),
    ({"exact_share": 0.25, "key_space": "pre_rope"}, "use key_space='post_rope'"),
])
def test_bad_press_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        FAEDKVPress(compression_ratio=0.5, **{"variant": "dimsplit", **kwargs})


@pytest.mark.parametrize("params, needle", [
    ({"variant": "iwdft", "dim_share": 0.3}, "set variant to 'dimsplit' or drop dim_share"),
    ({"dim_share": 0.3}, "set variant to 'dimsplit' or drop dim_share"),
    ({"variant": "dimsplit", "dim_share": 1.0}, "must be in \\[0, 0.999\\]"),
    ({"variant": "dimsplit", "plan": {"chunks": 4, "layers": [[0]]}}, "drop the plan"),
])
def test_bad_method_specs(params, needle):
    with pytest.raises(ValueError, match=needle):
        MethodSpec(name="faedkv", compression_ratio=0.5, params=params)
    with pytest.raises(ValueError, match="no parameter 'dim_share'"):
        MethodSpec(name="dct_iterative", compression_ratio=0.5, params={"dim_share": 0.5})


def test_the_registry_checks_equivalent_bytes_not_rows(tiny_loaded):
    from analysis.harness import methods
    from analysis.harness.generation import answer_details, cache_report

    spec = MethodSpec(name="faedkv", compression_ratio=0.75, params={"variant": "dimsplit", "dim_share": 0.5,
                                                                     "window": 16})
    press = methods.build_press(spec, tiny_loaded.model)
    context = " ".join(random.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(300))
    a = answer_details(tiny_loaded, press, context, "Which word comes first?", max_new_tokens=3)
    assert a.cache_lengths == a.expected_cache_lengths == [a.prompt_tokens] * 3 and a.text
    report = cache_report(press, 0.75, a.prompt_tokens, a.cache_lengths, 16, 2, 4)
    budget = kept_rows(a.prompt_tokens, 0.75)
    assert report["virtual"] and report["rows"] == a.prompt_tokens and report["compressed"]
    assert budget - 2 < report["kept_tokens"] <= budget == report["budget_tokens"]
    assert report["kv_bytes"] == round(report["kept_tokens"] * 3 * 2 * 2 * 16 * 4)
    assert report["layers"][0]["exact_dims"] and report["layers"][0]["coefficients"]
    # a press that stored more than the budget is refused, naming the bytes
    press.last_stats[1]["equivalent_rows"] = budget + 1
    with pytest.raises(methods.CompressionError, match="checked by the bytes it stores: layers \\[1\\]"):
        methods.check_cache_lengths(press, tiny_loaded.model, a.prompt_tokens, a.cache_lengths)
    # per-layer ratios: T rows in every layer, each within its own budget
    spec = MethodSpec(name="faedkv", compression_ratio=0.5, params={
        "variant": "dimsplit", "window": 16, "layer_ratios": [0.3, 0.5, 0.7]})
    wrapped = methods.build_press(spec, tiny_loaded.model)
    a = answer_details(tiny_loaded, wrapped, context, "Which word?", max_new_tokens=2)
    assert a.cache_lengths == [a.prompt_tokens] * 3
    assert methods.equivalent_budgets(wrapped, tiny_loaded.model, a.prompt_tokens) == [
        kept_rows(a.prompt_tokens, r) for r in (0.3, 0.5, 0.7)]


def test_kvpress_pipeline_answers_with_dimsplit(tiny_loaded):
    from transformers import pipeline

    pipe = pipeline("kv-press-text-generation", model=tiny_loaded.model, tokenizer=tiny_loaded.tokenizer)
    context = " ".join(random.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(300))
    press = FAEDKVPress(compression_ratio=0.5, variant="dimsplit", dim_share=0.3, window=16, **PLAIN)
    result = pipe(context, question="Which word comes first?", press=press, max_new_tokens=4)
    assert isinstance(result["answer"], str) and result["answer"]
    assert press.last_stats[0]["equivalent_rows"] < press.last_stats[0]["tokens"]


def test_contribution_profiles_refuse_dimsplit():
    from analysis.api.params import ContribParams
    from analysis.tasks.contrib import KIND

    params = ContribParams(methods=[MethodSpec(name="faedkv", compression_ratio=0.5,
                                               params={"variant": "dimsplit"})], context_length=128)
    with pytest.raises(ValueError, match="no contribution profile: which head dims stay exact"):
        KIND.check(params, None)


def test_ppl_command_runs_dimsplit(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-m", "analysis", "ppl", "--model", "tiny-random-llama",
                        "--methods", "faedkv:variant=dimsplit:dim_share=0.5:window=8", "--ratios", "0.5",
                        "--prefix-tokens", "128", "--continuation-tokens", "8", "--num-texts", "1",
                        "--out", str(tmp_path), "--no-progress"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "faedkv-dimsplit[window=8]@0.5" in r.stdout


@pytest.fixture(scope="module")
def tiny_loaded():
    from analysis.harness.models import load_model

    return load_model("tiny-random-llama", dtype="float32")
