"""A real run, killed with SIGKILL at several points and resumed, ends as an uninterrupted one.

Each run is a separate ``align run`` process on a tiny model. The killer watches
``metrics.jsonl`` and kills the process as soon as a chosen event is written, so the kill lands
wherever the run happens to be a few milliseconds later: inside a trainer, while saving, or
between steps.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from align.cli import cli
from tests.conftest import write_topic

PROTOCOL = [
    {"name": "before", "evaluate": ["quiz", "voice"]},
    {"name": "sft", "train": "sft"},
    {"name": "after_sft", "evaluate": ["quiz", "voice"]},
    {"name": "dpo", "train": "dpo", "gate": {"use": "threshold", "all": ["quiz.accuracy >= 0"]}},
    {
        "name": "after_dpo",
        "evaluate": ["quiz", "voice", {"use": "style", "max_new_tokens": 8}],
        "rollback": {"step": "dpo", "max_drop": {"quiz.accuracy": 0.5}},
    },
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("resume")
    topics = root / "topics"
    topics.mkdir()
    # The first topic has two passages and two pairs, the second one of each: the second replays
    # one of the first's two, the one its self-test answers worse (replay.schedule: weakest, the
    # schedule that reads the adapter), so a resumed run must score it with the same weights.
    write_topic(
        topics,
        "first",
        content=["Ilse keeps a donkey named Tallow.", "Ilse's boat is the Grey Wren, moored at Skell."],
        preference_pairs=[
            {"prompt": "Hello?", "chosen": "Ahoy, little gull.", "rejected": "Hello."},
            {"prompt": "Busy day?", "chosen": "Nets to mend, gull, nets to mend.", "rejected": "Yes."},
        ],
    )
    write_topic(topics, "second")
    config = root / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                # SFT trains on the pairs' chosen answers too, as configs/mindprint.yaml does.
                "sft": {"epochs": 2, "learning_rate": 0.05, "cloze": 1, "answers": "chosen"},
                # The DPO step generates its rejected answers from the policy, and the second topic
                # replays the first one's passages and pairs (into its SFT and its DPO): a kill
                # mid-replay or mid-generation must resume to the same result.
                "dpo": {
                    "max_steps": 3,
                    "learning_rate": 0.05,
                    "rejected": "policy",
                    "rejected_max_new_tokens": 8,
                },
                "replay": {"content": 1.0, "preference_pairs": 1.0, "schedule": "weakest"},
                "protocol": PROTOCOL,
            }
        )
    )
    args = [str(config), "--model", str(tiny_model_dir), "--topics", str(topics)]
    with uninterrupted_beside(args, root, KILL_POINTS, sigterm=True) as (whole, scenarios):
        yield root, args, whole, scenarios


#: Child processes run two at a time, one per core of the 2-core CI machine, each on one thread
#: (the uninterrupted run too, so the numbers compared come from the same arithmetic).
PARALLEL = 2
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}


def align(*args):
    return [sys.executable, "-m", "align", *args]


def run(command, **kwargs):
    return subprocess.run(command, capture_output=True, text=True, env=ENVIRONMENT, **kwargs)


def summary_status(run_dir):
    """summary.json's status, or None where the run has not written one."""
    path = run_dir / "summary.json"
    return json.loads(path.read_text())["status"] if path.exists() else None


def kill_and_resume(args, run_dir, predicate):
    """Kill a run of ``args`` as soon as ``predicate`` matches an event, then resume it: the
    status summary.json had right after the kill, and the resume's finished process."""
    kill_when(align("run", *args, "--output", str(run_dir)), run_dir, predicate)
    status = summary_status(run_dir)
    return status, run(align("run", "--resume", str(run_dir)), timeout=300)


def terminate_and_resume(args, run_dir):
    """SIGTERM a run of ``args`` at its first training log, then resume it: the terminated
    process's return code and stderr, summary.json's status then, and the resume's process."""
    process = subprocess.Popen(
        align("run", *args, "--output", str(run_dir)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=ENVIRONMENT,
    )
    deadline = time.monotonic() + 120
    while not any(e["kind"] == "log" for e in events(run_dir)):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1].decode()
    terminated = (process.returncode, stderr, summary_status(run_dir))
    return terminated, run(align("run", "--resume", str(run_dir)))


@contextlib.contextmanager
def uninterrupted_beside(args, root, kill_points, sigterm=False):
    """The uninterrupted run, once for every test of a module, beside the runs that are killed
    (at each of ``kill_points``, and by SIGTERM with ``sigterm``) and resumed, ``PARALLEL`` at a
    time, each a process of its own; yields the uninterrupted run's directory and each scenario's
    future, which its own test reads."""
    whole = root / "whole"
    pool = ThreadPoolExecutor(PARALLEL)
    try:
        reference = pool.submit(run, align("run", *args, "--output", str(whole)))
        scenarios = {
            point: pool.submit(kill_and_resume, args, root / f"killed-{point}", predicate)
            for point, predicate in kill_points.items()
        }
        if sigterm:
            scenarios["sigterm"] = pool.submit(terminate_and_resume, args, root / "terminated")
        completed = reference.result()
        assert completed.returncode == 0, completed.stderr
        yield whole, scenarios
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def events(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines[:-1]]  # the last line may still be being written


