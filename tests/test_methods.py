"""Method registry: every method builds, really compresses to its budget, and says what it needs,
on the tiny random Llama and the tiny random Qwen2 (q/k/v biases) alike."""
import dataclasses

import pytest
import torch
from kvpress import KnormPress, ObservedAttentionPress, SnapKVPress

from analysis.harness import methods
from faedkv.kvzip import TemplateAwareKVzip, template_head_ids
from analysis.api.params import METHODS, MethodSpec
from analysis.harness.generation import answer_details, prompt_ids
from analysis.harness.models import load_model
from analysis.tasks import needle

COMPRESSING = [m for m in METHODS if m != "full"]
# KVzip masks its evicted pairs instead of removing rows (analysis.harness.methods docstring).
MASKING = {"kvzip"}


@pytest.fixture(scope="module", params=["tiny-random-llama", "tiny-random-qwen2"])
def tiny(request):
    return load_model(request.param, dtype="float32")


@pytest.fixture(scope="module")
def sample(tiny):
    return needle.make_sample(tiny.tokenizer, "sentence", 320, 50, seed=1)


def test_registry_is_exactly_the_params_method_list():
    from analysis.api.params import EVICTION, LINEAR, PLANNED

    assert tuple(methods.REGISTRY) == METHODS
    assert PLANNED == {name for name, e in methods.REGISTRY.items() if "plan" in e.defaults}
    assert LINEAR <= set(METHODS) and EVICTION <= set(METHODS) and not LINEAR & EVICTION


@pytest.mark.parametrize("name", COMPRESSING)
def test_every_method_really_compresses_to_its_budget(tiny, sample, name):
    spec = MethodSpec(name=name, compression_ratio=0.5)
    press = methods.build_press(spec, tiny.model)
    a = answer_details(tiny, press, sample.context, sample.question, 3, "query_agnostic",
                       sample.answer_prefix)
    assert len(a.cache_lengths) == tiny.info.num_layers
    assert a.cache_lengths == a.expected_cache_lengths
    kept = a.cache_lengths
    if name in MASKING:
        assert a.cache_lengths == [a.prompt_tokens] * tiny.info.num_layers
        masked = methods.masked_pairs(tiny.model)
        kept = [a.prompt_tokens - m / tiny.info.num_kv_heads for m in masked]
    assert all(n < a.prompt_tokens for n in kept)
    # The same total budget for everyone (pyramidkv and kvzip spread it unevenly over layers).
    assert abs(sum(kept) / len(kept) - a.prompt_tokens / 2) <= 4
    # Not left on eager after H2O (faedkv's mass correction switches to its own sdpa and stays).
    assert tiny.model.config._attn_implementation in ("sdpa", "faedkv_sdpa")


def test_full_keeps_everything(tiny, sample):
    assert methods.build_press(MethodSpec(name="full"), tiny.model) is None
    a = answer_details(tiny, None, sample.context, sample.question, 2, "query_agnostic")
    assert a.cache_lengths == [a.prompt_tokens] * tiny.info.num_layers


def test_h2o_needs_eager_and_gets_it_only_for_the_call(tiny):
    assert methods.method_requirements(MethodSpec(name="h2o")) == {"attn_implementation": "eager"}
    assert methods.method_requirements(MethodSpec(name="snapkv")) == {"attn_implementation": None}
    press = ObservedAttentionPress(compression_ratio=0.5)
    ids = torch.arange(10, 110).unsqueeze(0)
    from transformers import DynamicCache

    before = tiny.model.config._attn_implementation      # sdpa, or faedkv's sdpa after faedkv ran
    # Without the switch, sdpa returns no attention weights and the press cannot score.
    with pytest.raises(AssertionError, match="eager"), torch.no_grad(), press(tiny.model):
        tiny.model.model(input_ids=ids, past_key_values=DynamicCache())
    seen = []
    with methods.attention_for(press, tiny.model):
        seen.append(tiny.model.config._attn_implementation)
        cache = DynamicCache()
        with torch.no_grad(), press(tiny.model):
            tiny.model.model(input_ids=ids, past_key_values=cache)
    assert seen == ["eager"] and tiny.model.config._attn_implementation == before != "eager"
    assert cache.get_seq_length(0) == 50


