"""Failed steps, non-finite training, checkpoints, resume and the run-directory lock, with stubs."""

import json
import os
import re

import pytest

from align import hookimpl
from align.core.plan import resolve_plan
from align.core.rundir import RunDir
from align.core.runner import execute
from align.errors import AlignError, ConfigError, RunStopped
from align.testing import PluginHarness, StubEvaluator, StubObjective, StubPlugin, StubPolicy, make_topic

PROTOCOL = [
    {"name": "before", "evaluate": ["probe"]},
    {"name": "sft", "train": "sft"},
    {"name": "after_sft", "evaluate": ["probe"]},
    {"name": "dpo", "train": "dpo"},
    {"name": "after_dpo", "evaluate": ["probe"], "rollback": {"step": "dpo", "max_drop": {"probe.w": 100}}},
]
TOPICS = [make_topic(name=name) for name in ("t1", "t2", "t3")]


class Crash(KeyboardInterrupt):
    """Stands in for the process dying: like Ctrl-C, the one exception no step handles."""


class CrashAfter:
    """A lifecycle hook that 'kills the process' once ``step`` of ``topic`` has ended."""

    def __init__(self, where):
        self.where = where

    @hookimpl
    def on_step_end(self, topic, step, result):
        if (topic.name, step) == self.where:
            raise Crash()


def harness_for(state, fail=None, crash_at=None, nan_at=None, crash_after=None):
    """sft doubles ``w`` and adds 1, dpo adds 0.5. ``fail``/``crash_at``/``nan_at`` name a
    training ``(topic, step)`` that raises, crashes the process midway, or reports a NaN loss;
    ``crash_after`` any step after which the process dies."""

    def effect(step, change):
        def apply(policy, topic):
            policy.state["w"] = change(policy.state.get("w", 0.0))  # changed before failing
            if (topic.name, step) == fail:
                raise RuntimeError("out of cheese")
            if (topic.name, step) == crash_at:
                raise Crash()

        return apply

    def loss(step, value):
        return lambda topic: {"loss": float("nan") if (topic.name, step) == nan_at else value}

    harness = PluginHarness(builtins=False)
    harness.register(
        StubPlugin(
            objectives={
                "sft": StubObjective(metrics=loss("sft", 0.5), effect=effect("sft", lambda w: 2 * w + 1)),
                "dpo": StubObjective(metrics=loss("dpo", 0.25), effect=effect("dpo", lambda w: w + 0.5)),
            },
            evaluators={"probe": StubEvaluator(lambda model, topic: {"w": state.get("w", 0.0)})},
        )
    )
    if crash_after is not None:
        harness.register(CrashAfter(crash_after))
    return harness


def run(tmp_path, state=None, resume=False, name="run", on_error="stop", **failures):
    state = {} if state is None else state
    harness = harness_for(state, **failures)
    config = {"protocol": PROTOCOL, "output": str(tmp_path / name), "on_error": on_error}
    plan = resolve_plan(config, "<test>", harness.registry, topics=TOPICS)
    policy = StubPolicy(state=state, scratch_dir=tmp_path / "scratch")
    return execute(plan, policy=policy, hooks=harness.manager, resume=resume), state


