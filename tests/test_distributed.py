"""A real run on two processes (CPU, gloo) against the same run on one, plus the façade's pieces.

The two runs see the same global batch: ``per_device_train_batch_size`` 1 on each of 2 processes
against 2 on one process, so each optimizer step averages the gradients of the same two
examples (accelerate's seeded sampler draws the same order in both). What may differ:

- SFT's loss is a token mean. One process averages over the tokens of both passages at once; two
  processes average per passage, and the trainer rescales by the tokens on all processes
  (``average_tokens_across_devices``), which gives the same number up to float rounding.
- Scoring batches hold other prompts on two processes than on one, so log-likelihoods differ in
  the last bits (different padding and matmul shapes).

Measured on the project's 2-core CPU machine (torch 2.13, transformers 5.24, TRL 1.16): metrics
differ by at most 1e-6, adapter weights by at most 5.1e-5 (after two topics, weights up to 0.46);
the test allows ``METRICS_TOLERANCE`` and ``ADAPTER_TOLERANCE``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file

from align.core import distributed
from tests.conftest import REPO
from tests.test_resume import PROTOCOL as RESUME_PROTOCOL

#: How far the 2-process run's metrics and adapter weights may be from the 1-process run's.
METRICS_TOLERANCE = 1e-5
ADAPTER_TOLERANCE = 2e-4

# The protocol of the kill-and-resume tests: every kind of step, a gate that passes, a guard.
PROTOCOL = RESUME_PROTOCOL


def topic(name: str) -> dict:
    """Four passages of different lengths, four quiz items, two preference and two voice pairs."""
    return {
        "name": name,
        "content": [
            f"Ilse Varrow keeps a {name} lamp.",
            f"The {name} tide turns twice a day at Morrow Head, and the gulls know it.",
            f"Wrackhouse has {name} shutters.",
            f"Every evening Ilse writes about the {name} weather in a blue notebook by the window.",
        ],
        "quiz": [
            {
                "question": f"What does Ilse keep ({name}, {i})?",
                "choices": ["a lamp", "a goat", "a boat"],
                "answer": 0,
            }
            for i in range(4)
        ],
        "preference_pairs": [
            {
                "prompt": f"Where do you live ({name})?",
                "chosen": "Wrackhouse, little gull.",
                "rejected": "A house.",
            },
            {
                "prompt": "What do you write?",
                "chosen": "The weather, little gull, always.",
                "rejected": "Notes.",
            },
        ],
        "voice_pairs": [
            {"prompt": "How are you?", "chosen": "Windblown, little gull.", "rejected": "Fine."},
            {"prompt": f"And the {name}?", "chosen": "Mind the tide.", "rejected": "It is fine."},
        ],
    }


def write_setup(root: Path, batch: int) -> Path:
    topics = root / "topics"
    topics.mkdir(parents=True, exist_ok=True)
    for name in ("first", "second"):
        (topics / f"{name}.yaml").write_text(yaml.safe_dump(topic(name)))
    config = root / f"batch{batch}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "seed": 0,
                "topics": "topics",
                # passages only (no clozes, no replay): the step counts below are 2 epochs of them
                "sft": {"epochs": 2, "learning_rate": 0.05, "per_device_train_batch_size": batch, "cloze": 0},
                "replay": {"content": 0.0},
                "dpo": {"max_steps": 3, "learning_rate": 0.05, "per_device_train_batch_size": batch},
                "protocol": PROTOCOL,
            }
        )
    )
    return config


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", ALIGN_LOAD_PLUGINS="", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("distributed")
    one, two = root / "one", root / "two"
    common = ["--model", str(tiny_model_dir)]
    single = subprocess.run(
        [sys.executable, "-m", "align", "run", str(write_setup(root, 2)), *common, "--output", str(one)],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free port of its own
            "--nproc_per_node",
            "2",
            "-m",
            "align",
            "run",
            str(write_setup(root, 1)),
            *common,
            "--output",
            str(two),
        ],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr
    return one, two, launched


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, "-m", "align", "run", *args],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=300,
    )


@pytest.fixture(scope="module")
def accelerated(runs, tiny_model_dir):
    """The two-process run again, through ``align run --launcher accelerate``."""
    _, two, _ = runs
    out = two.parent / "accelerated"
    config = two.parent / "batch1.yaml"
    command = [sys.executable, "-m", "align", "run", str(config), "--model", str(tiny_model_dir)]
    launched = subprocess.run(
        [*command, "--output", str(out), "--launcher", "accelerate", "--num-processes", "2"],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr
    return out, launched


def files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if ".scratch" not in p.parts}


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    return {(t["topic"], s["step"]): s for t in summary["topics"] for s in t["steps"]}


@pytest.mark.distributed
def test_two_processes_leave_the_run_directory_of_one(runs):
    one, two, launched = runs
    assert files(two) == files(one)
    # One writer: each event once, in the order of the one-process run (the logs aside).
    ours = [(e["topic"], e["step"], e["kind"], e.get("target")) for e in events(two) if e["kind"] != "log"]
    theirs = [(e["topic"], e["step"], e["kind"], e.get("target")) for e in events(one) if e["kind"] != "log"]
    assert ours == theirs
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))
    # One speaker: the table is printed once.
    assert launched.stdout.count("run directory:") == 1


def assert_same_results(ours: Path, theirs: Path) -> None:
    """``ours``, a run on two processes, left the run directory of ``theirs``, the one on one
    process, with the same steps, statuses and gate decisions, metrics to METRICS_TOLERANCE and
    adapters to ADAPTER_TOLERANCE."""
    assert files(ours) == files(theirs)
    expected, got = steps(theirs), steps(ours)
    assert got.keys() == expected.keys()
    for key, step in expected.items():
        assert got[key]["status"] == step["status"], key
        assert got[key].get("gate") == step.get("gate"), key
        assert got[key]["metrics"] == pytest.approx(step["metrics"], abs=METRICS_TOLERANCE), key
    assert_same_adapters(ours, theirs, ADAPTER_TOLERANCE)


@pytest.mark.distributed
def test_two_processes_measure_and_train_as_one(runs):
    one, two, _ = runs
    assert_same_results(two, one)
    # Evaluation before any training scores the same model: equal up to the last bits.
    expected, got = steps(one), steps(two)
    for topic_name in ("first", "second"):
        before = got[topic_name, "before"]["metrics"]
        assert before == pytest.approx(expected[topic_name, "before"]["metrics"], abs=1e-6)
    # The training really moved the adapter (else the comparison above would prove nothing).
    start = load_file(two / "adapters" / "first" / "adapter_model.safetensors")
    assert any(tensor.abs().max().item() > 1e-3 for name, tensor in start.items() if "lora_B" in name)


def stop_then_resume(launch, done: Path, name: str, model: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """Run ``done``'s two-process config with ``launch`` until the NaN guard stops it at the first
    DPO step, mend the recorded config, resume it with ``launch``, and check that it ends as
    ``done`` (metrics and adapters to 1e-5)."""
    out = done.parent / name
    config = str(done.parent / "batch1.yaml")
    stopped = launch(config, "--model", str(model), "--output", str(out), "--set", "dpo.learning_rate=1e30")
    assert stopped.returncode != 0
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "training became non-finite" in errors[0], stopped.stderr
    recorded = out / "config.yaml"
    recorded.write_text(recorded.read_text().replace("learning_rate: 1.0e+30", "learning_rate: 0.05"))
    resumed = launch("--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    expected, got = steps(done), steps(out)
    assert got.keys() == expected.keys()
    for key, step in expected.items():
        assert got[key]["metrics"] == pytest.approx(step["metrics"], abs=1e-5), key
    assert_same_adapters(out, done, 1e-5)
    return out, resumed


def assert_same_adapters(ours: Path, theirs: Path, tolerance: float) -> None:
    for topic_name in ("first", "second"):
        mine = load_file(ours / "adapters" / topic_name / "adapter_model.safetensors")
        other = load_file(theirs / "adapters" / topic_name / "adapter_model.safetensors")
        assert mine.keys() == other.keys()
        for name in other:
            assert mine[name].shape == other[name].shape, name
            assert (mine[name] - other[name]).abs().max().item() <= tolerance, (topic_name, name)


@pytest.mark.distributed
def test_a_non_finite_step_stops_every_process_and_the_run_resumes_on_two(runs, tiny_model_dir):
    """The NaN guard sees the same (gathered) loss on every process, so all stop at one step; the
    resumed run (both processes read the main one's checkpoint) ends as the uninterrupted one."""
    _, two, _ = runs
    out, resumed = stop_then_resume(torchrun, two, "stopped", tiny_model_dir)
    assert resumed.stdout.count("resuming at topic 'first', step 'dpo'") == 1
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))


