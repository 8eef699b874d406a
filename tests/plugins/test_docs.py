"""docs/plugins.md documents every hook align calls, with its real signature."""

import inspect
import re

import pytest

from align.plugins import hookspecs
from tests.conftest import REPO

DOC = (REPO / "docs" / "plugins.md").read_text()


def hookspec_names():
    return sorted(
        name
        for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(function, "align_spec")
    )


def test_the_hookspecs_are_found():
    assert {"register_objectives", "register_evaluators", "register_gates", "on_run_end"} <= set(
        hookspec_names()
    )


@pytest.mark.parametrize("name", hookspec_names())
def test_every_hookspec_has_a_section_with_its_signature(name):
    params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
    heading = f"### `{name}({params})`"
    assert heading in DOC, f"docs/plugins.md lacks the section {heading!r}"
    section = DOC.split(heading, 1)[1].split("\n### ", 1)[0]
    assert "```python" in section and f"def {name}(" in section, f"{name}: the section needs an example"


@pytest.mark.parametrize("name", hookspec_names())
def test_every_hookspec_documents_each_argument(name):
    function = getattr(hookspecs, name)
    doc = inspect.getdoc(function) or ""
    missing = [p for p in inspect.signature(function).parameters if f":param {p}:" not in doc]
    assert not missing, f"align/plugins/hookspecs.py: {name} lacks ':param x:' for {', '.join(missing)}"


def test_the_documented_fixtures_exist():
    import align.testing

    for fixture in re.findall(r"^\| `(\w+)` \|", DOC, flags=re.MULTILINE):
        assert hasattr(align.testing, fixture), (
            f"docs/plugins.md names align.testing.{fixture}, which is gone"
        )
