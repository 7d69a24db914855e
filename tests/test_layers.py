"""The package's layers, checked statically (issue 14, item 5): no import cycle between the
top-level units of edgetrain, no core unit importing an outer one, no core layer importing
a higher one.

A *unit* is a top-level module or package of ``src/edgetrain`` (``edgetrain.backward``,
``edgetrain.plan``, ...). Every import counts, wherever it is in a file (module level,
inside a function, under ``if TYPE_CHECKING``): ``import edgetrain.x``, ``from
edgetrain.x import y``, ``from edgetrain import x``, relative imports, and any string that
is a module path (``importlib.import_module("edgetrain.x")``, a registry of lazy imports):
a lazy import is still a dependency. Only the package root (``edgetrain/__init__.py``,
which wires the public API) is no unit.

The layering is the table below. Until the lead removes the edges still in
``PENDING_EDGES`` they are allowed; a pending edge that is gone, or that breaks no rule,
fails the test too, so the set can only shrink, to empty.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

# --- the layering ---------------------------------------------------------------------------

CORE_LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "seeding", "files", "batches", "_registry", "structure", "loader"),
    ("recipe", "compat"),
    ("scope", "numerics"),
    ("optim", "journal"),
    ("backward",),
    ("estimators",),
    ("memory",),
)
"""The core, lowest layer first: a core unit imports units of its own layer or lower ones,
never a higher layer and never an outer unit."""

OUTER: tuple[str, ...] = (
    "tasks",
    "data",
    "models",
    "integrations",
    "bench",
    "plan",
    "presets",
    "cli",
    "train",
    "distributed",
    "evaluate",
    "__main__",
)
"""The outer units: they import the core and each other (without cycles); models and
integrations declare their split points and swap rules to the core, never the reverse."""

PENDING_EDGES: set[tuple[str, str]] = set()
"""Edges that break a rule and are still allowed, until removed (each must still exist and
still break a rule: the set only shrinks)."""

# --- the checker ----------------------------------------------------------------------------

_MODULE_PATH = r"{pkg}(\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?"


def import_edges(src: Path, package: str) -> dict[tuple[str, str], list[str]]:
    """``{(unit, imported unit): ["file:line", ...]}`` over every ``.py`` file of
    ``src/package``, for imports between different units."""
    root = src / package
    module_path = re.compile(_MODULE_PATH.format(pkg=re.escape(package)))
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)

    def unit_of(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 and parts[0] == package else None

    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(src).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        me = unit_of(".".join(parts))
        if me is None:  # the package root
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            modules: list[str] = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = parts if is_pkg else parts[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                modules = [module]
                if module == package:  # from edgetrain import x, y
                    modules += [f"{module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if module_path.fullmatch(node.value):
                    modules = [node.value.split(":")[0]]
            for module in modules:
                other = unit_of(module)
                if other is not None and other != me:
                    where = f"{path.relative_to(root).as_posix()}:{node.lineno}"
                    edges[(me, other)].append(where)
    return dict(edges)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one unit (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
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


def _reaches(graph: dict[str, set[str]], a: str, b: str) -> bool:
    seen, todo = {a}, [a]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w == b:
                return True
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return False


def layer_violations(
    edges: dict[tuple[str, str], list[str]],
    core_layers: tuple[tuple[str, ...], ...],
    outer: tuple[str, ...],
    pending: set[tuple[str, str]] = frozenset(),
) -> list[str]:
    """Every broken rule, one message each (empty: the layering holds)."""
    layer = {u: i for i, units in enumerate(core_layers) for u in units}
    problems: list[str] = []
    units = {u for edge in edges for u in edge}
    for u in sorted(units - set(layer) - set(outer)):
        problems.append(f"unit {u!r} is in neither CORE_LAYERS nor OUTER: place it")

    def rule_broken(u: str, v: str) -> str | None:
        if u in layer and v in outer:
            return f"core unit {u!r} imports outer unit {v!r}"
        if u in layer and v in layer and layer[v] > layer[u]:
            return f"core unit {u!r} (layer {layer[u]}) imports {v!r} (higher layer {layer[v]})"
        return None

    full: dict[str, set[str]] = defaultdict(set)
    for u, v in edges:
        full[u].add(v)
    for (u, v), where in sorted(edges.items()):
        why = rule_broken(u, v)
        if why and (u, v) not in pending:
            problems.append(f"{why}: {', '.join(where)}")
    allowed: dict[str, set[str]] = defaultdict(set)
    for u, v in edges:
        if (u, v) not in pending:
            allowed[u].add(v)
    for comp in _cycles(allowed):
        inside = [
            f"{u} -> {v} ({', '.join(where)})"
            for (u, v), where in sorted(edges.items())
            if u in comp and v in comp and (u, v) not in pending
        ]
        problems.append(f"import cycle {' <-> '.join(comp)}: " + "; ".join(inside))
    for u, v in sorted(pending):
        if (u, v) not in edges:
            problems.append(f"pending edge {u} -> {v} is gone: remove it from PENDING_EDGES")
        elif not rule_broken(u, v) and not _reaches(full, v, u):
            problems.append(
                f"pending edge {u} -> {v} breaks no rule (no layer, no cycle): remove it "
                "from PENDING_EDGES"
            )
    return problems


# --- the package ----------------------------------------------------------------------------

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def edges():
    return import_edges(SRC, "edgetrain")


def test_the_layer_table_names_every_unit_once():
    core = [u for units in CORE_LAYERS for u in units]
    assert len(core) == len(set(core)) and not set(core) & set(OUTER)
    on_disk = {
        p.stem if p.is_file() else p.name
        for p in (SRC / "edgetrain").iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()
    }
    assert on_disk - set(core) - set(OUTER) == set(), "place the new units in the table"


def test_edgetrain_has_no_import_cycle_and_respects_its_layers(edges):
    problems = layer_violations(edges, CORE_LAYERS, OUTER, PENDING_EDGES)
    assert not problems, "\n".join(problems)


# --- the checker, on a package it must reject -----------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


TOY_LAYERS = (("low",), ("mid",))
TOY_OUTER = ("app", "side")


def test_the_checker_finds_a_cycle_a_core_to_outer_edge_and_a_layer_inversion(tmp_path):
    _write(
        tmp_path / "toy",
        {
            "__init__.py": "from toy import app  # the root is no unit\n",
            "low.py": "def f():\n    from toy.mid import g  # inside a function\n",
            "mid/__init__.py": "from . import helpers\n",
            "mid/helpers.py": "from ..app import main\n",  # relative, two levels up
            "app.py": "import toy.low\nLAZY = 'toy.side:run'\n",  # a lazy string import
            "side.py": "import os\n",
        },
    )
    edges = import_edges(tmp_path, "toy")
    assert set(edges) == {("low", "mid"), ("mid", "app"), ("app", "low"), ("app", "side")}
    assert edges[("mid", "app")] == ["mid/helpers.py:1"]
    assert edges[("low", "mid")] == ["low.py:2"]
    problems = layer_violations(edges, TOY_LAYERS, TOY_OUTER)
    assert any(p.startswith("core unit 'low' (layer 0) imports 'mid' (higher") for p in problems)
    assert any(p.startswith("core unit 'mid' imports outer unit 'app'") for p in problems)
    assert any(p.startswith("import cycle app <-> low <-> mid") for p in problems)
    assert len(problems) == 3  # app -> side and app -> low are fine


def test_pending_edges_are_allowed_only_while_they_exist_and_break_a_rule(tmp_path):
    _write(
        tmp_path / "toy",
        {
            "__init__.py": "",
            "low.py": "import toy.mid\n",
            "mid.py": "import toy.low\n",
            "app.py": "import toy.low\n",
            "side.py": "",
        },
    )
    edges = import_edges(tmp_path, "toy")
    # low -> mid inverts the layers and closes the cycle low <-> mid: pending, it passes
    assert layer_violations(edges, TOY_LAYERS, TOY_OUTER, {("low", "mid")}) == []
    assert len(layer_violations(edges, TOY_LAYERS, TOY_OUTER)) == 2  # inversion and cycle
    # an edge that is gone, and one that breaks no rule, must leave the pending set
    problems = layer_violations(
        edges, TOY_LAYERS, TOY_OUTER, {("low", "mid"), ("side", "low"), ("app", "low")}
    )
    assert problems == [
        "pending edge app -> low breaks no rule (no layer, no cycle): remove it from PENDING_EDGES",
        "pending edge side -> low is gone: remove it from PENDING_EDGES",
    ]
    # a unit missing from the table is named
    _write(tmp_path / "toy", {"extra.py": "import toy.low\n"})
    problems = layer_violations(import_edges(tmp_path, "toy"), TOY_LAYERS, TOY_OUTER)
    assert "unit 'extra' is in neither CORE_LAYERS nor OUTER: place it" in problems


def test_an_outer_to_outer_edge_on_a_cycle_is_still_a_cycle(tmp_path):
    _write(
        tmp_path / "toy",
        {"__init__.py": "", "app.py": "from toy import side\n", "side.py": "import toy.app\n"},
    )
    problems = layer_violations(import_edges(tmp_path, "toy"), TOY_LAYERS, TOY_OUTER)
    assert problems == [
        "import cycle app <-> side: app -> side (app.py:1); side -> app (side.py:1)"
    ]
