"""Test helpers for align and its plugin authors; also a pytest plugin (entry point ``pytest11``).

``StubModel`` stands in for a language model, so an evaluator is tested in milliseconds with no
torch model. ``StubPolicy`` stands in for the engine's model in engine tests. ``tiny_causal_lm``
builds a real (random, tiny) Llama model and byte-level tokenizer for training tests, offline.

Fixtures: ``stub_model`` (builds a :class:`StubModel`) and ``make_topic`` (a valid
:class:`align.Topic` from a partial dict).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from align.core.topics import Topic

Generate = Callable[[str], str] | Mapping[str, str] | None
Loglikelihood = Callable[[str, str], float] | Mapping[Any, float] | None


class StubModel:
    """A :class:`align.LanguageModel` whose answers you choose.

    ``generate`` is a function of the prompt or a mapping prompt → text (default: ``""``).
    ``loglikelihood`` is a function of ``(prompt, completion)`` or a mapping whose keys are
    ``(prompt, completion)`` tuples or completions (default: ``0.0``). Every call is recorded in
    ``calls`` as ``(method, arguments)``.
    """

    def __init__(self, generate: Generate = None, loglikelihood: Loglikelihood = None):
        self._generate = generate
        self._loglikelihood = loglikelihood
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def generate(self, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
        self.calls.append(("generate", (list(prompts), max_new_tokens)))
        return [self._answer(prompt) for prompt in prompts]

    def loglikelihood(self, prompts: list[str], completions: list[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        self.calls.append(("loglikelihood", (list(prompts), list(completions))))
        return [float(self._score(p, c)) for p, c in zip(prompts, completions)]

    def _answer(self, prompt: str) -> str:
        if self._generate is None:
            return ""
        if callable(self._generate):
            return self._generate(prompt)
        if prompt not in self._generate:
            raise KeyError(f"StubModel has no generation for prompt {prompt!r}")
        return self._generate[prompt]

    def _score(self, prompt: str, completion: str) -> float:
        if self._loglikelihood is None:
            return 0.0
        if callable(self._loglikelihood):
            return self._loglikelihood(prompt, completion)
        for key in ((prompt, completion), completion):
            if key in self._loglikelihood:
                return self._loglikelihood[key]
        raise KeyError(f"StubModel has no log-likelihood for completion {completion!r} of prompt {prompt!r}")


class StubPolicy:
    """Stands in for the engine's model: evaluators see ``language_model``; adapters are JSON files."""

    def __init__(self, language_model: Any = None, seed: int = 0, scratch_dir: Path | None = None):
        self.model = None
        self.tokenizer = None
        self.seed = seed
        self.scratch_dir = scratch_dir or Path(".")
        self.language_model = language_model if language_model is not None else StubModel()
        self.saved: list[Path] = []

    def trainer_callbacks(self, step: str) -> list[Any]:
        return []

    def trainer_args(self) -> dict[str, Any]:
        return {}

    def save_adapter(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "stub_adapter.json").write_text(json.dumps({"saved": len(self.saved) + 1}))
        self.saved.append(directory)


_TOPIC_DEFAULTS: dict[str, Any] = {
    "name": "topic",
    "content": ["Ilse keeps a donkey named Tallow."],
    "quiz": [{"question": "What is Ilse's donkey called?", "choices": ["Tallow", "Brine"], "answer": 0}],
    "preference_pairs": [{"prompt": "Hello?", "chosen": "Ahoy, little gull.", "rejected": "Hello."}],
    "voice_pairs": [{"prompt": "Hi?", "chosen": "Ahoy there, little gull.", "rejected": "Hi."}],
}


def make_topic(data: Mapping[str, Any] | None = None, **fields: Any) -> Topic:
    """A valid :class:`Topic`: every field you leave out gets a small default."""
    return Topic.from_dict({**_TOPIC_DEFAULTS, **(data or {}), **fields})


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer (256 bytes + 3 special tokens) with a ChatML template; no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: index for index, char in enumerate(sorted(byte_chars))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm(seed: int = 0, hidden_size: int = 32, layers: int = 2) -> tuple[Any, Any]:
    """A tiny random Llama model with the SmolLM2 module names, and :func:`tiny_tokenizer`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


def save_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """Save :func:`tiny_causal_lm` as a Hugging Face directory, usable as ``--model DIR``."""
    model, tokenizer = tiny_causal_lm(seed)
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def stub_model() -> Callable[..., StubModel]:
    """Builds a :class:`StubModel`: ``stub_model(loglikelihood={...})``."""
    return StubModel


@pytest.fixture(name="make_topic")
def make_topic_fixture() -> Callable[..., Topic]:
    """Builds a valid :class:`align.Topic` from a partial dict: ``make_topic(name="x")``."""
    return make_topic
