"""The `generate` job kind: one prompt, one method, answered ahead of queued batch jobs
(`POST /generate`; the run function is `analysis.generation.generate`)."""
from __future__ import annotations

from analysis.params import GenerateParams
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


KIND = JobKind(
    name="generate", params=GenerateParams, run="analysis.generation:generate",
    context=_context, shortest=_shortest, cells=lambda params, num_layers: 1,
    methods=lambda params: [("params.method", params.method)], interactive=True)
