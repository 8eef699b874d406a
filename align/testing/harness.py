"""``run_protocol`` and ``PluginHarness``: the real engine's topic loop with stubs, and an isolated
plugin manager; ``make_topic`` builds a valid topic from a partial dict.

A run given no ``output`` goes into a new temporary directory, which is removed when the
:class:`RunResult` is used as a context manager and left, at the latest when the process ends (and
when a pytest session with align's plugin finishes): see :func:`remove_temporary_runs`.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.core.topics import Topic
from align.testing.stubs import StubPolicy

#: The temporary directories :func:`run_protocol` made (each holds one run, ``<dir>/run``), until removed.
_TEMPORARY: list[Path] = []


def temporary_run_directory() -> Path:
    """A run directory (``align-run-*/run``) in a new temporary directory, removed by
    :func:`remove_temporary_runs`."""
    parent = Path(tempfile.mkdtemp(prefix="align-run-"))
    _TEMPORARY.append(parent)
    return parent / "run"


def remove_temporary_runs() -> None:
    """Remove every temporary run directory :func:`run_protocol` made and nothing removed yet; runs
    when the process ends and when a pytest session with align's plugin finishes."""
    while _TEMPORARY:
        shutil.rmtree(_TEMPORARY.pop(), ignore_errors=True)


atexit.register(remove_temporary_runs)


@dataclass
class RunResult:
    """What :func:`run_protocol` returns: the run's summary, its events and its directory.

    ``with run_protocol(...) as result:`` removes the run's temporary directory when the block ends
    (a run given ``output`` is left where it is)."""

    summary: dict[str, Any]
    events: list[dict[str, Any]]
    path: Path
    policy: Any = None
    #: The temporary directory holding the run (``None`` for a run given ``output``).
    temporary: Path | None = field(default=None, repr=False)

    def __enter__(self) -> RunResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        """Remove the run's temporary directory now (nothing for a run given ``output``)."""
        if self.temporary is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)
            if self.temporary in _TEMPORARY:
                _TEMPORARY.remove(self.temporary)
            self.temporary = None

    def topic(self, topic: str) -> dict[str, Any]:
        for entry in self.summary["topics"]:
            if entry["topic"] == topic:
                return entry
        raise KeyError(
            f"no topic {topic!r} in this run (topics: {[t['topic'] for t in self.summary['topics']]})"
        )

    def step(self, topic: str, step: str) -> dict[str, Any]:
        """The step's entry in summary.json: ``status``, ``metrics``, ``gate``, ``rollback``."""
        for entry in self.topic(topic)["steps"]:
            if entry["step"] == step:
                return entry
        raise KeyError(f"no step {step!r} for topic {topic!r}")

    def metrics(self, topic: str, step: str) -> dict[str, float]:
        return self.step(topic, step)["metrics"]

    def ran(self, topic: str, step: str) -> bool:
        return self.step(topic, step)["status"] == "ran"


@dataclass
class PluginHarness:
    """An isolated plugin manager: only the plugins a test registers, built-ins opt-in.

    No entry points are loaded, so what is installed in the environment does not leak in.
    """

    #: ``True`` for all of align's built-in components, or the ones named: ``["quiz", "threshold"]``.
    builtins: bool | Sequence[str] = False
    plugins: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        from align.plugins.manager import new_plugin_manager

        self.manager = new_plugin_manager()
        if self.builtins:
            self.add_builtins(None if self.builtins is True else self.builtins)
        for plugin in list(self.plugins):
            self.register(plugin)

    def register(self, plugin: Any, name: str | None = None) -> Any:
        """Register a plugin (a module or an object with ``@align.hookimpl`` methods); returns it.

        An object is named after its class (``Broken``, then ``Broken-2``), so errors read well.
        """
        from align.plugins.manager import register_plugin

        register_plugin(self.manager, plugin, name)
        return plugin

    def add_builtins(self, only: Sequence[str] | None = None) -> None:
        """Register align's built-in components, or ``only`` the named ones (``["threshold"]``)."""
        from align.plugins.manager import register_builtins

        register_builtins(self.manager, only)

    @property
    def hook(self) -> Any:
        return self.manager.hook

    @property
    def registry(self) -> Any:
        """The components the registered plugins contribute (misspelt hooks are an error here)."""
        from align.plugins.manager import build_registry, validate_hooks

        validate_hooks(self.manager)
        return build_registry(self.manager)

    def run(self, protocol: Sequence[Any] | None = None, topics: Any = None, **kwargs: Any) -> RunResult:
        """:func:`run_protocol` with these plugins."""
        return run_protocol(protocol, topics, harness=self, **kwargs)


