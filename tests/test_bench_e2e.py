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
    with pytest.raises(SystemExit, match="window of kvzip-split-cache must be a whole number"):
        main(["e2e", "--model", "tiny-random-llama", "--rows", "kvzip-split-cache:window=big"])
    for bad in ("1", "-0.1", "nan", "half"):
        with pytest.raises(SystemExit, match=r"window_share of kvzip-split-cache must be a number in \[0, 1\)"):
            main(["e2e", "--model", "tiny-random-llama", "--rows", f"kvzip-split-cache:window_share={bad}"])
    with pytest.raises(SystemExit, match="kvzip-split-cache takes window and window_share.*'sink=8'"):
        main(["e2e", "--model", "tiny-random-llama", "--rows", "kvzip-split-cache:sink=8"])
    with pytest.raises(SystemExit, match="at least 2"):
        main(["e2e", "--model", "tiny-random-llama", "--new-tokens", "1"])


def test_kvzip_split_rows_read_their_options():
    from analysis.bench.e2e import kvzip_split_options

    assert kvzip_split_options("kvzip-split-cache") == {}
    assert kvzip_split_options("kvzip-split-cache:window=512") == {"window": 512}
    assert kvzip_split_options("kvzip-split-cache:window=0:window_share=0.5") == {"window": 0, "window_share": 0.5}
    assert kvzip_split_options("dimsplit-cache") is None and kvzip_split_options("kvzip-split-cachex") is None


@pytest.mark.parametrize("row", ["dimsplit-cache", "kvzip-split-cache", "kvzip-split-cache:window=32",
                                 "kvzip-split-cache:window_share=0.5"])
def test_the_dimsplit_cache_rows_generate_and_are_reported(row, monkeypatch):
    from analysis.bench import e2e
    from analysis.harness.models import load_model
    from faedkv import DimsplitCache

    loaded = load_model("tiny-random-llama", device="cpu", dtype="float32")
    built = []
    store = e2e.kvzip_split_cache
    monkeypatch.setattr(e2e, "kvzip_split_cache",
                        lambda *args, **options: built.append(store(*args, **options)) or built[-1])
    (result,) = e2e.e2e_rows(loaded, [300], new_tokens=3, ratio=0.5, repeats=1, rows=[row])
    assert result["row"] == row and result["ratio"] == 0.5
    assert result["ms_per_token"] > 0 and result["ttft_s"] > 0
    text = e2e.e2e_markdown([result], "test machine", "cmd", loaded.info.name)
    assert f"| 300 | {row} | 0.5 |" in text and f"{row.split(':')[0]} = " in text
    if row.startswith("kvzip-split-cache"):   # the warm-up and the timed call each scored and stored their prompt
        assert len(built) == 2 and all(isinstance(c, DimsplitCache) and c.exact_masks is not None for c in built)
        assert built[-1].window == (32 if row.endswith("=32") else 64)
        # the store holds the prompt but its last token: 299 tokens at 0.5 keep 149 rows, half of them 74
        window = 74 if "window_share" in row else built[-1].window
        assert [layer.window for layer in built[-1].layers] == [window] * len(built[-1].layers)
        assert built[-1].get_seq_length() == 300 + 3 - 1     # the prompt, then 2 decoded tokens fed back
        assert sum(int(m.sum()) for m in built[-1].exact_masks) > 0
    else:
        assert not built


class FakeEvent:
    """A kineto event as kernel_split reads it; `kind` None: a torch without `activity_type`."""

    def __init__(self, name, device, start, duration=0, annotation=False, kind="kernel"):
        from torch.autograd import DeviceType

        self._name, self._start, self._duration, self._annotation = name, start, duration, annotation
        self._device = DeviceType.CUDA if device == "cuda" else DeviceType.CPU
        if kind is not None:
            self.activity_type = lambda: kind

    def name(self):
        return self._name

    def device_type(self):
        return self._device

    def start_ns(self):
        return self._start

    def duration_ns(self):
        return self._duration

    def is_user_annotation(self):
        return self._annotation


def marks(*times):
    from analysis.bench.e2e import MARK

    return [FakeEvent(MARK, "cpu", t, annotation=True, kind="user_annotation") for t in times]


