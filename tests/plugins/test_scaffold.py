"""`align new-plugin`: the generated package installs, registers through its entry point, and its
own tests pass as generated."""

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from align.cli import cli


@pytest.mark.parametrize("kind", ["evaluator", "objective", "gate"])
@pytest.mark.subprocess
def test_generated_plugin_installs_and_its_tests_pass(tmp_path, kind):
    name = f"demo-{kind}"
    result = CliRunner().invoke(cli, ["new-plugin", name, "--kind", kind, "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    package = tmp_path / f"align-{name}"
    module = f"align_demo_{kind}"
    assert sorted(p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()) == [
        "README.md",
        "pyproject.toml",
        f"src/{module}/__init__.py",
        f"tests/test_demo_{kind}.py",
    ]
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    install = subprocess.run(
        [*pip, "--no-index", "--target", str(site), str(package)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    assert (site / module / "__init__.py").exists()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("ALIGN_LOAD_PLUGINS", None)
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert " passed" in tests.stdout and "skipped" not in tests.stdout and "failed" not in tests.stdout


def test_new_plugin_refuses_a_bad_name_or_an_existing_directory(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(cli, ["new-plugin", "My Plugin", "--dir", str(tmp_path)])
    assert bad.exit_code == 2
    assert "plugin name 'My Plugin': use lower-case letters" in bad.stderr
    assert list(tmp_path.iterdir()) == []
    assert runner.invoke(cli, ["new-plugin", "words\n", "--dir", str(tmp_path)]).exit_code == 2
    assert list(tmp_path.iterdir()) == []
    assert runner.invoke(cli, ["new-plugin", "words", "--dir", str(tmp_path)]).exit_code == 0
    again = runner.invoke(cli, ["new-plugin", "words", "--dir", str(tmp_path)])
    assert again.exit_code == 2
    assert "align-words: already exists" in again.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["align-words"]


@pytest.mark.parametrize("kind", ["evaluator", "objective", "gate"])
def test_the_templates_the_scaffold_reads_are_package_data(tmp_path, monkeypatch, kind):
    """Every template `align new-plugin` reads is in the package and matched by pyproject.toml's
    package-data, so a non-editable install (a wheel) has it too."""
    import fnmatch
    from importlib.resources import files

    import align.scaffold
    from tests.conftest import REPO

    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    read = []
    original = align.scaffold.template
    monkeypatch.setattr(align.scaffold, "template", lambda name: read.append(name) or original(name))
    align.scaffold.new_plugin(f"demo-{kind}", kind, tmp_path)
    assert read, "the scaffold read no template"
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "align"
    ]
    for name in read:
        relative = "/".join((*align.scaffold.TEMPLATES, f"{name}.tmpl"))
        assert (files("align") / relative).is_file(), relative
        assert any(fnmatch.fnmatch(relative, glob) for glob in globs), f"{relative}: not in package-data"
