"""``align run -v`` logging and ``report_to: tensorboard``, on a tiny model."""

import logging

import pytest
import yaml
from click.testing import CliRunner

from align.cli import cli
from align.console import configure_logging
from align.core.plan import resolve_plan
from align.errors import ConfigError
from align.testing import PluginHarness, StubEvaluator, StubObjective, StubPlugin, StubPolicy, make_topic
from tests.conftest import write_topic

LOGGERS = ("", "align", "transformers", "trl", "peft")


@pytest.fixture(autouse=True)
def restore_logging():
    """configure_logging changes process-wide logging; put it back after each test."""
    saved = {
        name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers)) for name in LOGGERS
    }
    yield
    for name, (level, handlers) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers[:] = handlers


def test_verbosity_levels():
    configure_logging(0)
    assert not logging.getLogger("align.core.engine").isEnabledFor(logging.INFO)
    configure_logging(1)
    assert logging.getLogger("align.core.engine").isEnabledFor(logging.INFO)
    assert not logging.getLogger("align.core.engine").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("trl").isEnabledFor(logging.INFO)
    configure_logging(2)
    assert logging.getLogger("align.core.checkpoint").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("trl.trainer").isEnabledFor(logging.INFO)
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "align-console"]
    assert len(ours) == 1  # configured twice, one handler


def test_the_engine_logs_steps_with_durations_and_checkpoints(tmp_path, caplog):
    harness = PluginHarness(builtins=False)
    harness.register(
        StubPlugin(objectives={"sft": StubObjective()}, evaluators={"quiz": StubEvaluator({"a": 1})})
    )
    plan = resolve_plan(
        {
            "protocol": [{"name": "sft", "train": "sft"}, {"name": "after", "evaluate": ["quiz"]}],
            "output": str(tmp_path / "run"),
        },
        "<test>",
        harness.registry,
        topics=[make_topic(name="t1"), make_topic(name="t2")],
    )
    from align.core.runner import execute

    with caplog.at_level(logging.DEBUG, logger="align"):
        execute(plan, policy=StubPolicy(scratch_dir=tmp_path / "scratch"))
    messages = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert ("align.core.engine", "INFO", "topic 't1': step 'sft' starts") in messages
    assert any(m[2].startswith("topic 't1': step 'after' ran in ") and m[2].endswith("s") for m in messages)
    assert any(m[2].startswith("topic 't2': rechecked 1 earlier topics in ") for m in messages)
    assert any(m[0] == "align.core.checkpoint" and m[1] == "DEBUG" for m in messages)


def test_report_to_tensorboard_needs_tensorboard(monkeypatch, registry):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a)
    )
    with pytest.raises(ConfigError) as excinfo:
        resolve_plan({"report_to": "tensorboard"}, "my.yaml", registry, topics=[make_topic()])
    assert str(excinfo.value) == (
        "my.yaml: report_to: tensorboard is not installed; `pip install tensorboard`, or set report_to: none"
    )


def test_run_verbose_logs_to_stderr_and_tensorboard_gets_event_files(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    topics = tmp_path / "topics"
    topics.mkdir()
    write_topic(topics, "first")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sft": {"epochs": 1, "learning_rate": 0.05},
                "dpo": {"max_steps": 2},
                "report_to": "tensorboard",
                "protocol": [
                    {"name": "before", "evaluate": ["quiz"]},
                    {"name": "sft", "train": "sft"},
                    {"name": "dpo", "train": "dpo"},
                ],
            }
        )
    )
    out = tmp_path / "run"
    args = [str(config), "--model", str(tiny_model_dir), "--topics", str(topics), "--output", str(out)]
    result = CliRunner().invoke(cli, ["run", "-v", *args])
    assert result.exit_code == 0, result.output
    log = result.stderr
    assert f"INFO align.core.runner: loading model {tiny_model_dir}" in log
    assert "INFO align.core.runner: adapter attached: rank 1" in log
    assert "INFO align.core.engine: topic 'first': step 'sft' starts" in log
    assert "INFO align.core.engine: topic 'first': step 'dpo' ran in " in log
    assert "DEBUG" not in log
    assert "loading model" not in result.stdout  # the run's own output stays apart

    for step in ("sft", "dpo"):
        files = list((out / "tensorboard" / f"first-{step}").glob("events.out.tfevents.*"))
        assert len(files) == 1, step
        assert b"train/loss" in files[0].read_bytes(), step