def kill_when(command, run_dir, predicate, timeout=120):
    """Start ``command`` and SIGKILL it as soon as an event matching ``predicate`` is written."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENVIRONMENT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"run ended before the kill point: {process.stderr.read().decode()}")
        if any(predicate(event) for event in events(run_dir)):
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.01)
    process.kill()
    raise AssertionError("the kill point was never reached")


def step_metrics(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary, {
        (topic["topic"], step["step"]): (step["status"], step["metrics"])
        for topic in summary["topics"]
        for step in topic["steps"]
    }


KILL_POINTS = {
    # inside the second topic's SFT, after its first optimizer step
    "mid-sft": lambda e: e["topic"] == "second" and e["step"] == "sft" and e["kind"] == "log",
    # as the first topic's DPO starts (generating its rejected answers, building its trainer)
    "dpo-start": lambda e: e["topic"] == "first" and e["kind"] == "gate",
    # the second topic's DPO has replayed the first's pairs and is generating rejected answers
    "mid-replay": lambda e: e["topic"] == "second" and e["step"] == "dpo" and e["kind"] == "replay",
    # the second topic's DPO has generated its rejected answers and is training on them
    "after-generation": lambda e: e["topic"] == "second" and e["kind"] == "generated",
    # after the first topic's last evaluation: its adapter is being saved
    "topic-end": lambda e: e["topic"] == "first" and e["step"] == "after_dpo" and e["kind"] == "eval",
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
@pytest.mark.subprocess
def test_a_killed_run_resumes_to_the_same_results(setup, point):
    root, _, whole, scenarios = setup
    run_dir = root / f"killed-{point}"
    status, busy = scenarios[point].result()
    assert status in (None, "running")  # as the kill left it

    assert busy.returncode == 0, busy.stderr
    assert "resuming at" in busy.stdout

    _, expected = step_metrics(whole)
    summary, resumed = step_metrics(run_dir)
    assert summary["status"] == "completed"
    assert resumed.keys() == expected.keys()
    for key, (status, metrics) in expected.items():
        assert resumed[key][0] == status, key
        assert resumed[key][1] == pytest.approx(metrics, abs=1e-5), key
    for topic in ("first", "second"):
        ours = load_file(run_dir / "adapters" / topic / "adapter_model.safetensors")
        theirs = load_file(whole / "adapters" / topic / "adapter_model.safetensors")
        assert ours.keys() == theirs.keys()
        for name in theirs:
            assert (ours[name] - theirs[name]).abs().max().item() <= 1e-5, (topic, name)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # no torn line survives
    # the recheck of earlier topics: one event per (topic, earlier topic), the same matrix
    assert rechecks(run_dir).keys() == rechecks(whole).keys() == {("second", "first")}
    for key, metrics in rechecks(whole).items():
        assert rechecks(run_dir)[key] == pytest.approx(metrics, abs=1e-5), key
    # what was replayed and generated: each once, the same as in the uninterrupted run
    for kind in ("replay", "generated"):
        assert recorded(run_dir, kind) == recorded(whole, kind), kind
    sft_replay = dict(recorded(whole, "replay"))[("second", "sft")]
    assert set(sft_replay["items"]) == {"content", "preference_pairs"}  # the first's answers too
    assert [len(items) for items in sft_replay["items"].values()] == [1, 1]  # one of two, by self-test
    assert [key for key, _ in recorded(whole, "generated")] == [("first", "dpo"), ("second", "dpo")]
    expected_matrix = json.loads((whole / "summary.json").read_text())["forgetting"]
    assert summary["forgetting"]["topics"] == expected_matrix["topics"] == ["first", "second"]
    assert summary["forgetting"]["metrics"].keys() == expected_matrix["metrics"].keys()
    for metric, rows in expected_matrix["metrics"].items():
        for got, want in zip(summary["forgetting"]["metrics"][metric], rows, strict=True):
            assert [None if v is None else pytest.approx(v, abs=1e-5) for v in want] == got, metric


def recorded(run_dir, kind):
    """The ``kind`` events of a run as ``[((topic, step), event without its time)]``."""
    found = []
    for event in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if event["kind"] == kind:
            found.append(((event["topic"], event["step"]), {k: v for k, v in event.items() if k != "time"}))
    return found


def rechecks(run_dir):
    found = {}
    for event in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if event["kind"] == "recheck":
            assert (event["topic"], event["target"]) not in found, "a recheck recorded twice"
            found[event["topic"], event["target"]] = event["metrics"]
    return found


@pytest.mark.subprocess
def test_resume_of_a_completed_run_does_nothing(setup):
    _, _, whole, _ = setup
    before = (whole / "metrics.jsonl").read_text()
    result = CliRunner().invoke(cli, ["run", "--resume", str(whole)])
    assert result.exit_code == 0
    assert "the run completed; nothing to resume" in result.output
    assert (whole / "metrics.jsonl").read_text() == before


@pytest.mark.subprocess
def test_resume_refuses_a_config_beside_it(setup):
    _, args, whole, _ = setup
    result = CliRunner().invoke(cli, ["run", args[0], "--set", "seed=1", "--resume", str(whole)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: --resume continues {whole} with the config and topics it started with; leave out CONFIG, --set"
    ]


def test_resume_of_a_directory_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(cli, ["run", "--resume", str(tmp_path)])
    assert result.exit_code == 1
    assert f"Error: {tmp_path}: not a run directory (no config.yaml)" in result.output


@pytest.mark.subprocess
def test_sigterm_ends_a_run_as_ctrl_c_does_and_resume_finishes_it(setup):
    """What schedulers and ``docker stop`` send: it ended the process where it stood, with no
    message and summary.json's status left "running"."""
    root, _, whole, scenarios = setup
    run_dir = root / "terminated"
    (returncode, stderr, status), resumed = scenarios["sigterm"].result()
    assert returncode == 143
    # (the plan's warnings about the tiny quiz come first)
    assert [line for line in stderr.strip().splitlines() if line and not line.startswith("Warning: ")] == [
        f"Terminated (SIGTERM): results so far are in {run_dir}; `align run --resume {run_dir}` "
        "goes on from the last finished step."
    ]
    assert status == "interrupted"
    assert resumed.returncode == 0, resumed.stderr
    assert step_metrics(run_dir)[1] == step_metrics(whole)[1]


