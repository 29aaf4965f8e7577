"""Validated parameters of every job the backend runs (torch-free: the app and client import it).

One pydantic model per job kind. The CLI builds the same models from its flags, the server
validates request bodies with them, and the results store keys runs on their `.key_dict()`.
Bounds are deliberate: a request outside them is a 422 naming the field, never a crash.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Method names the registry (analysis.methods) knows. Kept here so the app can list them
# without importing torch; analysis.methods asserts it implements exactly these.
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
)
VARIANTS = ("iwdft", "resample", "dct-iterative")
KEY_SPACES = ("post_rope", "pre_rope")
QUERY_MODES = ("query_agnostic", "query_aware")
NEEDLE_KINDS = ("sentence", "passkey", "multi")
SUITE_TASKS = ("multikey_niah", "multivalue_niah", "variable_tracking", "common_words", "essay_qa")

MAX_GRID_CELLS = 20_000     # a job may not ask for more (configurable on the server)
MAX_CONTEXT = 131_072       # further bounded by the loaded model's context on the server


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def key_dict(self) -> dict:
        """What identifies this request in the results store (sorted, JSON-safe)."""
        return self.model_dump(mode="json")


class MethodSpec(Strict):
    """A compression method at a budget. `params` are the method's own knobs, e.g. for faedkv
    {"variant": "iwdft", "key_space": "post_rope", "sink_tokens": 4, "window": 64,
     "mass_correction": false, "plan": <FrequencyPlan JSON dict or null>}."""
    name: str
    compression_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    params: dict = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; known: {', '.join(METHODS)}")
        return v

    @model_validator(mode="after")
    def _faedkv_params(self):
        p = self.params
        if "variant" in p and p["variant"] not in VARIANTS:
            raise ValueError(f"unknown faedkv variant {p['variant']!r}; use one of {VARIANTS}")
        if "key_space" in p and p["key_space"] not in KEY_SPACES:
            raise ValueError(f"unknown key_space {p['key_space']!r}; use one of {KEY_SPACES}")
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
    context_length: int = Field(2048, ge=64, le=MAX_CONTEXT)
    depth: float = Field(50.0, ge=0.0, le=100.0)
    seed: int = Field(0, ge=0)
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
    max_new_tokens: int = Field(32, ge=1, le=512)
    compare_full: bool = True       # also answer with the full cache, same prompt


class GridBase(Strict):
    methods: list[MethodSpec] = Field(min_length=1, max_length=64)
    query_mode: Literal["query_agnostic", "query_aware"] = "query_agnostic"
    samples: int = Field(5, ge=1, le=100)
    seed: int = Field(0, ge=0)
    max_new_tokens: int = Field(32, ge=1, le=256)


class NeedleParams(GridBase):
    needle: Literal["sentence", "passkey", "multi"] = "sentence"
    num_needles: int = Field(3, ge=1, le=10)                # for needle == "multi"
    lengths: list[int] = Field(default=[1024, 2048, 4096], min_length=1, max_length=32)
    depths: list[float] = Field(default=[0, 25, 50, 75, 100], min_length=1, max_length=41)
    depth_spacing: Literal["given", "linear", "sigmoid"] = "given"
    num_depths: int = Field(5, ge=1, le=41)                 # used when spacing != "given"

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
    context_length: int = Field(2048, ge=256, le=MAX_CONTEXT)

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
    prefix_tokens: int = Field(2048, ge=64, le=MAX_CONTEXT)
    continuation_tokens: int = Field(256, ge=8, le=4096)
    num_texts: int = Field(3, ge=1, le=49)
    seed: int = Field(0, ge=0)

    def num_cells(self) -> int:
        return len(self.methods) * self.num_texts


class SpectraParams(Strict):
    num_tokens: int = Field(2048, ge=64, le=MAX_CONTEXT)
    text_seed: int = Field(0, ge=0)          # which essays (0 = the first, in file order)
    grid_points: int = Field(257, ge=17, le=4097)   # fixed normalised-frequency grid on [0, 0.5]
    chunks: int = Field(22, ge=2, le=256)

    def num_cells(self) -> int:
        return 1


class AblateParams(Strict):
    chunks: int = Field(22, ge=2, le=256)
    layers: list[int] | None = None            # None: every layer
    target: Literal["kv", "keys", "values"] = "kv"
    prefix_tokens: int = Field(2048, ge=64, le=MAX_CONTEXT)
    continuation_tokens: int = Field(256, ge=8, le=4096)
    num_texts: int = Field(3, ge=1, le=49)
    needle_samples: int = Field(2, ge=0, le=50)   # also the needle answer's NLL (0: skip)
    sink_tokens: int = Field(4, ge=0, le=4096)
    window: int = Field(64, ge=0, le=65536)
    seed: int = Field(0, ge=0)

    def num_cells(self, num_layers: int) -> int:
        layers = len(self.layers) if self.layers is not None else num_layers
        return layers * self.chunks + 1


class ContribParams(Strict):
    methods: list[MethodSpec] = Field(min_length=1, max_length=64)
    context_length: int = Field(2048, ge=64, le=MAX_CONTEXT)
    text_seed: int = Field(0, ge=0)

    def num_cells(self) -> int:
        return len(self.methods)


JOB_PARAMS: dict[str, type[Strict]] = {
    "generate": GenerateParams,
    "needle": NeedleParams,
    "suite": SuiteParams,
    "ppl": PplParams,
    "spectra": SpectraParams,
    "ablate": AblateParams,
    "contrib": ContribParams,
}
