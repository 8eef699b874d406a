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

from align.errors import AlignError, TopicError, closest

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


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) answer."""

    prompt: str
    chosen: str
    rejected: str


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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> Topic:
        """Build and validate a topic; errors name ``source``, the item and the field."""
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
        content = _strings(data.get("content"), source, "content")
        if not content:
            raise TopicError(f"{source}: content: required, a non-empty list of passages to learn")
        return cls(
            name=name,
            content=content,
            quiz=tuple(_quiz_item(item, source, i) for i, item in enumerate(_items(data, "quiz", source))),
            preference_pairs=tuple(
                _pair(item, source, f"preference_pairs[{i}]")
                for i, item in enumerate(_items(data, "preference_pairs", source))
            ),
            voice_pairs=tuple(
                _pair(item, source, f"voice_pairs[{i}]")
                for i, item in enumerate(_items(data, "voice_pairs", source))
            ),
            source=source,
        )

    def to_dict(self) -> dict[str, Any]:
        """The topic as plain data, the inverse of :meth:`from_dict`."""
        return {
            "name": self.name,
            "content": list(self.content),
            "quiz": [
                {"question": q.question, "choices": list(q.choices), "answer": q.answer} for q in self.quiz
            ],
            "preference_pairs": [vars(p).copy() for p in self.preference_pairs],
            "voice_pairs": [vars(p).copy() for p in self.voice_pairs],
        }


def _items(data: Mapping[str, Any], key: str, source: str) -> list[Any]:
    value = data.get(key, [])
    if value is None:
        return []
    if not isinstance(value, list):
        raise TopicError(f"{source}: {key}: must be a list, got {type(value).__name__}")
    return value


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


def _strings(value: Any, source: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise TopicError(f"{source}: {where}: must be a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise TopicError(f"{source}: {where}[{i}]: must be a non-empty string")
    return tuple(value)


def _text(item: Mapping[str, Any], key: str, source: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value.strip():
        raise TopicError(f"{source}: {where}.{key}: required, a non-empty string")
    return value


def _check_keys(item: Any, keys: Sequence[str], source: str, where: str) -> None:
    if not isinstance(item, Mapping):
        raise TopicError(f"{source}: {where}: must be a mapping with keys {', '.join(keys)}")
    for key in item:
        if key not in keys:
            raise TopicError(f"{source}: {where}: unknown key '{key}'{closest(str(key), keys)}")


def _quiz_item(item: Any, source: str, index: int) -> QuizItem:
    where = f"quiz[{index}]"
    _check_keys(item, ("question", "choices", "answer"), source, where)
    question = _text(item, "question", source, where)
    choices = _strings(item.get("choices"), source, f"{where}.choices")
    if len(choices) < 2:
        raise TopicError(f"{source}: {where}.choices: needs at least two choices, got {len(choices)}")
    first_seen: dict[str, int] = {}
    for i, choice in enumerate(choices):
        earlier = first_seen.setdefault(choice.strip(), i)
        if earlier != i:  # equal choices score equal, and a tie counts as the first: always right
            shown = choice.strip() if len(choice.strip()) <= 80 else choice.strip()[:77] + "..."
            raise TopicError(
                f"{source}: {where}.choices[{i}]: '{shown}' is also choices[{earlier}]; "
                "the choices of a question must differ"
            )
    answer = item.get("answer")
    last = len(choices) - 1
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        got = "nothing" if answer is None else type(answer).__name__
        raise TopicError(
            f"{source}: {where}.answer: must be the right choice's text or its 0-based index (0..{last}), got {got}"
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
            f"{source}: {where}.answer: index {answer} is out of range for {len(choices)} choices; "
            f"use 0..{last}, or the right choice's text"
        )
    shown = answer.strip() if len(answer.strip()) <= 80 else answer.strip()[:77] + "..."
    hint = closest(answer.strip(), [c.strip() for c in choices])
    raise TopicError(
        f"{source}: {where}.answer: '{shown}' is not one of the choices"
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


def _pair(item: Any, source: str, where: str) -> PreferencePair:
    keys = ("prompt", "chosen", "rejected")
    _check_keys(item, keys, source, where)
    return PreferencePair(*(_text(item, key, source, where) for key in keys))


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


def load_topic_file(path: str | Path) -> Topic:
    """Load and validate one topic file."""
    path = Path(path)
    if path.is_symlink():
        # A link to a system file (/etc/passwd, /proc/self/environ) must not be read, so that no
        # message can show a line of it: through a link, only a topic file is read.
        target = path.resolve()
        if target.suffix not in TOPIC_SUFFIXES:
            raise TopicError(
                f"{path}: a link to {target}, which is not a topic file (.yaml, .yml or .json); align "
                "reads only topic files through a link: point the link at one, or copy the file here"
            )
    return Topic.from_dict(read_data_file(path, "topic file", TopicError), source=str(path))


def load_topics(path: str | Path) -> list[Topic]:
    """Load a topic file, or every topic file in a directory in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in TOPIC_SUFFIXES and p.is_file())
        if not files:
            raise TopicError(
                f"{path}: no topic files (*.yaml, *.yml, *.json) in this directory; add one or point to a file"
            )
        topics = [load_topic_file(p) for p in files]
    elif path.exists():
        topics = [load_topic_file(path)]
    else:
        raise TopicError(f"{path}: topic file or directory not found")
    check_unique_names(topics)
    return topics


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
