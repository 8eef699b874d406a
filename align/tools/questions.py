"""``align questions``: each quiz question of a run, answered by the bare model, right after its own
topic and at the end of the run, so a user sees which answers the run never learnt, which later
topics took, and which it keeps by a lead small enough to be taken next.

A run records each topic's quiz accuracy and mean margin; this reads the saved adapters back and
scores every question with three models: the bare one, the topic's own adapter
(``adapters/<topic>``, saved after the topic's last step) and the run's final adapter (the last
topic's). The quiz is scored as the run scores it, with the run's ``quiz:`` settings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from align.errors import AlignError
from align.tools.evaluation import build_evaluators
from align.tools.loading import load
from align.tools.runs import ADAPTER_CONFIG, find_run, read_run_config, read_run_topics, read_summary

#: A right answer whose lead over the best wrong choice is under this (nats per character, as the
#: quiz scores with ``normalize: chars``) is reported ``weak``: over 24 runs of the two example
#: sets, an answer right by less than this after its own topic was lost by the end 18 times in 57,
#: one right by more 22 times in 544 (docs/quality.md, "Which answers a run loses").
WEAK_MARGIN = 0.5

#: What each status means, in the order the closing line counts them.
STATUSES = {
    "lost": "right after its own topic, wrong at the end: a later topic took it",
    "never learnt": "wrong right after its own topic and at the end",
    "learnt later": "wrong right after its own topic, right at the end",
    "weak": f"right at the end, by a lead under {WEAK_MARGIN:.2f}: the kind of answer later topics take",
    "kept": "right after its own topic and at the end",
    "not trained": "the run has not trained its topic yet",
}


def question_status(
    own: Mapping[str, Any] | None, final: Mapping[str, Any], weak: float = WEAK_MARGIN
) -> str:
    """One question's status from its scores (``right``, ``margin``) after its own topic and at the end."""
    if own is None:
        return "not trained"
    if not own["right"]:
        return "learnt later" if final["right"] else "never learnt"
    if not final["right"]:
        return "lost"
    return "weak" if final["margin"] < weak else "kept"


def run_questions(registry: Any, run: str | Path, model: str | None = None) -> dict[str, Any]:
    """What ``align questions`` prints: every quiz question of ``run`` scored by the bare model,
    its topic's own adapter and the run's final adapter."""
    run = find_run(run)
    summary = read_summary(run)
    topics = read_run_topics(run)
    with_quiz = [topic for topic in topics if topic.quiz]
    if not with_quiz:
        raise AlignError(
            f"{run / 'topics.json'}: no topic has a quiz, so there is no question to show; "
            "`align eval --adapter` scores the run's adapters with its other evaluators"
        )
    saved = {
        entry["topic"]: run / entry["adapter"]
        for entry in summary["topics"]
        if entry.get("adapter") and (run / entry["adapter"] / ADAPTER_CONFIG).is_file()
    }
    if not saved:
        raise AlignError(
            f"{run}: no adapters saved yet (adapters/<topic>/); a run saves one after each topic"
        )
    final_topic = [topic.name for topic in topics if topic.name in saved][-1]
    component = build_evaluators(registry, ["quiz"], with_quiz, read_run_config(run))[0]
    quiz = component.instance
    if not callable(getattr(quiz, "score_questions", None)):  # a plugin's 'quiz' in place of align's
        raise AlignError(
            f"evaluator 'quiz' (plugin '{component.plugin}') scores no single questions (it has no "
            "score_questions method); `align questions` needs align's own quiz evaluator"
        )

    loaded = load(saved[final_topic], model)
    slots = {final_topic: "default"}  # what load() names the adapter it attaches
    for index, topic in enumerate(with_quiz):
        if topic.name in saved and topic.name != final_topic:
            slots[topic.name] = f"topic{index}"
            loaded.add_adapter(saved[topic.name], name=slots[topic.name])
    language_model = loaded.language_model()

    def score(slot: str | None, topic: Any) -> list[dict[str, Any]]:
        if slot is None:
            with loaded.bare():
                scored = quiz.score_questions(language_model, topic)
        else:
            loaded.model.set_adapter(slot)
            scored = quiz.score_questions(language_model, topic)
        return [
            {"margin": item.margin, "right": item.picked == item.answer, "picked": item.picked}
            for item in scored
        ]

    entries = []
    for topic in with_quiz:
        bare = score(None, topic)
        final = score(slots[final_topic], topic)
        own_slot = slots.get(topic.name)
        own = score(own_slot, topic) if own_slot is not None else [None] * len(topic.quiz)
        questions = []
        for number, (item, b, o, f) in enumerate(zip(topic.quiz, bare, own, final), start=1):
            questions.append(
                {
                    "number": number,
                    "question": item.question,
                    "answer": item.choices[item.answer],
                    "picked": {
                        "own": None if o is None else item.choices[o["picked"]],
                        "final": item.choices[f["picked"]],
                    },
                    "margin": {
                        "bare": b["margin"],
                        "own": None if o is None else o["margin"],
                        "final": f["margin"],
                    },
                    "right": {
                        "bare": b["right"],
                        "own": None if o is None else o["right"],
                        "final": f["right"],
                    },
                    "status": question_status(o, f),
                }
            )
        entries.append({"topic": topic.name, "questions": questions})
    counts = {
        status: sum(q["status"] == status for e in entries for q in e["questions"]) for status in STATUSES
    }
    return {
        "run": str(run),
        "model": loaded.settings["path"],
        "final_adapter": str(saved[final_topic].relative_to(run)),
        "weak_margin": WEAK_MARGIN,
        "topics": entries,
        "counts": {status: n for status, n in counts.items() if n},
    }


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def questions_table(result: Mapping[str, Any]) -> str:
    """``align questions``' table: a line per question, the answer a wrong one was given instead
    below it, and a closing line counting each status."""
    from align.console import column_width

    entries: Sequence[Mapping[str, Any]] = result["topics"]
    lines = [
        f"run {result['run']}, final adapter {result['final_adapter']} (model {result['model']})",
        "margin: the right answer's score minus the best wrong one's, per character; "
        "below 0 the answer is wrong",
        "",
    ]
    topic_width = column_width("topic", (entry["topic"] for entry in entries))
    header = f"{'topic':<{topic_width}}{'#':>2}  {'bare':>6} {'own':>6} {'final':>6}  {'status':<13}question"
    lines += [header, "-" * len(header)]
    for entry in entries:
        for q in entry["questions"]:
            margin = q["margin"]
            lines.append(
                f"{entry['topic']:<{topic_width}}{q['number']:>2}  {_signed(margin['bare']):>6} "
                f"{_signed(margin['own']):>6} {_signed(margin['final']):>6}  {q['status']:<13}{q['question']}"
            )
            if q["status"] in ("lost", "never learnt"):
                picked = q["picked"]["final"]
                lines.append(
                    f"{'':<{topic_width + 2}}  answer: {q['answer']}; the final model picks: {picked}"
                )
    total = sum(len(entry["questions"]) for entry in entries)
    right = sum(q["right"]["final"] for entry in entries for q in entry["questions"])
    counts = ", ".join(f"{n} {status}" for status, n in result["counts"].items())
    lines += ["", f"{right} of {total} answers right at the end ({counts})"]
    lines += [f"  {status}: {STATUSES[status]}" for status in result["counts"] if status != "kept"]
    return "\n".join(lines)
