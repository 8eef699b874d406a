import os

# Tests never reach a hub, and keep the libraries' progress bars out of the output.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TQDM_DISABLE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from align.plugins.manager import load_plugins

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def plugins(monkeypatch):
    """Built-in plugins only: installed third-party plugins must not change test outcomes."""
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    return load_plugins()


@pytest.fixture
def registry(plugins):
    return plugins.registry


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from align.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def write_topic(directory: Path, name: str = "alpha", **fields) -> Path:
    """Write a small valid topic file and return its path."""
    import yaml

    from align.testing import make_topic

    data = make_topic(name=name, **fields).to_dict()
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def make_distribution(site, name, module_source, entry_point=None):
    """Install a plugin the way pip leaves it: a module and a dist-info with an `align` entry point."""
    (site / f"{name}.py").write_text(textwrap.dedent(module_source))
    info = site / f"{name}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[align]\n{entry_point or name} = {name}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("ALIGN_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("ALIGN_DISABLE_PLUGINS", raising=False)
    importlib.invalidate_caches()
    yield site
    for name in [m for m in sys.modules if m.startswith("align_")]:
        sys.modules.pop(name, None)
