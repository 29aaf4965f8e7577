"""KVzip's context-reconstruction scores as the exact-token scorer of a FAEDKV hybrid.

KVzip (arXiv 2505.23416; kvpress's KVzipPress) scores every cached pair by the largest attention
it receives while the model is asked to repeat the context, after the prefill; kvpress then masks
the pairs that score lowest. `KVzipScores` runs the same scoring and hands the scores, shape
(layers, batch=1, kv_heads, tokens), to a callback instead of masking: FAEDKVPress keeps the top
E middle tokens per head exact and summarises the others into slots; `kvzip_prefill` hands
them, with the prefilled cache, to a physical store (`DimsplitCache.prefill_from`).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
from kvpress import KVzipPress
from transformers import DynamicCache


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
        # kvpress's passes assume one sequence (their score buffer has batch 1) and fail on a batch
        # with a bare size mismatch; say what is wrong before they run.
        if self._context_ids.shape[0] != 1:
            raise ValueError(f"KVzip's scoring passes take one sequence, got a batch of "
                             f"{self._context_ids.shape[0]}; compress the sequences one at a time, or use "
                             "a method that takes a batch (for FAEDKV: another exact_scorer, keydiff say)")
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


def kvzip_prefill(model, context_ids: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Prefill context_ids (1, T) into a DynamicCache and run KVzip's scoring passes over it
    (kvpress states 2-3 prefills' worth of extra work; 6.5x on a 2-core CPU at 2K; batch size 1,
    the tokenizer loaded from model.config.name_or_path as kvpress's KVzipPress loads it) -> (the cache, holding the T
    tokens' keys and values unchanged, and KVzip's scores (layers, 1, kv_heads, T) float32)."""
    if context_ids.dim() != 2 or context_ids.shape[0] != 1:
        raise ValueError(f"KVzip scores one sequence: context_ids must be (1, tokens), got shape "
                         f"{tuple(context_ids.shape)}")
    found = {}
    # Any ratio > 0 makes kvpress run its passes; the scores do not depend on it.
    scorer = KVzipScores(compression_ratio=0.5, on_scores=lambda _model, cache, scores: found.update(
        cache=cache, scores=scores.float()))
    with torch.no_grad(), scorer(model):
        model.model(input_ids=context_ids.to(model.device), past_key_values=DynamicCache())
    return found["cache"], found["scores"]
