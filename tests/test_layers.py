"""align.core imports no heavy library, not even inside a function: the model, the trainers and
the processes of a launch are align.hf's (docs/architecture.md, "Who may import what").

Every module under align/core/ is parsed (not imported) and each ``import``, ``from … import``
and ``importlib.import_module("…")`` / ``__import__("…")`` with a literal name is checked. Two
rules, each with its exceptions named here:

- no module imports torch, transformers, peft, trl, accelerate, safetensors or datasets, except
  ``sources.py``'s data-file readers, which read JSON Lines, CSV, Parquet and ``save_to_disk``
  files with ``datasets`` (a data library that loads no torch; they are the built-in topic
  sources, public as ``align.core.sources`` in docs/plugins.md);
- only ``runner.py`` (which builds the policy), ``distributed.py`` (which hands a multi-process
  launch's collectives to align.hf.processes) and ``model.py`` (the old import path's
  re-exports) import align.hf.
"""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO

HEAVY = ("torch", "transformers", "peft", "trl", "accelerate", "safetensors", "datasets")
#: (module, library) pairs allowed despite HEAVY, each with its reason in the docstring above.
ALLOWED_HEAVY = {("sources.py", "datasets")}
#: The align.core modules that may import align.hf (at the point of use, or as re-exports).
HF_IMPORTERS = {"runner.py", "distributed.py", "model.py"}

CORE = REPO / "align" / "core"
CORE_MODULES = sorted(path.name for path in CORE.glob("*.py"))


def imported_names(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in ``source``, wherever it is (a function body too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def layer_violations(module: str, source: str) -> list[str]:
    """What in ``source`` (the text of ``align/core/<module>``) breaks the rules, one line each."""
    problems = []
    for line, name in imported_names(source):
        top = name.split(".")[0]
        if top in HEAVY and (module, top) not in ALLOWED_HEAVY:
            problems.append(f"align/core/{module}:{line} imports {name}")
        if (name == "align.hf" or name.startswith("align.hf.")) and module not in HF_IMPORTERS:
            problems.append(f"align/core/{module}:{line} imports {name} (only {sorted(HF_IMPORTERS)} may)")
    return problems


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_imports_no_heavy_library(module):
    problems = layer_violations(module, (CORE / module).read_text(encoding="utf-8"))
    assert not problems, "; ".join(problems)


def test_every_core_module_is_checked():
    assert {"engine.py", "runner.py", "distributed.py", "sources.py", "model.py"} <= set(CORE_MODULES)


PLANTED = """
import json

def load():
    import numpy
    from torch.distributed import barrier
    return importlib.import_module("transformers")
"""


def test_the_check_finds_a_planted_import():
    assert layer_violations("engine.py", PLANTED) == [
        "align/core/engine.py:6 imports torch.distributed",
        "align/core/engine.py:7 imports transformers",
    ]
    assert layer_violations("engine.py", "import datasets\n") == ["align/core/engine.py:1 imports datasets"]
    assert layer_violations("sources.py", "import datasets\n") == []  # the one allowed use
    assert layer_violations("sources.py", "import safetensors\n") == [
        "align/core/sources.py:1 imports safetensors"
    ]


def test_the_check_finds_a_planted_import_of_align_hf():
    assert layer_violations("runner.py", "from align.hf.loading import load_model\n") == []
    assert layer_violations("engine.py", "def f():\n    from align.hf import policy\n") == [
        "align/core/engine.py:2 imports align.hf (only ['distributed.py', 'model.py', 'runner.py'] may)"
    ]


def test_align_hf_imports_its_libraries_inside_functions_only():
    """align.hf is what the core modules above import (runner, distributed), so it stays cheap to
    import: ``align --help`` and ``align validate`` load no torch (tests/test_light_imports.py)."""
    problems = []
    for path in sorted((REPO / "align" / "hf").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # module level only
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            problems += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in HEAVY]
    assert not problems, "; ".join(problems)
