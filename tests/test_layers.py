"""The import graph points one way: the run layer (``harness.runs``) uses the editors, the
lm-eval models and the tasks, and nothing below it imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

import harness

PACKAGE = Path(harness.__file__).parent
# modules above the run layer: the command line dispatches to it
ABOVE = {"cli.py"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def imported_modules(source: str, module: str) -> set[str]:
    """Every module ``source`` (the text of ``module``) imports, relative imports resolved."""
    tree = ast.parse(source)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                parts = module.split(".")[:-node.level]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def below_the_run_layer() -> list[Path]:
    runs = PACKAGE / "runs"
    return [p for p in PACKAGE.rglob("*.py") if runs not in p.parents and p.name not in ABOVE]


def test_nothing_below_the_run_layer_imports_it():
    modules = below_the_run_layer()
    assert any(p.parent.name == "editors" for p in modules) and any("tasks" in p.parts for p in modules)
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in imported_modules(p.read_text(), module_name(p))
                                                     if n == "harness.runs" or n.startswith("harness.runs."))
                 for p in modules}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_check_sees_every_way_of_importing():
    """The check above would pass on imports it cannot read: here each form is caught, inside a
    function too."""
    forms = ["import harness.runs.driver", "from harness.runs import report", "from harness import runs",
             "from ..runs.config import RunConfig", "def f():\n    from .. import runs"]
    for form in forms:
        names = imported_modules(form + "\n", "harness.tasks.probe")
        assert any(n == "harness.runs" or n.startswith("harness.runs.") for n in names), form
    assert not any(n.startswith("harness.runs") for n in imported_modules("import harness.editors\n", "harness.x"))