def test_a_press_that_silently_does_not_compress_is_an_error(tiny, sample):
    @dataclasses.dataclass
    class Lazy(SnapKVPress):
        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            return keys, values

    with pytest.raises(methods.CompressionError, match="did not apply its budget"):
        answer_details(tiny, Lazy(compression_ratio=0.5), sample.context, sample.question, 2)


def test_query_aware_puts_the_question_inside_the_compressed_prefill(tiny, sample):
    seen = {}

    @dataclasses.dataclass
    class Recording(KnormPress):
        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            if module.layer_idx == 0:
                seen["tokens"] = keys.shape[2]
            return super().compress(module, hidden_states, keys, values, attentions, kwargs)

    q = sample.question
    agnostic = prompt_ids(tiny, sample.context, q, "query_agnostic")["context_ids"][0]
    aware = prompt_ids(tiny, sample.context, q, "query_aware")["context_ids"][0]
    assert q not in tiny.tokenizer.decode(agnostic)
    assert tiny.tokenizer.decode(aware).rstrip().endswith(q)
    a = answer_details(tiny, Recording(compression_ratio=0.5), sample.context, q, 2, "query_aware")
    assert seen["tokens"] == a.prompt_tokens == len(aware)
    b = answer_details(tiny, Recording(compression_ratio=0.5), sample.context, q, 2, "query_agnostic")
    assert seen["tokens"] == b.prompt_tokens == len(agnostic) < len(aware)


def test_unknown_params_and_full_with_a_ratio_are_errors(tiny):
    with pytest.raises(ValueError, match="window_size, kernel_size"):
        methods.build_press(MethodSpec(name="snapkv", compression_ratio=0.5, params={"w": 3}),
                            tiny.model)
    with pytest.raises(ValueError, match="compression_ratio must be 0"):
        methods.build_press(MethodSpec(name="full", compression_ratio=0.5), tiny.model)


def test_params_reach_the_press_and_labels_tell_specs_apart(tiny):
    spec = MethodSpec(name="snapkv", compression_ratio=0.5, params={"window_size": 16})
    assert methods.build_press(spec, tiny.model).window_size == 16
    press = methods.build_press(MethodSpec(name="dct_iterative", compression_ratio=0.5), tiny.model)
    assert press.variant == "dct-iterative"
    labels = {methods.method_label(s) for s in [
        MethodSpec(name="faedkv", compression_ratio=0.5),
        MethodSpec(name="faedkv", compression_ratio=0.5, params={"variant": "resample"}),
        MethodSpec(name="faedkv", compression_ratio=0.5, params={"sink_tokens": 8}),
        MethodSpec(name="faedkv", compression_ratio=0.5, params={"key_space": "pre_rope"}),
        MethodSpec(name="faedkv", compression_ratio=0.75)]}
    assert len(labels) == 5
    assert methods.method_label(MethodSpec(name="faedkv", compression_ratio=0.5,
                                           params={"sink_tokens": 4})) == "faedkv-iwdft@0.5"


