"""Every row of docs/errors.md, run through the real CLI.

Each case builds one bad input in a temporary directory and runs ``align``. The test checks what
the catalogue promises: the exact message (paths shown as ``<tmp>``), the exit code, one line on
stderr without a traceback, and nothing written that a later run could mistake for results.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from align.cli import cli
from align.testing import make_topic

from .conftest import REPO, make_distribution

CATALOGUE = REPO / "docs" / "errors.md"

CASES: dict[str, Callable[[Ctx], list[str]]] = {}


def case(case_id: str) -> Callable:
    def register(build: Callable[[Ctx], list[str]]) -> Callable[[Ctx], list[str]]:
        CASES[case_id] = build
        return build

    return register


class Ctx:
    """A temporary directory with helpers to write configs, topics and models into it."""

    def __init__(self, tmp: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch):
        self.tmp = tmp
        self._model_dir = model_dir
        self.monkeypatch = monkeypatch
        self.out = str(tmp / "out")

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    def config(self, text: str) -> str:
        return str(self.write("config.yaml", text))

    def topic(self, name: str = "alpha", filename: str | None = None, **fields) -> Path:
        data = make_topic().to_dict()
        data.update(name=name, **fields)
        return self.write(f"topics/{filename or name + '.yaml'}", yaml.safe_dump(data))

    def topics(self) -> str:
        """A valid one-topic directory."""
        self.topic()
        return str(self.tmp / "topics")

    def model(self) -> Path:
        """A writable copy of the tiny test model, to damage."""
        target = self.tmp / "model"
        shutil.copytree(self._model_dir, target)
        return target

    def run(self, *args: str) -> list[str]:
        """``align run`` on the tiny model (unless ``--model`` is given) into ``<tmp>/out``."""
        args = list(args)
        if "--model" not in args:
            args += ["--model", str(self.model())]
        if "--topics" not in args:
            args += ["--topics", self.topics()]
        return ["run", self.config(""), *args, "--output", self.out]


# -- config files -------------------------------------------------------------------------------
@case("config-not-found")
def _(c):
    return ["validate", str(c.tmp / "nope.yaml")]


@case("config-is-a-directory")
def _(c):
    return ["validate", str(c.tmp)]


@case("config-not-yaml")
def _(c):
    return ["validate", c.config("lora:\n  rank: [1\n")]


@case("config-not-a-mapping")
def _(c):
    return ["validate", c.config("- dpo\n- sft\n")]


@case("config-python-tag")
def _(c):
    return ["validate", c.config("name: !!python/object/apply:os.system ['echo hi']\n")]


@case("config-binary")
def _(c):
    return ["validate", str(c.write("config.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"))]


@case("config-not-utf8")
def _(c):
    return ["validate", str(c.write("config.yaml", "name: café\n".encode("latin-1")))]


@case("config-key-twice")
def _(c):
    return [
        "validate",
        c.config("dpo:\n  beta: 0.3\nseed: 1\ndpo:\n  max_steps: 4\n"),
        "--topics",
        c.topics(),
    ]


BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}' if prev else '1'] * 9)}]\n"
    for prev, name in zip(["", *"abcdefgh"], "abcdefghi")
)  # 378 bytes that expand to 9**9 values ("billion laughs")


@case("config-alias-bomb")
def _(c):
    return ["validate", c.config(BOMB.replace("i: &i", "seed: &i")), "--topics", c.topics()]


@case("config-nested-too-deep")
def _(c):
    return ["validate", c.config("seed: " + "[" * 100_000 + "]" * 100_000 + "\n"), "--topics", c.topics()]


@case("set-nested-too-deep")
def _(c):
    return ["validate", c.config(""), "--set", "seed=" + "[" * 5000 + "]" * 5000, "--topics", c.topics()]


@case("config-unknown-key")
def _(c):
    return ["validate", c.config("lroa: {rank: 1}\n"), "--topics", c.topics()]


@case("config-key-control-characters")
def _(c):
    return ["validate", c.config('"lo\\e[2Jra": {rank: 1}\n'), "--topics", c.topics()]


@case("config-unknown-section-key")
def _(c):
    return ["validate", c.config("lora: {rnak: 2}\n"), "--topics", c.topics()]


@case("config-unknown-param")
def _(c):
    return ["validate", c.config("dpo: {betta: 0.1}\n"), "--topics", c.topics()]


@case("config-wrong-type")
def _(c):
    return ["validate", c.config("seed: abc\n"), "--topics", c.topics()]


@case("config-evaluate-timeout-not-positive")
def _(c):
    return ["validate", c.config("evaluate_timeout: 0\n"), "--topics", c.topics()]


@case("config-section-not-a-mapping")
def _(c):
    return ["validate", c.config("lora: [1]\n"), "--topics", c.topics()]


@case("config-bool-expected")
def _(c):
    return ["validate", c.config("model: {trust_remote_code: maybe}\n"), "--topics", c.topics()]


@case("beta-not-positive")
def _(c):
    return ["validate", c.config("dpo: {beta: 0}\n"), "--topics", c.topics()]


@case("rank-zero")
def _(c):
    return ["validate", c.config("lora: {rank: 0}\n"), "--topics", c.topics()]


@case("learning-rate-negative")
def _(c):
    return ["validate", c.config("sft: {learning_rate: -1e-4}\n"), "--topics", c.topics()]


@case("epochs-zero")
def _(c):
    return ["validate", c.config("sft: {epochs: 0}\n"), "--topics", c.topics()]


@case("dropout-out-of-range")
def _(c):
    return ["validate", c.config("lora: {dropout: 1.5}\n"), "--topics", c.topics()]


@case("seed-not-finite")
def _(c):
    return ["validate", c.config(""), "--set", "seed=.nan", "--topics", c.topics()]


@case("seed-out-of-range")
def _(c):
    return ["validate", c.config("seed: -1\n"), "--topics", c.topics()]


@case("seed-too-large")
def _(c):
    return ["validate", c.config("seed: 1e30\n"), "--topics", c.topics()]


@case("rank-infinite")
def _(c):
    return ["validate", c.config(""), "--set", "lora.rank=.inf", "--topics", c.topics()]


@case("alpha-not-finite")
def _(c):
    return ["validate", c.config("lora:\n  alpha: .nan\n"), "--topics", c.topics()]


@case("beta-infinite")
def _(c):
    return ["validate", c.config("dpo:\n  beta: .inf\n"), "--topics", c.topics()]


@case("learning-rate-infinite")
def _(c):
    return ["validate", c.config("sft:\n  learning_rate: .inf\n"), "--topics", c.topics()]


@case("rank-too-large")
def _(c):
    return ["validate", c.config("lora: {rank: 1e30}\n"), "--topics", c.topics()]


@case("integer-param-too-large")
def _(c):
    return ["validate", c.config("dpo: {max_steps: 1e30}\n"), "--topics", c.topics()]


@case("integer-param-not-a-number")
def _(c):
    return ["validate", c.config("dpo: {per_device_train_batch_size: two}\n"), "--topics", c.topics()]


@case("dtype-unknown")
def _(c):
    return ["validate", c.config("model: {dtype: float8}\n"), "--topics", c.topics()]


@case("on-error-unknown")
def _(c):
    return ["validate", c.config("on_error: ignore\n"), "--topics", c.topics()]


@case("replay-out-of-range")
def _(c):
    return ["validate", c.config("replay:\n  content: -0.5\n"), "--topics", c.topics()]


@case("replay-unknown-key")
def _(c):
    return ["validate", c.config("replay:\n  contents: 1\n"), "--topics", c.topics()]


@case("threads-invalid")
def _(c):
    return ["validate", c.config("threads: 0\n"), "--topics", c.topics()]


@case("replay-schedule-unknown")
def _(c):
    return ["validate", c.config("replay:\n  schedule: spacd\n"), "--topics", c.topics()]


@case("voice-set-unknown")
def _(c):
    return ["validate", c.config("voice_set: persons\n"), "--topics", c.topics()]


@case("dpo-rejected-unknown")
def _(c):
    return ["validate", c.config("dpo:\n  rejected: model\n"), "--topics", c.topics()]


@case("dpo-epochs-not-positive")
def _(c):
    return ["validate", c.config("dpo:\n  epochs: 0\n"), "--topics", c.topics()]


@case("sft-answers-unknown")
def _(c):
    return ["validate", c.config("sft:\n  answers: all\n"), "--topics", c.topics()]


@case("recheck-unknown")
def _(c):
    return ["validate", c.config("recheck: earler\n"), "--topics", c.topics()]


@case("chat-template-unknown")
def _(c):
    return ["validate", c.config("model: {chat_template: sometimes}\n"), "--topics", c.topics()]


@case("set-without-value")
def _(c):
    return ["validate", c.config(""), "--set", "dpo.beta", "--topics", c.topics()]


@case("set-index-out-of-range")
def _(c):
    return ["validate", c.config(""), "--set", "protocol.9.name=x", "--topics", c.topics()]


@case("set-step-unknown")
def _(c):
    override = "protocol.after_dop.rollback.max_drop.quiz.accuracy=0.2"
    return ["validate", c.config(""), "--set", override, "--topics", c.topics()]


# -- the protocol -------------------------------------------------------------------------------
@case("objective-unknown")
def _(c):
    return ["validate", c.config("protocol:\n  - {train: dpoo}\n"), "--topics", c.topics()]


@case("evaluator-unknown")
def _(c):
    return ["validate", c.config("protocol:\n  - {evaluate: [quizz]}\n"), "--topics", c.topics()]


@case("gate-unknown")
def _(c):
    config = "protocol:\n  - {evaluate: [quiz]}\n  - {train: dpo, gate: {use: treshold, all: ['quiz.accuracy >= 0.7']}}\n"
    return ["validate", c.config(config), "--topics", c.topics()]


@case("gate-metric-not-recorded")
def _(c):
    config = "protocol:\n  - {evaluate: [quiz]}\n  - {train: dpo, gate: {use: threshold, all: ['quiz.acuracy >= 0.7']}}\n"
    return ["validate", c.config(config), "--topics", c.topics()]


@case("gate-rule-unparseable")
def _(c):
    config = "protocol:\n  - {evaluate: [quiz]}\n  - {train: dpo, gate: {use: threshold, all: ['quiz.accuracy => 0.7']}}\n"
    return ["validate", c.config(config), "--topics", c.topics()]


@case("step-train-and-evaluate")
def _(c):
    return ["validate", c.config("protocol:\n  - {train: sft, evaluate: [quiz]}\n"), "--topics", c.topics()]


@case("step-name-twice")
def _(c):
    config = "protocol:\n  - {name: check, evaluate: [quiz]}\n  - {name: check, evaluate: [voice]}\n"
    return ["validate", c.config(config), "--topics", c.topics()]


@case("if-ran-unknown-step")
def _(c):
    config = "protocol:\n  - {train: sft}\n  - {evaluate: [quiz], if_ran: dpo}\n"
    return ["validate", c.config(config), "--topics", c.topics()]


# -- topics -------------------------------------------------------------------------------------
@case("topics-not-found")
def _(c):
    return ["validate", "--topics", str(c.tmp / "no-topics")]


@case("topics-empty-directory")
def _(c):
    (c.tmp / "topics").mkdir()
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("topic-not-yaml")
def _(c):
    c.write("topics/alpha.yaml", "name: alpha\ncontent: [unclosed\n")
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("topic-not-json")
def _(c):
    c.write("topics/alpha.json", '{"name": "alpha",}')
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("topic-key-twice-json")
def _(c):
    quiz = '[{"question": "Donkey?", "choices": ["Tallow", "Brine"], "answer": 1}]'
    c.write(
        "topics/alpha.json",
        f'{{"name": "alpha",\n "quiz": {quiz},\n "content": ["Ilse keeps a donkey."],\n "quiz": []}}',
    )
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("topic-nested-too-deep")
def _(c):
    c.write("topics/alpha.json", '{"name": "alpha", "content": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("topic-binary")
def _(c):
    c.write("topics/alpha.yaml", b"PK\x03\x04\x14\x00\x00\x00\x08\x00")
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("topic-not-utf8")
def _(c):
    c.write("topics/alpha.yaml", "name: alpha\ncontent: [Ilse's café]\n".encode("latin-1"))
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("topic-huge")
def _(c):
    path = c.topic()
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(("# padding\n" * 1024) * 1700)  # 17 MiB of comments
    return ["validate", "--topics", str(path)]


@case("topic-link-to-a-system-file")
def _(c):
    (c.tmp / "topics").mkdir()
    (c.tmp / "topics" / "alpha.yaml").symlink_to("/etc/passwd")
    return ["validate", c.config(""), "--topics", str(c.tmp / "topics")]


@case("topic-not-a-regular-file")
def _(c):
    return ["validate", c.config(""), "--topics", "/dev/zero"]


@case("topic-missing-name")
def _(c):
    c.write("topics/alpha.yaml", "content: [Ilse keeps a donkey.]\n")
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("topic-empty-content")
def _(c):
    c.topic(content=[])
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("topic-unknown-key")
def _(c):
    c.write("topics/alpha.yaml", "name: alpha\ncontnet: [Ilse keeps a donkey.]\n")
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("quiz-answer-out-of-range")
def _(c):
    c.topic(quiz=[{"question": "Donkey?", "choices": ["Tallow", "Brine"], "answer": 2}])
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("quiz-answer-not-a-choice")
def _(c):
    c.topic(quiz=[{"question": "Donkey?", "choices": ["Tallow", "Brine"], "answer": "Talow"}])
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("quiz-answer-not-an-index")
def _(c):
    c.topic(quiz=[{"question": "Donkey?", "choices": ["Tallow", "Brine"], "answer": [0]}])
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("quiz-one-choice")
def _(c):
    c.topic(quiz=[{"question": "Donkey?", "choices": ["Tallow"], "answer": 0}])
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("quiz-choices-not-distinct")
def _(c):
    c.topic(quiz=[{"question": "Donkey?", "choices": ["Tallow", "Brine", "Brine"], "answer": 1}])
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("pair-missing-field")
def _(c):
    c.topic(preference_pairs=[{"prompt": "Hello?", "rejected": "Hello."}])
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("topic-lacks-what-a-step-needs")
def _(c):
    c.topic(preference_pairs=[])
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("topic-names-duplicate")
def _(c):
    c.topic("home", filename="a.yaml")
    c.topic("home", filename="b.yaml")
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("topic-names-differ-only-in-case")
def _(c):
    c.topic("home", filename="a.yaml")
    c.topic("Home", filename="b.yaml")
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("topic-name-escapes-run-directory")
def _(c):
    c.topic("../../etc", filename="escape.yaml")
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("topic-name-windows-device")
def _(c):
    c.topic(name="nul", filename="alpha.yaml")
    return ["validate", c.config(""), "--topics", str(c.tmp / "topics")]


@case("topic-name-trailing-dot")
def _(c):
    c.topic(name="home.", filename="alpha.yaml")
    return ["validate", c.config(""), "--topics", str(c.tmp / "topics")]


@case("topic-name-too-long")
def _(c):
    c.topic(name="a" * 300, filename="alpha.yaml")
    return ["validate", c.config(""), "--topics", str(c.tmp / "topics")]


@case("topic-name-trailing-newline")
def _(c):
    c.topic("first")
    c.topic("first\n", filename="second.yaml")  # beside 'first', it ran as a second topic
    return ["validate", "--topics", str(c.tmp / "topics")]


# -- data files a topic names ------------------------------------------------------------------
def _jsonl(rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@case("data-file-not-found")
def _(c):
    c.topic(preference_pairs="pairs.jsonl")
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("data-file-no-reader")
def _(c):
    c.write("topics/pairs.xlsx", b"PK\x03\x04")
    c.topic(preference_pairs="pairs.xlsx")
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("data-file-parquet-unreadable")
def _(c):
    c.write("topics/quiz.parquet", b"not a parquet file")
    c.topic(quiz="quiz.parquet")
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("data-file-empty")
def _(c):
    c.write("topics/pairs.jsonl", "")
    c.topic(preference_pairs="pairs.jsonl")
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("data-file-column-missing")
def _(c):
    c.write("topics/pairs.jsonl", _jsonl([{"prompt": "Where?", "answer": "Wrackhouse.", "score_chosen": 9}]))
    c.topic(preference_pairs="pairs.jsonl")
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("data-file-answer-not-a-string")
def _(c):
    good = {"prompt": "Where?", "chosen": "Wrackhouse.", "rejected": "A house."}
    c.write("topics/pairs.jsonl", _jsonl([good, {"prompt": "How old?", "chosen": 81}]))
    c.topic(preference_pairs="pairs.jsonl")
    return ["validate", "--topics", str(c.tmp / "topics")]


@case("topics-is-a-data-file")
def _(c):
    path = c.write(
        "pairs.jsonl", _jsonl([{"prompt": "Where?", "chosen": "Wrackhouse.", "rejected": "A house."}])
    )
    return ["validate", "--topics", str(path)]


@case("topics-is-a-saved-dataset")
def _(c):
    c.write("pairs/dataset_info.json", '{"citation": ""}')
    c.write("pairs/state.json", '{"_data_files": []}')
    return ["validate", "--topics", str(c.tmp / "pairs")]


# -- align topics draft ------------------------------------------------------------------------
@case("draft-output-not-empty")
def _(c):
    notes = c.write("notes.md", "Ilse was born in 1931 in Brackenford.\n")
    c.write("topics/home.yaml", "name: home\n")
    return ["topics", "draft", str(notes), "--output", str(c.tmp / "topics")]


@case("draft-notes-not-found")
def _(c):
    return ["topics", "draft", str(c.tmp / "notes.md"), "--output", str(c.tmp / "topics")]


@case("draft-format-unknown")
def _(c):
    notes = c.write("notes.pdf", b"%PDF-1.4\n")
    return ["topics", "draft", str(notes), "--output", str(c.tmp / "topics")]


@case("draft-nothing-to-draft")
def _(c):
    notes = c.write("notes.md", "# Home\n\n## Later\n")
    return ["topics", "draft", str(notes), "--output", str(c.tmp / "topics")]


# -- the model ----------------------------------------------------------------------------------
@case("model-not-found")
def _(c):
    return c.run("--model", str(c.tmp / "no-model"))


@case("model-is-a-file")
def _(c):
    return c.run("--model", str(c.write("model.bin", b"weights")))


@case("model-empty")
def _(c):
    return c.run("--model", "")


@case("model-gguf-not-gguf")
def _(c):
    return c.run("--model", str(c.write("model.gguf", b"<html>Not found</html>")))


@case("model-gguf-unreadable")
def _(c):
    from align.testing import save_tiny_gguf

    c.monkeypatch.setenv("ALIGN_CACHE", str(c.tmp / "cache"))
    (c.tmp / "cache").mkdir()
    gguf = save_tiny_gguf(c.tmp / "model.gguf")
    gguf.write_bytes(gguf.read_bytes()[:2000])  # cut short
    return c.run("--model", str(gguf))


@case("validate-model-not-found")
def _(c):
    return ["validate", c.config(""), "--topics", c.topics(), "--model", str(c.tmp / "no-model")]


@case("model-not-a-model-directory")
def _(c):
    (c.tmp / "empty-model").mkdir()
    return c.run("--model", str(c.tmp / "empty-model"))


@case("model-pickle-weights-only")
def _(c):
    model = c.model()
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    return c.run("--model", str(model))


@case("model-no-weights")
def _(c):
    model = c.model()
    (model / "model.safetensors").unlink()
    return c.run("--model", str(model))


@case("model-no-tokenizer")
def _(c):
    model = c.model()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model / name).unlink()
    return c.run("--model", str(model))


@case("model-weights-damaged")
def _(c):
    model = c.model()
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return c.run("--model", str(model))


@case("model-config-damaged")
def _(c):
    model = c.model()
    (model / "config.json").write_text("{not json")
    return c.run("--model", str(model))


@case("chat-template-required-but-missing")
def _(c):
    model = c.model()
    (model / "chat_template.jinja").unlink()
    return c.run("--model", str(model), "--set", "model.chat_template=true")


@case("lora-target-module-missing")
def _(c):
    return c.run("--set", "lora.target_modules=[o_proj,c_attn]")


# -- model options for large models (what a CPU machine can check) -------------------------------
def no_gpu(c):
    c.monkeypatch.setattr("torch.cuda.is_available", lambda: False)


@case("gradient-checkpointing-not-bool")
def _(c):
    return ["validate", c.config("model: {gradient_checkpointing: sometimes}\n"), "--topics", c.topics()]


@case("quantization-unknown")
def _(c):
    return ["validate", c.config("model: {quantization: 4bits}\n"), "--topics", c.topics()]


@case("quantization-without-bitsandbytes")
def _(c):
    c.monkeypatch.setattr("align.core.config.bitsandbytes_available", lambda: False)
    return ["validate", c.config("model: {quantization: 4bit}\n"), "--topics", c.topics()]


@case("quantization-without-gpu")
def _(c):
    c.monkeypatch.setattr("align.core.config.bitsandbytes_available", lambda: True)
    no_gpu(c)
    return c.run("--set", "model.quantization=8bit")


@case("float16-without-gpu")
def _(c):
    no_gpu(c)
    return c.run("--set", "model.dtype=float16")


@case("bfloat16-on-a-gpu-without-it")
def _(c):
    c.monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    c.monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda *a, **k: False)
    c.monkeypatch.setattr("torch.cuda.get_device_name", lambda *a, **k: "Tesla V100-SXM2-16GB")
    return c.run("--set", "model.dtype=bfloat16")


@case("device-map-not-a-mapping")
def _(c):
    return ["validate", c.config("model: {device_map: [0, 1]}\n"), "--topics", c.topics()]


@case("device-map-with-several-processes")
def _(c):
    c.monkeypatch.setenv("WORLD_SIZE", "2")
    c.monkeypatch.setenv("RANK", "0")
    return ["validate", c.config("model: {device_map: auto}\n"), "--topics", c.topics()]


@case("launched-with-fsdp1")
def _(c):
    c.monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    return c.run()


@case("fsdp-on-one-process")
def _(c):
    c.monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    c.monkeypatch.setenv("FSDP_VERSION", "2")
    return c.run()


@case("quantization-with-fsdp")
def _(c):
    c.monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    c.monkeypatch.setenv("FSDP_VERSION", "2")
    return ["validate", c.config("model: {quantization: 4bit}\n"), "--topics", c.topics()]


@case("launched-with-zero3")
def _(c):
    c.monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    c.monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    return c.run()


@case("launched-with-zero3-config-file")
def _(c):
    ds_config = c.tmp / "ds_config.json"
    ds_config.write_text('{"zero_optimization": {"stage": 3}}')
    c.monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    c.monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_config))
    return c.run()


@case("num-processes-without-launcher")
def _(c):
    return c.run("--num-processes", "2")


@case("accelerate-config-without-launcher")
def _(c):
    return c.run("--accelerate-config", c.config(""))


# -- the run directory --------------------------------------------------------------------------
@case("output-not-empty")
def _(c):
    c.write("out/summary.json", "{}")
    return c.run()


@case("output-is-a-file")
def _(c):
    c.write("out", "not a directory")
    return c.run()


@case("output-not-writable")
def _(c):
    parent = c.tmp / "readonly"
    parent.mkdir()
    parent.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere: make the check see what a user would
        access = os.access
        c.monkeypatch.setattr(
            os, "access", lambda path, mode, **kw: path != parent and access(path, mode, **kw)
        )
    c.out = str(parent / "out")
    return c.run()


@case("disk-full-at-start")
def _(c):
    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    c.monkeypatch.setattr("align.core.rundir.atomic_write_text", full)
    return c.run()


@case("output-inside-a-file")
def _(c):
    c.write("afile", "not a directory")
    c.out = str(c.tmp / "afile" / "sub")
    return c.run()


@case("output-dangling-link")
def _(c):
    (c.tmp / "out").symlink_to(c.tmp / "gone")
    return c.run()


@case("resume-not-a-run")
def _(c):
    (c.tmp / "somewhere").mkdir()
    return ["run", "--resume", str(c.tmp / "somewhere")]


@case("resume-with-other-input")
def _(c):
    (c.tmp / "somewhere").mkdir()
    return ["run", "--resume", str(c.tmp / "somewhere"), "--set", "dpo.beta=0.2"]


@case("run-directory-in-use")
def _(c):
    run = c.tmp / "busy"
    config = {"model": {"path": str(c.model())}, "output": str(run)}
    c.write("busy/config.yaml", yaml.safe_dump(config))
    c.write("busy/topics.json", json.dumps([make_topic(name="alpha").to_dict()]))
    c.write("busy/metrics.jsonl", "")
    # Another align run: holds the lock (until the test ends), its pid inside.
    c.holder = open(run / ".lock", "a+")  # noqa: SIM115
    fcntl.flock(c.holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    c.holder.write("4242")
    c.holder.flush()
    return ["run", "--resume", str(run)]


@case("resume-link-out-of-run")
def _(c):
    run = c.tmp / "run"
    config = {"model": {"path": str(c.model())}, "output": str(run)}
    c.write("run/config.yaml", yaml.safe_dump(config))
    c.write("run/topics.json", json.dumps([make_topic(name="alpha").to_dict()]))
    c.write("run/metrics.jsonl", "")
    c.write("elsewhere/alpha/adapter_model.safetensors", b"another directory's files")
    (run / "adapters").symlink_to(c.tmp / "elsewhere")
    return ["run", "--resume", str(run)]


@case("resume-lora-rank-changed")
def _(c):
    from align.core.config import DEFAULT_PROTOCOL, DEFAULT_TARGET_MODULES

    run = c.tmp / "run"
    model = str(c.model())
    config = {"model": {"path": model}, "lora": {"rank": 2}, "output": str(run)}
    c.write("run/config.yaml", yaml.safe_dump(config))  # edited from rank 1 after the run stopped
    c.write("run/topics.json", json.dumps([make_topic(name="alpha").to_dict()]))
    c.write("run/metrics.jsonl", "")
    settings = {
        "model.path": model,
        "model.quantization": "none",
        "lora.rank": 1,
        "lora.alpha": 1.0,
        "lora.dropout": 0.0,
        "lora.target_modules": DEFAULT_TARGET_MODULES,
        "protocol": [step["name"] for step in DEFAULT_PROTOCOL],
    }
    state = {"format": 1, "sequence": 3, "status": "failed", "settings": settings}
    state.update(adapter="adapter-000003.safetensors", snapshots={})
    c.write("run/checkpoint/state.json", json.dumps(state))
    return ["run", "--resume", str(run)]


@case("resume-adapter-not-finite")
def _(c):
    import torch
    from safetensors.torch import save_file

    run = c.tmp / "run"
    c.write("run/config.yaml", yaml.safe_dump({"model": {"path": str(c.model())}, "output": str(run)}))
    c.write("run/topics.json", json.dumps([make_topic(name="alpha").to_dict()]))
    c.write("run/metrics.jsonl", "")
    state = {"format": 1, "sequence": 1, "status": "failed", "metrics_offset": 0}
    state.update(adapter="adapter-000001.safetensors", snapshots={})
    c.write("run/checkpoint/state.json", json.dumps(state))
    name = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.default.weight"
    save_file({name: torch.full((1, 32), float("nan"))}, str(run / "checkpoint" / state["adapter"]))
    return ["run", "--resume", str(run)]


@case("resume-state-names-a-file-outside")
def _(c):
    run = c.tmp / "run"
    c.write("run/config.yaml", yaml.safe_dump({"model": {"path": str(c.model())}, "output": str(run)}))
    c.write("run/topics.json", json.dumps([make_topic(name="alpha").to_dict()]))
    c.write("run/metrics.jsonl", "")
    state = {"format": 1, "sequence": 1, "status": "failed", "metrics_offset": 0}
    state.update(adapter="../../../../etc/passwd", snapshots={})
    c.write("run/checkpoint/state.json", json.dumps(state))
    return ["run", "--resume", str(run)]


def stopped_run(c, metrics: str) -> Path:
    """A run stopped after two events, its checkpoint accounting for them; ``metrics`` is what
    ``metrics.jsonl`` holds now."""
    import hashlib

    run = c.tmp / "run"
    c.write("run/config.yaml", yaml.safe_dump({"model": {"path": str(c.model())}, "output": str(run)}))
    c.write("run/topics.json", json.dumps([make_topic(name="alpha").to_dict()]))
    c.write("run/metrics.jsonl", metrics)
    state = {"format": 1, "sequence": 1, "status": "failed", "metrics_offset": len(EVENTS)}
    state.update(metrics_sha256=hashlib.sha256(EVENTS.encode()).hexdigest())
    state.update(adapter="adapter-000001.safetensors", snapshots={})
    c.write("run/checkpoint/state.json", json.dumps(state))
    return run


EVENTS = 2 * '{"topic": "alpha", "step": "before", "kind": "eval", "metrics": {"quiz.accuracy": 0.5}}\n'


@case("resume-metrics-emptied")
def _(c):
    return ["run", "--resume", str(stopped_run(c, ""))]


@case("resume-metrics-line-inserted")
def _(c):
    return ["run", "--resume", str(stopped_run(c, '{"kind": "note"}\n' + EVENTS))]


@case("resume-lock-is-a-directory")
def _(c):
    run = stopped_run(c, EVENTS)
    (run / ".lock").mkdir()
    return ["run", "--resume", str(run)]


@case("resume-state-without-status")
def _(c):
    run = stopped_run(c, EVENTS)
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    del state["status"]
    c.write("run/checkpoint/state.json", json.dumps(state))
    return ["run", "--resume", str(run)]


@case("resume-topics-json-null")
def _(c):
    run = stopped_run(c, EVENTS)
    c.write("run/topics.json", "null")
    return ["run", "--resume", str(run)]


@case("resume-checkpoint-adapter-missing")
def _(c):
    return ["run", "--resume", str(stopped_run(c, EVENTS))]  # state.json names an adapter not there


@case("resume-checkpoint-adapter-truncated")
def _(c):
    import torch
    from safetensors.torch import save_file

    run = stopped_run(c, EVENTS)
    adapter = run / "checkpoint" / "adapter-000001.safetensors"
    name = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.default.weight"
    save_file({name: torch.zeros(1, 32)}, str(adapter))
    adapter.write_bytes(adapter.read_bytes()[:100])  # a copy cut short
    return ["run", "--resume", str(run)]


# -- reading a run: compare, report, merge --------------------------------------------------------
def summary_run(c, name: str, **entry) -> str:
    """A run directory holding a summary.json of one topic, ``entry`` merged into that topic's."""
    topic = {"topic": "alpha", "adapter": None, "steps": [{"step": "before", "kind": "eval"}]}
    topic["steps"][0].update(status="ran", metrics={"quiz.accuracy": 0.5})
    topic.update(entry)
    summary = {"status": "completed", "steps": ["before"], "topics": [topic]}
    c.write(f"{name}/summary.json", json.dumps(summary))
    return str(c.tmp / name)


