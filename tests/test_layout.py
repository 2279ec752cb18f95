"""The code's shape, as docs/architecture.md draws it: layers import downwards only, no import cycles, one
concept per module (no product module over ~500 lines, no function over ~60 outside Triton kernel bodies).

Static checks of the source (ast): they fail on the commit that breaks the shape, not in a review later."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "scheduler", "gpu_worker", "model_io", "kernels", "gateway", "pagedfleet")
# what each package may import from the others (protocol at the bottom; gateway and pagedfleet on top)
ALLOWED = {
    "protocol": set(),
    "kernels": {"protocol"},
    "model_io": {"protocol"},
    "scheduler": {"protocol"},
    "gpu_worker": {"protocol", "kernels", "model_io"},
    "gateway": {"protocol", "model_io"},
    "pagedfleet": set(PACKAGES),
}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> set[str]:
    """Product modules imported anywhere in the file (function-level imports count: a lazy import is still
    a dependency), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    deps = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            deps.update(filter(None, (_resolve(a.name) for a in node.names)))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            deps.update(filter(None, (_resolve(f"{node.module}.{a.name}") or _resolve(node.module)
                                      for a in node.names)))
    return deps


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def test_layers_import_downwards_only():
    wrong = [f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps
             if d.split(".")[0] != m.split(".")[0] and d.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_one_concept(name):
    path = MODULES[name]
    src = path.read_text()
    assert src.count("\n") <= MAX_MODULE_LINES, f"{path.relative_to(REPO)}: {src.count(chr(10))} lines"
    long = []
    for node in ast.walk(ast.parse(src)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        # a Triton/Gluon kernel body is one GPU program: its length is the algorithm's, not a second concept
        if any("jit" in ast.unparse(d) for d in node.decorator_list):
            continue
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES:
            long.append(f"{node.name} ({n} lines)")
    assert not long, f"{path.relative_to(REPO)}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"
