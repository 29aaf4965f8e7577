"""KVzip's context-reconstruction scores as the exact-token scorer of a FAEDKV hybrid.

KVzip (arXiv 2505.23416; kvpress's KVzipPress) scores every cached pair by the largest attention
it receives while the model is asked to repeat the context, after the prefill; kvpress then masks
the pairs that score lowest. `KVzipScores` runs the same scoring and hands the scores, shape
(layers, batch, kv_heads, tokens), to a callback instead of masking: FAEDKVPress keeps the top
E middle tokens exact and summarises the others; `kvzip_prefill` hands them, with the prefilled
cache, to a physical store (`DimsplitCache.prefill_from`). kvpress's passes score one sequence;
`KVzipScores` scores a batch of equal-length sequences, each as it would be alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Callable, ClassVar

import torch
from kvpress import KVzipPress
from transformers import DynamicCache, Gemma3PreTrainedModel

QUERY_BLOCK = 128        # reconstruction queries scored at once on a CPU (KVzipScores.score_kvzip)


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

    # kvpress's passes and masking assume one sequence (a batch fails with a bare size mismatch,
    # and the masking counts its budget over the whole batch); KVzipScores scores a batch.
    takes_batches: ClassVar[bool] = False

    @contextlib.contextmanager
    def __call__(self, model):
        """kvpress's KVzipPress.__call__; a model whose tokenizer cannot be loaded from
        model.config.name_or_path is refused with what to do, before the prefill."""
        if isinstance(model, Gemma3PreTrainedModel):
            raise ValueError("KVzip's scoring passes do not support Gemma 3 (kvpress's KVzipPress refuses it)")
        with contextlib.ExitStack() as stack:
            try:        # kvpress loads the tokenizer on entry, before the prefill
                stack.enter_context(super().__call__(model))
            except (OSError, ValueError) as exc:
                raise ValueError(
                    f"KVzip builds its 'repeat the context' prompt with the model's tokenizer, which it loads "
                    f"from model.config.name_or_path ({model.config.name_or_path!r}), and that failed: "
                    f"{str(exc).splitlines()[0]} Save the tokenizer there (tokenizer.save_pretrained(folder)) or "
                    "set model.config.name_or_path to a folder or hub id that has it; or, for FAEDKV, pick an "
                    "exact_scorer that needs none (keydiff, say, with exact_pool='layer').") from exc
            yield

    def _perform_kvzip_compression(self, model, tokenizer):
        batch = self._context_ids.shape[0]
        if batch != 1 and not self.takes_batches:
            raise ValueError(f"KVzip's scoring passes take one sequence, got a batch of {batch}; compress the "
                             "sequences one at a time, or use a method that takes a batch (FAEDKV does)")
        # The head's last token (a newline) may merge with the context's first characters.
        head = template_head_ids(tokenizer)[:-1]
        if any(row[:len(head)].tolist() != head for row in self._context_ids):
            self.prefix_length = 0
        super()._perform_kvzip_compression(model, tokenizer)


@dataclasses.dataclass
class KVzipScores(TemplateAwareKVzip):
    """KVzip's scoring passes; `on_scores(model, cache, scores)` compresses instead of kvpress's
    masking. scores: (layers, batch, kv_heads, tokens), zero for the template's head. A batch of
    equal-length sequences runs its passes together, each row's reconstruction prompt built
    from its own tokens, so each row scores as it would alone."""

    on_scores: Callable | None = None
    takes_batches: ClassVar[bool] = True

    def score_kvzip(self, module, hidden_states, keys, values, attentions, kwargs):
        """kvpress's score_kvzip (the largest attention each context pair gets from the chunk's
        reconstruction queries). On a CPU over blocks of QUERY_BLOCK queries: each block's
        softmax rows are kvpress's, and the running maximum gives the same scores (tested bit
        for bit) without a (queries x keys) attention tensor per layer, which made the passes
        memory-bound there (2.5x faster at 2K). Elsewhere, and with KVzip+ normalisation,
        kvpress's own path."""
        if self.kvzip_plus_normalization or hidden_states.device.type != "cpu":
            return super().score_kvzip(module, hidden_states, keys, values, attentions, kwargs)
        from kvpress.utils import get_prerope_query_states
        from transformers.models.llama.modeling_llama import rotate_half

        batch, q_len, _ = hidden_states.shape
        kv_heads = module.config.num_key_value_heads
        groups = module.config.num_attention_heads // kv_heads
        sink, ctx_len = min(self.n_sink, self.start_idx), self.end_idx - self.start_idx
        queries = get_prerope_query_states(module, hidden_states)
        cos, sin = kwargs["position_embeddings"]
        queries = (queries * cos.unsqueeze(1) + rotate_half(queries) * sin.unsqueeze(1)).view(
            batch, kv_heads, groups, q_len, module.head_dim)
        seen = torch.cat([keys[:, :, :sink], keys[:, :, self.start_idx:self.end_idx], keys[:, :, -q_len:]], dim=2)
        seen = seen.unsqueeze(2).transpose(-2, -1)
        before = seen.shape[-1] - q_len                      # keys every reconstruction query sees
        scores = None
        for first in range(0, q_len, QUERY_BLOCK):
            block = queries[..., first:first + QUERY_BLOCK, :]
            logits = block @ seen / math.sqrt(module.head_dim)
            rows = torch.arange(first, first + block.shape[-2], device=logits.device)
            future = torch.arange(q_len, device=logits.device)[None, :] > rows[:, None]
            logits[..., before:].masked_fill_(future, torch.finfo(logits.dtype).min)
            best = logits.softmax(dim=-1)[..., sink:sink + ctx_len].amax(dim=(-3, -2))
            scores = best if scores is None else torch.maximum(scores, best)
        self.score_val[int(module.layer_idx)][..., self.start_idx:self.end_idx] = scores
        return keys[:, :, :self.context_length], values[:, :, :self.context_length]

    def prepare(self, model, tokenizer, prev_postfix_size=8):
        """kvpress's (prefill chunk, reconstruction prompt) pairs, per row, stacked along the batch
        (every row's chunks and prompts have the same lengths); the score buffer gets the batch."""
        context_ids, rows = self._context_ids, []
        try:
            for row in context_ids.split(1):
                self._context_ids = row
                rows.append(super().prepare(model, tokenizer, prev_postfix_size))
        finally:
            self._context_ids = context_ids
        layers, _, heads, tokens = self.score_val.shape
        self.score_val = self.score_val.new_zeros(layers, len(rows), heads, tokens)
        return [(torch.cat([r[i][0] for r in rows]), torch.cat([r[i][1] for r in rows]))
                for i in range(len(rows[0]))]

    def compress_post(self, model):
        if self.on_scores is None:
            raise ValueError("KVzipScores needs on_scores: the press that compresses with the scores")
        self.on_scores(model, self._cache, self.score_val)


def kvzip_prefill(model, context_ids: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Prefill context_ids (1, T) into a DynamicCache and run KVzip's scoring passes over it
    (kvpress states 2-3 prefills' worth of extra work; 5x a prefill on a 2-core CPU at 2K; batch
    size 1, the tokenizer loaded from model.config.name_or_path as kvpress's KVzipPress loads it)
    -> (the cache, holding the T tokens' keys and values unchanged, and KVzip's scores (layers, 1,
    kv_heads, T) float32)."""
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
