"""KVzip's context-reconstruction scores as the exact-token scorer of a FAEDKV hybrid.

KVzip (arXiv 2505.23416; kvpress's KVzipPress) scores every cached pair by the largest attention
it receives while the model is asked to repeat the context, after the prefill; kvpress then masks
the pairs that score lowest. `KVzipScores` runs the same scoring and hands the scores, shape
(layers, batch=1, kv_heads, tokens), to a callback instead of masking: FAEDKVPress keeps the top
E middle tokens per head exact and summarises the others into slots.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

from kvpress import KVzipPress


def template_head_ids(tokenizer) -> list[int]:
    """Token ids the chat template puts before the user's content (KVzip derives its prefix
    length the same way)."""
    if tokenizer.chat_template is None:
        return []
    marker, separator = "dummy context", "\n" + "#" * len("dummy context")
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker + separator}],
                                         add_generation_prompt=True, tokenize=False,
                                         enable_thinking=False)
    return tokenizer.encode(text.split(separator)[0].split(marker)[0], add_special_tokens=False)


@dataclasses.dataclass
class TemplateAwareKVzip(KVzipPress):
    """kvpress's KVzipPress for contexts with or without the chat template. kvpress assumes the
    prefill starts with the template's head and scores only what follows it; a raw text (the
    perplexity task) has no head, so there every token is scored."""

    def __post_init__(self):
        # kvpress warns about KVzip's extra passes at every construction; callers document them.
        kvzip_logger = logging.getLogger("kvpress.presses.kvzip_press")
        level = kvzip_logger.level
        kvzip_logger.setLevel(logging.ERROR)
        try:
            super().__post_init__()
        finally:
            kvzip_logger.setLevel(level)

    def _perform_kvzip_compression(self, model, tokenizer):
        # The head's last token (a newline) may merge with the context's first characters.
        head = template_head_ids(tokenizer)[:-1]
        if self._context_ids[0, :len(head)].tolist() != head:
            self.prefix_length = 0
        super()._perform_kvzip_compression(model, tokenizer)


@dataclasses.dataclass
class KVzipScores(TemplateAwareKVzip):
    """KVzip's scoring passes; `on_scores(model, cache, scores)` compresses instead of kvpress's
    masking. scores: (layers, 1, kv_heads, tokens), zero for the template's head."""

    on_scores: Callable | None = None

    def compress_post(self, model):
        if self.on_scores is None:
            raise ValueError("KVzipScores needs on_scores: the press that compresses with the scores")
        self.on_scores(model, self._cache, self.score_val)
