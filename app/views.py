"""The figures of a stored run, as export.FigureEntry lists: one builder per run kind, used by
its page (with the view the page's widgets chose) and by the Export page (with the page's
default view), so every figure can be rebuilt from the store after a reload or from a typed URL.

No Streamlit here: inputs are a run summary (GET /runs), its records or arrays, and a view.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.api import plans
from app import figures
from app.export import FigureEntry, entry

SPACE_LABEL = {"post_rope": "post-RoPE", "pre_rope": "pre-RoPE"}
KV = ("keys", "values")
SPACES = ("post_rope", "pre_rope")
TRANSFORMS = ("iwdft", "dft")
NEEDLE_METRICS = ("exact", "partial", "rouge_l")
ABLATION_MEASURES = {"continuation": ("delta_mean", "delta_sem", "Δ NLL of the continuation"),
                     "needle": ("needle_delta_mean", "needle_delta_sem", "Δ NLL of the needle answer")}


def plural(n, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def run_params(summary: dict) -> dict:
    """The job parameters a run was computed with: config.params (spectra, ablate and contrib
    runs written before issue 19 keep them under config.task)."""
    config = summary.get("config") or {}
    return config.get("params") or config.get("task") or {}


def run_model(summary: dict, fallback: str = "model") -> str:
    model = (summary.get("config") or {}).get("model") or {}
    return model.get("name") if isinstance(model, dict) and model.get("name") else fallback


def provenance(summary: dict, text: str = "", method: str = "", budget: str = "",
               ratio: float | None = None) -> dict:
    return {"model": run_model(summary), "text": text, "method": method, "budget": budget,
            "ratio": ratio, "run": summary.get("key")}


def budget_text(ratio: float | None) -> str:
    return "" if ratio is None else f"ratio {ratio:g} (budget {100 * (1 - ratio):.0f}% of the cache)"


# ----------------------------------------------------------------------------- spectra

@dataclass(frozen=True)
class SpectraView:
    layers: tuple[int, ...] | None = None       # None: every layer
    heads: tuple[int, ...] | None = None
    kv: str = "keys"
    space: str = "post_rope"
    transform: str = "iwdft"
    per_head: bool = False


def spectra_chunks(summary: dict, data: dict) -> int:
    params = run_params(summary)
    chunk_energy = data.get("chunk_energy")
    return int(params.get("chunks") or (np.shape(chunk_energy)[-1] if chunk_energy is not None else 22))


def spectra_entries(summary: dict, data: dict, view: SpectraView = SpectraView(),
                    text_info: dict | None = None) -> list[FigureEntry]:
    energy = np.asarray(data["energy"], dtype=float)     # (layers, heads, kv, space, transform, G)
    freqs = np.asarray(data["freqs"], dtype=float)
    chunk_energy = np.asarray(data["chunk_energy"], dtype=float) if "chunk_energy" in data else None
    layers = list(view.layers) if view.layers is not None else list(range(energy.shape[0]))
    heads = list(view.heads) if view.heads is not None else list(range(energy.shape[1]))
    space = "post_rope" if view.kv == "values" else view.space   # values carry no rotation
    params = run_params(summary)
    chunks = spectra_chunks(summary, data)
    text_info = text_info or (summary.get("metrics") or {}).get("text") or {}
    k, s, t = KV.index(view.kv), SPACES.index(space), TRANSFORMS.index(view.transform)
    chosen = energy[np.ix_(layers, heads)][:, :, k, s, t, :]           # (L', H', G)
    tensor = f"{view.kv} {SPACE_LABEL[space]}" if view.kv == "keys" else "values"
    prov = provenance(summary, text=f"{params.get('num_tokens', '?')} tokens of essays from "
                                    f"{text_info.get('first_essay', 'seed %s' % params.get('text_seed', 0))}",
                      method=f"{tensor}, {view.transform}", budget="no compression")
    config = {"run": summary.get("key"), "params": params, "layers": layers, "heads": heads,
              "tensor": view.kv, "key_space": space, "transform": view.transform}
    layer_mean = chosen.mean(axis=1)                                   # (L', G)
    out = [entry("spectra-heatmap", f"Energy of {view.kv} by layer and frequency (mean of "
                 f"{plural(len(heads), 'head')}, log scale; dotted: the {chunks} chunks)",
                 figures.spectra_heatmap(freqs, layer_mean, layers, chunks), prov,
                 pd.DataFrame(layer_mean.T, columns=[f"L{l}" for l in layers]).assign(freq=freqs),
                 config)]
    if view.per_head:
        lines = {f"L{l} H{h}": chosen[i, j] for i, l in enumerate(layers) for j, h in enumerate(heads)}
    else:
        lines = {f"L{l}": layer_mean[i] for i, l in enumerate(layers)}
    out.append(entry("spectra-lines", f"Spectra of {view.kv}, " + ("per head" if view.per_head
                     else "per layer"), figures.spectra_lines(freqs, lines, chunks), prov,
                     pd.DataFrame(dict(lines)).assign(freq=freqs), config))
    if chunk_energy is not None:
        share = chunk_energy[np.ix_(layers, heads)][:, :, k, s, t, :].mean(axis=1)
        share = share / np.maximum(share.sum(axis=1, keepdims=True), 1e-30)
        out.append(entry("spectra-chunk-share", f"Share of each layer's {view.kv} energy per chunk "
                         "(what an energy plan keeps)",
                         figures.layer_chunk_heatmap(share, "energy share", layers=layers,
                                                     diverging=False), prov,
                         pd.DataFrame(share, columns=[f"chunk{c}" for c in range(share.shape[1])]
                                      ).assign(layer=layers), config))
    return out


# ----------------------------------------------------------------------------- needle

def needle_method_label(spec: dict) -> str:
    """The label the needle task files a method's cells under (analysis.harness.methods.method_label
    for the default params the app sends)."""
    from analysis.api.params import MethodSpec

    m = MethodSpec(**spec)
    return "full" if m.name == "full" else m.label


def needle_axes(params: dict, records: list[dict]) -> tuple[list[str], list[int], list[float]]:
    """(method labels with full first, lengths, depths) of a grid: from its parameters, plus
    whatever the records hold (depths spaced by the server, labels with extra params)."""
    labels = ["full"] + [needle_method_label(m) for m in params.get("methods", [])
                         if m["name"] != "full"]
    lengths = [int(n) for n in params.get("lengths", [])]
    depths = [float(d) for d in params.get("depths", [])] \
        if params.get("depth_spacing", "given") == "given" else []
    for r in records:
        label = r.get("label", r.get("method"))
        if label not in labels:
            labels.append(label)
        if int(r["length"]) not in lengths:
            lengths.append(int(r["length"]))
        if float(r["depth"]) not in depths:
            depths.append(float(r["depth"]))
    return labels, sorted(lengths), sorted(depths)


def needle_entries(summary: dict, records: list[dict], metric: str = "exact") -> list[FigureEntry]:
    params = run_params(summary)
    labels, lengths, depths = needle_axes(params, records)
    fig = figures.needle_grid(records, labels, lengths, depths, metric=metric)
    ratios = sorted({float(r.get("ratio", 0)) for r in records if r.get("method") != "full"})
    ratio = ratios[0] if len(ratios) == 1 else None
    samples = params.get("samples", "?")
    prov = provenance(summary, text=f"needle {params.get('needle', '?')}, "
                                    f"{params.get('query_mode', '')}, "
                                    f"{'/'.join(str(n) for n in lengths)} tokens, "
                                    f"{plural(samples, 'sample')}",
                      method=", ".join(labels),
                      budget=budget_text(ratio) if ratio is not None else
                      "ratios " + ", ".join(f"{r:g}" for r in ratios), ratio=ratio)
    return [entry("needle-grid", f"Needle {metric} by depth and context length", fig, prov,
                  figures.needle_table(records, metric), {"run": summary.get("key"), "params": params})]


# ----------------------------------------------------------------------------- ablation

def ablation_measures(data: dict) -> list[str]:
    return [m for m, (mean, _, _) in ABLATION_MEASURES.items() if mean in data]


def ablation_layers(data: dict) -> list[int]:
    return [int(l) for l in data["layers"]] if "layers" in data else list(range(len(data["delta_mean"])))


def ablation_plan(data: dict, measure: str, ratio: float, num_layers: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(mask, scores filled to every layer, plan name) of the plan derived from an ablation."""
    mean = np.asarray(data[ABLATION_MEASURES[measure][0]], dtype=float)
    scores = plans.fill_layers(mean, ablation_layers(data), num_layers)
    return plans.from_scores(scores, ratio), scores, f"ablation-{measure}-{ratio:g}"


