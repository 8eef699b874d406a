"""The run's base settings (align/core/settings.py): typed, frozen, checked as components are."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from align.core.config import BASE_DEFAULTS, with_defaults
from align.core.settings import LoraSettings, ModelSettings, ReplaySettings, RunSettings, build_settings
from align.errors import ConfigError
from tests.conftest import REPO

#: The defaults as config.py's hand-written dict held them before the settings were dataclasses.
DEFAULTS = {
    "name": None,
    "output": None,
    "seed": 0,
    "topics": None,
    "strict_plugins": False,
    "on_error": "stop",
    "evaluate_timeout": None,
    "recheck": "earlier",
    "report_to": "none",
    "voice_set": "person",
    "threads": "auto",
    "replay": {"content": 1.0, "preference_pairs": 0.0, "schedule": "spaced"},
    "model": {
        "path": "smollm2",
        "dtype": "float32",
        "trust_remote_code": False,
        "eval_batch_size": 16,
        "chat_template": "auto",
        "gradient_checkpointing": False,
        "quantization": "none",
        "device_map": None,
    },
    "lora": {
        "rank": 1,
        "alpha": 1.0,
        "dropout": 0.0,
        "target_modules": ["o_proj", "v_proj", "up_proj", "down_proj"],
    },
}


def test_the_defaults_are_the_configs_in_its_order():
    recorded = RunSettings().as_config()
    assert recorded == DEFAULTS
    assert list(recorded) == list(DEFAULTS)
    assert {key: list(value) for key, value in recorded.items() if isinstance(value, dict)} == {
        key: list(value) for key, value in DEFAULTS.items() if isinstance(value, dict)
    }
    assert list(BASE_DEFAULTS) == [*DEFAULTS, "protocol"]


def test_threads_reads_a_number_written_as_a_string():
    assert build_settings({"threads": "2"}, "t.yaml").threads == 2
    assert build_settings({}, "t.yaml").threads == "auto"


def test_an_empty_config_builds_the_defaults():
    settings = build_settings({}, "t.yaml")
    assert settings == RunSettings()
    assert settings.lora == LoraSettings() and settings.model == ModelSettings()
    assert settings.replay.as_dict() == {"content": 1.0, "preference_pairs": 0.0}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"seed": -1}, "t.yaml: seed: must be between 0 and 4294967295 (got -1)"),
        ({"seed": 1.5}, "t.yaml: seed: expected an integer, got 1.5"),
        ({"threads": 1.5}, "t.yaml: threads: expected auto or a number of threads from 1 to 1024, got 1.5"),
        (
            {"threads": "all"},
            "t.yaml: threads: expected auto or a number of threads from 1 to 1024, got 'all'",
        ),
        ({"on_error": "skipp"}, "t.yaml: on_error: expected one of stop, skip, got 'skipp'"),
        (
            {"recheck": "earlir"},
            "t.yaml: recheck: expected one of earlier, none, got 'earlir'; did you mean 'earlier'?",
        ),
        ({"name": "a/b"}, "t.yaml: name: 'a/b' must be a plain directory name (no '/')"),
        (
            {"evaluate_timeout": 0},
            "t.yaml: evaluate_timeout: must be a number of seconds > 0, or null for none (got 0)",
        ),
        ({"lora": {"rank": 0}}, "t.yaml: lora.rank: must be >= 1 (got 0)"),
        ({"lora": {"rank": "1e30"}}, "t.yaml: lora.rank: must be at most 4096 (got 1e+30)"),
        ({"lora": {"alpha": float("nan")}}, "t.yaml: lora.alpha: must be a finite number (got nan)"),
        ({"lora": {"dropout": 1}}, "t.yaml: lora.dropout: must be in [0, 1) (got 1.0)"),
        (
            {"lora": {"target_modules": []}},
            "t.yaml: lora.target_modules: expected a non-empty list of module names, e.g. [o_proj, v_proj]",
        ),
        (
            {"model": {"dtype": "fp16"}},
            "t.yaml: model.dtype: 'fp16' is not one of float32, bfloat16, float16, auto",
        ),
        (
            {"model": {"quantization": "4bits"}},
            "t.yaml: model.quantization: expected one of none, 4bit, 8bit, got '4bits'; did you mean '4bit'?",
        ),
        (
            {"model": {"gradient_checkpointing": "x"}},
            "t.yaml: model.gradient_checkpointing: expected true or false, got 'x'",
        ),
        (
            {"replay": {"content": 101}},
            "t.yaml: replay.content: must be between 0 (no replay) and 100 earlier items per item of the topic (got 101)",
        ),
        (
            {"lora": {"rnk": 2}},
            "t.yaml: unknown key 'lora.rnk'; did you mean 'rank'? (valid: rank, alpha, dropout, target_modules)",
        ),
    ],
)
def test_a_bad_value_gives_the_catalogued_message(config, message):
    with pytest.raises(ConfigError) as error:
        build_settings(config, "t.yaml")
    assert str(error.value) == message


def test_the_config_checks_a_sections_keys_before_any_value():
    """An unknown key in a section is named before a bad value elsewhere, as before the dataclasses."""
    with pytest.raises(ConfigError, match=r"unknown key 'lora\.rnk'"):
        with_defaults({"seed": -1, "lora": {"rnk": 1}}, [], "t.yaml")


def test_numbers_written_as_strings_are_numbers_in_settings_and_config():
    config, settings = with_defaults(
        {"seed": "3", "lora": {"alpha": "2"}, "replay": {"content": "0.5"}}, [], "t.yaml"
    )
    assert (settings.seed, settings.lora.alpha, settings.replay.content) == (3, 2.0, 0.5)
    assert (config["seed"], config["lora"]["alpha"], config["replay"]["content"]) == (3, 2.0, 0.5)
    assert {key: config[key] for key in DEFAULTS} == settings.as_config()


def test_no_quantization_is_none():
    assert ModelSettings(quantization=None).quantization == "none"
    assert ModelSettings(quantization=False).quantization == "none"


def test_settings_are_frozen():
    settings = RunSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.lora.rank = 2  # type: ignore[misc]
    assert ReplaySettings().as_dict() is not ReplaySettings().as_dict()


def test_the_plan_carries_the_settings_it_records(registry, tmp_path):
    from align.core.plan import resolve_plan
    from tests.conftest import write_topic

    write_topic(tmp_path, "t1")
    plan = resolve_plan({"seed": 7, "lora": {"rank": 2}, "name": "x"}, "t.yaml", registry, topics=tmp_path)
    assert plan.settings.seed == 7 and plan.settings.lora.rank == 2 and plan.settings.name == "x"
    assert plan.settings.topics == plan.config["topics"] == str(tmp_path)
    assert plan.settings.as_config() == {key: plan.config[key] for key in DEFAULTS}


def test_checking_settings_imports_neither_the_model_code_nor_the_distributed_helpers():
    probe = (
        "import json, sys; from align.core.config import with_defaults; with_defaults({}, [], 't'); "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('align.hf', 'align.core.distributed')))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