@case("summary-topic-missing")
def _(c):
    damaged = summary_run(c, "b")
    summary = json.loads(Path(damaged, "summary.json").read_text())
    del summary["topics"][0]["topic"]
    c.write("b/summary.json", json.dumps(summary))
    return ["compare", summary_run(c, "a"), damaged]


@case("summary-metric-not-a-number")
def _(c):
    steps = [{"step": "before", "kind": "eval", "status": "ran", "metrics": {"quiz.accuracy": "high"}}]
    return ["report", summary_run(c, "run", steps=steps), "--no-samples"]


@case("summary-adapter-outside-run")
def _(c):
    c.write("elsewhere/adapter_config.json", "{}")
    return ["report", summary_run(c, "run", adapter="../elsewhere")]


def questions_run(c, quiz: bool, adapter: str | None = None) -> str:
    topic = make_topic(name="alpha") if quiz else make_topic(name="alpha", quiz=[])
    c.write("run/topics.json", json.dumps([topic.to_dict()]))
    return summary_run(c, "run", adapter=adapter)


@case("questions-no-quiz")
def _(c):
    return ["questions", questions_run(c, quiz=False)]


@case("questions-no-adapters")
def _(c):
    return ["questions", questions_run(c, quiz=True)]


@case("questions-quiz-from-a-plugin")
def _(c):
    import importlib

    site = c.tmp.parent / "site"  # outside the case's directory, whose files are compared
    site.mkdir()
    source = """
        from align import hookimpl

        class Quiz:
            metrics = ("accuracy",)

            def evaluate(self, model, topic):
                return {"accuracy": 1.0}

        @hookimpl
        def register_evaluators(register):
            register("quiz", Quiz)
        """
    make_distribution(site, "align_own_quiz", source)
    c.monkeypatch.syspath_prepend(str(site))
    c.monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "align_own_quiz")
    importlib.invalidate_caches()
    c.write("run/adapters/alpha/adapter_config.json", "{}")
    return ["questions", questions_run(c, quiz=True, adapter="adapters/alpha")]