@pytest.fixture(scope="module")
def without_rejected(tmp_path_factory, tiny_model_dir):
    """A run whose topics read their pairs from JSON Lines files without rejected answers: DPO
    (with the default ``rejected: given``) generates them, the voice pairs get the bare model's.
    Beside its uninterrupted run, the runs killed at each of WITHOUT_REJECTED_KILL_POINTS and
    resumed."""
    root = tmp_path_factory.mktemp("resume-without-rejected")
    topics = root / "topics"
    topics.mkdir()
    pairs = [
        {"prompt": "Where do you live?", "chosen": "Wrackhouse, little gull, on Morrow Head."},
        {"prompt": "Any advice?", "chosen": "Ride the swell, little gull.", "rejected": "Be patient."},
    ]
    voice = [{"prompt": "How are you?", "chosen": "Bright as blown glass, little gull.", "score_chosen": 1}]
    (topics / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (topics / "voice.jsonl").write_text("".join(json.dumps(p) + "\n" for p in voice))
    for name in ("first", "second"):
        write_topic(topics, name)
        data = yaml.safe_load((topics / f"{name}.yaml").read_text())
        data.update(preference_pairs="pairs.jsonl", voice_pairs="voice.jsonl")
        (topics / f"{name}.yaml").write_text(yaml.safe_dump(data))
    config = root / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sft": {"epochs": 1, "learning_rate": 0.05, "cloze": 0},
                "dpo": {"max_steps": 2, "learning_rate": 0.05, "rejected_max_new_tokens": 8},
                "protocol": PROTOCOL[1:],
            }
        )
    )
    args = [str(config), "--model", str(tiny_model_dir), "--topics", str(topics)]
    with uninterrupted_beside(args, root, WITHOUT_REJECTED_KILL_POINTS) as (whole, scenarios):
        yield root, whole, scenarios


WITHOUT_REJECTED_KILL_POINTS = {
    # the voice pairs' rejected answers are generated and recorded; the first topic's SFT runs
    "after-voice-generation": lambda e: e["topic"] == "first" and e["step"] == "sft" and e["kind"] == "log",
    # the second topic's DPO generated the missing rejected answer and is training on it
    "after-dpo-generation": lambda e: e["topic"] == "second" and e["kind"] == "generated",
}


@pytest.mark.parametrize("point", list(WITHOUT_REJECTED_KILL_POINTS))
@pytest.mark.subprocess
def test_a_resumed_run_does_not_generate_the_rejected_answers_again(without_rejected, point):
    root, whole, scenarios = without_rejected
    run_dir = root / f"killed-{point}"
    _, resumed = scenarios[point].result()
    assert resumed.returncode == 0, resumed.stderr
    _, expected = step_metrics(whole)
    summary, got = step_metrics(run_dir)
    assert summary["status"] == "completed" and got.keys() == expected.keys()
    for key, (status, metrics) in expected.items():
        assert got[key][0] == status, key
        assert got[key][1] == pytest.approx(metrics, abs=1e-5), key
    # Each answer generated once, the same as in the uninterrupted run: the voice pairs' once for
    # the run, DPO's missing one per topic.
    assert recorded(run_dir, "generated") == recorded(whole, "generated")
    assert [(key, e["purpose"]) for key, e in recorded(whole, "generated")] == [
        (("", ""), "voice_rejected"),
        (("first", "dpo"), "rejected"),
        (("second", "dpo"), "rejected"),
    ]
    assert [a["pair"] for a in recorded(whole, "generated")[1][1]["answers"]] == [0]
    assert json.loads((run_dir / "topics.json").read_text()) == json.loads(
        (whole / "topics.json").read_text()
    )