def test_kernel_split_sums_device_ops_by_the_token_marks_they_follow():
    from analysis.bench.e2e import kernel_split

    events = marks(100, 2000, 3000, 4000) + [              # the prompt, then 3 new tokens
        FakeEvent("gemm", "cuda", 50, 10),                 # before the first token: its time
        FakeEvent("Memcpy HtoD", "cuda", 1500, 20, kind="gpu_memcpy"),
        FakeEvent("attn", "cuda", 2100, 5),                # decode: between the first and last token
        FakeEvent("Memset", "cuda", 3100, 7, kind="gpu_memset"),
        FakeEvent("old torch", "cuda", 3200, 11, kind=None),   # no activity_type: counted
        FakeEvent("after the last token", "cuda", 4100, 1000),
        FakeEvent("## Call CompiledFxGraph ##", "cuda", 2100, 500, annotation=True, kind="gpu_user_annotation"),
        FakeEvent("range", "cuda", 2100, 300, kind="gpu_user_Annotation"),   # kineto's spelling
        FakeEvent("aten::mm", "cpu", 2050, 400, kind="cpu_op"),
    ]
    split = kernel_split(events, new_tokens=3)
    assert split["first_token_kernel_s"] == pytest.approx(30e-9)
    assert split["kernel_ms_per_token"] == pytest.approx((5 + 7 + 11) / 1e6 / 2)   # N - 1 intervals
    assert split["device_ops_per_token"] == 1.5


def test_kernel_split_without_device_ops_reports_none_and_checks_the_marks():
    from analysis.bench.e2e import kernel_split

    cpu_only = marks(1, 2, 3) + [FakeEvent("aten::mm", "cpu", 2, 1, kind="cpu_op")]
    assert kernel_split(cpu_only, new_tokens=2) == dict.fromkeys(
        ("first_token_kernel_s", "kernel_ms_per_token", "device_ops_per_token"))
    prefill_only = marks(1, 2, 3) + [FakeEvent("gemm", "cuda", 1, 4)]
    assert kernel_split(prefill_only, new_tokens=2) == {
        "first_token_kernel_s": 4e-9, "kernel_ms_per_token": None, "device_ops_per_token": None}
    with pytest.raises(RuntimeError, match="2 token marks, expected 4"):
        kernel_split(marks(1, 2), new_tokens=3)


def test_profile_adds_the_device_columns_and_runs_on_cpu(tmp_path):
    from analysis.bench.__main__ import main

    fragment = tmp_path / "e2e.md"
    assert main(["e2e", "--model", "tiny-random-llama", "--device", "cpu", "--lengths", "300", "--new-tokens", "3",
                 "--repeats", "1", "--rows", "full", "faedkv-cache", "full-static", "faedkv-cache-static", "--profile",
                 "--fragment", str(fragment)]) == 0
    text = fragment.read_text()
    assert ("| GPU s to first token (kernels) | GPU ms / token (kernels) | device ops / token | host-bound share |"
            in text)
    # CPU: the profiled call runs, no device ops
    for row in ("full", "faedkv-cache", "full-static", "faedkv-cache-static"):
        assert any(line.startswith(f"| 300 | {row} |") and line.endswith("| - | - | - | - |")
                   for line in text.splitlines())
    assert "Profile (`--profile`)" in text and "full-static = transformers' StaticCache" in text


def test_the_profiled_rows_carry_the_device_times():
    from analysis.bench.e2e import e2e_rows
    from analysis.harness.models import load_model

    loaded = load_model("tiny-random-llama", device="cpu", dtype="float32")
    (row,) = e2e_rows(loaded, [300], new_tokens=3, ratio=0.75, repeats=1, rows=["snapkv"], profile=True)
    assert row["ms_per_token"] > 0
    assert {k: row[k] for k in ("first_token_kernel_s", "kernel_ms_per_token", "device_ops_per_token",
                                "host_bound")} == dict.fromkeys(("first_token_kernel_s", "kernel_ms_per_token",
                                                                 "device_ops_per_token", "host_bound"))


