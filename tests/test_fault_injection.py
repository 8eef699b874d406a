"""Each file of a run directory damaged in turn: eval, compare, report and --resume refuse with
one line or recover, and write nothing outside the run directory.

One real run on the tiny model, stopped (as Ctrl-C stops it) after its first topic of two, so a
resume has work left. For every file in it, a copy of the run has that file cut in half, deleted,
overwritten in the middle with bytes that are no text, or replaced by a link to a file outside the
run; then the four commands that read a run are run on the copy.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from align import hookimpl
from align.cli import cli
from tests.conftest import write_topic

#: Every file the stopped run holds (a checkpoint adapter's number is found at run time).
FILES = [
    "config.yaml",
    "topics.json",
    "metrics.jsonl",
    "summary.json",
    ".lock",
    "checkpoint/state.json",
    "checkpoint/adapter-*.safetensors",
    "adapters/first/adapter_model.safetensors",
    "adapters/first/adapter_config.json",
    "adapters/first/README.md",
]
DAMAGES = ["truncate", "delete", "corrupt", "link"]


class StopAtSecondTopic:
    """Stops the run as Ctrl-C does, as the second topic starts."""

    @hookimpl
    def on_topic_start(self, topic, index, total):
        if index == 1:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_model_dir):
    import align.plugins.manager

    base = tmp_path_factory.mktemp("fault-injection")
    topics = base / "topics"
    topics.mkdir()
    write_topic(topics, "first")
    write_topic(topics, "second")
    config = base / "config.yaml"
    protocol = [
        {"name": "before", "evaluate": ["quiz"]},
        {"name": "sft", "train": "sft"},
        {"name": "after_sft", "evaluate": ["quiz"]},
    ]
    settings = {"seed": 0, "lora": {"alpha": 32.0}, "sft": {"epochs": 1, "cloze": 0}, "protocol": protocol}
    config.write_text(yaml.safe_dump({**settings, "replay": {"content": 0}}))
    run = base / "run"
    args = ["run", str(config), "--model", str(tiny_model_dir), "--topics", str(topics), "--output", str(run)]
    original = align.plugins.manager.load_plugins
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            align.plugins.manager,
            "load_plugins",
            lambda **kwargs: original(**{**kwargs, "extra": [StopAtSecondTopic()]}),
        )
        result = CliRunner().invoke(cli, args, env={"ALIGN_LOAD_PLUGINS": ""})
    assert result.exit_code == 130, result.output
    return run


def contents(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file under ``root`` (not below ``skip``) as a digest, links as their target."""
    found = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.is_symlink():
            found[str(path)] = f"-> {path.readlink()}"
        elif path.is_file():
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def test_the_list_names_every_file_of_the_run(stopped_run):
    present = {str(p.relative_to(stopped_run)) for p in stopped_run.rglob("*") if p.is_file()}
    named = {next(stopped_run.glob(name)).relative_to(stopped_run).as_posix() for name in FILES}
    assert present == named


def damage(path: Path, how: str, outside: Path) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "delete":
        path.unlink()
    elif how == "corrupt":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + b"\xff\xfe\x00\x80" * 4 + data[middle + 16 :])
    else:
        path.unlink()
        path.symlink_to(outside)


def one_line_or_recovered(result, where: str) -> None:
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{where}: traceback\n{result.output}") from result.exception
    if result.exit_code == 0:
        return
    lines = [line for line in result.stderr.splitlines() if line and not line.startswith("Warning: ")]
    assert result.exit_code in (1, 2), f"{where}: exit {result.exit_code}\n{result.output}"
    assert len(lines) == 1 and lines[0].startswith("Error: "), f"{where}\n{result.stderr}"


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_file_is_refused_in_one_line_or_recovered_from(
    stopped_run, tiny_model_dir, tmp_path, monkeypatch, name, how
):
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    outside = tmp_path / "outside" / "secret.txt"
    outside.parent.mkdir()
    outside.write_text("not the run's\n")
    pristine = tmp_path / "pristine"
    shutil.copytree(stopped_run, pristine, symlinks=True)
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run, symlinks=True)
    damage(next(run.glob(name)), how, outside)
    before = contents(tmp_path, skip=run)
    model_before = contents(tiny_model_dir)

    runner = CliRunner()
    commands = [
        ["eval", "--adapter", str(run / "adapters" / "first"), "--evaluators", "quiz"],
        ["compare", str(pristine), str(run)],
        ["report", str(run), "--no-samples"],
        ["run", "--resume", str(run), "--quiet"],
    ]
    for args in commands:
        one_line_or_recovered(runner.invoke(cli, args), f"{name} ({how}): align {' '.join(args[:1])}")
        assert contents(tmp_path, skip=run) == before, (
            f"{name} ({how}): align {args[0]} wrote outside the run"
        )
    assert outside.read_text() == "not the run's\n"
    assert contents(tiny_model_dir) == model_before