@pytest.mark.distributed
def test_align_run_relaunches_itself_under_accelerate(runs, accelerated):
    _, two, _ = runs
    out, launched = accelerated
    assert launched.stdout.count("run directory:") == 1
    assert files(out) == files(two)
    # The same two processes as torchrun's: the same numbers, to the bit.
    assert {k: s["metrics"] for k, s in steps(out).items()} == {
        k: s["metrics"] for k, s in steps(two).items()
    }
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["output"] == str(out)


def accelerate_launch(config: str, *args: str) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/accelerate/<config>.yaml`` on 2 CPU processes,
    as a user launches it on GPUs. For FSDP, ``tests/fsdp_on_cpu`` lifts accelerate's GPU-only
    check (DeepSpeed needs no such help: it runs on CPUs, over gloo)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += [str(REPO / "configs" / "accelerate" / f"{config}.yaml"), "--num_processes", "2"]
    env = environment()
    if config == "fsdp":
        shim = str(REPO / "tests" / "fsdp_on_cpu")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [shim, env.get("PYTHONPATH")]))
    else:
        env["DS_ACCELERATOR"] = "cpu"
    return subprocess.run(
        [*command, "-m", "align", "-v", "run", *args], capture_output=True, text=True, env=env, timeout=300
    )


def fsdp_launch(*args: str) -> subprocess.CompletedProcess:
    return accelerate_launch("fsdp", *args)


