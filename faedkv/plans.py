"""Frequency plans: which chunks of normalised frequency [0, 0.5] each layer keeps.

A plan is data. Per layer it names the kept chunks, either one list for keys and values and all
heads, or separately for "key" and "value", each optionally one list per KV head. Frequencies
are normalised (cycles per token), so one plan serves any number of bins: bin k of an M-point
spectrum has frequency min(k, M - k) / M and falls into chunk floor(2 * C * f) (clipped to C - 1).

JSON form (``to_json`` / ``from_json``)::

    {"name": "low-pass-0.25", "chunks": 22,
     "layers": [[0, 1, 2, 3, 4, 5],                          # same for K and V, all heads
                {"key": [0, 1], "value": [[0], [0, 3]]}]}    # values per head
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("key", "value")
DEFAULT_CHUNKS = 22


def _chunk_list(raw: Any, chunks: int, where: str) -> tuple[int, ...]:
    if isinstance(raw, (str, bytes)) or not hasattr(raw, "__iter__"):
        raise ValueError(f"{where}: expected a list of chunk indices, got {raw!r}")
    out = []
    for c in raw:
        if isinstance(c, bool) or not isinstance(c, (int,)) and not (hasattr(c, "__index__")):
            raise ValueError(f"{where}: chunk {c!r} is not an integer")
        c = int(c)
        if not 0 <= c < chunks:
            raise ValueError(f"{where}: chunk {c} is out of range; chunks are 0..{chunks - 1}")
        out.append(c)
    if not out:
        raise ValueError(f"{where}: keeps no chunk; every layer must keep at least one "
                         "(chunk 0 is the lowest frequencies)")
    return tuple(sorted(set(out)))


def _heads_spec(raw: Any, chunks: int, where: str):
    """A list of chunks (all heads) or a list of such lists (one per head)."""
    if isinstance(raw, (list, tuple)) and raw and all(isinstance(r, (list, tuple)) for r in raw):
        return tuple(_chunk_list(r, chunks, f"{where} head {h}") for h, r in enumerate(raw))
    return _chunk_list(raw, chunks, where)


def _layer_spec(raw: Any, chunks: int, layer: int) -> dict:
    where = f"plan layer {layer}"
    if isinstance(raw, dict):
        unknown = set(raw) - set(KINDS)
        if unknown or not raw:
            raise ValueError(f"{where}: a layer dict needs the keys 'key' and 'value', got {sorted(raw)}")
        if set(raw) != set(KINDS):
            raise ValueError(f"{where}: give both 'key' and 'value' (missing "
                             f"{sorted(set(KINDS) - set(raw))})")
        return {kind: _heads_spec(raw[kind], chunks, f"{where} {kind}") for kind in KINDS}
    spec = _heads_spec(raw, chunks, where)
    return {"key": spec, "value": spec}


def chunk_of(freqs: torch.Tensor, chunks: int) -> torch.Tensor:
    """Chunk index of normalised frequencies in [0, 0.5]: floor(2 * C * f), clipped to C - 1."""
    return (freqs.double() * 2 * chunks).floor().long().clamp(0, chunks - 1)


def bin_frequencies(num_bins: int) -> torch.Tensor:
    """Normalised frequency min(k, M - k) / M of each bin of an M-point DFT, (num_bins,)."""
    k = torch.arange(num_bins, dtype=torch.float64)
    return torch.minimum(k, num_bins - k) / num_bins


@dataclass(frozen=True)
class FrequencyPlan:
    """Kept chunks per layer (optionally per KV head, separately for keys and values).

    layers: one entry per layer, as in the JSON form; normalised on construction to
    ``{"key": spec, "value": spec}`` with spec a tuple of chunks or a tuple per head.
    """

    layers: tuple
    chunks: int = DEFAULT_CHUNKS
    name: str = "custom"

    def __post_init__(self):
        if isinstance(self.chunks, bool) or not isinstance(self.chunks, int) or self.chunks < 1:
            raise ValueError(f"chunks must be a positive integer, got {self.chunks!r}")
        if isinstance(self.layers, (str, bytes, dict)) or not hasattr(self.layers, "__iter__"):
            raise ValueError("layers must be a list with one entry per layer")
        layers = tuple(_layer_spec(raw, self.chunks, i) for i, raw in enumerate(self.layers))
        if not layers:
            raise ValueError("a plan needs at least one layer")
        object.__setattr__(self, "layers", layers)

    # constructors ---------------------------------------------------------------------------
    @classmethod
    def low_pass(cls, ratio: float, num_layers: int, chunks: int = DEFAULT_CHUNKS) -> "FrequencyPlan":
        """Keep the ceil(ratio * chunks) lowest chunks in every layer (at least one)."""
        kept = _kept_count(ratio, chunks)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        return cls(layers=tuple([list(range(kept))] * num_layers), chunks=chunks,
                   name=f"low-pass-{ratio:g}")

    @classmethod
    def from_scores(cls, scores, ratio: float, name: str = "from-scores") -> "FrequencyPlan":
        """scores: (layers, chunks) array-like, higher = more important (e.g. an ablation's loss
        increase or spectral energy). Keeps the ceil(ratio * chunks) best chunks per layer."""
        try:
            table = torch.as_tensor(scores, dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"scores must be a numeric (layers, chunks) array: {exc}") from exc
        if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] < 1:
            raise ValueError(f"scores must be a (layers, chunks) array, got shape {tuple(table.shape)}")
        if not torch.isfinite(table).all():
            raise ValueError("scores contain NaN or infinity; clean them before building a plan")
        kept = _kept_count(ratio, table.shape[1])
        # A stable descending sort: on ties the lower-frequency chunk wins.
        order = torch.sort(table, dim=1, descending=True, stable=True).indices[:, :kept]
        layers = [sorted(row) for row in order.tolist()]
        return cls(layers=tuple(layers), chunks=int(table.shape[1]), name=name)

    @classmethod
    def from_json(cls, data: str | dict) -> "FrequencyPlan":
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise ValueError(f"plan JSON is malformed: {exc}") from exc
        if not isinstance(data, dict) or "layers" not in data:
            raise ValueError('a plan is a JSON object with "layers" (and optional "chunks", "name")')
        unknown = set(data) - {"layers", "chunks", "name"}
        if unknown:
            raise ValueError(f"unknown plan fields {sorted(unknown)}; allowed: layers, chunks, name")
        return cls(layers=data["layers"], chunks=data.get("chunks", DEFAULT_CHUNKS),
                   name=str(data.get("name", "custom")))

    def to_dict(self) -> dict:
        def plain(spec):
            return [list(s) for s in spec] if spec and isinstance(spec[0], tuple) else list(spec)

        layers = []
        for entry in self.layers:
            if entry["key"] == entry["value"]:
                layers.append(plain(entry["key"]))
            else:
                layers.append({kind: plain(entry[kind]) for kind in KINDS})
        return {"name": self.name, "chunks": self.chunks, "layers": layers}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    # queries --------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def ratio(self) -> float:
        """Fraction of chunks kept: mean over layers and keys/values of the mean over heads."""
        fractions = []
        for entry in self.layers:
            for kind in KINDS:
                heads = _per_head(entry[kind])
                fractions.append(sum(len(c) for c in heads) / (len(heads) * self.chunks))
        return sum(fractions) / len(fractions)

    def is_per_head(self, layer: int, kind: str = "key") -> bool:
        return isinstance(self._spec(layer, kind)[0], tuple)

    def _spec(self, layer: int, kind: str):
        if kind not in KINDS:
            raise ValueError(f"kind must be 'key' or 'value', got {kind!r}")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(self.layers):
            raise ValueError(f"plan {self.name!r} has layers 0..{len(self.layers) - 1}, "
                             f"layer {layer!r} is unknown; build the plan for this model's layers")
        return self.layers[layer][kind]

    def kept_chunks(self, layer: int, kind: str = "key", head: int | None = None) -> tuple[int, ...]:
        spec = self._spec(layer, kind)
        if isinstance(spec[0], tuple):
            if head is None:
                raise ValueError(f"layer {layer} of plan {self.name!r} is per head: pass head=")
            if not 0 <= head < len(spec):
                raise ValueError(f"layer {layer} {kind} has {len(spec)} heads, head {head} is unknown")
            return spec[head]
        return spec

    def keep_frequencies(self, layer: int, freqs: torch.Tensor, kind: str = "key",
                         num_heads: int | None = None) -> torch.Tensor:
        """Bool mask of the normalised frequencies freqs (F,) kept at this layer.

        (F,) when the layer's spec is shared by all heads, else (num_heads, F)."""
        spec = self._spec(layer, kind)
        chunk = chunk_of(torch.as_tensor(freqs), self.chunks)
        if isinstance(spec[0], tuple):
            if num_heads is not None and num_heads != len(spec):
                raise ValueError(f"plan layer {layer} {kind} names {len(spec)} heads but the "
                                 f"model has {num_heads} KV heads")
            return torch.stack([_member(chunk, chunks, self.chunks) for chunks in spec])
        return _member(chunk, spec, self.chunks)

    def keep_some_frequencies(self, layer: int, freqs: torch.Tensor, kind: str = "key",
                              num_heads: int | None = None) -> torch.Tensor:
        """`keep_frequencies` for a compression: raises when a (head's) mask keeps none of freqs.

        With few bins (small M) the kept chunks can hold no bin at all; the compressed middle
        would then be all zeros, which no one means by a plan."""
        mask = self.keep_frequencies(layer, freqs, kind, num_heads)
        empty = (~mask.any(dim=-1)).reshape(-1)
        if bool(empty.any()):
            head = int(empty.nonzero()[0]) if mask.ndim == 2 else None
            where = f"layer {layer} {kind}s" + (f" (KV head {head})" if head is not None else "")
            raise ValueError(
                f"plan {self.name!r} {where} keeps chunks {list(self.kept_chunks(layer, kind, head))} of "
                f"{self.chunks}, but none of the {len(freqs)} frequency bins of this compression falls "
                "in them, so the compressed middle would be all zeros. Keep more (or lower) chunks at "
                "this layer, or compress a longer context or at a lower ratio (more bins).")
        return mask

    def mask(self, layer: int, num_bins: int, kind: str = "key", head: int | None = None) -> torch.Tensor:
        """Bool (num_bins,) mask over the bins of an M-point DFT (conjugate-symmetric)."""
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        chunks = self.kept_chunks(layer, kind, head)
        return _member(chunk_of(bin_frequencies(num_bins), self.chunks), chunks, self.chunks)


def _per_head(spec):
    return spec if isinstance(spec[0], tuple) else (spec,)


def _member(chunk: torch.Tensor, kept: tuple[int, ...], chunks: int) -> torch.Tensor:
    table = torch.zeros(chunks, dtype=torch.bool)
    table[list(kept)] = True
    return table[chunk]


def _kept_count(ratio: float, chunks: int) -> int:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"plan ratio must be in (0, 1] (fraction of chunks kept), got {ratio!r}")
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    return max(1, math.ceil(ratio * chunks - 1e-9))
