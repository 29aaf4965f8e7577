"""bench gpu --parts real-compress: prefill compression on a real model's own cache, tested on the
CPU with the tiny random Llama and Qwen2 (no timing thresholds: times are only checked to be
measured)."""
import json

import pytest
import torch

from analysis.bench import real_compress as rc
from analysis.bench.__main__ import main as bench_main


def tiny(name: str, dtype: str = "float32"):
    from analysis.harness.models import load_model

    return load_model(name, device="cpu", dtype=dtype)


def essay_ids(loaded, tokens: int):
    from analysis.harness.haystack import text_tokens

    return torch.tensor([text_tokens(loaded.tokenizer, tokens)])


@pytest.mark.parametrize("name,dtype,element", [("tiny-random-llama", "float32", 4),
                                                ("tiny-random-qwen2", "bfloat16", 2)])
def test_rows_for_every_method_and_length_with_the_floor_of_the_real_shapes(name, dtype, element):
    from kvpress.utils import compute_n_kept

    loaded = tiny(name, dtype)
    config = loaded.model.config
    bandwidth = 1e9
    rows = rc.real_compress_rows(loaded, [300, 400], bandwidth, repeats=2, progress=False)
    assert [(r["tokens"], r["method"]) for r in rows] == [(t, m) for t in (300, 400) for m in rc.REAL_METHODS]
    head_dim = loaded.info.head_dim
    per_row = config.num_key_value_heads * head_dim * element           # one row of K (or V)
    for r in rows:
        budget = compute_n_kept(r["tokens"], 0.75)
        assert r["budget_rows"] == budget and r["layers"] == config.num_hidden_layers and r["repeats"] == 2
        assert (r["kv_heads"], r["head_dim"], r["dtype"]) == (config.num_key_value_heads, head_dim, dtype)
        assert r["median_ms"] > 0 and r["total_ms"] >= r["median_ms"] and r["peak_extra_bytes"] is None
        if r["method"] == "faedkv-dimsplit":
            # every row kept virtually; the floor writes the rows' worth of numbers it stores
            assert r["cache_len"] == r["tokens"]
            assert budget - 4 <= r["stored_rows"] <= budget and r["stored_rows"] < r["cache_len"]
        else:
            assert r["cache_len"] == r["stored_rows"] == budget
        moved = 2 * per_row * (r["tokens"] + r["stored_rows"])               # read K,V + write kept
        assert r["floor_ms"] == pytest.approx(1e3 * moved / bandwidth)
        assert r["vs_floor"] == pytest.approx(r["median_ms"] / r["floor_ms"])
        assert r["fused_used"] is (False if r["method"].startswith("faedkv") else None)   # no CUDA here
    for tokens in (300, 400):
        mine = {r["method"]: r for r in rows if r["tokens"] == tokens}
        assert mine["snapkv"]["vs_snapkv"] == 1.0
        assert mine["faedkv"]["vs_snapkv"] == pytest.approx(mine["faedkv"]["median_ms"] / mine["snapkv"]["median_ms"])
    # the model is left as it was: no slot bias noted on its attention modules
    from faedkv.attention import BIAS_ATTR

    assert not any(hasattr(layer.self_attn, BIAS_ATTR) for layer in loaded.model.model.layers)


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-qwen2"])
def test_captured_inputs_let_snapkv_compress_as_kvpress_hook_does(name):
    """What the pre-hook captured is what kvpress's forward hook hands compress: SnapKV keeps
    kvpress's budget and the very rows it keeps inside a prefill under the press."""
    from kvpress import SnapKVPress
    from kvpress.utils import compute_n_kept
    from transformers import DynamicCache

    loaded = tiny(name)
    model, tokens = loaded.model, 300
    ids = essay_ids(loaded, tokens)
    captured = rc.capture_prefill(model, ids)
    press = SnapKVPress(compression_ratio=0.75, window_size=64)
    reference = DynamicCache()
    with torch.inference_mode(), press(model):
        model.model(input_ids=ids, past_key_values=reference)
    for i, layer in enumerate(model.model.layers):
        hidden = captured.hidden_states(i, "cpu")
        kwargs = captured.call_kwargs(i, hidden)
        assert hidden.shape == (1, tokens, model.config.hidden_size)
        assert {"position_embeddings", "cache_position", "position_ids"} <= set(kwargs)
        assert "attention_mask" not in kwargs and kwargs["hidden_states"] is hidden
        keys, values = captured.keys[i], captured.values[i]
        assert keys.shape == (1, model.config.num_key_value_heads, tokens, loaded.info.head_dim)
        with torch.inference_mode():
            out_keys, out_values = press.compress(layer.self_attn, hidden, keys, values, None, kwargs)
        assert out_keys.shape[2] == out_values.shape[2] == compute_n_kept(tokens, 0.75)
        torch.testing.assert_close(out_keys, reference.layers[i].keys, rtol=0, atol=0)
        torch.testing.assert_close(out_values, reference.layers[i].values, rtol=0, atol=0)


def test_hidden_states_kept_on_the_host_are_the_same():
    loaded = tiny("tiny-random-qwen2")
    ids = essay_ids(loaded, 200)
    on_device, on_host = (rc.capture_prefill(loaded.model, ids, host) for host in (False, True))
    assert on_host.host and not on_device.host
    for i in range(loaded.model.config.num_hidden_layers):
        torch.testing.assert_close(on_host.hidden_states(i, "cpu"), on_device.hidden_states(i, "cpu"), rtol=0, atol=0)
    rows = rc.real_compress_rows(loaded, [200], 1e9, methods=("faedkv", "snapkv"), repeats=1, host=True,
                                 progress=False)
    assert [r["method"] for r in rows] == ["faedkv", "snapkv"] and all(r["hidden_on_host"] for r in rows)


