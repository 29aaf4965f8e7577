"""Frequency lab: edit which frequency chunks each layer keeps, re-run generation, and compare
the runs (plans, methods, slot normalisations) in a table and side by side."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:    # AppTest runs a page file on its own
    sys.path.insert(0, ROOT)

import datetime  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from analysis.api.params import (DIM_SHARE, EXACT_POOLS, EXACT_SCORERS, FAEDKV_DEFAULT, KEY_SPACES, METHODS,  # noqa: E402
                                 NEEDLE_KINDS, PLANNED, QUERY_MODES, SLOT_FITS, SLOT_HYBRID, SLOT_NORMALIZATIONS,
                                 VARIANTS, WINDOW, GenerateParams, MethodSpec, TaskPrompt)
from analysis.api import plans  # noqa: E402
from app import figures, state, ui, views  # noqa: E402

PAGE = "lab"
STARTS = ("low-pass", "energy", "ablation")
SPACE_LABEL = {"post_rope": "post-RoPE keys", "pre_rope": "pre-RoPE keys"}
NORM_LABEL = {"mean": "class means", "sum": "(M/t)·sums (old)"}
FIT_LABEL = {"mean": "class means", "probes": "attention-matched"}
MASS_LABEL = {"compressed": "compressed middle / full", "slots": "slots / full"}
HISTORY = "lab.history"         # this session's generations: [{id, created, request, result}]
DEFAULT_PLAN = "low-pass-0.5"
UNKNOWN_MODEL = "not recorded"


# ----------------------------------------------------------------------------- plan state

def _set_mask(mask: np.ndarray, name: str) -> None:
    """Replace the plan; the editor widget restarts from it (new key)."""
    st.session_state["lab.mask"] = np.asarray(mask, dtype=bool)
    st.session_state["lab.plan_name"] = name
    st.session_state["lab.version"] = st.session_state.get("lab.version", 0) + 1


def link_plan(text: str, layers: int) -> np.ndarray:
    """The plan a link carries (`plan=<chunks>:<hex word per layer>`); ValueError naming what
    is wrong with it."""
    head = text.partition(":")[0]
    if not head.isdigit() or not 1 <= int(head) <= 256:
        raise ValueError(f"it does not start with a chunk count (e.g. '22:'), got {head!r}")
    try:
        return plans.check(state.decode_mask(text, layers, int(head)))
    except ValueError as exc:
        raise ValueError(str(exc).removeprefix("plan in the link is ")) from None


def _init_mask(layers: int) -> None:
    current = st.session_state.get("lab.mask")
    if current is not None and current.shape[0] == layers:
        return
    text = st.query_params.get("plan") or state._memory(PAGE).get("plan")
    if text:
        try:
            mask = link_plan(text, layers)
        except ValueError as exc:
            st.session_state["lab.plan_warning"] = (
                f"The plan in the link (`plan={text}`) is not a plan for this model "
                f"({ui.plural(layers, 'layer')}): {exc}; showing {DEFAULT_PLAN} instead.")
        else:
            _set_mask(mask, state.initial(PAGE, "plan_name", "custom"))
            return
    _set_mask(plans.low_pass(0.5, layers, plans.DEFAULT_CHUNKS), DEFAULT_PLAN)


def _source_scores(source: str, layers: int, column) -> tuple[np.ndarray | None, str | None]:
    """(layers, chunks) scores of the chosen spectra / ablation run of this model, with its key."""
    kind, array = ("spectra", "spectra") if source == "energy" else ("ablate", "ablation")
    every = [r for r in ui.runs(kind) if r.get("status") == "complete"]
    runs = [r for r in every if ui.same_model(r)]
    what = "spectra" if source == "energy" else "ablation"
    if len(runs) < len(every):
        column.caption(f"{ui.plural(len(every) - len(runs), f'{what} run')} of other models not "
                       "listed: a plan is per model.")
    run = column.selectbox(f"{what} run", runs, format_func=ui.run_label, key=f"lab.{source}_run")
    if run is None:
        column.caption(f"No {what} run of this model yet: compute one on the "
                       f"{'Spectra' if source == 'energy' else 'Ablation'} page.")
        return None, None
    data = ui.arrays(run["key"], array)
    if data is None:
        return None, None
    if source == "energy":
        # energy per chunk of keys and values (post-RoPE, IWDFT), summed over heads
        return np.asarray(data["chunk_energy"])[:, :, :, 0, 0, :].sum(axis=(1, 2)), run["key"]
    ablated = data["layers"] if "layers" in data else range(len(data["delta_mean"]))
    if max(int(l) for l in ablated) >= layers:
        st.warning(f"That ablation covers layers up to {max(int(l) for l in ablated)}, but this "
                   f"model has {ui.plural(layers, 'layer')}: pick a run of this model.")
        return None, None
    return plans.fill_layers(data["delta_mean"], ablated, layers), run["key"]


def plan_source(layers: int, chunks: int) -> None:
    """Start from low-pass at a ratio, from a spectra run's energy, or from an ablation run.
    A run's plan takes the run's chunk count."""
    c1, c2, c3 = st.columns([2, 2, 3], vertical_alignment="bottom")
    source = c1.segmented_control("start from", STARTS, key=state.bind(
        PAGE, "start", "low-pass", valid=state.options_valid(STARTS))) or "low-pass"
    plan_ratio = c2.slider("chunks kept per layer", 0.05, 1.0, 0.5, 0.05, key="lab.plan_ratio",
                           help="Fraction of the chunks each layer keeps (the plan's ratio). The "
                                "cache length is set by the compression ratio below.")
    state.sync(PAGE, {"start": source})
    scores, name = None, f"low-pass-{plan_ratio:g}"
    if source == "low-pass":
        chunks = int(c3.number_input("chunks", 2, 256, chunks, key="lab.low_pass_chunks",
                                     help="How many equal chunks [0, 0.5] cycles/token is cut into."))
    else:
        scores, run_key = _source_scores(source, layers, c3)
        if scores is None:
            return
        if scores.shape[0] != layers:
            st.warning(f"That run has {ui.plural(scores.shape[0], 'layer')}, this model "
                       f"{layers}: pick a run of this model.")
            return
        if scores.shape[1] != chunks:
            st.caption(f"That run has {scores.shape[1]} chunks (the plan now has {chunks}): its "
                       f"plan takes the run's {scores.shape[1]} chunks.")
        chunks = scores.shape[1]
        name = f"{source}-{plan_ratio:g}"
    k = plans.kept_per_layer(plan_ratio, chunks)
    if st.button(f"Use {source} plan ({k} of {chunks} chunks per layer)", icon=":material/restart_alt:",
                 key="lab.apply"):
        mask = plans.low_pass(plan_ratio, layers, chunks) if scores is None else \
            plans.from_scores(scores, plan_ratio)
        _set_mask(mask, name)
        st.rerun()


def bulk_toggles(chunks: int) -> None:
    c1, c2, c3 = st.columns([3, 1, 1], vertical_alignment="bottom")
    picked = c1.multiselect("chunks (all layers)", list(range(chunks)), key="lab.bulk",
                            placeholder="pick chunks to keep or drop in every layer")
    if c2.button("Keep in all layers", disabled=not picked, key="lab.keep_all", width="stretch"):
        mask = st.session_state["lab.mask"].copy()
        mask[:, picked] = True
        _set_mask(mask, "custom")
        st.rerun()
    if c3.button("Drop in all layers", disabled=not picked, key="lab.drop_all", width="stretch"):
        mask = st.session_state["lab.mask"].copy()
        mask[:, picked] = False
        _set_mask(mask, "custom")
        st.rerun()


GRID_COLUMN_PX = 52         # wide enough for a two-digit header next to its sort arrow


def grid_editor(mask: np.ndarray) -> np.ndarray:
    """A layers x chunks grid of checkboxes; returns the edited mask."""
    layers, chunks = mask.shape
    edges = figures.chunk_edges(chunks)
    frame = pd.DataFrame(mask, columns=[str(c) for c in range(chunks)],
                         index=[f"L{l}" for l in range(layers)])
    config = {str(c): st.column_config.CheckboxColumn(
        str(c), width=GRID_COLUMN_PX,
        help=f"chunk {c}: frequencies {edges[c]:.3f}–{edges[c + 1]:.3f} (cycles/token)")
        for c in range(chunks)}
    edited = st.data_editor(frame, column_config=config, key=f"lab.editor.{st.session_state['lab.version']}",
                            height=min(35 * layers + 40, 720), width="stretch")
    return edited.to_numpy(dtype=bool)


def plan_problem(mask: np.ndarray) -> str | None:
    try:
        plans.check(mask)
    except ValueError as exc:
        return str(exc)
    return None


def plan_files(mask: np.ndarray, name: str, layers: int, problem: str | None) -> None:
    c1, c2 = st.columns([1, 2], vertical_alignment="center")
    c1.download_button("Download plan JSON", "" if problem else plans.to_json(mask, name),
                       file_name=f"plan_{name}_{ui.model_name()}.json", disabled=bool(problem),
                       mime="application/json", icon=":material/download:", on_click="ignore",
                       key="lab.plan_download")
    upload = c2.file_uploader("Load a plan (JSON)", type=["json"], key="lab.plan_upload")
    if upload is not None and st.session_state.get("lab.uploaded") != upload.file_id:
        st.session_state["lab.uploaded"] = upload.file_id
        try:
            loaded, loaded_name = plans.from_json(upload.getvalue(), layers=layers)
        except ValueError as exc:
            st.error(f"**Could not load {upload.name}:** {exc}")
            return
        _set_mask(loaded, loaded_name)
        st.rerun()


# ----------------------------------------------------------------------------- generation

def prompt_form(context: int) -> tuple[TaskPrompt | None, dict]:
    kind = st.segmented_control("prompt", ("needle", "text"), key=state.bind(PAGE, "prompt", "needle"),
                                format_func={"needle": "needle task", "text": "my own text"}.get)
    if kind == "text":
        text = st.text_area("context (compressed)", key="lab.text", height=160,
                            placeholder="Paste a long text; its KV cache is what gets compressed.")
        question = st.text_input("question (asked after the context)", key="lab.question")
        if not (text or "").strip():
            st.info("Paste the text to compress (and a question about it), then re-run.",
                    icon=":material/edit_note:")
            return None, {"prompt": kind}
        return ui.call("checking the prompt", TaskPrompt, kind="text", text=text,
                       question=question or None), {"prompt": kind}
    c1, c2, c3, c4 = st.columns(4)
    needle = c1.selectbox("needle", NEEDLE_KINDS, key=state.bind(
        PAGE, "needle", "sentence", valid=state.options_valid(NEEDLE_KINDS)))
    length = c2.number_input("length (tokens)", 64, context, step=256, key=state.bind(
        PAGE, "length", min(2048, context), int, lambda v: 64 <= v <= context))
    depth = c3.slider("depth (%)", 0, 100, step=5, key=state.bind(PAGE, "depth", 50, int))
    seed = c4.number_input("seed", 0, 10_000, key=state.bind(PAGE, "seed", 0, int))
    values = {"prompt": kind, "needle": needle, "length": int(length), "depth": int(depth),
              "seed": int(seed)}
    return ui.call("checking the prompt", TaskPrompt, kind="needle", needle=needle,
                   context_length=int(length), depth=float(depth), seed=int(seed)), values


def load_default() -> None:
    """Set the method's widgets to FAEDKV's default (a button callback: it runs before the widgets
    are drawn again); the ratio and the query mode stay as they are."""
    st.session_state[f"{PAGE}.method"] = "faedkv"
    for name, value in FAEDKV_DEFAULT.items():
        st.session_state[f"{PAGE}.{name}"] = value
    st.session_state[f"{PAGE}.use_plan"] = False


def hybrid_defaults(variant: str) -> dict:
    """The hybrid knobs' defaults for a variant, as FAEDKVPress fills them."""
    return {k: FAEDKV_DEFAULT[k] for k in SLOT_HYBRID} if variant == "dimsplit" else SLOT_HYBRID


