"""``align topics draft``: topic files drafted from the material people have, for them to review.

From text and markdown files (notes, transcripts, posts):

- passages: the paragraphs (split as a ``content: notes.md`` field splits them);
- topics: one per markdown section of the file's top heading level, else one per file;
- a quiz of cloze questions: a passage with one span blanked, the span found as SFT's clozes find
  theirs (:mod:`align.core.cloze`: a number, a name, a quoted word; else a word found nowhere else
  in the material), and three distractors of the same kind drawn from the spans of the rest of
  the material;
- preference pairs from ``Q: ... A: ...`` lines, without ``rejected`` (the model's own answer
  takes its place when the run trains).

From chat exports (a JSON list of ``{role, content}`` messages: the person's turns are the
assistant's) and pair files (JSON Lines, CSV, Parquet with ``prompt`` and ``chosen``): preference
pairs, each given to the topic whose text shares the most words with it. A topic's last pairs
(a third, at least one when it has two or more) are held out as its voice pairs.

Nothing is downloaded and no model is loaded. Every draft is checked as ``align validate``
checks topics before anything is written, and the command says what it could not draft.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align.core.cloze import BLANK, fact_spans, span_kind
from align.core.sources import TopicSources, passages, read_utf8
from align.core.topics import Topic
from align.errors import AlignError, TopicError

TEXT_SUFFIXES = (".md", ".markdown", ".txt")
PAIR_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
DISTRACTORS = 3
#: A word blanked when a passage has no number or name: one this long found nowhere else.
RARE_WORD_LENGTH = 7
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.+?)\s*#*\s*$")
_QA = re.compile(r"^\s*(?:[-*]\s+)?(?:\*\*|__)?(q|question|a|answer)\s*:(?:\*\*|__)?\s*(.*)$", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]+")


@dataclass
class Draft:
    """One topic as drafted: its name, where it came from, and its items."""

    name: str
    origin: str
    content: list[str] = field(default_factory=list)
    pairs: list[dict[str, str]] = field(default_factory=list)
    quiz: list[dict[str, Any]] = field(default_factory=list)

    def as_data(self) -> dict[str, Any]:
        held_out = max(1, len(self.pairs) // 3) if len(self.pairs) >= 2 else 0
        data: dict[str, Any] = {"name": self.name, "content": self.content}
        if self.quiz:
            data["quiz"] = self.quiz
        if self.pairs:
            data["preference_pairs"] = self.pairs[: len(self.pairs) - held_out]
        if held_out:
            data["voice_pairs"] = self.pairs[len(self.pairs) - held_out :]
        return data


@dataclass
class Drafted:
    """What :func:`draft_topics` made: the topic files' names and texts, and what it could not draft."""

    files: dict[str, str]
    topics: list[Topic]
    notes: list[str]


def slug(text: str) -> str:
    """A topic name from a heading or a file name: lower case, words joined by ``_``."""
    words = re.findall(r"[A-Za-z0-9]+", text.lower())
    name = "_".join(words)[:60].strip("_")
    return name or "topic"


