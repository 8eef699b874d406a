"""What ``align run`` prints: step lines, rechecks and the end-of-run table with the forgetting matrix."""

import io

from align.console import FORGOT_THRESHOLD, ConsoleReporter, summary_table


def topic(name, before, after, gate_reason=None):
    steps = [
        {"step": "before", "kind": "eval", "status": "ran", "metrics": {"quiz.accuracy": before}},
        {"step": "after", "kind": "eval", "status": "ran", "metrics": {"quiz.accuracy": after}},
    ]
    if gate_reason is not None:
        steps.insert(
            1,
            {
                "step": "dpo",
                "kind": "train",
                "status": "ran",
                "gate": {"gate": "threshold", "passed": True, "reason": gate_reason},
                "metrics": {},
            },
        )
    return {"topic": name, "steps": steps}


def summary(matrix):
    return {
        "steps": ["before", "dpo", "after"],
        "topics": [
            topic("early_life", 0.43, 0.86, "quiz.accuracy 0.71 >= 0.70"),
            topic("work", 0.29, 1.0),
            topic("home", 0.57, 0.86),
        ][: len(matrix)],
        "forgetting": {"topics": ["early_life", "work", "home"], "metrics": {"quiz.accuracy": matrix}},
    }


MATRIX = [
    [0.86, None, None],
    [0.71, 1.0, None],
    [0.80, 0.95, 0.86],
]


def test_the_table_keeps_topic_rows_and_gates_then_shows_the_matrix():
    lines = summary_table(summary(MATRIX)).splitlines()
    assert lines[:5] == [
        "topic       metric              before      after",
        "-" * 49,
        "early_life  quiz.accuracy         0.43       0.86",
        "            gate dpo: ran (quiz.accuracy 0.71 >= 0.70)",
        "work        quiz.accuracy         0.29       1.00",
    ]
    start = lines.index("forgetting: quiz.accuracy of each topic (column) right after training each (row)")
    assert lines[start + 1 :][:5] == [
        "after         early_life        work        home",
        "-" * 48,
        "early_life          0.86",
        "work                0.71        1.00",
        "home                0.80        0.95        0.86",
    ]


LONG = "docklands_tram_driver_and_amateur_astron"  # 40 characters, as a real person's topics run


def test_every_column_of_the_table_fits_a_40_character_topic_name():
    assert len(LONG) == 40
    long = summary(MATRIX)
    long["topics"][0]["topic"] = long["forgetting"]["topics"][0] = LONG
    long["forgetting"]["acc"] = {"quiz.accuracy": 0.87}
    long["forgetting"]["bwt"] = {"quiz.accuracy": -0.06}
    lines = summary_table(long).splitlines()
    assert lines[0] == f"{'topic':<42}metric              before      after"
    assert lines[2] == f"{LONG}  quiz.accuracy         0.43       0.86"
    assert lines[3] == f"{'':42}gate dpo: ran (quiz.accuracy 0.71 >= 0.70)"
    assert lines[4] == f"{'work':<42}quiz.accuracy         0.29       1.00"
    start = lines.index("forgetting: quiz.accuracy of each topic (column) right after training each (row)")
    assert lines[start + 1] == f"{'after':<42}  {LONG}{'work':>42}{'home':>42}"
    assert lines[start + 3] == f"{LONG}  {'0.86':>42}"
    assert f"{LONG}  0.86 -> 0.80  (-0.06)" in lines
    assert f"{'work':<42}1.00 -> 0.95  (-0.05)" in lines
    assert lines[-1] == (
        "quiz.accuracy: ACC 0.87 (mean over topics, now), "
        "BWT -0.06 (mean change of earlier topics since their own training)"
    )
    # Whatever the names, every value still stands under its column's header.
    assert len(lines[2]) == len(lines[4]) == len(lines[0])


def test_an_earlier_topic_that_lost_more_than_the_threshold_is_flagged():
    assert FORGOT_THRESHOLD == 0.1
    lines = summary_table(summary(MATRIX)).splitlines()
    # against its own last evaluation (the diagonal), now (the last row)
    assert "early_life  0.86 -> 0.80  (-0.06)" in lines
    assert "work        1.00 -> 0.95  (-0.05)" in lines
    flagged = summary_table(summary([*MATRIX[:2], [0.71, 0.95, 0.86]])).splitlines()
    assert "early_life  0.86 -> 0.71  (-0.15, forgot)" in flagged
    assert "work        1.00 -> 0.95  (-0.05)" in flagged
    exactly = summary_table(summary([*MATRIX[:2], [0.76, 0.9, 0.86]]))
    assert "forgot" not in exactly  # a fall of exactly 0.10 is not more than 0.10