def variant_changed() -> None:
    """The hybrid knobs follow the variant while they are at the previous variant's defaults (the
    dimension split's are FAEDKV_DEFAULT's; a slot variant's, SLOT_HYBRID, keep no exact tokens), as
    FAEDKVPress fills the knobs left out. Knobs you changed stay, except what the new variant cannot
    take: the global pool (the split's alone) and exact tokens under dct-iterative. A toast says so."""
    variant = st.session_state[f"{PAGE}.variant"]
    knobs = {k: st.session_state.get(f"{PAGE}.{k}") for k in SLOT_HYBRID}
    target = hybrid_defaults(variant)
    if knobs in (hybrid_defaults("dimsplit"), SLOT_HYBRID) and knobs != target:
        for name, value in target.items():
            st.session_state[f"{PAGE}.{name}"] = value
        st.toast(f"hybrid knobs: {variant}'s defaults" + (" (FAEDKV's default)" if variant == "dimsplit" else
                                                          " (no exact tokens)"), icon=":material/info:")
        return
    if variant != "dimsplit" and knobs["exact_pool"] == "global":
        st.session_state[f"{PAGE}.exact_pool"] = "layer"
        st.toast(f"exact pool: global is the dimension split's; {variant} pools per layer", icon=":material/info:")
    if variant == "dct-iterative" and knobs["exact_share"]:
        st.session_state[f"{PAGE}.exact_share"] = 0.0
        st.toast("exact share: dct-iterative keeps no exact tokens; set to 0", icon=":material/info:")


