import os

# Tests never reach a hub, and keep the libraries' progress bars out of the output.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TQDM_DISABLE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
