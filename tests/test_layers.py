"""The layer contract: gradlm's modules import one way, from higher layers to lower ones, and never in a circle.

Every import statement in the package counts, at module level or inside a function (a lazy import is still
a dependency). Adding a module means placing it in a layer here; the test fails until it is placed.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import gradlm

PACKAGE = Path(gradlm.__file__).parent

# Lowest first: the package tree is the layers (pyproject.toml's import-linter contracts say the same, and
# `make lint` checks them). A module may import modules of its own layer and of the layers before it, except
# that the two sides of the product, training and inference, never import each other.
LAYERS: dict[str, set[str]] = {
    "foundation": {"errors", "layout", "files", "runtime"},
    "text": {"text"},
    "model": {"model"},
    "runs": {"plots", "rundir"},
    "inference": {"generation"},
    "training": {"training"},
    "evaluation": {"evaluation"},
    "formats": {"formats"},
    "serving": {"serving"},
    "cli": {"cli", "__main__"},
}
SIBLINGS = {frozenset({"training", "inference"}), frozenset({"training", "evaluation"})}
UNLAYERED = {"__init__"}  # the public API: it re-exports from every layer, lazily


def module_name(path: Path) -> str:
    """gradlm/training/trainer.py -> "training.trainer"; a package's __init__ is named by its package."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imports() -> dict[str, set[str]]:
    """Each module of the package (dotted, below gradlm) -> the package's modules it imports."""
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    out: dict[str, set[str]] = {}
    for path in paths:
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and node.module
                and node.module.split(".")[0] == "gradlm"
            ):
                base = node.module.partition(".")[2]
                found |= {f"{base}.{a.name}" if base else a.name for a in node.names} | ({base} if base else set())
            elif isinstance(node, ast.Import):
                found |= {a.name.partition(".")[2] for a in node.names if a.name.startswith("gradlm.")}
        me = module_name(path)
        out[me] = {m for m in found if m in known and PACKAGE.joinpath(*m.split(".")).is_dir() is False} - {me}
    return out


def layer_of() -> dict[str, int]:
    """Each module -> the index of its layer (a module is in the layer of its top-level package or name)."""
    tops = {top: i for i, names in enumerate(LAYERS.values()) for top in names}
    return {m: tops[m.split(".")[0]] for m in imports() if m.split(".")[0] in tops}


def test_every_module_has_a_layer():
    modules = set(imports()) - UNLAYERED
    placed = set(layer_of())
    assert not modules - placed, f"place these modules in a layer of tests/test_layers.py: {sorted(modules - placed)}"
    named = {top for names in LAYERS.values() for top in names}
    assert not named - {m.split(".")[0] for m in modules}, (
        f"no such modules any more: {sorted(named - {m.split('.')[0] for m in modules})}"
    )


def test_imports_go_down_the_layers():
    names, where = list(LAYERS), layer_of()
    wrong = []
    for m, deps in imports().items():
        if m in UNLAYERED:
            continue
        for d in deps:
            a, b = where[m], where[d]
            if b > a or frozenset({names[a], names[b]}) in SIBLINGS and a != b:
                wrong.append(f"{m} ({names[a]}) imports {d} ({names[b]})")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_circles():
    graph = {m: d for m, d in imports().items() if m not in UNLAYERED}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            circle = visit(m)
            assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_contract_test_sees_a_violation(tmp_path, monkeypatch):
    """The checks above can fail: a model that imports the trainer breaks both rules."""
    shutil.copytree(PACKAGE, tmp_path / "gradlm", ignore=shutil.ignore_patterns("static", "__pycache__"))
    model = tmp_path / "gradlm" / "model" / "transformer.py"
    model.write_text(
        model.read_text(encoding="utf-8") + "\nfrom gradlm.training.trainer import train\n", encoding="utf-8"
    )
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "gradlm")
    graph = imports()
    assert "training.trainer" in graph["model.transformer"]
    try:
        test_imports_go_down_the_layers()
    except AssertionError as e:
        assert "model.transformer (model) imports training.trainer (training)" in str(e)
    else:
        raise AssertionError("an upward import went unnoticed")