@pytest.fixture(scope="module")
def sharded(runs, tiny_model_dir):
    """The two-process run again, with the weights sharded by FSDP 2."""
    _, two, _ = runs
    out = two.parent / "fsdp"
    launched = fsdp_launch(
        str(two.parent / "batch1.yaml"), "--model", str(tiny_model_dir), "--output", str(out)
    )
    assert launched.returncode == 0, launched.stderr
    return out, launched


@pytest.mark.distributed
def test_fsdp_shards_the_model_and_measures_and_trains_as_one_process(runs, sharded):
    """Evaluation split and kept in step on the shards, the DPO reference a sharded copy of the
    adapter, snapshots and saves gather the shards: the same results as one process."""
    one, _, _ = runs
    out, launched = sharded
    assert launched.stderr.count("model sharded across 2 processes (FSDP)") == 1
    assert launched.stderr.count("SFTTrainer: 4 optimizer steps on 2 processes (FSDP)") == 2
    assert launched.stderr.count("DPOTrainer: 3 optimizer steps on 2 processes (FSDP)") == 2
    assert launched.stdout.count("run directory:") == 1
    assert_same_results(out, one)  # the adapters whole, not one process's shards
    # DPO's reference is the policy at the step's start: the first step's loss is log 2.
    first_dpo = next(e for e in events(out) if e["kind"] == "log" and e["step"] == "dpo")
    assert first_dpo["metrics"]["loss"] == pytest.approx(0.6931, abs=1e-4)