def events(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def metrics_by_step(summary):
    return [(t["topic"], s["step"], s["status"], s["metrics"]) for t in summary["topics"] for s in t["steps"]]


def test_a_failed_step_stops_the_run_with_the_adapter_restored_and_the_failure_recorded(tmp_path):
    with pytest.raises(RunStopped) as caught:
        run(tmp_path, on_error="stop", fail=("t2", "dpo"))
    message = str(caught.value)
    assert "topic 't2', step 'dpo': objective 'dpo' (plugin 'StubPlugin') failed" in message
    assert "RuntimeError: out of cheese; adapter restored to before the step" in message
    assert f"align run --resume {tmp_path / 'run'}" in message
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["topics"][1]["complete"] is False
    assert [s["status"] for s in summary["topics"][1]["steps"]] == ["ran", "ran", "ran", "failed"]
    error = [e for e in events(tmp_path / "run") if e["kind"] == "error"]
    assert [(e["topic"], e["step"], e["plugin"], e["component"], e["exception"]) for e in error] == [
        ("t2", "dpo", "StubPlugin", "dpo", "RuntimeError")
    ]
    # The adapter as after t2's SFT: t1 left w = 1.5, sft made it 4.0, the failed dpo's 4.5 undone.
    checkpoint = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    adapter = json.loads((tmp_path / "run" / "checkpoint" / checkpoint["adapter"]).read_text())
    assert adapter == {"w": 4.0}
    assert checkpoint["next"] == "topic 't2', step 'dpo'"


def test_on_error_skip_records_the_failure_and_goes_on(tmp_path):
    summary, state = run(tmp_path, on_error="skip", fail=("t2", "dpo"))
    assert summary["status"] == "completed"
    t2 = summary["topics"][1]
    assert [s["status"] for s in t2["steps"]] == ["ran", "ran", "ran", "failed", "ran"]
    assert "out of cheese" in t2["steps"][3]["error"]["reason"]
    assert t2["steps"][4]["metrics"] == {"probe.w": 4.0}  # evaluated with dpo undone
    assert state["w"] == 2 * 4.0 + 1 + 0.5  # t3 builds on the restored adapter


def test_a_non_finite_loss_fails_the_step_and_restores_the_adapter(tmp_path):
    summary, _ = run(tmp_path, on_error="skip", nan_at=("t1", "sft"))
    step = summary["topics"][0]["steps"][1]
    assert step["status"] == "failed"
    assert "training became non-finite: sft.loss is nan" in step["error"]["reason"]
    assert summary["topics"][0]["steps"][2]["metrics"] == {"probe.w": 0.0}


def test_a_non_finite_loss_stops_the_run_by_default(tmp_path):
    with pytest.raises(RunStopped, match=r"training became non-finite: sft\.loss is nan"):
        run(tmp_path, on_error="stop", nan_at=("t1", "sft"))


@pytest.mark.parametrize(
    "crash",
    [
        {"crash_at": ("t1", "sft")},
        {"crash_at": ("t2", "dpo")},
        {"crash_at": ("t3", "sft")},
        {"crash_after": ("t1", "before")},
        {"crash_after": ("t2", "dpo")},  # between the guarded step and its guard
        {"crash_after": ("t2", "after_dpo")},  # before the topic's adapter is saved
        {"crash_after": ("t3", "after_dpo")},
    ],
    ids=lambda crash: "-".join([next(iter(crash)), *next(iter(crash.values()))]),
)
def test_a_resumed_run_ends_as_an_uninterrupted_one(tmp_path, crash):
    expected, expected_state = run(tmp_path, name="whole")
    with pytest.raises(Crash):
        run(tmp_path, **crash)
    resumed, state = run(tmp_path, resume=True)  # a fresh policy: state comes from the checkpoint
    assert resumed["status"] == "completed"
    assert metrics_by_step(resumed) == metrics_by_step(expected)
    assert state == expected_state
    for topic in ("t1", "t2", "t3"):
        saved = json.loads((tmp_path / "run" / "adapters" / topic / "stub_adapter.json").read_text())
        whole = json.loads((tmp_path / "whole" / "adapters" / topic / "stub_adapter.json").read_text())
        assert saved["state"] == whole["state"]
    strip = lambda evs: [{k: v for k, v in e.items() if k != "time"} for e in evs if e["kind"] != "resume"]  # noqa: E731
    assert strip(events(tmp_path / "run")) == strip(events(tmp_path / "whole"))
    assert len([e for e in events(tmp_path / "run") if e["kind"] == "resume"]) == 1


def test_resume_retries_the_step_that_stopped_the_run(tmp_path):
    expected, _ = run(tmp_path, name="whole")
    with pytest.raises(RunStopped):
        run(tmp_path, fail=("t2", "sft"))
    resumed, _ = run(tmp_path, resume=True)  # the cause is fixed: no failure this time
    assert metrics_by_step(resumed) == metrics_by_step(expected)
    kinds = [e["kind"] for e in events(tmp_path / "run")]
    assert kinds.count("error") == 1 and kinds.index("error") < kinds.index("resume")


def test_a_torn_last_line_and_events_after_the_checkpoint_are_cut_on_resume(tmp_path):
    with pytest.raises(Crash):
        run(tmp_path, crash_at=("t2", "sft"))
    with open(tmp_path / "run" / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "log", "metr')  # what a kill in the middle of a write leaves
    run(tmp_path, resume=True)
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_resume_removes_the_staging_files_a_kill_left_and_nothing_else(tmp_path):
    """A kill inside an atomic write leaves its staging file or directory beside the target
    (mkstemp/mkdtemp names); resume deletes them, and no other file, nor through a link."""
    with pytest.raises(Crash):
        run(tmp_path, crash_after=("t2", "after_dpo"))
    root = tmp_path / "run"
    left = [
        root / ".summary.json-k2x9q1ab",
        root / ".topics.json-0aa_1bcd",
        root / "checkpoint" / ".adapter-000004.safetensors-zz12ab34",
        root / "adapters" / ".t3-ab12cd34",
        root / ".plots-old-a1b2c3d4",
    ]
    for path in left[:3]:
        path.write_text("half")
    for path in left[3:]:
        path.mkdir()
        (path / "adapter_model.safetensors").write_text("half")
    kept = [root / "notes.txt", root / ".hidden", root / "adapters" / "t1" / "README.md", root / ".a-b"]
    for path in kept:
        path.write_text("mine")
    (root / ".link-abcdefgh").symlink_to(root / "adapters" / "t1")  # removed itself, not followed
    resumed, _ = run(tmp_path, resume=True)
    assert resumed["status"] == "completed"
    assert not [path for path in [*left, root / ".link-abcdefgh"] if path.exists() or path.is_symlink()]
    assert all(path.read_text() == "mine" for path in kept)


def test_checkpoints_keep_only_the_files_the_state_names(tmp_path):
    run(tmp_path)
    checkpoint = tmp_path / "run" / "checkpoint"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["status"] == "completed"
    assert state["next"] == "done"
    assert {p.name for p in checkpoint.iterdir()} == {"state.json", state["adapter"]}


def test_resume_refuses_changed_topics(tmp_path):
    with pytest.raises(Crash):
        run(tmp_path, crash_at=("t1", "sft"))
    harness = harness_for({})
    config = {"protocol": PROTOCOL, "output": str(tmp_path / "run")}
    plan = resolve_plan(config, "<test>", harness.registry, topics=[make_topic(name="other")])
    with pytest.raises(AlignError, match="the topics differ from those the run started with"):
        execute(plan, policy=StubPolicy(), hooks=harness.manager, resume=True)


def test_a_run_directory_in_use_is_refused(tmp_path):
    first = RunDir(tmp_path / "run")
    first.create("seed: 0\n")
    try:
        with pytest.raises(
            AlignError, match=r"another align run \(pid \d+\) is writing to this run directory"
        ):
            RunDir(tmp_path / "run").reopen(0)
    finally:
        first.close()
    second = RunDir(tmp_path / "run")  # released on close
    second.reopen(0)
    second.close()


def test_the_refusal_names_the_holders_pid_and_the_lock_file_stays_for_the_next_run(tmp_path):
    import os

    first = RunDir(tmp_path / "run")
    first.create("seed: 0\n")
    try:
        assert (tmp_path / "run" / ".lock").read_text() == str(os.getpid())
        with pytest.raises(AlignError, match=rf"another align run \(pid {os.getpid()}\) is writing"):
            RunDir(tmp_path / "run").reopen(0)
        assert (tmp_path / "run" / ".lock").read_text() == str(os.getpid())  # the refused run kept it
    finally:
        first.close()
    assert (tmp_path / "run" / ".lock").is_file()
    second = RunDir(tmp_path / "run")
    second.reopen(0)
    second.close()


def test_a_full_disk_mid_run_stops_with_a_resume_hint_and_resume_finishes_the_run(tmp_path, monkeypatch):
    import errno
    import os

    expected, expected_state = run(tmp_path, name="whole")
    real_write = RunDir.write_summary

    def full_after_first_topic(self, summary):
        if len(summary["topics"]) >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path / "summary.json"))
        real_write(self, summary)

    monkeypatch.setattr(RunDir, "write_summary", full_after_first_topic)
    with pytest.raises(AlignError) as stopped:
        run(tmp_path)
    message = str(stopped.value)
    assert "summary.json: No space left on device" in message
    assert f"`align run --resume {tmp_path / 'run'}`" in message
    monkeypatch.setattr(RunDir, "write_summary", real_write)  # space freed
    resumed, state = run(tmp_path, resume=True)
    assert metrics_by_step(resumed) == metrics_by_step(expected)
    assert state == expected_state