def ablation_entries(summary: dict, data: dict, measure: str | None = None, ratio: float = 0.25,
                     num_layers: int | None = None) -> list[FigureEntry]:
    measure = measure or ablation_measures(data)[0]
    params = run_params(summary)
    mean_name, sem_name, what = ABLATION_MEASURES[measure]
    mean = np.asarray(data[mean_name], dtype=float)                  # (ablated layers, chunks)
    sem = np.asarray(data[sem_name], dtype=float) if sem_name in data else None
    layers = ablation_layers(data)
    num_layers = num_layers or (max(layers) + 1)
    text = (f"{plural(params.get('num_texts', '?'), 'essay')}, {params.get('prefix_tokens', '?')}+"
            f"{params.get('continuation_tokens', '?')} tokens" if measure == "continuation" else
            plural(params.get('needle_samples', '?'), 'needle sample'))
    prov = provenance(summary, text=text,
                      method=f"remove one chunk from {params.get('target', 'kv')} "
                             f"(sink {params.get('sink_tokens', '?')}, window "
                             f"{params.get('window', '?')})",
                      budget="lossless except the removed chunk")
    config = {"run": summary.get("key"), "params": params, "measure": measure}
    frame = pd.DataFrame([{"layer": l, "chunk": c, "delta_mean": mean[i, c],
                           "delta_sem": None if sem is None else sem[i, c]}
                          for i, l in enumerate(layers) for c in range(mean.shape[1])])
    out = [entry("ablation-heatmap", f"Loss increase when one chunk is removed ({measure})",
                 figures.ablation_heatmap(mean, sem, what=what, layers=layers), prov, frame, config)]
    mask, scores, name = ablation_plan(data, measure, ratio, num_layers)
    kept = int(mask.sum(axis=1)[0])
    plan_prov = {**prov, "method": f"plan {name}",
                 "budget": f"{kept} of {plural(mask.shape[1], 'chunk')} per layer", "ratio": None}
    out.append(entry("ablation-plan", f"Plan: each layer keeps its {plural(kept, 'chunk')} with "
                     "the largest loss increase", figures.mask_heatmap(mask, scores=scores,
                                                                        score_name=what),
                     plan_prov, pd.DataFrame({"layer": range(mask.shape[0]), "kept_chunks": [
                         " ".join(map(str, np.flatnonzero(r))) for r in mask]}),
                     {**config, "plan": plans.to_json_dict(mask, name)}))
    return out


