import pytest

from align import GateDecision, ParamError
from align.gates.threshold import ThresholdGate


def test_seed_gate_passes_with_reason():
    gate = ThresholdGate(all=["quiz.accuracy >= 0.70", "voice.score < 0.75"])
    decision = gate.decide({"quiz.accuracy": 0.83, "voice.score": 0.5})
    assert decision == GateDecision(True, "quiz.accuracy 0.83 >= 0.70 and voice.score 0.50 < 0.75")


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({"quiz.accuracy": 0.43, "voice.score": 0.5}, "quiz.accuracy 0.43 < 0.70"),
        ({"quiz.accuracy": 0.9, "voice.score": 0.75}, "voice.score 0.75 >= 0.75"),
        (
            {"quiz.accuracy": 0.1, "voice.score": 0.9},
            "quiz.accuracy 0.10 < 0.70 and voice.score 0.90 >= 0.75",
        ),
    ],
)
def test_seed_gate_blocks_and_says_why(metrics, reason):
    gate = ThresholdGate(all=["quiz.accuracy >= 0.70", "voice.score < 0.75"])
    assert gate.decide(metrics) == GateDecision(False, reason)


def test_any_rules_and_mapping_form():
    gate = ThresholdGate(any=[{"metric": "a", "op": ">", "value": 1}, "b <= 0"])
    assert gate.decide({"a": 2, "b": 5}).passed
    assert gate.decide({"a": 0, "b": 0}).passed
    assert not gate.decide({"a": 0, "b": 1}).passed
    assert gate.metrics_needed() == ["a", "b"]


@pytest.mark.parametrize(
    "rule",
    ["__import__('os').system('x') > 1", "quiz.accuracy => 0.7", "quiz.accuracy >= high", {"metric": "a"}, 3],
)
def test_rules_are_parsed_never_evaluated(rule):
    with pytest.raises(ParamError):
        ThresholdGate(all=[rule])


def test_a_gate_needs_a_rule():
    with pytest.raises(ParamError, match="at least one rule"):
        ThresholdGate()