@pytest.mark.parametrize("linked", ["adapters", "checkpoint", "metrics.jsonl", "adapters/t1"])
def test_resume_refuses_a_link_out_of_the_run_and_leaves_its_target_alone(tmp_path, linked):
    with pytest.raises(RunStopped):
        run(tmp_path, fail=("t2", "sft"))
    # Someone moved part of the run elsewhere and linked it back: resume must not rewrite, cut or
    # delete anything there (it used to rmtree an adapter directory through the link).
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "run" / linked).rename(elsewhere)
    (tmp_path / "run" / linked).symlink_to(elsewhere)
    before = {p: p.read_bytes() for p in [elsewhere, *elsewhere.rglob("*")] if p.is_file()}
    with pytest.raises(AlignError, match="outside the run directory, which align will not write or delete"):
        run(tmp_path, resume=True)
    assert {p: p.read_bytes() for p in [elsewhere, *elsewhere.rglob("*")] if p.is_file()} == before


def tiny_policy(tmp_path, tiny_model_dir, rank=1, target_modules=("q_proj",)):
    """The engine's real policy on the tiny model."""
    from align.hf.loading import attach_adapter, load_model
    from align.hf.policy import EnginePolicy

    model, tokenizer = load_model(str(tiny_model_dir))
    peft_model = attach_adapter(model, rank=rank, alpha=1.0, dropout=0.0, target_modules=list(target_modules))
    return EnginePolicy(peft_model, tokenizer, seed=0, scratch_dir=tmp_path / "scratch")


