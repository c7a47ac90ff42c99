"""The import graph of the service, read from the source (every import counts: at module
level, inside functions, under TYPE_CHECKING, relative or absolute):

- no cycle between modules;
- dependencies point down the layers of DESIGN.md §1: gateway -> paywall -> metering -> plans
  -> core, and finance -> metering, plans -> core; migrations and app.py sit on top;
- a package reads another package's data through that package's service, never by importing
  its `models` or `store` (core's models, the apps, end users, keys and outbox every table
  refers to, are the shared kernel's and may be read by all);
- the SDK speaks HTTP only: it imports no module of the service.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = ("core", "plans", "metering", "paywall", "finance", "gateway")
# what each top-level part may import besides itself
MAY_IMPORT: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "plans": frozenset({"core"}),
    "metering": frozenset({"plans", "core"}),
    "paywall": frozenset({"metering", "plans", "core"}),
    "finance": frozenset({"metering", "plans", "core"}),
    "gateway": frozenset({"paywall", "metering", "plans", "core"}),
    "migrations": frozenset(DOMAIN),
    "app": frozenset({*DOMAIN, "migrations"}),
}
SHARED_KERNEL = "core"
DATA_MODULES = ("models", "store")


def project_modules(root: Path, tops: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for app.py and every package named in `tops`."""
    found: dict[str, Path] = {}
    for top in tops:
        single = root / f"{top}.py"
        if single.is_file():
            found[top] = single
        for path in sorted((root / top).rglob("*.py")) if (root / top).is_dir() else []:
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `module` imports, anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [_resolve(alias.name, modules) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules
                       else _resolve(source, modules) for alias in node.names]
        else:
            continue
        out.update(t for t in targets if t is not None and t != module)
    return out


def import_graph(root: Path, tops: Iterable[str]) -> dict[str, set[str]]:
    modules = project_modules(root, tops)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        mine = module.split(".")[0]
        for target in sorted(targets):
            theirs = target.split(".")[0]
            if theirs != mine and theirs not in MAY_IMPORT.get(mine, frozenset()):
                bad.append(f"{module} -> {target}")
    return bad


def data_reads(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        mine = module.split(".")[0]
        if mine not in DOMAIN:
            continue  # migrations and app.py assemble every package's tables
        for target in sorted(targets):
            theirs = target.split(".")[0]
            if theirs not in (mine, SHARED_KERNEL) and target.split(".")[-1] in DATA_MODULES:
                bad.append(f"{module} -> {target}")
    return bad


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = import_graph(ROOT, ["app", "migrations", *DOMAIN])
    assert len(found) > 100 and "gateway.service" in found and "app" in found
    return found


def test_no_module_is_part_of_an_import_cycle(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_every_import_points_down_the_layers(graph: dict[str, set[str]]) -> None:
    assert upward_imports(graph) == []


def test_packages_read_each_others_data_through_their_services(
        graph: dict[str, set[str]]) -> None:
    assert data_reads(graph) == []


def test_the_sdk_imports_no_module_of_the_service() -> None:
    sdk = ROOT / "sdk" / "python"
    service = project_modules(ROOT, ["app", "migrations", *DOMAIN])
    sdk_modules = project_modules(sdk, ["meterlane_sdk"])
    assert sdk_modules
    for name, path in sdk_modules.items():
        assert not imports_of(name, path, service), name


# -- the checker itself finds what it is for ----------------------------------------------

def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_cycles_through_function_and_type_checking_imports(
        tmp_path: Path) -> None:
    _tree(tmp_path, {
        "plans/__init__.py": "",
        "plans/a.py": "def f():\n    from plans.b import g\n",
        "plans/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from . import c\n",
        "plans/c.py": "from .a import f\n",
        "plans/d.py": "import plans.a\n",
    })
    graph = import_graph(tmp_path, ["plans"])
    assert cycles(graph) == [["plans.a", "plans.b", "plans.c"]]


def test_the_checker_finds_imports_up_the_layers_and_reads_of_other_packages_models(
        tmp_path: Path) -> None:
    _tree(tmp_path, {
        "core/__init__.py": "", "core/models.py": "",
        "metering/__init__.py": "", "metering/models.py": "", "metering/service.py": "",
        "plans/__init__.py": "",
        "plans/api.py": "def f():\n    from metering.service import x\n",
        "plans/service.py": "from core.models import App\n",
        "paywall/__init__.py": "",
        "paywall/evidence.py": "from metering import service, models\n",
    })
    graph = import_graph(tmp_path, ["core", "metering", "plans", "paywall"])
    assert upward_imports(graph) == ["plans.api -> metering.service"]
    assert data_reads(graph) == ["paywall.evidence -> metering.models"]