def test_the_full_static_row_runs_on_cpu_uncompiled_and_is_reported():
    from analysis.bench.e2e import e2e_markdown, e2e_rows
    from analysis.harness.models import load_model

    loaded = load_model("tiny-random-llama", device="cpu", dtype="float32")
    (row,) = e2e_rows(loaded, [300], new_tokens=3, ratio=0.75, repeats=1, rows=["full-static"])
    assert row["row"] == "full-static" and row["ratio"] == 0.0 and row["ms_per_token"] > 0
    assert row["compiled"] is False and row["warmup_s"] > 0    # transformers compiles only on CUDA/XPU
    assert not hasattr(loaded.model, "_cache")                 # the row released its static cache
    text = e2e_markdown([row], "test machine", "cmd", loaded.info.name)
    assert "| 300 | full-static | 0 |" in text and "run eagerly: transformers compiles" in text
    assert "DimsplitCache cannot run under transformers' compiled static-cache path" in text


def test_the_faedkv_cache_static_row_runs_on_cpu_uncompiled_with_one_cache_and_is_reported(monkeypatch):
    """StaticFAEDKVCache through generate's compiled path (CompileConfig's defaults, as full-static;
    transformers compiles only on CUDA/XPU, so eagerly here): one cache for the warm-up, the timed
    calls and the profiled one, released with the row."""
    from transformers import CompileConfig

    from analysis.bench import e2e
    from analysis.harness.models import load_model
    from faedkv import StaticFAEDKVCache

    kwargs = e2e.row_generate_kwargs("faedkv-cache-static", 0.75)
    cache = kwargs["past_key_values"]
    assert isinstance(cache, StaticFAEDKVCache) and cache.compression_ratio == 0.75
    assert kwargs["compile_config"] == CompileConfig() and "cache_implementation" not in kwargs
    made = []
    row_cache = e2e.row_cache
    monkeypatch.setattr(e2e, "row_cache", lambda row, ratio: made.append(row) or row_cache(row, ratio))
    loaded = load_model("tiny-random-llama", device="cpu", dtype="float32")
    (row,) = e2e.e2e_rows(loaded, [300], new_tokens=3, ratio=0.75, repeats=2, rows=["faedkv-cache-static"],
                          profile=True)
    assert made == ["faedkv-cache-static"]                    # one cache for all the row's calls
    assert row["row"] == "faedkv-cache-static" and row["ratio"] == 0.75 and row["ms_per_token"] > 0
    assert row["compiled"] is False and row["warmup_s"] > 0 and row["kernel_ms_per_token"] is None
    assert not hasattr(loaded.model, "_compiled_call")
    text = e2e.e2e_markdown([row], "test machine", "cmd", loaded.info.name)
    assert "| 300 | faedkv-cache-static | 0.75 |" in text and "faedkv-cache-static = StaticFAEDKVCache" in text
    assert "run eagerly: transformers compiles" in text and "full-static =" not in text


@pytest.mark.parametrize("model", ["tiny-random-llama", "tiny-random-qwen2"])
def test_full_static_generates_the_full_rows_tokens_through_the_compiled_path(model):
    """The row's generate kwargs are transformers' static cache and compiled decode step; compiled
    (dynamo only, on CPU) with fullgraph=True, the forward traces as one graph with faedkv's and
    kvpress's sdpa wrappers installed and FAEDKVCache handoffs posted, and decodes the full
    cache's greedy tokens."""
    import torch
    from transformers import CompileConfig

    from analysis.bench.e2e import row_cache, row_generate_kwargs
    from analysis.harness.haystack import text_tokens
    from analysis.harness.models import load_model
    from faedkv.attention import restore_sdpa

    kwargs = row_generate_kwargs("full-static", 0.75)
    assert kwargs["cache_implementation"] == "static" and "past_key_values" not in kwargs
    assert kwargs["compile_config"] == CompileConfig() and kwargs["compile_config"].mode == "reduce-overhead"

    loaded = load_model(model, device="cpu", dtype="float32")
    ids = torch.tensor([text_tokens(loaded.tokenizer, 300)])

    def generate(**extra):
        with torch.inference_mode():
            return loaded.model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                         pad_token_id=loaded.tokenizer.eos_token_id, **extra)

    full = generate(past_key_values=row_cache("full", 0.75))
    generate(past_key_values=row_cache("faedkv-cache", 0.75))     # posts handoffs, switches the attention
    restore_sdpa(loaded.model.config)
    traced = CompileConfig(backend="eager", fullgraph=True, mode=None)
    traced._compile_all_devices = True                             # transformers' switch for compiling off CUDA
    try:
        static = generate(cache_implementation="static", compile_config=traced)
        assert loaded.model._compiled_call is not None             # generate took the compiled path
    finally:
        torch.compiler.reset()
    assert torch.equal(static, full)


