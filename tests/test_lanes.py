"""The two test lanes: a bare `python -m pytest` leaves out the marked tests, and the README's test
command, which .ci/run runs verbatim, selects every test."""

import re
import shlex
import subprocess
import sys

from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
#: Files holding both marked and unmarked tests, small enough to collect in a child process.
SAMPLE = ["tests/test_benchmarks.py", "tests/plugins/test_scaffold.py"]


def readme_test_command() -> str:
    """The README's second command: install the dev extras and run the whole suite."""
    return re.findall(r"```bash\n(.*?)\n```", README, flags=re.DOTALL)[1]


def collected(*args: str) -> list[str]:
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args, *SAMPLE],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert completed.returncode in (0, 5), completed.stdout + completed.stderr  # 5: none selected
    return [line for line in completed.stdout.splitlines() if "::" in line]


def test_ci_runs_the_readme_test_command_verbatim():
    assert readme_test_command() in (REPO / ".ci" / "run").read_text().splitlines()


def test_the_readme_command_selects_every_test_and_the_bare_lane_leaves_the_marked_ones_out():
    command = readme_test_command()
    assert command.count("python -m pytest") == 1
    readme_args = shlex.split(command.split("python -m pytest", 1)[1])
    everything = collected("-o", "addopts=")  # as if pyproject.toml selected nothing away
    bare = collected()
    assert collected(*readme_args) == everything
    assert set(bare) < set(everything)
    assert (
        "tests/plugins/test_scaffold.py::test_new_plugin_refuses_a_bad_name_or_an_existing_directory" in bare
    )
    assert not [test for test in bare if "test_benchmarks" in test or "installs_and_its_tests_pass" in test]
