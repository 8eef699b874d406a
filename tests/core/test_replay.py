"""Replay, the person-level voice set, and ACC/BWT: the mechanics of learning that holds."""

import itertools
import json

import pytest

from align.core.engine import retention_scores
from align.core.replay import probes, replay_counts, replay_topic, strengths, with_person_voice
from align.errors import ConfigError
from align.testing import StubEvaluator, StubModel, StubObjective, StubPlugin, make_topic, run_protocol


def topic(name, passages, pairs=1):
    return make_topic(
        name=name,
        content=[f"{name} passage {i}." for i in range(passages)],
        preference_pairs=[
            {"prompt": f"{name} q{i}?", "chosen": f"{name} yes {i}", "rejected": f"{name} no {i}"}
            for i in range(pairs)
        ],
        voice_pairs=[{"prompt": f"{name} v?", "chosen": f"{name} mine", "rejected": f"{name} plain"}],
    )


TOPICS = [topic("t1", 4, 2), topic("t2", 4, 2), topic("t3", 2, 2)]


def test_replay_counts_are_a_multiple_of_the_topic_s_own_items_bounded_by_the_pool():
    assert replay_counts(own=4, pool=10, fraction=0.5) == 2
    assert replay_counts(own=4, pool=3, fraction=1.0) == 3
    assert replay_counts(own=4, pool=10, fraction=0.0) == 0
    assert replay_counts(own=4, pool=0, fraction=1.0) == 0
    assert replay_counts(own=1, pool=10, fraction=0.1) == 1  # any replay replays at least one item


def test_replay_appends_a_seeded_sample_of_earlier_items_to_the_topic_s_own():
    mixed, chosen = replay_topic(TOPICS[2], TOPICS[:2], {"content": 1.0, "preference_pairs": 0.5}, seed=3)
    assert mixed.content[:2] == TOPICS[2].content  # its own passages first, all of them
    replayed = mixed.content[2:]
    assert len(replayed) == 2 and len(chosen["content"]) == 2
    earlier = {(t.name, i): passage for t in TOPICS[:2] for i, passage in enumerate(t.content)}
    assert replayed == tuple(earlier[tuple(item)] for item in chosen["content"])
    assert len(mixed.preference_pairs) == 3 and len(chosen["preference_pairs"]) == 1
    assert mixed.quiz == TOPICS[2].quiz and mixed.voice_pairs == TOPICS[2].voice_pairs  # never replayed
    again, _ = replay_topic(TOPICS[2], TOPICS[:2], {"content": 1.0, "preference_pairs": 0.5}, seed=3)
    assert again == mixed
    samples = {
        replay_topic(TOPICS[2], TOPICS[:2], {"content": 1.0}, seed=seed)[0].content for seed in range(8)
    }
    assert len(samples) > 1  # the seed draws the sample


def test_replay_of_nothing_leaves_the_topic_as_it_is():
    assert replay_topic(TOPICS[1], TOPICS[:1], {"content": 0.0}, seed=0) == (TOPICS[1], {})
    assert replay_topic(TOPICS[0], [], {"content": 1.0}, seed=0) == (TOPICS[0], {})


def test_the_person_voice_set_is_every_topic_s_voice_pairs():
    pooled = with_person_voice(TOPICS[1], TOPICS)
    assert [p.prompt for p in pooled.voice_pairs] == ["t1 v?", "t2 v?", "t3 v?"]
    assert pooled.content == TOPICS[1].content


def trained_on(**config):
    seen = []
    plugin = StubPlugin(
        objectives={"sft": StubObjective(effect=lambda policy, t: seen.append(t))},
        evaluators={"quiz": StubEvaluator(lambda model, t: {"accuracy": len(t.voice_pairs) / 10})},
    )
    protocol = [{"name": "sft", "train": "sft"}, {"name": "after", "evaluate": ["quiz"]}]
    result = run_protocol(protocol, TOPICS, plugins=[plugin], builtins=False, config=config)
    return seen, result


