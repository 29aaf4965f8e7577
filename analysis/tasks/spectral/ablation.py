"""Per-layer frequency ablation: how much the loss rises when one chunk of one layer's KV
spectrum is removed (the paper's per-layer study, as FAEDKV-SPEC.md reads it).

    python -m analysis ablate --chunks 22 --layers 0,5,10 --num-texts 3 --target kv
    key = run_ablation(load_model(), store, AblateParams(chunks=22, layers=[0, 5, 10]))

Cell (layer l, chunk c): `faedkv.FrequencyFilterPress` with a plan that keeps every chunk on
every layer except chunk c on layer l removes that band from layer l's middle segment (keys and
values, or only one, `target`; all heads; sink and window untouched; cache length unchanged).
The loss is the continuation NLL of `analysis.tasks.ppl.continuation_nll` (`continuation_tokens`
after a `prefix_tokens` prefix, on `num_texts` essay texts: text i starts at essay seed + i), and,
with `needle_samples` > 0, the NLL of the sentence needle's answer teacher-forced after the
needle prompt (context compressed, question + answer prefix after it, as kvpress asks it).
The cell records, per text, the NLL and its increase over the unfiltered cache (the "baseline"
cell); the matrix is the mean increase over texts with its standard error.

How it is computed (exactly what continuation_nll does with the press, much cheaper): kvpress
compresses each layer's cache after that layer's attention, so a prefill under the press gives
the same cache as an unfiltered prefill whose layer-l entry is then filtered by the press. We
therefore prefill each text once (per process), keep that cache, and per cell run only the
continuation over a copy in which the press's `compress` has filtered layer l; layers the plan
keeps whole are passed on untouched, so the baseline and any full plan give delta == 0 exactly.
tests/test_ablation.py checks the cheap path against continuation_nll under the press. Batching:
one forward pass covers all texts of a cell (batch rows = texts, which share their lengths);
needle prompts differ in length and run one by one. `--executor ray` spreads cells over workers,
each of which prefills the texts once.

Plans: `FrequencyPlan.from_scores(delta_mean, ratio)` at ratios 0.25, 0.5, 0.75 (a plan's ratio
is the fraction of chunks KEPT). Layers not in `--layers` take the scores of the nearest ablated
layer (the lower one on a tie), so a coarse grid still yields a plan for every layer.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from analysis.api.params import AblateParams
from analysis.api.plans import fill_layers

PLAN_RATIOS = (0.25, 0.5, 0.75)
NEEDLE_KIND = "sentence"


def cell_id(layer: int, chunk: int) -> str:
    return f"layer={layer:03d}.chunk={chunk:03d}"


def ablation_layers(params: AblateParams, num_layers: int) -> list[int]:
    layers = list(range(num_layers)) if params.layers is None else list(params.layers)
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the model has layers 0..{num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers {layers} name a layer twice; list each once")
    return sorted(layers)


def ablation_cells(params: AblateParams, num_layers: int) -> list[dict]:
    cells = [{"id": "baseline", "layer": None, "chunk": None}]
    cells += [{"id": cell_id(l, c), "layer": l, "chunk": c}
              for l in ablation_layers(params, num_layers) for c in range(params.chunks)]
    return cells


def drop_plan(num_layers: int, chunks: int, layer: int | None, chunk: int | None):
    """The plan that keeps everything except `chunk` on `layer` (None: keeps everything)."""
    from faedkv.plans import FrequencyPlan

    full = list(range(chunks))
    layers = [full] * num_layers
    if layer is not None:
        layers[layer] = [c for c in full if c != chunk]
    return FrequencyPlan(layers=layers, chunks=chunks,
                         name="full" if layer is None else f"drop-l{layer}-c{chunk}")


# ------------------------------------------------------------------------------ sequences

@dataclasses.dataclass
class Sequences:
    """Scored sequences that share a length, batched: prefix `(B, T)`, continuation `(B, N)`,
    the last `scored` continuation tokens count (N for texts, the answer for needles)."""
    prefix: torch.Tensor
    continuation: torch.Tensor
    scored: int
    keys: list = dataclasses.field(default_factory=list)     # per layer (B, H, T-1, d)
    values: list = dataclasses.field(default_factory=list)


def text_sequences(tokenizer, params: AblateParams) -> Sequences:
    from analysis.harness.haystack import text_tokens

    n = params.prefix_tokens + params.continuation_tokens
    ids = torch.tensor([text_tokens(tokenizer, n, params.seed + i) for i in range(params.num_texts)])
    return Sequences(ids[:, :params.prefix_tokens], ids[:, params.prefix_tokens:],
                     params.continuation_tokens)


def needle_depth(i: int, samples: int) -> float:
    """Depths spread evenly inside the document: 100 (i + 0.5) / samples percent."""
    return 100.0 * (i + 0.5) / samples


def needle_sequences(loaded, params: AblateParams) -> list[Sequences]:
    """One Sequences per needle sample: prefix = the chat-templated context (what the press
    compresses), continuation = question + template + answer prefix + answer; the answer
    tokens are scored."""
    from analysis.harness.generation import prompt_ids
    from analysis.harness.haystack import encode
    from analysis.tasks import stable_seed
    from analysis.tasks.needle import make_sample

    out = []
    for i in range(params.needle_samples):
        seed = stable_seed(params.seed, "ablate-needle", i)
        sample = make_sample(loaded.tokenizer, NEEDLE_KIND, params.prefix_tokens,
                             needle_depth(i, params.needle_samples), seed)
        ids = prompt_ids(loaded, sample.context, sample.question, "query_agnostic",
                         sample.answer_prefix)
        answer = torch.tensor([encode(loaded.tokenizer, " " + sample.answers[0])])
        question = ids["questions_ids"][0].cpu()
        out.append(Sequences(ids["context_ids"].cpu(), torch.cat([question, answer], 1),
                             answer.shape[1]))
    return out


@torch.inference_mode()
def prefill_base(model, seq: Sequences) -> None:
    """The unfiltered cache of prefix[:, :-1] (continuation_nll compresses prefix[:-1])."""
    from transformers import DynamicCache

    cache = DynamicCache()
    model.model(input_ids=seq.prefix[:, :-1].to(model.device), past_key_values=cache)
    seq.keys = [cache.layers[i].keys for i in range(len(cache))]
    seq.values = [cache.layers[i].values for i in range(len(cache))]


@torch.inference_mode()
def filtered_nll(model, seq: Sequences, press=None, layer: int | None = None) -> np.ndarray:
    """Mean NLL of the scored tokens per batch row, over the base cache with `layer` filtered by
    `press.compress` (None: unfiltered). Same inputs and positions as continuation_token_nll."""
    from transformers import DynamicCache

    from analysis.harness.capture import decoder_layers

    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(seq.keys, seq.values)):
        if press is not None and i == layer:
            k, v = press.compress(decoder_layers(model)[i].self_attn, None, k, v, None, {})
        cache.update(k, v, i)
    t, n = seq.prefix.shape[1], seq.continuation.shape[1]
    inputs = torch.cat([seq.prefix[:, -1:], seq.continuation[:, :-1]], 1).to(model.device)
    positions = torch.arange(t - 1, t - 1 + n, device=model.device).expand(inputs.shape[0], n)
    logits = model(input_ids=inputs, past_key_values=cache, position_ids=positions,
                   logits_to_keep=seq.scored).logits
    logp = logits.float().log_softmax(-1)
    target = seq.continuation[:, -seq.scored:].to(model.device)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return nll.mean(-1).cpu().double().numpy()


# ------------------------------------------------------------------------------- the cells

class AblationCell:
    """cell -> record. Picklable (a ModelHandle and the params); the texts' base caches are
    built once per process on first use."""

    def __init__(self, handle, params: AblateParams):
        self.handle = handle
        self.params = params
        self._state = None

    def __getstate__(self):
        return {"handle": self.handle, "params": self.params, "_state": None}

    def state(self):
        if self._state is None:
            loaded = self.handle.get()
            texts = text_sequences(loaded.tokenizer, self.params)
            needles = needle_sequences(loaded, self.params)
            for seq in [texts, *needles]:
                prefill_base(loaded.model, seq)
            base = {"nll": filtered_nll(loaded.model, texts),
                    "needle_nll": np.array([filtered_nll(loaded.model, s)[0] for s in needles])}
            self._state = (loaded, texts, needles, base)
        return self._state

    def __call__(self, cell: dict) -> dict:
        from faedkv.filter_press import FrequencyFilterPress

        start = time.perf_counter()
        loaded, texts, needles, base = self.state()
        p = self.params
        if cell["layer"] is None:
            nll, needle_nll = base["nll"], base["needle_nll"]
        else:
            plan = drop_plan(loaded.info.num_layers, p.chunks, cell["layer"], cell["chunk"])
            press = FrequencyFilterPress(plan=plan, sink_tokens=p.sink_tokens, window=p.window,
                                         target=p.target)
            nll = filtered_nll(loaded.model, texts, press, cell["layer"])
            needle_nll = np.array([filtered_nll(loaded.model, s, press, cell["layer"])[0]
                                   for s in needles])
        return {"layer": cell["layer"], "chunk": cell["chunk"],
                "nll": nll.tolist(), "delta": (nll - base["nll"]).tolist(),
                "needle_nll": needle_nll.tolist(),
                "needle_delta": (needle_nll - base["needle_nll"]).tolist(),
                "seconds": round(time.perf_counter() - start, 3)}


# ------------------------------------------------------------------------------- results

def mean_sem(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the last axis and its standard error (NaN with fewer than 2 samples)."""
    n = rows.shape[-1]
    mean = rows.mean(-1)
    sem = rows.std(-1, ddof=1) / math.sqrt(n) if n > 1 else np.full(mean.shape, np.nan)
    return mean, sem


