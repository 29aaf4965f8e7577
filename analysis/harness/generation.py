"""Compressed generation: one context, one question, one press; the answer and the cache sizes.

    answer = answer_details(loaded, press, context, question, max_new_tokens=32,
                            query_mode="query_agnostic", answer_prefix="The pass key is")
    answer.text, answer.cache_lengths

Generation runs kvpress's own "kv-press-text-generation" pipeline
(`kvpress.KVPressTextGenerationPipeline`), so prompts and decoding match kvpress exactly:

- the chat template is applied to the context; the template is split after the user turn's
  content, so the compressed prefill is `<template head> + context` and the uncompressed tail
  is `question + <end of user turn, assistant header> + answer_prefix`;
- the press hooks every attention layer during the prefill of the context only;
- the tail is fed at positions continuing from the ORIGINAL context length (not the compressed
  one), then greedy decoding (argmax, no sampling: deterministic) for up to max_new_tokens,
  stopping at the model's EOS; the answer is the decoded new tokens (without the prefix);
- PyramidKV leaves layers of different lengths, and transformers sizes one attention mask
  for all layers; for such caches the question is fed one token at a time (`feed_one_by_one`),
  which computes the same causal result without a mask;
- the context is never truncated (kvpress would cut it at the tokenizer's model_max_length,
  silently dropping a needle or the question).

We pass our own `DynamicCache`; kvpress trims the answer's tokens off it after decoding, so
afterwards it holds exactly the compressed prefill: its per-layer lengths are the recorded
`cache_lengths`, checked against the method's budget (`analysis.harness.methods.check_cache_lengths`:
a press that did not compress raises `CompressionError`).

Prompt modes (`query_mode`):
- "query_agnostic" (kvpress's default): the press sees only the context; the question comes
  after compression.
- "query_aware" (as SnapKV's own evaluation: the question is part of the compressed prompt):
  the compressed context is `context + "\\n\\n" + question`, so the press's observation window
  ends on the question; after compression the question is asked again exactly as in the
  query-agnostic mode (same tail, same answer prefix). The two modes therefore differ only in
  what the press observed; the prompt of the query-aware mode is the question's length longer.
"""
from __future__ import annotations

import dataclasses
import time
import weakref

from analysis.api.params import QUERY_MODES
from analysis.harness.methods import attention_for, check_cache_lengths, dimsplit_press

# kvpress truncates contexts longer than this; we never want that (see the module docstring).
NO_TRUNCATION = 10 ** 12
QUERY_SEPARATOR = "\n\n"

_PIPELINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def uneven(cache) -> bool:
    """True when the layers' caches differ in length (PyramidKV's per-layer budgets)."""
    return len({cache.get_seq_length(i) for i in range(len(cache))}) > 1


def one_token_steps(model, cache) -> bool:
    """True when multi-token inputs over `cache` must be fed one token per forward pass: the
    layers differ in length (see feed_one_by_one), or kvpress masks evicted pairs (KVzip): its
    attention patch then needs one fake key that nullifies every query of the pass per KV head,
    and that hyperplane search fails for the many queries of a multi-token pass where a single
    token's few query heads are easily separated."""
    from analysis.harness.methods import masked_pairs

    return uneven(cache) or any(masked_pairs(model))


def feed_one_by_one(model, ids, cache, first_position: int) -> None:
    """Feed ids (1, n) one token per forward pass at positions first_position, ...

    transformers builds one attention mask for all layers, sized by layer 0's cache, so a
    multi-token forward over a cache whose layers differ in length fails (sdpa) or mis-masks
    (eager). A single-token query needs no mask: every layer attends to all of its cache, and
    the result equals a causal multi-token pass."""
    import torch

    for j in range(ids.shape[1]):
        model(input_ids=ids[:, j:j + 1], past_key_values=cache,
              position_ids=torch.tensor([[first_position + j]], device=ids.device))


def text_pipeline(loaded):
    """kvpress's text-generation pipeline over the loaded model (one per model), which feeds
    the question token by token when the compressed cache is uneven across layers or masked."""
    from kvpress import KVPressTextGenerationPipeline

    class Pipeline(KVPressTextGenerationPipeline):
        def generate_answer(self, question_ids, cache, context_length, max_new_tokens):
            if one_token_steps(self.model, cache) and question_ids.shape[1] > 1:
                # kvpress's own loop then continues from the last question token.
                feed_one_by_one(self.model, question_ids[:, :-1], cache, context_length)
                shift = question_ids.shape[1] - 1
                return super().generate_answer(question_ids[:, -1:], cache,
                                               context_length + shift, max_new_tokens)
            return super().generate_answer(question_ids, cache, context_length, max_new_tokens)

    pipe = _PIPELINES.get(loaded.model)
    if pipe is None or pipe.tokenizer is not loaded.tokenizer:
        pipe = Pipeline(model=loaded.model, tokenizer=loaded.tokenizer)
        _PIPELINES[loaded.model] = pipe
    return pipe


def compressed_context(context: str, question: str, query_mode: str) -> str:
    """The text the press compresses: the context, plus the question when query-aware."""
    if query_mode not in QUERY_MODES:
        raise ValueError(f"unknown query_mode {query_mode!r}; use one of {', '.join(QUERY_MODES)}")
    if query_mode == "query_aware" and question:
        return context + QUERY_SEPARATOR + question
    return context


