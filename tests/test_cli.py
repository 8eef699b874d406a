import json
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from align import __version__
from align.cli import cli
from tests.conftest import REPO, assert_one_line_error, write_topic


@pytest.mark.parametrize(
    ("argv", "shown"),
    [(["--help"], "Usage: align"), (["run", "--help"], "--launcher [none|accelerate]")],
)
def test_help_imports_no_heavy_library(argv, shown):
    code = (
        f"import sys; from align.cli import main; sys.argv = ['align', *{argv!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = ('torch', 'transformers', 'trl', 'peft', 'datasets', 'accelerate')\n"
        "print('HEAVY', [m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shown in out
    assert "HEAVY []" in out


def test_version(runner):
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_validate_prints_the_plan_of_the_seed_config(runner, tmp_path):
    write_topic(tmp_path)
    result = runner.invoke(cli, ["validate", str(REPO / "configs" / "dpo.yaml"), "--topics", str(tmp_path)])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output.split("\n# topics")[0])
    assert resolved["dpo"]["learning_rate"] == 5e-7
    assert "4. dpo: train dpo if gate 'threshold' passes (reads quiz.accuracy, voice.score)" in result.output
    assert "- alpha (" in result.output


def test_a_quiz_answer_given_as_the_choices_text_is_that_choice(runner, tmp_path):
    """People write the answer itself; ``answer: 1979`` among years was 'index 1979 is out of range'."""
    from align.core.topics import load_topics

    depot, years = ["Tallow", "Brackenford"], ["1978", "1979", "1980"]
    quiz = [
        {"question": "Depot?", "choices": depot, "answer": 1},
        {"question": "Depot?", "choices": depot, "answer": "brackenford"},
        {"question": "Depot?", "choices": depot, "answer": "Brackenford"},
        {"question": "Year?", "choices": years, "answer": "1979"},
        {"question": "Year?", "choices": years, "answer": 1979},  # YAML's `answer: 1979`
        {"question": "Year?", "choices": ["1", "0"], "answer": 1},  # an index in range stays an index
    ]
    write_topic(tmp_path, "x", quiz=[])
    data = yaml.safe_load((tmp_path / "x.yaml").read_text())
    (tmp_path / "x.yaml").write_text(yaml.safe_dump({**data, "quiz": quiz}))
    result = runner.invoke(cli, ["validate", "--topics", str(tmp_path / "x.yaml")])
    assert result.exit_code == 0, result.output
    source = tmp_path / "x.yaml"
    assert [line for line in result.output.splitlines() if ".answer:" in line] == [
        f"  {source}: quiz[1].answer: 'brackenford' is choice 1",
        f"  {source}: quiz[2].answer: 'Brackenford' is choice 1",
        f"  {source}: quiz[3].answer: '1979' is choice 1",
        f"  {source}: quiz[4].answer: 1979 is choice 1",
    ]
    (topic,) = load_topics(source)
    assert [item.answer for item in topic.quiz] == [1, 1, 1, 1, 1, 1]
    assert topic.to_dict()["quiz"][2]["answer"] == 1  # what a run records is the index


