"""Frequency lab: edit which frequency chunks each layer keeps, then re-run generation."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:    # AppTest runs a page file on its own
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from analysis.params import (KEY_SPACES, METHODS, NEEDLE_KINDS, QUERY_MODES, VARIANTS,  # noqa: E402
                             GenerateParams, MethodSpec, TaskPrompt)
from app import figures, plans, state, ui  # noqa: E402

PAGE = "lab"
STARTS = ("low-pass", "energy", "ablation")
PLANNED = ("faedkv", "dct_iterative")          # methods that take a frequency plan
SPACE_LABEL = {"post_rope": "post-RoPE keys", "pre_rope": "pre-RoPE keys"}


# ----------------------------------------------------------------------------- plan state

def _set_mask(mask: np.ndarray, name: str) -> None:
    """Replace the plan; the editor widget restarts from it (new key)."""
    st.session_state["lab.mask"] = np.asarray(mask, dtype=bool)
    st.session_state["lab.plan_name"] = name
    st.session_state["lab.version"] = st.session_state.get("lab.version", 0) + 1


def _init_mask(layers: int) -> None:
    current = st.session_state.get("lab.mask")
    if current is not None and current.shape[0] == layers:
        return
    chunks = plans.DEFAULT_CHUNKS
    mask = state.initial(PAGE, "plan", None,
                         parse=lambda t: state.decode_mask(t, layers, int(t.partition(":")[0])))
    if mask is None:
        mask = plans.low_pass(0.5, layers, chunks)
        _set_mask(mask, "low-pass-0.5")
        return
    _set_mask(mask, state.initial(PAGE, "plan_name", "custom"))


def plan_source(layers: int, chunks: int) -> None:
    """Start from low-pass at a ratio, from a spectra run's energy, or from an ablation run."""
    c1, c2, c3 = st.columns([2, 2, 3], vertical_alignment="bottom")
    source = c1.segmented_control("start from", STARTS, key="lab.start", default="low-pass")
    plan_ratio = c2.slider("chunks kept per layer", 0.05, 1.0, 0.5, 0.05, key="lab.plan_ratio",
                           help="Fraction of the chunks each layer keeps (the plan's ratio). The "
                                "cache length is set by the compression ratio below.")
    k = plans.kept_per_layer(plan_ratio, chunks)
    scores, name = None, f"low-pass-{plan_ratio:g}"
    if source == "energy":
        runs = [r for r in ui.runs("spectra") if r.get("status") == "complete"]
        run = c3.selectbox("spectra run", runs, format_func=ui.run_label, key="lab.energy_run")
        if run is None:
            c3.caption("No spectra run yet: compute one on the Spectra page.")
            return
        data = ui.arrays(run["key"], "spectra")
        if data is None:
            return
        # energy per chunk of keys and values (post-RoPE, IWDFT), summed over heads
        scores = np.asarray(data["chunk_energy"])[:, :, :, 0, 0, :].sum(axis=(1, 2))
        name = f"energy-{plan_ratio:g}"
    elif source == "ablation":
        runs = [r for r in ui.runs("ablate") if r.get("status") == "complete"]
        run = c3.selectbox("ablation run", runs, format_func=ui.run_label, key="lab.ablation_run")
        if run is None:
            c3.caption("No ablation run yet: compute one on the Ablation page.")
            return
        data = ui.arrays(run["key"], "ablation")
        if data is None:
            return
        ablated = data["layers"] if "layers" in data else range(len(data["delta_mean"]))
        scores = plans.fill_layers(data["delta_mean"], ablated, layers)
        name = f"ablation-{plan_ratio:g}"
    if scores is not None and scores.shape != (layers, chunks):
        st.warning(f"That run has {scores.shape[0]} layers × {scores.shape[1]} chunks; the plan "
                   f"has {layers} × {chunks}. Pick a run of this model (or set chunks to "
                   f"{scores.shape[1]}).")
        return
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


def grid_editor(mask: np.ndarray) -> np.ndarray:
    """A layers x chunks grid of checkboxes; returns the edited mask."""
    layers, chunks = mask.shape
    edges = figures.chunk_edges(chunks)
    frame = pd.DataFrame(mask, columns=[str(c) for c in range(chunks)],
                         index=[f"L{l}" for l in range(layers)])
    config = {str(c): st.column_config.CheckboxColumn(
        str(c), width=43, help=f"chunk {c}: frequencies {edges[c]:.3f}–{edges[c + 1]:.3f} (cycles/token)")
        for c in range(chunks)}
    edited = st.data_editor(frame, column_config=config, key=f"lab.editor.{st.session_state['lab.version']}",
                            height=min(35 * layers + 40, 720), width="stretch")
    return edited.to_numpy(dtype=bool)


