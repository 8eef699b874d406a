"""Helpers for objectives that train with a Hugging Face / TRL trainer."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def quiet_trainer(trainer: Any) -> Any:
    """Remove the trainer's own console printing; the engine shows progress from the logs."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def train_and_summarise(trainer: Any, keys: Mapping[str, str]) -> dict[str, float]:
    """Run ``trainer.train()`` and return the run's metrics.

    ``loss`` is the mean training loss, ``first_loss`` and ``final_loss`` the first and last logged
    losses, ``steps`` the optimizer steps taken; ``keys`` maps further names to log keys whose
    last logged value is reported (``{"reward_margin": "rewards/margins"}``).
    """
    quiet_trainer(trainer)
    output = trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    metrics = {
        "loss": float(output.training_loss),
        "steps": float(output.global_step),
    }
    if logs:
        metrics["first_loss"] = float(logs[0]["loss"])
        metrics["final_loss"] = float(logs[-1]["loss"])
        for name, key in keys.items():
            if key in logs[-1]:
                metrics[name] = float(logs[-1][key])
    return {k: v for k, v in metrics.items() if not math.isnan(v)}
