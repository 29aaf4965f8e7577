"""`python -m analysis`: method-spec parsing, a tiny grid end to end, one-line errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.api.params import MethodSpec
from analysis.cli import parse_methods

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "analysis", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_method_specs_from_the_command_line(tmp_path):
    specs = parse_methods("full,snapkv,faedkv:variant=resample,faedkv:variant=iwdft:key_space=pre_rope",
                          [0.5, 0.75])
    assert specs[0] == MethodSpec(name="full")
    assert specs[1:3] == [MethodSpec(name="snapkv", compression_ratio=r) for r in (0.5, 0.75)]
    assert MethodSpec(name="faedkv", compression_ratio=0.75,
                      params={"variant": "iwdft", "key_space": "pre_rope"}) in specs
    assert len(specs) == 7
    plan = tmp_path / "plan.json"
    plan.write_text('{"name": "lp", "chunks": 4, "layers": [[0]]}')   # a plan must have layers
    s = parse_methods(f"faedkv:sink_tokens=8:mass_correction=true:plan=@{plan}:ratio=0.9", [0.5])
    assert s == [MethodSpec(name="faedkv", compression_ratio=0.9,
                            params={"sink_tokens": 8, "mass_correction": True,
                                    "plan": {"name": "lp", "chunks": 4, "layers": [[0]]}})]
    with pytest.raises(ValueError, match="key=value"):
        parse_methods("snapkv:window", [0.5])


def test_faedkv_default_expands_to_the_press_defaults_and_takes_overrides():
    """`faedkv-default` is FAEDKVPress()'s configuration, stored as `faedkv` with explicit params (so a
    stored run keeps its meaning when the default moves); later pairs override it."""
    import dataclasses

    from analysis.api.params import FAEDKV_DEFAULT
    from analysis.harness import methods
    from faedkv import FAEDKVPress

    plain, wider = parse_methods("faedkv-default,faedkv-default:window_share=0.25:ratio=0.75", [0.5])
    assert plain == MethodSpec(name="faedkv", compression_ratio=0.5, params=FAEDKV_DEFAULT)
    assert wider.params == {**FAEDKV_DEFAULT, "window_share": 0.25} and wider.compression_ratio == 0.75
    from analysis.harness.models import load_model

    built = methods.build_press(plain, load_model("tiny-random-llama").model)
    default = FAEDKVPress(compression_ratio=0.5)
    assert {f.name: getattr(built, f.name) for f in dataclasses.fields(FAEDKVPress)} == {
        f.name: getattr(default, f.name) for f in dataclasses.fields(FAEDKVPress)}


def test_needle_grid_end_to_end_then_store_list(tmp_path):
    out = tmp_path / "res"
    r = _run("needle", "--model", "tiny-random-llama", "--methods", "knorm", "--ratios", "0.5",
             "--lengths", "160", "--depths", "50", "--samples", "1", "--max-new-tokens", "2",
             "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "| full |" in r.stdout and "| knorm@0.5 |" in r.stdout
    runs = list((out / "runs").iterdir())
    assert len(runs) == 1
    assert {"predictions.csv", "metrics.json", "config.yaml"} <= {p.name for p in runs[0].iterdir()}
    listed = _run("store", "list", "--out", str(out))
    assert listed.returncode == 0 and runs[0].name in listed.stdout


@pytest.mark.parametrize("args, needle", [
    (["needle", "--lengths", "abc"], "comma-separated list of integers"),
    (["needle", "--methods", "nonsense", "--out", "/tmp/x"], "unknown method 'nonsense'"),
    (["needle", "--ratios", "1.5"], "compression_ratio"),
    (["needle", "--model", "/no/such/model/folder", "--methods", "full"], "does not exist"),
    (["bogus"], "invalid choice"),
])
def test_errors_are_one_line_and_exit_2(args, needle, tmp_path):
    r = _run(*args)
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