def test_the_engine_replays_earlier_topics_into_training_and_records_what():
    seen, result = trained_on(replay={"content": 1.0})
    assert [len(t.content) for t in seen] == [4, 8, 4]  # t2: 4 of t1's 4; t3: 2 of the 8 earlier
    events = [e for e in result.events if e["kind"] == "replay"]
    assert [(e["topic"], e["step"], e["metrics"]) for e in events] == [
        ("t2", "sft", {"content": 4.0}),
        ("t3", "sft", {"content": 2.0}),
    ]
    assert all(name == "t1" for name, _ in events[0]["items"]["content"])
    assert sorted(json.loads(json.dumps(events[0]["items"]["content"]))) == [["t1", i] for i in range(4)]


def test_replay_of_nothing_trains_each_topic_on_its_own_items():
    seen, result = trained_on(replay={"content": 0, "preference_pairs": 0})
    assert [t.content for t in seen] == [t.content for t in TOPICS]
    assert not [e for e in result.events if e["kind"] == "replay"]


def test_by_default_each_topic_replays_as_many_earlier_passages_as_it_has():
    seen, _ = trained_on()
    assert [len(t.content) for t in seen] == [4, 8, 4]
    assert [len(t.preference_pairs) for t in seen] == [2, 2, 2]


@pytest.mark.parametrize(
    ("requires", "reads", "content", "pairs", "replayed"),
    [
        (("preference_pairs",), None, [4, 4, 2], [2, 4, 4], {"preference_pairs"}),
        (("content",), None, [4, 8, 4], [2, 2, 2], {"content"}),
        (None, None, [4, 8, 4], [2, 4, 4], {"content", "preference_pairs"}),  # says nothing: everything
        # reads, where declared, wins over requires (SFT with answers needs passages, reads pairs too)
        (
            ("content",),
            ("content", "preference_pairs"),
            [4, 8, 4],
            [2, 4, 4],
            {"content", "preference_pairs"},
        ),
        (("content",), (), [4, 4, 2], [2, 2, 2], None),  # reads nothing: nothing replayed
    ],
)
def test_replay_draws_only_the_fields_the_objective_reads(requires, reads, content, pairs, replayed):
    seen = []
    objective = StubObjective(effect=lambda policy, t: seen.append(t))
    if requires is not None:
        objective.requires = requires
    if reads is not None:
        objective.reads = reads
    plugin = StubPlugin(
        objectives={"train": objective}, evaluators={"quiz": StubEvaluator({"accuracy": 1.0})}
    )
    protocol = [{"name": "train", "train": "train"}, {"name": "after", "evaluate": ["quiz"]}]
    result = run_protocol(
        protocol,
        TOPICS,
        plugins=[plugin],
        builtins=False,
        config={"replay": {"content": 1.0, "preference_pairs": 1.0}},
    )
    assert [len(t.content) for t in seen] == content
    assert [len(t.preference_pairs) for t in seen] == pairs
    events = [e for e in result.events if e["kind"] == "replay"]
    if replayed is None:
        assert not events
    else:
        assert events and all(set(e["items"]) == replayed for e in events)


@pytest.mark.parametrize(("voice_set", "pairs"), [("person", 3), ("topic", 1)])
def test_evaluators_score_the_person_s_voice_pairs_or_the_topic_s(voice_set, pairs):
    _, result = trained_on(voice_set=voice_set)
    assert result.metrics("t2", "after")["quiz.accuracy"] == pytest.approx(pairs / 10)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"replay": {"content": -1}}, "replay.content: must be between 0"),
        ({"replay": {"content": float("nan")}}, "replay.content: must be a finite number"),
        ({"replay": {"contents": 1}}, "unknown key 'replay.contents'"),
        ({"voice_set": "everyone"}, "voice_set: expected one of person, topic"),
    ],
)
def test_bad_replay_and_voice_set_values_are_config_errors(config, message):
    with pytest.raises(ConfigError, match=message):
        trained_on(**config)