def plan_files(mask: np.ndarray, name: str, layers: int) -> None:
    c1, c2 = st.columns([1, 2], vertical_alignment="center")
    try:
        text = plans.to_json(mask, name)
        c1.download_button("Download plan JSON", text, file_name=f"plan_{name}_{ui.model_name()}.json",
                           mime="application/json", icon=":material/download:", on_click="ignore",
                           key="lab.plan_download")
    except ValueError as exc:
        c1.error(str(exc))
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

def prompt_form(context: int) -> TaskPrompt | None:
    kind = st.segmented_control("prompt", ("needle", "text"), key=state.bind(PAGE, "prompt", "needle"),
                                format_func={"needle": "needle task", "text": "my own text"}.get)
    if kind == "text":
        text = st.text_area("context (compressed)", key="lab.text", height=160,
                            placeholder="Paste a long text; its KV cache is what gets compressed.")
        question = st.text_input("question (asked after the context)", key="lab.question")
        return ui.call("checking the prompt", TaskPrompt, kind="text", text=text or None,
                       question=question or None)
    c1, c2, c3, c4 = st.columns(4)
    needle = c1.selectbox("needle", NEEDLE_KINDS, key=state.bind(
        PAGE, "needle", "sentence", valid=state.options_valid(NEEDLE_KINDS)))
    length = c2.number_input("length (tokens)", 64, context, step=256, key=state.bind(
        PAGE, "length", min(2048, context), int, lambda v: 64 <= v <= context))
    depth = c3.slider("depth (%)", 0, 100, step=5, key=state.bind(PAGE, "depth", 50, int))
    seed = c4.number_input("seed", 0, 10_000, key=state.bind(PAGE, "seed", 0, int))
    state.sync(PAGE, {"prompt": kind, "needle": needle, "length": int(length), "depth": int(depth),
                      "seed": int(seed)})
    return ui.call("checking the prompt", TaskPrompt, kind="needle", needle=needle,
                   context_length=int(length), depth=float(depth), seed=int(seed))


def method_form(mask: np.ndarray, plan_name: str) -> tuple[MethodSpec | None, dict]:
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
        c1, c2, c3, c4, c5 = st.columns(5)
        if name == "faedkv":
            params["variant"] = c1.selectbox("variant", VARIANTS, key=state.bind(
                PAGE, "variant", "iwdft", valid=state.options_valid(VARIANTS)))
        params["key_space"] = c2.selectbox("key space", KEY_SPACES, format_func=SPACE_LABEL.get,
                                           key=state.bind(PAGE, "key_space", "post_rope",
                                                          valid=state.options_valid(KEY_SPACES)))
        params["sink_tokens"] = int(c3.number_input("sink tokens", 0, 4096, key=state.bind(
            PAGE, "sink", 4, int)))
        params["window"] = int(c4.number_input("recent window", 0, 65536, key=state.bind(
            PAGE, "window", 64, int)))
        params["mass_correction"] = c5.toggle("mass correction", key=state.bind(
            PAGE, "mass", False, state.decode_bool), help="add log(tokens per slot) to the slots' "
            "attention logits")
        use_plan = st.toggle("apply the plan above", key=state.bind(PAGE, "use_plan", True,
                                                                   state.decode_bool),
                             help="off: keep every frequency bin (plan = null)")
        if use_plan:
            try:
                params["plan"] = plans.to_json_dict(mask, plan_name)
            except ValueError as exc:
                st.error(f"**The plan is not valid:** {exc}")
                return None, {}
    values = {"method": name, "ratio": float(ratio), "query_mode": query_mode}
    values.update({k: v for k, v in params.items() if k != "plan"})
    spec = ui.call("checking the method", MethodSpec, name=name,
                   compression_ratio=0.0 if name == "full" else float(ratio), params=params)
    return spec, values


