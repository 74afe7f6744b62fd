"""The shape of the house, measured: the longest modules, classes and functions of the package
(fcmae/, finetune/, experiments/) and its import cycles.

    python scripts/house_metrics.py            # the table; exit 1 when a goal is missed
    python scripts/house_metrics.py --top 10   # more of the longest of each kind

Goals (issue 24): no module over 400 lines, no class over 250, no function over 60, no import
cycle among modules (imports at any depth of a module count, lazy ones too).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Folder -> the dotted name it installs as (pyproject.toml's package-dir).
PACKAGES = {"fcmae": "fcmae", "finetune": "fcmae.finetune", "experiments": "fcmae.experiments"}
GOALS = {"module": 400, "class": 250, "function": 60}


def modules() -> dict[str, Path]:
    """Dotted module name -> file."""
    found = {}
    for folder, dotted in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((dotted, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def spans(tree: ast.AST) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(classes, functions) as (qualified name, lines), nested ones included."""
    classes, functions = [], []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                lines = child.end_lineno - child.lineno + 1
                kind = classes if isinstance(child, ast.ClassDef) else functions
                kind.append((name, lines))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return classes, functions


def imports(tree: ast.AST, name: str, known: set[str], package: bool) -> set[str]:
    """The package's modules that a module imports (at any depth)."""
    base = name if package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            parent = node.module or ""
            if node.level:
                up = base.split(".")[: len(base.split(".")) - node.level + 1]
                parent = ".".join(up + ([parent] if parent else []))
            targets = [parent] + [f"{parent}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=5, help="rows per kind")
    args = parser.parse_args()
    found = modules()
    sizes: dict[str, list[tuple[str, int]]] = {"module": [], "class": [], "function": []}
    graph = {}
    for name, path in found.items():
        text = path.read_text()
        tree = ast.parse(text)
        sizes["module"].append((name, len(text.splitlines())))
        classes, functions = spans(tree)
        sizes["class"] += [(f"{name}.{c}", n) for c, n in classes]
        sizes["function"] += [(f"{name}.{f}", n) for f, n in functions]
        graph[name] = imports(tree, name, set(found), path.name == "__init__.py")
    missed = 0
    print(f"{len(found)} modules in {', '.join(PACKAGES)}")
    for kind, rows in sizes.items():
        rows.sort(key=lambda r: -r[1])
        over = [r for r in rows if r[1] > GOALS[kind]]
        missed += len(over)
        print(f"\nlongest {kind}s (goal: at most {GOALS[kind]} lines; {len(over)} over)")
        for row_name, lines in rows[: max(args.top, len(over))]:
            print(f"  {lines:5d}  {row_name}")
    loops = cycles(graph)
    missed += len(loops)
    print(f"\nimport cycles: {len(loops)}")
    for loop in loops:
        print("  " + " <-> ".join(loop))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
