"""``align new-plugin``: write a plugin package whose tests pass as generated.

The package is ``align-NAME`` (distribution) with module ``align_NAME``, registered under the
``align`` entry-point group, holding one working component of the chosen kind, tests that use
align's pytest fixtures, and a README. Files are written to a temporary directory and moved into
place at the end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

from align.core.rundir import staged_directory
from align.errors import AlignError

KINDS = ("evaluator", "objective", "gate")
_NAME = re.compile(r"[a-z][a-z0-9_-]*")  # matched whole: `$` would also accept a trailing newline


class ScaffoldError(AlignError):
    exit_code = 2


def new_plugin(name: str, kind: str, directory: str | Path = ".") -> Path:
    """Write the package for plugin ``name`` of ``kind`` under ``directory``; return its path."""
    if not _NAME.fullmatch(name):
        raise ScaffoldError(
            f"plugin name '{name}': use lower-case letters, digits, '-' or '_', starting with a letter "
            "(e.g. keyword-coverage)"
        )
    if kind not in KINDS:
        raise ScaffoldError(f"--kind '{kind}': use one of {', '.join(KINDS)}")
    component = name.replace("-", "_")
    taken = _taken(component)
    if taken:
        raise ScaffoldError(
            f"plugin name '{name}': '{component}' is {taken}; choose another name "
            f"(e.g. align new-plugin my-{name})"
        )
    values = {
        "name": name,
        "component": component,
        "module": f"align_{component}",
        "dist": f"align-{name}",
        "cls": _class_name(component, kind),
        "kind": kind,
        "hook": {
            "evaluator": "register_evaluators",
            "objective": "register_objectives",
            "gate": "register_gates",
        }[kind],
    }
    target = Path(directory) / values["dist"]
    if target.exists():
        raise ScaffoldError(f"{target}: already exists; choose another name or --dir")
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README[kind],
        f"src/{values['module']}/__init__.py": MODULES[kind],
        f"tests/test_{component}.py": TESTS[kind],
    }
    with staged_directory(target) as staging:
        for relative, template in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(Template(template).substitute(values), encoding="utf-8")
    return target


def _taken(component: str) -> str:
    """What ``component`` already names, or ``""``: a built-in component, which the installed
    package would replace for every run, or a base section of the config, which a component's
    params section would be read as (the plugin manager refuses to load such a component)."""
    from align.plugins.manager import _reserved_names, build_registry, new_plugin_manager, register_builtins

    if component in _reserved_names():
        return "a base section of the config"
    manager = new_plugin_manager()
    register_builtins(manager)
    registry = build_registry(manager)
    for kind in KINDS:
        if registry.get(kind, component) is not None:
            return f"align's built-in {kind}, which the installed package would replace"
    return ""


def _class_name(component: str, kind: str) -> str:
    """``keyword_coverage`` → ``KeywordCoverageEvaluator`` (no ``…EvaluatorEvaluator``)."""
    words = [part.capitalize() for part in component.split("_") if part]
    if not words or words[-1].lower() != kind:
        words.append(kind.capitalize())
    return "".join(words)


PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "An align $kind plugin: $component"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["mindprint-align"]

[project.optional-dependencies]
test = ["pytest"]

# align finds the plugin through this entry point.
[project.entry-points.align]
$component = "$module"

[tool.setuptools.packages.find]
where = ["src"]

[tool.ruff]
line-length = 110
src = ["src"]

[tool.ruff.lint]
ignore = ["E501"]  # the formatter owns line length
"""

_README_HEAD = """\
# $dist

A $kind plugin for align (`pip install mindprint-align`). Install it next to align and it is
available as `$component` in any config; `align plugins` lists it.

```bash
pip install -e .
align plugins
python -m pytest            # the tests use align's fixtures: stub_model, make_topic, plugin_manager
```

"""

README = {
    "evaluator": _README_HEAD
    + """\
## Use it

```yaml
$component:
  max_new_tokens: 64
protocol:
  - {name: before, evaluate: [quiz, $component]}
  - {name: sft, train: sft}
  - {name: after_sft, evaluate: [quiz, $component]}
```

It records `$component.mean_words` and `$component.empty`; gates can read them.
""",
    "objective": _README_HEAD
    + """\
## Use it

```yaml
$component:
  steps: 10
  learning_rate: 5.0e-3
protocol:
  - {name: before, evaluate: [quiz]}
  - {name: $component, train: $component}
  - {name: after, evaluate: [quiz]}
```

It records `$component.loss`, `$component.first_loss`, `$component.final_loss` and `$component.steps`.
""",
    "gate": _README_HEAD
    + """\
## Use it

```yaml
protocol:
  - {name: after_sft, evaluate: [quiz, voice]}
  - name: dpo
    train: dpo
    gate: {use: $component, higher: quiz.accuracy, lower: voice.score, min_gap: 0.1}
```

The step runs only when `higher` exceeds `lower` by at least `min_gap`.
""",
}

