"""Validated parameters of every job the backend runs (torch-free: the app and client import it).

One pydantic model per job kind. The CLI builds the same models from its flags, the server
validates request bodies with them, and the results store keys runs on their `.key_dict()`.
Bounds are deliberate: a request outside them is a 422 naming the field, never a crash.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, Callable, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt,
                      field_validator, model_validator)

# Numbers are never coerced from strings ("512" is a 422, not a length) and bools never from 0/1.
Int = StrictInt
Float = Annotated[float, Field(strict=True)]      # an int is a float too (0 -> 0.0), a string is not
Bool = StrictBool

# Method names the registry (analysis.harness.methods) knows. Kept here so the app can list them
# without importing torch; analysis.harness.methods asserts it implements exactly these.
METHODS = (
    "full",
    "faedkv",             # variant / key_space / plan / sink / window / mass_correction in params
    "dct_iterative",      # FreqKV-style comparator from faedkv
    "streaming_llm",
    "snapkv",
    "h2o",                # kvpress ObservedAttentionPress (eager attention)
    "pyramidkv",
    "tova",
    "knorm",
    "expected_attention",
    "kvzip",              # kvpress KVzipPress (context reconstruction; masks evicted pairs)
    "keydiff",
    "lagkv",
    "compactor",
    "merging",            # kvpress MergingPress around SnapKV (merge-on-evict)
)
# What the app and the tasks know of a method besides its name (torch-free; the presses are in
# analysis.harness.methods). PLANNED: takes a frequency plan. A contribution profile exists for
# LINEAR methods (a fixed linear map along the token axis) and EVICTION presses (kept rows are
# copies of original rows; not merging, which averages what it evicts into the kept rows, nor
# kvzip, which hides pairs behind fake keys).
PLANNED = frozenset({"faedkv", "dct_iterative"})
LINEAR = PLANNED
EVICTION = frozenset({"streaming_llm", "snapkv", "h2o", "pyramidkv", "tova", "knorm",
                      "expected_attention", "keydiff", "lagkv", "compactor"})
# the slot variants, and "dimsplit" (FourierAttention's dimension split: exact head dims plus a
# low-pass reconstruction of the others at every middle token; faedkv.press.PRESS_VARIANTS)
VARIANTS = ("iwdft", "resample", "dct-iterative", "dimsplit")
DIM_SHARE = 0.5             # dimsplit's default share of the middle budget on exact dims
WINDOW = 64                 # FAEDKV's default recent window (FAEDKVPress's and the method registry's)
KEY_SPACES = ("post_rope", "pre_rope")
SLOT_NORMALIZATIONS = ("mean", "sum")
# FAEDKV's default, FAEDKVPress()'s configuration (tested equal), and the search's best (issue 15, docs/RESULTS.md):
# on Qwen2.5-Coder-1.5B (H200) it meets the goal's five conditions: every needle at ratios 0.5-0.75 at 4K and 16K,
# NLL at 0.5 +0.012 on 16 texts, the full cache's suite score, and ahead of KVzip at 0.75 with intervals apart. The
# dimension split behind KVzip's ranking over every layer and head, 90% of the middle's budget as whole tokens, a
# window of half the kept rows (at least 64). KVzip's ranking runs passes after the prefill and needs the model's
# tokenizer. The method registry's bare "faedkv" stays the iwdft base that stored runs were written against; the CLI
# names this one "faedkv-default" (PRESETS), and the app sends it as "faedkv" with these params.
FAEDKV_DEFAULT = {"variant": "dimsplit", "dim_share": DIM_SHARE, "exact_share": 0.9, "exact_scorer": "kvzip",
                  "exact_pool": "global", "window": WINDOW, "window_share": 0.5}
# the hybrid knobs a slot variant (iwdft, resample, dct-iterative) takes by default: none (faedkv.press.SLOT_HYBRID;
# the dimension split's are FAEDKV_DEFAULT's, faedkv.press.SHIPPED_HYBRID; tested equal)
SLOT_HYBRID = {"exact_share": 0.0, "exact_scorer": "expected_attention", "exact_pool": "head", "window_share": 0.0}
# names the CLI and the app expand to a registry method with params (a run stores the expansion, never the name)
PRESETS = {"faedkv-default": ("faedkv", FAEDKV_DEFAULT)}
# scorers that pick a hybrid's exact middle tokens (faedkv.press.EXACT_SCORERS; tested equal)
EXACT_SCORERS = ("expected_attention", "knorm", "keydiff", "snapkv", "tova", "kvzip")
# where a hybrid's exact tokens compete (faedkv.budget.EXACT_POOLS; tested equal)
EXACT_POOLS = ("head", "layer", "global")
SLOT_FITS = ("mean", "probes")
LAYER_RATIO_SLACK = 0.005
QUERY_MODES = ("query_agnostic", "query_aware")
NEEDLE_KINDS = ("sentence", "passkey", "multi")
SUITE_TASKS = ("multikey_niah", "multivalue_niah", "variable_tracking", "common_words", "essay_qa")

MAX_GRID_CELLS = 20_000     # a job may not ask for more (configurable on the server)
MAX_CONTEXT = 131_072       # further bounded by the loaded model's context on the server
MAX_SEED = 2**31 - 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def key_dict(self) -> dict:
        """What identifies this request in the results store (sorted, JSON-safe)."""
        return self.model_dump(mode="json")


# ------------------------------------------------------------------- method parameter rules


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one method parameter accepts. `check(value)` returns None or what is wrong with it
    (a clause that completes "params.<name> must ..."); nothing is coerced."""
    kind: Literal["int", "float", "bool", "choice", "plan", "ratios"]
    low: float | None = None          # inclusive bounds for int / float
    high: float | None = None
    choices: tuple = ()
    odd: bool = False

    def check(self, value: Any) -> str | None:
        if self.kind == "bool":
            return None if isinstance(value, bool) else "be true or false"
        if self.kind == "choice":
            return None if value in self.choices and isinstance(value, str) else (
                "be one of " + ", ".join(repr(c) for c in self.choices))
        if self.kind == "plan":
            return plan_problem(value)
        if self.kind == "ratios":
            if value is None:
                return None
            if not isinstance(value, list) or not value or any(
                    isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1 for r in value):
                return ("be null or a list of compression ratios in [0, 1), one per layer "
                        "(`python -m analysis layer-budget` writes one)")
            return None
        numeric = (int,) if self.kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric) or (
                isinstance(value, float) and not math.isfinite(value)):
            return f"be {'an integer' if self.kind == 'int' else 'a number'} in {self.range()}"
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            return f"be in {self.range()}, got {value!r}"
        if self.odd and value % 2 == 0:
            return f"be odd (a centred pooling kernel), got {value!r}"
        return None

    def range(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"[{low}, {high}]"


def IntRule(low: int = 0, high: int = MAX_CONTEXT, odd: bool = False) -> Rule:
    return Rule("int", low, high, odd=odd)


def FloatRule(low: float, high: float) -> Rule:
    return Rule("float", low, high)


BOOL = Rule("bool")
PLAN = Rule("plan")

_FAEDKV_RULES = {
    "variant": Rule("choice", choices=VARIANTS),
    "key_space": Rule("choice", choices=KEY_SPACES),
    "sink_tokens": IntRule(0),
    "window": IntRule(0),
    # a window that grows with the budget: at least `window`, this share of the kept rows when more
    "window_share": Rule("float", 0.0, 0.999),
    "mass_correction": BOOL,
    "plan": PLAN,
    "slot_normalization": Rule("choice", choices=SLOT_NORMALIZATIONS),
    # a share of the budget kept as exact middle tokens, chosen by a kvpress scorer
    "exact_share": Rule("float", 0.0, 0.999),
    "exact_scorer": Rule("choice", choices=EXACT_SCORERS),
    # where a hybrid's exact tokens compete: per head, across a layer, across the model (dimsplit)
    "exact_pool": Rule("choice", choices=EXACT_POOLS),
    # attention-matched slots: bias and values refit to the prompt's last fit_probes queries
    "slot_fit": Rule("choice", choices=SLOT_FITS),
    "fit_probes": IntRule(1, 4096),
    # one compression ratio per layer (their mean the method's ratio, within LAYER_RATIO_SLACK)
    "layer_ratios": Rule("ratios"),
    # dimsplit: the share of the middle's budget spent on exact head dims (in [0, 1))
    "dim_share": Rule("float", 0.0, 0.999),
}

# method -> {parameter: Rule}. Every method of METHODS and every parameter of its registry
# defaults (analysis.harness.methods.REGISTRY) has a rule (tests/test_params.py checks it); a parameter
# not listed here is refused at submission. Add a method's rules with the method.
METHOD_RULES: dict[str, dict[str, Rule]] = {
    "full": {},
    "faedkv": dict(_FAEDKV_RULES),
    # the name fixes the variant; "variant": "dct-iterative" is accepted (it is what it runs)
    "dct_iterative": {**{k: r for k, r in _FAEDKV_RULES.items() if k not in ("variant", "dim_share", "window_share")},
                      "variant": Rule("choice", choices=("dct-iterative",))},
    "streaming_llm": {"n_sink": IntRule(0)},
    "snapkv": {"window_size": IntRule(1), "kernel_size": IntRule(1, 1023, odd=True)},
    "h2o": {},
    "pyramidkv": {"window_size": IntRule(1), "kernel_size": IntRule(1, 1023, odd=True),
                  "beta": FloatRule(1, 1e6)},
    "tova": {},
    "knorm": {},
    "expected_attention": {"n_future_positions": IntRule(1), "n_sink": IntRule(0),
                           "use_covariance": BOOL, "use_vnorm": BOOL,
                           "epsilon": FloatRule(0, 1e6)},
    "kvzip": {"n_sink": IntRule(0), "layerwise": BOOL, "kvzip_plus_normalization": BOOL,
              "chunk_size": IntRule(1)},
    "keydiff": {},
    "lagkv": {"n_sink": IntRule(0), "lag_size": IntRule(1), "cross_scoring": BOOL},
    "compactor": {"sink_size_start": IntRule(0), "sink_size_end": IntRule(0),
                  "chunk_size": IntRule(1), "sketch_dimension": IntRule(1, 4096),
                  "seed": IntRule(0, MAX_SEED)},
    "merging": {"window_size": IntRule(1), "kernel_size": IntRule(1, 1023, odd=True),
                "similarity_threshold": FloatRule(0, 1), "merge_fraction": FloatRule(0.01, 1)},
}


# method -> (params, compression_ratio) -> the fewest prompt tokens it can compress, and why.
# The server checks every job's shortest prompt against it before queueing (these presses fail
# with a shape error or an assertion deep in the prefill). FAEDKV's budget rule lives in
# faedkv (the server asks the press itself: `num_slots`).
MINIMUM_TOKENS: dict[str, Callable[[dict, float], tuple[int, str]]] = {
    "streaming_llm": lambda p, r: (p.get("n_sink", 4) + 1, f"n_sink ({p.get('n_sink', 4)}) + 1"),
    "snapkv": lambda p, r: (p.get("window_size", 64) + 1,
                            f"window_size ({p.get('window_size', 64)}) + 1"),
    "pyramidkv": lambda p, r: (p.get("window_size", 64) + 1,
                               f"window_size ({p.get('window_size', 64)}) + 1"),
    "expected_attention": lambda p, r: (p.get("n_sink", 4) + 1, f"n_sink ({p.get('n_sink', 4)}) + 1"),
    "kvzip": lambda p, r: (p.get("n_sink", 4) + 1, f"n_sink ({p.get('n_sink', 4)}) + 1"),
    "lagkv": lambda p, r: (p.get("n_sink", 4) + 1, f"n_sink ({p.get('n_sink', 4)}) + 1"),
    "compactor": lambda p, r: (
        p.get("sink_size_start", 8) + p.get("sink_size_end", 4) + 1,
        f"sink_size_start ({p.get('sink_size_start', 8)}) + sink_size_end "
        f"({p.get('sink_size_end', 4)}) + 1"),
    "merging": lambda p, r: (p.get("window_size", 64) + 1,
                             f"window_size ({p.get('window_size', 64)}) + 1"),
}


def minimum_tokens(spec: "MethodSpec") -> tuple[int, str]:
    """(fewest prompt tokens `spec` can compress, what sets it); (1, "") when any prompt will do."""
    rule = MINIMUM_TOKENS.get(spec.name)
    return rule(spec.params, spec.compression_ratio) if rule else (1, "")


def plan_problem(plan: Any) -> str | None:
    """What is wrong with a FrequencyPlan JSON dict (the shape FrequencyPlan.to_json writes), or
    None. The layer count and per-head lists are checked against the model by the server."""
    if plan is None:
        return None
    if not isinstance(plan, dict):
        return ("be a FrequencyPlan JSON object {\"name\", \"chunks\", \"layers\"} or null, got a "
                + type(plan).__name__)
    unknown = sorted(set(plan) - {"name", "chunks", "layers"})
    if unknown:
        return f"have only the fields name, chunks, layers (unknown: {', '.join(unknown)})"
    chunks = plan.get("chunks", 22)
    if isinstance(chunks, bool) or not isinstance(chunks, int) or not 1 <= chunks <= 4096:
        return f"have chunks an integer in [1, 4096], got {chunks!r}"
    if not isinstance(plan.get("name", ""), str):
        return "have a string name"
    layers = plan.get("layers")
    if not isinstance(layers, list) or not layers:
        return "have layers: a non-empty list with the kept chunks of every layer"
    for i, layer in enumerate(layers):
        for kind, kept in (layer.items() if isinstance(layer, dict) else [("", layer)]):
            if kind not in ("", "key", "value"):
                return f"have layer {i} as a list or {{\"key\": [...], \"value\": [...]}}"
            heads = kept if isinstance(kept, list) and kept and isinstance(kept[0], list) else [kept]
            for chunk_list in heads:
                if not isinstance(chunk_list, list) or any(
                        isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < chunks
                        for c in chunk_list):
                    return f"keep chunks 0..{chunks - 1} in layer {i}, got {chunk_list!r:.60}"
    return None


class MethodSpec(Strict):
    """A compression method at a budget. `params` are the method's own knobs (METHOD_RULES),
    e.g. for faedkv {"variant": "iwdft", "key_space": "post_rope", "sink_tokens": 4,
    "window": 64, "mass_correction": false, "plan": <FrequencyPlan JSON dict or null>}."""
    name: str
    compression_ratio: Float = Field(0.0, ge=0.0, lt=1.0)
    params: dict = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; known: {', '.join(METHODS)}")
        return v

    @model_validator(mode="after")
    def _method_params(self):
        if self.name == "full" and self.compression_ratio != 0:
            raise ValueError(f"method 'full' keeps the whole cache, so its compression_ratio "
                             f"must be 0 (got {self.compression_ratio:g}); drop the ratio or "
                             "pick a compressing method")
        rules = METHOD_RULES.get(self.name, {})
        for key, value in self.params.items():
            if key not in rules:
                allowed = ", ".join(rules) or "none"
                raise ValueError(f"method {self.name!r} has no parameter {key!r}; its "
                                 f"parameters: {allowed}")
            problem = rules[key].check(value)
            if problem:
                raise ValueError(f"params.{key} of method {self.name!r} must {problem}")
        variant = self.params.get("variant", "iwdft")
        if self.params.get("window_share") and variant == "dct-iterative":
            raise ValueError(f"params.window_share of method {self.name!r} lets the window grow with the budget, "
                             "but dct-iterative re-compresses every `window` tokens: drop window_share or pick "
                             "another variant")
        if self.params.get("dim_share", DIM_SHARE) != DIM_SHARE and variant != "dimsplit":
            raise ValueError(f"params.dim_share of method {self.name!r} is the dimension split's "
                             f"knob, but the variant is {variant!r}: set variant to 'dimsplit' or "
                             "drop dim_share")
        if variant == "dimsplit" and self.params.get("plan") is not None:
            raise ValueError(f"params.plan of method {self.name!r} cannot apply to variant "
                             "'dimsplit' (it keeps the low band its budget sizes, not a plan's "
                             "bins): drop the plan (null)")
        pool = self.params.get("exact_pool", "head")
        if pool != "head" and not self.params.get("exact_share"):
            raise ValueError(f"params.exact_pool {pool!r} of method {self.name!r} says where exact tokens "
                             "compete: set exact_share above 0, or exact_pool to 'head'")
        if pool == "global" and variant != "dimsplit":
            raise ValueError(f"params.exact_pool 'global' of method {self.name!r} moves exact tokens between "
                             "layers, which only the dimension split stores: set variant to 'dimsplit', or "
                             "exact_pool to 'layer'")
        if pool == "layer" and variant != "dimsplit" and (self.params.get("plan") is not None
                                                          or self.params.get("slot_fit", "mean") != "mean"):
            raise ValueError(f"params.exact_pool 'layer' of method {self.name!r} gives each head its own number "
                             "of slots, which a plan's bins and slot_fit 'probes' do not cover: drop the plan "
                             "and use slot_fit 'mean'")
        if pool == "global" and self.params.get("exact_scorer") != "kvzip":
            raise ValueError(f"params.exact_pool 'global' of method {self.name!r} ranks every layer's "
                             "tokens together and needs them all scored first: set exact_scorer to "
                             "'kvzip' (or exact_pool to 'layer')")
        ratios = self.params.get("layer_ratios")
        if ratios and abs(sum(ratios) / len(ratios) - self.compression_ratio) > LAYER_RATIO_SLACK:
            raise ValueError(f"params.layer_ratios of method {self.name!r} average "
                             f"{sum(ratios) / len(ratios):.4f} but its compression_ratio is "
                             f"{self.compression_ratio:g}: give the ratio they were derived for, so "
                             "the budget is the same in total")
        return self

    @property
    def label(self) -> str:
        extra = ""
        if self.name == "faedkv":
            extra = "-" + self.params.get("variant", "iwdft")
            if self.params.get("key_space") == "pre_rope":
                extra += "-prerope"
            if self.params.get("plan"):
                extra += "-" + str(self.params["plan"].get("name", "plan"))
        return f"{self.name}{extra}@{self.compression_ratio:g}"


class TaskPrompt(Strict):
    """A prompt for one generation: either a generated needle sample or free text."""
    kind: Literal["needle", "text"] = "needle"
    needle: Literal["sentence", "passkey", "multi"] = "sentence"
    context_length: Int = Field(2048, ge=64, le=MAX_CONTEXT)
    depth: Float = Field(50.0, ge=0.0, le=100.0)
    seed: Int = Field(0, ge=0, le=MAX_SEED)
    text: str | None = Field(None, max_length=1_000_000)       # kind == "text": the context
    question: str | None = Field(None, max_length=10_000)      # kind == "text": the question

    @model_validator(mode="after")
    def _text_needs_text(self):
        if self.kind == "text" and not self.text:
            raise ValueError("kind 'text' needs a non-empty `text` (the context to compress)")
        return self


class GenerateParams(Strict):
    """Interactive: one prompt, one method; the answer, cache sizes, reconstruction error."""
    prompt: TaskPrompt = Field(default_factory=TaskPrompt)
    method: MethodSpec
    query_mode: Literal["query_agnostic", "query_aware"] = "query_agnostic"
    max_new_tokens: Int = Field(32, ge=1, le=512)
    compare_full: Bool = True       # also answer with the full cache, same prompt
    # per layer and KV head: attention-output error and middle/slot mass for the question's
    # queries (analysis.harness.diagnostics); one more prefill of the context with each cache
    diagnostics: Bool = False


class GridBase(Strict):
    methods: list[MethodSpec] = Field(min_length=1, max_length=64)
    query_mode: Literal["query_agnostic", "query_aware"] = "query_agnostic"
    samples: Int = Field(5, ge=1, le=100)
    # samples first_sample .. first_sample + samples - 1: extends a grid that ran samples 0..k-1
    # with new samples only (each sample's seed depends on its index, not on the run)
    first_sample: Int = Field(0, ge=0, le=1000)
    seed: Int = Field(0, ge=0, le=MAX_SEED)
    max_new_tokens: Int = Field(32, ge=1, le=256)

    def key_dict(self) -> dict:
        """As Strict's, without first_sample when it is 0: runs from before it existed keep their keys."""
        key = super().key_dict()
        if not key.get("first_sample"):
            key.pop("first_sample", None)
        return key

    def sample_indices(self) -> range:
        return range(self.first_sample, self.first_sample + self.samples)


class NeedleParams(GridBase):
    needle: Literal["sentence", "passkey", "multi"] = "sentence"
    num_needles: Int = Field(3, ge=1, le=10)                # for needle == "multi"
    lengths: list[Int] = Field(default=[1024, 2048, 4096], min_length=1, max_length=32)
    depths: list[Float] = Field(default=[0, 25, 50, 75, 100], min_length=1, max_length=41)
    depth_spacing: Literal["given", "linear", "sigmoid"] = "given"
    num_depths: Int = Field(5, ge=1, le=41)                 # used when spacing != "given"

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v):
        for n in v:
            if not 64 <= n <= MAX_CONTEXT:
                raise ValueError(f"context length {n} outside [64, {MAX_CONTEXT}]")
        return v

    @field_validator("depths")
    @classmethod
    def _depths(cls, v):
        for d in v:
            if not 0 <= d <= 100:
                raise ValueError(f"depth {d} outside [0, 100] (percent of the context)")
        return v

    def num_cells(self) -> int:
        depths = len(self.depths) if self.depth_spacing == "given" else self.num_depths
        return len(self.methods) * len(self.lengths) * depths * self.samples


