"""bench e2e: every cache row generates through model.generate and is reported (no timing
thresholds: times are only checked to be measured)."""
import pytest


def test_every_row_generates_and_is_reported(tmp_path):
    from analysis.bench.e2e import ROWS, e2e_markdown, e2e_rows
    from analysis.harness.models import load_model

    loaded = load_model("tiny-random-llama", device="cpu", dtype="float32")
    rows = e2e_rows(loaded, [300], new_tokens=4, ratio=0.75, repeats=1)
    assert [r["row"] for r in rows] == list(ROWS)
    for r in rows:
        assert r["ttft_s"] > 0 and r["total_s"] > 0 and r["peak_gb"] is None   # CPU: no CUDA peak
        assert r["ms_per_token"] > 0 and r["ttft_s"] < r["total_s"]   # one call: first token, then the rest
        assert r["ratio"] == (0.0 if r["row"] == "full" else 0.75)
    text = e2e_markdown(rows, "test machine", "cmd", loaded.info.name)
    assert text.count("\n| 300 |") == len(ROWS) and "Machine: test machine" in text


def test_a_method_spec_is_a_row():
    from analysis.bench.e2e import e2e_rows
    from analysis.harness.models import load_model

    loaded = load_model("tiny-random-llama", device="cpu", dtype="float32")
    row = "faedkv:exact_share=0.5:exact_scorer=knorm"
    seen = []
    (result,) = e2e_rows(loaded, [300], new_tokens=3, ratio=0.5, repeats=1, rows=[row],
                         on_row=lambda rows: seen.append(len(rows)))
    assert result["row"] == row and result["ratio"] == 0.5 and result["total_s"] > 0 and result["ttft_s"] > 0
    assert seen == [1]


def test_bad_rows_and_token_counts_are_refused():
    from analysis.bench.__main__ import main

    with pytest.raises(SystemExit, match="row 'oracle': .*unknown method 'oracle'"):
        main(["e2e", "--model", "tiny-random-llama", "--rows", "oracle"])
    with pytest.raises(SystemExit, match="row 'snapkv,knorm': one method per row"):
        main(["e2e", "--model", "tiny-random-llama", "--rows", "snapkv,knorm"])
    for row in ("kvzip", "faedkv:exact_share=0.5:exact_scorer=kvzip"):
        with pytest.raises(SystemExit, match="KVzip compresses when its `with` block ends"):
            main(["e2e", "--model", "tiny-random-llama", "--rows", row])
    with pytest.raises(SystemExit, match="at least 2"):
        main(["e2e", "--model", "tiny-random-llama", "--new-tokens", "1"])


def test_the_dimsplit_cache_row_generates_and_is_reported():
    from analysis.bench.e2e import e2e_markdown, e2e_rows
    from analysis.harness.models import load_model

    loaded = load_model("tiny-random-llama", device="cpu", dtype="float32")
    (result,) = e2e_rows(loaded, [300], new_tokens=3, ratio=0.5, repeats=1, rows=["dimsplit-cache"])
    assert result["row"] == "dimsplit-cache" and result["ratio"] == 0.5
    assert result["ms_per_token"] > 0 and result["ttft_s"] > 0
    text = e2e_markdown([result], "test machine", "cmd", loaded.info.name)
    assert "| 300 | dimsplit-cache | 0.5 |" in text and "dimsplit-cache = DimsplitCache" in text