def test_acc_is_the_mean_of_the_last_row_and_bwt_the_mean_change_of_earlier_topics():
    matrix = [[0.8, None, None], [0.6, 1.0, None], [0.4, 0.9, 0.7]]
    scores = retention_scores(matrix)
    assert scores["acc"] == pytest.approx((0.4 + 0.9 + 0.7) / 3)
    assert scores["bwt"] == pytest.approx(((0.4 - 0.8) + (0.9 - 1.0)) / 2)
    assert retention_scores([[0.5]]) == {"acc": 0.5, "bwt": None}
    assert retention_scores([]) == {"acc": None, "bwt": None}


def test_the_summary_carries_acc_and_bwt_per_recheck_metric():
    state = {"t1": 0.0, "t2": 0.0, "t3": 0.0}

    def learn(policy, t):
        for name in state:
            state[name] = max(0.0, state[name] - 0.25)
        state[t.name] = 1.0

    plugin = StubPlugin(
        objectives={"sft": StubObjective(effect=learn)},
        evaluators={"quiz": StubEvaluator(lambda model, t: {"accuracy": state[t.name]})},
    )
    protocol = [{"name": "sft", "train": "sft"}, {"name": "after", "evaluate": ["quiz"]}]
    summary = run_protocol(protocol, TOPICS, plugins=[plugin], builtins=False).summary
    assert summary["forgetting"]["acc"]["quiz.accuracy"] == pytest.approx((0.5 + 0.75 + 1.0) / 3)
    assert summary["forgetting"]["bwt"]["quiz.accuracy"] == pytest.approx((-0.5 - 0.25) / 2)


@pytest.mark.parametrize(
    ("answers", "reads"),
    [
        ("none", ("content",)),
        ("chosen", ("content", "preference_pairs")),
        ("rejected", ("content", "preference_pairs")),
    ],
)
def test_sft_replays_earlier_answers_only_when_it_trains_on_answers(answers, reads):
    from align.objectives.sft import SFTObjective

    assert SFTObjective(answers=answers).reads == reads
    assert SFTObjective(answers=answers).requires == ("content",)  # a topic needs no pairs for SFT


SIX = [topic(f"s{k}", 7, 3) for k in range(6)]


def replayed(schedule, seed, topics=SIX, field="content"):
    """Each topic's replayed ``[topic, index]`` items, as the engine would draw them."""
    return [
        replay_topic(t, topics[:k], {field: 1.0}, seed=seed, salt="sft", schedule=schedule)[1].get(field, [])
        for k, t in enumerate(topics)
    ]


def longest_gaps(schedule, seed):
    """For each item of the first four topics, the most topics in a row (up to the sixth) that
    neither trained it as its own nor replayed it."""
    trained = {(t.name, i): [k] for k, t in enumerate(SIX) for i in range(len(t.content))}
    for k, items in enumerate(replayed(schedule, seed)):
        for name, i in items:
            trained[(name, i)].append(k)
    gaps = {}
    for key, when in trained.items():
        if when[0] < 4:
            marks = [*sorted(when), len(SIX)]
            gaps[key] = max(b - a - 1 for a, b in itertools.pairwise(marks))
    return gaps


def test_spaced_replay_brings_every_earlier_item_back_before_any_comes_back_twice():
    for seed in range(5):
        picks = replayed("spaced", seed)
        assert picks[1] == [["s0", i] for i in range(7)]  # the pool is the first topic: all of it
        # the fourth topic takes exactly the seven items the third left out
        third, fourth = ({tuple(x) for x in picks[k]} for k in (2, 3))
        assert (
            third.isdisjoint(fourth) and len(third | fourth) == 14 and {n for n, _ in fourth} == {"s0", "s1"}
        )
        # no earlier item waits more than two topics to be trained again
        assert max(longest_gaps("spaced", seed).values()) <= 2


