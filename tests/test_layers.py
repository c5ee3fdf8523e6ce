"""The package's architecture as a test: imports point one way, no cycles, small modules.

method <- model, data <- store <- experiments <- report <- cli, reproduce, widgets (README
"Layout"). Every import counts, function-local ones included.
"""
import ast
import pathlib

import pytest

import vitsift_core

ROOT = pathlib.Path(vitsift_core.__file__).parent
# each group may import only the groups of lower rank (and itself)
RANK = {"paths": 0, "vitsift_core": 0, "method": 1, "model": 2, "data": 2, "store": 3, "experiments": 4,
        "report": 5, "cli": 6, "reproduce": 6, "widgets": 6, "options": 0}


def group(module: str) -> str:
    parts = module.split(".")
    return "vitsift_core" if len(parts) == 1 or parts[1] == "__version__" else parts[1]


def module_imports() -> dict[str, set[str]]:
    """module -> the vitsift_core modules it imports (names that are modules, else their package)."""
    mods = {".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in ROOT.rglob("*.py")}
    out = {}
    for mod, path in mods.items():
        deps = set()
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("vitsift_core"):
                names = [f"{n.module}.{a.name}" for a in n.names]
                deps |= {x for x in names if x in mods} or {n.module}
            elif isinstance(n, ast.Import):
                deps |= {a.name for a in n.names if a.name.startswith("vitsift_core")}
        out[mod] = deps - {mod}
    return out


def test_imports_point_down_the_layers():
    bad = [f"{m} imports {d}" for m, deps in module_imports().items() for d in deps
           if RANK[group(d)] > RANK[group(m)] or (RANK[group(d)] == RANK[group(m)] != 0
                                                   and group(d) != group(m))]
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = module_imports()
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d in graph and d != "vitsift_core":
                visit(d)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_small_and_says_what_it_is_for(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 450
    if path.name != "__init__.py" or text.strip():
        assert ast.get_docstring(ast.parse(text)), f"{path.name} opens without a docstring"
