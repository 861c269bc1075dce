"""The house reads top-down: no import cycles in fastgen/ (every import counts, lazy ones inside functions too: a
lazy import hides a cycle, it does not remove it), and no lower layer imports a higher one."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

FASTGEN = Path(__file__).resolve().parent.parent / "fastgen"

# The floors above the engine's parts: apps, the app shell, the composition root, the engine, and what drives it.
UPPER = ("fastgen.engine", "fastgen.compose", "fastgen.conf", "fastgen.cli", "fastgen.plugins", "fastgen.bench",
         "fastgen.capacity", "fastgen.serve", "fastgen.driver", "fastgen.calibration", "fastgen.pipeline",
         "fastgen.run_config", "fastgen.analysis", "fastgen.peers", "fastgen.result_cache", "fastgen.tracking",
         "fastgen.wandb_offline", "fastgen.ablate", "fastgen.class_figures", "fastgen.deployment",
         "fastgen.disaggregated", "fastgen.engine_process")
# The engine's parts and what they stand on: they never import a floor above them.
LOWER = ("fastgen.kernels", "fastgen.models", "fastgen.sim", "fastgen.kv", "fastgen.schedulers", "fastgen.executors",
         "fastgen.speculative", "fastgen.routers", "fastgen.workloads", "fastgen.config", "fastgen.request",
         "fastgen.ragged", "fastgen.model_spec", "fastgen.registry", "fastgen.sampling", "fastgen.detokenizer",
         "fastgen.metrics", "fastgen.qoe", "fastgen.roofline", "fastgen.step_stats", "fastgen.request_trace",
         "fastgen.distributed", "fastgen.structured", "fastgen.handoff", "fastgen.openmp",
         "fastgen.hugepages")


def modules(package_dir: Path) -> dict[str, Path]:
    out = {}
    for f in package_dir.rglob("*.py"):
        parts = list(f.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body. `from a.b import c` counts both a.b and
    a.b.c (when c is a module): importing a submodule through its package runs the package's __init__."""
    mods = modules(package_dir)
    root = package_dir.name

    def target(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for name in names:
                t = target(name) if name == root or name.startswith(root + ".") else None
                if t and t != m:
                    graph[m].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_fastgen_has_no_import_cycles():
    assert cycles(import_graph(FASTGEN)) == []


def test_no_lower_layer_imports_a_higher_one():
    graph = import_graph(FASTGEN)
    upward = sorted((m, t) for m, targets in graph.items() if under(m, LOWER) for t in targets if under(t, UPPER))
    assert upward == []


def test_the_engine_sees_the_scheduler_and_the_executor_not_the_kv_manager():
    assert not any(under(t, ("fastgen.kv",)) for t in import_graph(FASTGEN)["fastgen.engine"])
    attributes = {n.attr for n in ast.walk(ast.parse((FASTGEN / "engine.py").read_text()))
                  if isinstance(n, ast.Attribute)}
    assert not attributes & {"kv", "_kv"}


@pytest.mark.parametrize("lazy", [True, False])
def test_a_cycle_is_found_even_through_a_lazy_import(tmp_path, lazy):
    """The checker itself: a package whose two modules import each other, one of them inside a function."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.low import f\n")
    (pkg / "sub" / "low.py").write_text("def f():\n    from pkg.high import g\n    return g\n" if lazy else
                                        "from pkg import high\n")
    (pkg / "high.py").write_text("from pkg.sub import low\n")
    assert cycles(import_graph(pkg)) == [["pkg.high", "pkg.sub", "pkg.sub.low"]]
    (pkg / "sub" / "low.py").write_text("def f():\n    return 1\n")
    assert cycles(import_graph(pkg)) == []
