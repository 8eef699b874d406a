"""Topics: what the model should learn about one subject, and how that is checked.

A topic file is YAML or JSON. A directory of topic files is a topic set, run in file-name order.
"""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align.core.sources import ROWS, TOPICS, TopicSources, is_saved_dataset
from align.errors import AlignError, TopicError, brief, closest

TOPIC_SUFFIXES = (".yaml", ".yml", ".json")
MAX_TOPIC_FILE_BYTES = 16 * 1024 * 1024
# A topic name becomes a directory name under the run's adapters/: keep it a plain file name.
# Matched whole (fullmatch): with `match`, a `$` also accepts a trailing newline ("first\n").
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_NAME_LENGTH = 100
#: Names Windows reserves for devices, with any extension (``nul.txt`` too): no file or directory
#: can be called that there, so the run's adapters/<name> could not be copied to it.
_WINDOWS_RESERVED = re.compile(r"(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³])(\..*)?", re.IGNORECASE)
_TOPIC_KEYS = ("name", "content", "quiz", "preference_pairs", "voice_pairs")
#: No config or topic is nested deeper than this (lists and mappings inside one another); deeper
#: data is refused as read, before anything walks it recursively (100,000 levels: RecursionError).
MAX_DEPTH = 100
#: How many values YAML aliases (``*name``) may add by repeating an anchored value: a few hundred
#: bytes of aliases ("billion laughs") expand to 10**9 values, which anything that walks or prints
#: them (a message's repr) takes minutes and gigabytes to.
MAX_ALIAS_VALUES = 1_000_000


@dataclass(frozen=True)
class QuizItem:
    """A multiple-choice question; ``answer`` is the index of the right choice.

    ``given`` is the answer as the topic file wrote it when that was the choice's text (or a
    number that is a choice's text), not its index; ``None`` when the file gave the index."""

    question: str
    choices: tuple[str, ...]
    answer: int
    given: str | int | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.choices, list):  # read-only, as the frozen dataclass around it
            object.__setattr__(self, "choices", tuple(self.choices))


