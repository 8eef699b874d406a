"""What the README's Security section promises, checked against the code and a real run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import REPO

SOURCES = sorted((REPO / "align").rglob("*.py"))

#: Calls that run code or unpickle data; none may appear in align's sources.
FORBIDDEN_CALLS = {
    "eval",
    "exec",
    "compile",
    "__import__",
    "pickle.load",
    "pickle.loads",
    "torch.load",
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
    "marshal.loads",
}
FORBIDDEN_IMPORTS = {"pickle", "marshal", "shelve", "dill", "cloudpickle"}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return "?"


def findings(source: Path, root: Path = REPO) -> list[str]:
    tree = ast.parse(source.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        where = f"{source.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            if name in FORBIDDEN_CALLS:
                found.append(f"{where}: calls {name}")
            keywords = {keyword.arg for keyword in node.keywords}
            if name.endswith("ModelForCausalLM.from_pretrained") and not keywords & {
                "use_safetensors",
                "gguf_file",  # a GGUF file is not pickle
            }:
                found.append(f"{where}: {name} without use_safetensors=True")
            for keyword in node.keywords:
                # Passed on from the user's config is fine; a literal other than False is not.
                if (
                    keyword.arg == "trust_remote_code"
                    and isinstance(keyword.value, ast.Constant)
                    and keyword.value.value is not False
                ):
                    found.append(f"{where}: trust_remote_code={ast.unparse(keyword.value)}")
                if keyword.arg in ("safe_serialization", "use_safetensors") and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is True
                ):
                    found.append(f"{where}: {keyword.arg}={ast.unparse(keyword.value)}")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
            for module in modules:
                if (module or "").split(".")[0] in FORBIDDEN_IMPORTS:
                    found.append(f"{where}: imports {module}")
    return found


def test_the_scan_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport yaml\neval('1')\nyaml.load('a')\nf(trust_remote_code=True)\n"
        "m.save_pretrained(d, safe_serialization=False)\nmodel.eval()\n"
        "AutoModelForCausalLM.from_pretrained(p)\n"
    )
    found = sorted(findings(bad, tmp_path), key=lambda f: int(f.split(":")[1]))
    assert [f.split(": ", 1)[1] for f in found] == [
        "imports pickle",
        "calls eval",
        "calls yaml.load",
        "trust_remote_code=True",
        "safe_serialization=False",
        "AutoModelForCausalLM.from_pretrained without use_safetensors=True",
    ]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_code_runs_from_data_and_no_pickle_is_loaded(source):
    assert findings(source) == []


def test_remote_code_is_off_by_default():
    from align.core.config import BASE_DEFAULTS

    assert BASE_DEFAULTS["model"]["trust_remote_code"] is False
