"""RULER-style suite: deterministic generators with their answers in the context; a tiny run."""
import pytest

from analysis.api.params import SUITE_TASKS, MethodSpec, SuiteParams
from analysis.harness import haystack
from analysis.harness.models import load_model
from analysis.results.store import ResultsStore
from analysis.tasks import suite


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random-llama", dtype="float32")


@pytest.mark.parametrize("task", SUITE_TASKS)
def test_generators_are_deterministic_and_answerable_from_the_context(tiny, task):
    tok = tiny.tokenizer
    s = suite.make_suite_sample(tok, task, 1024, seed=11)
    assert s == suite.make_suite_sample(tok, task, 1024, seed=11)
    assert suite.make_suite_sample(tok, task, 1024, seed=12).context != s.context
    n = len(haystack.encode(tok, s.context))
    assert 1024 - 40 <= n <= 1024 + 10
    if s.metric == "recall":
        for a in s.answers:
            assert a in s.context
    else:  # essay_qa: the quoted start and the expected rest form one sentence of the context
        flat = " ".join(s.context.split())
        assert f"{s.answer_prefix} {s.answers[0]}" in flat
        assert flat.count(s.answer_prefix) == 1 and s.answer_prefix in s.question
    assert suite.score_suite(s, " " + " ".join(s.answers) + " And then more.") == 1
    assert suite.score_suite(s, " 42") == 0


def test_task_specific_structure(tiny):
    tok = tiny.tokenizer
    mv = suite.make_suite_sample(tok, "multivalue_niah", 1024, 1)
    assert len(set(mv.answers)) == suite.NUM_NEEDLES
    vt = suite.make_suite_sample(tok, "variable_tracking", 1024, 1)
    positions = [vt.context.index(f"VAR {name} =") for name in vt.answers]
    assert positions == sorted(positions)          # the chain is in order
    cw = suite.make_suite_sample(tok, "common_words", 1024, 1)
    words = [w for w in cw.context.split() if w.isalpha() and w.islower()]
    counts = {w: words.count(w) for w in set(words)}
    least_common = min(counts[w] for w in cw.answers)
    assert all(c < least_common for w, c in counts.items() if w not in cw.answers)
    mv_half = suite.score_suite(mv, " ".join(mv.answers[:2]))
    assert mv_half == 0.5


def test_a_tiny_suite_run_has_one_score_per_task_and_an_average(tiny, tmp_path):
    store = ResultsStore(tmp_path)
    params = SuiteParams(methods=[MethodSpec(name="knorm", compression_ratio=0.5)],
                         tasks=["multikey_niah", "essay_qa"], context_length=256, samples=1,
                         max_new_tokens=2)
    run = store.get(suite.run_suite(tiny, store, params, show_progress=False))
    m = run.metrics()
    assert m["cells"] == 4 and [r["label"] for r in m["by_method"]] == ["full", "knorm@0.5"]
    for r in m["by_method"]:
        scores = [r["score_multikey_niah"], r["score_essay_qa"]]
        assert r["average"] == pytest.approx(sum(scores) / 2)
    assert "| knorm@0.5 |" in suite.suite_markdown(run)
    assert len(run.read_predictions()) == 4