def test_saving_an_adapter_never_deletes_through_a_link(tmp_path, tiny_model_dir):
    policy = tiny_policy(tmp_path, tiny_model_dir)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("not align's")
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "t1").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(AlignError, match="which align will not delete through"):
        policy.save_adapter(tmp_path / "adapters" / "t1")
    assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "not align's"
    assert not [p for p in (tmp_path / "adapters").iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.parametrize(
    ("key", "change", "message"),
    [
        ("lora.rank", {"lora": {"rank": 2}}, "lora.rank: is 2, but the run's checkpoint was made with 1"),
        (
            "lora.target_modules",
            {"lora": {"target_modules": ["q_proj"]}},
            "lora.target_modules: is [q_proj], but the run's checkpoint was made with [o_proj, v_proj, up_proj, down_proj]",
        ),
        (
            "lora.alpha",
            {"lora": {"alpha": 32}},
            "lora.alpha: is 32.0, but the run's checkpoint was made with 1.0",
        ),
        ("model.path", {"model": {"path": "other/model"}}, "model.path: is other/model, but"),
        ("protocol", {"protocol": PROTOCOL[:3]}, "protocol: is [before, sft, after_sft], but"),
    ],
)
def test_resume_refuses_a_config_whose_adapter_settings_changed(tmp_path, key, change, message):
    with pytest.raises(RunStopped):
        run(tmp_path, fail=("t2", "sft"))
    harness = harness_for({})
    config = {"protocol": PROTOCOL, "output": str(tmp_path / "run"), **change}
    plan = resolve_plan(config, "<test>", harness.registry, topics=TOPICS)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'run' / 'config.yaml'}: {message}")):
        execute(plan, policy=StubPolicy(), hooks=harness.manager, resume=True)
    # Other settings may change (a learning rate is the fix a non-finite step advises).
    config = {"protocol": PROTOCOL, "output": str(tmp_path / "run"), "on_error": "skip"}
    plan = resolve_plan(config, "<test>", harness.registry, topics=TOPICS)
    execute(plan, policy=StubPolicy(), hooks=harness.manager, resume=True)


