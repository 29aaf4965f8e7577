"""A battery of bad input against a real `python -m analysis.service.server` on loopback (tiny random
Llama: 3 layers, 2 KV heads, 8192-token context): every case must be answered 4xx up front with
a one-sentence `detail` that names the problem and shows no server path; none may be a 5xx, and
none may be accepted (a job accepted for input that can be checked up front and failing in the
worker is the defect this guards against). Prints the tally (cases, 4xx, 5xx, accepted)."""
from __future__ import annotations

import collections
import copy

import httpx
import pytest

from analysis.api import params as P
from analysis.harness.methods import REGISTRY
from tests.test_server import AUTH, GENERATE, TOKEN, needle, start_backend

TINY_LAYERS = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("bad-input-store")
    local = start_backend(store, token=TOKEN, extra_args=("--max-cells", "1000"))
    yield local, store
    local.stop()


def _set(body: dict, path: str, value) -> dict:
    """A deep copy of body with the dotted path set to value ("params.methods.0.params.x")."""
    out = copy.deepcopy(body)
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


def job(kind: str, params: dict) -> dict:
    return {"kind": kind, "params": params}


BASE = {
    "needle": needle(depths=2, samples=1),
    "suite": {"methods": [{"name": "knorm", "compression_ratio": 0.5}], "samples": 1,
              "tasks": ["variable_tracking"], "context_length": 256, "max_new_tokens": 4},
    "ppl": {"methods": [{"name": "knorm", "compression_ratio": 0.5}], "prefix_tokens": 64,
            "continuation_tokens": 8, "num_texts": 1},
    "spectra": {"num_tokens": 64, "grid_points": 17, "chunks": 4},
    "ablate": {"chunks": 2, "layers": [0], "prefix_tokens": 64, "continuation_tokens": 8,
               "num_texts": 1, "needle_samples": 0, "window": 8, "sink_tokens": 2},
    "contrib": {"methods": [{"name": "faedkv", "compression_ratio": 0.5}], "context_length": 128},
}

# Field -> bad values, per job kind (types that would be coerced, ranges, wrong shapes).
NUMERIC_FIELDS = {
    "needle": ["samples", "seed", "max_new_tokens", "num_needles", "num_depths"],
    "suite": ["samples", "context_length"],
    "ppl": ["prefix_tokens", "continuation_tokens", "num_texts", "seed"],
    "spectra": ["num_tokens", "grid_points", "chunks", "text_seed"],
    "ablate": ["chunks", "prefix_tokens", "continuation_tokens", "needle_samples", "sink_tokens",
               "window"],
    "contrib": ["context_length", "text_seed"],
}
BAD_NUMBERS = ["512", -1, 10**12, 2.5, True, None, [], {}]


def method_cases() -> list[tuple[str, dict]]:
    """For every method and every rule of it: a wrong type and an out-of-range value, sent as
    a needle job's method (a check that ran only in the worker would be accepted)."""
    cases = []
    for name, rules in P.METHOD_RULES.items():
        ratio = 0.0 if name == "full" else 0.5
        for key, rule in rules.items():
            wrong = {"int": "8", "float": "0.5", "bool": "yes", "choice": 3, "plan": "low-pass",
                     "ratios": "0.5"}
            values = [wrong[rule.kind]]
            if rule.kind in ("int", "float"):
                values.append(-10**9 if rule.low is not None and rule.low > -10**9 else 10**12)
            if rule.kind == "choice":
                values.append("no-such-" + key)
            if rule.kind == "plan":
                values.append({"layers": [[0]] * (TINY_LAYERS + 1), "chunks": 4})   # layer count
            if rule.kind == "ratios":       # out of range, a layer too many, a mean off the ratio
                values += [[0.5, 1.5, 0.5], [ratio] * (TINY_LAYERS + 1), [0.1] * TINY_LAYERS]
            for value in values:
                spec = {"name": name, "compression_ratio": ratio, "params": {key: value}}
                cases.append((f"{name}.{key}={value!r:.30}",
                              job("needle", {**needle(2, 1), "methods": [spec]})))
        cases.append((f"{name}.unknown-param", job("needle", {**needle(2, 1), "methods": [
            {"name": name, "compression_ratio": ratio, "params": {"no_such_param": 1}}]})))
    return cases


