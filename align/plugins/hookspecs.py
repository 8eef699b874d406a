"""Every hook align calls. A plugin implements some of them with ``@align.hookimpl``.

Contribution hooks receive a ``register(name, factory)`` callback and call it once per component
they add, so adding a second component never changes a hook's signature. The engine builds a
component by calling ``factory(**params)`` with the params from the config (a dataclass or any
callable with keyword parameters; its annotations are used to check and convert config values).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("align")
hookimpl = pluggy.HookimplMarker("align")

#: ``register(name, factory)``: adds one component under ``name``.
Register = Callable[[str, Callable[..., Any]], None]


@hookspec
def register_objectives(register: Register) -> None:
    """Contribute training objectives (such as ``sft`` and ``dpo``).

    :param register: call ``register(name, factory)`` once per objective. ``factory(**params)``
        returns an object with ``train(policy, topic) -> Mapping[str, float]`` that trains
        ``policy.model`` (the engine's one rank-1 adapter) on the topic and returns its training
        metrics. The engine records them as ``<objective name>.<key>``.
    """


@hookspec
def register_evaluators(register: Register) -> None:
    """Contribute evaluators (such as ``quiz`` and ``voice``).

    :param register: call ``register(name, factory)`` once per evaluator. ``factory(**params)``
        returns an object with ``evaluate(model, topic) -> Mapping[str, float]``, where ``model``
        is an :class:`align.LanguageModel`. The engine records each key as
        ``<evaluator name>.<key>``; declare the keys in a ``metrics`` attribute so gates on them
        are checked before a run starts.
    """


@hookspec
def register_gates(register: Register) -> None:
    """Contribute gates, which decide whether a protocol step runs (such as ``threshold``).

    :param register: call ``register(name, factory)`` once per gate. ``factory(**params)``
        returns an object with ``decide(metrics) -> align.GateDecision``, given the topic's
        metrics recorded so far (latest value per name), and ``metrics_needed() -> list[str]``,
        the names it reads, checked against what earlier steps record before the run starts.
    """


@hookspec
def register_topic_sources(register: Register) -> None:
    """Contribute readers for the files topics come from (a note-taking app's export, a transcript
    format), beside the built-in YAML/JSON topic files and data files read through ``datasets``.

    :param register: call ``register(name, factory)`` once per reader. ``factory()`` returns an
        object (subclass :class:`align.core.sources.TopicSource`) with ``kind``, ``"topics"`` or
        ``"rows"``; ``matches(path) -> bool``; and ``read(path) -> list[Mapping[str, Any]]``. A
        ``topics`` reader returns topic mappings (as a topic file holds) for a file in a topic
        directory or given as ``--topics``; a ``rows`` reader returns the rows of a data file that
        a topic's field names (``preference_pairs: talk.vtt``), mappings of column to value. A
        plugin's readers are asked before the built-ins; one that raises is a one-line error
        naming it.
    """


# -- lifecycle hooks: for code that watches a run (loggers, trackers, notifiers) -------------------
# The engine calls them through pluggy (align/plugins/lifecycle.py), so ``tryfirst``, ``trylast`` and
# wrappers (``wrapper=True``, ``hookwrapper=True``) work as pluggy documents. An implementation that
# raises is recorded with its plugin's name (a ``hook_error`` event in metrics.jsonl), the others are
# still called, and then ``on_error`` decides: ``stop`` ends the run with everything saved and
# resumable, ``skip`` warns and goes on. A hook runs after the checkpoint of what it watches, so its
# failure never costs results.


@hookspec
def on_run_start(plan: Any, output: str) -> None:
    """Called once, after the run directory exists and before the first topic.

    :param plan: the resolved :class:`align.core.plan.Plan` (``plan.config`` is what config.yaml holds).
    :param output: the run directory.
    """


@hookspec
def on_topic_start(topic: Any, index: int, total: int) -> None:
    """Called before the first step of each topic.

    :param topic: the :class:`align.Topic` about to be trained.
    :param index: its position in the run, counting from 0.
    :param total: how many topics the run has.
    """


@hookspec
def on_trainer_log(topic: Any, step: str, logs: dict[str, float]) -> None:
    """Called each time a training step's trainer logs (after every optimizer step), once the
    numbers are in metrics.jsonl (``log`` events): the points of a loss curve.

    An implementation that raises is recorded at once and not called again during that step; what
    ``on_error`` does about it waits until the step is finished and saved, so a tracker that fails
    never fails the training it watches.

    :param topic: the :class:`align.Topic` being trained.
    :param step: the protocol step's name (``sft``, ``dpo`` …).
    :param logs: the trainer's numbers: ``loss``, ``learning_rate``, ``grad_norm`` … as the
        objective's trainer reports them, with ``step`` (the optimizer step) and ``max_steps``.
    """


@hookspec
def on_step_end(topic: Any, step: str, result: dict[str, Any]) -> None:
    """Called after every protocol step, whether it ran, was skipped or failed.

    :param topic: the :class:`align.Topic` the step ran on.
    :param step: the step's name in the protocol.
    :param result: the step as summary.json records it: ``step``, ``kind``, ``status``
        (``ran``/``skipped``/``failed``), ``metrics`` (``<component>.<key>`` → number), ``gate``
        (``passed`` and ``reason``) when the step was gated, ``rollback`` when its guard restored
        the adapter, and ``error`` (``plugin``, ``component``, ``exception``, ``reason``) when it failed.
    """


@hookspec
def on_topic_end(topic: Any, result: dict[str, Any]) -> None:
    """Called after each topic's adapter is saved.

    :param topic: the :class:`align.Topic` just finished.
    :param result: the topic's entry in summary.json (with ``recheck``, earlier topic → its
        metrics measured again, from the second topic on).
    """


@hookspec
def on_run_end(summary: dict[str, Any]) -> None:
    """Called once at the end of a run, finished or not.

    :param summary: summary.json's content (``status`` is ``completed``, ``failed`` or ``interrupted``).
    """