def ddp_then_fsdp(root: Path, name: str, *args: str, tolerance: float) -> subprocess.CompletedProcess:
    """Run ``align run *args`` on 2 processes under DDP (``root/ddp-<name>``) and under FSDP
    (``root/fsdp-<name>``); check that FSDP sharded the model and gave DDP's metrics and adapters
    to ``tolerance``. Returns the FSDP launch."""
    ddp, fsdp = root / f"ddp-{name}", root / f"fsdp-{name}"
    launched = torchrun(*args, "--output", str(ddp))
    assert launched.returncode == 0, launched.stderr
    launched = fsdp_launch(*args, "--output", str(fsdp))
    assert launched.returncode == 0, launched.stderr
    assert launched.stderr.count("model sharded across 2 processes (FSDP)") == 1
    expected, got = steps(ddp), steps(fsdp)
    assert got.keys() == expected.keys()
    for key, step in expected.items():
        assert got[key]["metrics"] == pytest.approx(step["metrics"], abs=tolerance), key
    assert_same_adapters(fsdp, ddp, tolerance)
    return launched


@pytest.mark.distributed
def test_fsdp_in_bfloat16_trains_as_ddp(sharded, tiny_model_dir):
    """bfloat16 base weights beside the float32 adapter in one FSDP unit (what a GPU run uses):
    FSDP gives DDP's numbers. (Both differ more from one process than in float32: bfloat16 rounds
    the differently shaped batches differently.) DPO under FSDP takes TRL's forward, which runs each
    prompt with each answer; DDP would run each prompt once (``dpo.share_prompt``), the same sums
    in another order, which bfloat16 rounds apart: both runs take TRL's forward here, so that the
    sharding is what is compared."""
    done, _ = sharded
    config = str(done.parent / "batch1.yaml")
    bf16 = ("--set", "model.dtype=bfloat16", "--set", "dpo.share_prompt=false")
    ddp_then_fsdp(done.parent, "bf16", config, "--model", str(tiny_model_dir), *bf16, tolerance=1e-6)


@pytest.mark.distributed
def test_kto_runs_on_two_processes_and_fsdp_trains_as_ddp(sharded, tiny_model_dir):
    """KTO on two processes, where its reference adapter runs each step: TRL's precompute left its
    results in the main process's temporary directory, so the other process failed and the main
    one waited for ever (under DDP), and it reads every weight (which FSDP's shards do not allow).
    FSDP gives DDP's numbers."""
    done, _ = sharded
    config = done.parent / "kto.yaml"
    protocol = [
        {"name": "sft", "train": "sft"},
        {"name": "kto", "train": "kto"},
        {"name": "after_kto", "evaluate": ["quiz", "voice"]},
    ]
    settings = {"max_steps": 3, "learning_rate": 0.05, "per_device_train_batch_size": 2}
    sft = {"epochs": 1, "learning_rate": 0.05, "per_device_train_batch_size": 1, "cloze": 0}
    config.write_text(
        yaml.safe_dump({"seed": 0, "topics": "topics", "sft": sft, "kto": settings, "protocol": protocol})
    )
    fsdp = ddp_then_fsdp(done.parent, "kto", str(config), "--model", str(tiny_model_dir), tolerance=1e-5)
    assert fsdp.stderr.count("KTOTrainer: 3 optimizer steps on 2 processes (FSDP)") == 2


@pytest.mark.distributed
def test_fsdp_scoring_and_generation_split_unevenly_and_stay_in_step(tiny_model_dir):
    """Under FSDP each process scores and generates its share and then makes throw-away forward
    passes until it has made as many as the busiest one (a forward pass over sharded weights
    needs every process). Three prompts and one prompt over two processes, in batches of one:
    the numbers of passes differ, the results are the one-process results."""
    script = [str(REPO / "tests" / "fsdp_on_cpu" / "scoring.py"), str(tiny_model_dir)]
    alone = subprocess.run(
        [sys.executable, *script], capture_output=True, text=True, env=environment(), timeout=300
    )
    assert alone.returncode == 0, alone.stderr
    env = environment()
    env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP")
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO / "tests" / "fsdp_on_cpu"), env.get("PYTHONPATH")])
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    sharded_run = subprocess.run([*command, *script], capture_output=True, text=True, env=env, timeout=300)
    assert sharded_run.returncode == 0, sharded_run.stderr
    expected = json.loads(alone.stdout.strip().splitlines()[-1])
    got = json.loads(sharded_run.stdout.strip().splitlines()[-1])
    assert got["generate3"] == expected["generate3"] and len(got["generate3"]) == 3
    assert got["generate1"] == expected["generate1"] and len(got["generate1"]) == 1
    assert got["score3"] == pytest.approx(expected["score3"], abs=1e-5)
    assert got["score1"] == pytest.approx(expected["score1"], abs=1e-5)
    # What makes the comparison mean something: six different scores, and answers that end after
    # different numbers of tokens (the processes go on generating until all have ended).
    assert len(set(expected["score3"])) == 6
    assert sorted(map(len, expected["generate3"])) == [0, 0, 5], expected["generate3"]


