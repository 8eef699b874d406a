"""Accuracy as an ``evaluate`` metric defined here, so nothing is fetched from a hub at run time."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _metric() -> Any:
    import datasets
    import evaluate

    class Accuracy(evaluate.Metric):
        def _info(self) -> evaluate.MetricInfo:
            return evaluate.MetricInfo(
                description="Fraction of predictions equal to their reference.",
                citation="",
                inputs_description="predictions and references: integer labels",
                features=datasets.Features(
                    {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
                ),
            )

        def _compute(self, predictions: Sequence[int], references: Sequence[int]) -> dict[str, float]:
            hits = sum(int(p == r) for p, r in zip(predictions, references))
            return {"accuracy": hits / len(references)}

    return Accuracy()


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Fraction of ``predictions`` that equal ``references`` (both non-empty, equal length)."""
    if not references:
        raise ValueError("accuracy of an empty list is undefined")
    return float(_metric().compute(predictions=list(predictions), references=list(references))["accuracy"])
