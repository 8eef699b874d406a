"""Direct Preference Optimization on a topic's preference pairs, through TRL's ``DPOTrainer``.

The reference is the policy as it stands when DPO starts (after this topic's SFT), not the raw
base model, and it costs no second copy of the model: TRL copies the rank-1 adapter under the
name ``ref`` when it is handed a PEFT model without a ``ref_model``. With
``precompute_ref_log_probs`` the reference log-probs are computed once, before the first step,
by :func:`add_reference_logps` rather than by TRL's own precompute: TRL's hashes every weight of
the model (to name a dataset cache file) and writes that file, work that buys nothing for a
reference used once. The adapter copy is deleted afterwards, so the next topic's DPO starts
from its own reference.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from align import Policy, PreferencePair, Topic, compat, hookimpl, require
from align.compat import DPO_LOSS_TYPES, dpo_reference_logps, use_dpo_reference_logps
from align.core.topics import NO_ANSWER
from align.hf.training import (
    completion_tokens_only,
    conversation,
    reference_from_policy,
    train_and_summarise,
)
from align.objectives.shared_prompt import shared_prompt_forward

#: The loss types TRL's DPOTrainer implements.
LOSS_TYPES = DPO_LOSS_TYPES


#: Where ``rejected`` answers come from (``rejected:``).
REJECTED_SOURCES = ("given", "policy")


@dataclass
class DPOObjective:
    """Prefer each pair's ``chosen`` answer over its ``rejected`` one, relative to the reference.

    The seed note's learning rate of 5e-7 barely moves a rank-1 adapter. Measured on SmolLM2-135M
    with the demo topics (docs/demo.md), ``5e-3`` for 10 steps lifts the voice score on held-out
    pairs; lower rates fit the training pairs but leave the held-out score unchanged.
    """

    beta: float = 0.1
    learning_rate: float = 5e-3
    max_steps: int = 10
    #: Passes over the topic's preference pairs (replayed ones included); when set it decides the
    #: number of steps instead of ``max_steps``, so a topic with more pairs gets more steps.
    epochs: float | None = None
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    max_length: int = 256
    lr_scheduler_type: str = "linear"
    precompute_ref_log_probs: bool = True
    #: Where each pair's dispreferred answer comes from: ``given`` (the pair's ``rejected``) or
    #: ``policy``: the model's own greedy answer to the prompt, generated right before the step
    #: (on-policy, as in SPIN): the person's answer is preferred over what the model would say.
    #: A pair without ``rejected`` gets the model's answer with ``given`` too.
    rejected: str = "given"
    #: The longest answer generated for ``rejected: policy``, in tokens.
    rejected_max_new_tokens: int = 64
    #: Run each pair's prompt once for both answers (its key/value cache shared), not once per
    #: answer as TRL does: the same losses and gradients (tested against TRL for every loss type),
    #: fewer tokens through the model. Off falls back to TRL's forward; gradient checkpointing,
    #: FSDP and DeepSpeed always use TRL's.
    share_prompt: bool = True

    metrics = (
        "loss",
        "first_loss",
        "final_loss",
        "steps",
        "reward_margin",
        "reward_accuracy",
        "reward_chosen",
        "reward_rejected",
    )
    requires = ("preference_pairs",)

    def __post_init__(self) -> None:
        require(self.beta > 0, "beta", f"must be > 0 (got {self.beta})")
        require(self.learning_rate > 0, "learning_rate", f"must be > 0 (got {self.learning_rate})")
        require(self.max_steps >= 1, "max_steps", f"must be >= 1 (got {self.max_steps})")
        require(
            self.epochs is None or 0 < self.epochs <= 1000,
            "epochs",
            f"must be a number of passes over the pairs above 0 and at most 1000, or left out to use max_steps (got {self.epochs})",
        )
        require(self.per_device_train_batch_size >= 1, "per_device_train_batch_size", "must be >= 1")
        require(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        require(self.max_length >= 8, "max_length", f"must be >= 8 (got {self.max_length})")
        require(
            self.rejected in REJECTED_SOURCES,
            "rejected",
            f"expected one of {', '.join(REJECTED_SOURCES)}, got {self.rejected!r}",
        )
        require(
            1 <= self.rejected_max_new_tokens <= 4096,
            "rejected_max_new_tokens",
            f"must be between 1 and 4096 (got {self.rejected_max_new_tokens})",
        )
        losses = self.loss_types
        require(bool(losses), "loss_type", "needs at least one loss type")
        for loss in losses:
            require(
                loss in LOSS_TYPES,
                "loss_type",
                f"unknown loss type '{loss}'; use one of {', '.join(LOSS_TYPES)}",
            )
        if self.loss_weights is not None:
            require(
                len(self.loss_weights) == len(losses),
                "loss_weights",
                f"needs one weight per loss type ({len(losses)}), got {len(self.loss_weights)}",
            )
            require(all(w >= 0 for w in self.loss_weights), "loss_weights", "weights must be >= 0")

    @property
    def loss_types(self) -> list[str]:
        """``loss_type`` as a list: one TRL loss, or several summed with ``loss_weights``."""
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    def train(self, policy: Policy, topic: Topic) -> dict[str, float]:
        from trl import DPOConfig, DPOTrainer

        if self.rejected == "policy" or any(pair.rejected is None for pair in topic.preference_pairs):
            topic = on_policy_rejected(
                policy, topic, self.rejected_max_new_tokens, only_missing=self.rejected == "given"
            )
        model = policy.model
        # With epochs, the trainer counts the steps from the pairs (max_steps -1 hands it over).
        steps = (
            {"max_steps": self.max_steps}
            if self.epochs is None
            else {"max_steps": -1, "num_train_epochs": self.epochs}
        )
        with reference_from_policy(model):
            args = DPOConfig(
                beta=self.beta,
                learning_rate=self.learning_rate,
                **steps,
                per_device_train_batch_size=self.per_device_train_batch_size,
                gradient_accumulation_steps=self.gradient_accumulation_steps,
                loss_type=self.loss_types,
                loss_weights=self.loss_weights,
                max_length=self.max_length,
                lr_scheduler_type=self.lr_scheduler_type,
                precompute_ref_log_probs=False,  # done below, once the trainer has tokenized the pairs
                **policy.trainer_args(),
            )
            trainer = DPOTrainer(
                model=model,
                args=args,
                train_dataset=preference_dataset(topic, chat=bool(policy.tokenizer.chat_template)),
                processing_class=policy.tokenizer,
                callbacks=policy.trainer_callbacks("dpo"),
            )
            sharing = (
                shared_prompt_forward(trainer.model)
                if self.share_prompt
                and not getattr(model, "align_sharded", False)
                and not compat.launched_with_deepspeed()
                else contextlib.nullcontext()
            )
            with sharing:
                if self.precompute_ref_log_probs:
                    add_reference_logps(trainer, batch_size=max(8, self.per_device_train_batch_size))
                return train_and_summarise(
                    trainer,
                    {
                        "reward_margin": "rewards/margins",
                        "reward_accuracy": "rewards/accuracies",
                        "reward_chosen": "rewards/chosen",
                        "reward_rejected": "rewards/rejected",
                    },
                )


def add_reference_logps(trainer: Any, batch_size: int) -> None:
    """Give ``trainer`` the reference log-probs of its training pairs, computed now, once.

    Before the first optimizer step the policy is the reference, so TRL's own per-batch reference
    pass (``compute_ref_log_probs``, through the ``ref`` adapter copy) computes them; the trainer
    then reads them from the dataset's ``ref_chosen_logps``/``ref_rejected_logps`` columns, as
    with ``precompute_ref_log_probs=True``.
    """
    import torch
    from torch.utils.data import DataLoader

    dataset = trainer.train_dataset
    device = trainer.accelerator.device
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False)
    chosen: list[float] = []
    rejected: list[float] = []
    with torch.no_grad(), completion_tokens_only():
        for batch in loader:
            batch = {key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()}
            batch_chosen, batch_rejected = dpo_reference_logps(trainer, batch)
            chosen += batch_chosen.float().cpu().tolist()
            rejected += batch_rejected.float().cpu().tolist()
    use_dpo_reference_logps(trainer, chosen, rejected)


def on_policy_rejected(
    policy: Policy, topic: Topic, max_new_tokens: int, only_missing: bool = False
) -> Topic:
    """``topic`` with each preference pair's ``rejected`` answer replaced by the policy's own greedy
    answer to its prompt, as the policy stands now (SPIN); with ``only_missing``, only the answers of
    pairs that have none (the topic left ``rejected`` out). The answers generated are recorded (a
    ``generated`` event with each pair's index, prompt and answer).

    A prompt the model answers with nothing keeps its written ``rejected`` answer, or, having none,
    gets :data:`NO_ANSWER`. So does a prompt the model answers word for word as ``chosen`` (listed
    as ``same_as_chosen`` in the event): two equal answers teach no preference.
    """
    import dataclasses

    pairs = topic.preference_pairs
    indices = [i for i, pair in enumerate(pairs) if not only_missing or pair.rejected is None]
    answers = policy.language_model.generate(
        [pairs[i].prompt for i in indices], max_new_tokens=max_new_tokens
    )
    new_pairs = list(pairs)
    same: list[int] = []
    for i, answer in zip(indices, answers):
        pair = pairs[i]
        text = answer.strip()
        if text and " ".join(text.split()) == " ".join(pair.chosen.split()):
            # The policy already answers as the person does (SFT on the chosen answers does that):
            # a pair of two equal answers has no preference to learn, so the written rejected
            # answer, where there is one, stays.
            same.append(i)
            text = pair.rejected or text
        new_pairs[i] = PreferencePair(pair.prompt, pair.chosen, text or pair.rejected or NO_ANSWER)
    record = getattr(policy, "record", None)
    if record is not None:
        answered = [{"prompt": new_pairs[i].prompt, "answer": new_pairs[i].rejected} for i in indices]
        if only_missing:
            answered = [{"pair": i, **entry} for i, entry in zip(indices, answered)]
        extra = {"same_as_chosen": same} if same else {}
        record("generated", purpose="rejected", answers=answered, **extra)
    return dataclasses.replace(topic, preference_pairs=tuple(new_pairs))


def preference_dataset(topic: Topic, chat: bool) -> Any:
    """The topic's preference pairs in TRL's format: conversational when the model has a chat template."""
    from datasets import Dataset

    rows = []
    for pair in topic.preference_pairs:
        chosen = conversation(pair.prompt, pair.chosen, chat)
        rejected = conversation(pair.prompt, pair.rejected, chat)
        rows.append(
            {"prompt": chosen["prompt"], "chosen": chosen["completion"], "rejected": rejected["completion"]}
        )
    return Dataset.from_list(rows)


@hookimpl
def register_objectives(register: Any) -> None:
    register("dpo", DPOObjective)
