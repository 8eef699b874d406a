"""Topic sources: the readers that turn files into topics, and data files into a topic's items.

Two kinds of reader, each registered through the ``register_topic_sources`` hook (the built-ins
here like any plugin's):

- ``topics`` readers read a file as topic mappings: a topic directory's files, or ``--topics FILE``
  (built in: YAML and JSON topic files);
- ``rows`` readers read a data file that a topic's field names (``preference_pairs: pairs.jsonl``)
  as rows, mappings of column to value (built in: JSON Lines, JSON, CSV and Parquet files and
  ``save_to_disk`` directories through ``datasets``, and text or markdown files split into
  passages at blank lines).

Data files are read locally only: ``datasets`` is given the files themselves, keeps the rows in
memory and caches nothing beside them (its cache goes to a temporary directory removed after the
read), so a read works offline (``HF_HUB_OFFLINE=1``) and writes nothing next to the user's data.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.errors import TopicError
from align.plugins.hookspecs import hookimpl

TOPICS = "topics"
ROWS = "rows"
KINDS = (TOPICS, ROWS)


class TopicSource:
    """A reader of one format. Subclass it (or write any object with these attributes) and
    register the class with ``register_topic_sources``.

    :cvar kind: ``"topics"`` (``read`` returns topic mappings) or ``"rows"`` (``read`` returns the
        rows of a data file a topic's field names).
    :cvar suffixes: the file name endings it reads (``(".jsonl",)``); override :meth:`matches` for
        anything else (a directory, a file's first bytes).
    :cvar describe: how errors name the format (``"JSON Lines"``).
    """

    kind: str = ROWS
    suffixes: tuple[str, ...] = ()
    describe: str = ""

    def matches(self, path: Path) -> bool:
        """Whether this reader reads ``path``."""
        return path.is_file() and path.name.lower().endswith(self.suffixes)

    def read(self, path: Path) -> list[Mapping[str, Any]]:
        """The topic mappings, or rows, in ``path``; raise :class:`align.errors.TopicError` for bad input."""
        raise NotImplementedError


# -- the built-in readers ----------------------------------------------------------------------
class TopicFiles(TopicSource):
    """YAML and JSON topic files: one topic per file."""

    kind = TOPICS
    suffixes = (".yaml", ".yml", ".json")
    describe = "YAML or JSON topic file"

    def read(self, path: Path) -> list[Mapping[str, Any]]:
        from align.core.topics import read_data_file

        return [read_data_file(path, "topic file", TopicError)]


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Keep ``datasets``' own log lines ("Failed to read schema …") out of align's one-line errors."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
    bars = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars:
            datasets.enable_progress_bars()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].rstrip(".") if text else type(exc).__name__


class DatasetFiles(TopicSource):
    """A data file read with ``datasets.load_dataset`` (its ``json``, ``csv`` or ``parquet`` builder)."""

    builder = "json"

    def read(self, path: Path) -> list[Mapping[str, Any]]:
        import datasets

        with tempfile.TemporaryDirectory(prefix="align-datasets-") as cache, _quiet_datasets():
            try:
                dataset = datasets.load_dataset(
                    self.builder, data_files=[str(path)], split="train", keep_in_memory=True, cache_dir=cache
                )
            except StopIteration:  # what an empty JSON Lines file raises
                return []
            except Exception as exc:
                raise TopicError(
                    f"{path}: cannot read it as {self.describe}: {_reason(exc)}; check the file, or export it again"
                ) from None
            return dataset.to_list()


class JsonLines(DatasetFiles):
    builder = "json"
    suffixes = (".jsonl", ".json")
    describe = "JSON Lines (or JSON)"


class Csv(DatasetFiles):
    builder = "csv"
    suffixes = (".csv",)
    describe = "CSV"


class Parquet(DatasetFiles):
    builder = "parquet"
    suffixes = (".parquet",)
    describe = "Parquet"


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory ``Dataset.save_to_disk`` (or ``DatasetDict``'s) wrote."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


class SavedDataset(TopicSource):
    """A ``save_to_disk`` directory, read with ``datasets.load_from_disk``; of a ``DatasetDict``, its
    ``train`` split, or its only split."""

    describe = "a datasets save_to_disk directory"

    def matches(self, path: Path) -> bool:
        return is_saved_dataset(path)

    def read(self, path: Path) -> list[Mapping[str, Any]]:
        import datasets

        with _quiet_datasets():
            try:
                loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
            except Exception as exc:
                raise TopicError(
                    f"{path}: cannot read it as {self.describe}: {_reason(exc)}; save it again"
                ) from None
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded)
            if "train" in loaded:
                loaded = loaded["train"]
            elif len(splits) == 1:
                loaded = loaded[splits[0]]
            else:
                raise TopicError(
                    f"{path}: holds the splits {', '.join(splits)} and no 'train'; "
                    f"name one split's directory instead (e.g. {path.name}/{splits[0]})"
                )
        return loaded.to_list()


_BLANK_LINES = re.compile(r"\n\s*\n")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s")


def passages(text: str) -> list[str]:
    """``text`` split into passages at blank lines, each paragraph's lines joined; markdown heading
    lines and front matter are not passages."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.startswith("---\n"):  # YAML front matter (Obsidian, Jekyll): not part of the notes
        end = text.find("\n---", 4)
        if end != -1:
            text = text[end + 4 :]
    found = []
    for paragraph in _BLANK_LINES.split(text):
        lines = [line.strip() for line in paragraph.split("\n") if line.strip() and not _HEADING.match(line)]
        if lines:
            found.append(" ".join(lines))
    return found


def read_utf8(path: Path, error: type[Exception] = TopicError) -> str:
    """A text file's contents; a file that is not UTF-8 or cannot be read is a one-line ``error``."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{path}: not UTF-8 text (byte {exc.start} is not valid UTF-8); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise error(f"{path}: cannot read it: {exc.strerror}") from None


class TextFiles(TopicSource):
    """Plain text and markdown files: a passage per paragraph (rows with a ``text`` column)."""

    suffixes = (".txt", ".md", ".markdown")
    describe = "text or markdown"

    def read(self, path: Path) -> list[Mapping[str, Any]]:
        return [{"text": passage} for passage in passages(read_utf8(path, TopicError))]


class TextFolder(TextFiles):
    """A directory of text and markdown files (not a ``save_to_disk`` one): every file's passages,
    files in name order."""

    describe = "a folder of text or markdown files"

    def matches(self, path: Path) -> bool:
        return path.is_dir() and not is_saved_dataset(path) and bool(self._files(path))

    def _files(self, path: Path) -> list[Path]:
        return sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(self.suffixes))

    def read(self, path: Path) -> list[Mapping[str, Any]]:
        rows: list[Mapping[str, Any]] = []
        for file in self._files(path):
            rows += TextFiles.read(self, file)
        return rows


#: The built-in readers by name, in the order they are asked.
BUILTIN_SOURCES: dict[str, type[TopicSource]] = {
    "topic_files": TopicFiles,
    "jsonl": JsonLines,
    "csv": Csv,
    "parquet": Parquet,
    "saved_dataset": SavedDataset,
    "text": TextFiles,
    "text_folder": TextFolder,
}


@dataclass(frozen=True)
class Reader:
    name: str
    plugin: str
    source: Any


class TopicSources:
    """The registered readers; a plugin's are asked before the built-ins, so one may read a format
    a built-in also claims."""

    def __init__(self, readers: Sequence[Reader]):
        builtin = [r for r in readers if r.plugin == __name__]
        self.readers = [r for r in readers if r.plugin != __name__] + builtin

    @classmethod
    def builtin(cls) -> TopicSources:
        return cls([Reader(name, __name__, factory()) for name, factory in BUILTIN_SOURCES.items()])

    @classmethod
    def from_registry(cls, registry: Any) -> TopicSources:
        """The readers of a plugin registry (``align.plugins.manager.Registry``), and the built-in
        ones it lacks."""
        readers = []
        for registration in registry.components.get("topic_source", {}).values():
            try:
                source = registration.factory()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # a plugin can never take the tool down
                raise TopicError(
                    f"topic source '{registration.name}' (plugin '{registration.plugin}') failed to start: "
                    f"{type(exc).__name__}: {exc}; fix the plugin, or disable it with "
                    f"ALIGN_DISABLE_PLUGINS={registration.plugin}"
                ) from None
            kind = getattr(source, "kind", None)
            if kind not in KINDS or not callable(getattr(source, "read", None)):
                raise TopicError(
                    f"topic source '{registration.name}' (plugin '{registration.plugin}') needs a kind "
                    f"({' or '.join(KINDS)}) and a read(path) method; fix the plugin, or disable it with "
                    f"ALIGN_DISABLE_PLUGINS={registration.plugin}"
                )
            readers.append(Reader(registration.name, registration.plugin, source))
        # Topic files are read whatever plugins a registry holds (a test harness may hold none).
        registered = {reader.name for reader in readers}
        readers += [r for r in cls.builtin().readers if r.name not in registered]
        return cls(readers)

    def find(self, path: Path, kind: str) -> Reader | None:
        """The first reader of ``kind`` that reads ``path``."""
        for reader in self.readers:
            if reader.source.kind == kind and self._call(reader, "matches", path):
                return reader
        return None

    def read(self, reader: Reader, path: Path) -> list[Mapping[str, Any]]:
        """``reader``'s rows (or topics) of ``path``; a plugin reader that raises, or returns
        something else than a list of mappings, is a one-line error naming it."""
        rows = self._call(reader, "read", path)
        if reader.plugin == __name__:  # the built-ins' topics are checked as topics (Topic.from_dict)
            return rows
        if not isinstance(rows, list) or not all(isinstance(row, Mapping) for row in rows):
            raise TopicError(
                f"{path}: topic source '{reader.name}' (plugin '{reader.plugin}') returned "
                f"{type(rows).__name__}, not a list of mappings; fix the plugin, or disable it with "
                f"ALIGN_DISABLE_PLUGINS={reader.plugin}"
            )
        return rows

    def _call(self, reader: Reader, method: str, path: Path) -> Any:
        try:
            return getattr(reader.source, method)(path)
        except (KeyboardInterrupt, TopicError):
            raise
        except BaseException as exc:
            if reader.plugin == __name__:
                raise
            raise TopicError(
                f"{path}: topic source '{reader.name}' (plugin '{reader.plugin}') failed in {method}: "
                f"{type(exc).__name__}: {exc}; fix the plugin, or disable it with "
                f"ALIGN_DISABLE_PLUGINS={reader.plugin}"
            ) from None

    def suffixes(self, kind: str) -> list[str]:
        found: list[str] = []
        for reader in self.readers:
            if reader.source.kind == kind:
                found += [s for s in getattr(reader.source, "suffixes", ()) if s not in found]
        return found


@hookimpl
def register_topic_sources(register: Any) -> None:
    for name, factory in BUILTIN_SOURCES.items():
        register(name, factory)