def run_with_adapter(c) -> str:
    c.write("run/config.yaml", yaml.safe_dump({"model": {"path": str(c.model())}}))
    c.write("run/adapters/alpha/adapter_config.json", "{}")
    return str(c.tmp / "run")


@case("sample-repetition-penalty-not-positive")
def _(c):
    return [
        "sample",
        "--adapter",
        run_with_adapter(c) + "/adapters/alpha",
        "Hi?",
        "--repetition-penalty",
        "0",
    ]


@case("run-config-not-a-mapping")
def _(c):
    adapter = run_with_adapter(c) + "/adapters/alpha"
    c.write("run/config.yaml", "not the run's\n")  # overwritten: the default model stood in for the run's
    return ["eval", "--adapter", adapter, "--topics", c.topics()]


@case("adapter-weights-damaged")
def _(c):
    from align.hf.loading import attach_adapter, load_model

    model, _ = load_model(str(c._model_dir))
    adapter = c.tmp / "run" / "adapters" / "alpha"
    attach_adapter(model, rank=1, alpha=1.0, dropout=0.0, target_modules=["o_proj"]).save_pretrained(adapter)
    c.write("run/config.yaml", yaml.safe_dump({"model": {"path": str(c.model())}}))
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return ["eval", "--adapter", str(adapter), "--topics", c.topics(), "--evaluators", "quiz"]