def method_form(mask: np.ndarray, plan_name: str, problem: str | None) -> tuple[MethodSpec | None, dict]:
    st.button("FAEDKV's default", key=f"{PAGE}.default", on_click=load_default, icon=":material/restart_alt:",
              help="Back to FAEDKV's default, the search's winner on Qwen2.5-Coder-1.5B (docs/RESULTS.md): the "
                   "dimension split behind KVzip's ranking over every layer and head, 90% of the middle's budget "
                   "as whole tokens, a recent window of half the kept rows. KVzip's scoring runs extra passes "
                   "over the prompt (slow on a CPU).")
    c1, c2, c3 = st.columns([2, 2, 2])
    name = c1.selectbox("method", METHODS, key=state.bind(PAGE, "method", "faedkv",
                                                          valid=state.options_valid(METHODS)))
    ratio = c2.slider("compression ratio (fraction removed)", 0.0, 0.95, step=0.05,
                      key=state.bind(PAGE, "ratio", 0.5, float, lambda v: 0 <= v < 1),
                      disabled=name == "full")
    query_mode = c3.selectbox("query mode", QUERY_MODES, key=state.bind(
        PAGE, "query_mode", "query_agnostic", valid=state.options_valid(QUERY_MODES)),
        help="query_aware: the question is part of the compressed context (SnapKV-style)")
    params: dict = {}
    if name in PLANNED:
        c1, c2, c3, c4, c5, c6 = st.columns(6)
        if name == "faedkv":
            params["variant"] = c1.selectbox("variant", VARIANTS, key=state.bind(
                PAGE, "variant", FAEDKV_DEFAULT["variant"], valid=state.options_valid(VARIANTS)),
                on_change=variant_changed)
            params["slot_normalization"] = c6.selectbox(
                "slots", SLOT_NORMALIZATIONS, format_func=NORM_LABEL.get,
                key=state.bind(PAGE, "norm", "mean", valid=state.options_valid(SLOT_NORMALIZATIONS)),
                help="Each slot is its class's mean key and value (correct), or the old (M/t) × "
                     "class sum, whose large common key component lets one slot win the softmax.")
        params["key_space"] = c2.selectbox("key space", KEY_SPACES, format_func=SPACE_LABEL.get,
                                           key=state.bind(PAGE, "key_space", "post_rope",
                                                          valid=state.options_valid(KEY_SPACES)))
        params["sink_tokens"] = int(c3.number_input("sink tokens", 0, 4096, key=state.bind(
            PAGE, "sink", 4, int)))
        params["window"] = int(c4.number_input("recent window", 0, 65536, key=state.bind(
            PAGE, "window", WINDOW, int)))
        params["mass_correction"] = c5.toggle("log-count mass", key=state.bind(
            PAGE, "mass", True, state.decode_bool), help="add log(tokens in the class) to each "
            "slot's attention logit: attention then equals attention over the cache in which every "
            "middle token is replaced by its class mean")
        if name == "faedkv":
            knobs, shown = search_knobs(params["variant"])
            params.update(knobs)
        dimsplit = params.get("variant") == "dimsplit"
        use_plan = st.toggle("apply the plan above", key=state.bind(PAGE, "use_plan", True,
                                                                   state.decode_bool),
                             disabled=dimsplit,
                             help="off: keep every frequency bin (plan = null). The dimension "
                                  "split takes no plan: its low band is sized by the budget.")
        if use_plan and not dimsplit:
            if problem:
                return None, {}
            params["plan"] = plans.to_json_dict(mask, plan_name)
    values = {"method": name, "ratio": float(ratio), "query_mode": query_mode}
    values.update({URL_NAMES.get(k, k): v for k, v in params.items() if k != "plan"})
    if name == "faedkv":
        values.update(shown)        # the URL keeps the knobs not sent at this setting too
    spec = ui.call("checking the method", MethodSpec, name=name,
                   compression_ratio=0.0 if name == "full" else float(ratio), params=params)
    return spec, values