# -- report_to: any of transformers' trackers -------------------------------------------------------
def hide_modules(monkeypatch, *names):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in names else find_spec(name, *a)
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            ["tensorboard", "wandb"],
            "wandb is not installed; `pip install wandb`, or take wandb out of report_to",
        ),
        ("mlflow", "mlflow is not installed; `pip install mlflow`, or set report_to: none"),
        (
            ["tensorbord"],
            "'tensorbord' is not a tracker; did you mean 'tensorboard'? (trackers: none, tensorboard,",
        ),
        (["none", "tensorboard"], "none goes alone (got none, tensorboard)"),
        (["tensorboard", "tensorboard"], "names a tracker twice (tensorboard, tensorboard); give each once"),
        (3, "expected none, a tracker's name or a list of them (tensorboard, wandb, mlflow,"),
        ([], "expected none, a tracker's name or a list of them"),
    ],
)
def test_report_to_takes_trackers_and_names_the_package_to_install(monkeypatch, registry, value, message):
    hide_modules(monkeypatch, "wandb", "mlflow")
    with pytest.raises(ConfigError) as excinfo:
        resolve_plan({"report_to": value}, "my.yaml", registry, topics=[make_topic()])
    assert str(excinfo.value).startswith(f"my.yaml: report_to: {message}")
    assert "\n" not in str(excinfo.value)


def test_report_to_names_the_trackers_transformers_has():
    """A transformers that adds or drops an integration shows here (5.24 has these and kubeflow,
    which turns itself on from its environment)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from align.core.config import REPORT_TO

    assert set(REPORT_TO) == set(INTEGRATION_TO_CALLBACK) - {"kubeflow"}


def test_every_trainer_reports_to_the_configured_trackers(tmp_path, tiny_model_dir, monkeypatch):
    """A tracker besides TensorBoard reaches each trainer through transformers' own report_to: a
    recording callback stands in for dvclive's (the trainer builds it from the integration's name)."""
    import importlib.util

    from transformers import TrainerCallback
    from transformers.integrations import integration_utils

    trainings = []

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            trainings.append({"report_to": list(args.report_to), "logs": []})

        def on_log(self, args, state, control, logs=None, **kwargs):
            trainings[-1]["logs"].append(dict(logs or {}))

    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "dvclive", Recorder)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: find_spec("json") if name == "dvclive" else find_spec(name, *a),
    )
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    topics = tmp_path / "topics"
    topics.mkdir()
    write_topic(topics, "first")
    config = {
        "sft": {"epochs": 1, "learning_rate": 0.05, "cloze": 0},
        "dpo": {"max_steps": 2},
        "replay": {"content": 0},
        "report_to": ["tensorboard", "dvclive"],
        "protocol": [{"name": "sft", "train": "sft"}, {"name": "dpo", "train": "dpo"}],
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    args = ["run", str(tmp_path / "tiny.yaml"), "--model", str(tiny_model_dir), "--topics", str(topics)]
    result = CliRunner().invoke(cli, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert [t["report_to"] for t in trainings] == [["dvclive"], ["dvclive"]]  # sft, then dpo
    assert all(any("loss" in log for log in t["logs"]) for t in trainings)
    for step in ("sft", "dpo"):  # TensorBoard still writes into the run
        assert list((out / "tensorboard" / f"first-{step}").glob("events.out.tfevents.*")), step