def test_a_stored_faedkv_run_never_reads_the_press_defaults(tiny, monkeypatch):
    """Runs store the params as given; the registry's defaults fill in the rest, every field
    that changes what FAEDKVPress computes among them, so changing the press's own defaults
    (a new shipped default) leaves the meaning of every stored `faedkv` run as it is."""
    from faedkv import FAEDKVPress

    bookkeeping = {"compression_ratio", "record_errors", "fused", "last_stats"}
    computing = {f.name for f in dataclasses.fields(FAEDKVPress)} - bookkeeping
    assert computing <= set(methods.REGISTRY["faedkv"].defaults), computing - set(methods.REGISTRY["faedkv"].defaults)
    import faedkv

    built = methods.build_press(MethodSpec(name="faedkv", compression_ratio=0.5), tiny.model)

    @dataclasses.dataclass
    class MovedDefaults(FAEDKVPress):      # the press's defaults move; the built press must not
        variant: str = "dimsplit"
        window: int = 512
        exact_share: float = 0.9
        exact_scorer: str = "kvzip"
        exact_pool: str = "global"

    monkeypatch.setattr(faedkv, "FAEDKVPress", MovedDefaults)
    again = methods.build_press(MethodSpec(name="faedkv", compression_ratio=0.5), tiny.model)
    assert isinstance(again, MovedDefaults)
    assert {n: getattr(again, n) for n in computing} == {n: getattr(built, n) for n in computing}
    assert (again.variant, again.window, again.exact_share) == ("iwdft", 64, 0.0)


def test_question_fed_token_by_token_equals_one_pass(tiny, sample):
    """The path used for uneven (PyramidKV) caches computes what one causal pass computes."""
    from transformers import DynamicCache

    from analysis.harness.generation import feed_one_by_one

    ids = torch.tensor([needle.haystack.encode(tiny.tokenizer, sample.context)[:200]])
    q = torch.tensor([needle.haystack.encode(tiny.tokenizer, sample.question)])
    logits = []
    for one_by_one in (False, True):
        cache = DynamicCache()
        with torch.no_grad():
            with SnapKVPress(compression_ratio=0.5)(tiny.model):
                tiny.model.model(input_ids=ids, past_key_values=cache)
            pos = 200
            if one_by_one:
                feed_one_by_one(tiny.model, q[:, :-1], cache, pos)
                out = tiny.model(input_ids=q[:, -1:], past_key_values=cache,
                                 position_ids=torch.tensor([[pos + q.shape[1] - 1]]))
            else:
                out = tiny.model(input_ids=q, past_key_values=cache,
                                 position_ids=torch.arange(pos, pos + q.shape[1])[None])
        logits.append(out.logits[0, -1])
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)


NEW_BASELINES = ["kvzip", "keydiff", "lagkv", "compactor", "merging"]


@pytest.mark.parametrize("name", NEW_BASELINES)
def test_new_baselines_compress_the_perplexity_prefix(tiny, name):
    """The ppl path (raw text, no chat template): budget checked, and the compressed cache
    changes the continuation's NLL (KVzip's masks are applied while it is read)."""
    from analysis.tasks.ppl import continuation_token_nll

    ids = needle.haystack.text_tokens(tiny.tokenizer, 300, 7)
    prefix, cont = ids[:280], ids[280:]
    full, full_lengths = continuation_token_nll(tiny, None, prefix, cont)
    press = methods.build_press(MethodSpec(name=name, compression_ratio=0.5), tiny.model)
    nll, lengths = continuation_token_nll(tiny, press, prefix, cont)
    assert lengths == methods.expected_cache_lengths(press, tiny.model, 279)
    assert torch.isfinite(nll).all() and nll.shape == full.shape
    assert not torch.allclose(nll, full, atol=1e-4)
    if name in MASKING:
        assert lengths == full_lengths and sum(methods.masked_pairs(tiny.model)) > 0


