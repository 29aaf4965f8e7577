"""Token-contribution profiles: how much each original token position counts in the compressed
cache, for every method at one budget and context length.

    python -m analysis contrib --methods faedkv,dct_iterative,streaming_llm,snapkv,h2o \\
        --ratio 0.75 --context-length 2048
    key = run_contrib(load_model(), store, ContribParams(methods=[...], context_length=2048))

Two sources, named in each record's "source":

- "attention-equivalent map" (faedkv variants, dct_iterative): the compressor is a fixed linear
  map along the token axis and attention sees each slot with its mass, so a token's contribution
  is the weight of its column in the map to the expanded cache (each slot repeated as often as
  its mass says: `faedkv.contribution_profile(faedkv.compression_matrix(...), mass)`), for the
  middle segment with the press's own layout (faedkv.budget.layout).
  Sink and window tokens are kept exactly: contribution 1, included so the axis is every
  position 0..T-1. A plan makes the map layer (and K/V, head) specific; the profile is then the
  mean column norm over every layer, keys and values, and head.
- "observed-eviction" (streaming_llm, snapkv, h2o, pyramidkv, tova, knorm, expected_attention):
  which tokens an eviction press keeps depends on the data, so we run it: one prefill of the
  first T tokens of the essays from `text_seed` on, under the press. Two forward hooks on every
  attention layer, one registered before kvpress's hook and one after, see the layer's keys as
  cached and as compressed; every compressed key row is an exact copy of one original row, so
  matching rows bit for bit recovers the kept positions per (layer, KV head). A token's
  contribution is the fraction of (layer, head) pairs that kept it. A press whose kept rows are
  not copies of original rows is reported as an error, not approximated.

Scale: `faedkv.contribution_profile` normalises a map's column norms to max 1, so a linear
method's middle tokens are measured relative to its best-preserved token, and the exact sink and
window tokens (1) sit on the same scale; an eviction method's values are fractions of (layer,
head) pairs, 1 for a token every head kept.

Summaries (`faedkv.equality_summary`: 1 - Gini, mean of the oldest tenth over the newest tenth,
min over max) are computed over every position, the same axis for every method. The same
summaries over the middle range [sink, T - window) alone (the tokens a linear method mixes; for
eviction methods sink 4 and window 64, the faedkv defaults) are stored under "middle".
"""
from __future__ import annotations

import time

import numpy as np
import torch

from analysis.api.params import EVICTION, LINEAR, ContribParams, MethodSpec

DEFAULT_SINK, DEFAULT_WINDOW = 4, 64


class ContributionError(ValueError):
    """A contribution profile cannot be measured exactly for this method and input."""


# --------------------------------------------------------------------------- summaries

def summarise(profile: np.ndarray, start: int, stop: int) -> dict:
    """`faedkv.equality_summary` over every position, and over [start, stop) as "middle"."""
    from faedkv.contribution import equality_summary

    profile = np.asarray(profile, dtype=np.float64)
    whole = {k: float(v) for k, v in equality_summary(torch.as_tensor(profile)).items()}
    middle = {k: float(v) for k, v in equality_summary(torch.as_tensor(profile[start:stop])).items()}
    return {**whole, "middle": {**middle, "range": [int(start), int(stop)]}}


# --------------------------------------------------------------------------- linear maps

def linear_variant(spec: MethodSpec) -> str:
    from analysis.harness.methods import method_params

    if spec.name == "dct_iterative":
        return "dct-iterative"
    return method_params(spec)["variant"]