MODULES = {
    "evaluator": '''\
"""The `$component` evaluator: how long the model's free answers to the topic's voice prompts are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from align import LanguageModel, Topic, hookimpl, require


@dataclass
class $cls:
    """Generate an answer to each voice prompt; report the mean word count and the share left empty."""

    max_new_tokens: int = 64

    #: The keys evaluate() returns; align records them as `$component.<key>` and checks gates against them.
    metrics = ("mean_words", "empty")
    #: Topic fields this evaluator needs; align refuses topics without them before a run starts.
    requires = ("voice_pairs",)

    def __post_init__(self) -> None:
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1 (got {self.max_new_tokens})")

    def evaluate(self, model: LanguageModel, topic: Topic) -> dict[str, float]:
        prompts = [pair.prompt for pair in topic.voice_pairs]
        answers = model.generate(prompts, max_new_tokens=self.max_new_tokens)
        words = [len(answer.split()) for answer in answers]
        return {
            "mean_words": sum(words) / len(words),
            "empty": sum(count == 0 for count in words) / len(words),
        }


@hookimpl
def $hook(register: Any) -> None:
    register("$component", $cls)
''',
    "objective": '''\
"""The `$component` objective: next-token training on the topic's passages, in a plain PyTorch loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from align import Policy, Topic, hookimpl, require


@dataclass
class $cls:
    """Take `steps` AdamW steps on the topic's passages (one passage per step, in turn).

    It trains `policy.model`, the engine's one rank-1 adapter: only the adapter's parameters
    require gradients, so only they change.
    """

    steps: int = 10
    learning_rate: float = 5e-3

    metrics = ("loss", "first_loss", "final_loss", "steps")
    requires = ("content",)

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", f"must be >= 1 (got {self.steps})")
        require(self.learning_rate > 0, "learning_rate", f"must be > 0 (got {self.learning_rate})")

    def train(self, policy: Policy, topic: Topic) -> dict[str, float]:
        import torch

        model, tokenizer = policy.model, policy.tokenizer
        torch.manual_seed(policy.seed)
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.learning_rate)
        device = next(model.parameters()).device
        losses = []
        model.train()
        try:
            for step in range(self.steps):
                text = topic.content[step % len(topic.content)]
                batch = tokenizer(text, return_tensors="pt").to(device)
                loss = model(**batch, labels=batch["input_ids"]).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(float(loss))
        finally:
            model.eval()
        return {
            "loss": sum(losses) / len(losses),
            "first_loss": losses[0],
            "final_loss": losses[-1],
            "steps": float(self.steps),
        }


@hookimpl
def $hook(register: Any) -> None:
    register("$component", $cls)
''',
    "gate": '''\
"""The `$component` gate: run a step only while one metric leads another by a margin."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from align import GateDecision, hookimpl, require


@dataclass
class $cls:
    """Pass when `higher` exceeds `lower` by at least `min_gap` (e.g. knowledge ahead of voice)."""

    higher: str
    lower: str
    min_gap: float = 0.0

    def __post_init__(self) -> None:
        for key in ("higher", "lower"):
            value = getattr(self, key)
            require("." in value, key, f"'{value}' is not a metric name like quiz.accuracy")

    def metrics_needed(self) -> list[str]:
        """The metrics decide() reads; align checks that earlier steps record them."""
        return [self.higher, self.lower]

    def decide(self, metrics: Mapping[str, float]) -> GateDecision:
        gap = metrics[self.higher] - metrics[self.lower]
        passed = gap >= self.min_gap
        relation = ">=" if passed else "<"
        reason = f"{self.higher} - {self.lower} = {gap:.2f} {relation} {self.min_gap:.2f}"
        return GateDecision(passed, reason)


@hookimpl
def $hook(register: Any) -> None:
    register("$component", $cls)
''',
}

_TEST_INSTALLED = '''

def test_registers_through_the_hook(plugin_manager):
    plugin_manager.register($module)
    assert plugin_manager.registry.get("$kind", "$component").factory is $cls


def test_installed_as_an_align_plugin():
    """`pip install` put the entry point in place and align loads it without errors."""
    from align.plugins.manager import load_plugins

    plugins = load_plugins(environ={"ALIGN_LOAD_PLUGINS": "$component"})
    assert plugins.failures == []
    assert plugins.registry.get("$kind", "$component").factory is $cls
'''