def test_random_replay_leaves_some_item_unseen_for_longer_at_some_seed():
    # what spaced replay is for: under a uniform sample some item waits three topics or more
    assert any(max(longest_gaps("random", seed).values()) >= 3 for seed in range(5))


def test_spaced_replay_is_the_random_sample_while_every_earlier_item_is_equally_fresh():
    for seed in range(4):
        spaced, uniform = replayed("spaced", seed), replayed("random", seed)
        assert spaced[:3] == uniform[:3]  # the third topic's pool was all trained at the second
        assert spaced[3:] != uniform[3:]


def test_spaced_replay_depends_only_on_the_topics_the_settings_and_the_seed():
    assert replayed("spaced", 3) == replayed("spaced", 3)
    assert replayed("spaced", 3) != replayed("spaced", 4)
    pairs = replayed("spaced", 3, field="preference_pairs")
    assert [len(p) for p in pairs] == [0, 3, 3, 3, 3, 3] and pairs[1] == [["s0", i] for i in range(3)]


def test_balanced_replay_rehearses_every_earlier_topic_at_every_later_one():
    for seed in range(5):
        for k, items in enumerate(replayed("balanced", seed)):
            shares = [sum(name == t.name for name, _ in items) for t in SIX[:k]]
            assert sum(shares) == (7 if k else 0)
            assert not shares or max(shares) - min(shares) <= 1  # as even as seven items allow
        # within a topic, every item comes back before any of its items comes back twice
        assert max(longest_gaps("balanced", seed).values()) <= 3
    assert any(
        0 in [sum(n == t.name for n, _ in items) for t in SIX[:k]]
        for k, items in enumerate(replayed("spaced", 0))
    )  # spaced can leave a whole topic out


def test_balanced_shares_follow_the_topics_sizes():
    small = [topic("a", 1), topic("b", 6), topic("c", 4)]
    items = replay_topic(small[2], small[:2], {"content": 1.0}, seed=0, schedule="balanced")[1]["content"]
    assert sorted(n for n, _ in items) == ["a", "b", "b", "b"]  # a has one to give, b the rest
    uneven = [topic("a", 5), topic("b", 5), topic("c", 3)]
    items = replay_topic(uneven[2], uneven[:2], {"content": 1.0}, seed=0, schedule="balanced")[1]["content"]
    assert sorted(n for n, _ in items) in (["a", "a", "b"], ["a", "b", "b"])


def test_expanding_replay_gives_half_of_each_replay_to_the_topic_just_before():
    for seed in range(5):
        picks = replayed("expanding", seed)
        assert picks[1] == [["s0", i] for i in range(7)]
        for k in range(2, 6):
            assert len(picks[k]) == 7
            newest = sum(name == f"s{k - 1}" for name, _ in picks[k])
            # seven halved, rounded up; at the third topic the rest ties the second's other items
            # with the first's (all last trained at the second), so it may take more of them
            assert newest == 4 if k > 2 else newest >= 4


def test_expanding_replay_rehearses_every_earlier_topic_before_the_run_ends():
    rehearsed = {name for items in replayed("expanding", 0) for name, _ in items}
    assert rehearsed == {f"s{k}" for k in range(5)}
    # what it is for: spaced leaves the newest topics' items for last, and six topics end first
    assert {name for items in replayed("spaced", 0) for name, _ in items} == {"s0", "s1", "s2"}


def test_expanding_replay_takes_the_rest_trained_longest_ago():
    # at the fourth topic: four of the third's items, then the three trained longest ago, which
    # are the first two topics' items the third topic did not replay
    picks = replayed("expanding", 2)
    third, fourth = ({tuple(x) for x in picks[k]} for k in (2, 3))
    rest = {key for key in fourth if key[0] != "s2"}
    assert len(rest) == 3 and rest.isdisjoint(third) and {n for n, _ in rest} <= {"s0", "s1"}


