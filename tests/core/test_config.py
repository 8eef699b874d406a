import re

import pytest
import yaml

from align.core.config import apply_overrides
from align.core.plan import make_plan
from align.errors import ConfigError
from tests.conftest import REPO, write_topic


@pytest.fixture
def topics_dir(tmp_path):
    (tmp_path / "topics").mkdir()
    write_topic(tmp_path / "topics")
    return tmp_path / "topics"


def plan_from(registry, tmp_path, data, topics=None, overrides=()):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return make_plan(registry, path, overrides=overrides, topics=topics)


def test_seed_config_loads_unchanged_and_means_what_it_says(registry, topics_dir):
    plan = make_plan(registry, REPO / "configs" / "dpo.yaml", topics=topics_dir)
    dpo = plan.config["dpo"]
    assert dpo["beta"] == 0.1
    assert dpo["learning_rate"] == pytest.approx(5e-7)  # YAML reads "5e-7" as a string; it means a number
    assert (dpo["max_steps"], dpo["per_device_train_batch_size"], dpo["gradient_accumulation_steps"]) == (
        100,
        2,
        4,
    )
    assert plan.config["lora"] == {
        "rank": 1,
        "alpha": 1.0,
        "dropout": 0.0,
        "target_modules": ["o_proj", "v_proj", "up_proj", "down_proj"],
    }
    # The objective built for the DPO step is the one the config describes.
    dpo_step = next(s for s in plan.steps if s.name == "dpo")
    assert dpo_step.components[0].instance.learning_rate == pytest.approx(5e-7)
    assert [s.name for s in plan.steps] == ["before", "sft", "after_sft", "dpo", "after_dpo"]
    assert dpo_step.gate.instance.metrics_needed() == ["quiz.accuracy", "voice.score"]


def test_demo_config_resolves(registry):
    plan = make_plan(registry, None)
    assert plan.config["name"] is None  # the run is named after the config file and the time
    assert [t.name for t in plan.topics] == ["early_life", "work", "home"]


def test_a_run_without_a_name_is_named_after_its_config_or_its_own_topics(registry, tmp_path):
    """``name: demo`` in demo.yaml sent every ``align run`` (and ``align run --topics mine/``) to
    runs/demo, so the second one collided with the first."""
    import re

    from align.core.runner import run_name

    mine = tmp_path / "mine"
    mine.mkdir()
    write_topic(mine)
    stamp = r"-\d{8}-\d{6}"
    assert re.fullmatch("demo" + stamp, run_name(make_plan(registry, None)))
    assert re.fullmatch("mine" + stamp, run_name(make_plan(registry, None, topics=mine)))
    assert re.fullmatch("alpha" + stamp, run_name(make_plan(registry, None, topics=mine / "alpha.yaml")))
    seed = REPO / "configs" / "dpo.yaml"
    assert re.fullmatch("dpo" + stamp, run_name(make_plan(registry, seed, topics=mine)))
    assert run_name(make_plan(registry, seed, topics=mine, overrides=["name=mine"])) == "mine"


def test_set_overrides_reach_the_component(registry, topics_dir):
    plan = make_plan(
        registry, REPO / "configs" / "dpo.yaml", topics=topics_dir, overrides=["dpo.beta=0.05", "lora.rank=2"]
    )
    assert plan.config["dpo"]["beta"] == 0.05
    assert plan.config["lora"]["rank"] == 2
    assert next(s for s in plan.steps if s.name == "dpo").components[0].instance.beta == 0.05


