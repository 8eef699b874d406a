"""Kahneman-Tversky Optimization through TRL's ``KTOTrainer``, fed from the topic's preference pairs.

KTO learns from single answers labelled desirable or undesirable rather than from pairs, so each
preference pair is unpacked into two examples: its ``chosen`` answer (desirable) and its
``rejected`` answer (undesirable). As with DPO, the reference is the policy as it stands when the
step starts, held as a copy of the rank-1 adapter, with its log-probs precomputed once.

Swap it in for DPO with ``configs/kto.yaml`` (the protocol's preference step trains ``kto``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from align import Policy, Topic, hookimpl, require
from align.compat import KTO_LOSS_TYPES
from align.core import distributed
from align.hf.training import conversation, reference_from_policy, train_and_summarise


@dataclass
class KTOObjective:
    """Raise the likelihood of desirable answers and lower that of undesirable ones, relative to
    the reference. ``desirable_weight``/``undesirable_weight`` balance unequal counts."""

    beta: float = 0.1
    learning_rate: float = 5e-3
    max_steps: int = 10
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    loss_type: Literal[KTO_LOSS_TYPES] = "kto"  # TRL's choices (align.compat)
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    max_length: int = 256
    lr_scheduler_type: str = "linear"
    precompute_ref_log_probs: bool = True

    metrics = ("loss", "first_loss", "final_loss", "steps", "reward_chosen", "reward_rejected", "kl")
    requires = ("preference_pairs",)

    def __post_init__(self) -> None:
        require(self.beta > 0, "beta", f"must be > 0 (got {self.beta})")
        require(self.learning_rate > 0, "learning_rate", f"must be > 0 (got {self.learning_rate})")
        require(self.max_steps >= 1, "max_steps", f"must be >= 1 (got {self.max_steps})")
        # TRL's KTO estimates its KL term from mismatched pairs within a batch, so it needs two.
        require(self.per_device_train_batch_size >= 2, "per_device_train_batch_size", "must be >= 2 for KTO")
        require(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        require(self.desirable_weight > 0, "desirable_weight", "must be > 0")
        require(self.undesirable_weight > 0, "undesirable_weight", "must be > 0")
        require(self.max_length >= 8, "max_length", f"must be >= 8 (got {self.max_length})")

    def train(self, policy: Policy, topic: Topic) -> dict[str, float]:
        from trl import KTOConfig, KTOTrainer

        with reference_from_policy(policy.model):
            args = KTOConfig(
                beta=self.beta,
                learning_rate=self.learning_rate,
                max_steps=self.max_steps,
                per_device_train_batch_size=self.per_device_train_batch_size,
                gradient_accumulation_steps=self.gradient_accumulation_steps,
                loss_type=self.loss_type,
                desirable_weight=self.desirable_weight,
                undesirable_weight=self.undesirable_weight,
                max_length=self.max_length,
                lr_scheduler_type=self.lr_scheduler_type,
                # On several processes the reference adapter runs each step instead: TRL's
                # precompute writes its results to the main process's temporary directory, where
                # the other processes do not look (an in-memory dataset's cache goes to a
                # per-process temporary directory), and under FSDP its fingerprint would read
                # every weight, which shards do not allow.
                precompute_ref_log_probs=self.precompute_ref_log_probs and not distributed.is_distributed(),
                **policy.trainer_args(),
            )
            trainer = KTOTrainer(
                model=policy.model,
                args=args,
                train_dataset=unpaired_dataset(topic, chat=bool(policy.tokenizer.chat_template)),
                processing_class=policy.tokenizer,
                callbacks=policy.trainer_callbacks("kto"),
            )
            return train_and_summarise(
                trainer,
                {"reward_chosen": "rewards/chosen", "reward_rejected": "rewards/rejected", "kl": "kl"},
            )


def unpaired_dataset(topic: Topic, chat: bool) -> Any:
    """Each preference pair as two labelled examples: chosen (desirable) and rejected (undesirable)."""
    from datasets import Dataset

    rows = []
    for pair in topic.preference_pairs:
        rows.append({**conversation(pair.prompt, pair.chosen, chat), "label": True})
        if pair.rejected is not None:  # KTO is unpaired: a pair without rejected is one desirable example
            rows.append({**conversation(pair.prompt, pair.rejected, chat), "label": False})
    return Dataset.from_list(rows)


@hookimpl
def register_objectives(register: Any) -> None:
    register("kto", KTOObjective)
