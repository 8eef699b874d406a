"""pyproject.toml declares every library align imports, and the installed ones are inside its bounds.

The upper bounds are where tests/test_compat.py must be run again: a version past one fails here
first, naming the library, instead of failing somewhere deep in a run.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys

import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:
    tomllib = pytest.importorskip("tomli")

#: The distribution each imported top-level module comes from, where the names differ.
DISTRIBUTIONS = {"yaml": "pyyaml"}
#: Imported by align but not a dependency: ``pytest`` only by align.testing, the pytest plugin that
#: pytest itself loads; ``matplotlib`` by ``align report``'s plots, the ``report`` extra.
NOT_DEPENDENCIES = {"pytest": "dev", "matplotlib": "report"}


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def requirements() -> dict[str, Requirement]:
    parsed = (Requirement(line) for line in project()["dependencies"])
    return {requirement.name.lower(): requirement for requirement in parsed}


def imported_libraries() -> set[str]:
    """The top-level modules align's source imports that are not align's own or the standard library's."""
    found: set[str] = set()
    for path in (REPO / "align").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name != "align"}


def test_every_imported_library_is_declared():
    declared = requirements()
    extras = project()["optional-dependencies"]
    for module in sorted(imported_libraries()):
        distribution = DISTRIBUTIONS.get(module, module).lower()
        if module in NOT_DEPENDENCIES:
            extra = NOT_DEPENDENCIES[module]
            assert any(Requirement(r).name.lower() == distribution for r in extras[extra]), (module, extra)
            continue
        assert distribution in declared, f"align imports {module}: declare {distribution} in pyproject.toml"


def test_every_dependency_has_a_lower_bound_and_the_compat_ones_an_upper_bound():
    for name, requirement in requirements().items():
        operators = {spec.operator for spec in requirement.specifier}
        assert ">=" in operators, f"{name}: no lower bound"
        if name != "torch":  # the CPU wheel of any later torch must stay installable
            assert "<" in operators, f"{name}: no upper bound (the next major, where compat is re-checked)"


@pytest.mark.parametrize("name", sorted(requirements()))
def test_the_installed_version_is_inside_the_declared_bounds(name):
    requirement = requirements()[name]
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{name} is declared but not installed")
    release = installed.split("+", 1)[0]  # torch's 2.13.0+cpu
    assert requirement.specifier.contains(release, prereleases=True), (
        f"{name} {installed} is outside pyproject.toml's {requirement.specifier}: run tests/test_compat.py "
        "against it, fix align/compat.py where it fails, then move the bound"
    )
