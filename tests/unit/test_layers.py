"""The package graph: each package imports only packages below it in the README's layer order,
at the top of its modules, and the graph has no cycle. Reads the imports with `ast`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.support import ROOT


def layer_order() -> list[str]:
    """Returns the packages bottom first, as the README's architecture section lists them."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"Layers, bottom first: (.+)\.", readme)
    assert found, "README.md lacks the line 'Layers, bottom first: `core`, ... .'"
    return re.findall(r"`(\w+)`", found.group(1))


def project_imports(path: Path, packages: set[str]) -> list[tuple[str, int, bool]]:
    """Returns (imported package, line, allowed where it is) for each import of a project
    package: at module top, under TYPE_CHECKING, or inside a function with a `# heavy` comment
    saying why it waits (a module that loads a framework taking seconds to import)."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    top = {id(node) for node in tree.body}
    type_checking = {
        id(inner)
        for node in tree.body
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in node.body
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            package = name.split(".")[0]
            if package in packages:
                heavy = "# heavy" in lines[node.lineno - 1]
                found.append((package, node.lineno, id(node) in top or id(node) in type_checking or heavy))
    return found


def graph(order: list[str]) -> dict[str, dict[str, list[str]]]:
    """Returns {package: {imported package: ["file:line", ...]}} over the production packages."""
    packages = set(order)
    edges: dict[str, dict[str, list[str]]] = {p: {} for p in order}
    for package in order:
        for path in sorted((ROOT / package).rglob("*.py")):
            for target, line, _ in project_imports(path, packages):
                if target != package:
                    edges[package].setdefault(target, []).append(f"{path.relative_to(ROOT)}:{line}")
    return edges


def test_the_readme_names_every_package_once() -> None:
    order = layer_order()
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert sorted(order) == sorted(on_disk)
    assert len(order) == len(set(order))


def test_each_package_imports_only_packages_below_it() -> None:
    order = layer_order()
    rank = {p: i for i, p in enumerate(order)}
    upward = [
        f"{where}: {package} imports {target} (above it)"
        for package, targets in graph(order).items()
        for target, places in targets.items()
        if rank[target] > rank[package]
        for where in places
    ]
    assert not upward, "\n".join(upward)


def test_the_package_graph_has_no_cycle() -> None:
    edges = {p: set(t) for p, t in graph(layer_order()).items()}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            pytest.fail("cycle: " + " -> ".join([*path[path.index(node) :], node]))
        if node in done:
            return
        for target in sorted(edges[node]):
            visit(target, [*path, node])
        done.add(node)

    for package in edges:
        visit(package, [])


def test_project_imports_sit_at_module_top() -> None:
    packages = set(layer_order()) | {"tests"}
    inside = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        if path.relative_to(ROOT).parts[0] not in packages:
            continue
        inside += [
            f"{path.relative_to(ROOT)}:{line} imports {target} inside a function"
            for target, line, at_top in project_imports(path, packages)
            if not at_top
        ]
    assert not inside, "\n".join(inside)


def test_production_never_imports_the_simulator_or_the_benchmarks() -> None:
    order = layer_order()
    production = order[: order.index("sim")]
    edges = graph(order)
    leaks = [f"{p} -> {t}: {edges[p][t][0]}" for p in production for t in ("sim", "bench") if t in edges[p]]
    assert not leaks, "\n".join(leaks)


def test_the_checks_catch_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import serving.app\n\ndef f():\n    from bench import api\n    from bench import stream  # heavy: loads X\n"
    )
    assert project_imports(module, {"serving", "bench"}) == [
        ("serving", 1, True),
        ("bench", 4, False),
        ("bench", 5, True),
    ]


def test_the_image_copies_every_package() -> None:
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\w+)/ \1/$", dockerfile, re.MULTILINE))
    assert copied == set(layer_order())