def stored_plans(metrics: dict) -> pd.DataFrame | None:
    """The plans the ablation job derived (metrics "plans" / "needle_plans": ratio -> plan JSON)."""
    rows = []
    for measure, field_name in (("continuation", "plans"), ("needle", "needle_plans")):
        for ratio, plan in (metrics.get(field_name) or {}).items():
            layers = plan.get("layers") or []
            rows.append({"measure": measure, "kept ratio": ratio, "name": plan.get("name"),
                         "chunks per layer": len(layers[0]) if layers and isinstance(layers[0], list) else None,
                         "layer 0 keeps": " ".join(map(str, layers[0])) if layers else "",
                         "plan JSON": json.dumps(plan)})
    return pd.DataFrame(rows) if rows else None


# ----------------------------------------------------------------------------- contribution

CONTRIB_SUMMARIES = ("one_minus_gini", "oldest_over_newest", "min_over_max")


def contribution_curves(records: list[dict]) -> tuple[dict, pd.DataFrame]:
    """({label: contribution over positions}, summary table indexed by label) of a contrib run:
    one record per method with its label ("method"), "contribution" and the summaries."""
    curves, rows = {}, {}
    for record in records:
        label = record["method"]
        if record.get("contribution") is not None:
            curves[label] = np.asarray(record["contribution"], dtype=float)
        rows[label] = {k: record[k] for k in CONTRIB_SUMMARIES if record.get(k) is not None}
    return curves, pd.DataFrame.from_dict(rows, orient="index")


