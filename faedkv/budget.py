"""The cache budget of a FAEDKV layer, in kvpress's convention (one home for the rule).

kvpress keeps `max(1, int(T * (1 - ratio)))` rows of a T-token prefill
(`kvpress.utils.compute_n_kept`); FAEDKV keeps exactly as many:

    [ sink: S exact ][ exact: E tokens chosen by a score ][ M slots ][ window: W exact ]

with S + E + M + W = kept rows. The window asked for is `window` tokens, or `window_share` of the
kept rows when that is more (a window that grows with the budget). When the asked-for sink +
window + 1 slot does not fit, the window shrinks first, then the sink (the slots keep at least
one row); `Layout` records what was used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# where a hybrid's exact tokens compete: per KV head, across a layer's heads, or across every
# layer and head (KVzip's own budget is global; its layerwise option is "layer")
EXACT_POOLS = ("head", "layer", "global")


def kept_rows(num_tokens: int, compression_ratio: float) -> int:
    """Rows kvpress keeps of a num_tokens prefill: max(1, int(T * (1 - ratio))) (same formula
    as kvpress.utils.compute_n_kept, tested against it)."""
    if not 0 <= compression_ratio < 1:
        raise ValueError(f"compression_ratio must be in [0, 1) (fraction removed), got {compression_ratio}")
    return max(1, int(num_tokens * (1 - compression_ratio)))


@dataclass(frozen=True)
class Layout:
    """How one layer's prefill of `tokens` rows is kept: `sink` exact first tokens, `exact`
    middle tokens kept as they are (chosen by a score), `slots` spectral rows standing for the
    other `middle - exact` middle tokens, `window` exact last tokens. `slots == 0`: nothing is
    compressed (ratio 0, or a prefill of one row)."""
    tokens: int
    sink: int
    window: int
    slots: int
    exact: int = 0

    @property
    def middle(self) -> int:
        """Tokens between sink and window (exact ones included)."""
        return self.tokens - self.sink - self.window

    @property
    def summarised(self) -> int:
        """Middle tokens the slots stand for."""
        return self.middle - self.exact

    @property
    def rows(self) -> int:
        return self.tokens if self.slots == 0 else self.sink + self.exact + self.slots + self.window

    def as_stats(self) -> dict:
        return {"tokens": self.tokens, "cache_len": self.rows, "sink_tokens": self.sink,
                "window": self.window, "slots": self.slots, "exact": self.exact,
                "middle": self.middle if self.slots else 0}


def asked_window(kept: int, window: int, window_share: float = 0.0) -> int:
    """The recent window asked for when `kept` rows are kept: `window` tokens, or
    floor(window_share x kept) when that is more (at 4K, window_share 0.5 asks for 1024 at ratio
    0.5 and 512 at 0.75)."""
    if not 0 <= window_share < 1:
        raise ValueError(f"window_share must be in [0, 1) (the kept rows' share in the recent window), "
                         f"got {window_share!r}")
    return max(window, int(window_share * kept))


def layout(num_tokens: int, compression_ratio: float, sink_tokens: int, window: int,
           exact_share: float = 0.0, window_share: float = 0.0) -> Layout:
    """The layer layout for a prefill of num_tokens at compression_ratio (kvpress's budget).

    sink_tokens and window (`asked_window`: at least `window`, window_share of the kept rows when
    that is more) are what was asked for; they shrink (window first) when the budget cannot hold
    them and one slot. exact_share: fraction of the rows left after sink and window given to
    exact middle tokens (the slots keep at least one row)."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if not 0 <= exact_share < 1:
        raise ValueError(f"exact_share must be in [0, 1), got {exact_share}")
    kept = kept_rows(num_tokens, compression_ratio) if num_tokens else 0
    window = asked_window(kept, window, window_share)
    if compression_ratio == 0 or kept >= num_tokens:
        return Layout(num_tokens, min(sink_tokens, num_tokens), 0, 0)
    # kept < num_tokens, so sink + window + slots <= kept leaves a middle longer than the slots
    window = min(window, max(0, kept - 1 - sink_tokens))
    sink = min(sink_tokens, kept - 1 - window)
    rest = kept - sink - window
    exact = min(rest - 1, int(exact_share * rest))
    return Layout(num_tokens, sink, window, rest - exact, exact)


def layer_ratios(sensitivity, compression_ratio: float, share: float = 0.5) -> list[float]:
    """Per-layer compression ratios whose mean is `compression_ratio` (the same total rows, up
    to each layer's rounding): `share` of the kept budget follows `sensitivity` (one number per
    layer, e.g. the loss increase when the layer's spectrum is cut; negatives count as 0), the
    rest is spread evenly, so every layer keeps at least (1 - share) of the mean. No layer keeps more than everything: what the cap frees goes to the
    others, by the same weights."""
    if not 0 <= compression_ratio < 1:
        raise ValueError(f"compression_ratio must be in [0, 1) (fraction removed), got {compression_ratio}")
    if not 0 <= share < 1:
        raise ValueError(f"share must be in [0, 1) (below 1, every layer keeps some rows), got {share}")
    scores = [max(0.0, float(s)) for s in sensitivity]
    if not scores:
        raise ValueError("sensitivity needs one number per layer")
    total, layers = sum(scores), len(scores)
    if total == 0:
        return [compression_ratio] * layers
    weights = [(1 - share) + share * layers * s / total for s in scores]     # mean 1
    kept = [(1 - compression_ratio) * w for w in weights]
    for _ in range(layers):
        over = [i for i, k in enumerate(kept) if k > 1]
        if not over:
            break
        excess = sum(kept[i] - 1 for i in over)
        for i in over:
            kept[i] = 1.0
        free = [i for i, k in enumerate(kept) if k < 1]
        mass = sum(weights[i] for i in free)
        for i in free:
            kept[i] += excess * (weights[i] / mass if mass > 0 else 1 / len(free))
    return [1 - k for k in kept]


def top_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A bool mask of scores' shape marking the `count` highest along the last dim."""
    top = scores.topk(count, dim=-1).indices
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, top, True)


