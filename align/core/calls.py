"""Calling a plan's components: an evaluator within a time limit, and the metrics a component
returns checked and named after it."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

from align.core.plan import Component, Step
from align.errors import AlignError, NonFiniteTraining

#: The most metrics one call of an objective or evaluator may return: every step's metrics go into
#: ``metrics.jsonl``, ``summary.json`` (rewritten after each topic) and the forgetting matrix, so a
#: plugin returning 100,000 of them would make every later write megabytes long.
MAX_METRICS = 256


class EvaluateTimeout(TimeoutError):
    """An evaluator did not return within ``evaluate_timeout`` seconds.

    Python cannot stop a thread from outside, so the evaluator's thread may still be using the
    model: the run stops whatever ``on_error`` says (a later step would train or score the model
    under its feet), and the thread ends with the process."""


def call_with_timeout(call: Callable[[], Any], seconds: float) -> Any:
    """``call()`` in a daemon thread, waited for at most ``seconds``: its result, its exception
    (raised here, ``SystemExit`` too), or :class:`EvaluateTimeout` while it still runs."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = call()
        except BaseException as exc:  # handed to the waiting thread, which records it
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="align-evaluate", daemon=True)
    thread.start()
    thread.join(seconds)  # Ctrl-C still interrupts the wait
    if thread.is_alive():
        raise EvaluateTimeout(f"did not return within {seconds:g}s (evaluate_timeout)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def prefix_metrics(
    name: str, metrics: Mapping[str, Any], where: str, allow_non_finite: bool = False
) -> dict[str, float]:
    """``{key: value}`` returned by component ``name`` as ``{"name.key": float}``; ``where`` names
    the component in the error when it returned something else than numbers, more than
    :data:`MAX_METRICS` of them, or a NaN or infinite one (which strict JSON cannot hold) unless
    ``allow_non_finite`` (training: the engine reports a non-finite loss as training that became
    non-finite)."""
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"{where} returned {type(metrics).__name__}, expected a mapping of metric name to number"
        )
    if len(metrics) > MAX_METRICS:
        raise ValueError(f"{where} returned {len(metrics)} metrics; at most {MAX_METRICS} per call")
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where} returned {key}={value!r}; metric values must be numbers")
        if not allow_non_finite and not math.isfinite(value):
            raise ValueError(f"{where} returned {key}={value}; metric values must be finite numbers")
        flat[f"{name}.{key}"] = float(value)
    return flat


def evaluators(steps: list[Step]) -> list[Component]:
    """The protocol's evaluators, each once (by name, in order of first use), as last configured;
    an evaluator whose class sets ``recheck = False`` (slow ones, like ``style``) is left out."""
    found: dict[str, Component] = {}
    for step in steps:
        if step.kind == "eval":
            for component in step.components:
                if getattr(component.instance, "recheck", True):
                    found[component.name] = component
    return list(found.values())


def check_finite(metrics: Mapping[str, float]) -> None:
    """A training step whose reported loss (or any metric) is NaN or infinite failed."""
    bad = {name: value for name, value in metrics.items() if not math.isfinite(value)}
    if bad:
        raise NonFiniteTraining(", ".join(f"{name} is {value}" for name, value in bad.items()))


def failure_record(
    step_name: str, component: Component | None, exc: BaseException, restored: bool = False
) -> dict[str, Any]:
    """What an ``error`` event holds for a step (or recheck) whose ``component`` raised ``exc``:
    ``plugin``, ``component``, ``exception`` and the ``reason`` a person reads."""
    if isinstance(exc, NonFiniteTraining):
        what = f"training became non-finite: {exc}"
    elif isinstance(exc, AlignError):
        what = str(exc)
    else:
        what = f"{type(exc).__name__}: {exc}"
    who = f"{component.kind} '{component.name}'" if component is not None else f"step '{step_name}'"
    if component is not None and component.plugin:
        who += f" (plugin '{component.plugin}')"
    reason = f"{who} failed: {what}"
    if restored:
        reason += "; adapter restored to before the step"
    return {
        "plugin": component.plugin if component is not None else "",
        "component": component.name if component is not None else "",
        "exception": type(exc).__name__,
        "reason": reason,
    }