def contribution_entries(summary: dict, records: list[dict]) -> list[FigureEntry]:
    curves, table = contribution_curves(records)
    params = run_params(summary)
    ratios = sorted({float(m.get("compression_ratio", 0)) for m in params.get("methods", [])})
    ratio = ratios[0] if len(ratios) == 1 else None
    prov = provenance(summary, text=f"essays seed {params.get('text_seed', 0)}, "
                                    f"{params.get('context_length', '?')} tokens",
                      method=", ".join(curves) or ", ".join(table.index),
                      budget=budget_text(ratio), ratio=ratio)
    config = {"run": summary.get("key"), "params": params}
    out = []
    if curves:
        longest = max(len(c) for c in curves.values())
        frame = pd.DataFrame({k: np.pad(v, (0, longest - len(v)), constant_values=np.nan)
                              for k, v in curves.items()}).rename_axis("position").reset_index()
        out.append(entry("contribution-lines", "Contribution of each original token",
                         figures.contribution_lines(curves), prov, frame, config))
    if not table.empty:
        out.append(entry("contribution-summary", "Equality of contributions (1 = every token equal)",
                         figures.summary_bars(table), prov, table.rename_axis("method").reset_index(),
                         config))
    return out


# ----------------------------------------------------------------------------- generations

def generation_id(request: dict, result: dict) -> str:
    """A short stable id of one generation (request + its answer and timing)."""
    import hashlib

    blob = json.dumps([request, result.get("seconds"), result.get("answer")], sort_keys=True,
                      default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:8]


def stored_generations(jobs: list[dict]) -> list[dict]:
    """The backend's finished `generate` jobs as generations {id, created, request, result}."""
    out = []
    for job in jobs:
        if job.get("kind") == "generate" and job.get("status") == "done" and job.get("result"):
            request = job.get("params") or {}
            out.append({"id": generation_id(request, job["result"]), "request": request,
                        "result": job["result"],
                        "created": str(job.get("finished") or job.get("created") or "")})
    return out


def cache_of(result: dict) -> dict:
    """A generation's cache report (older results: rebuilt from cache_lengths)."""
    if result.get("cache"):
        return result["cache"]
    lengths, tokens = result.get("cache_lengths") or [], int(result.get("prompt_tokens") or 0)
    ratio = (result.get("method") or {}).get("compression_ratio") or 0.0
    kept = float(np.mean(lengths)) if lengths else float(tokens)
    return {"prompt_tokens": tokens, "budget_tokens": round((1 - ratio) * tokens),
            "kept_tokens": kept, "kept_fraction": kept / tokens if tokens else 1.0,
            "compressed": bool(lengths) and all(n < tokens for n in lengths), "layers": []}


def kept_text(kept: float, prompt_tokens: int) -> str:
    """The cache a generation actually kept."""
    return f"kept {kept:.0f} of {plural(prompt_tokens, 'token')} ({kept / max(1, prompt_tokens):.0%})"