TESTS = {
    "evaluator": '''\
"""Tests for the `$component` evaluator. The fixtures come from align's pytest plugin."""

import pytest

import $module
from $module import $cls


def test_scores_generated_answers(stub_model, make_topic):
    topic = make_topic(
        voice_pairs=[
            {"prompt": "Any advice?", "chosen": "Ride the swell.", "rejected": "Be patient."},
            {"prompt": "How are you?", "chosen": "Bright as glass.", "rejected": "Fine."},
        ]
    )
    model = stub_model(generate={"Any advice?": "ride the swell little gull", "How are you?": ""})
    scores = $cls(max_new_tokens=8).evaluate(model, topic)
    assert scores == {"mean_words": 2.5, "empty": 0.5}
    assert model.calls == [("generate", (["Any advice?", "How are you?"], 8))]


def test_rejects_bad_params():
    from align import ParamError

    with pytest.raises(ParamError):
        $cls(max_new_tokens=0)


def test_metrics_reach_a_gate_inside_the_topic_loop(plugin_manager, stub_model):
    from align.testing import StubObjective, StubPlugin

    plugin_manager.register($module)
    plugin_manager.add_builtins(["threshold"])
    plugin_manager.register(StubPlugin(objectives={"polish": StubObjective()}))
    gate = {"use": "threshold", "all": ["$component.empty < 0.5"]}
    protocol = [
        {"name": "check", "evaluate": ["$component"]},
        {"name": "polish", "train": "polish", "gate": gate},
    ]
    talkative = plugin_manager.run(protocol, model=stub_model(generate=lambda prompt: "many words here"))
    assert talkative.metrics("topic", "check") == {"$component.mean_words": 3.0, "$component.empty": 0.0}
    assert talkative.ran("topic", "polish")
    silent = plugin_manager.run(protocol, model=stub_model(generate=lambda prompt: ""))
    assert not silent.ran("topic", "polish")
'''
    + _TEST_INSTALLED,
    "objective": '''\
"""Tests for the `$component` objective on a tiny random model built from a config (no download)."""

import pytest
import torch

import $module
from $module import $cls


@pytest.fixture
def policy(tmp_path):
    from align.core.model import EnginePolicy, attach_adapter
    from align.testing import tiny_causal_lm

    model, tokenizer = tiny_causal_lm(seed=0)
    model = attach_adapter(model, rank=1, alpha=1.0, dropout=0.0, target_modules=["o_proj", "v_proj"])
    return EnginePolicy(model, tokenizer, seed=0, scratch_dir=tmp_path)


def adapter(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def test_trains_only_the_adapter_and_lowers_the_loss(policy, make_topic):
    topic = make_topic(content=["Ilse keeps a grey donkey named Tallow."])
    before = adapter(policy.model)
    frozen = {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_" not in n}
    metrics = $cls(steps=20, learning_rate=5e-2).train(policy, topic)
    assert metrics["steps"] == 20
    assert metrics["final_loss"] < metrics["first_loss"]
    assert any(not torch.equal(before[n], p) for n, p in adapter(policy.model).items())
    assert all(torch.equal(frozen[n], p) for n, p in policy.model.named_parameters() if "lora_" not in n)


def test_rejects_bad_params():
    from align import ParamError

    with pytest.raises(ParamError):
        $cls(steps=0)
'''
    + _TEST_INSTALLED,
    "gate": '''\
"""Tests for the `$component` gate, alone and inside the topic loop with stubs."""

import pytest

import $module
from $module import $cls


def test_decides_and_says_why():
    gate = $cls(higher="quiz.accuracy", lower="voice.score", min_gap=0.1)
    assert gate.metrics_needed() == ["quiz.accuracy", "voice.score"]
    passed = gate.decide({"quiz.accuracy": 0.8, "voice.score": 0.5})
    assert passed.passed and passed.reason == "quiz.accuracy - voice.score = 0.30 >= 0.10"
    assert not gate.decide({"quiz.accuracy": 0.5, "voice.score": 0.5}).passed


def test_rejects_bad_params():
    from align import ParamError

    with pytest.raises(ParamError):
        $cls(higher="accuracy", lower="voice.score")


def test_gates_a_step_inside_the_topic_loop(plugin_manager):
    from align.testing import StubEvaluator, StubObjective, StubPlugin

    plugin_manager.register($module)
    train = StubObjective()
    plugin_manager.register(
        StubPlugin(
            objectives={"polish": train},
            evaluators={"probe": StubEvaluator({"knows": 0.9, "sounds": 0.2})},
        )
    )
    gate = {"use": "$component", "higher": "probe.knows", "lower": "probe.sounds", "min_gap": 0.5}
    protocol = [{"name": "check", "evaluate": ["probe"]}, {"name": "polish", "train": "polish", "gate": gate}]
    result = plugin_manager.run(protocol)
    assert result.ran("topic", "polish")
    assert train.calls == ["topic"]
'''
    + _TEST_INSTALLED,
}