def test_kvzip_scores_every_token_of_a_raw_text_and_skips_the_template_head(tiny, sample):
    """kvpress's KVzip skips the chat template's head; a raw text has none to skip."""
    KVzip = TemplateAwareKVzip
    seen = []

    @dataclasses.dataclass
    class Recording(KVzip):
        def _perform_kvzip_compression(self, model, tokenizer):
            super()._perform_kvzip_compression(model, tokenizer)
            seen.append(self.start_idx - self.context_length)  # reset after the call; 0 at end

        def prepare(self, model, tokenizer, prev_postfix_size=8):
            seen.append(self.prefix_length)
            return super().prepare(model, tokenizer, prev_postfix_size)

    head = template_head_ids(tiny.tokenizer)
    templated = prompt_ids(tiny, sample.context, sample.question, "query_agnostic")["context_ids"][0]
    assert len(head) > 1 and templated[:len(head) - 1].tolist() == head[:-1]
    answer_details(tiny, Recording(compression_ratio=0.5), sample.context, sample.question, 2)
    from analysis.tasks.ppl import prefill

    ids = torch.tensor([needle.haystack.text_tokens(tiny.tokenizer, 200, 3)])
    prefill(tiny, Recording(compression_ratio=0.5), ids)
    assert seen == [len(head), 0, 0, 0]


def test_faedkv_hybrid_keeps_kvzips_top_tokens_exact_and_summarises_the_rest(tiny):
    """exact_scorer='kvzip': the E exact middle tokens per head are those KVzip scores highest."""
    from transformers import DynamicCache

    from analysis.tasks.ppl import prefill
    from faedkv.kvzip import KVzipScores

    ids = torch.tensor([needle.haystack.text_tokens(tiny.tokenizer, 300, 4)])
    tokens = ids.shape[1]
    captured = {}

    @dataclasses.dataclass
    class Capture(KVzipScores):
        def compress_post(self, model):
            captured["scores"] = self.score_val.clone()

    full, _ = prefill(tiny, None, ids)
    with torch.inference_mode(), Capture(compression_ratio=0.5)(tiny.model):
        tiny.model.model(input_ids=ids, past_key_values=DynamicCache())
    spec = MethodSpec(name="faedkv", compression_ratio=0.5,
                      params={"exact_share": 0.5, "exact_scorer": "kvzip", "window": 16})
    press = methods.build_press(spec, tiny.model)
    cache, lengths = prefill(tiny, press, ids)
    kept = press.layout(tokens)
    assert kept.exact > 0 and kept.slots > 0 and lengths == [kept.rows] * len(lengths)
    sink, end = kept.sink, tokens - kept.window
    for layer, (compressed, original) in enumerate(zip(cache.layers, full.layers)):
        middle = original.keys[:, :, sink:end]
        chosen = captured["scores"][layer][..., sink:end].float().topk(kept.exact, dim=-1).indices
        chosen = chosen.sort(dim=-1).values.unsqueeze(-1).expand(-1, -1, -1, middle.shape[-1])
        assert torch.equal(compressed.keys[:, :, sink:sink + kept.exact], middle.gather(2, chosen))
        assert torch.equal(compressed.values[:, :, -kept.window:], original.values[:, :, end:])
    assert press.last_stats[0]["exact"] == kept.exact and not press.layer_scores
    with pytest.raises(ValueError, match="slot_fit='probes'"):
        methods.build_press(MethodSpec(name="faedkv", compression_ratio=0.5, params={
            "exact_share": 0.5, "exact_scorer": "kvzip", "slot_fit": "probes"}), tiny.model)


def test_kvzip_that_masks_nothing_is_an_error(tiny, sample):
    @dataclasses.dataclass
    class Lazy(TemplateAwareKVzip):
        def compress_post(self, model):
            return None

    with pytest.raises(methods.CompressionError, match="did not apply its budget"):
        answer_details(tiny, Lazy(compression_ratio=0.5), sample.context, sample.question, 2)


def test_kvzip_needs_a_tokenizer_folder_in_the_config():
    from conftest import make_tiny_llama

    with pytest.raises(ValueError, match="name_or_path"):
        methods.build_press(MethodSpec(name="kvzip", compression_ratio=0.5), make_tiny_llama())


def test_faedkv_ranked_by_kvzip_needs_a_tokenizer_folder_in_the_config():
    from conftest import make_tiny_llama

    spec = MethodSpec(name="faedkv", compression_ratio=0.5, params={"exact_share": 0.5, "exact_scorer": "kvzip"})
    with pytest.raises(ValueError, match="exact_scorer='kvzip' loads the model's tokenizer.*name_or_path"):
        methods.build_press(spec, make_tiny_llama())
    methods.build_press(MethodSpec(name="faedkv", compression_ratio=0.5, params={"exact_share": 0.5}),
                        make_tiny_llama())     # other scorers need no tokenizer