class SuiteParams(GridBase):
    tasks: list[str] = Field(default=list(SUITE_TASKS), min_length=1)
    context_length: Int = Field(2048, ge=256, le=MAX_CONTEXT)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v):
        for t in v:
            if t not in SUITE_TASKS:
                raise ValueError(f"unknown suite task {t!r}; known: {', '.join(SUITE_TASKS)}")
        return v

    def num_cells(self) -> int:
        return len(self.methods) * len(self.tasks) * self.samples


class PplParams(Strict):
    methods: list[MethodSpec] = Field(min_length=1, max_length=64)
    prefix_tokens: Int = Field(2048, ge=64, le=MAX_CONTEXT)
    continuation_tokens: Int = Field(256, ge=8, le=4096)
    num_texts: Int = Field(3, ge=1, le=49)
    seed: Int = Field(0, ge=0, le=MAX_SEED)

    def num_cells(self) -> int:
        return len(self.methods) * self.num_texts


class SpectraParams(Strict):
    num_tokens: Int = Field(2048, ge=64, le=MAX_CONTEXT)
    text_seed: Int = Field(0, ge=0, le=MAX_SEED)          # which essays (0 = the first, in file order)
    grid_points: Int = Field(257, ge=17, le=4097)   # fixed normalised-frequency grid on [0, 0.5]
    chunks: Int = Field(22, ge=2, le=256)

    def num_cells(self) -> int:
        return 1