def test_the_engine_replays_on_the_configured_schedule():
    topics = [topic(f"e{k}", 2) for k in range(4)]
    seen = []
    plugin = StubPlugin(
        objectives={"sft": StubObjective(effect=lambda policy, t: seen.append(t))},
        evaluators={"quiz": StubEvaluator({"accuracy": 1.0})},
    )
    protocol = [{"name": "sft", "train": "sft"}, {"name": "after", "evaluate": ["quiz"]}]
    for schedule in ("random", "spaced", "balanced", "expanding"):
        seen.clear()
        result = run_protocol(
            protocol,
            topics,
            plugins=[plugin],
            builtins=False,
            config={"replay": {"content": 1.0, "schedule": schedule}, "seed": 1},
        )
        events = [e["items"]["content"] for e in result.events if e["kind"] == "replay"]
        assert events == replayed(schedule, 1, topics)[1:]
        assert [t.content[2:] for t in seen[1:]] == [
            tuple(topics[int(name[1:])].content[i] for name, i in items) for items in events
        ]


def facts(name, passages, pairs):
    """A topic whose passages each state a named fact (what a self-test blanks)."""
    content = [f"The {name} boat {i} was called the Wren {name.upper()}{i}." for i in range(passages)]
    return make_topic({**topic(name, 1, pairs).to_dict(), "content": content})


def weak_model(weak):
    """A stub model that answers the self-test of the items in ``weak`` ({(topic, field, index)})
    worse than every other."""
    prompts = {
        prompt
        for t in WEAK_TOPICS
        for field in ("content", "preference_pairs")
        for i, item in enumerate(probes(t, field))
        if (t.name, field, i) in weak
        for prompt, _ in item
    }
    return StubModel(loglikelihood=lambda prompt, answer: -5.0 * len(answer) if prompt in prompts else -1.0)


WEAK_TOPICS = [facts("w0", 4, 3), facts("w1", 4, 3), facts("w2", 2, 2)]


def test_self_tests_blank_a_passage_s_facts_and_ask_a_pair_s_prompt():
    passage = probes(WEAK_TOPICS[0], "content")[1]
    assert ("Fill in the blank: The w0 boat 1 was called the ____.", "Wren W01") in passage
    assert all(
        prompt.startswith("Fill in the blank: ") and answer in WEAK_TOPICS[0].content[1]
        for prompt, answer in passage
    )
    assert probes(WEAK_TOPICS[0], "preference_pairs") == [
        [("w0 q0?", "w0 yes 0")],
        [("w0 q1?", "w0 yes 1")],
        [("w0 q2?", "w0 yes 2")],
    ]
    # a passage with no fact to blank is tested by its second half after its first
    plain = make_topic(name="plain", content=["it rained all day and we stayed in"])
    assert probes(plain, "content") == [[("it rained all day", " and we stayed in")]]
    # made from the training items alone: another quiz gives the same self-test
    other_quiz = make_topic(
        {
            **WEAK_TOPICS[0].to_dict(),
            "quiz": [{"question": "What was boat 1 called?", "choices": ["Wren W01", "Gull"], "answer": 0}],
        }
    )
    for field in ("content", "preference_pairs"):
        assert probes(other_quiz, field) == probes(WEAK_TOPICS[0], field)


def test_strengths_are_each_item_s_mean_log_likelihood_per_character():
    model = StubModel(
        loglikelihood=lambda prompt, answer: -2.0 * len(answer) if "boat 0" in prompt else -len(answer)
    )
    scores = strengths(model, WEAK_TOPICS[:1], "content")
    assert scores == {("w0", 0): -2.0, ("w0", 1): -1.0, ("w0", 2): -1.0, ("w0", 3): -1.0}