def test_the_kvzip_baseline_refuses_a_batch_with_a_clear_error(tiny):
    """kvpress's KVzip masking takes one sequence (on a batch its passes fail with a bare size
    mismatch, and its budget would be counted over the batch): say so before the passes run."""
    from transformers import DynamicCache

    press = methods.build_press(MethodSpec(name="kvzip", compression_ratio=0.5), tiny.model)
    ids = torch.tensor([needle.haystack.text_tokens(tiny.tokenizer, 200, 2)] * 2)
    with pytest.raises(ValueError, match="take one sequence, got a batch of 2"):
        with torch.inference_mode(), press(tiny.model):
            tiny.model.model(input_ids=ids, past_key_values=DynamicCache())


@pytest.mark.parametrize("params", [{}, {"variant": "iwdft", "exact_share": 0.5, "exact_scorer": "kvzip"}],
                         ids=["default", "iwdft-hybrid"])
def test_faedkv_ranked_by_kvzip_compresses_a_batch_as_each_sequence_alone(tiny, params):
    """FAEDKV's default (and any FAEDKV ranked by KVzip) takes a batch, as kvpress's other presses do:
    each row gets its own reconstruction prompt and its own budget."""
    import faedkv
    from transformers import DynamicCache

    rows = [needle.haystack.text_tokens(tiny.tokenizer, 200, seed) for seed in (2, 7)]
    tokens = min(map(len, rows))
    ids = torch.tensor([r[:tokens] for r in rows])

    def compressed(batch):
        press = faedkv.FAEDKVPress(compression_ratio=0.5, window=16, **params)
        cache = DynamicCache()
        with torch.inference_mode(), press(tiny.model):
            tiny.model.model(input_ids=batch, past_key_values=cache)
        return cache

    together = compressed(ids)
    for row in range(2):
        alone = compressed(ids[row:row + 1])
        for a, b in zip(together.layers, alone.layers):
            torch.testing.assert_close(a.keys[row:row + 1], b.keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a.values[row:row + 1], b.values, rtol=1e-4, atol=1e-5)
    assert not torch.equal(together.layers[0].keys[0], together.layers[0].keys[1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block", [None, 10**6], ids=["blocks", "one-block"])
def test_kvzip_scores_in_query_blocks_equal_kvpress_scores(dtype, block, monkeypatch):
    """KVzipScores scores blocks of reconstruction queries with a running maximum on a CPU (which
    holds each layer's whole attention tensor slowly; other devices take kvpress's path): the scores
    are kvpress's, bit for bit, over several chunks (kvpress's own chunking) and blocks, or one block
    larger than a chunk, for a batch."""
    from kvpress import KVzipPress
    from transformers import DynamicCache

    import faedkv.kvzip
    from analysis.harness.models import load_model
    from faedkv.kvzip import KVzipScores

    if block:
        monkeypatch.setattr(faedkv.kvzip, "QUERY_BLOCK", block)
    QUERY_BLOCK = faedkv.kvzip.QUERY_BLOCK
    model = load_model("tiny-random-qwen2", dtype=dtype)
    ids = torch.tensor([needle.haystack.text_tokens(model.tokenizer, 700, seed) for seed in (3, 4)])
    assert 300 > QUERY_BLOCK or block        # every chunk's queries span more than one block
    got = {}

    @dataclasses.dataclass
    class Blocked(KVzipScores):
        def compress_post(self, model):
            got[type(self).__name__] = self.score_val.clone()

    @dataclasses.dataclass
    class Whole(Blocked):
        def score_kvzip(self, *args, **kwargs):
            return KVzipPress.score_kvzip(self, *args, **kwargs)

    for scorer in (Blocked, Whole):
        with torch.inference_mode(), scorer(compression_ratio=0.5, chunk_size=300)(model.model):
            model.model.model(input_ids=ids, past_key_values=DynamicCache())
    assert got["Blocked"].shape == (3, 2, 2, 700) and got["Blocked"].abs().sum() > 0
    assert torch.equal(got["Blocked"], got["Whole"])


def test_the_default_press_on_a_model_without_a_tokenizer_is_refused_before_the_prefill():
    """KVzip's reconstruction prompt needs the tokenizer at model.config.name_or_path; a model built
    from a config has none: a clear error naming the fixes, before any forward pass."""
    import faedkv
    from conftest import make_tiny_llama
    from transformers import DynamicCache

    model = make_tiny_llama()
    calls = []
    hook = model.model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=r"(?s)tokenizer.*name_or_path \(''\).*save_pretrained.*exact_scorer"):
        with torch.inference_mode(), faedkv.FAEDKVPress(compression_ratio=0.5)(model):
            model.model(input_ids=torch.zeros(1, 64, dtype=torch.long), past_key_values=DynamicCache())
    hook.remove()
    assert not calls
    # inside a wrapper's hooks there are no KVzip scores: refused with what to use instead
    with pytest.raises(ValueError, match="inside another press's hooks"):
        faedkv.FAEDKVPress(compression_ratio=0.5).as_scorer()


def test_compactor_is_seeded_and_leaves_the_global_rng_alone(tiny):
    from analysis.tasks.ppl import prefill

    ids = torch.tensor([needle.haystack.text_tokens(tiny.tokenizer, 200, 5)])
    caches = []
    for seed in (3, 3):
        press = methods.build_press(MethodSpec(name="compactor", compression_ratio=0.5,
                                               params={"seed": seed}), tiny.model)
        state = torch.get_rng_state()
        cache, _ = prefill(tiny, press, ids)
        assert torch.equal(state, torch.get_rng_state())
        caches.append(cache.layers[1].keys)
    assert torch.equal(caches[0], caches[1])


def test_merging_keeps_snapkvs_keys_and_folds_evicted_values_in(tiny):
    from analysis.tasks.ppl import prefill

    ids = torch.tensor([needle.haystack.text_tokens(tiny.tokenizer, 200, 9)])
    params = {"window_size": 16}
    snap, _ = prefill(tiny, methods.build_press(
        MethodSpec(name="snapkv", compression_ratio=0.5, params=params), tiny.model), ids)
    merged, _ = prefill(tiny, methods.build_press(
        MethodSpec(name="merging", compression_ratio=0.5, params=params), tiny.model), ids)
    for a, b in zip(snap.layers, merged.layers):
        assert torch.equal(a.keys, b.keys)
        assert not torch.allclose(a.values, b.values)


@pytest.mark.embedded
@pytest.mark.parametrize("name", NEW_BASELINES)
def test_new_baselines_compress_the_embedded_smollm2_to_their_budget(embedded, name):
    """On the real SmolLM2 (bf16): the kvpress pipeline answers and the budget check passes."""
    sample = needle.make_sample(embedded.tokenizer, "passkey", 400, 50, seed=2)
    press = methods.build_press(MethodSpec(name=name, compression_ratio=0.5), embedded.model)
    a = answer_details(embedded, press, sample.context, sample.question, 8, "query_agnostic",
                       sample.answer_prefix)
    assert a.cache_lengths == a.expected_cache_lengths and a.text
    if name in MASKING:
        heads = embedded.info.num_kv_heads
        kept = sum(a.prompt_tokens - m / heads for m in methods.masked_pairs(embedded.model))
        assert abs(kept / embedded.info.num_layers - a.prompt_tokens / 2) <= 1
    else:
        assert len(set(a.cache_lengths)) == 1 and abs(a.cache_lengths[0] - a.prompt_tokens / 2) <= 1
