"""Scores of generated answers and the statistics of a grid cell.

    exact_match("eat a sandwich and sit in Dolores Park", "Eat a sandwich and sit in Dolores Park.")
    partial_match(prediction, answer)      # fraction of the answer's words found in the prediction
    rouge_l(prediction, reference)         # ROUGE-L F1 (rouge_score, stemmed)
    recall(prediction, ["1234567", "7654321"])   # fraction of the answers found
    wilson_interval(7, 10)                 # 95% interval of a proportion

Text is compared after `normalize`: lower case, punctuation removed, whitespace collapsed.
"""
from __future__ import annotations

import functools
import math
import re
import string

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}’‘“”]")


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalized answer occurs in the normalized prediction (word-aligned)."""
    target = normalize(answer)
    if not target:
        raise ValueError("the expected answer is empty after normalization: give a non-empty answer")
    return float(f" {target} " in f" {normalize(prediction)} ")


def partial_match(prediction: str, answer: str) -> float:
    """Fraction of the answer's distinct words that occur among the prediction's words."""
    words = set(normalize(answer).split())
    if not words:
        raise ValueError("the expected answer is empty after normalization: give a non-empty answer")
    found = set(normalize(prediction).split())
    return len(words & found) / len(words)


def recall(prediction: str, answers: list[str]) -> float:
    """Fraction of `answers` found (each by `exact_match`) in the prediction."""
    if not answers:
        raise ValueError("no expected answers to recall")
    return sum(exact_match(prediction, a) for a in answers) / len(answers)


@functools.lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between the prediction and the reference (0 when either is empty)."""
    if not prediction.strip() or not reference.strip():
        return 0.0
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% for the default z); (0, 1) when n == 0.
    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0/n or n/n."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside [0, n={n}]")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: list[float], z: float = 1.959964) -> tuple[float, float, float]:
    """(mean, low, high) of a mean score with a normal-approximation 95% interval, clipped to
    [0, 1] (scores here are fractions); (nan, 0, 1) for no values."""
    n = len(values)
    if n == 0:
        return math.nan, 0.0, 1.0
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0, 1.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(var / n)
    return mean, max(0.0, mean - half), min(1.0, mean + half)