URL_NAMES = {"slot_normalization": "norm", "sink_tokens": "sink", "mass_correction": "mass"}


def search_knobs(variant: str) -> tuple[dict, dict]:
    """FAEDKV's hybrid budget, slot fit, dimension split and budget-scaled window (issue 15): (the
    params to send, every knob's value for the URL). A knob that does nothing at the chosen setting
    (the scorer without exact tokens, fit_probes without the probe fit, dim_share and the exact
    pool off dimsplit; the fit with dimsplit, which has no slots; a window share of 0) is not sent."""
    c1, c2, c3, c4, c5, c6, c7 = st.columns(7)
    dimsplit, hybrid = variant == "dimsplit", hybrid_defaults(variant)    # a link's variant brings its defaults
    window_share = c7.slider("window share", 0.0, 0.9, step=0.05, disabled=variant == "dct-iterative",
                             key=state.bind(PAGE, "window_share", hybrid["window_share"], float,
                                            lambda v: 0 <= v < 1),
                             help="A recent window that grows with the budget: at least the recent window "
                                  "above, and this share of the kept rows when that is more (0.5 at 4K: "
                                  "1024 tokens at ratio 0.5, 512 at 0.75). 0: the window above at every "
                                  "budget. dct-iterative re-compresses every window, so it has none.")
    share = c1.slider("exact share", 0.0, 0.95, step=0.05, key=state.bind(
        PAGE, "exact_share", hybrid["exact_share"], float, lambda v: 0 <= v < 1),
        help="Hybrid budget: this fraction of the rows left after sink and window keeps exact "
             "middle tokens (picked by the scorer); the slots average every other middle token "
             "in (with dimsplit, the split stores them). 0: no exact tokens.")
    scorer = c2.selectbox("exact-token scorer", EXACT_SCORERS, disabled=share == 0,
                          key=state.bind(PAGE, "exact_scorer", hybrid["exact_scorer"],
                                         valid=state.options_valid(EXACT_SCORERS)),
                          help="What picks the exact middle tokens: a kvpress scorer, or kvzip (KVzip's context-"
                               "reconstruction passes after the prefill; the default).")
    pool = c6.selectbox("exact pool", EXACT_POOLS, disabled=share == 0, key=state.bind(
        PAGE, "exact_pool", hybrid["exact_pool"], valid=state.options_valid(EXACT_POOLS)),
        help="Where the exact tokens compete: per KV head; across the layer's heads (as KVzip's "
             "layerwise budget; with slots each head keeps its own number of exact tokens and the "
             "rest of its rows as slots); or, dimsplit only, across every layer and head (global, "
             "as KVzip's default; needs the kvzip scorer).")
    fit = c3.selectbox("slot fit", SLOT_FITS, format_func=FIT_LABEL.get, key=state.bind(
        PAGE, "slot_fit", "mean", valid=state.options_valid(SLOT_FITS)),
        help="class means: each slot is its class's mean with a log(count) mass. "
             "attention-matched: each slot's logit bias and value are refit so the prompt's last "
             "queries give it the mass and weighted value its tokens had (iwdft, post-RoPE keys, "
             "class means).")
    probes = c4.number_input("fit probes", 1, 4096, key=state.bind(
        PAGE, "fit_probes", 64, int, lambda v: 1 <= v <= 4096), disabled=fit == "mean",
        help="How many of the prompt's last queries the attention-matched fit uses.")
    dim_share = c5.slider("dim share", 0.0, 0.95, step=0.05, disabled=not dimsplit, key=state.bind(
        PAGE, "dim_share", DIM_SHARE, float, lambda v: 0 <= v < 1),
        help="Dimension split (FourierAttention): this share of the middle's budget keeps the head "
             "dims a low-pass summary would lose most exact for every token; the others keep only "
             "their lowest frequencies along the tokens. 0: low-pass only.")
    if dimsplit:
        knobs = {"dim_share": float(dim_share)}
        if share > 0:
            knobs.update(exact_share=float(share), exact_scorer=scorer, exact_pool=pool)
    else:
        knobs = {"exact_share": float(share), "slot_fit": fit}
        if share > 0:
            knobs["exact_scorer"] = scorer
            if pool != "head":
                knobs["exact_pool"] = pool
        if fit == "probes":
            knobs["fit_probes"] = int(probes)
    if window_share > 0 and variant != "dct-iterative":
        knobs["window_share"] = float(window_share)
    return knobs, {"exact_share": float(share), "slot_fit": fit, "exact_scorer": scorer,
                   "fit_probes": int(probes), "dim_share": float(dim_share), "exact_pool": pool,
                   "window_share": float(window_share), **knobs}