def test_static_rows_other_than_the_static_caches_are_refused():
    from analysis.bench.__main__ import main

    with pytest.raises(SystemExit, match="row 'dimsplit-cache-static': DimsplitCache cannot run under transformers' "
                                         "compiled static-cache path: its exact rows grow.*Python-side state.*"
                                         "is_compileable.*only full-static and faedkv-cache-static are timed"):
        main(["e2e", "--model", "tiny-random-llama", "--rows", "dimsplit-cache-static"])
    with pytest.raises(SystemExit, match="row 'snapkv-static': only full-static and faedkv-cache-static run "
                                         "through transformers' static-cache path"):
        main(["e2e", "--model", "tiny-random-llama", "--rows", "snapkv-static"])


def test_a_compiled_profiled_static_row_is_rendered_as_a_cuda_run_would_be():
    """The table and notes of what a CUDA run records (compiled static row, device times)."""
    from analysis.bench.e2e import e2e_markdown

    timed = {"tokens": 16384, "ratio": 0.0, "ttft_s": 0.141, "total_s": 9.9, "peak_gb": 1.56}
    rows = [{**timed, "row": "full", "ms_per_token": 38.2, "first_token_kernel_s": 0.1234,
             "kernel_ms_per_token": 1.91, "device_ops_per_token": 620.0, "host_bound": 1 - 1.91 / 38.2},
            {**timed, "row": "full-static", "ms_per_token": 2.5, "first_token_kernel_s": 0.125,
             "kernel_ms_per_token": 2.4, "device_ops_per_token": 301.0, "host_bound": 1 - 2.4 / 2.5,
             "warmup_s": 71.25, "compiled": True},
            {**timed, "row": "faedkv-cache-static", "ratio": 0.75, "ms_per_token": 2.0, "first_token_kernel_s": 0.13,
             "kernel_ms_per_token": 1.8, "device_ops_per_token": 290.0, "host_bound": 1 - 1.8 / 2.0,
             "warmup_s": 40.5, "compiled": True}]
    text = e2e_markdown(rows, "H200", "cmd", "m")
    assert "| 16384 | full | 0 | 0.141 | 38.2 | 1.56 | 0.123 | 1.91 | 620 | 95% |" in text
    assert "| 16384 | full-static | 0 | 0.141 | 2.5 | 1.56 | 0.125 | 2.40 | 301 | 4% |" in text
    assert "| 16384 | faedkv-cache-static | 0.75 | 0.141 | 2.0 | 1.56 | 0.130 | 1.80 | 290 | 10% |" in text
    assert "Compile time is excluded" in text
    assert "took 71.25 s at 16384 tokens (full-static), 40.50 s at 16384 tokens (faedkv-cache-static)" in text
    assert "full-static = transformers' StaticCache" in text and "faedkv-cache-static = StaticFAEDKVCache" in text
    assert "run eagerly" not in text and "GPU ms / token = those that start between" in text


def test_compile_cpu_sets_transformers_switch_and_the_note_says_so():
    """--compile-cpu: the static rows' CompileConfig compiles on every device (transformers' own
    switch); the note then says the step was compiled on the CPU, without CUDA graphs."""
    from analysis.bench.e2e import e2e_markdown, row_generate_kwargs

    for row in ("full-static", "faedkv-cache-static"):
        assert row_generate_kwargs(row, 0.75, compile_cpu=True)["compile_config"]._compile_all_devices is True
        assert not getattr(row_generate_kwargs(row, 0.75)["compile_config"], "_compile_all_devices", False)
    row = {"tokens": 2048, "row": "faedkv-cache-static", "ratio": 0.75, "ttft_s": 0.5, "ms_per_token": 12.0,
           "total_s": 1.0, "peak_gb": None, "warmup_s": 40.0, "compiled": True}
    text = e2e_markdown([row], "test machine", "cmd", "m", cpu=True)
    assert "compiled by transformers on the CPU (`--compile-cpu`" in text and "CUDA graphs;" not in text
    assert "40.00 s at 2048 tokens (faedkv-cache-static)" in text
