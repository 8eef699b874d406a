"""Reading a config, topics and a plan, and the CLI up to ``align --help``, import no heavy library.

``align validate`` and ``align --help`` must stay instant, and align.core must not need a GPU
stack to check a config: torch, transformers, peft, trl and accelerate are imported only by what
trains, scores or loads a model. Each module is imported in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

HEAVY = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
if sys.argv[1] == "align.cli":
    from align.cli import main
    sys.argv = ["align", "--help"]
    try:
        main()
    except SystemExit:
        pass
heavy = {heavy!r}
print(json.dumps([name for name in heavy if name in sys.modules]))
"""


@pytest.mark.parametrize(
    "module",
    [
        "align",
        "align.compat",
        "align.core.config",
        "align.core.topics",
        "align.core.plan",
        "align.cli",
        # the packages the CLI's commands import: their modules load the heavy libraries only when called
        "align.tools",
        "align.report",
    ],
)
def test_importing_imports_no_heavy_library(module):
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), module],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing {module} imported {', '.join(loaded)}"
