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
| faedkv | faedkv.FAEDKVPress | variant (iwdft), key_space (post_rope), sink_tokens (4), window (64), mass_correction (false), plan (null: every bin) |
| dct_iterative | faedkv.FAEDKVPress(variant="dct-iterative") | as faedkv, without variant |
| streaming_llm | StreamingLLMPress | n_sink (4) |
| snapkv | SnapKVPress | window_size (64), kernel_size (5) |
| h2o | ObservedAttentionPress (eager attention) | - |
| pyramidkv | PyramidKVPress (per-layer budgets, same total) | window_size (64), kernel_size (5), beta (20) |
| tova | TOVAPress | - |
| knorm | KnormPress | - |
| expected_attention | ExpectedAttentionPress (query statistics from the prompt itself: no download) | n_future_positions (512), n_sink (4), use_covariance (true), use_vnorm (true), epsilon (0) |

`faedkv` is imported only when a FAEDKV method is built, so the baselines work without it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from types import SimpleNamespace
from typing import Any

from analysis.params import METHODS, MethodSpec


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


_FAEDKV_DEFAULTS = {"variant": "iwdft", "key_space": "post_rope", "sink_tokens": 4, "window": 64,
                    "mass_correction": False, "plan": None}

REGISTRY: dict[str, MethodEntry] = {e.name: e for e in (
    MethodEntry("full", None, {}),
    MethodEntry("faedkv", "faedkv:FAEDKVPress", dict(_FAEDKV_DEFAULTS)),
    MethodEntry("dct_iterative", "faedkv:FAEDKVPress",
                {k: v for k, v in _FAEDKV_DEFAULTS.items() if k != "variant"},
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
)}

assert tuple(REGISTRY) == tuple(METHODS), (
    f"analysis.methods implements {sorted(REGISTRY)}, analysis.params.METHODS lists {sorted(METHODS)}")


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
        return _build_faedkv(spec, {**params, **e.fixed})
    return e.press_type()(compression_ratio=spec.compression_ratio, **params)


def _build_faedkv(spec: MethodSpec, params: dict):
    try:
        import faedkv
    except ImportError as exc:
        raise ValueError(f"method {spec.name!r} needs the `faedkv` package, which failed to import "
                         f"({exc})") from exc
    plan = params.pop("plan")
    if isinstance(plan, dict):
        plan = faedkv.FrequencyPlan.from_json(plan)
    return faedkv.FAEDKVPress(compression_ratio=spec.compression_ratio, plan=plan, **params)


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
    from kvpress import PyramidKVPress, ScorerPress
    from kvpress.utils import compute_n_kept

    layers = _num_layers(model)
    if press is None:
        return [prompt_tokens] * layers
    ratio = getattr(press, "compression_ratio", None)
    if ratio == 0:
        return [prompt_tokens] * layers
    if isinstance(press, PyramidKVPress):
        return [press.get_layer_budget(_layer_module(model, i), prompt_tokens) for i in range(layers)]
    if isinstance(press, ScorerPress):
        return [compute_n_kept(prompt_tokens, ratio)] * layers
    if type(press).__name__ == "FAEDKVPress":
        return [faedkv_cache_length(press, prompt_tokens)] * layers
    return None


def faedkv_cache_length(press, prompt_tokens: int) -> int:
    """DEVELOPERS.md, Budget: sink + M + window with M = round((1 - ratio) * T) - sink - window
    (the press's own `num_slots`); T itself when the press compresses nothing (ratio 0, or no
    middle: T <= sink + window)."""
    slots = press.num_slots(prompt_tokens)
    return prompt_tokens if slots == 0 else press.sink_tokens + slots + press.window


def check_cache_lengths(press, model, prompt_tokens: int, cache_lengths: list[int]) -> list[int]:
    """Raise CompressionError unless every layer's cache has the press's budgeted length;
    returns the expected lengths. A press whose budget rule is unknown must at least have
    shrunk every layer when its compression_ratio is positive."""
    expected = expected_cache_lengths(press, model, prompt_tokens)
    name = type(press).__name__ if press is not None else "full cache"
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