@pytest.mark.distributed
def test_a_stopped_fsdp_run_resumes_to_the_uninterrupted_one(sharded, tiny_model_dir):
    """A stop restores the adapter's shards from the gathered snapshot; a resumed run puts the
    checkpoint's whole adapter back as shards on each process."""
    done, _ = sharded
    stop_then_resume(fsdp_launch, done, "fsdp-stopped", tiny_model_dir)


@pytest.mark.distributed
def test_deepspeed_zero2_measures_and_trains_as_one_process(runs, tiny_model_dir):
    """ZeRO-2 (``configs/accelerate/zero2.yaml``) through DeepSpeed's own engine, on CPUs. Skipped
    where DeepSpeed is not installed: it is not among the dev extras, since its first run compiles
    a C++ operation (about 40 s, with a compiler and ninja)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    one, two, _ = runs
    out = two.parent / "zero2"
    launched = accelerate_launch(
        "zero2", str(two.parent / "batch1.yaml"), "--model", str(tiny_model_dir), "--output", str(out)
    )
    assert launched.returncode == 0, launched.stderr
    assert launched.stderr.count("DPOTrainer: 3 optimizer steps on 2 processes (DEEPSPEED)") == 2
    assert launched.stdout.count("run directory:") == 1
    assert_same_results(out, one)


# -- the façade, on one process and with a fake second one ---------------------------------------
def test_one_process_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.gather_objects([1, 2]) == [1, 2]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    distributed.barrier()
    assert distributed.setup() is None


def test_the_launchers_environment_names_the_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (4, 3, False)


@pytest.mark.parametrize("count", [0, 1, 5, 8])
def test_shards_cover_every_item_once_in_order(count):
    parts = [list(distributed.shard(count, 3, index)) for index in range(3)]
    assert [i for part in parts for i in part] == list(range(count))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def fake_world(monkeypatch, rank: int, others: list) -> list:
    """Pretend to be process ``rank`` of 2; the gather returns ``others`` as the other's part."""
    sent: list = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))

    def gather(items):
        sent.extend(json.loads(json.dumps(items)))  # as it travels: JSON
        return sent + others if rank == 0 else others + sent

    monkeypatch.setattr(distributed, "gather_objects", gather)
    return sent