def exact_token_masks(scores: torch.Tensor, kept: Layout, pool: str, cap: int | None = None) -> torch.Tensor:
    """(layers, batch, kv_heads, N) bool: the middle tokens a hybrid keeps whole, from scores
    (layers, batch, kv_heads, T) of a T-token prefill laid out as `kept` (N = kept.middle).
    pool "head": the top E of each head; "layer": the top E x kv_heads of each layer, heads
    together; "global": the top E x kv_heads x layers of every layer and head together (KVzip's
    own budget is global in the same way). The total is E per head on average in every pool.
    cap: no head keeps more than `cap` (>= E) whole tokens; the pool's next best tokens in other
    heads take the place of those a full head cannot (its own best `cap` stay)."""
    if pool not in EXACT_POOLS:
        raise ValueError(f"exact_pool must be one of {', '.join(EXACT_POOLS)}, got {pool!r}")
    middle = scores[..., kept.sink:kept.tokens - kept.window].float()
    layers, batch, heads, tokens = middle.shape
    if pool == "head":
        return top_mask(middle, kept.exact)
    if cap is not None and cap < tokens:
        if cap < kept.exact:
            raise ValueError(f"a cap of {cap} whole tokens per head is below the E = {kept.exact} of every head")
        ranks = middle.argsort(dim=-1, descending=True).argsort(dim=-1)     # 0 = the head's best token
        middle = middle.masked_fill(ranks >= cap, float("-inf"))
    if pool == "layer":
        return top_mask(middle.reshape(layers, batch, heads * tokens), kept.exact * heads).view(middle.shape)
    chosen = top_mask(middle.transpose(0, 1).reshape(batch, -1), kept.exact * heads * layers)
    return chosen.view(batch, layers, heads, tokens).transpose(0, 1)


def split_exact(x: torch.Tensor, exact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (batch, kv_heads, N, d) and exact (batch, kv_heads, N) bool, the same count E in every
    head -> (the others (..., N - E, d), the exact ones (..., E, d)), each group in time order."""
    order = torch.argsort(exact.to(torch.int8), dim=-1, stable=True)
    gathered = x.gather(-2, order.unsqueeze(-1).expand(*order.shape, x.shape[-1]))
    cut = order.shape[-1] - int(exact[(0,) * (exact.dim() - 1)].sum())
    return gathered[..., :cut, :], gathered[..., cut:, :]
