"""docs/RESULTS.md from a store: tables for every needle and ppl run of a model, unfinished runs
recomputed from their cells."""
import pytest

from analysis.api.params import MethodSpec, NeedleParams, PplParams
from analysis.results.store import ResultsStore


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from analysis.harness.models import load_model
    from analysis.tasks.needle import run_needle
    from analysis.tasks.ppl import run_ppl

    root = tmp_path_factory.mktemp("store")
    loaded = load_model("tiny-random-llama", dtype="float32")
    writer = ResultsStore(root)
    methods = [MethodSpec(name="faedkv", compression_ratio=0.5), MethodSpec(name="snapkv", compression_ratio=0.5)]
    run_needle(loaded, writer, NeedleParams(methods=methods, lengths=[256], depths=[0, 100], samples=1,
                                            max_new_tokens=2), show_progress=False)
    run_ppl(loaded, writer, PplParams(methods=methods, prefix_tokens=128, continuation_tokens=8, num_texts=2),
            show_progress=False)
    del writer
    return root, loaded.info.name


def test_report_has_a_summary_row_per_configuration_and_every_run(store, tmp_path):
    from analysis.bench.results_report import main

    root, model = store
    findings = tmp_path / "findings.md"
    findings.write_text("# Findings\n\nHand-written.\n")
    out = tmp_path / "RESULTS.md"
    assert main(["--store", str(root), "--model", model, "--findings", str(findings), "--out", str(out),
                 "--fragment", str(tmp_path / "frag.md"), "--machine", "test"]) == 0
    text = out.read_text()
    assert text.index("Hand-written.") < text.index("every configuration tried")
    summary = text.split("every configuration tried")[1].split("### The search's goal")[0]
    rows = [line for line in summary.splitlines() if line.startswith("| faedkv-iwdft |") or line.startswith("| snapkv |")]
    assert len(rows) == 2
    # 2 needle cells per method (depths 0 and 100) and an NLL increase at 0.5
    assert all(" of 2 " in row and row.rstrip(" |").split("|")[-1].strip()[0] in "+-" for row in rows), rows
    assert "#### Needle:" in text and "#### Continuation NLL:" in text and "Accuracy per depth" in text
    fragment = (tmp_path / "frag.md").read_text()
    assert fragment.startswith("### Quality on a real model: tiny-random-llama") and "Machine: test." in fragment
    assert [line for line in fragment.splitlines() if line.startswith("| snapkv |")] == [rows[1]]


def test_unfinished_runs_are_reported_from_their_cells(store, tmp_path):
    from analysis.bench.results_report import report

    root, model = store
    run_dir = next((root / "runs").glob("needle-*"))
    cells = sorted((run_dir / "cells").iterdir())
    removed = cells[0].read_bytes()
    cells[0].unlink()
    try:
        text = report(str(root), [model], None)
    finally:
        cells[0].write_bytes(removed)
    assert "UNFINISHED: 5 of 6 cells" in text


def test_a_folder_without_runs_is_a_clear_error(tmp_path):
    from analysis.bench.results_report import main

    with pytest.raises(SystemExit, match="has no runs/ folder"):
        main(["--store", str(tmp_path), "--out", str(tmp_path / "x.md")])


def test_nll_summary_keeps_to_one_set_of_texts(store, tmp_path):
    """A ppl run on other texts (held-out, another seed) must not overwrite the summary's NLL
    (differences compare only on the same texts); the note names it, its own table stays."""
    import shutil

    from analysis.bench.results_report import report
    from analysis.harness.models import load_model
    from analysis.tasks.ppl import run_ppl

    root, model = store
    copy = tmp_path / "store"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".lock", "index.sqlite"))
    before = report(str(copy), [model], None)
    summary_row = lambda text: next(line for line in text.split("### Tables from the store")[0].splitlines()
                                    if line.startswith("| snapkv |"))
    writer = ResultsStore(copy)
    held_out = run_ppl(load_model("tiny-random-llama", dtype="float32"), writer,
                       PplParams(methods=[MethodSpec(name="snapkv", compression_ratio=0.5)], prefix_tokens=128,
                                 continuation_tokens=8, num_texts=2, seed=7), show_progress=False)
    writer.release()
    after = report(str(copy), [model], None)
    assert summary_row(after) == summary_row(before)
    name = held_out if held_out.startswith("ppl-") else f"ppl-{held_out}"
    assert f"`{name}`" in after.split("### Tables from the store")[0]
    assert f"#### Continuation NLL: {name}" in after