# ----------------------------------------------------------------------------- history

def history() -> list[dict]:
    """This session's generations and the backend's stored ones (its finished `generate` jobs),
    newest first, each once."""
    entries = {e["id"]: e for e in st.session_state.get(HISTORY, [])}
    for e in views.stored_generations(ui.call("listing stored generations", ui.client().jobs) or []):
        entries.setdefault(e["id"], e)
    return sorted(entries.values(), key=lambda e: e["created"], reverse=True)


def remember(request: dict, result: dict) -> dict:
    e = {"id": views.generation_id(request, result), "request": request, "result": result,
         "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")}
    st.session_state.setdefault(HISTORY, []).append(e)
    return e


def plan_summary(method: dict) -> str:
    plan = (method.get("params") or {}).get("plan")
    if method.get("name") not in PLANNED or (method.get("params") or {}).get("variant") == "dimsplit":
        return "—"
    if not plan:
        return "every bin"
    kept = [len(l) for l in plan.get("layers", []) if isinstance(l, list)]
    return f"{plan.get('name', 'custom')} ({min(kept) if kept else '?'}/{plan.get('chunks', '?')})"


def hybrid_summary(method: dict) -> str:
    """'25% expected_attention' for a hybrid budget, '0' without exact tokens, '—' off faedkv;
    'dims 50%' for the dimension split (its share of exact head dims)."""
    if method.get("name") != "faedkv":
        return "—"
    params = method.get("params") or {}
    share = params.get("exact_share") or 0.0
    if params.get("variant") == "dimsplit":
        dims = f"dims {params.get('dim_share', DIM_SHARE):.0%}"
        if not share:
            return dims
        pool = params.get("exact_pool", "head")
        return f"{dims} + {share:.0%} {params.get('exact_scorer', 'expected_attention')}" + (
            f" ({pool})" if pool != "head" else "")
    pool = params.get("exact_pool", "head")
    return (f"{share:.0%} {params.get('exact_scorer', 'expected_attention')}" + (f" ({pool})" if pool != "head" else "")
            if share else "0")


def fit_summary(method: dict) -> str:
    if method.get("name") != "faedkv":
        return "—"
    params = method.get("params") or {}
    fit = params.get("slot_fit", "mean")
    return f"probes ({params.get('fit_probes', 64)})" if fit == "probes" else fit


def found(result: dict) -> str:
    score = result.get("score")
    if not isinstance(score, dict):
        return "—"
    return "yes" if score.get("exact") else "no"