def derived_plans(scores: np.ndarray, layers: list[int], num_layers: int, name: str) -> dict:
    from faedkv.plans import FrequencyPlan

    full = fill_layers(scores, layers, num_layers)
    return {f"{r:g}": json_plan(FrequencyPlan.from_scores(full, r, name=f"{name}-{r:g}"))
            for r in PLAN_RATIOS}


def json_plan(plan) -> dict:
    import json

    return json.loads(plan.to_json())


def ablation_matrix(records: dict, layers: list[int], chunks: int, field: str) -> np.ndarray:
    """(layers, chunks, samples) of a per-sample field of the cell records."""
    return np.array([[records[cell_id(l, c)][field] for c in range(chunks)] for l in layers],
                    dtype=np.float64)


def run_ablation(model, store, params: AblateParams, progress=None, should_stop=None,
                 executor: str = "local", ray_address: str | None = None) -> str:
    """Compute (or resume) the layer x chunk ablation; returns the run key."""
    from analysis.results.runner import ModelHandle, run_cells
    from analysis.results.store import project_commit

    handle = model if isinstance(model, ModelHandle) else ModelHandle.from_loaded(model)
    info = handle.get().info
    layers = ablation_layers(params, info.num_layers)
    # AblateParams checks that the middle holds the chunks
    if params.prefix_tokens + params.continuation_tokens > info.context_length:
        raise ValueError(f"prefix + continuation ({params.prefix_tokens + params.continuation_tokens}"
                         f") exceeds the model's context ({info.context_length})")
    config = {"model": info.key, "params": params.key_dict(), "project_commit": project_commit()}
    run = store.open_run("ablate", config)
    cells = ablation_cells(params, info.num_layers)
    start = time.perf_counter()
    records = run_cells(run, cells, AblationCell(handle, params), executor=executor,
                        progress=progress, should_stop=should_stop, ray_address=ray_address,
                        desc="ablate (layer x chunk)", show_progress=progress is None)
    delta_mean, delta_sem = mean_sem(ablation_matrix(records, layers, params.chunks, "delta"))
    arrays = {"delta_mean": delta_mean, "delta_sem": delta_sem, "layers": np.array(layers)}
    base = records["baseline"]
    metrics = {
        "layers": layers, "chunks": params.chunks, "target": params.target,
        "baseline_nll": base["nll"], "baseline_nll_mean": float(np.mean(base["nll"])),
        "plans": derived_plans(delta_mean, layers, info.num_layers, "ablation"),
        "plan_note": "ratio = fraction of chunks kept; layers outside `layers` take the scores "
                     "of the nearest ablated layer",
        "max_delta": {"value": float(delta_mean.max()),
                      "layer": layers[int(delta_mean.argmax() // params.chunks)],
                      "chunk": int(delta_mean.argmax() % params.chunks)},
        "cell_seconds": float(sum(r["seconds"] for r in records.values())),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    if params.needle_samples > 0:
        n_mean, n_sem = mean_sem(ablation_matrix(records, layers, params.chunks, "needle_delta"))
        arrays.update(needle_delta_mean=n_mean, needle_delta_sem=n_sem)
        metrics.update(baseline_needle_nll=base["needle_nll"],
                       needle_plans=derived_plans(n_mean, layers, info.num_layers, "needle-ablation"))
    run.put_array("ablation", **arrays)
    run.write_metrics(metrics)
    return run.key


# ------------------------------------------------------------------- plan comparison

PLAN_KINDS = ("ablation", "low-pass", "energy")


def _stored(store, kind: str, key: str | None, info):
    """The run `key`, or the newest complete `kind` run of this model in the store."""
    if key:
        run = store.get(key)
        if run.kind != kind:
            raise ValueError(f"run {key} is a {run.kind} run, not {kind}")
        return run
    for row in store.runs(kind=kind, limit=500):
        run = store.get(row["key"])
        if run.status == "complete" and run.config.get("model") == info.key:
            return run
    raise ValueError(f"no complete {kind} run of {info.name} in {store.root}: run "
                     f"`python -m analysis {'ablate' if kind == 'ablate' else kind} ...` first "
                     f"or pass its key")


def energy_scores(spectra_arrays: dict, chunks: int, key_space: str = "post_rope") -> np.ndarray:
    """(layers, chunks): the IWDFT chunk energy of keys + values summed over KV heads, in the
    key space the method compresses; a spectra run with a multiple of `chunks` chunks is summed
    in groups (chunk c of C covers chunks c*g .. c*g+g-1 of g*C)."""
    from analysis.tasks.spectral.spectra import SPACES, TRANSFORMS

    energy = spectra_arrays["chunk_energy"][:, :, :, SPACES.index(key_space),
                                            TRANSFORMS.index("iwdft")].sum(axis=(1, 2))
    have = energy.shape[-1]
    if have % chunks:
        raise ValueError(f"the spectra run has {have} chunks, the ablation {chunks}: rerun "
                         f"`python -m analysis spectra --chunks {chunks}`")
    return energy.reshape(energy.shape[0], chunks, have // chunks).sum(-1)


def layer_sensitivity(ablation_run, num_layers: int) -> list[float]:
    """Per layer, the summed mean NLL increase of removing each of its chunks (decreases count as
    0); a layer the run did not ablate takes its nearest ablated layer's row (fill_layers)."""
    arrays = ablation_run.get_array("ablation")
    rows = fill_layers(np.clip(arrays["delta_mean"], 0, None), arrays["layers"].tolist(), num_layers)
    return rows.sum(axis=1).tolist()


def layer_budget(store, info, ratio: float, keys: list[str] | None = None, share: float = 0.5) -> dict:
    """Per-layer compression ratios averaging `ratio`, more rows where the ablation runs `keys`
    (default: the newest complete one of this model) lose most (faedkv.budget.layer_ratios,
    their sensitivities summed: e.g. a keys run and a values run)."""
    from faedkv.budget import layer_ratios

    runs = [_stored(store, "ablate", key, info) for key in (keys or [None])]
    sensitivity = np.sum([layer_sensitivity(run, info.num_layers) for run in runs], axis=0)
    return {"ablation_keys": [run.name for run in runs], "sensitivity": sensitivity.tolist(),
            "ratio": ratio, "share": share,
            "layer_ratios": layer_ratios(sensitivity.tolist(), ratio, share)}


def comparison_plans(ablation_run, spectra_run, num_layers: int, keep: float,
                     key_space: str = "post_rope") -> dict:
    """{"ablation" | "low-pass" | "energy": FrequencyPlan} keeping `keep` of the chunks."""
    from faedkv.plans import FrequencyPlan

    arrays = ablation_run.get_array("ablation")
    chunks = int(arrays["delta_mean"].shape[1])
    scores = fill_layers(arrays["delta_mean"], arrays["layers"].tolist(), num_layers)
    energy = energy_scores(spectra_run.get_array("spectra"), chunks, key_space)
    return {"ablation": FrequencyPlan.from_scores(scores, keep, name=f"ablation-k{keep:g}"),
            "low-pass": FrequencyPlan(layers=FrequencyPlan.low_pass(keep, num_layers, chunks).layers,
                                      chunks=chunks, name=f"low-pass-k{keep:g}"),
            "energy": FrequencyPlan.from_scores(energy, keep, name=f"energy-k{keep:g}")}


def plan_methods(plans_by_keep: dict, ratios: list[float], variant: str) -> list[dict]:
    """[{"ratio", "plan", "keep", "spec"}]: a plan-free reference (every bin) per ratio, then
    every plan at every keep fraction."""
    from analysis.api.params import MethodSpec

    rows = []
    for r in ratios:
        rows.append({"ratio": r, "plan": "none (all bins)", "keep": 1.0,
                     "spec": MethodSpec(name="faedkv", compression_ratio=r,
                                        params={"variant": variant})})
        for keep, plans in plans_by_keep.items():
            for kind in PLAN_KINDS:
                rows.append({"ratio": r, "plan": kind, "keep": keep,
                             "spec": MethodSpec(name="faedkv", compression_ratio=r,
                                                params={"variant": variant,
                                                        "plan": plans[kind].to_dict()})})
    return rows


def compare_plans(model, store, ratios: list[float], keeps: list[float], needle_params: dict,
                  suite_params: dict, variant: str = "iwdft", ablation_key: str | None = None,
                  spectra_key: str | None = None, executor: str = "local",
                  ray_address: str | None = None) -> dict:
    """Run the needle grid and the suite with faedkv carrying each plan; returns {"markdown",
    "needle_key", "suite_key", "rows"}. Plan keep fractions are separate from the compression
    ratio (DEVELOPERS.md: the plan filters the M bins, the ratio sizes the cache)."""
    from analysis.api.params import NeedleParams, SuiteParams
    from analysis.harness.methods import method_label
    from analysis.results.runner import ModelHandle
    from analysis.tasks.needle import run_needle
    from analysis.tasks.suite import run_suite

    handle = model if isinstance(model, ModelHandle) else ModelHandle.from_loaded(model)
    info = handle.get().info
    abl = _stored(store, "ablate", ablation_key, info)
    spec_run = _stored(store, "spectra", spectra_key, info)
    plans = {k: comparison_plans(abl, spec_run, info.num_layers, k) for k in keeps}
    rows = plan_methods(plans, ratios, variant)
    specs = [r["spec"] for r in rows]
    needle_key = run_needle(handle, store, NeedleParams(methods=specs, **needle_params),
                            executor=executor, ray_address=ray_address)
    suite_key = run_suite(handle, store, SuiteParams(methods=specs, **suite_params),
                          executor=executor, ray_address=ray_address)
    needle = {m["label"]: m for m in store.get(needle_key).metrics()["by_method"]}
    suite = {m["label"]: m for m in store.get(suite_key).metrics()["by_method"]}

    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    def num(x):
        return "-" if x is None else f"{x:.3f}"

    lines = ["| ratio | plan | keep | needle acc. | needle rel. full | suite avg | suite rel. full |",
             "|---|---|---|---|---|---|---|"]
    lines.append(f"| - | full cache | - | {pct(needle['full']['accuracy'])} | 100% | "
                 f"{num(suite['full']['average'])} | 100% |")
    for r in rows:
        label = method_label(r["spec"])
        n, s = needle[label], suite[label]
        lines.append(f"| {r['ratio']:g} | {r['plan']} | {r['keep']:g} | {pct(n['accuracy'])} | "
                     f"{pct(n['rel_to_full'])} | {num(s['average'])} | {pct(s['rel_to_full'])} |")
    table = [{"ratio": None, "plan": "full cache", "keep": None, "label": "full",
              "needle_accuracy": needle["full"]["accuracy"], "needle_rel_full": 1.0,
              "suite_average": suite["full"]["average"], "suite_rel_full": 1.0}]
    for r in rows:
        r["label"] = label = method_label(r.pop("spec"))
        table.append({**r, "needle_accuracy": needle[label]["accuracy"],
                      "needle_rel_full": needle[label]["rel_to_full"],
                      "suite_average": suite[label]["average"],
                      "suite_rel_full": suite[label]["rel_to_full"]})
    # The app shows an ablation run's plan comparison from its metrics; record where it came from.
    metrics = abl.metrics() or {}
    metrics["plan_comparison"] = table
    metrics["plan_comparison_runs"] = {"needle": needle_key, "suite": suite_key,
                                       "spectra": spec_run.name, "variant": variant}
    abl.write_metrics(metrics)
    return {"markdown": "\n".join(lines), "needle_key": needle_key, "suite_key": suite_key,
            "ablation_key": abl.name, "spectra_key": spec_run.name, "rows": table}