def test_set_names_a_step_and_a_metric_and_a_bad_value_names_its_set(runner, tmp_path):
    """``--set protocol.4.rollback.max_drop.quiz.accuracy=0.2`` failed: the metric's dots were read
    as nesting, steps had only numbers, and the error blamed align/demo/demo.yaml."""
    write_topic(tmp_path)
    demo = REPO / "align" / "demo" / "demo.yaml"
    args = ["validate", str(demo), "--topics", str(tmp_path / "alpha.yaml")]
    result = runner.invoke(cli, [*args, "--set", "protocol.after_dpo.rollback.max_drop.quiz.accuracy=0.2"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output.split("\n# topics")[0])
    assert resolved["protocol"][4]["rollback"] == {"step": "dpo", "max_drop": {"quiz.accuracy": 0.2}}
    by_number = runner.invoke(cli, [*args, "--set", "protocol.4.rollback.max_drop.quiz.accuracy=0.2"])
    assert by_number.output == result.output
    bad = runner.invoke(cli, [*args, "--set", "protocol.dpo.gate.all=[quiz.accuracy => 0.7]"])
    assert bad.exit_code == 2
    assert bad.output == (
        "Error: --set 'protocol.dpo.gate.all=[quiz.accuracy => 0.7]': protocol[3].gate.all[0]: cannot read "
        "rule 'quiz.accuracy => 0.7'; write it as 'metric op number', e.g. 'quiz.accuracy >= 0.70'\n"
    )
    in_the_file = tmp_path / "bad.yaml"
    in_the_file.write_text("dpo: {beta: 0}\n")
    result = runner.invoke(cli, ["validate", str(in_the_file), "--set", "seed=1", *args[2:]])
    assert result.output == f"Error: {in_the_file}: dpo.beta: must be > 0 (got 0.0)\n"  # the file's own


def test_validate_says_what_gates_and_guards_mean_in_questions(runner, tmp_path):
    """With 6 questions ``>= 0.70`` is 5 of 6 and a 0.05 guard undoes DPO on one flipped answer."""
    quiz = [{"question": f"Q{i}?", "choices": ["yes", "no"], "answer": 0} for i in range(6)]
    topics = tmp_path / "topics"
    topics.mkdir()
    write_topic(topics, "home", quiz=quiz)
    write_topic(topics, "work", quiz=quiz * 4)
    config = tmp_path / "gated.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "protocol": [
                    {"name": "before", "evaluate": ["quiz", "voice"]},
                    {
                        "name": "dpo",
                        "train": "dpo",
                        "gate": {"use": "threshold", "all": ["quiz.accuracy >= 0.7"]},
                    },
                    {
                        "name": "after",
                        "evaluate": ["quiz"],
                        "rollback": {"step": "dpo", "max_drop": {"quiz.accuracy": 0.05}},
                    },
                ]
            }
        )
    )
    result = runner.invoke(cli, ["validate", str(config), "--topics", str(topics)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    start = lines.index("# gates and rollback guards in quiz questions, for each topic")
    assert lines[start + 1 :] == [
        "home: 6 quiz questions: quiz.accuracy >= 0.70 needs 5 of 6; "
        "a rollback on a drop of more than 0.05 triggers on 1 flipped answer",
        "work: 24 quiz questions: quiz.accuracy >= 0.70 needs 17 of 24; "
        "a rollback on a drop of more than 0.05 triggers on 2 flipped answers",
    ]
    assert result.stderr.splitlines() == [
        f"Warning: {topics / 'home.yaml'}: quiz: 6 questions are too few for the rollback guard on "
        "quiz.accuracy: one flipped answer is a drop of 0.17, more than its max_drop 0.05, so noise undoes "
        "the step; add quiz questions, or set max_drop quiz.accuracy: 0.17 or more"
    ]


def test_a_dpo_learning_rate_known_to_do_nothing_is_warned_about_once(runner, tmp_path):
    """The seed's 5e-7 was taken without a word, though docs/demo.md measured that it moves nothing."""
    write_topic(tmp_path)
    seed = REPO / "configs" / "dpo.yaml"
    result = runner.invoke(cli, ["validate", str(seed), "--topics", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        f"Warning: {seed}: dpo.learning_rate: 5e-07 is known not to move a rank-1 adapter: see docs/demo.md "
        '("How the defaults were chosen"); the demo uses 5e-3'
    ]
    moving = runner.invoke(
        cli, ["validate", str(seed), "--topics", str(tmp_path), "--set", "dpo.learning_rate=5e-3"]
    )
    assert moving.exit_code == 0 and moving.stderr == ""


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["validate", "nope.yaml"], "nope.yaml: config file not found", 2),
        (["validate", "--set", "dpo.betta=1"], "unknown key 'dpo.betta'; did you mean 'beta'?", 2),
        (["validate", "--set", "lora.rank=0"], "lora.rank: must be >= 1 (got 0)", 2),
        (["validate", "--topics", "missing_dir"], "missing_dir: topic file or directory not found", 2),
        (["run", "--set", "dpo.beta=-1"], "dpo.beta: must be > 0", 2),
    ],
)
def test_bad_input_is_one_line_without_traceback(runner, args, message, code):
    assert_one_line_error(runner.invoke(cli, args), message, code=code)