def comparison_row(n: int, e: dict, current: dict | None) -> dict:
    method, result = e["request"].get("method") or {}, e["result"]
    params, cache = method.get("params") or {}, views.cache_of(result)
    score = result.get("score") if isinstance(result.get("score"), dict) else {}
    return {"#": n, "current": "✓" if current is not None and e["request"] == current else "",
            "method": result.get("method_label") or method.get("name"),
            "plan": plan_summary(method),
            "normalisation": params.get("slot_normalization", "mean") if method.get("name") == "faedkv" else "—",
            "mass": ("on" if params.get("mass_correction") else "off") if method.get("name") in PLANNED else "—",
            "exact share": hybrid_summary(method), "slot fit": fit_summary(method),
            "found": found(result), "answer NLL": result.get("answer_nll"),
            "rouge_l": score.get("rouge_l"),
            "cache kept": f"{cache['kept_tokens']:.0f}/{cache['prompt_tokens']}"
                          + ("" if cache["compressed"] else " (whole)"),
            "seconds": result.get("seconds"), "answer": result.get("answer", ""),
            "prompt": views.prompt_label(e["request"].get("prompt") or {}, result),
            "model": result.get("model") or UNKNOWN_MODEL, "id": e["id"]}


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The request fields that differ (nested keys joined with dots; the plan as one field)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and k != "plan":
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def comparison(entries: list[dict], current: dict | None) -> None:
    st.subheader("3 · Compare runs")
    if not entries:
        ui.empty_state("Every generation you run lands here (and the backend's stored ones), so "
                       "plans, methods and normalisations can be compared.")
        return
    rows = [comparison_row(len(entries) - i, e, current) for i, e in enumerate(entries)]
    frame = pd.DataFrame(rows)
    models = set(frame["model"]) - {UNKNOWN_MODEL}
    if len(models) > 1:
        st.warning(f"These runs come from {len(models)} models ({', '.join(sorted(models))}): "
                   "compare rows of one model only.", icon=":material/warning:")
    if UNKNOWN_MODEL in set(frame["model"]):
        st.caption(f"Rows with model `{UNKNOWN_MODEL}` were stored before generations recorded "
                   "their model: check before comparing them.")
    st.dataframe(frame.drop(columns=["id"]), hide_index=True, width="stretch",
                 column_config={"rouge_l": st.column_config.NumberColumn(format="%.2f"),
                                "answer NLL": st.column_config.NumberColumn(
                                    format="%.3f", help="nats per token of the expected answer, "
                                    "teacher-forced (needle prompts)"),
                                "seconds": st.column_config.NumberColumn(format="%.2f s")})
    st.caption("✓: computed with the settings above. `found`: the needle's answer was in the "
               "reply; `answer NLL`: nats per token of the expected answer, teacher-forced "
               "(needle prompts only).")
    if len(entries) < 2:
        return
    labels = {e["id"]: f"#{r['#']} {r['method']} · {r['plan']} · {r['normalisation']}"
              for e, r in zip(entries, rows)}
    ids = list(labels)
    picked = st.session_state.get("lab.compare_pick")
    c1, c2 = st.columns(2)
    a = c1.selectbox("left", ids, format_func=labels.get, key="lab.compare_a",
                     index=ids.index(picked[0]) if picked and picked[0] in ids else 1)
    b = c2.selectbox("right", ids, format_func=labels.get, key="lab.compare_b",
                     index=ids.index(picked[1]) if picked and picked[1] in ids else 0)
    by_id = {e["id"]: e for e in entries}
    diff = differences(by_id[a]["request"], by_id[b]["request"])
    st.caption("They differ in: " + (", ".join(f"`{d}`" for d in diff) if diff else "nothing (same request)"))
    for column, key in ((c1, a), (c2, b)):
        with column.container(border=True):
            answer_card(by_id[key]["result"], by_id[key]["request"])


# ----------------------------------------------------------------------------- results

def answer_card(result: dict, request: dict) -> None:
    method = request.get("method") or {}
    params = method.get("params") or {}
    extra = (f" · slots: {params.get('slot_normalization', 'mean')} · mass "
             f"{'on' if params.get('mass_correction') else 'off'} · exact share "
             f"{hybrid_summary(method)} · fit {fit_summary(method)}") if method.get("name") == "faedkv" else ""
    st.markdown(f"**{result.get('method_label') or method.get('name')}** · "
                f"{plan_summary(method)}{extra}")
    st.text(f"{result.get('answer_prefix') or ''} {result.get('answer', '')}".strip())
    _score(result.get("score"))
    cache = views.cache_of(result)
    st.caption(f"{views.kept_text(cache['kept_tokens'], cache['prompt_tokens'])} · "
               f"{result.get('seconds', 0):.2f} s" + nll_text(result.get("answer_nll")))


def cache_warning(result: dict, method: dict) -> str | None:
    """One sentence when the cache kept is not the budget, saying why and what to change."""
    cache = views.cache_of(result)
    if method.get("name") == "full" or not method.get("compression_ratio"):
        return None
    tokens, kept, budget = cache["prompt_tokens"], cache["kept_tokens"], cache["budget_tokens"]
    params = method.get("params") or {}
    if not cache["compressed"]:
        why = ""
        if method.get("name") in PLANNED:
            sink, window = params.get("sink_tokens", 4), params.get("window", WINDOW)
            if tokens <= sink + window:
                why = (f": the prompt is not longer than sink ({sink}) + window ({window}) = "
                       f"{sink + window} tokens, so there is no middle to compress; use a longer "
                       "text or lower the sink and window")
        return (f"Nothing was compressed: the cache kept all {tokens} prompt tokens instead of "
                f"the budget's {budget}{why or ''}.")
    used = next((l for l in cache.get("layers") or [] if "sink_tokens" in l and "window" in l), None)
    if method.get("name") in PLANNED and used is not None:
        # window_share may ask for more than `window`; only a shrunk sink or window is a surprise
        asked = (params.get("sink_tokens", 4), params.get("window", WINDOW))
        if used["sink_tokens"] < asked[0] or used["window"] < asked[1]:
            return (f"The budget of {budget} rows could not hold sink {asked[0]} + window "
                    f"{asked[1]} and a slot: the press used sink {used['sink_tokens']} and window "
                    f"{used['window']} ({ui.plural(used.get('slots', '?'), 'slot')}); lower them to choose the "
                    "split yourself.")
    # dimsplit's equivalent rows lose < 1 row to each of M's two roundings (whole numbers, bins)
    if abs(kept - budget) > (2 if cache.get("virtual") else 1):
        return (f"The cache kept {kept:.0f} tokens on average, not the budget's {budget} "
                f"({100 * (1 - method['compression_ratio']):.0f}% of {tokens}).")
    return None