def test_apply_overrides_parses_yaml_values_and_list_indices():
    data = {"protocol": [{"name": "a"}, {"name": "b"}]}
    out = apply_overrides(data, ["protocol.1.name=c", "lora.target_modules=[q_proj, k_proj]", "seed=3"])
    assert out["protocol"][1]["name"] == "c"
    assert out["lora"]["target_modules"] == ["q_proj", "k_proj"]
    assert out["seed"] == 3
    assert data["protocol"][1]["name"] == "b"  # the input is not modified
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides(data, ["seed"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"dpoo": {"beta": 0.1}}, "unknown key 'dpoo'; did you mean 'dpo'?"),
        ({"dpo": {"betta": 0.1}}, "unknown key 'dpo.betta'; did you mean 'beta'?"),
        ({"lora": {"rnk": 1}}, "unknown key 'lora.rnk'; did you mean 'rank'?"),
        ({"dpo": {"beta": 0}}, "dpo.beta: must be > 0"),
        ({"dpo": {"beta": "high"}}, "dpo.beta: expected a number, got str 'high'"),
        ({"dpo": {"learning_rate": -1}}, "dpo.learning_rate: must be > 0"),
        ({"sft": {"epochs": 0}}, "sft.epochs: must be > 0"),
        ({"lora": {"rank": 0}}, "lora.rank: must be >= 1"),
        ({"lora": {"target_modules": []}}, "lora.target_modules: expected a non-empty list"),
        ({"dpo": {"loss_type": "sigmod"}}, "unknown loss type 'sigmod'; use one of sigmoid"),
        ({"dpo": {"loss_type": ["sigmoid", "sfd"]}}, "dpo.loss_type: unknown loss type 'sfd'"),
        ({"dpo": {"loss_type": []}}, "dpo.loss_type: needs at least one loss type"),
        (
            {"dpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}},
            "dpo.loss_weights: needs one weight per loss type (2), got 1",
        ),
        ({"model": {"dtype": "float8"}}, "model.dtype: 'float8' is not one of"),
        ({"protocol": [{"name": "x", "train": "ppo"}]}, "unknown objective 'ppo'"),
        ({"protocol": [{"evaluate": ["quizz"]}]}, "unknown evaluator 'quizz'; did you mean 'quiz'?"),
        ({"protocol": [{"train": "sft", "evaluate": ["quiz"]}]}, "exactly one of 'train"),
        (
            {
                "protocol": [
                    {"evaluate": ["quiz"]},
                    {"train": "dpo", "gate": {"use": "threshold", "all": ["quiz.acuracy >= 0.7"]}},
                ]
            },
            "metric 'quiz.acuracy' is not recorded by any earlier step; did you mean 'quiz.accuracy'?",
        ),
        (
            {"protocol": [{"train": "dpo", "gate": {"use": "threshold", "all": ["voice.score < 0.75"]}}]},
            "metric 'voice.score' is not recorded by any earlier step",
        ),
        (
            {"protocol": [{"train": "sft", "gate": {"use": "threshold", "all": ["import os"]}}]},
            "cannot read rule 'import os'",
        ),
        (
            {"protocol": [{"evaluate": ["quiz"], "if_ran": "dpo"}]},
            "if_ran: 'dpo' is not an earlier training step",
        ),
        (
            {"protocol": [{"name": "a", "train": "sft"}, {"name": "a", "train": "dpo"}]},
            "step name 'a' is used twice",
        ),
        ({"seed": "abc"}, "seed: expected an integer"),
    ],
)
def test_config_errors_name_the_file_and_key(registry, tmp_path, topics_dir, data, message):
    with pytest.raises(ConfigError) as excinfo:
        plan_from(registry, tmp_path, data, topics=topics_dir)
    assert str(tmp_path / "config.yaml") in str(excinfo.value)
    assert message in str(excinfo.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [("dpo: [unclosed", "not valid YAML"), ("- a\n- b\n", "a config must be a mapping")],
)
def test_unreadable_config(registry, tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        plan_from(registry, tmp_path, text)


def test_missing_config_file(registry, tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        make_plan(registry, tmp_path / "nope.yaml")


def test_topic_lacking_what_a_step_needs(registry, tmp_path):
    write_topic(tmp_path, "bare", quiz=[], voice_pairs=[])
    with pytest.raises(ConfigError, match="quiz: empty, but step 'before' uses 'quiz'"):
        make_plan(registry, None, topics=tmp_path)


def test_relative_topics_path_is_relative_to_the_config_file(registry, tmp_path, topics_dir):
    plan = plan_from(registry, tmp_path, {"topics": "topics"})
    assert [t.name for t in plan.topics] == ["alpha"]


def test_inline_step_params_override_the_section(registry, tmp_path, topics_dir):
    plan = plan_from(
        registry,
        tmp_path,
        {"dpo": {"beta": 0.2}, "protocol": [{"name": "d", "train": {"use": "dpo", "beta": 0.3}}]},
        topics=topics_dir,
    )
    assert plan.steps[0].components[0].instance.beta == 0.3
    assert plan.config["dpo"]["beta"] == 0.2
    assert plan.config["protocol"][0]["train"] == {"use": "dpo", "beta": 0.3}


def test_a_message_never_shows_a_huge_value_whole(registry, tmp_path, topics_dir):
    # Within the alias bound, but a repr of it would be megabytes on one line.
    anchored = "&a [" + ", ".join(["long value"] * 1000) + "]"
    config = f"seed: [{anchored}, " + ", ".join(["*a"] * 900) + "]\n"
    with pytest.raises(ConfigError) as error:
        plan_from(registry, tmp_path, config, topics=topics_dir)
    assert len(str(error.value).replace(str(tmp_path), "")) < 300
    assert "seed: expected an integer, got [['long value', " in str(error.value)


def test_aliases_within_the_bound_are_read_as_yaml_says(registry, tmp_path, topics_dir):
    data = "sft: &opts {learning_rate: 0.001}\nkto: *opts\n"
    plan = plan_from(registry, tmp_path, data, topics=topics_dir)
    assert plan.config["sft"]["learning_rate"] == plan.config["kto"]["learning_rate"] == 0.001


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"weight": float("inf")}, "<test>: probe.weight: must be a finite number (got inf)"),
        ({"weight": "nan"}, "<test>: probe.weight: must be a finite number (got nan)"),  # read from a string
        ({"weights": [1.0, float("nan")]}, "<test>: probe.weights[1]: must be a finite number (got nan)"),
    ],
)
def test_every_float_param_of_a_component_is_finite(params, message):
    from dataclasses import dataclass

    from align.core.params import build_component

    @dataclass
    class Probe:  # a plugin's component: no check of its own
        weight: float = 1.0
        weights: list[float] | None = None

    with pytest.raises(ConfigError) as error:
        build_component(Probe, params, "probe", "<test>")
    assert str(error.value) == message