@case("merge-output-link-to-a-directory")
def _(c):
    (c.tmp / "merged").mkdir()
    (c.tmp / "link").symlink_to(c.tmp / "merged")
    return ["merge", run_with_adapter(c), "--output", str(c.tmp / "link")]


@case("merge-output-dangling-link")
def _(c):
    (c.tmp / "link").symlink_to(c.tmp / "gone")
    return ["merge", run_with_adapter(c), "--output", str(c.tmp / "link")]


# -- chat, export and report_to --------------------------------------------------------------------
@case("chat-adapter-not-found")
def _(c):
    return ["chat", "--adapter", str(c.tmp / "nope")]


@case("chat-no-chat-template")
def _(c):
    from align.hf.loading import attach_adapter
    from align.testing import tiny_causal_lm

    model, _ = tiny_causal_lm()
    attach_adapter(model, rank=1, alpha=1.0, dropout=0.0, target_modules=["v_proj"]).save_pretrained(
        c.tmp / "run" / "adapters" / "alpha"
    )
    c.write("run/config.yaml", yaml.safe_dump({"model": {"path": str(c.model()), "chat_template": False}}))
    return ["chat", "--adapter", str(c.tmp / "run")]


@case("export-not-a-run")
def _(c):
    (c.tmp / "notes").mkdir()
    return ["export", str(c.tmp / "notes"), "--output", str(c.tmp / "x")]


