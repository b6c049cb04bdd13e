"""The package's folders are its layers, and imports go one way: a folder imports only the folders below it
(docs/architecture.md draws the graph). Read from the source with ast, so that a lazy import inside a function
counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import cascadenet

PACKAGE = Path(cascadenet.__file__).parent

# folder -> the folders it may import (besides itself). Top-level modules: __init__ (the public names) and
# __main__ may import anything; utils imports nothing of the package.
ALLOWED = {
    "utils": set(),
    "models": {"utils"},
    "data": {"utils"},
    "runs": {"utils", "models", "data"},
    "evaluation": {"utils", "models", "data", "runs"},
    "training": {"utils", "models", "data", "runs", "evaluation"},
    "properties": {"utils", "models", "data", "runs", "evaluation"},
    "deployment": {"utils", "models", "data", "runs", "evaluation"},
    "experiments": {"utils", "models", "data", "runs", "evaluation", "training", "properties"},
    "cli": {"utils", "models", "data", "runs", "evaluation", "training", "properties", "deployment", "experiments"},
}


def _layer(module: str) -> str | None:
    """The folder of a dotted module under cascadenet (None for the top-level package modules)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "cascadenet" else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import of the package in a source file."""
    here = list(path.relative_to(PACKAGE.parent).parts[:-1])  # the package the file is in: what "." means
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            found += [(node.lineno, n) for n in names if n.startswith("cascadenet")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("cascadenet")]
    return found


def test_every_folder_is_a_known_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders <= set(ALLOWED), f"a new folder needs its place in ALLOWED: {sorted(folders - set(ALLOWED))}"
    loose = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert not loose, f"modules outside the layer folders: {sorted(loose)}"


def test_imports_go_down_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1:  # cascadenet/__init__.py, __main__.py
            continue
        layer = parts[0]
        for line, module in _imports(path):
            target = _layer(module)
            if target not in (None, layer) and target not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({layer}) imports {module} ({target})")
            if target is None and module == "cascadenet" and layer != "cli":
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports the top-level package")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_checker_sees_relative_and_lazy_imports(tmp_path):
    # the test above would pass vacuously if _imports missed relative imports: check it on this package's own file
    found = {m for _, m in _imports(PACKAGE / "training" / "loop.py")}
    assert "cascadenet.training.optim" in found and "cascadenet.runs.config" in found
    found = {m for _, m in _imports(PACKAGE / "evaluation" / "evaluate.py")}
    assert "cascadenet.evaluation.metrics" in found
