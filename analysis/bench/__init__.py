"""Benchmarks and reports: `python -m analysis.bench compress|tasks|shipped|report|gpu|gpu-render|e2e`,
`python -m analysis.bench.server` (the backend's throughput) and `python -m analysis.bench.results_report`
(docs/RESULTS.md from a results store).

Each benchmark writes a markdown fragment under benchmarks/ (headed by the date, the machine and
the command; `common.py`); `report` assembles BENCHMARKS.md from them, so every number there came
from a script. The top layer of analysis/: benchmarks import the tasks, the harness, the store and
the CLI helpers; nothing below imports them.
"""