def grid_cases() -> list[tuple[str, dict]]:
    cases = []
    for kind, fields in NUMERIC_FIELDS.items():
        for field in fields:
            for value in BAD_NUMBERS:
                cases.append((f"{kind}.{field}={value!r}", job(kind, _set(BASE[kind], field, value))))
        cases.append((f"{kind}.extra-field", job(kind, {**BASE[kind], "colour": "red"})))
    plan3 = lambda n: {"name": "p", "chunks": 4, "layers": [[0, 1]] * n}   # noqa: E731
    faedkv = lambda **p: [{"name": "faedkv", "compression_ratio": 0.5, "params": p}]  # noqa: E731
    cases += [
        ("needle.plan-wrong-layers", job("needle", {**needle(2, 1), "methods": faedkv(plan=plan3(2))})),
        ("needle.plan-string", job("needle", {**needle(2, 1), "methods": faedkv(plan="[[0]]")})),
        ("needle.plan-per-head-count", job("needle", {**needle(2, 1), "methods": faedkv(
            plan={"chunks": 4, "layers": [[[0], [1], [2]]] * TINY_LAYERS})})),
        ("needle.plan-chunk-out-of-range", job("needle", {**needle(2, 1), "methods": faedkv(
            plan={"chunks": 4, "layers": [[9]] * TINY_LAYERS})})),
        ("needle.snapkv-window-vs-context", job("needle", {**needle(2, 1), "methods": [
            {"name": "snapkv", "compression_ratio": 0.5, "params": {"window_size": 200}}]})),
        ("needle.streaming-sink-vs-context", job("needle", {**needle(2, 1), "methods": [
            {"name": "streaming_llm", "compression_ratio": 0.5, "params": {"n_sink": 500}}]})),
        ("needle.full-at-ratio", job("needle", {**needle(2, 1), "methods": [
            {"name": "full", "compression_ratio": 0.5}]})),
        ("needle.duplicate-method", job("needle", {**needle(2, 1), "methods": [
            {"name": "snapkv", "compression_ratio": 0.5}, {"name": "snapkv", "compression_ratio": 0.5}]})),
        ("needle.methods-empty", job("needle", {**needle(2, 1), "methods": []})),
        ("needle.methods-string", job("needle", {**needle(2, 1), "methods": "snapkv"})),
        ("needle.lengths-string", job("needle", {**needle(2, 1), "lengths": ["512"]})),
        ("needle.lengths-too-long", job("needle", {**needle(2, 1), "lengths": [9000]})),
        ("needle.depth-101", job("needle", {**needle(2, 1), "depths": [101]})),
        ("needle.too-many-cells", job("needle", needle(depths=41, samples=30))),
        ("ablate.layers-empty", job("ablate", {**BASE["ablate"], "layers": []})),
        ("ablate.layers-outside", job("ablate", {**BASE["ablate"], "layers": [3]})),
        ("ablate.layers-negative", job("ablate", {**BASE["ablate"], "layers": [-1]})),
        ("ablate.layers-duplicate", job("ablate", {**BASE["ablate"], "layers": [0, 0]})),
        ("ablate.middle-too-short", job("ablate", {**BASE["ablate"], "window": 60})),
        ("ablate.target", job("ablate", {**BASE["ablate"], "target": "queries"})),
        ("suite.unknown-task", job("suite", {**BASE["suite"], "tasks": ["qa"]})),
        ("contrib.full", job("contrib", {**BASE["contrib"], "methods": [{"name": "full"}]})),
        ("contrib.dimsplit", job("contrib", {**BASE["contrib"], "methods": faedkv(variant="dimsplit")})),
        ("needle.dim-share-with-iwdft", job("needle", {**needle(2, 1), "methods": faedkv(dim_share=0.25)})),
        ("needle.dim-share-1", job("needle", {**needle(2, 1), "methods": faedkv(variant="dimsplit", dim_share=1.0)})),
        ("needle.dimsplit-with-plan", job("needle", {**needle(2, 1), "methods": faedkv(
            variant="dimsplit", plan=plan3(TINY_LAYERS))})),
        ("kind.unknown", job("bogus", {})),
        ("kind.missing", {"params": {}}),
        ("kind.number", {"kind": 3, "params": {}}),
        ("params.list", {"kind": "needle", "params": []}),
        ("params.string", {"kind": "needle", "params": "lengths=128"}),
        ("body.extra", {"kind": "spectra", "params": {}, "priority": 1}),
    ]
    return cases


def generate_cases() -> list[tuple[str, dict]]:
    def gen(path, value):
        return _set(GENERATE, path, value)

    return [
        ("generate.snapkv-window--1", gen("method.params", {"window_size": -1})),
        ("generate.snapkv-window-1e9", gen("method.params", {"window_size": 10**9})),
        ("generate.snapkv-window-list", gen("method.params", {"window_size": [64]})),
        ("generate.snapkv-window-vs-prompt", gen("method.params", {"window_size": 500})),
        ("generate.faedkv-plan-layers", gen("method", {"name": "faedkv", "compression_ratio": 0.5,
                                                       "params": {"plan": {"layers": [[0]]}}})),
        ("generate.full-at-ratio", gen("method", {"name": "full", "compression_ratio": 0.5})),
        ("generate.ratio-1", gen("method.compression_ratio", 1.0)),
        ("generate.ratio-string", gen("method.compression_ratio", "0.5")),
        ("generate.context-string", gen("prompt.context_length", "512")),
        ("generate.context-too-long", gen("prompt.context_length", 9000)),
        ("generate.depth-negative", gen("prompt.depth", -5)),
        ("generate.text-empty", gen("prompt", {"kind": "text", "text": ""})),
        ("generate.max-new-0", gen("max_new_tokens", 0)),
        ("generate.query-mode", gen("query_mode", "both")),
        ("generate.compare-full-int", gen("compare_full", 1)),
        ("generate.method-missing", {k: v for k, v in GENERATE.items() if k != "method"}),
    ]