def _sections(path: Path, text: str) -> list[tuple[str, str]]:
    """``(title, text)`` per section of the file's top heading level; text before the first
    heading is a section named after the file; without headings, the whole file is one."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    levels = [len(m.group(1)) for line in lines if (m := _HEADING.match(line))]
    if not levels:
        return [(path.stem, text)]
    top = min(levels)
    sections: list[tuple[str, list[str]]] = [(path.stem, [])]
    for line in lines:
        match = _HEADING.match(line)
        if match and len(match.group(1)) == top:
            sections.append((match.group(2), []))
        else:
            sections[-1][1].append(line)
    return [(title, "\n".join(body)) for title, body in sections if "\n".join(body).strip()]


def _split_qa(text: str) -> tuple[str, list[dict[str, str]]]:
    """The text without its ``Q:``/``A:`` lines, and the pairs they make (a line that follows one
    without a blank line continues it)."""
    kept: list[str] = []
    pairs: list[dict[str, str]] = []
    question: list[str] | None = None
    answer: list[str] | None = None
    current: list[str] | None = None

    def close() -> None:
        nonlocal question, answer
        if question and answer:
            pairs.append({"prompt": " ".join(question), "chosen": " ".join(answer)})
        question = answer = None

    for line in text.split("\n"):
        match = _QA.match(line)
        role = match.group(1).lower()[0] if match else None
        if match and (role == "q" or question is not None):  # an A: with no Q: before it is text
            rest = match.group(2).strip()
            if role == "q":
                close()
                question = current = [rest] if rest else []
            else:
                answer = current = [rest] if rest else []
            continue
        if current is not None and line.strip() and not _HEADING.match(line):
            current.append(line.strip())
            continue
        if not line.strip():
            current = None
            if answer is not None:
                close()
        kept.append(line)
    close()
    return "\n".join(kept), pairs


def _words(text: str) -> set[str]:
    return {re.sub(r"['’]s$", "", w.lower()) for w in _WORD.findall(text) if len(w) > 3}


def _quiz(drafts: Sequence[Draft], notes: list[str]) -> None:
    """A cloze question per passage, with distractors of the same kind from the whole material."""
    every = [passage for draft in drafts for passage in draft.content]
    word_counts: Counter[str] = Counter(w.lower() for passage in every for w in _WORD.findall(passage))
    # A capitalised word that only ever opens a sentence ("She", "Behind") is no name: a one-word
    # name must also be written capitalised inside a sentence somewhere in the material.
    inside = {
        m.group(1) for passage in every for m in re.finditer(r"(?<![.!?:;\s])\s+([A-Z][\w’'-]*)", passage)
    }
    spans_of = {
        passage: [s for s in fact_spans(passage) if span_kind(s) != "name" or " " in s or s in inside]
        for passage in every
    }
    frequency: Counter[str] = Counter(span for spans in spans_of.values() for span in set(spans))
    common = max(2, len(every) / 2)
    pools: dict[str, list[str]] = {"number": [], "name": [], "word": []}
    for spans in spans_of.values():
        for span in spans:
            if span not in pools[span_kind(span)]:
                pools[span_kind(span)].append(span)
    rare = {w for w, n in word_counts.items() if n == 1 and len(w) >= RARE_WORD_LENGTH}
    pools["word"] += [w for w in sorted(rare) if w not in pools["word"]]
    for draft in drafts:
        rng = random.Random(draft.name)  # the same draft from the same material, every time
        for number, passage in enumerate(draft.content, 1):
            shown = passage if len(passage) <= 50 else passage[:47] + "..."
            candidates = [(i, s) for i, s in enumerate(spans_of[passage]) if frequency[s] <= common]
            ranked = [s for _, s in sorted(candidates, key=lambda c: (frequency[c[1]], -c[0]))]
            ranked += [w for w in _WORD.findall(passage) if w in rare]  # lower case: not a name
            if not ranked:
                notes.append(
                    f"topic '{draft.name}': passage {number} ('{shown}'): no number, name or rare word to "
                    "blank, so no quiz question from it"
                )
                continue
            answer = ranked[0]
            kind = span_kind(answer)
            others = [s for s in pools[kind] if s != answer and s not in passage]
            if len(others) < DISTRACTORS:
                notes.append(
                    f"topic '{draft.name}': passage {number} ('{shown}'): only {len(others)} other {kind}"
                    f"{'s' if len(others) != 1 else ''} in the material to draw distractors from "
                    f"({DISTRACTORS} needed), so no quiz question from it"
                )
                continue
            choices = rng.sample(others, DISTRACTORS)
            index = rng.randrange(DISTRACTORS + 1)
            choices.insert(index, answer)
            draft.quiz.append(
                {
                    "question": f"{_blank(passage, answer)} What is the missing {kind}?",
                    "choices": choices,
                    "answer": index,
                }
            )


def _blank(passage: str, span: str) -> str:
    """``passage`` with its first whole-word ``span`` blanked."""
    return re.sub(rf"(?<!\w){re.escape(span)}(?!\w)", BLANK, passage, count=1)


def _pair_file(path: Path, sources: TopicSources) -> list[dict[str, str]]:
    """The pairs of a chat export or a pair file, read as a topic's ``preference_pairs: FILE``."""
    topic = Topic.from_dict(
        {"name": "draft", "content": ["-"], "preference_pairs": path.name}, str(path), path.parent, sources
    )
    return [{"prompt": p.prompt, "chosen": p.chosen} for p in topic.preference_pairs]


def _closest(pair: dict[str, str], drafts: Sequence[Draft]) -> Draft:
    """The draft whose passages share the most words with ``pair``, a word counting less the more
    topics use it; ties go to the earlier topic."""
    words = _words(pair["prompt"] + " " + pair["chosen"])
    vocabularies = [_words(" ".join(d.content)) for d in drafts]
    used = Counter(word for vocabulary in vocabularies for word in vocabulary)
    scores = [sum(1 / used[word] for word in words & vocabulary) for vocabulary in vocabularies]
    return drafts[scores.index(max(scores))]


