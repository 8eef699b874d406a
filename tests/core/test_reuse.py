"""The engine reuses an evaluation of the same weights on the same data (align.core.reuse)."""

import json

import pytest

from align.core import reuse
from align.core.plan import resolve_plan
from align.core.runner import execute
from align.testing import PluginHarness, StubEvaluator, StubObjective, StubPlugin, StubPolicy, make_topic

PROTOCOL = [
    {"name": "before", "evaluate": ["quiz", "voice"]},
    {"name": "sft", "train": "sft"},
    {"name": "after_sft", "evaluate": ["quiz", "voice"]},
]
VOICE = [{"prompt": "Any advice?", "chosen": "Ride the swell, gull.", "rejected": "Be patient."}]


class FingerprintedPolicy(StubPolicy):
    """A stub policy whose weights (``state``) have a fingerprint, as the real policy's do."""

    def fingerprint(self):
        return json.dumps(self.state, sort_keys=True)


def learn(policy, topic):
    policy.state[topic.name] = policy.state.get(topic.name, 0) + 1


def run(tmp_path, policy_class=FingerprintedPolicy, voice_cacheable=True, voice_pairs=None, name="run"):
    state = {}
    quiz = StubEvaluator(lambda model, topic: {"accuracy": state.get(topic.name, 0) / 2})
    # The voice depends on the weights and on the voice pairs only, as a cacheable evaluator must.
    voice = StubEvaluator(lambda model, topic: {"score": sum(state.values()) / 10 + len(topic.voice_pairs)})
    voice.requires = ("voice_pairs",)
    voice.cacheable = voice_cacheable
    harness = PluginHarness(builtins=[])
    harness.register(
        StubPlugin(objectives={"sft": StubObjective(effect=learn)}, evaluators={"quiz": quiz, "voice": voice})
    )
    pairs = voice_pairs or [VOICE, VOICE, VOICE]
    topics = [make_topic(name=f"t{i}", voice_pairs=pairs[i]) for i in range(3)]
    data = {"protocol": PROTOCOL, "output": str(tmp_path / name), "voice_set": "topic"}
    plan = resolve_plan(data, "<test>", harness.registry, topics=topics)
    policy = policy_class(state=state, scratch_dir=tmp_path / "scratch")
    return execute(plan, policy=policy, hooks=harness.manager), quiz, voice


def metrics(summary):
    topics = {t["topic"]: [s.get("metrics") for s in t["steps"]] for t in summary["topics"]}
    return topics, summary["forgetting"]


def test_the_same_weights_and_voice_pairs_are_scored_once(tmp_path):
    summary, quiz, voice = run(tmp_path)
    # Weights change only in sft: t1 before (bare), then after each topic's sft. Every `before`
    # of a later topic and every recheck sees weights already scored on the same voice pairs.
    assert voice.calls == ["t0", "t0", "t1", "t2"]
    # quiz is not cacheable: every evaluation and recheck runs (3 x 2 steps + 1 + 2 rechecks).
    assert len(quiz.calls) == 9
    plain, _, plain_voice = run(tmp_path, voice_cacheable=False, name="plain")
    assert len(plain_voice.calls) == 9
    assert metrics(summary) == metrics(plain)


def test_different_voice_pairs_are_not_reused(tmp_path):
    other = [{"prompt": "Why?", "chosen": "Tides, gull.", "rejected": "Because."}]
    _, _, voice = run(tmp_path, voice_pairs=[VOICE, VOICE + other, VOICE])
    # t1's pairs differ: its `before` is scored, and with the weights after t1 so are t0's
    # pairs (the recheck), then t2's `before` reuses that; after t2 only t1's recheck runs.
    assert voice.calls == ["t0", "t0", "t1", "t1", "t0", "t2", "t1"]


def test_without_a_fingerprint_nothing_is_reused(tmp_path):
    _, _, voice = run(tmp_path, policy_class=StubPolicy)
    assert len(voice.calls) == 9


def test_the_topic_key_holds_only_what_the_evaluator_reads():
    a = make_topic(name="a", voice_pairs=VOICE)
    b = make_topic(name="b", voice_pairs=VOICE, content=["Something else entirely."])
    assert reuse.topic_key(a, ("voice_pairs",)) == reuse.topic_key(b, ("voice_pairs",))
    assert reuse.topic_key(a, ("content",)) != reuse.topic_key(b, ("content",))
    assert reuse.topic_key(a, None) != reuse.topic_key(make_topic(name="c", voice_pairs=VOICE), None)


def test_the_real_policy_s_fingerprint_follows_the_adapter_weights(tmp_path):
    torch = pytest.importorskip("torch")
    from align.hf.loading import attach_adapter
    from align.hf.policy import EnginePolicy
    from align.testing import tiny_causal_lm

    model, tokenizer = tiny_causal_lm()
    adapter = attach_adapter(model, rank=1, alpha=1.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    policy = EnginePolicy(adapter, tokenizer, seed=0, scratch_dir=tmp_path)
    first = policy.fingerprint()
    saved = policy.snapshot()
    assert policy.fingerprint() == first
    with torch.no_grad():
        next(p for n, p in policy.model.named_parameters() if "lora_B" in n).add_(1e-3)
    assert policy.fingerprint() != first
    policy.restore(saved)
    assert policy.fingerprint() == first


def test_a_real_run_reports_the_same_metrics_with_and_without_reuse(
    runner, tmp_path, tiny_model_dir, monkeypatch
):
    """The tiny model, two topics, quiz, voice and style: reuse changes no number."""
    import yaml

    from align.cli import cli
    from tests.conftest import TINY_RUN_PROTOCOL, write_topic

    topics = tmp_path / "topics"
    topics.mkdir()
    write_topic(topics, "first")
    write_topic(topics, "second")
    config = tmp_path / "tiny.yaml"
    protocol = [dict(step) for step in TINY_RUN_PROTOCOL]
    protocol[0]["evaluate"] = ["quiz", "voice", "style"]
    config.write_text(
        yaml.safe_dump(
            {
                "seed": 0,
                "lora": {"alpha": 32.0},
                "sft": {"epochs": 1, "learning_rate": 0.05},
                "dpo": {"max_steps": 1},
                "protocol": protocol,
            }
        )
    )
    calls = []
    original = reuse.Evaluations.get

    def counted(self, key):
        found = original(self, key)
        calls.append(found is not None)
        return found

    def summary_of(name):
        out = tmp_path / name
        args = [
            "run",
            str(config),
            "--model",
            str(tiny_model_dir),
            "--topics",
            str(topics),
            "--output",
            str(out),
        ]
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, result.output
        return json.loads((out / "summary.json").read_text())

    monkeypatch.setattr(reuse.Evaluations, "get", counted)
    reused = summary_of("reused")
    assert any(calls), "the second topic's `before` voice and style should be reused"
    monkeypatch.setattr(reuse.Evaluations, "key", lambda *args: None)
    plain = summary_of("plain")
    assert metrics(reused) == metrics(plain)