def test_lengths_the_model_cannot_take_are_refused(tmp_path):
    loaded = tiny("tiny-random-llama")      # max_position_embeddings 8192
    with pytest.raises(ValueError, match=r"--real-lengths 9000 above tiny-random-llama's 8192 positions "
                                         r"\(max_position_embeddings\)"):
        rc.real_compress_rows(loaded, [4096, 9000], 1e9, progress=False)
    with pytest.raises(ValueError, match="too short: SnapKV scores with the last 64 queries"):
        rc.real_compress_rows(loaded, [100], 1e9, progress=False)
    with pytest.raises(SystemExit, match="--real-lengths 9000 above tiny-random-llama's 8192 positions"):
        bench_main(["gpu", "--parts", "real-compress", "--model", "tiny-random-llama", "--real-lengths",
                    "300", "9000", "--out", str(tmp_path), "--fragment", ""])
    assert not (tmp_path / "gpu-bench.json").exists()      # refused before anything ran


def test_the_cli_part_runs_on_the_cpu_alone_and_renders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)     # the default fragment (the H200's) must not be written by a CPU run
    out = tmp_path / "out"
    assert bench_main(["gpu", "--parts", "real-compress", "--model", "tiny-random-qwen2", "--real-lengths",
                       "300", "--real-repeats", "1", "--out", str(out)]) == 0
    assert not (tmp_path / "benchmarks").exists()
    result = json.loads((out / "gpu-bench.json").read_text())
    assert [r["method"] for r in result["real_compress"]] == list(rc.REAL_METHODS)
    assert result["compress"] == [] and result["decode"] == []
    model = result["real_compress_model"]
    assert model["name"] == "tiny-random-qwen2" and model["device"] == "cpu" and model["layers"] == 3
    text = (out / "gpu-bench.md").read_text()
    assert text.startswith("### CPU: real-compress on tiny-random-qwen2's cache")
    assert "Machine: " in text and "**tiny-random-qwen2**'s real cache" in text
    assert text.count("\n| 300 |") == len(rc.REAL_METHODS) and "(perf_counter)" in text
    fragment = tmp_path / "frag.md"
    assert bench_main(["gpu-render", str(out / "gpu-bench.json"), "--fragment", str(fragment)]) == 0
    assert fragment.read_text() == text
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="only --parts real-compress also runs on the CPU"):
            bench_main(["gpu", "--parts", "compress", "real-compress", "--out", str(out)])


def test_a_stored_cuda_run_renders_its_table(tmp_path):
    model = {"name": "Qwen2.5-Coder-1.5B", "layers": 28, "kv_heads": 2, "heads": 12, "head_dim": 128,
             "dtype": "bfloat16", "device": "cuda", "max_positions": 32768}
    common = {"ratio": 0.75, "repeats": 3, "layers": 28, "budget_rows": 8192, "hidden_on_host": False}
    rows = [{**common, "tokens": 32768, "method": "faedkv", "cache_len": 8192, "stored_rows": 8192,
             "median_ms": 0.05, "total_ms": 1.4, "floor_ms": 0.025, "vs_floor": 2.0, "vs_snapkv": 0.5,
             "peak_extra_bytes": 4 * 2**20, "fused_used": True},
            {**common, "tokens": 32768, "method": "faedkv-dimsplit", "cache_len": 32768, "stored_rows": 8190.5,
             "median_ms": 0.5, "total_ms": 14.0, "floor_ms": 0.025, "vs_floor": 20.0, "vs_snapkv": 5.0,
             "peak_extra_bytes": 40 * 2**20, "fused_used": False},
            {**common, "tokens": 32768, "method": "snapkv", "cache_len": 8192, "stored_rows": 8192,
             "median_ms": 0.1, "total_ms": 2.8, "floor_ms": 0.025, "vs_floor": 4.0, "vs_snapkv": 1.0,
             "peak_extra_bytes": 8 * 2**20, "fused_used": None}]
    result = {"date": "2026-12-04", "machine": "test box, GPU NVIDIA H200", "argv": "--parts real-compress",
              "bandwidth": 4.2e12, "layers": 8, "compress": [], "decode": [], "parts": ["real-compress"],
              "real_compress": rows, "real_compress_model": model, "real_compress_flush_l2": True}
    path = tmp_path / "gpu-bench.json"
    path.write_text(json.dumps(result))
    fragment = tmp_path / "gpu.md"
    assert bench_main(["gpu-render", str(path), "--fragment", str(fragment)]) == 0
    text = fragment.read_text()
    assert text.startswith("### GPU: real-compress on Qwen2.5-Coder-1.5B's cache (2026-12-04)")
    assert "4.20 TB/s" in text and "L2 cache flushed before each" in text and "ms for 28 layers" in text
    assert "| 32768 | faedkv | 8192 | 8192 | 0.050 | 1.40 | 0.0250 | 2.00 | 0.50 | 4.0 | yes |" in text
    assert "| 32768 | faedkv-dimsplit | 32768 | 8190.5 | 0.500 | 14.00 | 0.0250 | 20.00 | 5.00 | 40.0 | no |" in text
    assert "| 32768 | snapkv | 8192 | 8192 | 0.100 | 2.80 | 0.0250 | 4.00 | 1.00 | 8.0 | - |" in text
    assert "32768: 2.00x floor, 0.50x SnapKV; at most SnapKV's time at every length measured: yes" in text
