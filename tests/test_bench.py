"""Benchmark scripts: rows are well-formed, fragments assemble into BENCHMARKS.md in order."""
import json

from analysis.bench import compress as bench
from analysis.bench import gpu as bench_gpu
from analysis.bench.__main__ import main as bench_main


def test_compress_benchmark_rows_on_cpu():
    rows = bench.compress_benchmark(lengths=(1024,), layers=1, methods=("iwdft", "iwdft-torch", "snapkv"),
                                    progress=False)
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"iwdft", "iwdft-torch", "snapkv"}
    assert all(r["cache_len"] == 256 and r["median_ms"] > 0 for r in rows)   # ratio 0.75 of 1024
    assert by_method["snapkv"]["vs_snapkv"] == 1.0
    table = bench.compress_table(rows, "cpu", 1, 1)
    assert table.count("\n| 1024 |") == 3 and "Machine:" in table


def test_report_assembles_fragments_in_order(tmp_path):
    frags = tmp_path / "benchmarks"
    frags.mkdir()
    (frags / "zzz-extra.md").write_text("### extra\n")
    (frags / "compress-cpu.md").write_text("### cpu\n")
    (frags / "gpu-h200.md").write_text("### gpu\n")
    out = tmp_path / "BENCHMARKS.md"
    assert bench_main(["report", "--fragments", str(frags), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks")
    assert text.index("### gpu") < text.index("### cpu") < text.index("### extra")


def test_gpu_render_shows_each_stored_part(tmp_path):
    result = {"date": "2026-11-28", "machine": "test box", "argv": "--parts compress decode",
              "bandwidth": 4.2e12, "layers": 8,
              "compress": [{"tokens": 32768, "method": "iwdft", "cache_len": 8192, "median_ms": 0.08,
                            "vs_snapkv": 0.04, "floor_ms": 0.04, "vs_floor": 2.0},
                           {"tokens": 131072, "method": "iwdft", "cache_len": 32768, "median_ms": 0.5,
                            "vs_snapkv": 0.1, "floor_ms": 0.16, "vs_floor": 3.125, "host_ms": 0.45, "kernel_ms": 0.24,
                            "host_functions": [("press.py:305(compress_at)", 0.21), ("fused.py:68(fold_into)", 0.05)]}],
              "fused_check": [{"tokens": 32768, "fused_used": True, "max_rel_diff": 0.0}],
              "decode": [{"tokens": 32768, "cache": "faedkv", "ms_per_token": 30.0, "speed_vs_full": 2.0,
                          "kv_bytes": 1.07e9, "kv_vs_full": 0.25, "peak_over_weights": 1.1e9,
                          "update_share": 0.187, "steps": 20},
                         {"tokens": 32768, "cache": "faedkv-attn-plan", "ms_per_token": 20.0, "speed_vs_full": 3.0,
                          "kv_bytes": 1.07e9, "kv_vs_full": 0.25, "peak_over_weights": 1.1e9,
                          "update_share": 0.04, "steps": 20, "update_gpu_share": 0.01, "step_gpu_ms": 8.0,
                          "update_gpu_ms": 0.08, "slot_attention_gpu_ms": 0.0, "band_limit_gpu_ms": 0.4}]}
    path = tmp_path / "gpu-bench.json"
    path.write_text(json.dumps(result))
    fragment = tmp_path / "gpu.md"
    assert bench_main(["gpu-render", str(path), "--fragment", str(fragment)]) == 0
    text = fragment.read_text()
    assert "| 32768 | iwdft | 8192 | 0.080 | 2.56 | 0.040 | 2.00 | 0.04 | - | - | - |" in text
    # host-bound calls show: host time, GPU-busy time and its ratio to the floor (0.24 / 0.16)
    assert "| 131072 | iwdft | 32768 | 0.500 | 16.00 | 0.160 | 3.12 | 0.10 | 0.450 | 0.240 | 1.50 |" in text
    assert "| 32768 | faedkv | 30.00 | 2.00 | 1.07 | 0.250 | 1.10 | 18.7% |" in text
    assert "fused kernel used: True" in text
    assert "- 131072 iwdft: `press.py:305(compress_at)` 0.210 ms; `fused.py:68(fold_into)` 0.050 ms" in text
    assert "- 32768 iwdft:" not in text          # a row without a host profile lists nothing
    assert "| 32768 | faedkv-attn-plan | 20.00 | 3.00 | 1.07 | 0.250 | 1.10 | 4.0% | 8.00 | 1.0% |" in text
    assert "faedkv-attn-plan at 32768: band-limiting" in text and "takes 0.40 of the step's 8.00 GPU ms (5.0%)" in text
    assert bench_gpu.tables({**result, "decode": []}).count("| context |") == 0


def test_slot_attention_agreement_runs_and_agrees_on_cpu():
    """The GPU bench's agreement check (slot-scaled attention against sdpa over the materialised
    slots with the same log-count bias) at Llama-3-8B's head layout, in float32 on CPU under
    Triton's interpreter: it must
    run (a 1-D bias once crashed it on the H200) and agree, with and without a plan."""
    import torch

    from faedkv import FrequencyPlan

    plain = bench_gpu.slot_attention_agreement(300, 0.75, steps=3, device="cpu", dtype=torch.float32,
                                               fused=True)
    planned = bench_gpu.slot_attention_agreement(300, 0.75, steps=3, device="cpu", dtype=torch.float32,
                                                 fused=True, plan=FrequencyPlan.low_pass(0.5, 1))
    assert plain["slot_attention_used"] and planned["slot_attention_used_plan"]
    assert plain["max_rel_diff_slot_attention"] < 1e-4
    assert planned["max_rel_diff_slot_attention_plan"] < 1e-4


def test_host_functions_name_where_a_calls_host_time_goes():
    """host_functions profiles real calls with cProfile: the function that burns the host's time
    comes first, with its own time per call (here a deliberate busy loop inside the call)."""
    import time

    import torch

    seen = []

    def burn_host(steps):
        total = 0
        for step in range(steps):      # pure Python: the loop's time is this function's own
            total += step
        return total

    def call(module, hidden, keys, values, attentions, kwargs):
        seen.append(1)
        burn_host(200_000)
        return keys

    keys = torch.zeros(1, 2, 8, 4)
    start = time.perf_counter()
    top = bench.host_functions(call, None, None, keys, keys, {}, calls=3, most=2)
    spent_ms = (time.perf_counter() - start) * 1000 / 3
    assert len(seen) == 3 and len(top) == 2
    assert "burn_host" in top[0][0] and 0 < top[0][1] <= spent_ms and top[0][1] > top[1][1]


def test_kernel_ms_reads_a_real_profile_and_counts_no_device_time_on_cpu():
    """kernel_ms runs the torch profiler for real and filters its events with is_device_op: on a
    CPU every event is a host one, so the GPU-busy time is exactly 0 and the call ran `calls` times
    (the H200 run of round 7 failed here: FunctionEvents were handed to a kineto-event filter)."""
    import torch

    seen = []

    def call(module, hidden, keys, values, attentions, kwargs):
        seen.append(keys.shape)
        return keys.float().exp().sum()

    keys = torch.zeros(1, 2, 8, 4)
    assert bench.kernel_ms(call, None, None, keys, keys, {}, calls=2) == 0.0
    assert seen == [keys.shape, keys.shape]