@dataclasses.dataclass
class Answer:
    text: str
    cache_lengths: list[int]            # per layer, read from the cache after the prefill
    expected_cache_lengths: list[int]   # per layer, the method's budget
    prompt_tokens: int                  # tokens prefilled under the press (template + context)
    seconds: float


def prompt_ids(loaded, context: str, question: str, query_mode: str,
               answer_prefix: str | None = None) -> dict:
    """kvpress's tokenization of the prompt: {"context_ids": (1, T), "questions_ids": [(1, Q)]}."""
    pipe = text_pipeline(loaded)
    return pipe.preprocess(compressed_context(context, question, query_mode), [question],
                           answer_prefix or "", NO_TRUNCATION)


def answer_details(loaded, press, context: str, question: str, max_new_tokens: int = 32,
                   query_mode: str = "query_agnostic", answer_prefix: str | None = None,
                   cache=None) -> Answer:
    """Prefill `context` under `press` (None: full cache), ask `question`, decode greedily.
    `cache` (an empty DynamicCache) is left holding the compressed context, answer removed."""
    import torch
    from transformers import DynamicCache

    pipe = text_pipeline(loaded)
    text = compressed_context(context, question, query_mode)
    prompt_tokens = int(prompt_ids(loaded, context, question, query_mode,
                                   answer_prefix)["context_ids"].shape[1])
    cache = DynamicCache() if cache is None else cache
    start = time.perf_counter()
    with attention_for(press, loaded.model), torch.inference_mode():
        out = pipe(text, question=question, answer_prefix=answer_prefix or None, press=press,
                   max_new_tokens=max_new_tokens, cache=cache, max_context_length=NO_TRUNCATION)
    seconds = time.perf_counter() - start
    lengths = [int(cache.get_seq_length(i)) for i in range(len(cache))]
    expected = check_cache_lengths(press, loaded.model, prompt_tokens, lengths)
    return Answer(out["answer"], lengths, expected, prompt_tokens, seconds)


def reconstruction_errors(press, num_layers: int) -> list[float | None] | None:
    """Per-layer reconstruction error a FAEDKV press reports after compressing (None for
    presses that do not report one)."""
    stats = getattr(press, "last_stats", None)
    if not stats:
        return None
    errors = [stats.get(i, {}).get("reconstruction_error") for i in range(num_layers)]
    return [None if e is None else float(e) for e in errors]


def cache_report(press, compression_ratio: float, prompt_tokens: int,
                 cache_lengths: list[int], head_dim: int | None = None, kv_heads: int | None = None,
                 bytes_per_number: int | None = None) -> dict:
    """What the compressed cache actually holds against what the budget asked for.

    budget_tokens = max(1, int((1 - ratio) * T)), kvpress's rule (faedkv.budget.kept_rows; a
    press with its own rule may differ by a token; ratio 0 keeps all). `compressed` is False when some layer kept the whole prompt (e.g. a
    FAEDKV prompt not longer than sink + window has no middle to compress). `layers` carries a
    FAEDKV press's per-layer record (slots, middle, and the sink / window it actually used
    when the budget forced them smaller).

    FAEDKV's dimsplit keeps a reconstructed row for every token (T rows): there `kept_tokens` is
    the mean of what it stored in equivalent rows (exact dims + low-pass coefficients, in rows
    of head_dim numbers), `rows` the rows attention sees, and `virtual` is True. Given the
    model's head_dim, kv_heads and bytes per number, `kv_bytes` is what the cache holds (keys
    and values, every layer; for dimsplit the bytes of its equivalent rows)."""
    from faedkv.budget import kept_rows

    stats = getattr(press, "last_stats", None) or {}
    keys = ("slots", "exact", "middle", "sink_tokens", "window", "exact_dims", "coefficients",
            "equivalent_rows")
    layers = [{k: stats[i][k] for k in keys if stats[i].get(k) is not None}
              if i in stats else {} for i in range(len(cache_lengths))]
    rows = sum(cache_lengths) / len(cache_lengths) if cache_lengths else float(prompt_tokens)
    inner = dimsplit_press(press)
    virtual = inner is not None and bool(cache_lengths) and all(
        stats.get(i, {}).get("equivalent_rows") is not None for i in range(len(cache_lengths)))
    stored = [stats[i]["equivalent_rows"] for i in range(len(cache_lengths))] if virtual else cache_lengths
    kept = sum(stored) / len(stored) if stored else float(prompt_tokens)
    report = {"prompt_tokens": prompt_tokens,
              "budget_tokens": kept_rows(prompt_tokens, compression_ratio) if prompt_tokens else 0,
              "kept_tokens": kept, "kept_fraction": kept / prompt_tokens if prompt_tokens else 1.0,
              "compressed": bool(stored) and all(n < prompt_tokens for n in stored),
              "layers": layers}
    if head_dim and kv_heads and bytes_per_number:
        report["kv_bytes"] = int(round(sum(stored) * 2 * kv_heads * head_dim * bytes_per_number))
    if virtual:
        report.update(virtual=True, rows=rows)
    return report