def test_a_checkpoint_adapter_that_does_not_fit_or_is_not_finite_is_refused(tmp_path, tiny_model_dir):
    import torch

    policy = tiny_policy(tmp_path, tiny_model_dir)
    good = policy.snapshot()
    assert policy.load_snapshot(policy.save_snapshot(good, tmp_path / "good")).keys() == good.keys()
    nan = {name: torch.full_like(tensor, float("nan")) for name, tensor in good.items()}  # header intact
    with pytest.raises(
        AlignError, match=r"lora_A.default.weight: holds NaN or infinite values; the checkpoint is damaged"
    ):
        policy.load_snapshot(policy.save_snapshot(nan, tmp_path / "nan"))
    rank_two = tiny_policy(tmp_path, tiny_model_dir, rank=2).snapshot()
    with pytest.raises(
        AlignError, match=r"lora_A.default.weight: shape \[2, 32\], but this run's adapter has \[1, 32\]"
    ):
        policy.load_snapshot(policy.save_snapshot(rank_two, tmp_path / "rank-two"))
    other_modules = tiny_policy(tmp_path, tiny_model_dir, target_modules=["v_proj"]).snapshot()
    with pytest.raises(AlignError, match=r"v_proj.lora_A.default.weight: not a weight of this run's adapter"):
        policy.load_snapshot(policy.save_snapshot(other_modules, tmp_path / "other"))
    some = dict(list(good.items())[1:])
    with pytest.raises(AlignError, match=r": lacks the adapter weight .*q_proj.lora_A.default.weight"):
        policy.load_snapshot(policy.save_snapshot(some, tmp_path / "some"))


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "sub/adapter.json", "..", None, 7])
def test_only_files_inside_checkpoint_are_read(tmp_path, name):
    with pytest.raises(RunStopped):
        run(tmp_path, fail=("t2", "sft"))
    state_path = tmp_path / "run" / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    state["adapter"] = name
    state_path.write_text(json.dumps(state))
    with pytest.raises(
        AlignError, match=r"state.json: adapter: .* is not a file in .*checkpoint; the checkpoint is damaged"
    ):
        run(tmp_path, resume=True)


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: "",  # emptied: resuming went on silently over a log that lost its events
        lambda text: '{"kind": "note"}\n' + text,  # a line inserted: the cut fell inside a real event
        lambda text: text.replace('"sft.loss": 0.5', '"sft.loss": 0.9', 1),  # edited, same length
    ],
    ids=["emptied", "line-inserted", "edited"],
)
def test_resume_refuses_a_metrics_log_that_does_not_match_the_checkpoint(tmp_path, damage):
    with pytest.raises(RunStopped):
        run(tmp_path, fail=("t2", "sft"))
    log = tmp_path / "run" / "metrics.jsonl"
    log.write_text(damage(log.read_text()))
    before = log.read_bytes()
    with pytest.raises(AlignError, match=r"metrics\.jsonl: .* the run's checkpoint"):
        run(tmp_path, resume=True)
    assert log.read_bytes() == before  # nothing cut


def test_the_checkpoint_records_the_digest_of_the_log_it_accounts_for(tmp_path):
    import hashlib

    with pytest.raises(Crash):
        run(tmp_path, crash_at=("t2", "sft"))
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    prefix = (tmp_path / "run" / "metrics.jsonl").read_bytes()[: state["metrics_offset"]]
    assert hashlib.sha256(prefix).hexdigest() == state["metrics_sha256"]
    run(tmp_path, resume=True)  # and after a resume, the digest goes on from the cut log
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    prefix = (tmp_path / "run" / "metrics.jsonl").read_bytes()[: state["metrics_offset"]]
    assert hashlib.sha256(prefix).hexdigest() == state["metrics_sha256"]