def draft_topics(notes_files: Sequence[str | Path], sources: TopicSources | None = None) -> Drafted:
    """Draft topic files from ``notes_files``; raises :class:`AlignError` for input it cannot read."""
    sources = sources or TopicSources.builtin()
    drafts: list[Draft] = []
    loose: list[tuple[Path, list[dict[str, str]]]] = []
    notes: list[str] = []
    for given in notes_files:
        path = Path(given)
        if not path.exists():
            raise AlignError(f"{path}: notes file not found")
        if path.is_dir():
            raise AlignError(f"{path}: is a directory; give the notes files themselves (e.g. {path}/*.md)")
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            text = read_utf8(path, AlignError)
            for title, body in _sections(path, text):
                rest, pairs = _split_qa(body)
                draft = Draft(slug(title), str(path), passages(rest), pairs)
                if not draft.content and not draft.pairs:
                    continue
                drafts.append(draft)
        elif suffix in PAIR_SUFFIXES:
            try:
                loose.append((path, _pair_file(path, sources)))
            except TopicError as exc:
                raise AlignError(str(exc)) from None
        else:
            raise AlignError(
                f"{path}: cannot draft from '{suffix or path.name}' files; give text or markdown "
                f"({', '.join(TEXT_SUFFIXES)}), a chat export (.json) or a pairs file ({', '.join(PAIR_SUFFIXES)})"
            )
    with_text = [d for d in drafts if d.content]
    for path, pairs in loose:
        if with_text:
            for pair in pairs:
                _closest(pair, with_text).pairs.append(pair)
        else:  # a chat alone: the person's answers are what there is to learn
            drafts.append(Draft(slug(path.stem), str(path), [p["chosen"] for p in pairs], pairs))
    for draft in [d for d in drafts if not d.content]:
        notes.append(
            f"topic '{draft.name}' ({draft.origin}): Q/A lines without passages to learn; its pairs "
            "are left out (put them under a heading with notes)"
        )
    drafts = [d for d in drafts if d.content]
    if not drafts:
        raise AlignError(
            f"{', '.join(map(str, notes_files))}: nothing to draft (no paragraphs of text); give notes "
            "with paragraphs separated by blank lines"
        )
    names: Counter[str] = Counter()
    for draft in drafts:
        names[draft.name] += 1
        if names[draft.name] > 1:
            draft.name = f"{draft.name}_{names[draft.name]}"
    _quiz(drafts, notes)
    files: dict[str, str] = {}
    topics: list[Topic] = []
    for number, draft in enumerate(drafts, 1):
        if not draft.pairs:
            notes.append(
                f"topic '{draft.name}': no Q/A lines or pairs went with it, so no preference_pairs or "
                "voice_pairs; add some (rejected may be left out) before running DPO or the voice evaluators on it"
            )
        elif len(draft.pairs) == 1:
            notes.append(f"topic '{draft.name}': one pair, trained on; none left to hold out as voice_pairs")
        if not draft.quiz:
            notes.append(
                f"topic '{draft.name}': no quiz question could be drafted; write some before evaluating it"
            )
        filename = f"{number:02d}_{draft.name}.yaml"
        data = draft.as_data()
        topics.append(Topic.from_dict(data, filename))  # as align validate checks it
        header = (
            f"# Drafted by `align topics draft` from {Path(draft.origin).name}: review every passage, quiz\n"
            "# answer and pair before training. Pairs without rejected get the model's own answers.\n"
        )
        files[filename] = header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
    return Drafted(files=files, topics=topics, notes=notes)


def write_drafts(drafted: Drafted, output: str | Path) -> list[Path]:
    """Write the drafts into ``output``, which must be empty or new; on a failure, nothing is kept."""
    from align.core.rundir import atomic_write_text

    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        what = "not empty" if output.is_dir() else "a file"
        raise AlignError(
            f"{output}: {what}; draft into a new or empty directory (drafts never overwrite files)"
        )
    existed = output.exists()
    written: list[Path] = []
    try:
        output.mkdir(parents=True, exist_ok=True)
        for name, text in drafted.files.items():
            atomic_write_text(output / name, text)
            written.append(output / name)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        if not existed:
            output.rmdir()
        raise AlignError(f"{output}: could not write the drafts: {exc.strerror}; nothing was kept") from None
    return written
