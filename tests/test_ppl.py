"""Continuation NLL after a compressed prefix: exact without a press, causal, different with one."""
import math

import pytest
import torch
from kvpress import KnormPress, PyramidKVPress, SnapKVPress

from analysis.api.params import MethodSpec, PplParams
from analysis.harness import haystack
from analysis.harness.models import load_model
from analysis.results.store import ResultsStore
from analysis.tasks import ppl


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random-llama", dtype="float32")


@pytest.fixture(scope="module")
def text(tiny):
    ids = haystack.text_tokens(tiny.tokenizer, 300, text_seed=0)
    return ids[:260], ids[260:]


def test_without_a_press_it_equals_one_plain_forward_pass(tiny, text):
    prefix, cont = text
    got = ppl.continuation_nll(tiny, None, prefix, cont)
    with torch.no_grad():
        logits = tiny.model(torch.tensor([prefix + cont])).logits[0].float()
    logp = logits[len(prefix) - 1:-1].log_softmax(-1)
    want = -logp.gather(-1, torch.tensor(cont)[:, None]).mean()
    assert got == pytest.approx(float(want), abs=1e-4)


@pytest.mark.parametrize("press", [SnapKVPress(compression_ratio=0.5),
                                   PyramidKVPress(compression_ratio=0.5)], ids=["snapkv", "pyramidkv"])
def test_a_real_press_changes_it_and_the_continuation_stays_causal(tiny, text, press):
    prefix, cont = text
    full = ppl.continuation_nll(tiny, None, prefix, cont)
    nll, lengths = ppl.continuation_token_nll(tiny, press, prefix, cont)
    assert all(n < len(prefix) - 1 for n in lengths)
    assert abs(float(nll.mean()) - full) > 1e-5     # float32 noise is ~1e-7 here
    # Changing token j of the continuation cannot change the loss of the tokens before it.
    j = 20
    changed = list(cont)
    changed[j] = (changed[j] + 7) % 1000
    nll2, _ = ppl.continuation_token_nll(tiny, press, prefix, changed)
    torch.testing.assert_close(nll[:j], nll2[:j], atol=1e-5, rtol=0)
    assert not torch.allclose(nll[j:j + 2], nll2[j:j + 2])


def test_continuation_positions_continue_from_the_original_prefix_length(tiny, text, monkeypatch):
    prefix, cont = text
    seen = []
    forward = tiny.model.forward

    def spy(*args, **kwargs):
        if kwargs.get("position_ids") is not None:
            seen.append(kwargs["position_ids"][0].tolist())
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny.model, "forward", spy)
    ppl.continuation_nll(tiny, KnormPress(compression_ratio=0.5), prefix, cont)
    assert seen == [list(range(len(prefix) - 1, len(prefix) - 1 + len(cont)))]


def test_a_small_ppl_run(tiny, tmp_path):
    store = ResultsStore(tmp_path)
    params = PplParams(methods=[MethodSpec(name="knorm", compression_ratio=0.5)],
                       prefix_tokens=128, continuation_tokens=16, num_texts=2)
    run = store.get(ppl.run_ppl(tiny, store, params, show_progress=False))
    m = run.metrics()
    full, knorm = m["by_method"]
    assert full["label"] == "full" and full["delta_nll"] == 0
    assert knorm["ppl"] == pytest.approx(math.exp(knorm["nll"]))
    assert knorm["delta_nll"] == pytest.approx(knorm["nll"] - full["nll"])
    assert "| knorm@0.5 |" in ppl.ppl_markdown(run)
