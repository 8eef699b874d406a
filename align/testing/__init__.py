"""Test helpers for align and its plugin authors; also a pytest plugin (entry point ``pytest11``).

``StubModel`` stands in for a language model, so an evaluator is tested in milliseconds with no
torch model. ``StubPolicy`` stands in for the engine's model, ``StubObjective`` for training, and
``run_protocol`` runs the real engine's topic loop with them, so a gate, an evaluator or a
lifecycle hook is tested inside a run in milliseconds. ``tiny_causal_lm`` builds a real (random,
tiny) Llama model and byte-level tokenizer for training tests, offline.

Fixtures (available in any project that has align installed): ``stub_model`` (builds a
:class:`StubModel`), ``make_topic`` (a valid :class:`align.Topic` from a partial dict) and
``plugin_manager`` (an isolated :class:`PluginHarness`: only the plugins a test registers).

The stubs are in :mod:`~align.testing.stubs`, ``run_protocol`` and the harness in
:mod:`~align.testing.harness`, the tiny model in :mod:`~align.testing.tiny`; every name is
importable from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from align.core.topics import Topic
from align.testing.harness import (
    PluginHarness,
    RunResult,
    make_topic,
    remove_temporary_runs,
    run_protocol,
    temporary_run_directory,
)
from align.testing.stubs import (
    Generate,
    Loglikelihood,
    StubEvaluator,
    StubModel,
    StubObjective,
    StubPlugin,
    StubPolicy,
)
from align.testing.tiny import CHAT_TEMPLATE, save_tiny_gguf, save_tiny_model, tiny_causal_lm, tiny_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "Generate",
    "Loglikelihood",
    "PluginHarness",
    "RunResult",
    "StubEvaluator",
    "StubModel",
    "StubObjective",
    "StubPlugin",
    "StubPolicy",
    "make_topic",
    "make_topic_fixture",
    "plugin_manager",
    "remove_temporary_runs",
    "run_protocol",
    "save_tiny_gguf",
    "save_tiny_model",
    "stub_model",
    "temporary_run_directory",
    "tiny_causal_lm",
    "tiny_tokenizer",
]


@pytest.fixture
def stub_model() -> Callable[..., StubModel]:
    """Builds a :class:`StubModel`: ``stub_model(loglikelihood={...})``."""
    return StubModel


@pytest.fixture(name="make_topic")
def make_topic_fixture() -> Callable[..., Topic]:
    """Builds a valid :class:`align.Topic` from a partial dict: ``make_topic(name="x")``."""
    return make_topic


@pytest.fixture
def plugin_manager() -> PluginHarness:
    """An isolated :class:`PluginHarness`: register your plugin, then check ``.registry`` or ``.run(...)``.

    Built-ins are opt-in: ``plugin_manager.add_builtins()``.
    """
    return PluginHarness()


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    """The temporary run directories of ``run_protocol`` calls given no ``output`` go with the session."""
    remove_temporary_runs()