def path_cases() -> list[tuple[str, str, str]]:
    """(name, method, path) for keys and ids that must be refused before touching the disk."""
    long_key = "a" * 300
    return [
        ("GET long key", "GET", f"/runs/{long_key}"),
        ("DELETE long key", "DELETE", f"/runs/{long_key}"),
        ("GET 255 key", "GET", "/runs/" + "f" * 255),
        ("GET key with dots", "GET", "/runs/a.b"),
        ("GET traversal", "GET", "/runs/..%2F..%2Fetc"),
        ("GET key unicode", "GET", "/runs/%C3%A9t%C3%A9"),
        ("GET array long name", "GET", "/runs/0123456789abcdef/arrays/" + "x" * 300),
        ("GET job long id", "GET", "/jobs/" + "0" * 300),
        ("POST cancel long id", "POST", "/jobs/" + "0" * 300 + "/cancel"),
        ("GET runs limit 0", "GET", "/runs?limit=0"),
        ("GET runs limit string", "GET", "/runs?limit=many"),
        ("GET runs kind bad", "GET", "/runs?kind=a%20b"),
    ]


RAW_BODIES = [
    ("truncated JSON", b'{"kind": "needle",', "application/json"),
    ("JSON list", b"[1, 2]", "application/json"),
    ("JSON string", b'"needle"', "application/json"),
    ("empty body", b"", "application/json"),
    ("invalid UTF-8", b'{"kind": "\xff\xfe"}', "application/json"),
    ("text/plain", b'{"kind": "spectra", "params": {}}', "text/plain"),
    ("form body", b"kind=spectra", "application/x-www-form-urlencoded"),
    ("NaN number", b'{"kind": "spectra", "params": {"num_tokens": NaN}}', "application/json"),
    ("deep nesting", b"[" * 5000 + b"]" * 5000, "application/json"),
]


def _check(response: httpx.Response, store, name: str) -> int:
    body = response.json()
    detail = body.get("detail") if isinstance(body, dict) else None
    assert isinstance(detail, str) and detail, (name, response.text)
    assert str(store) not in detail and "/tmp/" not in detail and "Traceback" not in detail, (
        name, detail)
    return response.status_code


def test_bad_input_battery_gets_4xx_and_no_job_is_accepted(server):
    local, store = server
    tally = collections.Counter()
    failures = []
    with httpx.Client(base_url=local.url, headers=AUTH, timeout=60) as http:
        cases = ([("POST", "/jobs", n, b) for n, b in method_cases() + grid_cases()]
                 + [("POST", "/generate", n, b) for n, b in generate_cases()])
        for method, path, name, body in cases:
            status = _check(http.request(method, path, json=body), store, name)
            tally[status // 100] += 1
            if not 400 <= status < 500:
                failures.append((name, status))
        for name, method, path in path_cases():
            status = _check(http.request(method, path), store, name)
            tally[status // 100] += 1
            if not 400 <= status < 500:
                failures.append((name, status))
        for name, content, ctype in RAW_BODIES:
            for path in ("/jobs", "/generate"):
                response = http.post(path, content=content, headers={"Content-Type": ctype})
                status = _check(response, store, name)
                assert "There was an error parsing the body" not in response.text, name
                tally[status // 100] += 1
                if not 400 <= status < 500:
                    failures.append((f"{path} {name}", status))
        jobs = http.get("/jobs").json()
    total = sum(tally.values())
    print(f"\nbad-input battery: {total} cases, {tally[4]} 4xx, {tally[5]} 5xx, "
          f"{tally[2]} accepted, {len(jobs)} jobs queued")
    assert not failures, failures
    assert total >= 150 and tally[4] == total
    assert jobs == []                      # nothing was queued, so nothing could fail later
    assert not any((store / "runs").iterdir())       # and no run folder was created
    # The registry's own defaults are accepted (the rules are not simply refusing everything).
    assert all(P.MethodSpec(name=n, compression_ratio=0.0 if n == "full" else 0.5,
                            params=dict(REGISTRY[n].defaults)) for n in P.METHODS)