def run_protocol(
    protocol: Sequence[Any] | None = None,
    topics: Iterable[Topic] | str | Path | None = None,
    *,
    plugins: Iterable[Any] = (),
    builtins: bool | Sequence[str] = True,
    config: Mapping[str, Any] | None = None,
    model: Any = None,
    state: dict[str, Any] | None = None,
    output: str | Path | None = None,
    harness: PluginHarness | None = None,
) -> RunResult:
    """Run the real engine's topic loop with a stub model: milliseconds, no torch model.

    :param protocol: the steps, as in a config's ``protocol:`` (default: the seed's protocol, which
        needs the built-in components or stand-ins named ``sft``, ``dpo``, ``quiz``, ``voice``).
    :param topics: :class:`Topic` objects (default: one :func:`make_topic`), or a file or directory.
    :param plugins: plugin objects to register, e.g. ``StubPlugin(objectives={"sft": StubObjective()})``.
    :param builtins: register align's built-in components too: all (``True``), none, or the ones
        named (``["quiz", "threshold"]``); ignored when ``harness`` is given.
    :param config: more config, e.g. ``{"dpo": {"beta": 0.05}}``.
    :param model: the :class:`align.LanguageModel` evaluators see (default: ``StubModel()``).
    :param state: the stub policy's ``state`` dict, shared with stub objectives and models.
    :param output: the run directory (default: a new temporary directory, removed when the
        returned :class:`RunResult` is used as a context manager, else when the process ends).
    """
    from align.core.config import dump_config
    from align.core.engine import Engine
    from align.core.plan import resolve_plan
    from align.core.rundir import RunDir

    if harness is None:
        harness = PluginHarness(builtins=builtins)
    for plugin in plugins:
        harness.register(plugin)
    data: dict[str, Any] = dict(config or {})
    if protocol is not None:
        data["protocol"] = list(protocol)
    topic_arg = [make_topic()] if topics is None else topics
    if isinstance(topic_arg, Topic):
        topic_arg = [topic_arg]
    plan = resolve_plan(data, "<run_protocol>", harness.registry, topics=topic_arg)
    path = Path(output) if output is not None else temporary_run_directory()
    rundir = RunDir(path)
    rundir.check_writable()
    rundir.create(dump_config(plan.config))
    policy = StubPolicy(model, seed=plan.settings.seed, scratch_dir=rundir.scratch_dir, state=state)
    summary = Engine(plan, policy, rundir, hooks=harness.manager).run()
    events = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line]
    temporary = path.parent if output is None else None
    return RunResult(summary=summary, events=events, path=path, policy=policy, temporary=temporary)


_TOPIC_DEFAULTS: dict[str, Any] = {
    "name": "topic",
    "content": ["Ilse keeps a donkey named Tallow."],
    "quiz": [{"question": "What is Ilse's donkey called?", "choices": ["Tallow", "Brine"], "answer": 0}],
    "preference_pairs": [{"prompt": "Hello?", "chosen": "Ahoy, little gull.", "rejected": "Hello."}],
    "voice_pairs": [{"prompt": "Hi?", "chosen": "Ahoy there, little gull.", "rejected": "Hi."}],
}


def make_topic(data: Mapping[str, Any] | None = None, **fields: Any) -> Topic:
    """A valid :class:`Topic`: every field you leave out gets a small default."""
    return Topic.from_dict({**_TOPIC_DEFAULTS, **(data or {}), **fields})
