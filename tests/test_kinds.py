"""Job kinds are declared once (`analysis.tasks.kinds()`): the declarations are torch-free, each
names a run function that exists, and a new kind's declaration alone reaches the job queue, the
server's checks and the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from pydantic import Field

from analysis.api.params import Int, Strict
from analysis.results.store import ResultsStore
from analysis.service import jobs, server
from analysis.tasks import JobKind, kinds

REPO = Path(__file__).resolve().parent.parent
KINDS = ["ablate", "contrib", "generate", "needle", "ppl", "spectra", "suite"]


def test_the_declarations_import_without_torch():
    code = ("import sys, analysis.tasks as t; "
            "print(sorted(t.kinds()), 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == f"{KINDS} False False"


def test_every_kind_runs_and_only_generate_is_interactive():
    assert sorted(kinds()) == KINDS
    assert jobs.availability() == {kind: None for kind in kinds()}
    assert [k for k, d in kinds().items() if d.interactive] == ["generate"]
    assert sorted(k for k, d in kinds().items() if d.interleave) == [
        "ablate", "contrib", "needle", "ppl", "suite"]
    assert all(kind.name == name for name, kind in kinds().items())


# ------------------------------------------------------------ a kind added by one declaration


class EchoParams(Strict):
    cells: Int = Field(2, ge=1, le=10)

    def num_cells(self) -> int:
        return self.cells


def run_echo(model, store, params, progress=None, should_stop=None, executor="local",
             ray_address=None) -> str:
    run = store.open_run("echo", {"params": params.key_dict()})
    for done in range(params.cells + 1):
        if progress is not None:
            progress(done, params.cells)
    run.write_metrics({"cells": params.cells})
    return run.key


def _echo_cli(args) -> int:
    key = run_echo(None, ResultsStore(args.out), EchoParams(cells=args.cells))
    print(f"echo run {key}")
    return 0


def add_echo_cli(subparsers) -> None:
    p = subparsers.add_parser("echo", help="a test kind")
    p.add_argument("--cells", type=int, default=2)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_echo_cli)


ECHO = JobKind(name="echo", params=EchoParams, run="tests.test_kinds:run_echo",
               context=lambda p, tokenizer: (64, "64 tokens"), cli=add_echo_cli,
               interleave=True)


@pytest.fixture
def echo_kind(monkeypatch):
    monkeypatch.setitem(kinds(), "echo", ECHO)


def test_a_declared_kind_is_queued_checked_and_on_the_command_line(echo_kind, tmp_path, capsys):
    from analysis.__main__ import main

    queue = jobs.JobQueue(None, tmp_path / "served")
    queue.start()
    try:
        job = queue.wait(queue.submit("echo", EchoParams(cells=3))["id"], timeout=60)
    finally:
        queue.stop()
    assert job["status"] == "done" and job["progress"] == {"done": 3, "total": 3}
    assert ResultsStore(tmp_path / "served").get(job["run_key"]).metrics() == {"cells": 3}

    info = types.SimpleNamespace(name="tiny", context_length=128, num_layers=2)
    params = server.parse_params("echo", {"cells": 4})
    server.check_bounds("echo", params, info, tokenizer=None, max_cells=4)
    with pytest.raises(ValueError, match="4 cells, more than this server's limit of 3"):
        server.check_bounds("echo", params, info, tokenizer=None, max_cells=3)
    with pytest.raises(ValueError, match="64 tokens = 64 tokens exceeds the model context"):
        server.check_bounds("echo", params, types.SimpleNamespace(**{**vars(info),
                                                                    "context_length": 32}),
                            tokenizer=None, max_cells=4)

    assert main(["echo", "--cells", "2", "--out", str(tmp_path / "cli")]) == 0
    assert capsys.readouterr().out.startswith("echo run ")