def show_result(entry: dict, stale: list[str]) -> None:
    result, request = entry["result"], entry["request"]
    method = request["method"]
    label = result.get("method_label") or method.get("name")
    prompt = request["prompt"]
    cache = views.cache_of(result)
    prov = views.generation_provenance(entry, ui.model_name())
    if stale:
        st.warning("**Stale:** the settings above changed since this result ("
                   + ", ".join(f"`{d}`" for d in stale[:6]) + "): re-run to update it.",
                   icon=":material/history:")
    st.caption(ui.provenance_line(prov))
    warning = cache_warning(result, method)
    if warning:
        st.warning(warning, icon=":material/warning:")
    question = result.get("question") or prompt.get("question")
    if question:
        st.markdown("**Question:**")
        st.text(question)
    if result.get("expected_answer"):
        st.markdown(f"**Expected:** `{result.get('expected_answer')}`")
    left, right = st.columns(2)
    with left.container(border=True):
        st.markdown("**Full cache**")
        if result.get("full_answer") is not None:
            st.text(f"{result.get('answer_prefix') or ''} {result['full_answer']}".strip())
            _score(result.get("full_score"))
            st.caption(f"{result.get('seconds_full', 0):.2f} s" + nll_text(result.get("full_answer_nll")))
        else:
            st.caption("not asked (turn on 'compare with the full cache')")
    with right.container(border=True):
        st.markdown(f"**{label}**")
        st.text(f"{result.get('answer_prefix') or ''} {result.get('answer', '')}".strip())
        _score(result.get("score"))
        st.caption(f"{result.get('seconds', 0):.2f} s" + nll_text(result.get("answer_nll")))
    c1, c2, c3 = st.columns(3)
    c1.metric("prompt tokens", cache["prompt_tokens"])
    c2.metric("cache kept (mean over layers)", f"{cache['kept_tokens']:.0f}",
              f"{cache['kept_fraction'] - 1:+.0%} (budget {cache['budget_tokens']})",
              delta_color="off", help="Dimension split: equivalent rows (exact dims + low-pass "
              "coefficients, in rows of head_dim numbers); every token keeps a reconstructed row "
              "for attention." if cache.get("virtual") else None)
    c3.metric("time (compressed run)", f"{result.get('seconds', 0):.2f} s")
    show_diagnostics(entry)
    entries = views.cache_entries(entry, ui.model_name())
    for figure in entries:
        ui.show_entry(figure)
    if method.get("name") != "full" and not any(e.name == "lab-reconstruction-error" for e in entries):
        st.caption("This method reports no reconstruction error (eviction keeps tokens exactly).")


def show_diagnostics(entry: dict) -> None:
    """The result's attention diagnostics: output error and middle-mass ratio per layer and KV
    head, side by side, each with what it says."""
    diagnostics = entry["result"].get("diagnostics")
    if not diagnostics:
        if not entry["request"].get("diagnostics"):
            st.caption("No attention diagnostics for this result: turn on 'diagnostics' and "
                       "re-run to see the output error and middle mass per layer and KV head.")
        return
    st.markdown("**Why the answers differ** (attention over each cache for the question's queries)")
    st.caption(views.diagnostics_means(diagnostics))
    slots = views.has_slot_masses(diagnostics)
    mass = "compressed"
    if slots:
        mass = st.segmented_control("middle mass", tuple(MASS_LABEL), format_func=MASS_LABEL.get,
                                    key=state.bind(PAGE, "mass_view", "compressed",
                                                   valid=state.options_valid(MASS_LABEL))) or "compressed"
        state.sync(PAGE, {"mass_view": mass})
    error, *ratio = views.diagnostics_entries(entry, ui.model_name(), mass)
    left, right = st.columns(2)
    with left:
        ui.show_entry(error)
        st.caption(views.OUTPUT_ERROR_NOTE)
    with right:
        if ratio:
            ui.show_entry(ratio[0])
            st.caption(views.MASS_NOTE.format(what=views.MASS_VIEWS[mass][1]))
        else:
            st.caption("This method keeps no slots (it evicts or keeps tokens exactly), so there is "
                       "no middle mass to compare: only the output error applies.")


def nll_text(nll) -> str:
    return "" if nll is None else f" · expected answer NLL {nll:.3f} nats/token"


def _score(score) -> None:
    if isinstance(score, dict):
        exact = score.get("exact")
        st.markdown((":green[:material/check_circle: found the needle]" if exact else
                     ":red[:material/cancel: missed the needle]") +
                    "".join(f" · {k} {v:.2f}" for k, v in score.items()
                            if k != "exact" and isinstance(v, (int, float))))


def run_generation(body: dict, label: str) -> dict | None:
    with st.spinner(f"generating with {label}" + (" and the full cache" if body["compare_full"]
                                                  else "") + "..."):
        result = ui.call("re-running generation", ui.client().generate, body)
    return remember(body, result) if result is not None else None