#: A generated ``rejected`` answer (see :class:`PreferencePair`) when the model answers with nothing.
NO_ANSWER = "I don't know."


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) answer.

    ``rejected`` is ``None`` when the topic left it out: the model's own answer to the prompt
    takes its place, generated when it is needed (see :mod:`align.objectives.dpo`)."""

    prompt: str
    chosen: str
    rejected: str | None = None


@dataclass(frozen=True)
class Topic:
    """One subject: passages to learn, a quiz for knowledge, and answer pairs for voice.

    ``preference_pairs`` train the voice (DPO); ``voice_pairs`` have the same shape and are held
    out from training to score it.
    """

    name: str
    content: tuple[str, ...]
    quiz: tuple[QuizItem, ...] = ()
    preference_pairs: tuple[PreferencePair, ...] = ()
    voice_pairs: tuple[PreferencePair, ...] = ()
    source: str = field(default="<dict>", compare=False)

    def __post_init__(self) -> None:
        # Read-only all the way down: every step and plugin is handed the same topic, and one that
        # appended to a list given here would change what later steps train on.
        for name in ("content", "quiz", "preference_pairs", "voice_pairs"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        source: str = "<dict>",
        base_dir: Path | None = None,
        sources: TopicSources | None = None,
    ) -> Topic:
        """Build and validate a topic; errors name ``source``, the item and the field.

        A field may name data files instead of listing its items (``preference_pairs:
        pairs.jsonl``); they are read, relative to ``base_dir`` (the topic file's directory), with
        ``sources``' readers (the built-in ones by default), and their rows become the items."""
        fields = _Fields(source, base_dir, sources)
        if not isinstance(data, Mapping):
            raise TopicError(f"{source}: a topic must be a mapping with keys {', '.join(_TOPIC_KEYS)}")
        for key in data:
            if key not in _TOPIC_KEYS:
                hint = closest(str(key), _TOPIC_KEYS)
                raise TopicError(
                    f"{source}: unknown topic key '{key}'{hint} (valid: {', '.join(_TOPIC_KEYS)})"
                )
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise TopicError(f"{source}: name: required, a non-empty string such as 'early_life'")
        check_topic_name(name, source)
        content = tuple(_passage(item, at) for item, at in fields.items(data, "content"))
        if not content:
            raise TopicError(f"{source}: content: required, a non-empty list of passages to learn")
        return cls(
            name=name,
            content=content,
            quiz=tuple(_quiz_item(item, at) for item, at in fields.items(data, "quiz")),
            preference_pairs=tuple(_pair(item, at) for item, at in fields.items(data, "preference_pairs")),
            voice_pairs=tuple(_pair(item, at) for item, at in fields.items(data, "voice_pairs")),
            source=source,
        )

    def to_dict(self) -> dict[str, Any]:
        """The topic as plain data, the inverse of :meth:`from_dict` (every item inline, the rows
        of data files too: what a run records in ``topics.json``)."""
        return {
            "name": self.name,
            "content": list(self.content),
            "quiz": [
                {"question": q.question, "choices": list(q.choices), "answer": q.answer} for q in self.quiz
            ],
            "preference_pairs": [_pair_dict(p) for p in self.preference_pairs],
            "voice_pairs": [_pair_dict(p) for p in self.voice_pairs],
        }


def _pair_dict(pair: PreferencePair) -> dict[str, str]:
    data = {"prompt": pair.prompt, "chosen": pair.chosen}
    if pair.rejected is not None:
        data["rejected"] = pair.rejected
    return data


@dataclass(frozen=True)
class _At:
    """Where an item was written, for its errors: ``alpha.yaml: quiz[0]`` (``quiz[0].answer``), or
    a data file's row, ``pairs.jsonl: row 3`` (``row 3, column 'chosen'``)."""

    source: str
    where: str
    columns: Mapping[str, str] | None = None  # a data file's row: field → the file's column

    @property
    def row(self) -> bool:
        return self.columns is not None

    def __call__(self, key: str | None = None) -> str:
        if key is None:
            return f"{self.source}: {self.where}"
        if self.columns is not None:
            return f"{self.source}: {self.where}, column '{self.columns.get(key, key)}'"
        return f"{self.source}: {self.where}.{key}"

    def inner(self, key: str) -> _At:
        """The place of a list inside this item (``quiz[0].choices``)."""
        if self.columns is not None:
            return _At(self.source, f"{self.where}, column '{self.columns.get(key, key)}'")
        return _At(self.source, f"{self.where}.{key}")


#: The columns of a data file each field reads (``columns:`` maps them to the file's own names).
FIELD_COLUMNS = {
    "content": ("text",),
    "quiz": ("question", "choices", "answer"),
    "preference_pairs": ("prompt", "chosen", "rejected", "messages"),
    "voice_pairs": ("prompt", "chosen", "rejected", "messages"),
}
_REFERENCE_KEYS = ("path", "columns")


class _Fields:
    """A topic's items, each with where it was written: listed inline, or the rows of data files."""

    def __init__(self, source: str, base_dir: Path | None, sources: TopicSources | None):
        self.source = source
        self.base_dir = base_dir
        self.sources = sources

    def items(self, data: Mapping[str, Any], key: str) -> list[tuple[Any, _At]]:
        value = data.get(key, [])
        if value is None:
            return []
        if isinstance(value, list):
            entries = value
        elif isinstance(value, str) or (isinstance(value, Mapping) and "path" in value):
            entries = [value]
        elif key == "content":
            raise TopicError(f"{self.source}: content: must be a list of strings, got {type(value).__name__}")
        else:
            raise TopicError(f"{self.source}: {key}: must be a list, got {type(value).__name__}")
        found: list[tuple[Any, _At]] = []
        for i, entry in enumerate(entries):
            # A passage is a string: in content's list, only {path: ...} names a file.
            in_list = isinstance(value, list)
            is_reference = (isinstance(entry, str) and (key != "content" or not in_list)) or (
                isinstance(entry, Mapping) and "path" in entry
            )
            where = f"{key}[{i}]" if in_list else key
            if is_reference:
                found += self.file_items(entry, key, where)
            else:
                at = _At(self.source, f"{key}[{i}]")
                if key.endswith("_pairs") and _conversational(entry):
                    _check_keys(entry, FIELD_COLUMNS[key], at)
                    entry = _row_item(entry, key, {f: f for f in FIELD_COLUMNS[key]}, at)
                found.append((entry, at))
        return found

    def file_items(self, entry: Any, key: str, where: str) -> list[tuple[Any, _At]]:
        columns: dict[str, str] = {}
        if isinstance(entry, Mapping):
            for name in entry:
                if name not in _REFERENCE_KEYS:
                    raise TopicError(
                        f"{self.source}: {where}: unknown key '{name}'{closest(str(name), _REFERENCE_KEYS)} "
                        "(a data file is named with path: and, optionally, columns:)"
                    )
            columns = self.columns(entry.get("columns"), key, where)
            paths = entry["path"] if isinstance(entry["path"], list) else [entry["path"]]
        else:
            paths = [entry]
        found: list[tuple[Any, _At]] = []
        for name in paths:
            if not isinstance(name, str) or not name.strip():
                raise TopicError(f"{self.source}: {where}.path: must be a file name or a list of file names")
            found += self.rows(name, key, where, columns)
        return found

    def columns(self, value: Any, key: str, where: str) -> dict[str, str]:
        if value is None:
            return {}
        fields = FIELD_COLUMNS[key]
        if not isinstance(value, Mapping) or not all(isinstance(v, str) and v for v in value.values()):
            raise TopicError(
                f"{self.source}: {where}.columns: must map {key}'s fields to the file's column names, "
                f"e.g. {{{fields[0]}: <column>}}"
            )
        for name in value:
            if name not in fields:
                raise TopicError(
                    f"{self.source}: {where}.columns: unknown field '{name}'{closest(str(name), fields)} "
                    f"({key} reads {', '.join(fields)})"
                )
        return dict(value)

    def rows(self, name: str, key: str, where: str, columns: dict[str, str]) -> list[tuple[Any, _At]]:
        if self.base_dir is None:
            raise TopicError(
                f"{self.source}: {where}: names the data file '{name}', but this topic was not read from a "
                "file; list the items instead"
            )
        path = Path(name).expanduser()
        path = path if path.is_absolute() else self.base_dir / path
        named = f"named by {where} in {self.source}"
        if not path.exists():
            suffix = Path(name.strip()).suffix
            if key == "content" and (not suffix or any(c.isspace() for c in suffix)):  # a passage, not a file
                raise TopicError(f"{self.source}: content: must be a list of strings, got str")
            raise TopicError(f"{path}: data file not found ({named}; paths are relative to the topic file)")
        sources = self.sources or TopicSources.builtin()
        reader = sources.find(path, ROWS)
        if reader is None:
            raise TopicError(
                f"{path}: no reader for this file ({named}); use {', '.join(sources.suffixes(ROWS))} "
                "or a save_to_disk directory, or add a reader plugin (register_topic_sources)"
            )
        rows = sources.read(reader, path)
        if not rows:
            raise TopicError(
                f"{path}: no rows (an empty split); add rows, or leave it out of {where} in {self.source}"
            )
        column = {field: columns.get(field, field) for field in FIELD_COLUMNS[key]}
        have: list[str] = []
        for row in rows:
            have += [str(c) for c in row if str(c) not in have]
        if key != "content" and key != "quiz" and _is_chat(have, column):
            return _chat_pairs(rows, path)
        needed = _needed_fields(key, rows[0], column)
        for wanted in needed:
            if column[wanted] not in have:
                mapping = f"{{path: {name}, columns: {{{wanted}: <column>}}}}"
                raise TopicError(
                    f"{path}: no column '{column[wanted]}' for {key} (the file's columns: {', '.join(have)}); "
                    f"rename a column, or map one: {key}: {mapping}"
                )
        found = []
        for number, row in enumerate(rows, 1):
            at = _At(str(path), f"row {number}", column)
            found.append((_row_item(row, key, column, at), at))
        return found


def _is_chat(have: Sequence[str], column: Mapping[str, str]) -> bool:
    """Whether a file's rows are one conversation's messages (a chat export: role, content)."""
    return (
        {"role", "content"} <= set(have) and column["chosen"] not in have and column["messages"] not in have
    )


def _chat_pairs(rows: Sequence[Mapping[str, Any]], path: Path) -> list[tuple[Any, _At]]:
    """A chat export's pairs: each assistant turn (the person's) is chosen for the turn before it."""
    found = []
    for number, row in enumerate(rows, 1):
        at = _At(str(path), f"row {number}", {})
        role, content = row.get("role"), row.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise TopicError(f"{at('role' if not isinstance(role, str) else 'content')}: must be a string")
        previous = rows[number - 2] if number > 1 else None
        if role == "assistant" and previous is not None and previous.get("role") == "user":
            found.append(({"prompt": previous.get("content"), "chosen": content}, at))
    if not found:
        raise TopicError(
            f"{path}: a chat export (role, content) without a user turn answered by an assistant turn; "
            "the person's turns must be the assistant's"
        )
    return found


def _conversational(item: Any) -> bool:
    """Whether an inline pair is written as messages (TRL's conversational form, or ``messages``)."""
    return isinstance(item, Mapping) and (
        "messages" in item or any(isinstance(item.get(k), list) for k in ("prompt", "chosen", "rejected"))
    )


def _needed_fields(key: str, first: Mapping[str, Any], column: Mapping[str, str]) -> tuple[str, ...]:
    if key in ("content", "quiz"):
        return FIELD_COLUMNS[key]
    if column["chosen"] not in first and column["messages"] in first:
        return ("messages",)  # a chat: the last assistant turn is the answer
    if isinstance(first.get(column["chosen"]), list):
        return ("chosen",)  # conversational, the prompt implicit in the chosen messages
    return ("prompt", "chosen")


def _row_item(row: Mapping[str, Any], key: str, column: Mapping[str, str], at: _At) -> Any:
    """A data file's row as an inline item: its field's columns, other columns left out."""
    if key == "content":
        return row.get(column["text"])
    if key == "quiz":
        return {field: row.get(column[field]) for field in FIELD_COLUMNS["quiz"]}
    prompt, chosen, rejected = (row.get(column[f]) for f in ("prompt", "chosen", "rejected"))
    messages = row.get(column["messages"])
    if chosen is None and messages is not None:  # a chat export: the person's last turn is chosen
        before, chosen = _last_assistant(messages, at, "messages")
        prompt = prompt if prompt is not None else _prompt_text(before)
    elif isinstance(chosen, list):  # TRL's conversational form
        before, chosen = _last_assistant(chosen, at, "chosen")
        if isinstance(prompt, list):
            prompt = _prompt_text(_messages(prompt, at, "prompt"))
        elif prompt is None:
            prompt = _prompt_text(before)
    elif isinstance(prompt, list):
        prompt = _prompt_text(_messages(prompt, at, "prompt"))
    if isinstance(rejected, list):
        rejected = _last_assistant(rejected, at, "rejected")[1]
    if isinstance(rejected, str) and not rejected.strip():  # an empty cell: no rejected answer
        rejected = None
    item = {"prompt": prompt, "chosen": chosen}
    if rejected is not None:
        item["rejected"] = rejected
    return item


def _messages(value: Any, at: _At, key: str) -> list[Mapping[str, str]]:
    if not isinstance(value, list) or not all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        raise TopicError(
            f"{at(key)}: must be a string, or a list of messages each with a role and a content string"
        )
    return value


def _last_assistant(value: Any, at: _At, key: str) -> tuple[list[Mapping[str, str]], str]:
    """The messages before the last assistant turn, and that turn's content."""
    messages = _messages(value, at, key)
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == "assistant":
            return messages[:index], messages[index]["content"]
    raise TopicError(f"{at(key)}: has no assistant turn; the last assistant turn is the answer")


def _prompt_text(messages: Sequence[Mapping[str, str]]) -> str | None:
    """A prompt from the messages before the answer: the user's turn, or the turns as a transcript."""
    turns = [m for m in messages if m["role"] != "system"]
    if not turns:
        return None
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


def check_topic_name(name: str, source: str) -> None:
    """Refuse a topic name that cannot be a directory name on every system (it names the topic's
    adapter directory): too long, other characters, a name Windows reserves, a trailing dot."""
    if len(name) > MAX_NAME_LENGTH:
        raise TopicError(
            f"{source}: name: {name[:40]!r}… is {len(name)} characters long; a topic name is at most "
            f"{MAX_NAME_LENGTH} (it names the topic's adapter directory): shorten it"
        )
    if not _NAME_PATTERN.fullmatch(name):
        raise TopicError(
            f"{source}: name: {name!r} must be letters, digits, '_', '-' or '.', starting with a letter "
            "or digit (it names the topic's adapter directory)"
        )
    if name.endswith("."):
        raise TopicError(
            f"{source}: name: {name!r} ends with a dot, which Windows drops from a directory name; "
            "remove the dot (the name names the topic's adapter directory)"
        )
    if _WINDOWS_RESERVED.fullmatch(name):
        raise TopicError(
            f"{source}: name: {name!r} is a device name on Windows (CON, PRN, AUX, NUL, COM1-9, LPT1-9), "
            "where no directory can be called that; choose another name (it names the topic's adapter "
            "directory)"
        )


def _strings(value: Any, at: _At) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise TopicError(f"{at()}: must be a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise TopicError(f"{at()}[{i}]: must be a non-empty string")
    return tuple(value)


def _passage(item: Any, at: _At) -> str:
    if not isinstance(item, str) or not item.strip():
        got = f", got {type(item).__name__}" if at.row and not isinstance(item, str) else ""
        raise TopicError(f"{at('text') if at.row else at()}: must be a non-empty string{got}")
    return item


def _text(item: Mapping[str, Any], key: str, at: _At) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value.strip():
        if at.row and value is not None and not isinstance(value, str):
            raise TopicError(
                f"{at(key)}: must be a non-empty string, got {type(value).__name__} {brief(value)}; write it as text"
            )
        raise TopicError(f"{at(key)}: required, a non-empty string")
    return value


def _check_keys(item: Any, keys: Sequence[str], at: _At) -> None:
    if not isinstance(item, Mapping):
        raise TopicError(f"{at()}: must be a mapping with keys {', '.join(keys)}")
    for key in item:
        if key not in keys:
            raise TopicError(f"{at()}: unknown key '{key}'{closest(str(key), keys)}")


def _quiz_item(item: Any, at: _At) -> QuizItem:
    _check_keys(item, ("question", "choices", "answer"), at)
    question = _text(item, "question", at)
    raw_choices = item.get("choices")
    if at.row and isinstance(raw_choices, str):  # a CSV cell cannot hold a list: "a | b | c"
        raw_choices = [choice.strip() for choice in raw_choices.split("|")]
    choices = _strings(raw_choices, at.inner("choices"))
    if len(choices) < 2:
        raise TopicError(f"{at.inner('choices')()}: needs at least two choices, got {len(choices)}")
    first_seen: dict[str, int] = {}
    for i, choice in enumerate(choices):
        earlier = first_seen.setdefault(choice.strip(), i)
        if earlier != i:  # equal choices score equal, and a tie counts as the first: always right
            shown = choice.strip() if len(choice.strip()) <= 80 else choice.strip()[:77] + "..."
            raise TopicError(
                f"{at.inner('choices')()}[{i}]: '{shown}' is also choices[{earlier}]; "
                "the choices of a question must differ"
            )
    answer = item.get("answer")
    last = len(choices) - 1
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        got = "nothing" if answer is None else type(answer).__name__
        raise TopicError(
            f"{at('answer')}: must be the right choice's text or its 0-based index (0..{last}), got {got}"
        )
    if isinstance(answer, int) and 0 <= answer <= last:
        return QuizItem(question=question, choices=choices, answer=answer)
    # People write the answer itself (`answer: Brackenford`, `answer: 1979` among years): a value
    # that is a choice's text is that choice, whatever its type.
    index = _choice_index(str(answer), choices)
    if index is not None:
        return QuizItem(question=question, choices=choices, answer=index, given=answer)
    if isinstance(answer, int):
        raise TopicError(
            f"{at('answer')}: index {answer} is out of range for {len(choices)} choices; "
            f"use 0..{last}, or the right choice's text"
        )
    shown = answer.strip() if len(answer.strip()) <= 80 else answer.strip()[:77] + "..."
    hint = closest(answer.strip(), [c.strip() for c in choices])
    raise TopicError(
        f"{at('answer')}: '{shown}' is not one of the choices"
        + (hint or f"; give the right choice's text, or its 0-based index (0..{last})")
    )


def _choice_index(text: str, choices: tuple[str, ...]) -> int | None:
    """The index of the choice ``text`` names: equal but for surrounding spaces, else equal but for
    case when only one choice is; ``None`` when none is."""
    stripped = [choice.strip() for choice in choices]
    if text.strip() in stripped:
        return stripped.index(text.strip())
    folded = [i for i, choice in enumerate(stripped) if choice.casefold() == text.strip().casefold()]
    return folded[0] if len(folded) == 1 else None


def _pair(item: Any, at: _At) -> PreferencePair:
    _check_keys(item, ("prompt", "chosen", "rejected"), at)
    rejected = _text(item, "rejected", at) if item.get("rejected") is not None else None
    return PreferencePair(_text(item, "prompt", at), _text(item, "chosen", at), rejected)


class DuplicateKey(ValueError):
    """A key given twice in one mapping of a YAML or JSON file (the later would replace the earlier)."""

    def __init__(self, key: Any, first: int | None = None, second: int | None = None):
        shown = str(key) if len(str(key)) <= 80 else str(key)[:77] + "..."
        where = f", at lines {first} and {second}" if first is not None else ""
        super().__init__(
            f"{shown}: given twice{where}; keep one (the second would silently replace the first)"
        )


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a mapping that gives a key twice."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue  # keys merged in with '<<' may be overridden, as YAML says
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise DuplicateKey(key, lines[key], line)
                lines[key] = line
        return super().construct_mapping(node, deep=deep)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise DuplicateKey(key)
        data[key] = value
    return data


def _json_duplicate_lines(text: str) -> DuplicateKey | None:
    """The first key given twice in one object of ``text`` (valid JSON but for that), with both
    lines: ``object_pairs_hook`` sees the pairs without where they are."""
    stack: list[dict[str, int] | None] = []  # per open container: an object's keys, or None (array)
    line, index, expect_key = 1, 0, False
    while index < len(text):
        char = text[index]
        if char == '"':
            end = index + 1
            while text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            if expect_key and stack and stack[-1] is not None:
                key = json.loads(text[index : end + 1])
                if key in stack[-1]:
                    return DuplicateKey(key, stack[-1][key], line)
                stack[-1][key] = line
                expect_key = False
            index = end + 1  # a JSON string holds no raw newline
            continue
        if char == "\n":
            line += 1
        elif char in "{[":
            stack.append({} if char == "{" else None)
            expect_key = char == "{"
        elif char in "}]" and stack:
            stack.pop()
        elif char == ",":
            expect_key = bool(stack) and stack[-1] is not None
        index += 1
    return None


def check_shape(data: Any, where: str, what: str, error: type[AlignError]) -> None:
    """Refuse data nested deeper than :data:`MAX_DEPTH`, holding itself (``&a [*a]``), or whose
    aliases expand to more than :data:`MAX_ALIAS_VALUES` values. Walked without recursion, and each
    shared (aliased) list or mapping once, so a bomb is measured, never expanded."""

    def children(value: Any) -> list[Any] | None:
        if isinstance(value, Mapping):
            return list(value.values())
        return list(value) if isinstance(value, list) else None

    too_deep = error(
        f"{where}: nested more than {MAX_DEPTH} levels deep (lists or mappings inside one another); "
        f"a {what} is never that deep: check the file"
    )
    done: dict[int, tuple[int, int]] = {}  # a list or mapping's id → (values expanded, height)
    top = children(data)
    if top is None:
        return
    distinct = 1 + len(top)  # the values as written, each shared one once
    stack: list[list[Any]] = [[data, top, 1, 1]]  # value, children left, values so far, height
    while stack:
        frame = stack[-1]
        if frame[1]:
            child = frame[1].pop()
            grandchildren = children(child)
            if grandchildren is None:
                frame[2] += 1
            elif id(child) in done:
                size, height = done[id(child)]
                if len(stack) + height > MAX_DEPTH:
                    raise too_deep
                frame[2] += size
                frame[3] = max(frame[3], height + 1)
            elif any(entry[0] is child for entry in stack):
                raise error(
                    f"{where}: an alias refers to a value that holds it (*name inside &name), so the "
                    f"{what} would never end: write the values out"
                )
            elif len(stack) >= MAX_DEPTH:
                raise too_deep
            else:
                distinct += len(grandchildren)
                stack.append([child, grandchildren, 1, 1])
            continue
        value, _, size, height = stack.pop()
        done[id(value)] = (size, height)
        if stack:
            stack[-1][2] += size
            stack[-1][3] = max(stack[-1][3], height + 1)
    if done[id(data)][0] - distinct > MAX_ALIAS_VALUES:
        raise error(
            f"{where}: its aliases (*name) expand to more than {MAX_ALIAS_VALUES:,} values; a {what} "
            "needs far fewer: write the values out, or use fewer aliases"
        )


def read_data_file(path: Path, what: str, error: type[AlignError]) -> Any:
    """Read a YAML or JSON file as plain data (``yaml.safe_load``), raising ``error`` with one line.
    A key given twice in one mapping is an error: the later would silently replace the earlier."""
    try:
        status = path.stat()
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from None
    size = status.st_size
    if path.is_dir():
        raise error(f"{path}: is a directory, expected a {what}")
    if not stat.S_ISREG(status.st_mode):  # /dev/zero has no size and never ends; a pipe may block
        raise error(f"{path}: not a regular file (a device, a pipe or a socket), expected a {what}")
    if size > MAX_TOPIC_FILE_BYTES:
        raise error(
            f"{path}: {what} is {size / 2**20:.1f} MiB; the limit is "
            f"{MAX_TOPIC_FILE_BYTES / 2**20:.0f} MiB: split it into several files"
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from None
    if b"\0" in raw[:8192]:
        raise error(f"{path}: {what} is a binary file, not YAML or JSON text; point to the text file")
    try:
        # utf-8-sig: the byte-order mark some Windows editors begin a file with (JSON refused it).
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(
            f"{path}: {what} is not UTF-8 text (byte {exc.start} is not valid UTF-8); save it as UTF-8"
        ) from None
    try:
        if path.suffix == ".json":
            try:
                data = json.loads(text, object_pairs_hook=_unique_pairs)
            except DuplicateKey as exc:
                raise _json_duplicate_lines(text) or exc from None
        else:
            loader = _UniqueKeyLoader(text)  # a SafeLoader: plain data only
            try:
                data = loader.get_single_data()
            finally:
                loader.dispose()
    except RecursionError:
        raise error(
            f"{path}: nested more than {MAX_DEPTH} levels deep (lists or mappings inside one another); "
            f"a {what} is never that deep: check the file"
        ) from None
    except DuplicateKey as exc:
        raise error(f"{path}: {exc}") from None
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        kind = "JSON" if path.suffix == ".json" else "YAML"
        problem = getattr(exc, "problem", None) or getattr(exc, "msg", None) or str(exc)
        raise error(f"{path}: not valid {kind}{where}: {problem}") from None
    check_shape(data, str(path), what, error)
    return data


def load_topic_file(path: str | Path, sources: TopicSources | None = None) -> Topic:
    """Load and validate one topic file."""
    topics = _read_topic_file(Path(path), sources or TopicSources.builtin())
    if len(topics) != 1:
        raise TopicError(f"{path}: holds {len(topics)} topics; load it with load_topics")
    return topics[0]


def _topic_reader(path: Path, sources: TopicSources) -> Any:
    reader = sources.find(path, TOPICS)
    rows = None if reader is not None else sources.find(path, ROWS)
    if rows is not None and rows.name in ("text", "text_folder"):
        raise TopicError(
            f"{path}: text, not a topic file; name it in a topic file ('content: {path.name}' beside "
            f"'name:'), or draft topics from it: align topics draft {path} --output topics/"
        )
    if reader is None and (is_saved_dataset(path) or rows is not None):
        kind = "a datasets save_to_disk directory" if path.is_dir() else "a data file"
        raise TopicError(
            f"{path}: {kind}, not a topic file; name it in a topic file, e.g. "
            f"'preference_pairs: {path.name}' beside 'name:' and 'content:' (or quiz:, voice_pairs:)"
        )
    return reader


def _check_link(path: Path) -> None:
    """Refuse a link to anything but a topic file before reading it: a link to a system file
    (/etc/passwd, /proc/self/environ) must not be read, so that no message can show a line of it."""
    if path.is_symlink():
        target = path.resolve()
        if target.suffix not in TOPIC_SUFFIXES:
            raise TopicError(
                f"{path}: a link to {target}, which is not a topic file (.yaml, .yml or .json); align "
                "reads only topic files through a link: point the link at one, or copy the file here"
            )


def _read_topic_file(path: Path, sources: TopicSources, reader: Any = None) -> list[Topic]:
    _check_link(path)
    reader = reader or _topic_reader(path, sources)
    if reader is None:
        return [
            Topic.from_dict(read_data_file(path, "topic file", TopicError), str(path), path.parent, sources)
        ]
    return [Topic.from_dict(data, str(path), path.parent, sources) for data in sources.read(reader, path)]


def _references(data: Any, base_dir: Path) -> set[Path]:
    """The data files a topic mapping names (so a topic directory does not read them as topics)."""
    found: set[Path] = set()
    if not isinstance(data, Mapping):
        return found
    for key in FIELD_COLUMNS:
        value = data.get(key)
        entries = value if isinstance(value, list) else [value]
        for entry in entries:
            names = entry.get("path") if isinstance(entry, Mapping) else entry
            for name in names if isinstance(names, list) else [names]:
                if isinstance(name, str) and name.strip():
                    found.add((base_dir / Path(name).expanduser()).resolve())
    return found


def load_topics(path: str | Path, sources: TopicSources | None = None) -> list[Topic]:
    """Load a topic file, or every topic file in a directory in name order.

    ``sources`` are the readers (a plugin registry's, ``TopicSources.from_registry``); by default
    the built-in ones. In a directory, a data file that a topic names is not read as a topic."""
    path = Path(path)
    sources = sources or TopicSources.builtin()
    if path.is_dir() and not is_saved_dataset(path):
        readers = {}
        for p in sorted(path.iterdir()):
            reader = sources.find(p, TOPICS) if p.is_file() else None
            if reader is not None:
                readers[p] = reader
        if not readers:
            suffixes = ", ".join(f"*{s}" for s in sources.suffixes(TOPICS))
            raise TopicError(
                f"{path}: no topic files ({suffixes}) in this directory; add one or point to a file"
            )
        raw: dict[Path, list[Mapping[str, Any]] | TopicError] = {}
        for p, reader in readers.items():
            _check_link(p)
            try:
                raw[p] = sources.read(reader, p)
            except TopicError as exc:  # a data file a topic names may not read as a topic: see below
                raw[p] = exc
        named: set[Path] = set()
        for p, found in raw.items():
            if not isinstance(found, TopicError):
                for data in found:
                    named |= _references(data, p.parent)
        topics = []
        for p, found in raw.items():
            if p.resolve() in named:
                continue
            if isinstance(found, TopicError):
                raise found
            topics += [Topic.from_dict(data, str(p), p.parent, sources) for data in found]
    elif path.exists():
        topics = _read_topic_file(path, sources)
    else:
        raise TopicError(f"{path}: topic file or directory not found")
    check_unique_names(topics)
    return topics


def stray_data_files(path: str | Path, sources: TopicSources | None = None) -> list[str]:
    """A warning for each data file (or data directory) in the topic directory ``path`` that no
    topic names: it is not read, which a user who put it there may not expect."""
    path = Path(path)
    if not path.is_dir() or is_saved_dataset(path):
        return []
    sources = sources or TopicSources.builtin()
    entries = sorted(path.iterdir())
    named: set[Path] = set()
    for entry in entries:
        reader = sources.find(entry, TOPICS) if entry.is_file() else None
        if reader is None:
            continue
        try:
            for data in sources.read(reader, entry):
                named |= _references(data, entry.parent)
        except TopicError:
            continue
    warnings = []
    for entry in entries:
        if entry.is_file() and sources.find(entry, TOPICS) is not None:
            continue
        if not (is_saved_dataset(entry) or sources.find(entry, ROWS) is not None):
            continue
        resolved = entry.resolve()
        if resolved in named or any(resolved in p.parents for p in named):
            continue
        warnings.append(
            f"{entry}: a data file that no topic names, so it is not read; name it in a topic "
            f"(e.g. preference_pairs: {entry.name}) or move it out of the topic directory"
        )
    return warnings


def check_unique_names(topics: Sequence[Topic]) -> None:
    """Topic names name adapter directories, so they must differ even where case is ignored
    (as it is on macOS and Windows file systems)."""
    seen: dict[str, Topic] = {}
    for topic in topics:
        other = seen.get(topic.name.casefold())
        if other is not None:
            same = "also" if other.name == topic.name else f"the same, ignoring case, as '{other.name}',"
            raise TopicError(
                f"{topic.source}: name: '{topic.name}' is {same} the name of the topic in {other.source}; "
                "topic names must be unique"
            )
        seen[topic.name.casefold()] = topic
