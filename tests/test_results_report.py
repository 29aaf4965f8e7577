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
    summary = text.split("every configuration tried")[1].split("Needle found per depth")[0]
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