def test_a_sample_two_runs_share_counts_once(store, tmp_path):
    """A rerun with more samples shares its first samples' seeds with the old run: the summary
    counts each (configuration, length, depth, seed) once, so n is the distinct samples."""
    import shutil

    from analysis.bench.results_report import report
    from analysis.harness.models import load_model
    from analysis.tasks.needle import run_needle

    root, model = store
    copy = tmp_path / "store"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".lock", "index.sqlite"))
    writer = ResultsStore(copy)
    run_needle(load_model("tiny-random-llama", dtype="float32"), writer,
               NeedleParams(methods=[MethodSpec(name="snapkv", compression_ratio=0.5)], lengths=[256],
                            depths=[0, 100], samples=2, max_new_tokens=2), show_progress=False)
    writer.release()
    summary = report(str(copy), [model], None).split("### Tables from the store")[0]
    snapkv = next(line for line in summary.splitlines() if line.startswith("| snapkv |"))
    full = next(line for line in summary.splitlines() if line.startswith("| full (ratio 0) |"))
    # 2 depths x 2 samples, of which the old run's 2 (sample 0) are the same samples
    assert " of 4 " in snapkv, snapkv
    assert "/4 found" in full, full
    depth_rows = [line for line in summary.splitlines() if line.startswith("| snapkv | 0.5 |")]
    assert len(depth_rows) == 1 and depth_rows[0].count("/2)") == 2, depth_rows


def test_suite_runs_get_a_summary_per_context_length(store, tmp_path):
    import shutil

    from analysis.api.params import SuiteParams
    from analysis.bench.results_report import report
    from analysis.harness.models import load_model
    from analysis.tasks.suite import run_suite

    root, model = store
    copy = tmp_path / "store"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".lock", "index.sqlite"))
    writer = ResultsStore(copy)
    run = run_suite(load_model("tiny-random-llama", dtype="float32"), writer,
                    SuiteParams(methods=[MethodSpec(name="snapkv", compression_ratio=0.5)], tasks=["multikey_niah"],
                                context_length=256, samples=2, max_new_tokens=2), show_progress=False)
    writer.release()
    text = report(str(copy), [model], None)
    section = text.split("### Suite at 256 tokens: every configuration tried")[1].split("###")[0]
    rows = [line for line in section.splitlines() if line.startswith("| snapkv |") or line.startswith("| full |")]
    assert len(rows) == 2 and all(row.rstrip(" |").endswith("| 2") for row in rows), rows
    name = run if run.startswith("suite-") else f"suite-{run}"
    assert f"#### Suite: {name}" in text


def test_a_model_without_needle_runs_gets_no_empty_depth_table(store, tmp_path):
    import shutil

    from analysis.bench.results_report import report

    root, model = store
    copy = tmp_path / "store"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".lock", "index.sqlite", "needle-*"))
    text = report(str(copy), [model], None)
    assert "#### Continuation NLL: ppl-" in text and "#### Needle" not in text
    assert "Needle found per depth" not in text and "| configuration | ratio |  |" not in text
    with_needles = report(str(root), [model], None)
    assert "Needle found per depth" in with_needles


def test_a_suite_row_missing_tasks_says_its_mean_covers_only_some():
    from analysis.bench.results_report import suite_summary

    records = [{"label": "full", "ratio": 0.0, "task": t, "score": s}
               for t, s in (("multikey_niah", 1.0), ("essay_qa", 0.2))]
    records.append({"label": "kvzip@0.5", "ratio": 0.5, "task": "multikey_niah", "score": 1.0})
    rows = {line.split(" | ")[0]: line for line in suite_summary(records).splitlines()[2:]}
    assert "only" not in rows["| full"], rows
    assert rows["| kvzip"].endswith("| 1.00 | - | 1.00 [0.00, 1.00], only 1 of 2 tasks | 1 |"), rows