def prompt_label(prompt: dict, result: dict) -> str:
    if prompt.get("kind") == "text":
        return f"own text ({plural(result.get('prompt_tokens', '?'), 'token')})"
    return (f"needle {prompt.get('needle')} {prompt.get('context_length')} tok @ "
            f"{float(prompt.get('depth', 0)):g}% (seed {prompt.get('seed')})")


def generation_provenance(generation: dict, model: str = "model") -> dict:
    result, request = generation["result"], generation["request"]
    method = request.get("method") or {}
    cache, ratio = cache_of(result), method.get("compression_ratio")
    return {"model": result.get("model") or model,
            "text": prompt_label(request.get("prompt") or {}, result),
            "method": result.get("method_label") or method.get("name"),
            "budget": (f"ratio {ratio:g} · " if ratio else "") + kept_text(cache["kept_tokens"],
                                                                          cache["prompt_tokens"]),
            "ratio": ratio, "run": f"gen-{generation['id']}"}


def generation_entries(generation: dict, model: str = "model",
                       mass: str = "compressed") -> list[FigureEntry]:
    """Every figure of one generation: its cache (cache_entries) and, when it was asked for,
    its attention diagnostics (diagnostics_entries)."""
    return cache_entries(generation, model) + diagnostics_entries(generation, model, mass)


def cache_entries(generation: dict, model: str = "model") -> list[FigureEntry]:
    """Cache length per layer (against the full cache) and, when the method reports one, the
    reconstruction error per layer, of one generation."""
    result, request = generation["result"], generation["request"]
    prov = generation_provenance(generation, model)
    config = {"request": request, "result": dict(result)}
    out = []
    lengths, cache = result.get("cache_lengths") or [], cache_of(result)
    title, axis = "Cache length per layer after compression", "cache length (tokens)"
    stored = [layer.get("equivalent_rows") for layer in cache.get("layers") or []]
    if cache.get("virtual") and stored and None not in stored:
        # the dimension split hands attention every token's rebuilt row; what it stores is the budget
        lengths = stored
        title = ("Cache stored per layer after compression (equivalent rows: exact dims + low-pass "
                 "coefficients; attention reads every token's rebuilt row)")
        axis = "stored (equivalent rows)"
    if lengths:
        full = [cache["prompt_tokens"]] * len(lengths)
        out.append(entry("lab-cache-lengths", title,
                         figures.layer_bars(lengths, axis, reference=full,
                                            reference_name="full cache"), prov,
                         pd.DataFrame({"layer": range(len(lengths)), "cache_length": lengths}), config))
    errors = result.get("reconstruction_error")
    if errors and any(e is not None for e in errors):
        values = [np.nan if e is None else e for e in errors]
        out.append(entry("lab-reconstruction-error", "Relative reconstruction error of the "
                         "compressed middle, per layer", figures.layer_bars(values, "reconstruction error"),
                         prov, pd.DataFrame({"layer": range(len(values)), "reconstruction_error": values}),
                         config))
    return out


# ----------------------------------------------------------------------------- diagnostics

OUTPUT_ERROR_NOTE = (
    "How far each layer's attention output over the compressed cache is from the full cache's "
    "for the question's queries (‖o_compressed − o_full‖ / ‖o_full‖, mean over the group's query "
    "heads; every layer sees the same queries, so a cell shows what that layer's compression does).")
MASS_NOTE = (
    "Attention mass the {what} take, divided by the mass the middle tokens took under full "
    "attention (1 = the same): a slot's logit is the mean of its members' logits and "
    "exp(mean) ≤ mean(exp) (Jensen), so slots under-weight a class in which one member (a needle) "
    "matches the query far better than the rest.")
# the mass the compressed cache gives the middle: numerator field, what it is, in a title
MASS_VIEWS = {"compressed": ("middle_mass_compressed", "compressed middle rows", "compressed middle"),
              "slots": ("slot_mass", "slots alone", "slots alone")}


