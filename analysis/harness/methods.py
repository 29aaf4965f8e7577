"""The method registry: a `MethodSpec` (name, compression_ratio, params) -> a kvpress press.

    press = build_press(MethodSpec(name="snapkv", compression_ratio=0.75), model)
    with attention_for(press, model):          # eager attention while H2O runs, then back
        ...prefill under `press(model)`...
    check_cache_lengths(press, model, prompt_tokens, cache_lengths)   # raises if it did not compress

Every method uses kvpress's budget semantics: `compression_ratio` is the fraction of the
prefill's KV pairs removed. `expected_cache_lengths` says, per layer, how long the cache must be
after a prefill of T tokens, and `check_cache_lengths` turns a method that silently did not
compress (or compressed to another size) into a `CompressionError` instead of a result.

| name | press | params (defaults) |
|---|---|---|
| full | None | - |
| faedkv | faedkv.FAEDKVPress | variant (iwdft; dimsplit: the dimension split, see below), dim_share (0.5; dimsplit only), key_space (post_rope), sink_tokens (4), window (64), window_share (0: a fixed window; X: at least X of the kept rows), mass_correction (true), slot_normalization (mean), exact_share (0: no exact middle tokens), exact_scorer (expected_attention; also knorm, keydiff, snapkv, tova, kvzip), exact_pool (head; layer: the layer's heads together; dimsplit hybrids also global, with kvzip), slot_fit (mean; probes: attention-matched), fit_probes (64), plan (null: every bin), layer_ratios (null; a list: one ratio per layer averaging the ratio, through kvpress's PerLayerCompressionPress) |
| dct_iterative | faedkv.FAEDKVPress(variant="dct-iterative") | as faedkv, without variant and dim_share |
| streaming_llm | StreamingLLMPress | n_sink (4) |
| snapkv | SnapKVPress | window_size (64), kernel_size (5) |
| h2o | ObservedAttentionPress (eager attention) | - |
| pyramidkv | PyramidKVPress (per-layer budgets, same total) | window_size (64), kernel_size (5), beta (20) |
| tova | TOVAPress | - |
| knorm | KnormPress | - |
| expected_attention | ExpectedAttentionPress (query statistics from the prompt itself: no download) | n_future_positions (512), n_sink (4), use_covariance (true), use_vnorm (true), epsilon (0) |
| kvzip | KVzipPress (scores by reconstructing the context: 2-3 extra prefill passes; evicted pairs are masked, see below) | n_sink (4), layerwise (false), kvzip_plus_normalization (false), chunk_size (2048) |
| keydiff | KeyDiffPress (keeps the keys least similar to the mean key) | - |
| lagkv | LagKVPress (min-max statistics of the next lag partition) | n_sink (4), lag_size (128), cross_scoring (false) |
| compactor | CompactorPress (leverage scores + non-causal chunked attention; its Gaussian sketch seeded per layer) | sink_size_start (8), sink_size_end (4), chunk_size (256), sketch_dimension (48), seed (0) |
| merging | MergingPress around SnapKVPress (merge-on-evict: each evicted value folded into its most similar kept one) | window_size (64), kernel_size (5), similarity_threshold (0), merge_fraction (1) |

`faedkv` is imported only when a FAEDKV method is built, so the baselines work without it.

KVzip is head- and layer-adaptive: kvpress masks its evicted (layer, head, position) pairs
(`masked_key_indices`, read by kvpress's attention patch) instead of removing rows, so its cache
keeps all T rows (no memory saved) and `check_cache_lengths` counts the masked pairs against
its budget instead. It loads the model's tokenizer from `model.config.name_or_path`.

FAEDKV's `variant="dimsplit"` (FourierAttention's dimension split) keeps a reconstructed row for
every token too: its cache has T rows, and `check_cache_lengths` checks the equivalent rows it
stored (`last_stats[layer]["equivalent_rows"]`: exact dims + low-pass coefficients, in rows of
head_dim numbers) against kvpress's budget instead of the row count.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from types import SimpleNamespace
from typing import Any

from analysis.api.params import METHODS, MethodSpec


class CompressionError(RuntimeError):
    """A press left the cache at a length other than its budget (e.g. it did not compress)."""


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    name: str
    press_class: str | None            # "module:Class" (imported lazily); None for full
    defaults: dict                     # the method's own params and their defaults
    fixed: dict = dataclasses.field(default_factory=dict)   # constructor args the name implies
    attn_implementation: str | None = None                 # "eager" when the press reads attentions

    def press_type(self):
        module, cls = self.press_class.split(":")
        return getattr(__import__(module, fromlist=[cls]), cls)


_FAEDKV_DEFAULTS = {"variant": "iwdft", "key_space": "post_rope", "sink_tokens": 4, "window": 64, "window_share": 0.0,
                    "mass_correction": True, "slot_normalization": "mean", "exact_share": 0.0,
                    "exact_scorer": "expected_attention", "exact_pool": "head", "slot_fit": "mean", "fit_probes": 64,
                    "plan": None, "layer_ratios": None, "dim_share": 0.5}

REGISTRY: dict[str, MethodEntry] = {e.name: e for e in (
    MethodEntry("full", None, {}),
    MethodEntry("faedkv", "faedkv:FAEDKVPress", dict(_FAEDKV_DEFAULTS)),
    MethodEntry("dct_iterative", "faedkv:FAEDKVPress",
                {k: v for k, v in _FAEDKV_DEFAULTS.items() if k not in ("variant", "dim_share", "window_share")},
                fixed={"variant": "dct-iterative"}),
    MethodEntry("streaming_llm", "kvpress:StreamingLLMPress", {"n_sink": 4}),
    MethodEntry("snapkv", "kvpress:SnapKVPress", {"window_size": 64, "kernel_size": 5}),
    MethodEntry("h2o", "kvpress:ObservedAttentionPress", {}, attn_implementation="eager"),
    MethodEntry("pyramidkv", "kvpress:PyramidKVPress",
                {"window_size": 64, "kernel_size": 5, "beta": 20}),
    MethodEntry("tova", "kvpress:TOVAPress", {}),
    MethodEntry("knorm", "kvpress:KnormPress", {}),
    MethodEntry("expected_attention", "kvpress:ExpectedAttentionPress",
                {"n_future_positions": 512, "n_sink": 4, "use_covariance": True,
                 "use_vnorm": True, "epsilon": 0.0}),
    MethodEntry("kvzip", "faedkv.kvzip:TemplateAwareKVzip",
                {"n_sink": 4, "layerwise": False, "kvzip_plus_normalization": False,
                 "chunk_size": 2048}),
    MethodEntry("keydiff", "kvpress:KeyDiffPress", {}),
    MethodEntry("lagkv", "kvpress:LagKVPress", {"n_sink": 4, "lag_size": 128, "cross_scoring": False}),
    MethodEntry("compactor", "analysis.harness.methods:SeededCompactor",
                {"sink_size_start": 8, "sink_size_end": 4, "chunk_size": 256,
                 "sketch_dimension": 48, "seed": 0}),
    MethodEntry("merging", "kvpress:MergingPress",
                {"window_size": 64, "kernel_size": 5, "similarity_threshold": 0.0,
                 "merge_fraction": 1.0}),
)}

assert tuple(REGISTRY) == tuple(METHODS), (
    f"analysis.harness.methods implements {sorted(REGISTRY)}, analysis.api.params.METHODS lists {sorted(METHODS)}")


def entry(name: str) -> MethodEntry:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def method_params(spec: MethodSpec) -> dict:
    """The spec's params merged over the method's defaults; unknown params are an error."""
    e = entry(spec.name)
    unknown = sorted(set(spec.params) - set(e.defaults))
    if spec.name == "dct_iterative" and spec.params.get("variant") == "dct-iterative":
        unknown.remove("variant")
    if unknown:
        allowed = ", ".join(e.defaults) or "none"
        raise ValueError(f"method {spec.name!r} has no parameter(s) {', '.join(unknown)}; "
                         f"its parameters: {allowed}")
    return {**e.defaults, **{k: v for k, v in spec.params.items() if k in e.defaults}}


def method_requirements(spec: MethodSpec) -> dict:
    """What the model must provide: {"attn_implementation": "eager" | None}."""
    return {"attn_implementation": entry(spec.name).attn_implementation}


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list) and len(value) > 4 and all(isinstance(v, (int, float)) for v in value):
        # a per-layer list: its length, mean and a digest keep labels short and distinct
        digest = hashlib.sha1(json.dumps(value).encode()).hexdigest()[:6]
        return f"{len(value)}x~{sum(value) / len(value):.3g}#{digest}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return f"{value:g}" if isinstance(value, float) else str(value)


def method_label(spec: MethodSpec) -> str:
    """`spec.label`, plus the params it does not show that differ from their defaults, so two
    different specs never share a label: "faedkv-iwdft[sink_tokens=8]@0.75"; "full" for full."""
    if spec.name == "full":
        return "full"
    e = entry(spec.name)
    shown = {"variant", "key_space"} if spec.name == "faedkv" else set()
    plan = spec.params.get("plan")
    if isinstance(plan, dict) and plan.get("name"):
        shown.add("plan")          # spec.label shows a named plan
    extras = [f"{k}={_format_value(v)}" for k, v in sorted(spec.params.items())
              if k not in shown and k in e.defaults and v != e.defaults[k]]
    base, ratio = spec.label.rsplit("@", 1)
    return f"{base}[{','.join(extras)}]@{ratio}" if extras else spec.label


def build_press(spec: MethodSpec, model) -> Any:
    """The kvpress press for `spec` (None for "full"). `model` is the loaded causal LM (FAEDKV
    reads its RoPE settings for pre-RoPE keys)."""
    e = entry(spec.name)
    params = method_params(spec)
    if e.press_class is None:
        if spec.compression_ratio:
            raise ValueError(f"method 'full' keeps the whole cache; its compression_ratio must be "
                             f"0, got {spec.compression_ratio}")
        return None
    if e.name in ("faedkv", "dct_iterative"):
        return _build_faedkv(spec, {**params, **e.fixed}, model)
    if e.name == "merging":
        from kvpress import SnapKVPress

        inner = SnapKVPress(compression_ratio=spec.compression_ratio,
                            window_size=params.pop("window_size"), kernel_size=params.pop("kernel_size"))
        return e.press_type()(press=inner, **params)
    if e.name == "kvzip":
        _check_tokenizer_source(model, "method 'kvzip'")
    return e.press_type()(compression_ratio=spec.compression_ratio, **params)


def _check_tokenizer_source(model, who: str) -> None:
    """KVzip loads the tokenizer from `model.config.name_or_path` for its reconstruction
    prompt; refuse before the prefill when that names nothing."""
    import os

    source = getattr(model.config, "name_or_path", "") or ""
    if not source or (os.path.sep in source and not os.path.isdir(source)):
        raise ValueError(f"{who} loads the model's tokenizer from model.config.name_or_path "
                         f"({source!r}), which names no folder; load the model with "
                         "analysis.harness.models.load_model (it records the folder) or set name_or_path.")


def _build_faedkv(spec: MethodSpec, params: dict, model):
    """FAEDKVPress; with layer_ratios, inside kvpress's PerLayerCompressionPress (one ratio per
    layer, their mean the spec's ratio, so the same total budget)."""
    try:
        import faedkv
    except ImportError as exc:
        raise ValueError(f"method {spec.name!r} needs the `faedkv` package, which failed to import "
                         f"({exc})") from exc
    if params.get("exact_share") and params.get("exact_scorer") == "kvzip" and spec.compression_ratio:
        _check_tokenizer_source(model, f"{spec.name} with exact_scorer='kvzip'")
    plan = params.pop("plan")
    if isinstance(plan, dict):
        plan = faedkv.FrequencyPlan.from_json(plan)
    ratios = params.pop("layer_ratios")
    press = faedkv.FAEDKVPress(compression_ratio=spec.compression_ratio, plan=plan, **params)
    if ratios is None:
        return press
    layers = _num_layers(model)       # (their mean against the ratio: MethodSpec checks it)
    if len(ratios) != layers:
        raise ValueError(f"layer_ratios has {len(ratios)} ratios but the model has {layers} layers; "
                         "derive them for this model (python -m analysis layer-budget)")
    if press.exact_share and press.exact_scorer == "kvzip":
        raise ValueError("layer_ratios cannot combine with exact_scorer='kvzip' (KVzip scores after "
                         "the prefill, outside the per-layer wrapper's hooks)")
    import logging

    from kvpress import PerLayerCompressionPress

    wrapper_log = logging.getLogger("kvpress.presses.per_layer_compression_press")
    level = wrapper_log.level
    wrapper_log.setLevel(logging.ERROR)   # its flash-attention warning: faedkv_sdpa aligns the mask
    try:
        return PerLayerCompressionPress(press.as_scorer(), compression_ratios=list(ratios))
    finally:
        wrapper_log.setLevel(level)