def test_a_full_disk_while_safetensors_writes_is_the_oserror_it_is(tmp_path, tiny_model_dir, monkeypatch):
    """safetensors raises SafetensorError, not OSError, so a full disk while saving weights was a
    traceback instead of the run's "could not write ...; resume" line."""
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    import peft.peft_model

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", full)  # PEFT's own name for it
    policy = tiny_policy(tmp_path, tiny_model_dir)
    (tmp_path / "checkpoint").mkdir()
    with pytest.raises(OSError) as error:
        policy.save_snapshot(policy.snapshot(), tmp_path / "checkpoint" / "adapter-000001")
    assert error.value.errno == errno.ENOSPC
    assert error.value.filename == str(tmp_path / "checkpoint" / "adapter-000001.safetensors")
    assert list((tmp_path / "checkpoint").iterdir()) == []  # the temporary file is gone too
    with pytest.raises(OSError) as error:
        policy.save_adapter(tmp_path / "adapters" / "t1")
    assert error.value.errno == errno.ENOSPC
    assert list((tmp_path / "adapters").iterdir()) == []


def test_files_a_run_writes_honour_the_umask(tmp_path, tiny_model_dir):
    """mkstemp and mkdtemp make 0600 files and 0700 directories whatever the umask, so a shared
    results folder could not read summary.json, state.json or the adapters."""
    import os
    import stat

    previous = os.umask(0o022)
    try:
        run(tmp_path)
        policy = tiny_policy(tmp_path, tiny_model_dir)
        policy.save_snapshot(policy.snapshot(), tmp_path / "run" / "checkpoint" / "adapter-real")
        policy.save_adapter(tmp_path / "run" / "adapters" / "real")
    finally:
        os.umask(previous)
    modes = {
        str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
        for p in (tmp_path / "run").rglob("*")
        if p.name != ".lock"
    }
    assert modes["run/summary.json"] == modes["run/checkpoint/state.json"] == 0o644
    assert modes["run/checkpoint/adapter-real.safetensors"] == 0o644
    assert modes["run/adapters/real"] == 0o755
    assert {mode for mode in modes.values()} <= {0o644, 0o755}, modes


# -- staged_directory: the one helper for a directory written whole or not at all ----------------
def test_a_staged_directory_appears_whole_and_leaves_nothing_beside_it(tmp_path):
    from align.core.rundir import staged_directory

    target = tmp_path / "out" / "model"
    with staged_directory(target) as staging:
        (staging / "a.txt").write_text("a")
        assert not target.exists()  # nothing at the target until the block ends
    assert (target / "a.txt").read_text() == "a"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]


def test_a_staged_directory_whose_block_raises_leaves_the_target_as_it_was(tmp_path):
    from align.core.rundir import staged_directory

    target = tmp_path / "plots"
    target.mkdir()
    (target / "old.png").write_text("old")
    with (
        pytest.raises(RuntimeError, match="plotting failed"),
        staged_directory(target, replace=True) as staging,
    ):
        (staging / "new.png").write_text("new")
        raise RuntimeError("plotting failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]
    assert [p.name for p in target.iterdir()] == ["old.png"]


def test_a_staged_directory_replaces_a_full_one_only_when_asked(tmp_path):
    from align.core.rundir import staged_directory

    target = tmp_path / "plots"
    target.mkdir()
    (target / "gone.png").write_text("old")
    with pytest.raises(OSError), staged_directory(target) as staging:
        (staging / "new.png").write_text("new")
    assert [p.name for p in target.iterdir()] == ["gone.png"]
    with staged_directory(target, replace=True) as staging:
        (staging / "new.png").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.png"]  # the plot that no longer applies went too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]


def test_a_readable_staged_directory_gets_the_modes_of_the_umask(tmp_path):
    from align.core.rundir import staged_directory

    previous = os.umask(0o027)
    try:
        with staged_directory(tmp_path / "merged", readable=True) as staging:
            (staging / "sub").mkdir()
            (staging / "sub" / "weights").write_text("w")
    finally:
        os.umask(previous)
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "merged" / "sub").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "merged" / "sub" / "weights").stat().st_mode & 0o777 == 0o640
