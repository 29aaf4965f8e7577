"""The Streamlit pages' logic, driven by AppTest with a fake backend client injected.

The fake answers like the REST API (DEVELOPERS.md, "Backend REST API") from small in-memory
runs, and records every request, so a test can check what a widget edit sends.
"""
import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from analysis.api.client import BackendError

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app"
LAYERS, HEADS, CHUNKS, GRID = 3, 2, 22, 33

HEALTH = {"status": "ok", "commit": "abc123", "queue": {"queued": 0, "running": None},
          "model": {"name": "tiny-random-llama", "source": "tiny", "revision": "seed=0",
                    "dtype": "bfloat16", "device": "cpu", "num_layers": LAYERS,
                    "num_attention_heads": 4, "num_kv_heads": HEADS, "head_dim": 16,
                    "context_length": 8192}}


def summary(key, kind, task, metrics=None, status="complete", cells=1):
    return {"key": key, "kind": kind, "status": status, "created": "2026-11-28T15:00:00",
            "updated": "2026-11-28T15:01:00", "cells_done": cells, "cells_total": cells,
            "config": {"model": {"name": "tiny-random-llama"}, "task": task}, "metrics": metrics}


def spectra_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {"freqs": np.linspace(0, 0.5, GRID).tolist(),
            "energy": rng.random((LAYERS, HEADS, 2, 2, 2, GRID)).tolist(),
            "chunk_energy": rng.random((LAYERS, HEADS, 2, 2, 2, CHUNKS)).tolist()}


def needle_records():
    out = []
    for label, method in (("full", "full"), ("snapkv@0.75", "snapkv")):
        for length in (256, 512):
            for depth in (0.0, 50.0, 100.0):
                out.append({"method": method, "label": label, "ratio": 0.75, "length": length,
                            "depth": depth, "sample": 0, "exact": int(depth != 50.0 or label == "full"),
                            "partial": 1.0, "rouge_l": 0.5, "prediction": "42", "expected": "42"})
    return out


# per layer x KV head (LAYERS x HEADS): what analysis.harness.diagnostics returns
OUTPUT_ERROR = [[0.1, 0.2], [0.3, 0.4], [0.05, 0.15]]          # mean 0.2
MASS_FULL = [[0.5, 0.25], [0.4, 0.2], [0.8, 0.1]]
MASS_COMPRESSED = [[0.25, 0.25], [0.1, 0.2], [0.4, 0.1]]       # / full: 0.5 1 / 0.25 1 / 0.5 1
SLOT_MASS = [[0.125, 0.25], [0.1, 0.05], [0.2, 0.0]]           # / full: 0.25 1 / 0.25 0.25 / 0.25 0


def diagnostics(slots=True):
    missing = [None] * LAYERS
    return {"probes": 12, "context_tokens": 2048, "output_error": OUTPUT_ERROR,
            "middle_mass_full": MASS_FULL if slots else missing,
            "middle_mass_compressed": MASS_COMPRESSED if slots else missing,
            "slot_mass": SLOT_MASS if slots else missing}


class FakeClient:
    """In-memory backend: the client's methods, the REST API's answers, every call recorded."""

    def __init__(self, runs=None, arrays=None, records=None, fail=None, answer=None):
        self.calls = []
        self.answer = answer or {}      # fields that override generate()'s answer
        self._runs = runs or []
        self._arrays = arrays or {}
        self._records = records or {}
        self.fail = fail or {}          # method name -> BackendError to raise
        self._jobs = {}

    def _log(self, name, *args):
        self.calls.append((name, args))
        if name in self.fail:
            raise self.fail[name]

    def health(self):
        self._log("health")
        return HEALTH

    def runs(self, kind=None, limit=200):
        self._log("runs", kind, limit)
        return [r for r in self._runs if kind is None or r["kind"] == kind][:limit]

    def run(self, key):
        self._log("run", key)
        found = next(r for r in self._runs if r["key"] == key)
        return {**found, "records": self._records.get(key, [])}

    def array(self, key, name):
        self._log("array", key, name)
        return self._arrays[(key, name)]

    def submit(self, kind, params):
        self._log("submit", kind, params)
        job = {"id": f"job{len(self._jobs)}", "kind": kind, "params": params, "status": "queued",
               "progress": {"done": 0, "total": 4}, "run_key": None, "result": None,
               "error": None, "created": f"2026-12-01T20:00:{len(self._jobs):02d}"}
        self._jobs[job["id"]] = job
        return job

    def job(self, job_id):
        self._log("job", job_id)
        return self._jobs[job_id]

    def jobs(self):
        self._log("jobs")
        return sorted(self._jobs.values(), key=lambda j: j.get("created", ""), reverse=True)

    def cancel(self, job_id):
        self._log("cancel", job_id)
        self._jobs[job_id]["status"] = "cancelled"
        return self._jobs[job_id]

    def generate(self, params):
        self._log("generate", params)
        answer = self._answer(params)
        if params.get("diagnostics"):       # the backend measures them only when asked
            answer["diagnostics"] = diagnostics(params["method"]["name"] in ("faedkv", "dct_iterative"))
        return {**answer, **self.answer}

    def _answer(self, params):
        n = LAYERS
        return {"method": params["method"], "method_label": "faedkv-iwdft@0.5",
                "answer": "compressed says 7", "full_answer": "full says 42",
                "cache_lengths": [1024] * n, "expected_cache_length": [1024] * n,
                "reconstruction_error": [0.1, 0.2, 0.3], "prompt_tokens": 2048,
                "seconds": 1.0 + 0.25 * len(self.called("generate")), "seconds_full": 0.75,
                "question": "What is the number?",
                "expected_answer": "42", "answer_prefix": "The number is",
                "score": {"exact": 0, "partial": 0.0, "rouge_l": 0.0},
                "full_score": {"exact": 1, "partial": 1.0, "rouge_l": 1.0},
                "answer_nll": 2.5, "full_answer_nll": 0.25}

    def called(self, name):
        return [args for n, args in self.calls if n == name]


def app_for(page, fake, timeout=30, query=None):
    at = AppTest.from_file(str(APP / page), default_timeout=timeout)
    at.session_state["faedkv_client"] = fake
    for name, value in (query or {}).items():
        at.query_params[name] = value
    return at.run()


def no_exception(at):
    assert not at.exception, [e.value for e in at.exception]


def values(data):
    """A plotly JSON array: plain list, or a typed array {"dtype", "bdata", "shape"}."""
    if isinstance(data, dict) and "bdata" in data:
        flat = np.frombuffer(base64.b64decode(data["bdata"]), dtype=data["dtype"])
        shape = [int(n) for n in str(data.get("shape", len(flat))).split(",")]
        return flat.reshape(shape)
    return np.asarray(data)


