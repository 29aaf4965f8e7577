"""Exploration, not a feature: the dimension split with asymmetric key/value budgets.

    python benchmarks/explore/dimsplit_asymmetric.py KEY_FRACTION KEY_SHARE VALUE_SHARE MODEL STORE

KEY_FRACTION of the middle's 2R rows of numbers go to the keys, the rest to the values, and each side
has its own dim_share (FAEDKVPress gives each R rows and one share). It runs the needle CLI in-process
(2K tokens, depths 0-75%, 2 samples, ratio 0.75) with `faedkv.press.compress_dimsplit` replaced, so
the run's config does NOT record the patch: give every setting its own STORE, and never point STORE
at a shared store. docs/results-findings.md reports what it found (round 3).
"""
import sys

import faedkv.press as press
from faedkv.variants import compress_dimsplit


def main() -> int:
    key_fraction, key_share, value_share = map(float, sys.argv[1:4])
    model, store = sys.argv[4:6]
    calls = {"n": 0}

    def asymmetric(x, rows, dim_share, pairs=False):
        calls["n"] += 1
        is_key = calls["n"] % 2 == 1          # FAEDKVPress.compress_dimsplit: keys, then values
        budget = 2 * rows * (key_fraction if is_key else 1 - key_fraction)
        return compress_dimsplit(x, max(1, int(budget)), key_share if is_key else value_share, pairs)

    press.compress_dimsplit = asymmetric
    from analysis.__main__ import main as cli
    return cli(["needle", "--model", model, "--device", "cpu", "--lengths", "2048", "--depths", "0,25,50,75",
                "--samples", "2", "--ratios", "0.75", "--methods", "faedkv:variant=dimsplit", "--out", store,
                "--no-progress"])


if __name__ == "__main__":
    raise SystemExit(main())
