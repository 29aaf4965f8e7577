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
    match is all or nothing. The context's last token is fed with the question (so the press
    sees one token less than in `answer_details`)."""
    import torch

    from analysis.harness.generation import prompt_ids
    from analysis.tasks.ppl import continuation_token_nll

    ids = prompt_ids(loaded, context, question, query_mode, answer_prefix)
    answer = loaded.tokenizer(" " + expected.strip(), add_special_tokens=False,
                              return_tensors="pt").input_ids
    tail = torch.cat([ids["questions_ids"][0].cpu(), answer], dim=1)
    nll, _ = continuation_token_nll(loaded, press, ids["context_ids"], tail)
    return float(nll[-answer.shape[1]:].mean())


def generate(loaded, params: GenerateParams) -> dict:
    """One interactive generation (the server's "generate" job): the prompt of `params.prompt`
    (a needle sample built from its seed, or free text) answered under `params.method`, and,
    with compare_full, under the full cache too (skipped when the method is full)."""
    from analysis.harness.generation import answer_details, cache_report, reconstruction_errors
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
    main = answer_details(loaded, press, context, question, params.max_new_tokens,
                          params.query_mode, prefix)
    full = None
    if params.compare_full and press is not None:
        full = answer_details(loaded, None, context, question, params.max_new_tokens,
                              params.query_mode, prefix)
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
                      if result["full_answer"] is not None else None)
        nll = answer_nll(loaded, press, context, question, params.query_mode, prefix,
                         sample.expected)
        full_nll = None
        if params.compare_full:
            full_nll = nll if press is None else answer_nll(
                loaded, None, context, question, params.query_mode, prefix, sample.expected)
        result.update(answer_nll=nll, full_answer_nll=full_nll)
    if params.diagnostics:
        from analysis.harness.diagnostics import attention_diagnostics
        from analysis.harness.generation import prompt_ids

        ids = prompt_ids(loaded, context, question, params.query_mode, prefix)
        device = loaded.model.device
        result["diagnostics"] = attention_diagnostics(loaded, build_press(params.method, loaded.model),
                                                      ids["context_ids"].to(device),
                                                      ids["questions_ids"][0].to(device))
    return result


KIND = JobKind(
    name="generate", params=GenerateParams, run="analysis.tasks.generate:generate",
    context=_context, shortest=_shortest, cells=lambda params, num_layers: 1,
    methods=lambda params: [("params.method", params.method)], interactive=True)
