"""Errors a user can cause and fix.

The CLI prints an :class:`AlignError` as one line, without a traceback, and exits non-zero.
Anything else is a bug in align or in a plugin and keeps its traceback.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from collections.abc import Iterable
from typing import Any


class AlignError(Exception):
    """A mistake in input (config, topics, model path, plugins) that the user can fix."""

    exit_code = 1


class ConfigError(AlignError):
    """The config file or a ``--set`` override is wrong."""

    exit_code = 2


class TopicError(AlignError):
    """A topic file is missing, unreadable or malformed."""

    exit_code = 2


class PluginError(AlignError):
    """A plugin could not be loaded, or two plugins claim one name."""


class ModelError(AlignError):
    """The model could not be found, loaded or fitted with the adapter."""


class RunStopped(AlignError):
    """A step failed (a plugin raised, or training went non-finite) and the config says ``on_error: stop``.

    Everything up to the failed step is kept in the run directory, which ``align run --resume``
    continues from the failed step.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and ``docker stop`` send), raised where the run is so that it ends
    as after Ctrl-C: every ``except KeyboardInterrupt`` records the run as interrupted."""


class NonFiniteTraining(ArithmeticError):
    """Training produced a NaN or infinite loss, gradient norm or adapter weight.

    Raised from inside a trainer (by the callback :meth:`EnginePolicy.trainer_callbacks` adds) so
    training stops at the step where it happened; the engine restores the adapter.
    """


def closest(word: str, candidates: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest candidate, or ``""`` when none is close."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 2, 80, 80, 40
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = 6


def brief(value: Any) -> str:
    """``repr(value)`` cut to a line: a message never shows all of a huge (or aliased) value
    (reprlib stops early at each level, so even the repr of a huge value is never built)."""
    text = _BRIEF.repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


#: Characters a terminal acts on instead of showing: C0 and C1 controls and DEL (an ESC starts a
#: sequence that can clear the screen, move the cursor or forge a line), the bidirectional
#: overrides and isolates (they reorder what follows) and the Unicode line separators.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def printable(text: str, newlines: bool = True) -> str:
    """``text`` with every character a terminal would act on written as its escape (``\\x1b``,
    ``\\u202e``), so a metric name, a config key or a model's answer cannot clear the screen or
    forge output. Tabs and (with ``newlines``) line breaks stay; without it a line break is shown
    as ``\\n`` too, as in an error, which is one line. Everything align prints passes through it."""
    pattern = _UNPRINTABLE if newlines else _UNPRINTABLE_OR_NEWLINE
    return pattern.sub(_escape, text)


_UNPRINTABLE_OR_NEWLINE = re.compile(_UNPRINTABLE.pattern[:-1] + "\n\r]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return {"\n": "\\n", "\r": "\\r"}.get(char) or (
        f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
    )