# ------------------------------------------------------------------- presses we adapt


def _define_presses():
    """SeededCompactor subclasses a kvpress class; defined on first use (kvpress imports torch
    and transformers)."""
    import torch
    from kvpress import CompactorPress

    @dataclasses.dataclass
    class SeededCompactor(CompactorPress):
        """kvpress's CompactorPress with its Gaussian sketch drawn from `seed` (and the layer):
        the same prompt compresses the same way every time, and the global RNG is untouched."""
        seed: int = 0

        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            devices = [keys.device.index or 0] if keys.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed * 1000 + int(module.layer_idx))
                return super().score(module, hidden_states, keys, values, attentions, kwargs)

    return SeededCompactor


_ADAPTED: dict = {}


def __getattr__(name: str):
    """`analysis.harness.methods.SeededCompactor`, built on first access (see _define_presses)."""
    if name == "SeededCompactor":
        if not _ADAPTED:
            _ADAPTED[name] = _define_presses()
        return _ADAPTED[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------- attention switch


def press_attn_implementation(press) -> str | None:
    """"eager" when the press scores tokens by the attention weights the layer returns (only
    eager attention returns them), else None."""
    from kvpress import ObservedAttentionPress

    inner = getattr(press, "press", press)     # wrappers such as KeyRerotationPress
    return "eager" if isinstance(inner, ObservedAttentionPress) else None


@contextlib.contextmanager
def attention_for(press, model):
    """Switch the model to the attention implementation the press needs for the duration of the
    block (H2O on an sdpa model runs eager), and restore the previous one after. Not
    thread-safe: one generation per model at a time."""
    needed = press_attn_implementation(press) if press is not None else None
    previous = model.config._attn_implementation
    if needed is None or needed == previous:
        yield
        return
    model.set_attn_implementation(needed)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


# --------------------------------------------------------------------------- cache lengths


def _layer_module(model, layer_idx: int):
    """What kvpress's budget functions read from an attention module."""
    return SimpleNamespace(config=model.config, layer_idx=layer_idx)


def _num_layers(model) -> int:
    return model.config.num_hidden_layers


def expected_cache_lengths(press, model, prompt_tokens: int) -> list[int] | None:
    """Per-layer cache length after a compressed prefill of `prompt_tokens` tokens, from the
    press's own budget rule; None for a press whose rule this registry does not know."""
    from kvpress import KVzipPress, MergingPress, PyramidKVPress, ScorerPress
    from kvpress.utils import compute_n_kept

    layers = _num_layers(model)
    if press is None:
        return [prompt_tokens] * layers
    ratio = getattr(press, "compression_ratio", None)
    if ratio == 0 or isinstance(press, KVzipPress):     # KVzip masks pairs, keeps every row
        return [prompt_tokens] * layers
    if isinstance(press, PyramidKVPress):
        return [press.get_layer_budget(_layer_module(model, i), prompt_tokens) for i in range(layers)]
    if isinstance(press, (ScorerPress, MergingPress)):
        return [compute_n_kept(prompt_tokens, ratio)] * layers
    if dimsplit_press(press) is not None:       # every token keeps a (reconstructed) row
        return [prompt_tokens] * layers
    if type(press).__name__ == "FAEDKVPress":
        return [faedkv_cache_length(press, prompt_tokens)] * layers
    inner = getattr(getattr(press, "press", None), "press", None)
    if type(inner).__name__ == "FAEDKVPress" and hasattr(press, "compression_ratios"):
        return [inner.layout(prompt_tokens, r).rows for r in press.compression_ratios]
    return None


def dimsplit_press(press):
    """The FAEDKVPress(variant="dimsplit") in `press` (itself or inside kvpress's
    PerLayerCompressionPress), or None."""
    for candidate in (press, getattr(getattr(press, "press", None), "press", None)):
        if type(candidate).__name__ == "FAEDKVPress" and candidate.variant == "dimsplit":
            return candidate
    return None


def equivalent_budgets(press, model, prompt_tokens: int) -> list[int] | None:
    """Per layer, kvpress's budget in rows, max(1, int(T (1 - ratio))) (the layer's ratio under
    PerLayerCompressionPress), for a dimsplit press; None for any other press."""
    from faedkv.budget import kept_rows

    inner = dimsplit_press(press)
    if inner is None:
        return None
    ratios = getattr(press, "compression_ratios", None) or [inner.compression_ratio] * _num_layers(model)
    return [prompt_tokens if r == 0 else kept_rows(prompt_tokens, r) for r in ratios]


def _check_equivalent_rows(press, model, prompt_tokens: int) -> None:
    """A dimsplit press keeps T rows; what it stored (exact dims + low-pass coefficients, in rows
    of head_dim numbers, `last_stats[layer]["equivalent_rows"]`) must fit kvpress's budget."""
    inner = dimsplit_press(press)
    budgets = equivalent_budgets(press, model, prompt_tokens)
    stored = [inner.last_stats.get(i, {}).get("equivalent_rows") for i in range(len(budgets))]
    bad = [i for i, (got, want) in enumerate(zip(stored, budgets)) if got is None or got > want + 1e-9]
    if inner.exact_pool == "global" and None not in stored:   # one budget for the whole model
        if sum(stored) > sum(budgets) + 1e-6:
            raise CompressionError(
                f"FAEDKVPress (variant 'dimsplit', exact_pool 'global', compression_ratio "
                f"{inner.compression_ratio}) stored {sum(stored):.1f} equivalent rows over all layers, "
                f"kvpress's budget is {sum(budgets)}: the method did not apply its budget")
        return
    if bad:
        raise CompressionError(
            f"FAEDKVPress (variant 'dimsplit', compression_ratio {inner.compression_ratio}) keeps "
            f"all {prompt_tokens} rows and is checked by the bytes it stores: layers {bad} stored "
            f"{[stored[i] for i in bad]} equivalent rows (exact dims + low-pass coefficients), "
            f"kvpress's budget is {[budgets[i] for i in bad]}: the method did not apply its budget")


def faedkv_cache_length(press, prompt_tokens: int) -> int:
    """kvpress's budget, max(1, int(T * (1 - ratio))) rows, laid out by the press
    (faedkv.budget.layout); T itself when the press compresses nothing (ratio 0)."""
    return press.layout(prompt_tokens).rows


def masked_pairs(model) -> list[int]:
    """Per layer, the (batch, head, position) pairs kvpress's attention patch masks out
    (`masked_key_indices`, set by KVzip after its prefill, cleared by the next prefill)."""
    counts = []
    for layer in model.model.layers:
        indices = getattr(layer.self_attn, "masked_key_indices", None)
        counts.append(0 if indices is None else int(indices[0].numel()))
    return counts


def expected_masked_pairs(press, model, prompt_tokens: int) -> list[int] | int:
    """KVzip's budget: int(ratio x layers x kv_heads x T) masked pairs in all (per layer
    int(ratio x kv_heads x T) when layerwise), for batch 1 as kvpress's KVzip supports."""
    heads = model.config.num_key_value_heads
    if press.layerwise:
        return [int(heads * prompt_tokens * press.compression_ratio)] * _num_layers(model)
    return int(_num_layers(model) * heads * prompt_tokens * press.compression_ratio)


def _check_masked_pairs(press, model, prompt_tokens: int) -> None:
    masked = masked_pairs(model)
    want = expected_masked_pairs(press, model, prompt_tokens)
    if (masked if isinstance(want, list) else sum(masked)) != want:
        raise CompressionError(
            f"{type(press).__name__} (compression_ratio {press.compression_ratio}) masked "
            f"{masked} pairs per layer for a {prompt_tokens}-token prompt, expected {want} "
            f"{'per layer' if isinstance(want, list) else 'in all'}: the method did not apply its budget")


def check_cache_lengths(press, model, prompt_tokens: int, cache_lengths: list[int]) -> list[int]:
    """Raise CompressionError unless every layer's cache has the press's budgeted length (for
    KVzip: every row kept and the budgeted number of pairs masked; for FAEDKV's dimsplit: every
    row kept and the equivalent rows it stored within kvpress's budget); returns the expected
    lengths. A press whose budget rule is unknown must at least have shrunk every layer when
    its compression_ratio is positive."""
    from kvpress import KVzipPress

    expected = expected_cache_lengths(press, model, prompt_tokens)
    name = type(press).__name__ if press is not None else "full cache"
    if isinstance(press, KVzipPress) and press.compression_ratio > 0:
        _check_masked_pairs(press, model, prompt_tokens)
    if dimsplit_press(press) is not None:
        _check_equivalent_rows(press, model, prompt_tokens)
    if expected is None:
        ratio = getattr(press, "compression_ratio", 0) or 0
        if ratio > 0 and any(n >= prompt_tokens for n in cache_lengths):
            raise CompressionError(f"{name} at compression_ratio {ratio} left a cache of "
                                   f"{cache_lengths} for a {prompt_tokens}-token prompt: it did "
                                   "not compress")
        return list(cache_lengths)
    if list(cache_lengths) != expected:
        bad = [i for i, (a, b) in enumerate(zip(cache_lengths, expected)) if a != b]
        raise CompressionError(
            f"{name} (compression_ratio {getattr(press, 'compression_ratio', 0)}) left cache "
            f"lengths {cache_lengths} for a {prompt_tokens}-token prompt, expected {expected} "
            f"(layers {bad or 'count'} differ): the method did not apply its budget")
    return expected
