"""The `generate` job kind: one prompt, one method, answered ahead of queued batch jobs
(`POST /generate`), and its run function `generate` (over `analysis.harness.generation`).

    result = generate(loaded, GenerateParams(method=MethodSpec(name="snapkv", compression_ratio=0.75)))
"""
from __future__ import annotations

from analysis.api.params import GenerateParams
from analysis.tasks import JobKind


def _text_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def _context(params: GenerateParams, tokenizer) -> tuple[int, str]:
    prompt = params.prompt
    if prompt.kind == "text":
        n = _text_tokens(tokenizer, prompt.text + ("\n" + prompt.question if prompt.question else ""))
        what = f"the prompt ({n} tokens)"
    else:
        n, what = prompt.context_length, f"prompt.context_length ({prompt.context_length})"
    return n + params.max_new_tokens, f"{what} + max_new_tokens ({params.max_new_tokens})"


def _shortest(params: GenerateParams, tokenizer) -> tuple[int, str]:
    prompt = params.prompt
    if prompt.kind == "text":
        n = _text_tokens(tokenizer, prompt.text)
        return n, f"the prompt text ({n} tokens)"
    return prompt.context_length, f"prompt.context_length ({prompt.context_length})"


def answer_nll(loaded, press, context: str, question: str, query_mode: str,
                answer_prefix: str | None, expected: str) -> float:
    """Mean NLL (nats per token) of `expected`, teacher-forced after the context compressed by
    `press` (None: full cache), the question and the answer prefix: a graded score where exact
    match is all or nothing."""
    from analysis.harness.generation import prompt_ids
    from analysis.tasks.ppl import prefill

    ids = prompt_ids(loaded, context, question, query_mode, answer_prefix)
    cache, _ = prefill(loaded, press, ids["context_ids"].to(loaded.model.device))
    return cached_answer_nll(loaded, press, cache, ids, expected)


def cached_answer_nll(loaded, press, cache, ids: dict, expected: str) -> float:
    """answer_nll over `cache`, the context of `ids` (prompt_ids) already compressed by `press`
    (answer_details' cache, read before any other prefill); the cache grows by what is fed."""
    import torch

    from analysis.tasks.ppl import cached_token_nll

    answer = loaded.tokenizer(" " + expected.strip(), add_special_tokens=False,
                              return_tensors="pt").input_ids
    question = ids["questions_ids"][0].cpu()
    fed = torch.cat([question, answer[:, :-1]], dim=1)
    targets = torch.cat([question[:, 1:], answer], dim=1)
    nll = cached_token_nll(loaded, press, cache, int(ids["context_ids"].shape[1]), fed, targets)
    return float(nll[-answer.shape[1]:].mean())


def generate(loaded, params: GenerateParams) -> dict:
    """One interactive generation (the server's "generate" job): the prompt of `params.prompt`
    (a needle sample built from its seed, or free text) answered under `params.method`, and,
    with compare_full, under the full cache too (skipped when the method is full). The press
    compresses once: the answer NLL and the diagnostics read the cache the answer came from
    (a press like KVzip costs several prefills, so a second compression would double it)."""
    import torch
    from transformers import DynamicCache

    from analysis.harness.diagnostics import compare_attention, probe_queries
    from analysis.harness.generation import answer_details, cache_report, prompt_ids, reconstruction_errors
    from analysis.harness.methods import build_press, method_label
    from analysis.tasks import needle as needle_task

    prompt = params.prompt
    sample = None
    if prompt.kind == "needle":
        sample = needle_task.make_sample(loaded.tokenizer, prompt.needle, prompt.context_length,
                                         prompt.depth, prompt.seed)
        context, question, prefix = sample.context, sample.question, sample.answer_prefix
    else:
        context, question, prefix = prompt.text, prompt.question or "", None
    press = build_press(params.method, loaded.model)
    ids = prompt_ids(loaded, context, question, params.query_mode, prefix)
    probes = None
    if params.diagnostics:      # a full prefill: before the press's, whose state it would clear
        device = loaded.model.device
        with torch.inference_mode():
            probes = probe_queries(loaded.model, ids["context_ids"].to(device), ids["questions_ids"][0].to(device))
    main_cache = DynamicCache()
    main = answer_details(loaded, press, context, question, params.max_new_tokens,
                          params.query_mode, prefix, cache=main_cache)
    diagnostics = compare_attention(loaded.model, press, probes, main_cache) if probes else None
    nll = cached_answer_nll(loaded, press, main_cache, ids, sample.expected) if sample else None
    del main_cache      # the compressed cache goes before the full run needs its memory
    full, full_nll = None, None
    if params.compare_full and press is not None:
        full_cache = DynamicCache()
        full = answer_details(loaded, None, context, question, params.max_new_tokens,
                              params.query_mode, prefix, cache=full_cache)
        full_nll = cached_answer_nll(loaded, None, full_cache, ids, sample.expected) if sample else None
    elif params.compare_full:
        full_nll = nll
    result = {
        "method": params.method.model_dump(mode="json"),
        "method_label": method_label(params.method),
        "model": loaded.info.name,
        "model_revision": loaded.info.revision,
        "query_mode": params.query_mode,
        "answer": main.text,
        "full_answer": (main.text if press is None else full.text) if params.compare_full else None,
        "cache_lengths": main.cache_lengths,
        "expected_cache_length": main.expected_cache_lengths,
        "reconstruction_error": reconstruction_errors(press, len(main.cache_lengths)),
        "prompt_tokens": main.prompt_tokens,
        "cache": cache_report(press, params.method.compression_ratio, main.prompt_tokens,
                              main.cache_lengths, loaded.info.head_dim, loaded.info.num_kv_heads,
                              loaded.model.dtype.itemsize),
        "question": question or None,
        "seconds": main.seconds,
        "seconds_full": (main.seconds if press is None else full.seconds)
        if params.compare_full else None,
    }
    if sample is not None:
        result.update(needle=sample.needle_text, answer_prefix=sample.answer_prefix,
                      expected_answer=sample.expected, question=sample.question,
                      needle_positions=list(sample.needle_positions),
                      score=needle_task.score(sample, main.text),
                      full_score=needle_task.score(sample, result["full_answer"])
                      if result["full_answer"] is not None else None,
                      answer_nll=nll, full_answer_nll=full_nll)
    if diagnostics is not None:
        result["diagnostics"] = diagnostics
    return result


KIND = JobKind(
    name="generate", params=GenerateParams, run="analysis.tasks.generate:generate",
    context=_context, shortest=_shortest, cells=lambda params, num_layers: 1,
    methods=lambda params: [("params.method", params.method)], interactive=True)