@case("export-output-not-empty")
def _(c):
    c.write("taken/keep.txt", "mine")
    return ["export", run_with_adapter(c), "--output", str(c.tmp / "taken")]


@case("export-unknown-format")
def _(c):
    return ["export", run_with_adapter(c), "--output", str(c.tmp / "x"), "--format", "ggml"]


@case("export-unknown-quantization")
def _(c):
    return ["export", run_with_adapter(c), "--output", str(c.tmp / "x"), "--quantize", "q4_k_m"]


@case("export-adapter-of-another-model")
def _(c):
    from align.hf.loading import attach_adapter
    from align.testing import tiny_causal_lm

    model, _ = tiny_causal_lm(hidden_size=16)  # the run's model is the tiny model of width 32
    attach_adapter(model, rank=1, alpha=1.0, dropout=0.0, target_modules=["v_proj"]).save_pretrained(
        c.tmp / "run" / "adapters" / "alpha"
    )
    c.write("run/config.yaml", yaml.safe_dump({"model": {"path": str(c.model())}}))
    return ["export", str(c.tmp / "run"), "--output", str(c.tmp / "x")]


@case("report-to-not-installed")
def _(c):
    import importlib.util

    find_spec = importlib.util.find_spec
    c.monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a)
    )
    return ["validate", c.config("report_to: [tensorboard, wandb]\n"), "--topics", c.topics()]


