"""Replay: earlier topics' training data mixed into each later topic's training steps.

One adapter carries every topic, so training topic ``k`` moves the weights that held topics
``1..k-1``. Replay is the one continual-learning method that reliably beats plain sequential
fine-tuning: each training step of a later topic also sees a sample of what earlier topics
trained on. ``replay.content`` and ``replay.preference_pairs`` say how many earlier items join
each training step, as a multiple of the topic's own count (``1.0``: as many earlier passages as
the topic has; ``0``: none); the sample is drawn uniformly from every earlier topic's items, with
the run's seed, so a resumed run replays exactly what an uninterrupted one does.

Only training data is replayed (passages and preference pairs), never quiz items or voice pairs:
those measure the run.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from typing import Any

from align.core.topics import NO_ANSWER, Topic

#: The topic fields replay mixes, each with its config key under ``replay:``.
REPLAYED_FIELDS = ("content", "preference_pairs")


def replay_counts(own: int, pool: int, fraction: float) -> int:
    """How many of ``pool`` earlier items join a topic with ``own`` items of its own."""
    if fraction <= 0 or pool == 0:
        return 0
    return min(pool, max(1, round(fraction * own)))


def replay_topic(
    topic: Topic, earlier: Sequence[Topic], settings: Mapping[str, float], seed: int, salt: str = ""
) -> tuple[Topic, dict[str, list[list[Any]]]]:
    """``topic`` with a sample of ``earlier`` topics' training items appended to its own.

    Returns the topic to train on and, per field, the ``[topic name, index]`` of each item
    replayed (what the run records). ``salt`` (the step's name) makes each training step's sample
    its own; the same ``seed``, topics and salt always give the same sample.
    """
    replaced: dict[str, Any] = {}
    chosen: dict[str, list[list[Any]]] = {}
    for name in REPLAYED_FIELDS:
        own = getattr(topic, name)
        pool = [(other.name, i, item) for other in earlier for i, item in enumerate(getattr(other, name))]
        count = replay_counts(len(own), len(pool), float(settings.get(name, 0.0)))
        if not count or not own:
            continue
        rng = random.Random(f"{seed}:{topic.name}:{salt}:{name}")
        picked = sorted(rng.sample(range(len(pool)), count))
        replaced[name] = tuple(own) + tuple(pool[i][2] for i in picked)
        chosen[name] = [[pool[i][0], pool[i][1]] for i in picked]
    if not replaced:
        return topic, {}
    return dataclasses.replace(topic, **replaced), chosen


def with_person_voice(topic: Topic, topics: Sequence[Topic]) -> Topic:
    """``topic`` whose held-out voice pairs are every topic's: a voice belongs to the person, not to
    one topic, and a score over a few pairs per topic moves in steps too coarse to show anything."""
    pairs = tuple(pair for other in topics for pair in other.voice_pairs)
    if pairs == topic.voice_pairs:
        return topic
    return dataclasses.replace(topic, voice_pairs=pairs)


def with_generated_rejected(
    topics: Sequence[Topic], language_model: Any, max_new_tokens: int
) -> tuple[list[Topic], dict[str, str]] | None:
    """``topics`` with every voice pair that lacks ``rejected`` given the model's own greedy
    answer to its prompt (each distinct prompt generated once), and prompt → answer in order;
    ``None`` when every pair has one."""
    missing = [pair.prompt for topic in topics for pair in topic.voice_pairs if pair.rejected is None]
    if not missing:
        return None
    prompts = list(dict.fromkeys(missing))
    answers = language_model.generate(prompts, max_new_tokens=max_new_tokens)
    answer_of = {prompt: answer.strip() or NO_ANSWER for prompt, answer in zip(prompts, answers)}
    replaced = [
        dataclasses.replace(
            topic,
            voice_pairs=tuple(
                pair
                if pair.rejected is not None
                else dataclasses.replace(pair, rejected=answer_of[pair.prompt])
                for pair in topic.voice_pairs
            ),
        )
        for topic in topics
    ]
    return replaced, answer_of
