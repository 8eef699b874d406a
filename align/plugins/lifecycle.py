"""Calling lifecycle hooks (``on_run_start`` …) through pluggy, with every implementation isolated.

pluggy stops a hook call at the first implementation that raises. A plugin must never take the
tool down, nor silence the other plugins, so each implementation is guarded for the length of one
call: a plain one that raises is recorded and its result is ``None``; a wrapper
(``@hookimpl(wrapper=True)`` or ``hookwrapper=True``) that raises before or after its ``yield`` is
recorded and the call goes on as if it were not there. Because pluggy still makes the call,
``tryfirst``/``trylast``, ``specname`` and both kinds of wrapper behave as pluggy documents.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Generator, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HookFailure:
    """One implementation of a lifecycle hook that raised during a call."""

    plugin: str
    hook: str
    exception: BaseException

    @property
    def error(self) -> str:
        return f"{type(self.exception).__name__}: {self.exception}"


def call_isolated(
    hooks: Any, hook_name: str, kwargs: Mapping[str, Any], *, muted: Collection[str] = ()
) -> list[HookFailure]:
    """Call ``hook_name`` with ``kwargs`` on ``hooks`` (a plugin manager, or anything with ``.hook``).

    Returns the implementations that raised, in call order; Ctrl-C passes through. Implementations
    of the plugins named in ``muted`` are not called (a plugin that already failed during a step).
    """
    caller = getattr(hooks.hook, hook_name)
    failures: list[HookFailure] = []
    impls = caller.get_hookimpls()
    originals = [impl.function for impl in impls]
    try:
        for impl in impls:
            guard = _guard_wrapper if (impl.wrapper or impl.hookwrapper) else _guard_plain
            record = _recorder(failures, impl.plugin_name, hook_name)
            # HookImpl.function is the attribute pluggy calls; it is swapped for this call only.
            impl.function = guard(impl.function, record, muted=impl.plugin_name in muted)
        caller(**kwargs)
    finally:
        for impl, function in zip(impls, originals):
            impl.function = function
    return failures


def _recorder(failures: list[HookFailure], plugin: str, hook: str) -> Callable[[BaseException], None]:
    def record(exc: BaseException) -> None:
        failures.append(HookFailure(plugin, hook, exc))

    return record


def _guard_plain(
    function: Callable[..., Any], record: Callable[[BaseException], None], *, muted: bool
) -> Callable[..., Any]:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if muted:
            return None
        try:
            return function(*args, **kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: a plugin's exit is a failure, not align's
            record(exc)
            return None

    return guarded


def _guard_wrapper(
    function: Callable[..., Any], record: Callable[[BaseException], None], *, muted: bool
) -> Callable[..., Generator[None, Any, Any]]:
    """A wrapper around a wrapper: it yields exactly once whatever the plugin's generator does, and
    hands back what it was sent (the inner results; pluggy ignores it for an old-style one) when
    the plugin's teardown raises."""

    def guarded(*args: Any, **kwargs: Any) -> Generator[None, Any, Any]:
        if muted:
            return (yield)
        try:
            teardown = function(*args, **kwargs)
            next(teardown)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # StopIteration too: a wrapper that never yields
            record(exc)
            return (yield)
        try:
            sent = yield
        except BaseException:  # the inner implementations are guarded: only Ctrl-C gets here
            teardown.close()
            raise
        try:
            teardown.send(sent)
        except StopIteration as stop:
            return stop.value
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            record(exc)
            return sent
        teardown.close()
        record(RuntimeError("the wrapper yielded more than once"))
        return sent

    return guarded


class Lifecycle:
    """The lifecycle hooks of a plugin manager as typed calls (as tox wraps its pluggy hooks).

    Each method calls one hook (:mod:`align.plugins.hookspecs` documents it) with every
    implementation isolated (:func:`call_isolated`) and returns the implementations that raised.
    """

    def __init__(self, hooks: Any):
        #: The plugin manager (or anything with ``.hook``).
        self.hooks = hooks

    def on_run_start(self, plan: Any, output: str) -> list[HookFailure]:
        return call_isolated(self.hooks, "on_run_start", {"plan": plan, "output": output})

    def on_topic_start(self, topic: Any, index: int, total: int) -> list[HookFailure]:
        return call_isolated(self.hooks, "on_topic_start", {"topic": topic, "index": index, "total": total})

    def on_trainer_log(
        self, topic: Any, step: str, logs: dict[str, float], *, muted: Collection[str] = ()
    ) -> list[HookFailure]:
        kwargs = {"topic": topic, "step": step, "logs": logs}
        return call_isolated(self.hooks, "on_trainer_log", kwargs, muted=muted)

    def on_step_end(self, topic: Any, step: str, result: dict[str, Any]) -> list[HookFailure]:
        return call_isolated(self.hooks, "on_step_end", {"topic": topic, "step": step, "result": result})

    def on_topic_end(self, topic: Any, result: dict[str, Any]) -> list[HookFailure]:
        return call_isolated(self.hooks, "on_topic_end", {"topic": topic, "result": result})

    def on_run_end(self, summary: dict[str, Any]) -> list[HookFailure]:
        return call_isolated(self.hooks, "on_run_end", {"summary": summary})