def chart(at, i):
    return json.loads(at.get("plotly_chart")[i].proto.spec)


def texts(elements):
    return " ".join(e.value for e in elements)


# ----------------------------------------------------------------------------- overview

def test_overview_shows_model_runs_and_links():
    fake = FakeClient(runs=[summary("a" * 16, "needle", {})])
    at = app_for("Home.py", fake)
    no_exception(at)
    assert "tiny-random-llama" in [m.value for m in at.metric]
    assert "cpu · bfloat16" in [m.value for m in at.metric]
    assert at.dataframe[0].value["kind"].tolist() == ["needle"]
    assert "FAEDKV" in texts(at.markdown)


def test_overview_backend_error_is_a_message_not_a_traceback():
    fake = FakeClient(fail={"health": BackendError("missing or wrong bearer token", 401)})
    at = app_for("Home.py", fake)
    no_exception(at)
    message = texts(at.error)
    assert "missing or wrong bearer token" in message and "FAEDKV_TOKEN" in message


# ----------------------------------------------------------------------------- spectra

def test_spectra_without_runs_offers_to_compute_and_submits_the_job():
    fake = FakeClient()
    at = app_for("pages/spectra.py", fake)
    no_exception(at)
    assert "No spectra run" in texts(at.info)
    at.number_input[0].set_value(4096)
    at.button[0].click().run()
    no_exception(at)
    (kind, params), = fake.called("submit")
    assert kind == "spectra" and params["num_tokens"] == 4096 and params["chunks"] == 22


def test_spectra_plots_the_chosen_layers_and_keeps_them_in_the_url():
    key = "b" * 16
    fake = FakeClient(runs=[summary(key, "spectra", {"num_tokens": 512, "text_seed": 0,
                                                     "chunks": CHUNKS})],
                      arrays={(key, "spectra"): spectra_arrays()})
    at = app_for("pages/spectra.py", fake)
    no_exception(at)
    assert len(at.get("plotly_chart")) == 3
    at.multiselect(key="spectra.layers").set_value([0, 2]).run()
    no_exception(at)
    assert at.query_params["layers"] == "0,2" and at.query_params["run"] == key
    heatmap = chart(at, 0)
    assert list(heatmap["data"][0]["y"]) == ["L0", "L2"]
    assert "tiny-random-llama" in heatmap["layout"]["title"]["subtitle"]["text"]


# ----------------------------------------------------------------------------- frequency lab

def _lab(fake):
    at = app_for("pages/frequency_lab.py", fake)
    no_exception(at)
    return at


def _lab_iwdft(fake):
    """The lab on the iwdft slot variant (plans, slots; the default is the dimension split)."""
    at = _lab(fake)
    at.selectbox(key="lab.variant").set_value("iwdft").run()
    no_exception(at)
    return at


def test_lab_reruns_generation_with_the_edited_plan():
    fake = FakeClient()
    at = _lab_iwdft(fake)
    assert at.button(key="lab.run") is not None
    at.button(key="lab.run").click().run()
    no_exception(at)
    (body,), = fake.called("generate")
    plan = body["method"]["params"]["plan"]
    assert body["method"]["name"] == "faedkv" and body["compare_full"] is True
    assert plan["chunks"] == CHUNKS and plan["layers"] == [list(range(11))] * LAYERS
    assert "full says 42" in texts(at.text) and "compressed says 7" in texts(at.text)

    # drop chunks 0 and 1 in every layer: the next request carries the edited plan
    at.multiselect(key="lab.bulk").set_value([0, 1]).run()
    at.button(key="lab.drop_all").click().run()
    at.button(key="lab.run").click().run()
    no_exception(at)
    plan = fake.called("generate")[-1][0]["method"]["params"]["plan"]
    assert plan["layers"] == [list(range(2, 11))] * LAYERS and plan["name"] == "custom"
    assert at.query_params["plan"].startswith("22:")


def test_lab_ratio_and_method_reach_the_request():
    fake = FakeClient()
    at = _lab(fake)
    at.selectbox(key="lab.method").set_value("snapkv").run()
    at.slider(key="lab.ratio").set_value(0.75).run()
    at.button(key="lab.run").click().run()
    no_exception(at)
    (body,), = fake.called("generate")
    assert body["method"] == {"name": "snapkv", "compression_ratio": 0.75, "params": {}}
    assert at.query_params["method"] == "snapkv"


def test_lab_backend_error_shows_the_servers_message():
    fake = FakeClient(fail={"generate": BackendError(
        "prompt of 9000 tokens exceeds the model's context (8192); lower the length", 422)})
    at = _lab(fake)
    at.button(key="lab.run").click().run()
    no_exception(at)
    assert "exceeds the model's context" in texts(at.error)


# ----------------------------------------------------------------------------- needle

def test_needle_starts_a_grid_of_methods_times_ratios():
    fake = FakeClient()
    at = app_for("pages/needle.py", fake)
    no_exception(at)
    at.multiselect(key="needle.methods").set_value(["faedkv", "snapkv"])
    at.multiselect(key="needle.ratios").set_value([0.5, 0.75])
    at.multiselect(key="needle.lengths").set_value([512])
    at.button[0].click().run()
    no_exception(at)
    (kind, params), = fake.called("submit")
    assert kind == "needle" and params["lengths"] == [512]
    assert [(m["name"], m["compression_ratio"]) for m in params["methods"]] == [
        ("faedkv", 0.5), ("faedkv", 0.75), ("snapkv", 0.5), ("snapkv", 0.75)]
    from analysis.api.params import FAEDKV_DEFAULT

    assert params["methods"][0]["params"] == FAEDKV_DEFAULT and params["methods"][2]["params"] == {}
    assert any("needle grid queued" in (p.proto.text or "") for p in at.get("progress"))
    assert fake.called("job")

    fake = FakeClient()
    at = app_for("pages/needle.py", fake)
    at.selectbox(key="needle.variant").set_value("resample")          # a variant, plain
    at.button[0].click().run()
    no_exception(at)
    assert fake.called("submit")[-1][1]["methods"][0]["params"] == {"variant": "resample"}


def test_needle_shows_a_finished_grid_per_method():
    key = "c" * 16
    fake = FakeClient(runs=[summary(key, "needle", {"needle": "sentence", "lengths": [256, 512],
                                                    "depths": [0, 50, 100], "samples": 1,
                                                    "methods": [{"name": "snapkv",
                                                                 "compression_ratio": 0.75}]},
                                    cells=12)],
                      records={key: needle_records()})
    at = app_for("pages/needle.py", fake)
    no_exception(at)
    spec = chart(at, 0)
    assert values(spec["data"][1]["z"]).tolist() == [[1, 1], [0, 0], [1, 1]]   # snapkv misses 50%
    assert [a["text"] for a in spec["layout"]["annotations"]][:2] == ["full", "snapkv@0.75"]