class FakeSuiteRun:
    """What goal_check reads of a stored suite run: its params and its records."""

    def __init__(self, context_length: int, records: list[dict]):
        from analysis.api.params import SuiteParams

        params = SuiteParams(methods=[MethodSpec(name="kvzip", compression_ratio=0.5)], context_length=context_length)
        self.config, self._records = {"params": params.model_dump()}, records

    def records(self):
        return self._records


def needle(label, ratio, depth, found, n):
    return [{"label": label, "ratio": ratio, "depth": depth, "exact": float(i < found)} for i in range(n)]


def suite(label, task, scores):
    return [{"label": label, "ratio": 0.5, "task": task, "score": x, "seed": i, "context_tokens": 4000,
             "query_mode": "query_agnostic"} for i, x in enumerate(scores)]


def test_goal_check_marks_each_condition_of_the_search():
    """The goal table: a configuration that meets every condition is first with 5 of 5; one that
    misses says by how much; the NLL comes from the run with the most texts; a suite row missing a
    task is not compared; intervals apart against the strongest baseline's Wilson upper bound."""
    from analysis.bench.results_report import goal_check

    winner, default = "faedkv-dimsplit[exact_share=0.9]", "faedkv-iwdft"
    records = (needle("kvzip@0.5", 0.5, 0, 10, 10) + needle("kvzip@0.75", 0.75, 0, 43, 50)
               + needle("snapkv@0.75", 0.75, 0, 10, 50)
               + needle(f"{winner}@0.5", 0.5, 0, 50, 50)
               + [r for d in (0, 50, 100) for r in needle(f"{winner}@0.75", 0.75, d, 34, 34)]
               + needle(f"{default}@0.5", 0.5, 0, 2, 10) + needle(f"{default}@0.75", 0.75, 50, 0, 2)
               + needle(f"{default}@0.75", 0.75, 100, 2, 2))
    ppls = [(None, {"by_method": [{"label": f"{winner}@0.5", "ratio": 0.5, "n": 3, "delta_nll": 0.05},
                                  {"label": f"{default}@0.5", "ratio": 0.5, "n": 3, "delta_nll": 0.15}]}),
            (None, {"by_method": [{"label": f"{winner}@0.5", "ratio": 0.5, "n": 8, "delta_nll": 0.019}]})]
    runs = [FakeSuiteRun(4096, suite("kvzip@0.5", "essay_qa", [1, 0]) + suite("kvzip@0.5", "multikey_niah", [1, 1])
                         + suite(f"{winner}@0.5", "essay_qa", [1, 1]) + suite(f"{winner}@0.5", "multikey_niah", [1, 0])
                         + suite(f"{default}@0.5", "essay_qa", [0, 0]))]
    table = goal_check(records, ppls, runs)
    first, second = table.splitlines()[2:]
    assert first.startswith(f"| {winner} |") and first.endswith("| 5 of 5 |"), first
    assert "yes: 100% of 50" in first and "yes: lowest 100% (34/34) at depth 0" in first
    assert "yes: +0.0190 (8 texts)" in first                       # the 8-text run, not the 3-text one
    assert "yes: 0.75 against kvzip 0.75 at 4096" in first         # not below the best baseline: met
    assert "yes: at 0.75: [96.4, ...] against kvzip's [..., 93.0]" in first   # 102/102 vs 43/50
    cells = [c.strip() for c in second.strip("|").split("|")]
    assert cells == [default, "**no**: 20% of 10", "**no**: lowest 0% (0/2) at depth 50", "**no**: +0.1500 (3 texts)",
                     "-", cells[5], "0 of 5"] and cells[5].startswith("**no**: at 0.75: [15.0, ...]")
