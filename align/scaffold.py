"""``align new-plugin``: write a plugin package whose tests pass as generated.

The package is ``align-NAME`` (distribution) with module ``align_NAME``, registered under the
``align`` entry-point group, holding one working component of the chosen kind, tests that use
align's pytest fixtures, and a README, from the templates in ``align/templates/plugin/``. Files are written to a temporary directory and moved into
place at the end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

from align.core.rundir import staged_directory
from align.errors import AlignError

KINDS = ("evaluator", "objective", "gate")
_NAME = re.compile(r"[a-z][a-z0-9_-]*")  # matched whole: `$` would also accept a trailing newline


class ScaffoldError(AlignError):
    exit_code = 2


def new_plugin(name: str, kind: str, directory: str | Path = ".") -> Path:
    """Write the package for plugin ``name`` of ``kind`` under ``directory``; return its path."""
    if not _NAME.fullmatch(name):
        raise ScaffoldError(
            f"plugin name '{name}': use lower-case letters, digits, '-' or '_', starting with a letter "
            "(e.g. keyword-coverage)"
        )
    if kind not in KINDS:
        raise ScaffoldError(f"--kind '{kind}': use one of {', '.join(KINDS)}")
    component = name.replace("-", "_")
    taken = _taken(component)
    if taken:
        raise ScaffoldError(
            f"plugin name '{name}': '{component}' is {taken}; choose another name "
            f"(e.g. align new-plugin my-{name})"
        )
    values = {
        "name": name,
        "component": component,
        "module": f"align_{component}",
        "dist": f"align-{name}",
        "cls": _class_name(component, kind),
        "kind": kind,
        "hook": {
            "evaluator": "register_evaluators",
            "objective": "register_objectives",
            "gate": "register_gates",
        }[kind],
    }
    target = Path(directory) / values["dist"]
    if target.exists():
        raise ScaffoldError(f"{target}: already exists; choose another name or --dir")
    files = {
        "pyproject.toml": template("pyproject.toml"),
        "README.md": template("README-head.md") + template(f"README-{kind}.md"),
        f"src/{values['module']}/__init__.py": template(f"module-{kind}.py"),
        f"tests/test_{component}.py": template(f"test-{kind}.py") + template("test-installed.py"),
    }
    with staged_directory(target) as staging:
        for relative, text in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(Template(text).substitute(values), encoding="utf-8")
    return target


def _taken(component: str) -> str:
    """What ``component`` already names, or ``""``: a built-in component, which the installed
    package would replace for every run, or a base section of the config, which a component's
    params section would be read as (the plugin manager refuses to load such a component)."""
    from align.plugins.manager import build_registry, new_plugin_manager, register_builtins, reserved_names

    if component in reserved_names():
        return "a base section of the config"
    manager = new_plugin_manager()
    register_builtins(manager)
    registry = build_registry(manager)
    for kind in KINDS:
        if registry.get(kind, component) is not None:
            return f"align's built-in {kind}, which the installed package would replace"
    return ""


def _class_name(component: str, kind: str) -> str:
    """``keyword_coverage`` → ``KeywordCoverageEvaluator`` (no ``…EvaluatorEvaluator``)."""
    words = [part.capitalize() for part in component.split("_") if part]
    if not words or words[-1].lower() != kind:
        words.append(kind.capitalize())
    return "".join(words)


#: Where the files' templates are: package data (``align/templates/plugin/*.tmpl``), ``string.Template`` text.
TEMPLATES = ("templates", "plugin")


def template(name: str) -> str:
    """The text of the template ``name`` (``pyproject.toml``, ``module-gate.py`` …), from the package."""
    from importlib.resources import files

    return files("align").joinpath(*TEMPLATES, f"{name}.tmpl").read_text(encoding="utf-8")