def linear_profile(spec: MethodSpec, context_length: int, num_layers: int, num_kv_heads: int) -> dict:
    """Column weights of the method's attention-equivalent map over every position:
    (context_length,) plus the range. The layout (sink, slots, window) is the press's own
    (faedkv.budget.layout); each slot counts with its mass when the mass correction is on."""
    from analysis.harness.methods import method_params
    from faedkv.budget import layout
    from faedkv.contribution import contribution_profile
    from faedkv.plans import FrequencyPlan
    from faedkv.variants import compression_matrix, slot_mass

    params = method_params(spec)
    variant = linear_variant(spec)
    if variant == "dimsplit":
        raise ContributionError(f"{spec.label}: faedkv's variant 'dimsplit' has no contribution "
                                "profile: which head dims stay exact is chosen from the data, so "
                                "it is no fixed linear map along the tokens; leave it out.")
    if float(params.get("exact_share") or 0) > 0:
        raise ContributionError(f"{spec.label}: a hybrid keeps data-dependent exact tokens; its "
                                "contribution is not a fixed linear map (set exact_share to 0)")
    kept = layout(context_length, spec.compression_ratio, int(params["sink_tokens"]), int(params["window"]),
                  window_share=float(params.get("window_share") or 0))
    sink, window, slots, middle = kept.sink, kept.window, kept.slots, kept.middle
    if slots == 0 or slots >= middle:
        raise ContributionError(
            f"{spec.label}: a {context_length}-token context with sink {sink} and window {window} "
            f"leaves {middle} middle tokens for {slots} slots; nothing is compressed. Use a "
            "longer --context-length or a higher --ratio.")
    plan = params.get("plan")
    plan = FrequencyPlan.from_json(plan) if isinstance(plan, dict) else plan
    combos = [(0, "key", None)]
    if plan is not None:
        if plan.num_layers != num_layers:
            raise ContributionError(f"{spec.label}: the plan has {plan.num_layers} layers, the "
                                    f"model {num_layers}")
        combos = [(layer, kind, head)
                  for layer in range(num_layers) for kind in ("key", "value")
                  for head in (range(num_kv_heads) if plan.is_per_head(layer, kind) else [None])]
    step = max(1, int(params["window"]))   # FAEDKVPress.step: dct-iterative re-compresses every window
    normalization = params.get("slot_normalization", "mean")
    mass = slot_mass(variant, middle, slots) if params.get("mass_correction") else None
    weights = np.zeros(middle)
    for layer, kind, head in combos:
        matrix = compression_matrix(variant, middle, plan=plan, layer=layer, kind=kind, head=head,
                                    step=step, normalization=normalization, num_slots=slots)
        weights += np.asarray(contribution_profile(matrix, mass), dtype=np.float64)
    profile = np.ones(context_length)
    profile[sink: sink + middle] = weights / len(combos)
    return {"contribution": profile, "range": (sink, sink + middle), "slots": slots,
            "source": "attention-equivalent map"}


# ----------------------------------------------------------------------- observed eviction

