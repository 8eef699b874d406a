"""Supervised fine-tuning on a topic's content passages, through TRL's ``SFTTrainer``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from align import Policy, Topic, hookimpl, require
from align.core.training import train_and_summarise


@dataclass
class SFTObjective:
    """Language-model the topic's passages, training only the run's rank-1 adapter.

    The defaults were measured on SmolLM2-135M with a rank-1 adapter (alpha 1) on the demo topics
    (seven invented facts each, 14 passages): 3 epochs at ``5e-3`` with batch size 1 lift quiz
    accuracy to 0.71-0.86 on every topic; batch size 4 (fewer steps) reaches only 0.43-0.86.
    """

    epochs: float = 3
    learning_rate: float = 5e-3
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_length: int = 256
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0

    #: What this objective records; the engine names them ``sft.<key>``.
    metrics = ("loss", "first_loss", "final_loss", "steps")
    #: Topic fields that must be non-empty.
    requires = ("content",)

    def __post_init__(self) -> None:
        require(self.epochs > 0, "epochs", f"must be > 0 (got {self.epochs})")
        require(self.learning_rate > 0, "learning_rate", f"must be > 0 (got {self.learning_rate})")
        require(self.per_device_train_batch_size >= 1, "per_device_train_batch_size", "must be >= 1")
        require(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        require(self.max_length >= 8, "max_length", f"must be >= 8 (got {self.max_length})")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0 (a step count, or a fraction below 1)")

    def train(self, policy: Policy, topic: Topic) -> dict[str, float]:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(
            num_train_epochs=self.epochs,
            learning_rate=self.learning_rate,
            per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            max_length=self.max_length,
            lr_scheduler_type=self.lr_scheduler_type,
            warmup_steps=self.warmup_steps,
            **policy.trainer_args(),
        )
        trainer = SFTTrainer(
            model=policy.model,
            args=args,
            train_dataset=Dataset.from_list([{"text": passage} for passage in topic.content]),
            processing_class=policy.tokenizer,
            callbacks=policy.trainer_callbacks("sft"),
        )
        return train_and_summarise(trainer, {})


@hookimpl
def register_objectives(register: Any) -> None:
    register("sft", SFTObjective)