def plan_on_another_process(tmp_path, monkeypatch, protocol: list, plugin) -> Any:
    """A plan of ``protocol`` over one topic, with ``plugin``'s stub components only, run as
    process 1 of 2 (joining, waiting and leaving do nothing)."""
    from align.core.plan import resolve_plan
    from align.plugins.manager import load_plugins
    from tests.conftest import write_topic

    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    plugins = load_plugins(extra=[plugin])
    (tmp_path / "topics").mkdir()
    write_topic(tmp_path / "topics", "t1")
    plan = resolve_plan(
        {"protocol": protocol, "output": str(tmp_path / "run")},
        "test.yaml",
        plugins.registry,
        topics=tmp_path / "topics",
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for name in ("setup", "barrier", "shutdown"):
        monkeypatch.setattr(distributed, name, lambda: None)
    return plan


def test_another_process_follows_the_main_ones_decisions_and_writes_nothing(tmp_path, monkeypatch):
    """Process 1 of 2 with stub components: its own gate would block, the main process's passes."""
    from align.core.runner import execute
    from align.testing import StubPlugin, StubPolicy
    from tests.core.test_engine import PROTOCOL, CountingObjective, LevelEvaluator

    plugin = StubPlugin(objectives={"bump": CountingObjective}, evaluators={"level": LevelEvaluator})
    plan = plan_on_another_process(tmp_path, monkeypatch, PROTOCOL, plugin)
    received = []

    def from_main(obj):
        received.append(obj)
        if isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], bool):
            return [True, "decided on the main process"]
        return obj

    monkeypatch.setattr(distributed, "broadcast_object", from_main)
    summary = execute(plan, policy=StubPolicy())
    extra = next(step for step in summary["topics"][0]["steps"] if step["step"] == "extra")
    assert received[0] == [False, "level.level 0.25 < 0.50"]  # what this process would have decided
    assert extra["status"] == "ran" and extra["gate"]["reason"] == "decided on the main process"
    assert plan.steps[1].components[0].instance.trained == ["t1"]
    assert not (tmp_path / "run").exists()  # nothing written: no run directory, no adapter


def test_a_step_that_fails_on_another_process_says_so_there(tmp_path, monkeypatch, caplog):
    """Only the main process prints; a step that fails on another process alone (which leaves the
    main one waiting for it) is logged by that process, with the error."""
    from dataclasses import dataclass

    from align.core.runner import execute
    from align.errors import RunStopped
    from align.testing import StubPlugin, StubPolicy

    @dataclass
    class Failing:
        metrics = ("loss",)

        def train(self, policy, topic):
            raise FileNotFoundError("no such file: the main process's cache")

    protocol = [{"name": "train", "train": "failing"}]
    plan = plan_on_another_process(
        tmp_path, monkeypatch, protocol, StubPlugin(objectives={"failing": Failing})
    )
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj: obj)
    with caplog.at_level("WARNING", logger="align"), pytest.raises(RunStopped):
        execute(plan, policy=StubPolicy())
    assert (
        "process 1 of 2: topic 't1', step 'train' failed here (FileNotFoundError: no such file: the main "
        "process's cache); the other processes may wait for this one"
    ) in caplog.text


def test_scoring_is_sharded_and_gathered_in_order(monkeypatch, tiny_model_dir):
    from align.hf.language_model import HFLanguageModel
    from align.hf.loading import load_model

    monkeypatch.setattr(distributed, "device", lambda: "cpu")
    model, tokenizer = load_model(str(tiny_model_dir))
    scorer = HFLanguageModel(model, tokenizer, batch_size=2)
    prompts = ["a b c", "a b c", "d e", "f", "f", "g h i j", "k"]
    completions = ["x", "y z", "x", "y", "x y z", "", "z"]
    whole = scorer.loglikelihood(prompts, completions)
    generated = scorer.generate(prompts[:5], max_new_tokens=3)

    second = fake_world(monkeypatch, 1, [])
    partial = scorer.loglikelihood(prompts, completions)
    first = fake_world(monkeypatch, 0, second)
    sharded = scorer.loglikelihood(prompts, completions)
    assert sharded == pytest.approx(whole, abs=1e-5)
    # Each process scored a share, a prompt's completions together, and none twice.
    mine, theirs = {i for i, _ in first}, {i for i, _ in second}
    assert mine and theirs and not mine & theirs
    assert mine | theirs == {i for i, c in enumerate(completions) if c}
    assert all(
        (i in mine) == (j in mine) for i in mine | theirs for j in theirs | mine if prompts[i] == prompts[j]
    )
    assert [partial[i] for i in sorted(theirs)] == [sharded[i] for i in sorted(theirs)]

    second = fake_world(monkeypatch, 1, [])
    scorer.generate(prompts[:5], max_new_tokens=3)
    fake_world(monkeypatch, 0, second)
    assert scorer.generate(prompts[:5], max_new_tokens=3) == generated
    assert len(second) == 2  # process 1 generated its slice: items 3 and 4