def show_result(result: dict, request: dict) -> None:
    method = request["method"]
    label = result.get("method_label") or method.get("name")
    prompt = request["prompt"]
    text = (f"needle {prompt['needle']} {prompt['context_length']} tok @ {prompt['depth']:g}% "
            f"(seed {prompt['seed']})" if prompt["kind"] == "needle" else
            f"own text ({result.get('prompt_tokens', '?')} tokens)")
    ratio = method.get("compression_ratio")
    prov = ui.provenance(text=text, method=label, budget=ui.budget_text(ratio), ratio=ratio)
    st.caption(ui.provenance_line(prov))
    if result.get("question"):
        st.markdown(f"**Question:** {result['question']}  \n**Expected:** `{result.get('expected_answer')}`")
    left, right = st.columns(2)
    with left.container(border=True):
        st.markdown("**Full cache**")
        if result.get("full_answer") is not None:
            st.markdown(f"> {result.get('answer_prefix') or ''} {result['full_answer']}")
            _score(result.get("full_score"))
            st.caption(f"{result.get('seconds_full', 0):.2f} s")
        else:
            st.caption("not asked (turn on 'compare with the full cache')")
    with right.container(border=True):
        st.markdown(f"**{label}**")
        st.markdown(f"> {result.get('answer_prefix') or ''} {result.get('answer', '')}")
        _score(result.get("score"))
        st.caption(f"{result.get('seconds', 0):.2f} s")
    lengths = result.get("cache_lengths") or []
    c1, c2, c3 = st.columns(3)
    c1.metric("prompt tokens", result.get("prompt_tokens", "?"))
    c2.metric("mean cache length", f"{np.mean(lengths):.0f}" if lengths else "?",
              f"{np.mean(lengths) / max(1, result.get('prompt_tokens') or 1) - 1:+.0%}" if lengths else None,
              delta_color="off")
    c3.metric("time (compressed run)", f"{result.get('seconds', 0):.2f} s")
    config = {"request": request, "result": {k: v for k, v in result.items()}}
    if lengths:
        full = [result.get("prompt_tokens")] * len(lengths) if result.get("prompt_tokens") else None
        fig = figures.layer_bars(lengths, "cache length (tokens)", reference=full,
                                 reference_name="full cache")
        ui.show_figure("lab-cache-lengths", "Cache length per layer after compression", fig, prov,
                       pd.DataFrame({"layer": range(len(lengths)), "cache_length": lengths}), config)
    errors = result.get("reconstruction_error")
    if errors and any(e is not None for e in errors):
        values = [np.nan if e is None else e for e in errors]
        fig = figures.layer_bars(values, "reconstruction error")
        ui.show_figure("lab-reconstruction-error", "Relative reconstruction error of the "
                       "compressed middle, per layer", fig, prov,
                       pd.DataFrame({"layer": range(len(values)), "reconstruction_error": values}),
                       config)
    elif method.get("name") not in ("full",):
        st.caption("This method reports no reconstruction error (eviction keeps tokens exactly).")


def _score(score) -> None:
    if isinstance(score, dict):
        exact = score.get("exact")
        st.markdown((":green[:material/check_circle: found the needle]" if exact else
                     ":red[:material/cancel: missed the needle]") +
                    "".join(f" · {k} {v:.2f}" for k, v in score.items()
                            if k != "exact" and isinstance(v, (int, float))))


# ----------------------------------------------------------------------------- page

def main() -> None:
    health = ui.page_setup("Frequency lab", "Choose which frequency chunks each layer keeps "
                           "(a plan), then re-run generation and compare with the full cache.")
    if health is None:
        st.stop()
    info = health.get("model") or {}
    layers = int(info.get("num_layers") or 1)
    context = int(info.get("context_length") or 8192)
    _init_mask(layers)

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
    st.markdown(f"Plan **{plan_name}**: {mask.sum()} of {mask.size} layer-chunks kept "
                f"({plans.ratio(mask):.0%}).")
    plan_files(mask, plan_name, layers)

    st.subheader("2 · Re-run generation")
    prompt = prompt_form(context)
    spec, values = method_form(mask, plan_name)
    c1, c2, c3 = st.columns([1, 1, 2], vertical_alignment="bottom")
    max_new = c1.number_input("max new tokens", 1, 512, key=state.bind(PAGE, "max_new", 32, int))
    compare = c2.toggle("compare with the full cache", key=state.bind(PAGE, "compare", True,
                                                                     state.decode_bool))
    state.sync(PAGE, {**values, "max_new": int(max_new), "compare": compare,
                      "plan": state.encode_mask(mask), "plan_name": plan_name})
    run = c3.button("Re-run generation", type="primary", icon=":material/play_arrow:",
                    disabled=prompt is None or spec is None, key="lab.run")
    if run:
        params = ui.call("checking the request", GenerateParams, prompt=prompt, method=spec,
                         query_mode=values["query_mode"], max_new_tokens=int(max_new),
                         compare_full=compare)
        if params is not None:
            body = params.model_dump(mode="json")
            with st.spinner(f"generating with {spec.label}" + (" and the full cache" if compare
                                                               else "") + "..."):
                result = ui.call("re-running generation", ui.client().generate, body)
            if result is not None:
                st.session_state["lab.result"] = (result, body)
    if st.session_state.get("lab.result"):
        show_result(*st.session_state["lab.result"])


main()
