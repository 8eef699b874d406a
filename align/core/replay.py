"""Replay: earlier topics' training data mixed into each later topic's training steps.

One adapter carries every topic, so training topic ``k`` moves the weights that held topics
``1..k-1``. Replay is the one continual-learning method that reliably beats plain sequential
fine-tuning: each training step of a later topic also sees a sample of what earlier topics
trained on. ``replay.content`` and ``replay.preference_pairs`` say how many earlier items join
each training step, as a multiple of the topic's own count (``1.0``: as many earlier passages as
the topic has; ``0``: none), chosen from every earlier topic's items with the run's seed, so a
resumed run replays exactly what an uninterrupted one does.

``replay.schedule`` says which earlier items (``spaced`` unless the config says otherwise;
:func:`replay_topic` itself defaults to ``random``, the draw it made before schedules):
``random`` draws a fresh uniform sample for each topic, so as the pool grows an item may go
unseen for several topics running, and which ones do is down to the seed; ``spaced`` takes the
items trained longest ago first (an item counts as trained by its own topic and by every step
that replayed it), drawing with the seed only among items trained equally long ago, so every
earlier item comes back before any comes back twice: spaced rehearsal. ``balanced`` shares each
topic's replay out evenly between the earlier topics first (every earlier topic is rehearsed at
every later one), then takes each topic's items trained longest ago. ``expanding`` rehearses the
way spaced repetition does, the first rehearsal soon and later ones further apart: half of each
topic's replay goes to the topic just before it (whose items have never been rehearsed;
``spaced`` leaves them for last, so on six topics the fourth and fifth are never rehearsed at
all), the other half to the items trained longest ago. Those four are pure functions of the
topics, the settings and the seed: the history the schedules read is recomputed from the earlier
topics, never read back from the run.

``weakest`` asks the model instead: before each training step that replays some earlier items
but not all, it takes a self-test of every earlier item (:func:`probes`: a passage's facts
blanked, as clozes are, and answered; a pair's prompt answered with the person's answer) and
replays the items it answers worst, by the mean log-likelihood per character of the answers
(ties drawn with the seed). An answer a topic learnt by a small lead is the one later topics take
(docs/quality.md, "Which answers a run loses"); this rehearses those before the ones still held.
It reads the adapter as the step starts, which a resumed run restores, so a resumed run replays
what an uninterrupted one does. Measured at four seeds it kept as many answers as ``spaced``, not
more: it learns facts a topic's own SFT missed, and misses answers its self-test, in the
passages' words, finds held (docs/quality.md, "The weakest items first").

Only training data is replayed (passages and preference pairs), never quiz items or voice pairs:
those measure the run.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from typing import Any

from align.core.cloze import passage_clozes
from align.core.topics import NO_ANSWER, Topic

#: The topic fields replay mixes, each with its config key under ``replay:``.
REPLAYED_FIELDS = ("content", "preference_pairs")


def replay_counts(own: int, pool: int, fraction: float) -> int:
    """How many of ``pool`` earlier items join a topic with ``own`` items of its own."""
    if fraction <= 0 or pool == 0:
        return 0
    return min(pool, max(1, round(fraction * own)))


def replay_topic(
    topic: Topic,
    earlier: Sequence[Topic],
    settings: Mapping[str, float],
    seed: int,
    salt: str = "",
    schedule: str = "random",
    language_model: Any = None,
) -> tuple[Topic, dict[str, list[list[Any]]]]:
    """``topic`` with a sample of ``earlier`` topics' training items appended to its own.

    Returns the topic to train on and, per field, the ``[topic name, index]`` of each item
    replayed (what the run records). ``salt`` (the step's name) makes each training step's sample
    its own; the same ``seed``, topics, salt and ``schedule`` always give the same sample (for
    ``weakest``, the same ``language_model`` weights too: it scores the earlier items with them).
    """
    if schedule == "weakest" and language_model is None:
        raise ValueError("replay schedule 'weakest' scores earlier items: pass the language_model")
    replaced: dict[str, Any] = {}
    chosen: dict[str, list[list[Any]]] = {}
    for name in REPLAYED_FIELDS:
        own = getattr(topic, name)
        fraction = float(settings.get(name, 0.0))
        if schedule in SCHEDULED:
            picks = _scheduled_picks([*earlier, topic], name, fraction, seed, salt, schedule)[-1]
        elif schedule == "weakest":
            picks = _weakest_picks(topic, earlier, name, fraction, seed, salt, language_model)
        else:
            picks = _random_picks(topic, earlier, name, fraction, seed, salt)
        if not picks or not own:
            continue
        items = {(other.name, i): item for other in earlier for i, item in enumerate(getattr(other, name))}
        replaced[name] = tuple(own) + tuple(items[key] for key in picks)
        chosen[name] = [list(key) for key in picks]
    if not replaced:
        return topic, {}
    return dataclasses.replace(topic, **replaced), chosen


Key = tuple[str, int]

#: The schedules :func:`_scheduled_picks` computes (``random`` is a plain draw).
SCHEDULED = ("spaced", "balanced", "expanding")


def _pool(earlier: Sequence[Topic], name: str) -> list[Key]:
    return [(other.name, i) for other in earlier for i in range(len(getattr(other, name)))]


def _rng(seed: int, topic: Topic, salt: str, name: str) -> random.Random:
    return random.Random(f"{seed}:{topic.name}:{salt}:{name}")


def _random_picks(
    topic: Topic, earlier: Sequence[Topic], name: str, fraction: float, seed: int, salt: str
) -> list[Key]:
    pool = _pool(earlier, name)
    count = replay_counts(len(getattr(topic, name)), len(pool), fraction)
    if not count:
        return []
    return [pool[i] for i in sorted(_rng(seed, topic, salt, name).sample(range(len(pool)), count))]


def _weakest_picks(
    topic: Topic,
    earlier: Sequence[Topic],
    name: str,
    fraction: float,
    seed: int,
    salt: str,
    language_model: Any,
) -> list[Key]:
    pool = _pool(earlier, name)
    count = replay_counts(len(getattr(topic, name)), len(pool), fraction)
    if not count:
        return []
    if count >= len(pool):  # every earlier item is replayed: nothing to choose, no self-test
        return pool
    scores = strengths(language_model, earlier, name)
    rng = _rng(seed, topic, salt, name)
    draw = {key: rng.random() for key in pool}
    weakest = sorted(pool, key=lambda key: (scores[key], draw[key]))[:count]
    order = {key: i for i, key in enumerate(pool)}
    return sorted(weakest, key=order.__getitem__)


#: How many facts of a passage its self-test blanks.
PROBES = 3


def probes(topic: Topic, name: str) -> list[list[tuple[str, str]]]:
    """The self-test of each of ``topic``'s items in field ``name``, as ``(prompt, answer)`` pairs:
    a passage's facts blanked (up to :data:`PROBES`, as :func:`~align.core.cloze.clozes` picks
    them, facts in plain words included) and answered, or, for a passage with none, its first half
    continued by the rest; a preference pair's prompt answered with the person's answer. Made from
    training items only, never from the quiz."""
    if name == "preference_pairs":
        return [[(pair.prompt, pair.chosen)] for pair in topic.preference_pairs]
    made = []
    for passage, of_passage in zip(topic.content, passage_clozes(topic.content, PROBES, words=True)):
        if of_passage:
            made.append([(f"Fill in the blank: {blanked}", fact) for blanked, fact in of_passage])
        else:
            words = passage.split()
            half = max(1, len(words) // 2)
            made.append([(" ".join(words[:half]), " " + " ".join(words[half:]))])
    return made


def strengths(language_model: Any, topics: Sequence[Topic], name: str) -> dict[Key, float]:
    """How well ``language_model`` answers each item's :func:`probes`: the mean over its probes of
    the answer's log-likelihood per character (higher: better held)."""
    keys: list[Key] = []
    rows: list[tuple[str, str]] = []
    for topic in topics:
        for i, item_probes in enumerate(probes(topic, name)):
            keys += [(topic.name, i)] * len(item_probes)
            rows += item_probes
    scores = language_model.loglikelihood([p for p, _ in rows], [a for _, a in rows]) if rows else []
    total: dict[Key, list[float]] = {}
    for key, (_, answer), score in zip(keys, rows, scores):
        total.setdefault(key, []).append(score / max(1, len(answer)))
    return {key: sum(values) / len(values) for key, values in total.items()}