def test_accelerate_configs_have_what_accelerate_reads():
    configs = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
    assert [p.name for p in configs] == ["ddp.yaml", "fsdp.yaml", "zero2.yaml", "zero3.yaml"]
    for path in configs:
        data = yaml.safe_load(path.read_text())
        for key in (
            "compute_environment",
            "distributed_type",
            "num_processes",
            "num_machines",
            "mixed_precision",
        ):
            assert key in data, (path.name, key)
        assert data["compute_environment"] == "LOCAL_MACHINE"
    kinds = {p.name: yaml.safe_load(p.read_text())["distributed_type"] for p in configs}
    assert kinds == {
        "ddp.yaml": "MULTI_GPU",
        "fsdp.yaml": "FSDP",
        "zero2.yaml": "DEEPSPEED",
        "zero3.yaml": "DEEPSPEED",
    }
    from accelerate.commands.config.config_args import load_config_from_file

    for path in configs:  # what `accelerate launch --config_file` reads them with
        assert load_config_from_file(str(path)).num_processes == 8
    zero = {
        p: yaml.safe_load((REPO / "configs" / "accelerate" / p).read_text())["deepspeed_config"]
        for p in ("zero2.yaml", "zero3.yaml")
    }
    assert zero["zero2.yaml"]["zero_stage"] == 2 and zero["zero3.yaml"]["zero_stage"] == 3


def test_launcher_options_are_left_out_of_the_relaunched_command():
    from align.cli import _without_launcher_options

    argv = ["run", "c.yaml", "--launcher", "accelerate", "--num-processes=2", "--set", "seed=1"]
    argv += ["--accelerate-config", "fsdp.yaml"]
    assert _without_launcher_options(argv) == ["run", "c.yaml", "--set", "seed=1"]


@pytest.mark.parametrize(
    ("config_file", "environment_file", "multi_gpu"),
    [(None, None, True), ("fsdp.yaml", None, False), (None, "zero2.yaml", False)],
)
def test_the_relaunch_lets_an_accelerate_config_choose_the_distributed_type(
    monkeypatch, tmp_path, config_file, environment_file, multi_gpu
):
    """--multi_gpu (what a machine without an accelerate config needs) would override a config's
    FSDP or DeepSpeed, so it is passed only when accelerate reads no config file."""
    import accelerate.commands.config as accelerate_config

    from align.cli import RELAUNCH_SCRIPT, _launch_command

    monkeypatch.setattr(accelerate_config, "default_config_file", str(tmp_path / "none.yaml"))
    if environment_file:
        monkeypatch.setenv("ACCELERATE_CONFIG_FILE", environment_file)
    else:
        monkeypatch.delenv("ACCELERATE_CONFIG_FILE", raising=False)
    command = _launch_command(2, config_file, ["run", "c.yaml", "--launcher", "accelerate"])
    assert ("--multi_gpu" in command) is multi_gpu
    assert ("--config_file" in command) is (config_file is not None)
    if config_file:
        assert command[command.index("--config_file") + 1] == config_file
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[-3:] == [str(RELAUNCH_SCRIPT), "run", "c.yaml"]


def test_the_relaunched_processes_import_the_installed_align_not_a_folder_in_the_working_directory(
    tmp_path,
):
    """From the parent of a clone (a folder named align/ in the working directory) `python -m align`
    imports that folder; the relaunch runs a script, whose own directory begins sys.path."""
    from align.cli import RELAUNCH_SCRIPT

    shadow = tmp_path / "align"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the folder in the working directory')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTHONSAFEPATH", None)
    shadowed = subprocess.run(
        [sys.executable, "-m", "align", "--version"], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert "the folder in the working directory" in shadowed.stderr  # what the relaunch used to do
    relaunched = subprocess.run(
        [sys.executable, str(RELAUNCH_SCRIPT), "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert relaunched.returncode == 0, relaunched.stderr
    assert relaunched.stdout.startswith("align, version")