def test_no_matrix_for_one_topic_or_without_recheck():
    assert "forgetting" not in summary_table(summary(MATRIX[:1]))
    without = summary(MATRIX)
    del without["forgetting"]
    assert "forgetting" not in summary_table(without)


def test_a_run_that_stopped_early_compares_with_its_last_finished_topic():
    lines = summary_table(summary(MATRIX[:2])).splitlines()
    assert "early_life  0.86 -> 0.71  (-0.15, forgot)" in lines
    assert not any(line.startswith("work        1.00 ->") for line in lines)


def test_the_reporter_prints_each_recheck_under_its_topic():
    from align.testing import make_topic

    stream = io.StringIO()
    ConsoleReporter(stream).recheck_end(
        make_topic(name="home"),
        {"early_life": {"quiz.accuracy": 0.71, "voice.margin": 0.3}, "work": {"quiz.accuracy": 1.0}},
    )
    assert stream.getvalue().splitlines() == [
        "  recheck    early_life: quiz.accuracy 0.71",
        "             work: quiz.accuracy 1.00",
    ]


def test_control_characters_in_a_metric_name_reach_the_terminal_escaped():
    """A plugin's metric named with an ANSI sequence cleared the screen (or forged a line)."""
    from align.testing import make_topic

    stream = io.StringIO()
    reporter = ConsoleReporter(stream)
    reporter.recheck_end(make_topic(name="home"), {"work": {"\x1b[2J\x1b[Hquiz.accuracy\r": 1.0}})
    reporter.recheck_end(make_topic(name="home"), {"work": {"voice\u202eerocs": 0.5}})
    printed = stream.getvalue()
    assert "\x1b" not in printed and "\r" not in printed and "\u202e" not in printed
    assert printed.splitlines() == [
        "  recheck    work: \\x1b[2J\\x1b[Hquiz.accuracy\\r 1.00",
        "  recheck    work: voice\\u202eerocs 0.50",
    ]


def test_printable_escapes_what_a_terminal_acts_on_and_keeps_text():
    from align.errors import printable

    assert printable("Ilse Várrow 🌊\tlives\nhere") == "Ilse Várrow 🌊\tlives\nhere"
    assert printable("a\x1b[31mb\x07\x9b\x7f") == "a\\x1b[31mb\\x07\\x9b\\x7f"
    assert printable("one\ntwo\r", newlines=False) == "one\\ntwo\\r"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def report_a_topic(reporter):
    from align.core.engine import StepResult, TopicResult
    from align.testing import make_topic

    plan = type(
        "Plan", (), {"topics": [make_topic(name="home")], "steps": [], "config": {"model": {"path": "m"}}}
    )
    home = plan.topics[0]
    reporter.run_start(plan, "runs/x")
    reporter.topic_start(0, 1, home)
    for done, loss in ((1, 0.9), (2, 0.7), (3, 0.5)):
        reporter.step_log("sft", {"loss": loss, "step": done, "max_steps": 3})
    sft = StepResult("sft", "train", "ran", {"sft.first_loss": 0.9, "sft.final_loss": 0.5, "sft.steps": 3})
    reporter.step_end(home, sft)
    reporter.topic_end(home, TopicResult("home", [sft]))
    reporter.run_end({"steps": ["sft"], "topics": [], "output": "runs/x", "seconds": 1.0})


def test_a_terminal_gets_progress_bars_with_the_live_loss():
    stream = Terminal()
    report_a_topic(ConsoleReporter(stream))
    text = stream.getvalue()
    assert "topic home" in text and "0/1" in text and "1/1" in text  # the topics bar
    assert "3/3" in text and "loss 0.5000" in text and "<" in text  # the step bar: loss, ETA
    assert "  sft        loss 0.900 → 0.500, 3 steps" in text


def test_elsewhere_a_plain_line_per_step_and_no_bars():
    stream = io.StringIO()
    report_a_topic(ConsoleReporter(stream))
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and "loss 0.7000" not in stream.getvalue()
    assert lines[:4] == [
        "align: 1 topics, model m, output runs/x",
        "protocol: ",
        "[1/1] home",
        "  sft        loss 0.900 → 0.500, 3 steps  [0.0s]",
    ]


