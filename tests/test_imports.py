"""Package structure: who imports whom (ARCHITECTURE.md's dependency rules), no import circles, small files."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("moe", "runtime", "offload", "comm", "placement", "cluster")


MODULE_FILES = {f"{pkg}.{f[:-3]}" for pkg in PACKAGES for f in os.listdir(os.path.join(ROOT, pkg))
                if f.endswith(".py") and f != "__init__.py"}


def modules():
    """{module name ('runtime.engine'): (path, [(imported module, top level?), ...])} of our packages."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted(os.listdir(os.path.join(ROOT, pkg))):
            if not f.endswith(".py"):
                continue
            name = f"{pkg}.{f[:-3]}" if f != "__init__.py" else pkg
            path = os.path.join(ROOT, pkg, f)
            tree = ast.parse(open(path).read(), path)
            top = {id(n) for n in tree.body}
            deps = []
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    if node.level:          # relative: resolve against this package
                        base = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
                        target = ".".join(base + ([node.module] if node.module else []))
                    elif node.module and node.module.startswith("moeyard."):
                        target = node.module[len("moeyard."):]
                    else:
                        continue
                    names = [f"{target}.{a.name}" for a in node.names]
                    if f"{target}.{node.names[0].name}" in MODULE_FILES:   # ``from . import sub``: the submodules
                        deps += [(t, id(node) in top) for t in names]
                    else:
                        deps.append((target, id(node) in top))
                elif isinstance(node, ast.Import):
                    deps += [(a.name[len("moeyard."):], id(node) in top) for a in node.names
                             if a.name.startswith("moeyard.")]
            out[name] = (path, deps)
    return out


MODS = modules()


def edges(top_only: bool):
    g = {m: set() for m in MODS}
    for m, (_, deps) in MODS.items():
        for t, top in deps:
            if t in MODS and t != m and (top or not top_only):
                g[m].add(t)
    return g


def test_runtime_imports_neither_cluster_nor_comm():
    bad = [(m, t) for m, (_, deps) in MODS.items() if m.startswith("runtime")
           for t, _ in deps if t.split(".")[0] in ("cluster", "comm")]
    assert not bad, f"runtime/ must not import cluster/ or comm/ (modes are found by name): {bad}"


@pytest.mark.parametrize("pkg,forbidden", [("moe", ("runtime", "offload", "comm", "cluster")),
                                           ("comm", ("runtime", "offload", "cluster")),
                                           ("placement", ("runtime", "offload", "comm", "cluster"))])
def test_dependencies_point_one_way(pkg, forbidden):
    bad = [(m, t) for m, (_, deps) in MODS.items() if m.split(".")[0] == pkg
           for t, _ in deps if t.split(".")[0] in forbidden]
    assert not bad, f"{pkg}/ must not import {forbidden}: {bad}"


def test_no_import_cycles():
    """No circle of top-level imports between our modules (lazy imports inside functions break circles only
    where a registry looks a module up by name)."""
    g = edges(top_only=True)
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(g[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2
    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_expert_parallel_files_are_small():
    big = [(m, n) for m, (p, _) in MODS.items() if m.split(".")[0] in ("comm", "cluster")
           for n in [sum(1 for _ in open(p))] if n > 400]
    assert not big, f"files over 400 lines: {big}"
