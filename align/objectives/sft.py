"""Supervised fine-tuning on a topic's content passages, through TRL's ``SFTTrainer``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from align import Policy, Topic, hookimpl, require
from align.core.cloze import clozes, number_questions
from align.hf.training import train_and_summarise

#: The values of ``answers``.
ANSWERS = ("none", "chosen", "rejected")


@dataclass
class SFTObjective:
    """Language-model the topic's passages, training only the run's rank-1 adapter.

    The defaults were measured on SmolLM2-135M with a rank-1 adapter (alpha 1) on topics written
    the way users write notes, each fact stated once (examples/topics, docs/quality.md): 3 epochs
    of the passages alone leave quiz accuracy at 0.50-0.83; 6 epochs with two cloze
    restatements of each passage lift every topic to 0.83-1.00.
    """

    epochs: float = 6
    learning_rate: float = 5e-3
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_length: int = 256
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0
    #: Also train on the answers of the topic's preference pairs, as chat turns answering their
    #: prompts: ``none``, ``chosen`` (the person's answers) or ``rejected`` (the plain ones).
    answers: str = "none"
    #: Also train on this many cloze restatements of each passage (align/core/cloze.py): the
    #: passage with a fact (a name, a number) blanked, as a question whose answer is the fact.
    cloze: int = 2
    #: Let a passage with fewer names and numbers than ``cloze`` blank facts in plain words too
    #: (align/core/cloze.py): "a postman", "a small owl", "eleven tonnes", which clozes otherwise
    #: never ask for; every other passage's clozes stay as they are.
    cloze_words: bool = False
    #: Also train on each number of each passage asked about in place (align/core/cloze.py):
    #: "kept how many hives on the hill?", answered by the number; numbers are what a run loses first.
    number_questions: bool = False

    #: What this objective records; the engine names them ``sft.<key>``.
    metrics = ("loss", "first_loss", "final_loss", "steps")
    #: Topic fields that must be non-empty.
    requires = ("content",)

    @property
    def reads(self) -> tuple[str, ...]:
        """Topic fields SFT trains on, so the ones replay mixes earlier topics' items into: the
        passages, and with ``answers`` the preference pairs (an earlier topic's answers carry its
        facts and the person's voice as much as its passages do)."""
        return self.requires if self.answers == "none" else (*self.requires, "preference_pairs")

    def __post_init__(self) -> None:
        require(self.epochs > 0, "epochs", f"must be > 0 (got {self.epochs})")
        require(self.learning_rate > 0, "learning_rate", f"must be > 0 (got {self.learning_rate})")
        require(self.per_device_train_batch_size >= 1, "per_device_train_batch_size", "must be >= 1")
        require(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        require(self.max_length >= 8, "max_length", f"must be >= 8 (got {self.max_length})")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0 (a step count, or a fraction below 1)")
        require(
            0 <= self.cloze <= 8, "cloze", f"must be between 0 and 8 clozes per passage (got {self.cloze})"
        )
        require(
            self.answers in ANSWERS, "answers", f"expected one of {', '.join(ANSWERS)}, got {self.answers!r}"
        )

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
            train_dataset=Dataset.from_list([{"text": text} for text in self.texts(policy, topic)]),
            processing_class=policy.tokenizer,
            callbacks=policy.trainer_callbacks("sft"),
        )
        return train_and_summarise(trainer, {})

    def texts(self, policy: Policy, topic: Topic) -> list[str]:
        """What SFT trains on: the passages, then as chat turns their clozes (``cloze``), their
        numbers asked about (``number_questions``) and the pairs' answers (``answers``)."""
        texts = list(topic.content)
        turns = [
            (f"Fill in the blank: {text}", fact)
            for text, fact in clozes(topic.content, self.cloze, words=self.cloze_words)
        ]
        if self.number_questions:
            turns += number_questions(topic.content)
        if self.answers != "none":
            turns += [
                (pair.prompt, pair.chosen if self.answers == "chosen" else pair.rejected)
                for pair in topic.preference_pairs
                if self.answers == "chosen" or pair.rejected is not None
            ]
        tokenizer = policy.tokenizer
        for prompt, answer in turns:
            if tokenizer.chat_template:
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
                texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
            else:
                texts.append(f"{prompt}\n{answer}")
        return texts


@hookimpl
def register_objectives(register: Any) -> None:
    register("sft", SFTObjective)