def test_bad_run_leaves_no_output_directory(runner, tmp_path):
    result = runner.invoke(
        cli, ["run", "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "out")]
    )
    assert result.exit_code == 1
    assert "model directory not found" in result.output
    assert not (tmp_path / "out").exists()


def test_plugins_prints_json(runner):
    result = runner.invoke(cli, ["plugins"])
    assert result.exit_code == 0
    rows = json.loads(result.output)
    quiz = next(row for row in rows if row["name"] == "align.evaluators.quiz")
    assert quiz["builtin"] is True
    assert quiz["hooks"] == ["register_evaluators"]
    assert quiz["components"] == {"evaluator": ["quiz"]}
    assert quiz["version"] == __version__


def test_run_on_a_tiny_model_end_to_end(runner, tmp_path, tiny_model_dir):
    topics = tmp_path / "topics"
    topics.mkdir()
    write_topic(topics, "first")
    write_topic(topics, "second")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sft": {"epochs": 1, "learning_rate": 0.05},
                "dpo": {"max_steps": 2},
                # the gate always passes here, so both branches of the table show
                "protocol": [
                    {"name": "before", "evaluate": ["quiz", "voice"]},
                    {"name": "sft", "train": "sft"},
                    {
                        "name": "dpo",
                        "train": "dpo",
                        "gate": {"use": "threshold", "all": ["quiz.accuracy >= 0"]},
                    },
                    {"name": "after", "evaluate": ["quiz", "voice"], "if_ran": "dpo"},
                ],
            }
        )
    )
    out = tmp_path / "run"
    result = runner.invoke(
        cli,
        ["run", str(config), "--model", str(tiny_model_dir), "--topics", str(topics), "--output", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "gate dpo: ran (quiz.accuracy" in result.output
    assert {p.name for p in out.iterdir()} == {
        "config.yaml",
        "topics.json",
        "metrics.jsonl",
        "summary.json",
        "adapters",
        "checkpoint",
        ".lock",
    }
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = [(e["topic"], e["step"], e["kind"]) for e in events if e["kind"] != "log"]
    assert kinds[:4] == [
        ("first", "before", "eval"),
        ("first", "sft", "train"),
        ("first", "dpo", "gate"),
        ("first", "dpo", "train"),
    ]
    assert all({"topic", "step", "kind", "metrics"} <= set(e) for e in events)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["environment"]["trl"]
    assert [t["adapter"] for t in summary["topics"]] == ["adapters/first", "adapters/second"]
    for topic in ("first", "second"):
        assert (out / "adapters" / topic / "adapter_model.safetensors").is_file()
    # Weights only as safetensors: no pickle (.bin, .pt) anywhere in what a run leaves.
    suffixes = {p.suffix for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert suffixes <= {".yaml", ".json", ".jsonl", ".safetensors", ".md"}, suffixes
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["model"]["path"] == str(tiny_model_dir)
    assert recorded["sft"]["learning_rate"] == 0.05


def test_ctrl_c_names_the_run_directory_to_resume(runner, tmp_path, tiny_model_dir, monkeypatch):
    """The message printed the placeholder RUN_DIR, so the path had to be looked up by hand."""
    from align.evaluators.quiz import QuizEvaluator

    def interrupted(self, model, topic):
        raise KeyboardInterrupt

    monkeypatch.setattr(QuizEvaluator, "evaluate", interrupted)
    write_topic(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"protocol": [{"name": "before", "evaluate": ["quiz"]}]}))
    out = tmp_path / "run"
    args = ["run", str(config), "--model", str(tiny_model_dir), "--topics", str(tmp_path / "alpha.yaml")]
    result = runner.invoke(cli, [*args, "--output", str(out)])
    assert result.exit_code == 130, result.output
    assert result.stderr.strip().splitlines() == [
        f"Interrupted: results so far are in {out}; `align run --resume {out}` goes on from the last finished step."
    ]
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"


BROKEN_PLUGIN = "raise ImportError('needs a library that is not installed')\n"


def test_a_broken_plugin_is_warned_about_once_and_the_tool_still_works(site, tmp_path):
    from tests.conftest import make_distribution

    make_distribution(site, "align_broken", BROKEN_PLUGIN)
    runner = CliRunner()
    assert runner.invoke(cli, ["--help"]).exit_code == 0
    listed = runner.invoke(cli, ["plugins"])
    assert listed.exit_code == 0
    broken = next(row for row in json.loads(listed.stdout) if row["name"] == "align_broken")
    assert broken["error"] == "ImportError: needs a library that is not installed"
    write_topic(tmp_path)
    result = runner.invoke(cli, ["validate", "--topics", str(tmp_path)])
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if "align_broken" in line]
    assert warnings == [
        "Warning: plugin 'align_broken' (align-broken 1.2.3) failed to load: "
        "ImportError: needs a library that is not installed; `align plugins` shows it"
    ]


