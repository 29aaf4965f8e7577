"""The import graph of analysis/, app/ and faedkv/: no circles, and every arrow points down the
layers (DEVELOPERS.md, "Layers"). Every import statement counts, at module level or inside a
function, read with `ast` (nothing is imported)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("analysis", "app", "faedkv")

# The sub-packages of analysis/ from the bottom up: a module may import a layer of lower rank
# (service and bench share one rank, so neither imports the other). Rank 6 is analysis/
# itself: `__init__.py` and `__main__.py` (`python -m analysis`, which assembles the CLI).
RANK = {"api": 0, "harness": 1, "results": 2, "cli": 3, "tasks": 4, "service": 5, "bench": 5,
        "": 6}
# What analysis.api (the only part of analysis/ the app imports) and the app never import.
HEAVY = {"torch", "transformers", "kvpress", "triton", "faedkv"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports(name: str, source: str, is_package: bool, known) -> list[tuple[str, int]]:
    """(imported module, line) of every import in module `name`'s source: a name of ours
    resolves to the longest module of ours it names (`from analysis.tasks import needle` is
    analysis.tasks.needle, `from analysis.tasks import JobKind` is analysis.tasks); anything
    else to its top package (torch.nn -> torch)."""
    package = name if is_package else name.rpartition(".")[0]

    def resolve(dotted: str) -> str:
        parts = dotted.split(".")
        if parts[0] not in PACKAGES:
            return parts[0]
        while ".".join(parts) not in known and len(parts) > 1:
            parts.pop()
        return ".".join(parts)

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(resolve(alias.name), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                full = f"{source}.{alias.name}"
                found.append((full if full in known else resolve(source), node.lineno))
    return found


def graph() -> dict[str, list[tuple[str, int]]]:
    known = modules()
    return {name: [(target, line)
                   for target, line in imports(name, path.read_text(encoding="utf-8"),
                                               path.name == "__init__.py", known)
                   if target != name]
            for name, path in known.items()}


def ours(target: str) -> bool:
    return target.split(".")[0] in PACKAGES


def layer(module: str) -> str:
    """analysis.tasks.needle -> "tasks"; analysis.__main__ and analysis itself -> ""."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else ""


def where(module: str, line: int) -> str:
    return f"{modules()[module].relative_to(ROOT)}:{line}"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_back():
    edges = {m: {t for t, _ in targets if ours(t)} for m, targets in graph().items()}
    found = cycles(edges)
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_circle_between_the_layers_of_analysis():
    edges: dict[str, set[str]] = {}
    for module, targets in graph().items():
        if module.startswith("analysis"):
            for target, _ in targets:
                if target.startswith("analysis") and layer(target) != layer(module):
                    edges.setdefault(layer(module), set()).add(layer(target))
    found = cycles(edges)
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_every_import_in_analysis_points_down_the_layers():
    upward = [f"{where(m, line)}: {m} ({layer(m) or 'analysis'}) imports {t} ({layer(t) or 'analysis'})"
              for m, targets in graph().items() if m.startswith("analysis")
              for t, line in targets
              if t.startswith("analysis") and layer(t) != layer(m) and RANK[layer(t)] >= RANK[layer(m)]]
    assert not upward, "\n".join(upward)


def test_the_app_imports_only_analysis_api():
    wrong = [f"{where(m, line)}: {m} imports {t}"
             for m, targets in graph().items() if m.startswith("app")
             for t, line in targets
             if (ours(t) and not (t.startswith("app") or t.startswith("analysis.api")))
             or t in HEAVY]
    assert not wrong, "\n".join(wrong)


def test_analysis_api_imports_nothing_heavy_and_no_other_layer():
    wrong = [f"{where(m, line)}: {m} imports {t}"
             for m, targets in graph().items() if layer(m) == "api" and m.startswith("analysis")
             for t, line in targets
             if t in HEAVY or (ours(t) and not t.startswith("analysis.api"))]
    assert not wrong, "\n".join(wrong)


def test_faedkv_imports_neither_analysis_nor_the_app():
    wrong = [f"{where(m, line)}: {m} imports {t}"
             for m, targets in graph().items() if m.startswith("faedkv")
             for t, line in targets if t.startswith(("analysis", "app"))]
    assert not wrong, "\n".join(wrong)


def test_every_job_kind_runs_from_the_tasks_layer():
    """The server imports a kind's run function by name ("module:function"): that arrow too
    points from the service down to tasks."""
    from analysis.tasks import kinds

    known = modules()
    for kind in kinds().values():
        module = kind.run.partition(":")[0]
        assert module in known and layer(module) == "tasks", (kind.name, kind.run)


@pytest.mark.parametrize("source, expected", [
    ("from analysis.tasks import needle, JobKind", {"analysis.tasks.needle", "analysis.tasks"}),
    ("from . import common\nfrom .compress import METHODS", {"analysis.bench.common",
                                                             "analysis.bench.compress"}),
    ("def f():\n    import torch.nn\n    from faedkv.decode import slots",
     {"torch", "faedkv.decode.slots"}),
])
def test_the_graph_reads_every_kind_of_import(source, expected):
    found = {t for t, _ in imports("analysis.bench.probe", source, False, modules())}
    assert found == expected


def test_an_upward_import_is_caught():
    """What the layer test sees when the harness imports the store (results is above it)."""
    source = "def load():\n    from analysis.results.store import ResultsStore\n"
    targets = imports("analysis.harness.models", source, False, modules())
    assert [(t, RANK[layer(t)] > RANK["harness"]) for t, _ in targets] == [("analysis.results.store", True)]