def test_into_a_pipe_a_training_step_prints_a_progress_line_at_a_steady_interval():
    """``align run | tee log``: no bars, but a line every ``progress_interval`` seconds."""
    import os

    from align.core.engine import StepResult
    from align.testing import make_topic

    read_end, write_end = os.pipe()
    now = [100.0]
    with os.fdopen(write_end, "w") as pipe:
        assert not pipe.isatty()
        reporter = ConsoleReporter(pipe, progress_interval=30, clock=lambda: now[0])
        home = make_topic(name="home")
        reporter.topic_start(0, 1, home)
        for done in range(1, 11):
            now[0] += 10  # an optimizer step takes 10 s
            reporter.step_log("sft", {"loss": 1.0 / done, "step": done, "max_steps": 10})
        reporter.step_end(home, StepResult("sft", "train", "ran", {"sft.steps": 10}))
        now[0] += 40
        reporter.step_log("dpo", {"loss": 0.25, "step": 1, "max_steps": 2})
    with os.fdopen(read_end) as pipe:
        lines = pipe.read().splitlines()
    assert lines == [
        "[1/1] home",
        "  sft: step 3/10, loss 0.3333, 30s elapsed",
        "  sft: step 6/10, loss 0.1667, 60s elapsed",
        "  sft: step 9/10, loss 0.1111, 90s elapsed",
        "  sft        10 steps  [0.0s]",
        "  dpo: step 1/2, loss 0.2500, 40s elapsed",  # elapsed counts from the step's own start
    ]


def test_quiet_prints_nothing_even_on_a_terminal():
    stream = Terminal()
    report_a_topic(ConsoleReporter(stream, quiet=True))
    assert stream.getvalue() == ""


def test_the_run_starts_with_what_the_gate_means_in_questions_and_warns_on_a_small_quiz():
    from align.console import gates_in_questions
    from align.core.plan import resolve_plan
    from align.plugins.manager import load_plugins
    from align.testing import make_topic

    quiz = [{"question": f"Q{i}?", "choices": ["yes", "no"], "answer": 0} for i in range(6)]
    protocol = [
        {"name": "before", "evaluate": ["quiz"]},
        {"name": "sft", "train": "sft", "gate": {"use": "threshold", "all": ["quiz.accuracy < 0.5"]}},
        {
            "name": "after",
            "evaluate": ["quiz"],
            "rollback": {"step": "sft", "max_drop": {"quiz.accuracy": 0.2}},
        },
    ]
    registry = load_plugins().registry
    plan = resolve_plan(
        {"protocol": protocol}, "c.yaml", registry, topics=[make_topic(name="home", quiz=quiz)]
    )
    assert gates_in_questions(plan) == (
        [
            "home: 6 quiz questions: quiz.accuracy < 0.50 allows at most 2 of 6; "
            "a rollback on a drop of more than 0.20 triggers on 2 flipped answers"
        ],
        [],
    )
    stream = io.StringIO()
    ConsoleReporter(stream).run_start(plan, "runs/x")
    assert "  home: 6 quiz questions: quiz.accuracy < 0.50 allows at most 2 of 6;" in stream.getvalue()


def test_the_topics_bar_eta_counts_optimizer_steps_from_the_first_topic_and_after_a_resume():
    from align.testing import make_topic

    plan = type(
        "Plan",
        (),
        {
            "topics": [],
            "steps": [
                type("Step", (), {"name": n, "kind": k, "gate": None, "rollback": None})
                for n, k in (
                    ("before", "eval"),
                    ("sft", "train"),
                    ("dpo", "train"),
                )
            ],
            "config": {"model": {"path": "m"}},
        },
    )
    now = [0.0]
    stream = Terminal()
    reporter = ConsoleReporter(stream, clock=lambda: now[0])
    reporter.run_start(plan, "runs/x")
    reporter.topic_start(0, 3, make_topic(name="home"))
    for done in (1, 2):
        now[0] += 10  # 10 s an optimizer step
        reporter.step_log("sft", {"loss": 0.5, "step": done, "max_steps": 4})
    # 2 sft steps left here, and 4 in each of the 2 topics after it (dpo not seen yet): 10 steps
    assert reporter.eta_seconds("sft", 2) == 100
    assert "ETA 01:40" in stream.getvalue()
    reporter.close()
    # Resumed at the last topic: the topics done before do not make the run look faster.
    now[0] = 1000.0
    resumed = ConsoleReporter(Terminal(), clock=lambda: now[0])
    resumed.run_start(plan, "runs/x")
    resumed.topic_start(2, 3, make_topic(name="work"))
    now[0] += 10
    resumed.step_log("sft", {"loss": 0.5, "step": 1, "max_steps": 4})
    assert resumed.eta_seconds("sft", 1) == 30
    resumed.close()
