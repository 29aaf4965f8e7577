"""Torch-free frequency plans: a (layers, chunks) bool mask of kept chunks, built from low-pass,
from scores (spectral energy, ablation loss increase) or by hand, and written as exactly the JSON
`faedkv.FrequencyPlan.to_json` produces. The app edits plans with it (it must not import torch,
so not faedkv); tests/test_plans.py checks it against faedkv.FrequencyPlan. `fill_layers` is the
one home of the rule that a coarse ablation grid gives every layer the row of its nearest
ablated layer (analysis.tasks.spectral.ablation uses it too).
"""
from __future__ import annotations

import json
import math

import numpy as np


DEFAULT_CHUNKS = 22


def kept_per_layer(ratio: float, chunks: int) -> int:
    """How many chunks a layer keeps at plan ratio `ratio`: ceil(ratio * chunks), at least one
    (as FrequencyPlan.low_pass / from_scores count them)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"plan ratio {ratio} outside (0, 1]: it is the fraction of chunks kept")
    return max(1, math.ceil(ratio * chunks - 1e-9))


def low_pass(ratio: float, layers: int, chunks: int) -> np.ndarray:
    """Keep the lowest-frequency chunks of every layer. (layers, chunks) bool."""
    mask = np.zeros((layers, chunks), dtype=bool)
    mask[:, :kept_per_layer(ratio, chunks)] = True
    return mask


def from_scores(scores, ratio: float) -> np.ndarray:
    """Keep each layer's highest-scoring chunks (ties: lower frequency first). scores: (layers, chunks)."""
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (layers, chunks), got shape {scores.shape}")
    k = kept_per_layer(ratio, scores.shape[1])
    # stable sort on -score keeps the lower chunk first among equal scores
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=1, kind="stable")[:, :k]
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def fill_layers(scores, layers, num_layers: int) -> np.ndarray:
    """(len(layers), C) scores of the ablated layers -> (num_layers, C): every layer takes the
    row of its nearest ablated layer, the lower one on a tie (as analysis.tasks.spectral.ablation does)."""
    scores = np.asarray(scores, dtype=float)
    layers = [int(l) for l in layers]
    if len(layers) != scores.shape[0]:
        raise ValueError(f"{scores.shape[0]} score rows for {len(layers)} layers")
    rows = [min(range(len(layers)), key=lambda i: (abs(layers[i] - t), layers[i]))
            for t in range(num_layers)]
    return scores[rows]


def check(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or mask.shape[1] < 1:
        raise ValueError(f"a plan is a (layers, chunks) grid, got shape {mask.shape}")
    empty = [int(l) for l in np.flatnonzero(~mask.any(axis=1))]
    if empty:
        raise ValueError(f"layer(s) {empty} keep no chunk: every layer must keep at least one "
                         "(tick a chunk, or use 'keep in all layers')")
    return mask


def ratio(mask: np.ndarray) -> float:
    """Fraction of chunks kept, averaged over layers (FrequencyPlan.ratio)."""
    return float(np.asarray(mask, dtype=bool).mean())


def to_json_dict(mask: np.ndarray, name: str = "custom") -> dict:
    """FrequencyPlan.to_dict() of a plan that keeps the same chunks for keys, values and heads:
    {"name", "chunks", "layers": [[kept chunks of layer 0], ...]}."""
    mask = check(mask)
    return {"name": name, "chunks": int(mask.shape[1]),
            "layers": [[int(c) for c in np.flatnonzero(row)] for row in mask]}


def to_json(mask: np.ndarray, name: str = "custom") -> str:
    """FrequencyPlan.to_json() of the plan (same keys, same order)."""
    return json.dumps(to_json_dict(mask, name))


def from_json(text: str | bytes | dict, layers: int | None = None) -> tuple[np.ndarray, str]:
    """(mask, name) from FrequencyPlan JSON; ValueError naming the problem when it is not a plan
    the grid can show (the grid edits one list per layer for keys, values and all heads)."""
    try:
        data = text if isinstance(text, dict) else json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a plan: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
        raise ValueError('not a plan: expected a JSON object with "layers" (and optional '
                         '"chunks", "name"), as written by "Download plan JSON" or '
                         "FrequencyPlan.to_json")
    unknown = set(data) - {"layers", "chunks", "name"}
    if unknown:
        raise ValueError(f"unknown plan fields {sorted(unknown)}; allowed: layers, chunks, name")
    chunks = data.get("chunks", DEFAULT_CHUNKS)
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"plan chunks must be a positive integer, got {chunks!r}")
    rows = data["layers"]
    if layers is not None and len(rows) != layers:
        raise ValueError(f"the plan has {len(rows)} layers but the model has {layers}: "
                         "load a plan made for this model")
    mask = np.zeros((len(rows), chunks), dtype=bool)
    for l, kept in enumerate(rows):
        if isinstance(kept, dict) or any(isinstance(c, list) for c in kept):
            raise ValueError(f"layer {l} of the plan keeps different chunks for keys and values "
                             "or per head; the grid edits one list per layer. Pass such a plan "
                             "to the CLI or the API as JSON instead.")
        for c in kept:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < chunks:
                raise ValueError(f"layer {l} keeps chunk {c!r}, outside 0..{chunks - 1}")
            mask[l, c] = True
    return check(mask), str(data.get("name", "custom"))