def test_a_number_written_as_a_string_is_that_number_for_every_key(registry, tmp_path, topics_dir):
    """One rule: `sft.epochs: "3"` was converted and `per_device_train_batch_size: "2"` refused."""
    data = {
        "seed": "7",
        "lora": {"rank": "2", "alpha": "16"},
        "model": {"eval_batch_size": "8"},
        "sft": {"epochs": "3", "learning_rate": "5e-7"},
        "dpo": {"per_device_train_batch_size": "2", "max_steps": " 4 ", "beta": "0.1"},
    }
    config = plan_from(registry, tmp_path, data, topics=topics_dir).config
    assert (config["seed"], config["lora"]["rank"], config["lora"]["alpha"]) == (7, 2, 16.0)
    assert config["model"]["eval_batch_size"] == 8
    assert (config["sft"]["epochs"], config["sft"]["learning_rate"]) == (3.0, 5e-7)
    dpo = config["dpo"]
    assert (dpo["per_device_train_batch_size"], dpo["max_steps"], dpo["beta"]) == (2, 4, 0.1)
    assert all(type(v) is int for v in (config["seed"], dpo["per_device_train_batch_size"], dpo["max_steps"]))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"dpo": {"max_steps": "2.5"}}, "dpo.max_steps: expected an integer, got str '2.5'"),
        ({"dpo": {"max_steps": 10**30}}, "dpo.max_steps: 1e+30 is out of range"),
        ({"dpo": {"max_steps": -(10**30)}}, "dpo.max_steps: -1e+30 is out of range"),
        ({"lora": {"rank": 10**30}}, "lora.rank: must be at most 4096 (got 1e+30)"),
        ({"model": {"eval_batch_size": "abc"}}, "model.eval_batch_size: expected an integer, got 'abc'"),
        ({"model": {"eval_batch_size": 10**30}}, "model.eval_batch_size: must be between 1 and 2147483647"),
    ],
)
def test_integers_are_whole_and_in_range(registry, tmp_path, topics_dir, data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_from(registry, tmp_path, data, topics=topics_dir)