@case("report-to-unknown")
def _(c):
    return ["validate", c.config("report_to: [tensorbord]\n"), "--topics", c.topics()]


@case("new-plugin-builtin-name")
def _(c):
    return ["new-plugin", "quiz", "--dir", str(c.tmp)]


@case("new-plugin-config-section-name")
def _(c):
    return ["new-plugin", "model", "--kind", "gate", "--dir", str(c.tmp)]


# -- the test -----------------------------------------------------------------------------------
def catalogue() -> dict[str, tuple[str, int]]:
    """``docs/errors.md``'s rows: case id → (message, exit code)."""
    rows = {}
    for line in CATALOGUE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\| `([a-z0-9-]+)` \|.*\| `` (.*) `` \| (\d) \|$", line)
        if match:
            rows[match.group(1)] = (match.group(2), int(match.group(3)))
    return rows


def files_under(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): (p.read_bytes() if p.is_file() else b"")
        for p in sorted(path.rglob("*"))
        if ".lock" not in p.name
    }


def test_the_catalogue_and_the_cases_name_the_same_rows():
    documented = catalogue()
    assert len(documented) >= 30
    assert sorted(documented) == sorted(CASES)
    # The README counts them too.
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert f"[docs/errors.md](docs/errors.md) lists {len(documented)} bad inputs" in readme


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_each_bad_input_gives_its_documented_error(case_id, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    monkeypatch.chdir(tmp_path)
    ctx = Ctx(tmp_path / "case", tiny_model_dir, monkeypatch)
    ctx.tmp.mkdir()
    args = CASES[case_id](ctx)
    before = files_under(ctx.tmp)
    try:
        result = CliRunner().invoke(cli, args)
    finally:
        (ctx.tmp / "readonly").exists() and (ctx.tmp / "readonly").chmod(0o700)
    message, code = catalogue()[case_id]
    stderr = result.stderr.replace(str(ctx.tmp), "<tmp>")
    assert stderr == f"Error: {message}\n", result.output
    assert result.exit_code == code
    assert result.stdout == ""
    assert files_under(ctx.tmp) == before  # nothing written, nothing half-written


@pytest.mark.parametrize("case_id", ["topic-missing-name", "model-weights-damaged"])
def test_debug_shows_the_traceback(case_id, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    ctx = Ctx(tmp_path, tiny_model_dir, monkeypatch)
    result = CliRunner().invoke(cli, [*CASES[case_id](ctx), "--debug"])
    assert result.exit_code != 0
    assert result.exception is not None and type(result.exception).__module__ == "align.errors"