def _scheduled_picks(
    topics: Sequence[Topic], name: str, fraction: float, seed: int, salt: str, schedule: str
) -> list[list[Key]]:
    """The items each of ``topics`` replays under ``schedule`` (one of :data:`SCHEDULED`), in
    order (the first replays nothing). ``spaced`` takes the earlier items trained longest ago;
    ``balanced`` first shares the count out evenly between the earlier topics, then takes each
    topic's items trained longest ago; ``expanding`` gives half the count (rounded up) to the
    topic just before, then takes the earlier items trained longest ago. Among items last trained
    at the same topic it draws with the seed, exactly as ``random`` draws from the whole pool, so
    while every earlier item is equally fresh (the third topic of a run whose second replayed all
    of the first) ``spaced`` and ``random`` pick the same items."""
    last: dict[Key, int] = {}  # item -> the position of the topic that last trained it
    picks: list[list[Key]] = []
    for position, topic in enumerate(topics):
        earlier = topics[:position]
        pool = _pool(earlier, name)
        count = replay_counts(len(getattr(topic, name)), len(pool), fraction)
        chosen: list[Key] = []
        if count:
            rng = _rng(seed, topic, salt, name)
            if schedule == "balanced":
                groups = [[key for key in pool if key[0] == other.name] for other in earlier]
                for group, quota in zip(groups, _quotas([len(g) for g in groups], count, rng)):
                    chosen += _trained_longest_ago(group, quota, last, rng)
            elif schedule == "expanding" and position >= 2:
                newest = [key for key in pool if key[0] == earlier[-1].name]
                chosen = _trained_longest_ago(newest, min(len(newest), -(-count // 2)), last, rng)
                taken = set(chosen)
                rest = [key for key in pool if key not in taken]
                chosen += _trained_longest_ago(rest, count - len(chosen), last, rng)
            else:
                chosen = _trained_longest_ago(pool, count, last, rng)
        order = {key: i for i, key in enumerate(pool)}
        picked = sorted(chosen, key=order.__getitem__)
        for key in picked:
            last[key] = position
        for i in range(len(getattr(topic, name))):
            last[(topic.name, i)] = position
        picks.append(picked)
    return picks


def _trained_longest_ago(
    items: list[Key], count: int, last: Mapping[Key, int], rng: random.Random
) -> list[Key]:
    """``count`` of ``items``, those trained longest ago first, ties drawn with ``rng``."""
    chosen: list[Key] = []
    for when in sorted({last[key] for key in items}):
        wanted = count - len(chosen)
        if wanted <= 0:
            break
        group = [key for key in items if last[key] == when]
        chosen += group if len(group) <= wanted else rng.sample(group, wanted)
    return chosen


def _quotas(sizes: list[int], count: int, rng: random.Random) -> list[int]:
    """``count`` shared out as evenly as ``sizes`` allow (no share above its size); what does not
    divide evenly goes to shares drawn with ``rng``."""
    quotas = [0] * len(sizes)
    left = count
    while left:
        room = [j for j, size in enumerate(sizes) if quotas[j] < size]
        share, extra = divmod(left, len(room))
        if not share:
            for j in rng.sample(room, extra):
                quotas[j] += 1
            break
        for j in room:
            added = min(share, sizes[j] - quotas[j])
            quotas[j] += added
            left -= added
    return quotas


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