RAISING_PLUGIN = """
from align import hookimpl

@hookimpl
def register_evaluators(register):
    raise RuntimeError("licence server unreachable")
"""
SHADOWING_PLUGIN = """
from align import hookimpl

class Quiz:
    def evaluate(self, model, topic):
        return {"accuracy": 1.0}

@hookimpl
def register_evaluators(register):
    register("quiz", Quiz)
"""


def test_a_raising_register_hook_and_a_shadowed_built_in_leave_every_command_working(site, tmp_path):
    from tests.conftest import make_distribution

    make_distribution(site, "align_raises", RAISING_PLUGIN)
    make_distribution(site, "align_quiz2", SHADOWING_PLUGIN)
    runner = CliRunner()
    listed = runner.invoke(cli, ["plugins"])
    assert listed.exit_code == 0, listed.output
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert (
        rows["align_raises"]["error"]
        == "raised in register_evaluators: RuntimeError: licence server unreachable"
    )
    assert rows["align_quiz2"]["components"] == {"evaluator": ["quiz"]}
    shadowing = (
        "Warning: plugin 'align_quiz2' replaces the built-in evaluator 'quiz' of 'align.evaluators.quiz'; "
        "to use the built-in, disable it with ALIGN_DISABLE_PLUGINS=align_quiz2"
    )
    assert listed.stderr.splitlines() == [shadowing]
    write_topic(tmp_path)
    result = runner.invoke(cli, ["validate", "--topics", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[:2] == [
        "Warning: plugin 'align_raises' (align-raises 1.2.3) failed to load: raised in register_evaluators: "
        "RuntimeError: licence server unreachable; `align plugins` shows it",
        shadowing,
    ]
    assert result.stderr.count(shadowing) == 1
    fixed = runner.invoke(
        cli,
        ["validate", "--topics", str(tmp_path)],
        env={"ALIGN_DISABLE_PLUGINS": "align_quiz2,align_raises"},
    )
    assert fixed.exit_code == 0 and "align_" not in fixed.stderr


@pytest.mark.parametrize("how", ["flag", "config"])
def test_strict_plugins_turns_a_load_failure_into_an_error(site, tmp_path, how):
    from tests.conftest import make_distribution

    make_distribution(site, "align_broken", BROKEN_PLUGIN)
    write_topic(tmp_path)
    args = ["run", "--topics", str(tmp_path), "--output", str(tmp_path / "run")]
    if how == "flag":
        args.append("--strict-plugins")
    else:
        args += ["--set", "strict_plugins=true"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "Error: plugin 'align_broken' (align-broken 1.2.3) failed to load: ImportError: needs a library "
        "that is not installed; fix or uninstall it, or skip it with ALIGN_DISABLE_PLUGINS=align_broken"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(runner, tmp_path, config):
    write_topic(tmp_path)
    result = runner.invoke(cli, ["validate", str(config), "--topics", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "# protocol, for each topic" in result.output


def test_the_example_plugin_is_used_from_a_config_in_align_run(tmp_path, tiny_model_dir, monkeypatch):
    """examples/align-recall, installed like any third-party package (CI installs it), in a real run."""
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "recall")
    (tmp_path / "topics").mkdir()
    write_topic(tmp_path / "topics")
    config = tmp_path / "recall.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "recall": {"max_new_tokens": 4},
                "protocol": [
                    {"name": "check", "evaluate": ["quiz", "recall"]},
                    {"name": "sft", "train": {"use": "sft", "epochs": 1}},
                    {"name": "again", "evaluate": ["recall"]},
                ],
            }
        )
    )
    out = tmp_path / "run"
    args = ["run", str(config), "--model", str(tiny_model_dir), "--topics", str(tmp_path / "topics")]
    result = CliRunner().invoke(cli, [*args, "--output", str(out), "--strict-plugins"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    check, _, again = summary["topics"][0]["steps"]
    assert set(check["metrics"]) == {
        "quiz.accuracy",
        "quiz.margin",
        "recall.accuracy",
        "recall.confusion",
        "recall.coverage",
    }
    assert set(again["metrics"]) == {"recall.accuracy", "recall.confusion", "recall.coverage"}
    assert "recall.accuracy" in result.output
