"""The layer contract: gradlm's modules import one way, from higher layers to lower ones, and never in a circle.

Every import statement in the package counts, at module level or inside a function (a lazy import is still
a dependency). Adding a module means placing it in a layer here; the test fails until it is placed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import gradlm

PACKAGE = Path(gradlm.__file__).parent

# Lowest first. A module may import modules of its own layer and of the layers before it, except that the
# two sides of the product, training and inference, never import each other.
LAYERS: dict[str, set[str]] = {
    "foundation": {"errors", "layout", "checkpoint", "typos", "runtime"},
    "text": {"tokenizer", "datasets", "corpus", "chat", "prepare", "data", "sft", "robust"},
    "model": {"model", "lora", "infer", "sampling", "constrain"},
    "runs": {"rundir", "plots", "scoring", "trackers"},
    "training": {"optim", "config", "budget", "monitor", "autosize", "resume", "trainer", "finetune", "lab", "sweep"},
    "inference": {"engine", "generate", "session", "evaluate"},
    "interop": {"interop", "llamacpp"},
    "serving": {"webserver", "openai_api", "serve", "watch"},
    "cli": {"cli", "__main__"},
}
SIBLINGS = {frozenset({"training", "inference"})}
UNLAYERED = {"__init__"}  # the public API: it re-exports from every layer, lazily


def imports() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports."""
    out: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "gradlm":
                parts = node.module.split(".")
                found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("gradlm.")}
        out[path.stem] = {m for m in found if (PACKAGE / f"{m}.py").is_file()} - {path.stem}
    return out


def layer_of() -> dict[str, int]:
    return {m: i for i, mods in enumerate(LAYERS.values()) for m in mods}


def test_every_module_has_a_layer():
    modules = set(imports()) - UNLAYERED
    placed = set(layer_of())
    assert not modules - placed, f"place these modules in a layer of tests/test_layers.py: {sorted(modules - placed)}"
    assert not placed - modules, f"no such modules any more: {sorted(placed - modules)}"


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
    for p in PACKAGE.glob("*.py"):
        (tmp_path / p.name).write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "model.py").write_text((PACKAGE / "model.py").read_text(encoding="utf-8") + "\nfrom gradlm.trainer import train\n", encoding="utf-8")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    graph = imports()
    assert "trainer" in graph["model"]
    try:
        test_imports_go_down_the_layers()
    except AssertionError as e:
        assert "model (model) imports trainer (training)" in str(e)
    else:
        raise AssertionError("an upward import went unnoticed")