class AblateParams(Strict):
    chunks: Int = Field(22, ge=2, le=256)
    layers: list[Int] | None = Field(None, min_length=1, max_length=4096)   # None: every layer
    target: Literal["kv", "keys", "values"] = "kv"
    prefix_tokens: Int = Field(2048, ge=64, le=MAX_CONTEXT)
    continuation_tokens: Int = Field(256, ge=8, le=4096)
    num_texts: Int = Field(3, ge=1, le=49)
    needle_samples: Int = Field(2, ge=0, le=50)   # also the needle answer's NLL (0: skip)
    sink_tokens: Int = Field(4, ge=0, le=4096)
    window: Int = Field(64, ge=0, le=65536)
    seed: Int = Field(0, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _middle_holds_the_chunks(self):
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {self.layers} lists a layer twice; give each layer once")
        middle = self.prefix_tokens - 1 - self.sink_tokens - self.window
        if middle < 2 * self.chunks:
            raise ValueError(f"a {self.prefix_tokens}-token prefix leaves {middle} middle tokens "
                             f"(sink_tokens {self.sink_tokens}, window {self.window}): too few "
                             f"for {self.chunks} chunks (need {2 * self.chunks}); raise "
                             "prefix_tokens or lower chunks, sink_tokens or window")
        return self

    def num_cells(self, num_layers: int) -> int:
        layers = len(self.layers) if self.layers is not None else num_layers
        return layers * self.chunks + 1


class ContribParams(Strict):
    methods: list[MethodSpec] = Field(min_length=1, max_length=64)
    context_length: Int = Field(2048, ge=64, le=MAX_CONTEXT)
    text_seed: Int = Field(0, ge=0, le=MAX_SEED)

    def num_cells(self) -> int:
        return len(self.methods)