def with_normalisation(body: dict, norm: str) -> dict:
    method = {**body["method"], "params": {**body["method"]["params"], "slot_normalization": norm}}
    return {**body, "method": method}


# ----------------------------------------------------------------------------- page

def main() -> None:
    health = ui.page_setup("Frequency lab", "Re-run generation with FAEDKV or a baseline and compare runs. "
                           "FAEDKV's default is the search's winner: the dimension split (exact head dims plus "
                           "each other dim's lowest token-axis frequencies) behind KVzip's ranking. The slot "
                           "variants (iwdft, resample, dct-iterative) keep class means with a log(count) mass, "
                           "and the plan chooses which frequency chunks each layer keeps.")
    if health is None:
        st.stop()
    info = health.get("model") or {}
    layers = int(info.get("num_layers") or 1)
    context = int(info.get("context_length") or 8192)
    _init_mask(layers)
    if st.session_state.get("lab.plan_warning"):
        st.warning(st.session_state["lab.plan_warning"], icon=":material/link_off:")

    st.subheader("1 · Plan: retained chunks per layer")
    mask = st.session_state["lab.mask"]
    plan_source(layers, mask.shape[1])
    bulk_toggles(mask.shape[1])
    st.caption("Tick the chunks each layer keeps (columns: chunk 0 = lowest frequencies, up to "
               "0.5 cycles/token). Hover a column header for its frequency range.")
    edited = grid_editor(mask)
    if not np.array_equal(edited, mask):
        st.session_state["lab.mask"] = mask = edited
        st.session_state["lab.plan_name"] = "custom"
    plan_name = st.session_state.get("lab.plan_name", "custom")
    problem = plan_problem(mask)
    if problem:
        st.error(f"**The plan is not valid:** {problem}")
    st.markdown(f"Plan **{plan_name}**: {mask.sum()} of {mask.size} layer-chunks kept "
                f"({plans.ratio(mask):.0%}), {ui.plural(mask.shape[1], 'chunk')} per layer.")
    no_dc = [int(l) for l in np.flatnonzero(~mask[:, 0])]
    if no_dc and not problem:
        st.caption(f"Layer(s) {no_dc} drop chunk 0: their slots lose the mean level of the class "
                   "means and keep only its variations.")
    plan_files(mask, plan_name, layers, problem)

    st.subheader("2 · Re-run generation")
    prompt, prompt_values = prompt_form(context)
    spec, values = method_form(mask, plan_name, problem)
    c1, c2, c3, c4, c5 = st.columns([1, 1.4, 0.9, 1, 1.3], vertical_alignment="bottom")
    max_new = c1.number_input("max new tokens", 1, 512, key=state.bind(PAGE, "max_new", 32, int))
    compare = c2.toggle("compare with the full cache", key=state.bind(PAGE, "compare", True,
                                                                     state.decode_bool))
    diagnose = c3.toggle("diagnostics", key=state.bind(PAGE, "diagnostics", True, state.decode_bool),
                         help="Also measure, per layer and KV head, how far attention over the "
                              "compressed cache is from the full cache's for the question's "
                              "queries (one more prefill of the context with each cache).")
    state.sync(PAGE, {**prompt_values, **values, "max_new": int(max_new), "compare": compare,
                      "diagnostics": diagnose, "plan": state.encode_mask(mask),
                      "plan_name": plan_name})
    body = None
    if prompt is not None and spec is not None:
        params = ui.call("checking the request", GenerateParams, prompt=prompt, method=spec,
                         query_mode=values["query_mode"], max_new_tokens=int(max_new),
                         compare_full=compare, diagnostics=diagnose)
        body = params.model_dump(mode="json") if params is not None else None
    run = c4.button("Re-run generation", type="primary", icon=":material/play_arrow:",
                    disabled=body is None, key="lab.run")
    both = c5.button("Run both normalisations", icon=":material/compare:", key="lab.run_both",
                     disabled=body is None or values.get("variant") != "iwdft"
                     or values.get("slot_fit") == "probes",
                     help="Run this request with class means and with the old (M/t) × class "
                          "sums (faedkv's iwdft variant with class-mean slot fit only), then "
                          "compare them side by side below.")
    if run and body is not None:
        e = run_generation(body, spec.label)
        if e is not None:
            st.session_state["lab.shown"] = e["id"]
    if both and body is not None:
        done = [run_generation(with_normalisation(body, n), f"{spec.label} ({n})")
                for n in SLOT_NORMALIZATIONS]
        if all(done):
            st.session_state["lab.shown"] = done[0]["id"]
            st.session_state["lab.compare_pick"] = (done[0]["id"], done[1]["id"])
            for key in ("lab.compare_a", "lab.compare_b"):
                st.session_state.pop(key, None)

    entries = history()
    # the result last run here, or after a reload the newest stored one
    shown = next((e for e in entries if e["id"] == st.session_state.get("lab.shown")),
                 entries[0] if entries else None)
    if shown is not None:
        show_result(shown, differences(shown["request"], body) if body is not None else [])
    comparison(entries, body)


main()
