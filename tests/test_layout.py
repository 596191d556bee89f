"""The package's layout, read from its source with ``ast`` (nothing is imported).

Every ``import`` and ``from ... import`` of every module of ``ppn_bayes/`` counts, those
inside functions and under ``TYPE_CHECKING`` included:

* the import graph of ``ppn_bayes`` has no cycle;
* no name starting with ``_`` is imported from another ``ppn_bayes`` module;
* no module imports from a higher layer than its own (:data:`LAYERS`, written down in
  ``docs/architecture.md``, which names every module).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ppn_bayes"
ARCHITECTURE_PAGE = PACKAGE.parent / "docs" / "architecture.md"

#: Each module's layer, lowest first, by its longest listed prefix (the package root only
#: by itself). A module imports from its own layer or a lower one, never a higher one.
LAYERS: dict[str, int] = {
    # 0, core: the method's mathematics
    "ppn_bayes.core": 0, "ppn_bayes.version": 0, "ppn_bayes.resources": 0,
    # 1, foundation: files, tokens, LMs, processes
    "ppn_bayes.io": 1, "ppn_bayes.data": 1, "ppn_bayes.store": 1, "ppn_bayes.lm": 1, "ppn_bayes.records": 1,
    "ppn_bayes.distributed": 1, "ppn_bayes.optim_state": 1, "ppn_bayes.transfer": 1,
    # 2, the wings (peers)
    "ppn_bayes.train": 2, "ppn_bayes.deploy": 2, "ppn_bayes.decode": 2, "ppn_bayes.inspect": 2,
    # 3, applications
    "ppn_bayes.demo": 3, "ppn_bayes.cli": 3,
    # 4, the public names: nothing inside the package imports them
    "ppn_bayes": 4, "ppn_bayes.__main__": 4, "ppn_bayes.fit": 4, "ppn_bayes.posterior": 4,
}
LAYER_NAMES = ("core", "foundation", "wings", "applications", "public names")


def layer_of(name: str, layers: dict[str, int] = LAYERS) -> int | None:
    """The layer of the longest prefix of ``name`` that ``layers`` lists (None if none is)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in layers and (end == len(parts) or end > 1):
            return layers[prefix]
    return None


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int] = LAYERS) -> list[str]:
    """Every import of a module from a higher layer than its own, as a sentence."""
    return [f"{name} ({LAYER_NAMES[layer_of(name, layers)]}) imports {target} "
            f"({LAYER_NAMES[layer_of(target, layers)]})"
            for name, targets in sorted(graph.items()) for target in sorted(targets)
            if None not in (layer_of(name, layers), layer_of(target, layers))
            and layer_of(target, layers) > layer_of(name, layers)]


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package (a package is its ``__init__``)."""
    found = {}
    for file in sorted(package.rglob("*.py")):
        parts = list(file.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = file
    return found


def imports(name: str, file: Path, known: set[str]) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import of a ppn_bayes module in ``file``.

    ``from package import submodule`` counts as an import of the submodule; relative
    imports are resolved against the module's own package.
    """
    package = name.split(".") if file.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.split(".")[0] == "ppn_bayes"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "ppn_bayes":
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in known:
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((source, alias.name, node.lineno))
    return found


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    known = set(files)
    return {name: {target for target, _, _ in imports(name, file, known) if target != name}
            for name, file in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def files() -> dict[str, Path]:
    return module_files()


def test_the_reader_sees_every_kind_of_import(tmp_path):
    """The parser itself: relative, absolute, submodule and in-function imports are all found."""
    pkg = tmp_path / "ppn_bayes"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import x\n")
    (pkg / "a.py").write_text("import ppn_bayes.sub.b\nx = 1\n")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import _y\n    from ppn_bayes import a\n")
    found = module_files(pkg)
    assert set(found) == {"ppn_bayes", "ppn_bayes.a", "ppn_bayes.sub", "ppn_bayes.sub.b"}
    graph = import_graph(found)
    assert graph == {"ppn_bayes": {"ppn_bayes.a"}, "ppn_bayes.a": {"ppn_bayes.sub.b"},
                     "ppn_bayes.sub": {"ppn_bayes.sub.b"}, "ppn_bayes.sub.b": {"ppn_bayes.a"}}
    assert imports("ppn_bayes.sub.b", found["ppn_bayes.sub.b"], set(found))[0] == ("ppn_bayes.a", "_y", 2)
    assert cycles(graph) == [["ppn_bayes.a", "ppn_bayes.sub.b"]]


def test_layers_are_read_by_longest_prefix_and_upward_imports_are_named():
    layers = {"ppn_bayes.sub": 0, "ppn_bayes.sub.top": 2, "ppn_bayes.a": 1, "ppn_bayes": 4}
    assert [layer_of(n, layers) for n in ("ppn_bayes.sub.b", "ppn_bayes.sub.top.x", "ppn_bayes", "ppn_bayes.z")] \
        == [0, 2, 4, None]
    graph = {"ppn_bayes": {"ppn_bayes.a"}, "ppn_bayes.a": {"ppn_bayes.sub.b", "ppn_bayes.sub.top"},
             "ppn_bayes.sub.b": {"ppn_bayes.a"}}
    assert upward_imports(graph, layers) == [
        "ppn_bayes.a (foundation) imports ppn_bayes.sub.top (wings)",
        "ppn_bayes.sub.b (core) imports ppn_bayes.a (foundation)",
    ]


def test_no_import_cycle(files):
    found = cycles(import_graph(files))
    assert not found, "import cycles among: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_private_name_imported_across_modules(files):
    known = set(files)
    offenders = [f"{name} (line {line}) imports {imported} from {source}"
                 for name, file in files.items()
                 for source, imported, line in imports(name, file, known)
                 if imported is not None and imported.startswith("_") and source != name]
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


def test_every_module_has_a_layer_and_a_line_in_the_architecture_page(files):
    unplaced = sorted(name for name in files if layer_of(name) is None)
    assert not unplaced, f"give these modules a layer in LAYERS and docs/architecture.md: {unplaced}"
    if not ARCHITECTURE_PAGE.is_file():
        pytest.skip("docs/architecture.md is absent")
    page = ARCHITECTURE_PAGE.read_text()
    missing = sorted(name for name in files if f"`{name}`" not in page)
    assert not missing, f"docs/architecture.md does not describe: {missing}"


def test_no_import_from_a_higher_layer(files):
    offenders = upward_imports(import_graph(files))
    assert not offenders, "imports from a higher layer:\n" + "\n".join(offenders)


def test_the_public_functions_are_not_shadowed_by_modules_of_the_same_name():
    """``ppn_bayes.fit`` (the function) survives importing the ``ppn_bayes.fit`` module later:
    a fresh process, since this one's import order is the test run's."""
    code = ("import types, ppn_bayes, ppn_bayes.fit, ppn_bayes.posterior, ppn_bayes.train\n"
            "from ppn_bayes import fit, resize\n"
            "assert not isinstance(fit, types.ModuleType) and not isinstance(resize, types.ModuleType)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
