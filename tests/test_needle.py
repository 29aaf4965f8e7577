"""Needle task: scorers, samples, metrics relative to full, a resumable grid, SmolLM2 finds it."""
import csv
import json
import math

import pytest
import yaml

from analysis.api.params import MethodSpec, NeedleParams
from analysis.harness import haystack
from analysis.harness.models import load_model
from analysis.results.store import ResultsStore
from analysis.tasks import needle
from analysis.tasks.scoring import (exact_match, mean_interval, partial_match, recall, rouge_l,
                                    wilson_interval)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random-llama", dtype="float32")


def test_exact_and_partial_match():
    answer = "eat a sandwich and sit in Dolores Park on a sunny day."
    assert exact_match(" eat a sandwich and sit in Dolores Park on a sunny day. Enjoy!", answer) == 1
    assert exact_match("Eat a sandwich, and sit in dolores park on a sunny day", answer) == 1
    assert exact_match("eat a sandwich and sit in Dolores Park", answer) == 0
    assert partial_match("eat a sandwich and sit in Dolores Park", answer) == pytest.approx(8 / 11)
    assert partial_match("nothing relevant", answer) == 0
    assert exact_match("The pass key is 123456.", "12345") == 0      # word-aligned
    assert recall("7654321 and 1234567", ["1234567", "7654321", "1111111"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        exact_match("x", "...")


def test_rouge_l_on_known_strings():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert rouge_l("", "the cat") == 0.0
    # LCS "the cat the mat" = 4 of 6 reference and 4 of 5 prediction words.
    p, r = 4 / 5, 4 / 6
    assert rouge_l("the cat on the mat", "the cat sat by the mat") == pytest.approx(2 * p * r / (p + r))


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == pytest.approx(1) and wilson_interval(10, 10)[0] == pytest.approx(0.7225, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    mean, lo, hi = mean_interval([0.0, 1.0])
    assert mean == 0.5 and lo == 0 and hi == 1


@pytest.mark.parametrize("kind", ["sentence", "passkey", "multi"])
def test_samples_hold_their_answers_and_are_seeded(tiny, kind):
    s = needle.make_sample(tiny.tokenizer, kind, 1024, 40, seed=3)
    assert s == needle.make_sample(tiny.tokenizer, kind, 1024, 40, seed=3)
    for a in s.answers:
        assert a in s.context
    assert needle.score(s, " " + s.expected)["exact"] == 1
    assert needle.score(s, " I do not know.")["exact"] == 0
    # The document has the asked length (re-tokenizing the decoded text moves it by a few tokens).
    assert abs(len(haystack.encode(tiny.tokenizer, s.context)) - 1024) <= 10
    # The needle sits at the asked depth in the text too.
    assert abs(s.context.index(s.needles[0]) / len(s.context) - 0.40) < 0.05
    other = needle.make_sample(tiny.tokenizer, kind, 1024, 40, seed=4)
    assert other.context != s.context
    if kind != "sentence":
        assert other.answers != s.answers
    if kind == "multi":
        assert len(s.answers) == 3 and len(set(s.answers)) == 3


def test_depth_spacings():
    base = dict(methods=[MethodSpec(name="full")])
    assert needle.needle_depths(NeedleParams(**base, depths=[0, 50])) == [0, 50]
    assert needle.needle_depths(NeedleParams(**base, depth_spacing="linear", num_depths=5)) == [0, 25, 50, 75, 100]
    sig = needle.needle_depths(NeedleParams(**base, depth_spacing="sigmoid", num_depths=5))
    assert sig[0] == 0 and sig[-1] == 100 and sig[2] == 50
    assert sig[1] < 25 and sig[3] > 75      # denser near the ends, as the original tester


def _row(method, length, depth, sample, exact):
    return {"method": method, "label": method if method == "full" else f"{method}@0.5",
            "length": length, "depth": depth, "sample": sample, "exact": exact,
            "partial": exact, "rouge_l": exact, "seconds": 1.0, "cache_lengths": [10, 10],
            "prompt_tokens": 20}


def test_metrics_relative_to_full_on_the_same_samples():
    params = needle.normalized_params(NeedleParams(
        methods=[MethodSpec(name="snapkv", compression_ratio=0.5)], lengths=[100], depths=[0]))
    full = [1, 1, 0, 0]
    snap = [1, 0, 1, 0]
    rows = [_row("full", 100, 0, i, e) for i, e in enumerate(full)]
    rows += [_row("snapkv", 100, 0, i, e) for i, e in enumerate(snap)]
    m = needle.needle_metrics(rows, params)
    snap_m = next(r for r in m["by_method"] if r["label"] == "snapkv@0.5")
    assert snap_m["accuracy"] == 0.5 and snap_m["full_correct"] == 2
    assert snap_m["acc_given_full"] == 0.5           # right on 1 of the 2 samples full got
    assert snap_m["rel_to_full"] == 1.0               # 0.5 / 0.5
    assert (snap_m["ci_low"], snap_m["ci_high"]) == wilson_interval(2, 4)
    assert m["accuracy_full"] == 0.5
    table = needle.needle_table(m)
    assert {"label", "length", "depth", "accuracy", "ci_low", "rel_to_full"} <= set(table.columns)
    text = needle.needle_markdown(m, detail=True)
    assert "| snapkv@0.5 | 2/4 | 50% [15%, 85%] | 50% of 2 | 100% | 0.50 |" in text


def test_small_grid_writes_files_and_resumes_without_recomputing(tiny, tmp_path, monkeypatch):
    store = ResultsStore(tmp_path)
    params = NeedleParams(methods=[MethodSpec(name="snapkv", compression_ratio=0.5)],
                          lengths=[160], depths=[0, 100], samples=2, max_new_tokens=2)
    key = needle.run_needle(tiny, store, params, show_progress=False)
    run = store.get(key)
    assert run.status == "complete"
    with open(run.path / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2                       # full was added: 2 methods x 2 depths x 2
    assert {r["label"] for r in rows} == {"full", "snapkv@0.5"}
    assert all(json.loads(r["cache_lengths"]) == json.loads(r["expected_cache_lengths"]) for r in rows)
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["cells"] == 8 and len(metrics["by_cell"]) == 4
    config = yaml.safe_load((run.path / "config.yaml").read_text())["config"]
    assert config["model"] == tiny.info.key and config["params"]["methods"][0]["name"] == "full"
    assert "project_commit" in config
    # Same samples for every method: the prompts of full and snapkv match cell by cell.
    by = {(r["label"], r["depth"], r["sample"]): r for r in rows}
    assert all(by[("full", d, s)]["prompt_tokens"] == by[("snapkv@0.5", d, s)]["prompt_tokens"]
               for _, d, s in by)

    def boom(self, cell):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(needle.NeedleCell, "__call__", boom)
    assert needle.run_needle(tiny, store, params, show_progress=False) == key
    # Listing full explicitly is the same run.
    explicit = params.model_copy(update={"methods": [MethodSpec(name="full")] + params.methods})
    assert needle.run_needle(tiny, store, explicit, show_progress=False) == key


@pytest.mark.embedded
def test_smollm2_full_cache_finds_the_sentence_needle_at_2k_depth_50(embedded):
    from analysis.harness.generation import answer_details

    seed = needle.sample_seed(NeedleParams(methods=[MethodSpec(name="full")]), 2048, 0)
    s = needle.make_sample(embedded.tokenizer, "sentence", 2048, 50, seed)
    a = answer_details(embedded, None, s.context, s.question, 16, "query_agnostic", s.answer_prefix)
    assert embedded.info.dtype == "bfloat16"
    assert needle.score(s, a.text)["exact"] == 1, a.text
    assert not math.isnan(a.seconds)


def test_first_sample_draws_the_later_samples_of_a_longer_grid():
    """--first-sample 3 --samples 2 holds exactly samples 3 and 4 of a 5-sample grid (same ids and
    seeds), and a grid starting at 0 keeps the key it had before the field existed."""
    spec = [MethodSpec(name="kvzip", compression_ratio=0.5)]
    five = NeedleParams(methods=spec, lengths=[4096], depths=[0, 50], samples=5)
    tail = five.model_copy(update={"samples": 2, "first_sample": 3})
    by_id = {c["id"]: c for c in needle.needle_cells(five)}
    later = needle.needle_cells(tail)
    assert sorted({c["sample"] for c in later}) == [3, 4] and len(later) == 2 * 2
    assert all(by_id[c["id"]] == c for c in later)
    assert "first_sample" not in five.key_dict() and tail.key_dict()["first_sample"] == 3
