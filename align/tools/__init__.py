"""After a run: score a saved adapter, compare two runs, sample from an adapter, merge it.

What ``align eval`` (:mod:`~align.tools.evaluation`), ``align compare``
(:mod:`~align.tools.comparison`), ``align sample`` (:mod:`~align.tools.sampling`) and ``align merge``
(:mod:`~align.tools.merging`) do, on the run reader (:mod:`~align.tools.runs`) and the model
loading (:mod:`~align.tools.loading`) that ``align report``, ``export`` and ``chat`` use too.
Everything reads what a run left (``config.yaml``, ``topics.json``, ``summary.json``,
``adapters/<topic>/``) and nothing here writes into a run directory. Heavy libraries are imported
inside the functions that need them. The names below are re-exported here, where the CLI imports them.
"""

from __future__ import annotations

from align.tools.comparison import compare_runs, compare_table, config_differences, rollbacks
from align.tools.evaluation import (
    build_evaluators,
    eval_table,
    evaluate_adapter,
    evaluate_topics,
    resolve_topics,
)
from align.tools.loading import (
    LoadedModel,
    check_generation_options,
    default_model_settings,
    generate,
    load,
    model_settings,
)
from align.tools.merging import check_empty_output, merge
from align.tools.runs import (
    ADAPTER_CONFIG,
    check_adapter,
    check_summary,
    find_run,
    read_events,
    read_run_config,
    read_run_topics,
    read_summary,
    run_adapter,
    run_of_adapter,
)
from align.tools.sampling import repetition_note, sample

__all__ = [
    "ADAPTER_CONFIG",
    "LoadedModel",
    "build_evaluators",
    "check_adapter",
    "check_empty_output",
    "check_generation_options",
    "check_summary",
    "compare_runs",
    "compare_table",
    "config_differences",
    "default_model_settings",
    "eval_table",
    "evaluate_adapter",
    "evaluate_topics",
    "find_run",
    "generate",
    "load",
    "merge",
    "model_settings",
    "read_events",
    "read_run_config",
    "read_run_topics",
    "read_summary",
    "repetition_note",
    "resolve_topics",
    "rollbacks",
    "run_adapter",
    "run_of_adapter",
    "sample",
]