def _row_hashes(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Exact integer fingerprint of each row `(..., tokens, head_dim)` -> `(..., tokens)`:
    the rows' bit patterns times fixed random odd int64 weights, summed (wrapping)."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[rows.element_size()]
    return (rows.contiguous().view(bits).long() * weights).sum(-1)


def kept_positions(original: torch.Tensor, compressed: torch.Tensor) -> list[list[np.ndarray]]:
    """Positions of `original` `(batch=1, heads, T, d)` that `compressed` `(1, heads, k, d)` kept,
    per head, by exact row matching. Identical original rows are indistinguishable to the
    attention; a kept copy is credited to the earliest of them not yet credited."""
    gen = torch.Generator().manual_seed(0)
    weights = torch.randint(1, 2**62, (original.shape[-1],), generator=gen, dtype=torch.int64) | 1
    weights = weights.to(original.device)
    out = []
    for h in range(original.shape[1]):
        orig, comp = original[0, h], compressed[0, h]
        table: dict[int, list[int]] = {}
        for pos, value in enumerate(_row_hashes(orig, weights).tolist()):
            table.setdefault(value, []).append(pos)
        kept = []
        for row, value in enumerate(_row_hashes(comp, weights).tolist()):
            candidates = table.get(value, [])
            match = next((p for p in candidates if torch.equal(orig[p], comp[row])), None)
            if match is None:
                raise ContributionError(
                    f"kept key row {row} of head {h} is not a copy of any original key: the press "
                    "transforms keys, so its contribution cannot be read by matching rows")
            candidates.remove(match)
            kept.append(match)
        out.append(np.sort(np.asarray(kept, dtype=np.int64)))
    return out


@torch.no_grad()
def observed_kept(loaded, press, input_ids: torch.Tensor) -> list[list[np.ndarray]]:
    """Prefill `input_ids` `(1, T)` under `press`; per layer, per KV head, the kept positions."""
    from transformers import DynamicCache

    from analysis.harness.capture import decoder_layers
    from analysis.harness.methods import attention_for

    model = loaded.model
    before: dict[int, torch.Tensor] = {}
    kept: dict[int, list[np.ndarray]] = {}

    def remember(module, args, kwargs, output):
        # Runs before kvpress's hook: the layer's cache holds the uncompressed prefill.
        before[module.layer_idx] = kwargs["past_key_values"].layers[module.layer_idx].keys

    def compare(module, args, kwargs, output):
        layer = module.layer_idx
        compressed = kwargs["past_key_values"].layers[layer].keys
        kept[layer] = kept_positions(before.pop(layer), compressed)

    attns = [layer.self_attn for layer in decoder_layers(model)]
    hooks = [a.register_forward_hook(remember, with_kwargs=True) for a in attns]
    try:
        with attention_for(press, model), press(model):
            hooks += [a.register_forward_hook(compare, with_kwargs=True) for a in attns]
            model(input_ids=input_ids.to(model.device), past_key_values=DynamicCache(),
                  use_cache=True, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    if sorted(kept) != list(range(len(attns))):
        raise ContributionError(f"the press compressed layers {sorted(kept)} only")
    return [kept[i] for i in range(len(attns))]


def eviction_profile(loaded, spec: MethodSpec, input_ids: torch.Tensor) -> dict:
    from analysis.harness.methods import build_press

    press = build_press(spec, loaded.model)
    t = input_ids.shape[-1]
    per_layer = observed_kept(loaded, press, input_ids)
    counts = np.zeros(t)
    pairs = 0
    for heads in per_layer:
        for positions in heads:
            counts[positions] += 1
            pairs += 1
    sink = int(getattr(press, "n_sink", DEFAULT_SINK)) if spec.name == "streaming_llm" else DEFAULT_SINK
    start = min(sink, t - 1)
    return {"contribution": counts / pairs, "range": (start, max(start + 1, t - DEFAULT_WINDOW)),
            "source": "observed-eviction",
            "cache_lengths": [int(len(heads[0])) for heads in per_layer],
            "kept_fraction_per_layer": [float(np.mean([len(p) for p in heads]) / t)
                                        for heads in per_layer]}


# ------------------------------------------------------------------------------ the job

class ContribCell:
    """cell -> record; picklable (holds a ModelHandle) for the Ray executor."""

    def __init__(self, handle, params: ContribParams):
        self.handle = handle
        self.params = params

    def __call__(self, cell: dict) -> dict:
        from analysis.harness.haystack import text_tokens
        from analysis.harness.methods import method_label

        spec = MethodSpec.model_validate(cell["spec"])
        loaded = self.handle.get()
        info = loaded.info
        t = self.params.context_length
        start = time.perf_counter()
        if spec.name in LINEAR:
            prof = linear_profile(spec, t, info.num_layers, info.num_kv_heads)
        elif spec.name in EVICTION:
            ids = torch.tensor([text_tokens(loaded.tokenizer, t, self.params.text_seed)])
            prof = eviction_profile(loaded, spec, ids)
        else:
            raise ContributionError(f"method {spec.name!r} has no contribution profile (it keeps "
                                    "the whole cache)")
        contribution = prof.pop("contribution")
        start_, stop = prof.pop("range")
        return {"method": method_label(spec), "spec": spec.model_dump(mode="json"),
                "contribution": np.round(contribution, 6).tolist(),
                "positions": list(range(t)), **summarise(contribution, start_, stop), **prof,
                "seconds": round(time.perf_counter() - start, 3)}


def run_contrib(model, store, params: ContribParams, progress=None, should_stop=None,
                executor: str = "local", ray_address: str | None = None) -> str:
    """One cell per method (cell id = its label); returns the run key."""
    from analysis.harness.methods import method_label
    from analysis.results.runner import ModelHandle, run_cells
    from analysis.results.store import project_commit

    handle = model if isinstance(model, ModelHandle) else ModelHandle.from_loaded(model)
    info = handle.get().info
    if params.context_length > info.context_length:
        raise ValueError(f"context_length {params.context_length} exceeds the model's context "
                         f"({info.context_length}); use --context-length {info.context_length} or less.")
    for spec in params.methods:
        if spec.name not in LINEAR | EVICTION:
            raise ValueError(f"method {spec.name!r} has no contribution profile (it keeps the whole "
                             "cache); leave it out of --methods.")
    config = {"model": info.key, "params": params.key_dict(), "project_commit": project_commit()}
    run = store.open_run("contrib", config)
    cells = [{"id": method_label(s), "spec": s.model_dump(mode="json")} for s in params.methods]
    records = run_cells(run, cells, ContribCell(handle, params), executor=executor,
                        progress=progress, should_stop=should_stop, ray_address=ray_address,
                        desc="contrib (methods)", show_progress=progress is None)
    summary = {label: {k: rec[k] for k in ("source", "one_minus_gini", "oldest_over_newest",
                                           "min_over_max")}
               for label, rec in records.items()}
    run.write_metrics({"context_length": params.context_length, "text_seed": params.text_seed,
                       "methods": summary,
                       "seconds": {label: rec["seconds"] for label, rec in records.items()}})
    return run.key
