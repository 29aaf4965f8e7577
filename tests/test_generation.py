"""analysis.harness.generation's report of the cache actually kept (what the frequency lab shows)."""
import pytest

from analysis.api.params import GenerateParams, MethodSpec, TaskPrompt


@pytest.fixture(scope="module")
def tiny():
    from analysis.harness.models import load_model

    return load_model("tiny-random-llama", device="cpu", dtype="float32")


def _generate(tiny, prompt, ratio=0.5, **params):
    from analysis.tasks.generate import generate

    method = MethodSpec(name="faedkv", compression_ratio=ratio, params=params)
    return generate(tiny, GenerateParams(prompt=prompt, method=method, max_new_tokens=2,
                                         compare_full=False))


def _consistent(result):
    """The report says what the cache holds: kept = mean cache length, compressed iff every
    layer is shorter than the prompt, and each layer's recorded layout adds up to its length."""
    cache, lengths = result["cache"], result["cache_lengths"]
    assert cache["prompt_tokens"] == result["prompt_tokens"]
    assert cache["kept_tokens"] == pytest.approx(sum(lengths) / len(lengths))
    assert cache["compressed"] == all(n < cache["prompt_tokens"] for n in lengths)
    for n, layer in zip(lengths, cache["layers"]):
        if cache["compressed"] and "sink_tokens" in layer:
            assert layer["sink_tokens"] + layer["window"] + layer["slots"] + layer.get("exact", 0) == n
    return cache


def test_an_own_text_reports_its_cache_question_and_model(tiny):
    result = _generate(tiny, TaskPrompt(kind="text", text="A short text about nothing much.",
                                        question="What is it about?"))
    cache = _consistent(result)
    assert cache["budget_tokens"] == int(0.5 * cache["prompt_tokens"])
    assert result["question"] == "What is it about?"
    assert result["model"] == "tiny-random-llama" and result["model_revision"]


def test_sink_and_window_larger_than_the_prompt_are_reported_as_used(tiny):
    result = _generate(tiny, TaskPrompt(kind="needle", context_length=512, depth=50, seed=0),
                       sink_tokens=4096, window=65536)
    cache = _consistent(result)
    if cache["compressed"]:        # the press shrank sink and window to fit the budget
        layer = cache["layers"][0]
        assert layer["sink_tokens"] + layer["window"] < 4096 + 65536
        assert abs(cache["kept_tokens"] - cache["budget_tokens"]) <= 1
    else:                          # no middle: the whole prompt is kept
        assert cache["kept_tokens"] == cache["prompt_tokens"]


def test_a_long_prompt_keeps_the_budget(tiny):
    result = _generate(tiny, TaskPrompt(kind="needle", context_length=512, depth=50, seed=0))
    cache = _consistent(result)
    assert cache["compressed"] and abs(cache["kept_tokens"] - cache["budget_tokens"]) <= 1
    assert cache["kept_fraction"] == pytest.approx(cache["kept_tokens"] / cache["prompt_tokens"])


def test_cache_report_of_a_press_without_stats():
    from analysis.harness.generation import cache_report

    report = cache_report(None, 0.75, 1000, [250, 250, 251])
    assert report["budget_tokens"] == 250 and report["compressed"] is True
    assert report["kept_tokens"] == pytest.approx(250.333, abs=1e-3) and report["layers"] == [{}] * 3


def test_a_needle_prompt_reports_the_expected_answers_nll(tiny):
    from analysis.tasks import needle as needle_task
    from analysis.tasks.generate import answer_nll, generate

    prompt = TaskPrompt(kind="needle", context_length=256, depth=50, seed=0)
    method = MethodSpec(name="faedkv", compression_ratio=0.5)
    result = generate(tiny, GenerateParams(prompt=prompt, method=method, max_new_tokens=2))
    assert result["answer_nll"] > 0 and result["full_answer_nll"] > 0
    assert result["answer_nll"] != result["full_answer_nll"]        # the press changed the cache
    sample = needle_task.make_sample(tiny.tokenizer, "sentence", 256, 50, 0)
    full = answer_nll(tiny, None, sample.context, sample.question, "query_agnostic",
                      sample.answer_prefix, sample.expected)
    assert full == pytest.approx(result["full_answer_nll"], rel=1e-5)


def test_diagnostics_come_with_the_generation_when_asked(tiny):
    from analysis.tasks.generate import generate

    method = MethodSpec(name="faedkv", compression_ratio=0.5)
    result = generate(tiny, GenerateParams(prompt=TaskPrompt(context_length=256, depth=50), method=method,
                                           max_new_tokens=2, compare_full=False, diagnostics=True))
    diagnostics = result["diagnostics"]
    assert diagnostics["probes"] > 0 and len(diagnostics["output_error"]) == 3
    assert all(0 < e for layer in diagnostics["output_error"] for e in layer)
    assert all(0 < m <= 1 for layer in diagnostics["slot_mass"] for m in layer)


@pytest.mark.parametrize("params", [{"variant": "iwdft"}, {}], ids=["iwdft", "default"])
def test_a_generation_compresses_once_and_reads_nll_and_diagnostics_from_that_cache(tiny, monkeypatch, params):
    """The answer, its NLL and the attention diagnostics come from one compression (KVzip's passes
    cost several prefills); each equals what a separate compression of the same context gives."""
    import torch

    from analysis.api.params import FAEDKV_DEFAULT
    from analysis.harness.diagnostics import attention_diagnostics
    from analysis.harness.generation import prompt_ids
    from analysis.harness.methods import build_press
    from analysis.tasks import needle as needle_task
    from analysis.tasks.generate import answer_nll, generate
    from faedkv import FAEDKVPress

    params = params or FAEDKV_DEFAULT
    method = MethodSpec(name="faedkv", compression_ratio=0.5, params=params)
    calls = []
    original = FAEDKVPress.__call__
    monkeypatch.setattr(FAEDKVPress, "__call__", lambda self, model: calls.append(1) or original(self, model))
    result = generate(tiny, GenerateParams(prompt=TaskPrompt(context_length=256, depth=50), method=method,
                                           max_new_tokens=2, diagnostics=True))
    assert len(calls) == 1
    sample = needle_task.make_sample(tiny.tokenizer, "sentence", 256, 50, 0)
    alone = answer_nll(tiny, build_press(method, tiny.model), sample.context, sample.question, "query_agnostic",
                       sample.answer_prefix, sample.expected)
    assert result["answer_nll"] == pytest.approx(alone, rel=1e-4)
    ids = prompt_ids(tiny, sample.context, sample.question, "query_agnostic", sample.answer_prefix)
    fresh = attention_diagnostics(tiny, build_press(method, tiny.model), ids["context_ids"], ids["questions_ids"][0])
    for name in ("output_error", "middle_mass_compressed"):
        torch.testing.assert_close(torch.tensor(result["diagnostics"][name]), torch.tensor(fresh[name]),
                                   rtol=1e-4, atol=1e-6)
