"""Generated configs and topics through `align validate`: each ends in success or one line.

A seeded generator writes ~200 config and topic files of the kinds a hostile or a clumsy user
writes: random nesting and types, YAML anchors and aliases, tags, unicode and control characters,
numbers as strings, non-finite and huge numbers, duplicate keys, cut-off files. Every case must end
with exit 0, or with a non-zero exit and one `Error:` line on stderr (warnings before it), never a
traceback, and within a time bound.
"""

from __future__ import annotations

import json
import random
import time

import pytest
import yaml
from click.testing import CliRunner

from align.cli import cli
from align.testing import make_topic

CASES = 200
SEED = 20261202
#: Seconds one case may take (validate loads no model; the slowest are the bounded alias bombs).
TIME_BOUND = 10.0

KNOWN_KEYS = [
    "name", "seed", "topics", "on_error", "recheck", "voice_set", "replay", "model", "lora",
    "protocol", "dpo", "sft", "kto", "quiz", "voice", "style", "threshold", "strict_plugins",
]  # fmt: skip
SECTION_KEYS = {
    "lora": ["rank", "alpha", "dropout", "target_modules"],
    "model": ["path", "dtype", "eval_batch_size", "chat_template", "quantization", "device_map"],
    "dpo": ["beta", "learning_rate", "max_steps", "per_device_train_batch_size", "loss_type", "rejected"],
    "sft": ["epochs", "learning_rate", "cloze", "answers", "per_device_train_batch_size"],
    "replay": ["content", "preference_pairs"],
}
STRINGS = [
    "", " ", "3", "-1", "5e-7", "1e30", ".nan", "nan", "inf", "true", "null", "~", "é", "日本語",
    "\x1b[2J\x1b[H", "a\nb", "\u202eevil", "x" * 500, "../../etc", "CON", "quiz.accuracy >= 0.7",
    "quiz.accuracy >= nan", "dpo", "sft", "before", "{", "[", "!!python/object", "%s%n",
]  # fmt: skip
NUMBERS = [0, 1, -1, 2, 0.5, -0.0, 1e-300, 1e308, 10**30, -(10**30), 2**31, 2**63, float("nan"), float("inf")]