def test_weakest_replay_rehearses_the_items_the_model_answers_worst():
    weak = {
        ("w0", "content", 3),
        ("w1", "content", 0),
        ("w1", "preference_pairs", 2),
        ("w0", "preference_pairs", 0),
    }
    settings = {"content": 1.0, "preference_pairs": 1.0}
    for seed in range(3):
        mixed, chosen = replay_topic(
            WEAK_TOPICS[2], WEAK_TOPICS[:2], settings, seed, "sft", "weakest", weak_model(weak)
        )
        assert chosen == {"content": [["w0", 3], ["w1", 0]], "preference_pairs": [["w0", 0], ["w1", 2]]}
        assert mixed.content[2:] == (WEAK_TOPICS[0].content[3], WEAK_TOPICS[1].content[0])


def test_weakest_replay_draws_among_items_held_equally_with_the_seed():
    equal = StubModel()  # every answer scores 0.0
    picks = [
        replay_topic(WEAK_TOPICS[2], WEAK_TOPICS[:2], {"content": 1.0}, seed, "sft", "weakest", equal)[1]
        for seed in range(6)
    ]
    assert (
        picks[0]
        == replay_topic(WEAK_TOPICS[2], WEAK_TOPICS[:2], {"content": 1.0}, 0, "sft", "weakest", equal)[1]
    )
    assert len({str(p) for p in picks}) > 1


def test_weakest_replay_of_every_earlier_item_takes_no_self_test():
    model = StubModel()
    _, chosen = replay_topic(WEAK_TOPICS[1], WEAK_TOPICS[:1], {"content": 1.0}, 0, "sft", "weakest", model)
    assert chosen == {"content": [["w0", i] for i in range(4)]}
    assert model.calls == []


def test_weakest_replay_needs_the_model():
    with pytest.raises(ValueError, match="weakest"):
        replay_topic(WEAK_TOPICS[2], WEAK_TOPICS[:2], {"content": 1.0}, 0, "sft", "weakest")


def test_the_engine_scores_earlier_items_with_the_policy_for_weakest_replay():
    weak = {("w0", "content", 1), ("w1", "content", 2)}
    model = weak_model(weak)
    result = run_protocol(
        [{"name": "sft", "train": "sft"}, {"name": "after", "evaluate": ["quiz"]}],
        WEAK_TOPICS,
        plugins=[
            StubPlugin(
                objectives={"sft": StubObjective()}, evaluators={"quiz": StubEvaluator({"accuracy": 1.0})}
            )
        ],
        builtins=False,
        config={"replay": {"content": 1.0, "schedule": "weakest"}},
        model=model,
    )
    events = [e["items"]["content"] for e in result.events if e["kind"] == "replay"]
    assert events == [[["w0", i] for i in range(4)], [["w0", 1], ["w1", 2]]]
    scored = [args[0] for method, args in model.calls if method == "loglikelihood"]
    assert any(
        prompt.startswith("Fill in the blank: The w1 boat") for prompts in scored for prompt in prompts
    )


def test_an_unknown_replay_schedule_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"replay.schedule: expected one of random, spaced, balanced, expanding, weakest, got 'spacd'",
    ):
        run_protocol(
            [{"name": "after", "evaluate": ["quiz"]}], TOPICS, config={"replay": {"schedule": "spacd"}}
        )


def test_on_the_demo_s_topics_spaced_replays_what_random_does():
    # the demo's second topic replays all of the first, so its third finds every item equally
    # fresh: the default schedule leaves the demo's runs as they were
    from align.core.topics import load_topics
    from tests.conftest import REPO

    demo = load_topics(REPO / "align" / "demo" / "topics")
    for field in ("content", "preference_pairs"):
        for k in range(1, len(demo)):
            spaced, uniform = (
                replay_topic(demo[k], demo[:k], {field: 1.0}, 0, "sft", schedule)[1]
                for schedule in ("spaced", "random")
            )
            assert spaced == uniform and spaced[field]
