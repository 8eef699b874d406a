"""The compute threads a run takes and the warning when other align runs share the machine."""

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from align.cli import cli
from align.core import machine
from tests.conftest import write_topic


@pytest.fixture
def torch_threads():
    """Leave torch's thread count as the test found it (runs in this process set it)."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def ended_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_run_that_fits_the_cores_gets_no_warning():
    assert machine.crowding(2, [], 2) is None
    assert machine.crowding(1, [{"pid": 7, "threads": 1}], 2) is None


def test_runs_asking_for_more_threads_than_cores_are_told_how_to_share():
    message = machine.crowding(2, [{"pid": 4242, "threads": 2}], 2)
    assert "1 other align run is computing on this machine (pid 4242 (2 threads))" in message
    assert "4 threads on 2 cores" in message and "`--set threads=1`" in message
    two = machine.crowding(4, [{"pid": 1, "threads": 4}, {"pid": 2, "threads": 4}], 8)
    assert two.startswith("2 other align runs are") and "`--set threads=2`" in two


def test_the_running_file_lasts_as_long_as_the_run(tmp_path):
    with machine.registered(3, tmp_path):
        (entry,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
        assert entry["pid"] == os.getpid() and entry["threads"] == 3
        assert machine.others(tmp_path) == []  # this process is not another run
    assert list(tmp_path.glob("*.json")) == []


def test_other_runs_are_the_live_ones_and_ended_runs_files_are_removed(tmp_path):
    alive, gone, host = os.getppid(), ended_pid(), socket.gethostname()
    (tmp_path / f"{host}-{alive}.json").write_text(json.dumps({"pid": alive, "host": host, "threads": 2}))
    (tmp_path / f"{host}-{gone}.json").write_text(json.dumps({"pid": gone, "host": host, "threads": 2}))
    (tmp_path / "half-written.json").write_text("{")
    bad = {"pid": alive, "host": host, "threads": "many"}
    (tmp_path / f"{host}-bad.json").write_text(json.dumps(bad))  # not a run's file: not counted
    # a cache shared with another machine: its runs are not on these cores, and not ours to remove
    (tmp_path / f"elsewhere-{gone}.json").write_text(json.dumps({"pid": gone, "host": "elsewhere"}))
    assert [entry["pid"] for entry in machine.others(tmp_path)] == [alive]
    assert not (tmp_path / f"{host}-{gone}.json").exists()
    assert (tmp_path / f"elsewhere-{gone}.json").exists()


def test_a_cache_that_cannot_be_written_does_not_stop_a_run(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with machine.registered(2, blocked / "running"):
        pass
    assert machine.others(blocked / "running") == []


def test_threads_sets_torch_s_compute_threads(torch_threads):
    import torch

    from align.hf.loading import set_threads

    assert set_threads(1) == 1 == torch.get_num_threads()
    assert set_threads("auto") == 1  # auto leaves the count as it is


def test_align_run_warns_beside_another_run_and_takes_the_threads_it_is_given(
    tmp_path, tiny_model_dir, monkeypatch, torch_threads
):
    import torch

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    running = tmp_path / "cache" / machine.RUNNING_DIR
    running.mkdir(parents=True)
    other = os.getppid()
    other_file = running / f"{socket.gethostname()}-{other}.json"
    other_file.write_text(
        json.dumps({"pid": other, "host": socket.gethostname(), "threads": machine.cores()})
    )
    seen = []
    monkeypatch.setattr(machine, "registered", _recording(machine.registered, seen))
    (tmp_path / "topics").mkdir()
    write_topic(tmp_path / "topics", "alpha")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"protocol": [{"name": "after", "evaluate": ["quiz"]}]}))
    args = ["run", str(config), "--model", str(tiny_model_dir), "--topics", str(tmp_path / "topics")]
    result = CliRunner().invoke(
        cli, [*args, "--output", str(tmp_path / "a"), "--set", "threads=1"], env={"ALIGN_LOAD_PLUGINS": ""}
    )
    assert result.exit_code == 0, result.output
    assert f"Warning: 1 other align run is computing on this machine (pid {other} " in result.output
    # registered in align's cache with its own thread count, which torch computed with
    assert seen == [(1, 1, running)]
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["threads"] == 1
    assert list(running.glob(f"*-{os.getpid()}.json")) == []  # gone once the run ended
    other_file.unlink()
    torch.set_num_threads(1)
    quiet = CliRunner().invoke(cli, [*args, "--output", str(tmp_path / "b")], env={"ALIGN_LOAD_PLUGINS": ""})
    assert quiet.exit_code == 0 and "Warning" not in quiet.output, quiet.output


def _recording(registered, seen):
    def record(threads, directory):
        import torch

        seen.append((threads, torch.get_num_threads(), directory))
        return registered(threads, directory)

    return record