def mass_ratio(numerator: list, denominator: list) -> list:
    """Per layer and KV head numerator / denominator (None where either is missing or the
    denominator is 0); a layer without slots (None on either side) stays None."""
    out = []
    for top, bottom in zip(numerator, denominator):
        if top is None or bottom is None:
            out.append(None)
            continue
        out.append([a / b if a is not None and b else None for a, b in zip(top, bottom)])
    return out


def has_slot_masses(diagnostics: dict) -> bool:
    return any(row is not None for row in diagnostics.get("middle_mass_full") or [])


def grid_mean(grid: list) -> float | None:
    """Mean over every layer and KV head that has a value (the heatmap's cells)."""
    cells = [v for row in grid or [] if row is not None for v in row if v is not None]
    return float(np.mean(cells)) if cells else None


def diagnostics_means(diagnostics: dict) -> str:
    """One line: the means over layers and KV heads of what the heatmaps show."""
    parts = [f"output error {grid_mean(diagnostics.get('output_error')):.3g}"
             if grid_mean(diagnostics.get("output_error")) is not None else "output error —"]
    if has_slot_masses(diagnostics):
        for name, what in (("middle_mass_full", "middle mass under full attention"),
                           ("middle_mass_compressed", "compressed middle"), ("slot_mass", "slots")):
            mean = grid_mean(diagnostics.get(name))
            if mean is not None:
                parts.append(f"{what} {mean:.3f}")
    return (f"Means over layers × KV heads ({plural(diagnostics.get('probes', '?'), 'probe query', 'probe queries')}"
            f", {diagnostics.get('context_tokens', '?')} context tokens): " + " · ".join(parts))


def diagnostics_entries(generation: dict, model: str = "model",
                        mass: str = "compressed") -> list[FigureEntry]:
    """The attention diagnostics of one generation (GenerateParams.diagnostics): output error
    per layer and KV head and, for methods with slots, the middle-mass ratio (`mass`: the
    compressed middle rows, or the slots alone, over the middle's mass under full attention)."""
    diagnostics = generation["result"].get("diagnostics")
    if not diagnostics:
        return []
    prov = generation_provenance(generation, model)
    config = {"request": generation["request"], "diagnostics": diagnostics}
    errors = diagnostics.get("output_error") or []
    out = [entry("lab-output-error", "Attention-output error vs the full cache",
                 figures.head_heatmap(errors, "relative error"), prov,
                 head_frame(errors, "output_error"), config)]
    if has_slot_masses(diagnostics):
        field_name, _, short = MASS_VIEWS[mass]
        ratio = mass_ratio(diagnostics.get(field_name) or [], diagnostics["middle_mass_full"])
        out.append(entry(f"lab-mass-ratio-{mass}", f"Middle mass, {short} / full cache",
                         # 1 (the same mass) white in the middle; above 2 saturates (hover: value)
                         figures.head_heatmap(ratio, f"{mass} / full", zmin=0.0, zmax=2.0,
                                              colorscale="RdBu"),
                         prov, head_frame(ratio, "mass_ratio"), {**config, "mass": mass}))
    return out


def head_frame(grid: list, name: str) -> pd.DataFrame:
    """A layer x KV head grid as rows (layer, head, value) for CSV export."""
    return pd.DataFrame([{"layer": l, "kv_head": h, name: v} for l, row in enumerate(grid)
                         if row is not None for h, v in enumerate(row)],
                        columns=["layer", "kv_head", name])


@dataclass
class RunFigures:
    """What the Export page needs to rebuild a kind's figures: the array it reads (None: the
    run's records) and the builder with the page's default view."""
    array: str | None
    build: object = field(repr=False)


EXPORTABLE = {
    "spectra": RunFigures("spectra", lambda s, d: spectra_entries(s, d)),
    "needle": RunFigures(None, lambda s, r: needle_entries(s, r)),
    "ablate": RunFigures("ablation", lambda s, d: ablation_entries(s, d)),
    "contrib": RunFigures(None, lambda s, r: contribution_entries(s, r)),
}