# ----------------------------------------------------------------------------- ablation

def test_ablation_heatmap_and_derived_plan():
    key = "d" * 16
    delta = np.zeros((LAYERS, CHUNKS))
    delta[:, 5] = 1.0
    delta[:, 9] = 0.5
    fake = FakeClient(runs=[summary(key, "ablate", {"num_texts": 3, "prefix_tokens": 512,
                                                    "continuation_tokens": 64, "target": "kv"})],
                      arrays={(key, "ablation"): {"delta_mean": delta.tolist(),
                                                  "delta_sem": (delta / 10).tolist(),
                                                  "layers": list(range(LAYERS))}})
    at = app_for("pages/ablation.py", fake)
    no_exception(at)
    at.slider(key="ablation.ratio").set_value(0.1).run()       # ceil(2.2) = 3 chunks per layer
    no_exception(at)
    kept = values(chart(at, 1)["data"][0]["z"]).astype(bool)
    assert kept.sum(axis=1).tolist() == [3] * LAYERS and kept[:, 5].all() and kept[:, 9].all()
    assert at.query_params["ratio"] == "0.1"


def test_ablation_of_some_layers_fills_the_plan_from_the_nearest_layer():
    key = "f" * 16
    delta = np.zeros((2, CHUNKS))
    delta[0, 3] = delta[1, 7] = 1.0                      # layer 0 needs chunk 3, layer 2 chunk 7
    fake = FakeClient(runs=[summary(key, "ablate", {"layers": [0, 2]})],
                      arrays={(key, "ablation"): {"delta_mean": delta.tolist(),
                                                  "delta_sem": delta.tolist(), "layers": [0, 2]}})
    at = app_for("pages/ablation.py", fake)
    no_exception(at)
    assert list(chart(at, 0)["data"][0]["y"]) == ["0", "2"]
    kept = values(chart(at, 1)["data"][0]["z"]).astype(bool)
    assert kept.shape == (LAYERS, CHUNKS)
    assert kept[0, 3] and kept[1, 3] and kept[2, 7] and not kept[1, 7]    # layer 1 ties: lower


def test_ablation_without_runs_submits_an_ablate_job():
    fake = FakeClient()
    at = app_for("pages/ablation.py", fake)
    no_exception(at)
    at.button[0].click().run()
    (kind, params), = fake.called("submit")
    assert kind == "ablate" and params["chunks"] == 22


# ----------------------------------------------------------------------------- contribution

def test_contribution_lines_and_summaries():
    key = "e" * 16
    records = [{"method": "faedkv-iwdft@0.75", "contribution": [1.0] * 64, "one_minus_gini": 1.0,
                "oldest_over_newest": 1.0, "min_over_max": 1.0},
               {"method": "streaming_llm@0.75", "contribution": [1.0] * 4 + [0.0] * 40 + [1.0] * 20,
                "one_minus_gini": 0.3, "oldest_over_newest": 0.0, "min_over_max": 0.0}]
    fake = FakeClient(runs=[summary(key, "contrib", {"context_length": 64, "text_seed": 0,
                                                     "methods": [{"name": "faedkv",
                                                                  "compression_ratio": 0.75}]})],
                      records={key: records})
    at = app_for("pages/token_contribution.py", fake)
    no_exception(at)
    lines, bars = chart(at, 0), chart(at, 1)
    assert [t["name"] for t in lines["data"]] == ["faedkv-iwdft@0.75", "streaming_llm@0.75"]
    assert values(bars["data"][1]["y"])[0] == pytest.approx(0.3)


# ----------------------------------------------------------------------------- export

def test_export_page_lists_session_figures():
    fake = FakeClient()
    at = _lab(fake)
    at.button(key="lab.run").click().run()
    page = AppTest.from_file(str(APP / "pages" / "export_all.py"), default_timeout=30)
    page.session_state["faedkv_client"] = fake
    page.session_state["_figures"] = at.session_state["_figures"]
    page.run()
    no_exception(page)
    stems = texts(page.markdown)
    assert "lab-cache-lengths_tiny-random-llama_faedkv-iwdft@0.5_r0.5" in stems
    assert "lab-reconstruction-error" in stems


def test_export_page_without_figures_says_what_to_do():
    at = app_for("pages/export_all.py", FakeClient())
    no_exception(at)
    assert "No figure yet" in texts(at.info)


