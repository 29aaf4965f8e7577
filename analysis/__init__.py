"""FAEDKV Lab's experiments, in layers; each imports only the layers listed before it
(tests/test_layers.py checks every import):

    api/      params, client, job states: torch-free, the only part the app imports
    harness/  models, the method registry, compressed generation, the haystack, K/V capture
    results/  the results store and the grid runner (local or Ray)
    cli/      the command line's shared flags, method specs, run_job, the store commands
    tasks/    the job kinds (one declaration each) and the experiments they run
    service/  the backend: REST server and job queue
    bench/    benchmarks and reports (markdown fragments, BENCHMARKS.md, docs/RESULTS.md)

`python -m analysis` (`__main__.py`) is the command line over every job kind and the store.
"""