def value(rng: random.Random, depth: int = 0):
    """A random YAML-able value, nested up to a few levels."""
    kind = rng.choice(
        ["num", "num", "str", "str", "bool", "none", "list", "dict"] if depth < 4 else ["num", "str"]
    )
    if kind == "num":
        return rng.choice(NUMBERS)
    if kind == "str":
        return rng.choice(STRINGS)
    if kind == "bool":
        return rng.choice([True, False])
    if kind == "none":
        return None
    if kind == "list":
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {key(rng): value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def key(rng: random.Random):
    return rng.choice([*KNOWN_KEYS, "lroa", "unknown", "é", "\x1b[31mred", "a.b", 1, 2.5, True, None])


def config_data(rng: random.Random) -> dict:
    data = {}
    for _ in range(rng.randint(0, 5)):
        name = rng.choice(KNOWN_KEYS)
        if name in SECTION_KEYS and rng.random() < 0.7:
            data[name] = {rng.choice(SECTION_KEYS[name]): value(rng, 2) for _ in range(rng.randint(1, 3))}
        elif name == "protocol" and rng.random() < 0.7:
            data[name] = [protocol_step(rng) for _ in range(rng.randint(0, 4))]
        else:
            data[name] = value(rng, 1)
    if rng.random() < 0.2:
        data[key(rng)] = value(rng)
    return data


def protocol_step(rng: random.Random):
    step = rng.choice(
        [
            {"name": "before", "evaluate": ["quiz"]},
            {"name": "sft", "train": "sft"},
            {"name": "dpo", "train": rng.choice(["dpo", "dpoo", 3, None])},
            {"name": "after", "evaluate": rng.choice([["quiz", "voice"], "quiz", [], [{"use": "quiz"}]])},
            {"name": "g", "train": "dpo", "gate": {"use": "threshold", "all": [rng.choice(STRINGS)]}},
            {
                "name": "r",
                "evaluate": ["quiz"],
                "rollback": {"step": value(rng, 3), "max_drop": value(rng, 3)},
            },
        ]
    )
    if rng.random() < 0.3:
        step[key(rng)] = value(rng, 3)
    return step


def topic_data(rng: random.Random) -> dict:
    data = make_topic().to_dict()
    data["name"] = rng.choice(["home", "work", "h" * rng.randint(1, 120), "nul", "a.", "\x1b[2J"])
    for _ in range(rng.randint(0, 3)):
        field = rng.choice([*data, "quiz", "quiz", "unknown"])
        action = rng.random()
        if action < 0.3:
            data.pop(field, None)
        elif action < 0.6 and field == "quiz" and isinstance(data.get("quiz"), list) and data["quiz"]:
            item = dict(data["quiz"][0])
            item[rng.choice(["answer", "choices", "question", "extra"])] = value(rng, 2)
            data["quiz"] = [item]
        else:
            data[field] = value(rng, 1)
    return data


def anchored(rng: random.Random) -> str:
    """YAML text with anchors and aliases: shared values, or an exponential 'billion laughs'."""
    if rng.random() < 0.5:
        width, levels = rng.randint(2, 9), rng.randint(2, 9)
        lines = [f"a0: &a0 [{', '.join(['1'] * width)}]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
        return "\n".join(lines).replace(f"a{levels - 1}: &", "seed: &", 1) + "\n"
    return "base: &b {rank: 2, alpha: 4}\nlora: *b\nsft: &s {epochs: 3}\ndpo: {beta: *s}\n"


def text_for(rng: random.Random, data: dict, json_file: bool) -> str:
    if json_file:
        text = json.dumps(data, allow_nan=True, ensure_ascii=rng.random() < 0.5)
    else:
        text = yaml.safe_dump(data, allow_unicode=rng.random() < 0.5, sort_keys=False)
    mutation = rng.random()
    if mutation < 0.08:
        text = text[: rng.randint(0, len(text))]  # cut off
    elif mutation < 0.14:
        depth = rng.choice([50, 101, 5000])
        text = "seed: " + "[" * depth + "]" * depth + "\n" if not json_file else "[" * depth + "]" * depth
    elif mutation < 0.2 and not json_file:
        text = anchored(rng)
    elif mutation < 0.25 and not json_file:
        text = text + text  # every key twice
    elif mutation < 0.3 and not json_file:
        text = rng.choice(
            ["!!python/object/apply:os.system ['true']", "!!binary aGk=", "!!set {a, b}", "2026-12-02"]
        )
        text = f"seed: {text}\n"
    elif mutation < 0.34:
        text = "\ufeff" + text  # a byte-order mark
    elif mutation < 0.38:
        text = text.replace(" ", "\t", 1)
    return text


def cases():
    rng = random.Random(SEED)
    for index in range(CASES):
        json_config = rng.random() < 0.2
        json_topic = rng.random() < 0.2
        config = text_for(rng, config_data(rng) if rng.random() < 0.6 else {}, json_config)
        topic = text_for(rng, topic_data(rng), json_topic) if rng.random() < 0.7 else None
        yield (
            index,
            (config, ".json" if json_config else ".yaml"),
            (topic, ".json" if json_topic else ".yaml"),
        )


def test_generated_configs_and_topics_end_in_success_or_one_line(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    outcomes = {"ok": 0, "error": 0}
    for index, (config, config_suffix), (topic, topic_suffix) in cases():
        case = tmp_path / f"case{index}"
        (case / "topics").mkdir(parents=True)
        config_path = case / f"config{config_suffix}"
        config_path.write_text(config, encoding="utf-8", errors="surrogatepass")
        args = ["validate", str(config_path), "--model", str(tiny_model_dir)]
        if topic is not None:
            (case / "topics" / f"t{topic_suffix}").write_text(topic, encoding="utf-8")
            args += ["--topics", str(case / "topics")]
        started = time.monotonic()
        result = runner.invoke(cli, args)
        seconds = time.monotonic() - started
        where = f"case {index}: {args}\n--- config\n{config[:2000]}\n--- topic\n{(topic or '')[:2000]}"
        assert seconds < TIME_BOUND, f"{where}\ntook {seconds:.1f}s"
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(f"{where}\ntraceback:") from result.exception
        assert "Traceback" not in result.output, where
        if result.exit_code == 0:
            outcomes["ok"] += 1
            continue
        assert result.exit_code in (1, 2), f"{where}\n{result.output}"
        lines = [line for line in result.stderr.splitlines() if not line.startswith("Warning: ")]
        assert len(lines) == 1 and lines[0].startswith("Error: "), f"{where}\n{result.stderr}"
        assert "\x1b" not in result.stderr, where
        outcomes["error"] += 1
    # The generator reaches both ends: some inputs are valid, most are not.
    assert outcomes["ok"] >= 5 and outcomes["error"] >= 100, outcomes


@pytest.mark.parametrize("index", [0])
def test_the_generator_is_seeded(index):
    assert list(cases())[:3] == list(cases())[:3]