def test_app_modules_do_not_import_torch():
    code = ("import sys; sys.path.insert(0, %r); import app.ui, app.figures, app.export, "
            "app.state, analysis.api.plans; print('torch' in sys.modules)" % str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- issue 17

PAGES = ["Home.py", "pages/spectra.py", "pages/frequency_lab.py", "pages/token_contribution.py",
         "pages/needle.py", "pages/ablation.py", "pages/export_all.py"]


@pytest.mark.parametrize("page", PAGES)
def test_every_page_names_the_backends_model(page):
    at = app_for(page, FakeClient())
    no_exception(at)
    banner = texts(at.caption)
    assert "Backend model **tiny-random-llama**" in banner and "seed=0" in banner


def test_lab_says_when_nothing_was_compressed():
    # a 46-token own text under sink 4 + window 64: the press keeps the cache whole
    fake = FakeClient(answer={"cache_lengths": [46] * LAYERS, "prompt_tokens": 46,
                              "score": None, "full_score": None, "expected_answer": None,
                              "question": "Who?"})
    at = _lab(fake)
    at.button(key="lab.run").click().run()
    no_exception(at)
    warning = texts(at.warning)
    assert "Nothing was compressed" in warning and "all 46 prompt tokens" in warning
    assert "sink (4) + window (64) = 68" in warning
    captions = texts(at.caption)
    assert "kept 46 of 46 tokens (100%)" in captions and "keeps 50%" not in captions


def _cache(kept, tokens, budget, sink=4, window=64):
    return {"cache_lengths": [kept] * LAYERS, "prompt_tokens": tokens,
            "cache": {"prompt_tokens": tokens, "budget_tokens": budget, "kept_tokens": float(kept),
                      "kept_fraction": kept / tokens, "compressed": kept < tokens,
                      "layers": [{"slots": kept - sink - window, "sink_tokens": sink,
                                  "window": window}] * LAYERS}}


def test_lab_shows_the_cache_kept_against_the_budget():
    fake = FakeClient(answer=_cache(900, 2048, 1024))
    at = _lab(fake)
    at.button(key="lab.run").click().run()
    no_exception(at)
    assert "kept 900 tokens on average, not the budget's 1024" in texts(at.warning)
    assert "kept 900 of 2048 tokens (44%)" in texts(at.caption)


def test_lab_says_when_the_budget_forced_a_smaller_sink_and_window():
    fake = FakeClient(answer=_cache(256, 512, 256, sink=4, window=251))
    at = _lab(fake)
    at.number_input(key="lab.sink").set_value(4096).run()
    at.number_input(key="lab.window").set_value(65536).run()
    at.button(key="lab.run").click().run()
    no_exception(at)
    warning = texts(at.warning)
    assert "could not hold sink 4096 + window 65536" in warning
    assert "the press used sink 4 and window 251 (1 slot)" in warning


def _running(fake, kind, params=None):
    job = fake.submit(kind, params or {"lengths": [256], "depths": [0.0], "methods": []})
    job["status"] = "running"
    fake.calls.clear()
    return job


@pytest.mark.parametrize("page,kind", [("pages/needle.py", "needle"), ("pages/spectra.py", "spectra"),
                                       ("pages/ablation.py", "ablate"),
                                       ("pages/token_contribution.py", "contrib")])
def test_a_reload_reattaches_to_the_running_job(page, kind):
    fake = FakeClient()
    job = _running(fake, kind)
    at = app_for(page, fake)                     # a fresh session: nothing in session_state
    no_exception(at)
    assert any("running: 0/4" in (p.proto.text or "") for p in at.get("progress"))
    assert at.query_params["job"] == job["id"]
    cancel = next(b for b in at.button if b.label == "Cancel")
    cancel.click().run()
    no_exception(at)
    assert fake.called("cancel") == [(job["id"],)]


def test_a_shared_link_to_a_finished_job_opens_its_run():
    key = "c" * 16
    fake = FakeClient(runs=[summary(key, "needle", {"lengths": [256, 512], "depths": [0, 50, 100],
                                                    "methods": [{"name": "snapkv",
                                                                 "compression_ratio": 0.75}]})],
                      records={key: needle_records()})
    job = _running(fake, "needle")
    job.update(status="done", run_key=key)
    at = app_for("pages/needle.py", fake, query={"job": job["id"]})
    no_exception(at)
    assert "job" not in at.query_params and at.query_params["run"] == key
    assert not at.get("progress")


def _ablation_run(key, chunks, layers=LAYERS, model="tiny-random-llama"):
    delta = np.zeros((layers, chunks))
    delta[:, 1] = 1.0
    run = summary(key, "ablate", {"chunks": chunks, "num_texts": 1, "prefix_tokens": 256,
                                  "continuation_tokens": 64})
    run["config"]["model"] = {"name": model}
    return run, {(key, "ablation"): {"delta_mean": delta.tolist(), "delta_sem": delta.tolist(),
                                     "layers": list(range(layers))}}


def test_lab_plan_from_an_ablation_with_another_chunk_count_loads():
    run, arrays = _ablation_run("a" * 16, 11)
    fake = FakeClient(runs=[run], arrays=arrays)
    at = _lab_iwdft(fake)
    at.segmented_control(key="lab.start").set_value("ablation").run()
    no_exception(at)
    assert not at.warning
    at.button(key="lab.apply").click().run()
    no_exception(at)
    at.button(key="lab.run").click().run()
    plan = fake.called("generate")[-1][0]["method"]["params"]["plan"]
    assert plan["chunks"] == 11 and all(1 in kept for kept in plan["layers"])
    assert at.query_params["start"] == "ablation" and at.query_params["plan"].startswith("11:")


def test_lab_lists_no_ablation_of_another_model():
    run, arrays = _ablation_run("a" * 16, 22, layers=30, model="smollm2-135m-instruct")
    fake = FakeClient(runs=[run], arrays=arrays)
    at = _lab(fake)
    at.segmented_control(key="lab.start").set_value("ablation").run()
    no_exception(at)
    assert "1 ablation run of other models not listed" in texts(at.caption)
    assert at.selectbox(key="lab.ablation_run").options == []


def test_export_rebuilds_figures_of_stored_runs_in_a_fresh_session():
    spectra_key, needle_key = "b" * 16, "c" * 16
    fake = FakeClient(runs=[summary(spectra_key, "spectra", {"num_tokens": 512, "chunks": CHUNKS}),
                            summary(needle_key, "needle", {"lengths": [256, 512],
                                                           "depths": [0, 50, 100], "samples": 1,
                                                           "methods": [{"name": "snapkv",
                                                                        "compression_ratio": 0.75}]})],
                      arrays={(spectra_key, "spectra"): spectra_arrays()},
                      records={needle_key: needle_records()})
    at = app_for("pages/export_all.py", fake)
    no_exception(at)
    assert not at.info
    stems = texts(at.markdown)
    assert f"spectra-heatmap_tiny-random-llama_keys-post-rope-iwdft_{spectra_key[:12]}" in stems
    assert f"needle-grid_tiny-random-llama" in stems and needle_key[:12] in stems
    assert "Download all 4 figures as a zip" in [b.label for b in at.get("download_button")]


def test_lab_own_text_asks_for_a_text_instead_of_a_pydantic_error():
    at = _lab(FakeClient())
    at.segmented_control(key="lab.prompt").set_value("text").run()
    no_exception(at)
    shown = texts(at.error) + texts(at.info)
    assert "pydantic" not in shown and "validation error" not in shown
    assert "Paste the text to compress" in texts(at.info)
    assert at.button(key="lab.run").disabled


def test_validation_messages_are_one_sentence_each():
    from pydantic import ValidationError

    from analysis.api.params import TaskPrompt
    from app.ui import validation_message

    with pytest.raises(ValidationError) as err:
        TaskPrompt(kind="text", text="")
    message = validation_message(err.value)
    assert message == "Kind 'text' needs a non-empty `text` (the context to compress)."
    with pytest.raises(ValidationError) as err:
        TaskPrompt(context_length=10, depth=300)
    message = validation_message(err.value)
    assert "pydantic" not in message and message.count(".") == 2
    assert message.startswith("context_length: Input should be greater than or equal to 64.")


def _timed_needle_run(key="t" * 16, seconds=14.0, length=1024):
    run = summary(key, "needle", {"lengths": [length], "depths": [0.0], "samples": 1,
                                  "methods": [{"name": "snapkv", "compression_ratio": 0.75}]},
                  metrics={"by_length": [{"label": "full", "length": length, "n": 1,
                                          "seconds": seconds},
                                         {"label": "snapkv@0.75", "length": length, "n": 1,
                                          "seconds": seconds}]})
    return run


def test_needle_asks_before_a_grid_of_many_hours():
    fake = FakeClient(runs=[_timed_needle_run()], records={"t" * 16: []})
    at = app_for("pages/needle.py", fake)
    at.multiselect(key="needle.methods").set_value(["faedkv", "snapkv"])
    at.multiselect(key="needle.ratios").set_value([0.5, 0.75])
    at.multiselect(key="needle.lengths").set_value([1024, 2048])
    at.multiselect(key="needle.depths").set_value(list(range(0, 101, 10)))
    at.number_input(key="needle.samples").set_value(100)
    next(b for b in at.button if b.label == "Start grid").click().run()
    no_exception(at)
    assert not fake.called("submit")
    warning = texts(at.warning)
    # 5 methods (full added) x 2 lengths x 11 depths x 100 samples, 14 s per 1024-token cell
    assert "11000 cells" in warning and "about 64.2 h" in warning and "14.0 s at 1024 tokens" in warning
    at.button(key="needle.confirm").click().run()
    no_exception(at)
    (kind, params), = fake.called("submit")
    assert kind == "needle" and params["samples"] == 100


def test_needle_starts_a_small_grid_and_says_how_long():
    fake = FakeClient(runs=[_timed_needle_run(seconds=2.0)], records={"t" * 16: []})
    at = app_for("pages/needle.py", fake)
    at.multiselect(key="needle.lengths").set_value([1024])
    next(b for b in at.button if b.label == "Start grid").click().run()
    no_exception(at)
    assert len(fake.called("submit")) == 1
    assert "20 cells, about 40 s" in texts(at.caption)


def test_lab_keeps_a_history_marks_stale_results_and_compares_two():
    fake = FakeClient()
    at = _lab(fake)
    at.button(key="lab.run").click().run()
    at.slider(key="lab.ratio").set_value(0.75).run()
    no_exception(at)
    assert "**Stale:**" in texts(at.warning) and "compression_ratio" in texts(at.warning)
    at.button(key="lab.run").click().run()
    no_exception(at)
    assert "**Stale:**" not in texts(at.warning)
    table = at.dataframe[-1].value
    assert len(table) == 2 and table["current"].tolist() == ["✓", ""]
    assert {"plan", "method", "normalisation", "answer", "found", "answer NLL", "rouge_l",
            "cache kept", "seconds"} <= set(table.columns)
    assert table["answer NLL"].tolist() == [2.5, 2.5]
    assert "expected answer NLL 0.250 nats/token" in texts(at.caption)
    assert "They differ in: `method.compression_ratio`" in texts(at.caption)


def test_lab_runs_both_slot_normalisations_side_by_side():
    fake = FakeClient()
    at = _lab_iwdft(fake)
    assert at.toggle(key="lab.mass").value is True                 # the mass is on by default
    at.button(key="lab.run_both").click().run()
    no_exception(at)
    sent = [body["method"]["params"]["slot_normalization"] for (body,) in fake.called("generate")]
    assert sent == ["mean", "sum"]
    table = at.dataframe[-1].value
    assert sorted(table["normalisation"]) == ["mean", "sum"]
    assert "They differ in: `method.params.slot_normalization`" in texts(at.caption)


def test_lab_own_text_result_shows_the_question_and_answers_as_text():
    answer = "First paragraph.\n\n# Not a heading\n\nThird *paragraph*."
    fake = FakeClient(answer={"question": "What does the text say?", "answer": answer,
                              "score": None, "expected_answer": None, "answer_prefix": None})
    at = _lab(fake)
    at.segmented_control(key="lab.prompt").set_value("text").run()
    at.text_area(key="lab.text").set_value("A long text. " * 100).run()
    at.text_input(key="lab.question").set_value("What does the text say?").run()
    at.button(key="lab.run").click().run()
    no_exception(at)
    assert "What does the text say?" in texts(at.text)
    assert answer in [t.value for t in at.text]
    assert "# Not a heading" not in texts(at.markdown)


@pytest.mark.parametrize("bad", ["5:1.2", "22:zzz"])        # 2 layers for 3; not hex
def test_lab_link_with_a_bad_plan_says_so(bad):
    at = app_for("pages/frequency_lab.py", FakeClient(), query={"plan": bad})
    no_exception(at)
    warning = texts(at.warning)
    assert f"plan={bad}" in warning and "showing low-pass-0.5 instead" in warning


def test_lab_plan_grid_headers_fit_two_digits_and_an_empty_plan_errs_once():
    at = _lab_iwdft(FakeClient())
    at.multiselect(key="lab.bulk").set_value(list(range(CHUNKS))).run()
    at.button(key="lab.drop_all").click().run()
    no_exception(at)
    assert len(at.error) == 1 and "keep no chunk" in at.error[0].value
    assert at.button(key="lab.run").disabled
    columns = json.loads(at.dataframe[0].proto.columns)
    assert columns["10"]["label"] == "10" and columns["10"]["width"] >= 52


def test_spectra_heatmap_draws_visible_chunk_lines_and_values_have_one_key_space():
    key = "b" * 16
    fake = FakeClient(runs=[summary(key, "spectra", {"num_tokens": 512, "text_seed": 0,
                                                     "chunks": CHUNKS})],
                      arrays={(key, "spectra"): spectra_arrays()})
    at = app_for("pages/spectra.py", fake)
    heatmap = chart(at, 0)
    lines = [s for s in heatmap["layout"]["shapes"] if s["line"].get("dash") == "dot"]
    assert len(lines) == CHUNKS - 1 and all(s["line"]["color"].startswith("rgba(255,255,255") for s in lines)
    assert "mean of 2 heads" in heatmap["layout"]["title"]["text"]
    at.multiselect(key="spectra.heads").set_value([0]).run()
    assert "mean of 1 head," in chart(at, 0)["layout"]["title"]["text"]
    at.segmented_control(key="spectra.kv").set_value("values").run()
    no_exception(at)
    assert at.segmented_control(key="spectra.space").disabled
    assert "pre-RoPE" not in chart(at, 0)["layout"]["title"]["subtitle"]["text"]
    assert "class means" in texts(at.caption)


def test_run_pickers_show_tokens_chunks_and_other_models():
    key, other = "b" * 16, "o" * 16
    runs = [summary(key, "spectra", {"num_tokens": 512, "chunks": CHUNKS}),
            summary(other, "spectra", {"num_tokens": 4096, "chunks": 11})]
    runs[1]["config"]["model"] = {"name": "smollm2-135m-instruct"}
    fake = FakeClient(runs=runs, arrays={(key, "spectra"): spectra_arrays(),
                                         (other, "spectra"): spectra_arrays()})
    at = app_for("pages/spectra.py", fake)
    picker = at.selectbox(key="spectra.run")
    labels = picker.options
    assert "512 tok · 22 chunks" in labels[0] and "OTHER MODEL" not in labels[0]
    assert "4096 tok · 11 chunks" in labels[1] and "OTHER MODEL smollm2-135m-instruct" in labels[1]
    picker.select_index(1).run()
    assert "computed on **smollm2-135m-instruct**" in texts(at.warning)


def test_export_names_differ_per_run_and_counts_are_singular():
    from app.export import file_stem
    from app.views import ablation_entries

    prov = {"model": "m", "method": "snapkv", "ratio": 0.5}
    assert file_stem("x", {**prov, "run": "a" * 16}) != file_stem("x", {**prov, "run": "b" * 16})
    run, arrays = _ablation_run("a" * 16, CHUNKS)
    heatmap, _ = ablation_entries(run, arrays[("a" * 16, "ablation")], "continuation", 0.05, LAYERS)
    assert heatmap.provenance["text"].startswith("1 essay,")


def test_readme_links_the_shipped_method_description():
    readme = (ROOT / "README.md").read_text()
    assert "../shared/docs/FAEDKV-SPEC.md" not in readme and "(docs/METHOD.md)" in readme
    method = (ROOT / "docs" / "METHOD.md").read_text()
    assert "class mean" in method and "log" in method


def _stored_generation(fake, **answer):
    body = {"prompt": {"kind": "needle", "needle": "sentence", "context_length": 2048,
                       "depth": 50.0, "seed": 0},
            "method": {"name": "faedkv", "compression_ratio": 0.5,
                       "params": {"variant": "iwdft", "slot_normalization": "sum"}},
            "query_mode": "query_agnostic", "max_new_tokens": 32, "compare_full": True}
    job = fake.submit("generate", body)
    job.update(status="done", result={**fake._answer(body), "model": "tiny-random-llama", **answer},
               finished="2026-12-01T19:00:00.000+00:00")
    fake.calls.clear()
    return job


def test_lab_lists_the_backends_stored_generations_after_a_reload():
    fake = FakeClient()
    _stored_generation(fake, answer="stored answer")
    at = _lab(fake)                                   # a fresh session
    table = at.dataframe[-1].value
    assert table["answer"].tolist() == ["stored answer"] and table["normalisation"].tolist() == ["sum"]
    assert table["current"].tolist() == [""]          # the settings on the page differ
    assert "stored answer" in texts(at.text) and "**Stale:**" in texts(at.warning)


def test_export_rebuilds_a_stored_generations_figures():
    fake = FakeClient()
    _stored_generation(fake)
    at = app_for("pages/export_all.py", fake)
    no_exception(at)
    stems = texts(at.markdown)
    assert "lab-cache-lengths_tiny-random-llama_faedkv-iwdft@0.5_r0.5_gen-" in stems
    assert "lab-reconstruction-error" in stems


def test_lab_says_when_its_history_mixes_models():
    fake = FakeClient()
    _stored_generation(fake, model="smollm2-135m-instruct")
    _stored_generation(fake, model="tiny-random-llama", answer="other")
    at = _lab(fake)
    assert "come from 2 models (smollm2-135m-instruct, tiny-random-llama)" in texts(at.warning)


# ----------------------------------------------------------------------------- issue 15

def titled(at, text):
    """The plotly charts whose title contains `text`."""
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    return [c for c in specs if text in c["layout"]["title"]["text"]]


def test_lab_search_knobs_reach_the_request_the_url_and_the_table():
    fake = FakeClient()
    at = _lab_iwdft(fake)
    assert at.selectbox(key="lab.exact_scorer").disabled            # no exact tokens by default
    assert at.number_input(key="lab.fit_probes").disabled           # class-mean slots by default
    at.button(key="lab.run").click().run()
    params = fake.called("generate")[-1][0]["method"]["params"]
    assert params["exact_share"] == 0.0 and params["slot_fit"] == "mean"
    assert "exact_scorer" not in params and "fit_probes" not in params   # they would do nothing

    at.slider(key="lab.exact_share").set_value(0.25).run()
    at.selectbox(key="lab.exact_scorer").set_value("snapkv").run()
    at.selectbox(key="lab.slot_fit").set_value("probes").run()
    at.number_input(key="lab.fit_probes").set_value(32).run()
    no_exception(at)
    assert at.button(key="lab.run_both").disabled                   # probes refit class means only
    at.button(key="lab.run").click().run()
    no_exception(at)
    params = fake.called("generate")[-1][0]["method"]["params"]
    assert (params["exact_share"], params["exact_scorer"]) == (0.25, "snapkv")
    assert (params["slot_fit"], params["fit_probes"]) == ("probes", 32)
    assert [at.query_params[k] for k in ("exact_share", "exact_scorer", "slot_fit", "fit_probes")] == [
        "0.25", "snapkv", "probes", "32"]
    table = at.dataframe[-1].value
    assert table["exact share"].tolist() == ["25% snapkv", "0"]
    assert table["slot fit"].tolist() == ["probes (32)", "mean"]
    assert "exact share 25% snapkv · fit probes (32)" in texts(at.markdown)


def test_lab_slot_hybrid_can_pool_exact_tokens_across_a_layer():
    fake = FakeClient()
    at = _lab_iwdft(fake)
    assert at.selectbox(key="lab.exact_pool").disabled              # no exact tokens by default
    at.slider(key="lab.exact_share").set_value(0.5).run()
    at.selectbox(key="lab.exact_scorer").set_value("keydiff").run()
    at.selectbox(key="lab.exact_pool").set_value("layer").run()
    # each head then has its own number of slots, which the lab's plan cannot cover: said, not sent
    assert at.button(key="lab.run").disabled and any("drop the plan" in e.value for e in at.error)
    at.toggle(key="lab.use_plan").set_value(False).run()
    at.button(key="lab.run").click().run()
    no_exception(at)
    params = fake.called("generate")[-1][0]["method"]["params"]
    assert (params["exact_share"], params["exact_scorer"], params["exact_pool"]) == (0.5, "keydiff", "layer")
    assert "plan" not in params or params["plan"] is None
    assert at.dataframe[-1].value["exact share"].tolist()[0] == "50% keydiff (layer)"
    # global moves tokens between layers, which slots cannot store: refused before any request
    at.selectbox(key="lab.exact_pool").set_value("global").run()
    no_exception(at)
    assert at.button(key="lab.run").disabled
    assert any("only the dimension split stores" in e.value for e in at.error)


def test_lab_dimension_split_sends_dim_share_and_no_plan():
    fake = FakeClient()
    at = _lab_iwdft(fake)
    assert at.slider(key="lab.dim_share").disabled                 # a slot variant has no dim share
    at.button(key="lab.run").click().run()
    assert "dim_share" not in fake.called("generate")[-1][0]["method"]["params"]
    at.selectbox(key="lab.variant").set_value("dimsplit").run()
    at.slider(key="lab.dim_share").set_value(0.3).run()
    at.slider(key="lab.exact_share").set_value(0.0).run()        # the split alone, no exact tokens
    no_exception(at)
    assert at.toggle(key="lab.use_plan").disabled
    at.button(key="lab.run").click().run()
    no_exception(at)
    params = fake.called("generate")[-1][0]["method"]["params"]
    assert params["variant"] == "dimsplit" and params["dim_share"] == 0.3
    assert "plan" not in params and "exact_share" not in params and "slot_fit" not in params


def test_lab_starts_on_faedkvs_default_and_the_button_brings_it_back():
    """The lab's FAEDKV is FAEDKVPress()'s configuration; the hybrid knobs follow the variant while
    untouched (a slot variant plain), a changed knob stays unless the variant cannot take it."""
    from analysis.api.params import FAEDKV_DEFAULT, SLOT_HYBRID

    fake = FakeClient()
    at = _lab(fake)
    at.button(key="lab.run").click().run()
    no_exception(at)
    method = fake.called("generate")[-1][0]["method"]
    assert method["name"] == "faedkv" and method["compression_ratio"] == 0.5
    assert {k: method["params"][k] for k in FAEDKV_DEFAULT} == FAEDKV_DEFAULT and "plan" not in method["params"]

    at.selectbox(key="lab.variant").set_value("iwdft").run()      # untouched knobs: iwdft plain
    no_exception(at)
    assert {k: at.session_state[f"lab.{k}"] for k in SLOT_HYBRID} == SLOT_HYBRID
    at.slider(key="lab.ratio").set_value(0.75).run()
    at.number_input(key="lab.window").set_value(256).run()       # the default's window replaces it
    at.button(key="lab.default").click().run()
    no_exception(at)
    assert at.selectbox(key="lab.variant").value == "dimsplit" and at.toggle(key="lab.use_plan").disabled
    at.button(key="lab.run").click().run()
    no_exception(at)
    method = fake.called("generate")[-1][0]["method"]
    assert method["compression_ratio"] == 0.75                                       # the ratio is kept
    assert {k: method["params"][k] for k in FAEDKV_DEFAULT} == FAEDKV_DEFAULT and "plan" not in method["params"]
    assert at.query_params["window_share"] == "0.5" and at.query_params["exact_pool"] == "global"

    at.slider(key="lab.exact_share").set_value(0.5).run()         # a changed knob stays; global does not
    at.selectbox(key="lab.variant").set_value("resample").run()
    no_exception(at)
    assert (at.session_state["lab.exact_share"], at.session_state["lab.exact_pool"]) == (0.5, "layer")


def test_lab_window_share_is_sent_and_comes_back_from_a_link():
    fake = FakeClient()
    at = _lab(fake)
    at.slider(key="lab.window_share").set_value(0.5).run()
    at.button(key="lab.run").click().run()
    no_exception(at)
    assert fake.called("generate")[-1][0]["method"]["params"]["window_share"] == 0.5
    assert at.query_params["window_share"] == "0.5"
    at.selectbox(key="lab.variant").set_value("dct-iterative").run()      # its window is its step: not sent
    assert at.slider(key="lab.window_share").disabled
    at.button(key="lab.run").click().run()
    no_exception(at)
    assert "window_share" not in fake.called("generate")[-1][0]["method"]["params"]
    linked = app_for("pages/frequency_lab.py", FakeClient(), query={"window_share": "0.25"})
    no_exception(linked)
    assert linked.slider(key="lab.window_share").value == 0.25


def test_lab_search_knobs_come_back_from_a_link():
    at = app_for("pages/frequency_lab.py", FakeClient(), query={
        "exact_share": "0.5", "exact_scorer": "keydiff", "slot_fit": "probes", "fit_probes": "16",
        "diagnostics": "0"})
    no_exception(at)
    assert at.slider(key="lab.exact_share").value == 0.5
    assert at.selectbox(key="lab.exact_scorer").value == "keydiff"
    assert at.selectbox(key="lab.slot_fit").value == "probes"
    assert at.number_input(key="lab.fit_probes").value == 16
    assert at.toggle(key="lab.diagnostics").value is False


def test_lab_diagnostics_heatmaps_with_slot_masses():
    fake = FakeClient()
    at = _lab(fake)
    assert at.toggle(key="lab.diagnostics").value is True            # on by default
    at.button(key="lab.run").click().run()
    no_exception(at)
    assert fake.called("generate")[-1][0]["diagnostics"] is True
    error, = titled(at, "Attention-output error")
    assert values(error["data"][0]["z"]).tolist() == OUTPUT_ERROR
    assert list(error["data"][0]["x"]) == ["H0", "H1"] and list(error["data"][0]["y"]) == ["L0", "L1", "L2"]
    ratio, = titled(at, "Middle mass, compressed middle / full cache")
    assert values(ratio["data"][0]["z"]).tolist() == [[0.5, 1.0], [0.25, 1.0], [0.5, 1.0]]
    captions = texts(at.caption)
    assert "Jensen" in captions and "exp(mean) ≤ mean(exp)" in captions
    assert "the same queries" in captions
    assert "(12 probe queries, 2048 context tokens): output error 0.2 · middle mass under full " \
           "attention 0.375 · compressed middle 0.217 · slots 0.121" in captions

    at.segmented_control(key="lab.mass_view").set_value("slots").run()
    no_exception(at)
    ratio, = titled(at, "Middle mass, slots alone / full cache")
    assert values(ratio["data"][0]["z"]).tolist() == [[0.25, 1.0], [0.25, 0.25], [0.25, 0.0]]
    assert at.query_params["mass_view"] == "slots"
    assert "mass the slots alone take" in texts(at.caption)


def test_lab_diagnostics_of_an_eviction_method_show_the_output_error_only():
    fake = FakeClient()
    at = _lab(fake)
    at.selectbox(key="lab.method").set_value("snapkv").run()
    at.button(key="lab.run").click().run()
    no_exception(at)
    assert len(titled(at, "Attention-output error")) == 1
    assert not titled(at, "Middle mass")
    assert "lab.mass_view" not in [w.key for w in at.segmented_control]
    assert "keeps no slots" in texts(at.caption)
    assert "slots 0." not in texts(at.caption)        # the means line has no masses either


def test_lab_without_diagnostics_asks_for_none_and_says_how_to_get_them():
    fake = FakeClient()
    at = _lab(fake)
    at.toggle(key="lab.diagnostics").set_value(False).run()
    at.button(key="lab.run").click().run()
    no_exception(at)
    assert fake.called("generate")[-1][0]["diagnostics"] is False
    assert not titled(at, "Attention-output error")
    assert "turn on 'diagnostics' and re-run" in texts(at.caption)
    assert at.query_params["diagnostics"] == "0"


def test_export_rebuilds_a_stored_generations_diagnostics():
    fake = FakeClient()
    _stored_generation(fake, diagnostics=diagnostics())
    at = app_for("pages/export_all.py", fake)
    no_exception(at)
    stems = texts(at.markdown)
    assert "lab-output-error_tiny-random-llama" in stems and "lab-mass-ratio-compressed" in stems


def test_mass_ratio_divides_per_head_and_keeps_missing_layers_blank():
    from app.figures import head_heatmap
    from app.views import mass_ratio

    ratio = mass_ratio([[0.2, 0.3], None, [0.1, None]], [[0.4, 0.0], None, [0.2, 0.5]])
    assert ratio == [[0.5, None], None, [0.5, None]]
    z = np.asarray(head_heatmap(ratio, "ratio").data[0].z, dtype=float)
    assert z.shape == (3, 2) and z[0, 0] == 0.5 and np.isnan(z[1]).all() and np.isnan(z[0, 1])
    text = head_heatmap(ratio, "ratio").data[0].text             # values written in the cells
    assert text[0][0] == "0.50" and text[0][1] == "" and list(text[1]) == ["", ""]


def test_dimsplit_cache_figure_shows_the_stored_equivalent_rows_not_every_token():
    """The dimension split hands attention every token's rebuilt row (cache_lengths = T); the
    lab's cache figure must show what it stores (equivalent rows, about the budget) and say so."""
    from app.views import cache_entries

    cache = {"prompt_tokens": 1000, "budget_tokens": 500, "kept_tokens": 499.5, "kept_fraction": 0.4995,
             "compressed": True, "virtual": True, "rows": 1000.0,
             "layers": [{"equivalent_rows": 499.0}, {"equivalent_rows": 500.0}]}
    generation = {"id": "g1", "request": {"method": {"name": "faedkv", "compression_ratio": 0.5,
                                                     "params": {"variant": "dimsplit"}}, "prompt": {}},
                  "result": {"cache_lengths": [1000, 1000], "cache": cache, "prompt_tokens": 1000}}
    (figure,) = [e for e in cache_entries(generation) if e.name.startswith("lab-cache-lengths")]
    assert "equivalent rows" in figure.title
    assert list(figure.data["cache_length"]) == [499.0, 500.0]
    plain = dict(cache, virtual=False)
    generation["result"]["cache"] = plain
    (figure,) = [e for e in cache_entries(generation) if e.name.startswith("lab-cache-lengths")]
    assert list(figure.data["cache_length"]) == [1000, 1000] and "equivalent" not in figure.title


QWEN = "/tmp/m/model"


def _qwen_needle_run(key="9" * 16):
    run = summary(key, "needle", {"needle": "sentence", "lengths": [256, 512], "depths": [0, 50, 100],
                                  "samples": 1, "methods": [{"name": "snapkv", "compression_ratio": 0.75}]},
                  cells=12)
    run["config"]["model"] = {"name": QWEN, "revision": "local:0123abcd"}
    run["created"] = "2026-12-01T18:00:00"          # newer than the tiny model's grid
    return run


def test_needle_picks_a_grid_of_another_model_labelled_with_its_model():
    mine, qwen = "c" * 16, "9" * 16
    records = needle_records()
    qwen_records = [{**r, "exact": 1} for r in records]     # the other model finds every needle
    fake = FakeClient(runs=[_qwen_needle_run(qwen), summary(mine, "needle", {
        "lengths": [256, 512], "depths": [0, 50, 100], "samples": 1,
        "methods": [{"name": "snapkv", "compression_ratio": 0.75}]}, cells=12)],
        records={mine: records, qwen: qwen_records})
    at = app_for("pages/needle.py", fake)
    no_exception(at)
    picker = at.selectbox(key="needle.run")
    assert "OTHER MODEL" not in picker.options[0]                   # the backend's model first
    assert f"OTHER MODEL {QWEN} (local:0123abcd)" in picker.options[1]
    assert f"{QWEN} (local:0123abcd) (1 grid)" in texts(at.caption)
    assert values(chart(at, 0)["data"][1]["z"]).tolist() == [[1, 1], [0, 0], [1, 1]]
    picker.select_index(1).run()
    no_exception(at)
    assert at.query_params["run"] == qwen
    assert f"computed on **{QWEN} (local:0123abcd)**" in texts(at.warning)
    spec = chart(at, 0)
    assert values(spec["data"][1]["z"]).tolist() == [[1, 1], [1, 1], [1, 1]]
    assert QWEN in spec["layout"]["title"]["subtitle"]["text"]


def test_overview_filters_runs_by_model_and_shows_the_results_document():
    from app import results_doc

    fake = FakeClient(runs=[_qwen_needle_run(), summary("a" * 16, "spectra", {})])
    at = app_for("Home.py", fake)
    no_exception(at)
    picker = at.selectbox(key="home.model")
    assert picker.options == ["every model", "tiny-random-llama (the backend's model)",
                              f"{QWEN} (local:0123abcd)"]
    assert at.dataframe[0].value["model"].tolist() == [f"{QWEN} (local:0123abcd)", "tiny-random-llama"]
    picker.select_index(2).run()
    assert at.dataframe[0].value["kind"].tolist() == ["needle"]
    shown = texts(at.markdown)
    if results_doc.RESULTS.exists():
        text = results_doc.without_comments(results_doc.RESULTS.read_text())
        assert "`docs/RESULTS.md`" in shown and results_doc.lead_sentence(text) in shown
        assert results_doc.first_table(text) in shown
    else:
        assert "is not in this checkout yet" in texts(at.caption)


def test_results_document_pieces():
    from app.results_doc import first_table, lead_sentence, without_comments

    doc = without_comments("<!-- made by a script -->\n# T\n\nIntro.\n\n## The answer\n\n"
                           "**No, it does not.** More words. And more.\n\n```\n| not | a table |\n```\n\n"
                           "| a | b |\n|---|---|\n| 1 | 2 |\n\ntext\n\n| c |\n|---|\n")
    assert doc.startswith("# T")
    assert lead_sentence(doc) == "**No, it does not.**"
    assert first_table(doc) == "| a | b |\n|---|---|\n| 1 | 2 |"
    assert lead_sentence("no sections here") is None and first_table("no table") is None
