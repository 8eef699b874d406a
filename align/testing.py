"""Test helpers for align and its plugin authors; also a pytest plugin (entry point ``pytest11``).

``StubModel`` stands in for a language model, so an evaluator is tested in milliseconds with no
torch model. ``StubPolicy`` stands in for the engine's model, ``StubObjective`` for training, and
``run_protocol`` runs the real engine's topic loop with them, so a gate, an evaluator or a
lifecycle hook is tested inside a run in milliseconds. ``tiny_causal_lm`` builds a real (random,
tiny) Llama model and byte-level tokenizer for training tests, offline.

Fixtures (available in any project that has align installed): ``stub_model`` (builds a
:class:`StubModel`), ``make_topic`` (a valid :class:`align.Topic` from a partial dict) and
``plugin_manager`` (an isolated :class:`PluginHarness`: only the plugins a test registers).
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from align.core.topics import Topic
from align.plugins.hookspecs import hookimpl

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
    """Stands in for the engine's model: evaluators see ``language_model``; adapters are JSON files.

    ``state`` is a dict standing in for the adapter's weights: a :class:`StubObjective` changes it,
    a :class:`StubModel` built on a function can read it, and the engine's ``snapshot``/``restore``
    (used by rollback guards) copy it and put it back in place.
    """

    def __init__(
        self,
        language_model: Any = None,
        seed: int = 0,
        scratch_dir: Path | None = None,
        state: dict[str, Any] | None = None,
    ):
        self.model = None
        self.tokenizer = None
        self.seed = seed
        self.scratch_dir = scratch_dir or Path(".")
        self.language_model = language_model if language_model is not None else StubModel()
        self.state = state if state is not None else {}
        self.saved: list[Path] = []

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self.state)

    def restore(self, state: dict[str, Any]) -> None:
        self.state.clear()
        self.state.update(copy.deepcopy(state))

    def save_snapshot(self, state: dict[str, Any], path: Path) -> Path:
        """Write a :meth:`snapshot` for the engine's checkpoints (JSON here; safetensors for a real model)."""
        from align.core.rundir import atomic_write_text

        target = Path(path).with_suffix(".json")
        atomic_write_text(target, json.dumps(state))
        return target

    def load_snapshot(self, path: Path) -> dict[str, Any]:
        return json.loads(Path(path).read_text())

    def set_log_target(
        self, on_log: Callable[[str, dict[str, float]], None] | None, topic: str | None = None
    ) -> None:
        """Where :meth:`log` sends trainer logs (the engine: metrics.jsonl and ``on_trainer_log``)."""
        self._on_log = on_log

    def log(self, step: str, logs: dict[str, float]) -> None:
        """What a real trainer does after an optimizer step: a stub objective's ``effect`` may call
        it to test an ``on_trainer_log`` hook without a model."""
        if getattr(self, "_on_log", None) is not None:
            self._on_log(step, dict(logs))

    def trainer_callbacks(self, step: str) -> list[Any]:
        return []

    def trainer_args(self) -> dict[str, Any]:
        return {}

    def save_adapter(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"saved": len(self.saved) + 1, "state": self.state}
        (directory / "stub_adapter.json").write_text(json.dumps(payload, default=repr))
        self.saved.append(directory)


class StubObjective:
    """An objective that trains nothing: it calls ``effect(policy, topic)`` and returns ``metrics``.

    ``metrics`` is a mapping or a function of the topic. Each call's topic name is kept in ``calls``.
    """

    def __init__(
        self,
        metrics: Mapping[str, float] | Callable[[Topic], Mapping[str, float]] | None = None,
        effect: Callable[[Any, Topic], None] | None = None,
    ):
        self._metrics = metrics if metrics is not None else {"loss": 0.0}
        self.effect = effect
        self.calls: list[str] = []

    def train(self, policy: Any, topic: Topic) -> dict[str, float]:
        self.calls.append(topic.name)
        if self.effect is not None:
            self.effect(policy, topic)
        return dict(self._metrics(topic) if callable(self._metrics) else self._metrics)


class StubEvaluator:
    """An evaluator returning ``metrics``: a mapping, or a function of ``(model, topic)``."""

    def __init__(self, metrics: Mapping[str, float] | Callable[[Any, Topic], Mapping[str, float]]):
        self._metrics = metrics
        self.calls: list[str] = []

    def evaluate(self, model: Any, topic: Topic) -> dict[str, float]:
        self.calls.append(topic.name)
        return dict(self._metrics(model, topic) if callable(self._metrics) else self._metrics)


def _as_factory(component: Any) -> Callable[..., Any]:
    """A class or factory stays as it is; a ready-made instance becomes ``lambda: instance``."""
    if isinstance(component, type) or not any(
        hasattr(component, method) for method in ("train", "evaluate", "decide")
    ):
        return component
    return lambda: component


class StubPlugin:
    """A plugin object from plain mappings of name → factory (or ready-made component instance).

    ``StubPlugin(objectives={"sft": StubObjective()}, evaluators={"quiz": QuizEvaluator})``
    """

    def __init__(
        self,
        objectives: Mapping[str, Any] | None = None,
        evaluators: Mapping[str, Any] | None = None,
        gates: Mapping[str, Any] | None = None,
    ):
        self.objectives = dict(objectives or {})
        self.evaluators = dict(evaluators or {})
        self.gates = dict(gates or {})

    @hookimpl
    def register_objectives(self, register: Callable[..., None]) -> None:
        for name, component in self.objectives.items():
            register(name, _as_factory(component))

    @hookimpl
    def register_evaluators(self, register: Callable[..., None]) -> None:
        for name, component in self.evaluators.items():
            register(name, _as_factory(component))

    @hookimpl
    def register_gates(self, register: Callable[..., None]) -> None:
        for name, component in self.gates.items():
            register(name, _as_factory(component))


@dataclass
class RunResult:
    """What :func:`run_protocol` returns: the run's summary, its events and its directory."""

    summary: dict[str, Any]
    events: list[dict[str, Any]]
    path: Path
    policy: Any = None

    def topic(self, topic: str) -> dict[str, Any]:
        for entry in self.summary["topics"]:
            if entry["topic"] == topic:
                return entry
        raise KeyError(
            f"no topic {topic!r} in this run (topics: {[t['topic'] for t in self.summary['topics']]})"
        )

    def step(self, topic: str, step: str) -> dict[str, Any]:
        """The step's entry in summary.json: ``status``, ``metrics``, ``gate``, ``rollback``."""
        for entry in self.topic(topic)["steps"]:
            if entry["step"] == step:
                return entry
        raise KeyError(f"no step {step!r} for topic {topic!r}")

    def metrics(self, topic: str, step: str) -> dict[str, float]:
        return self.step(topic, step)["metrics"]

    def ran(self, topic: str, step: str) -> bool:
        return self.step(topic, step)["status"] == "ran"


@dataclass
class PluginHarness:
    """An isolated plugin manager: only the plugins a test registers, built-ins opt-in.

    No entry points are loaded, so what is installed in the environment does not leak in.
    """

    #: ``True`` for all of align's built-in components, or the ones named: ``["quiz", "threshold"]``.
    builtins: bool | Sequence[str] = False
    plugins: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        from align.plugins.manager import new_plugin_manager

        self.manager = new_plugin_manager()
        if self.builtins:
            self.add_builtins(None if self.builtins is True else self.builtins)
        for plugin in list(self.plugins):
            self.register(plugin)

    def register(self, plugin: Any, name: str | None = None) -> Any:
        """Register a plugin (a module or an object with ``@align.hookimpl`` methods); returns it.

        An object is named after its class (``Broken``, then ``Broken-2``), so errors read well.
        """
        from align.plugins.manager import register_plugin

        register_plugin(self.manager, plugin, name)
        return plugin

    def add_builtins(self, only: Sequence[str] | None = None) -> None:
        """Register align's built-in components, or ``only`` the named ones (``["threshold"]``)."""
        from align.plugins.manager import register_builtins

        register_builtins(self.manager, only)

    @property
    def hook(self) -> Any:
        return self.manager.hook

    @property
    def registry(self) -> Any:
        """The components the registered plugins contribute (misspelt hooks are an error here)."""
        from align.plugins.manager import build_registry, validate_hooks

        validate_hooks(self.manager)
        return build_registry(self.manager)

    def run(self, protocol: Sequence[Any] | None = None, topics: Any = None, **kwargs: Any) -> RunResult:
        """:func:`run_protocol` with these plugins."""
        return run_protocol(protocol, topics, harness=self, **kwargs)


def run_protocol(
    protocol: Sequence[Any] | None = None,
    topics: Iterable[Topic] | str | Path | None = None,
    *,
    plugins: Iterable[Any] = (),
    builtins: bool | Sequence[str] = True,
    config: Mapping[str, Any] | None = None,
    model: Any = None,
    state: dict[str, Any] | None = None,
    output: str | Path | None = None,
    harness: PluginHarness | None = None,
) -> RunResult:
    """Run the real engine's topic loop with a stub model: milliseconds, no torch model.

    :param protocol: the steps, as in a config's ``protocol:`` (default: the seed's protocol, which
        needs the built-in components or stand-ins named ``sft``, ``dpo``, ``quiz``, ``voice``).
    :param topics: :class:`Topic` objects (default: one :func:`make_topic`), or a file or directory.
    :param plugins: plugin objects to register, e.g. ``StubPlugin(objectives={"sft": StubObjective()})``.
    :param builtins: register align's built-in components too: all (``True``), none, or the ones
        named (``["quiz", "threshold"]``); ignored when ``harness`` is given.
    :param config: more config, e.g. ``{"dpo": {"beta": 0.05}}``.
    :param model: the :class:`align.LanguageModel` evaluators see (default: ``StubModel()``).
    :param state: the stub policy's ``state`` dict, shared with stub objectives and models.
    :param output: the run directory (default: a new temporary directory).
    """
    from align.core.config import dump_config
    from align.core.engine import Engine
    from align.core.plan import resolve_plan
    from align.core.rundir import RunDir

    if harness is None:
        harness = PluginHarness(builtins=builtins)
    for plugin in plugins:
        harness.register(plugin)
    data: dict[str, Any] = dict(config or {})
    if protocol is not None:
        data["protocol"] = list(protocol)
    topic_arg = [make_topic()] if topics is None else topics
    if isinstance(topic_arg, Topic):
        topic_arg = [topic_arg]
    plan = resolve_plan(data, "<run_protocol>", harness.registry, topics=topic_arg)
    path = Path(output) if output is not None else Path(tempfile.mkdtemp(prefix="align-run-")) / "run"
    rundir = RunDir(path)
    rundir.check_writable()
    rundir.create(dump_config(plan.config))
    policy = StubPolicy(model, seed=plan.config["seed"], scratch_dir=rundir.scratch_dir, state=state)
    summary = Engine(plan, policy, rundir, hooks=harness.manager).run()
    events = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line]
    return RunResult(summary=summary, events=events, path=path, policy=policy)


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


def save_tiny_gguf(path: str | Path, seed: int = 0) -> Path:
    """Write :func:`tiny_causal_lm` as a float32 GGUF file (llama layout, its byte-level tokenizer
    and chat template), usable as ``--model FILE.gguf``; needs the ``gguf`` package."""
    import gguf
    import numpy as np

    model, tokenizer = tiny_causal_lm(seed)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    tokens = [
        token for token, _ in sorted(tokenizer.backend_tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    ]
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token.startswith("<|") else 1 for token in tokens])  # 3: control
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }

    def permuted(weight: Any, heads: int) -> Any:  # llama.cpp's rotary layout, which transformers undoes
        shape = weight.shape
        return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)

    for name, tensor in model.state_dict().items():
        array = tensor.detach().numpy().astype(np.float32)
        if name == "lm_head.weight":  # tied to the embeddings
            continue
        if name == "model.embed_tokens.weight":
            writer.add_tensor("token_embd.weight", array)
        elif name == "model.norm.weight":
            writer.add_tensor("output_norm.weight", array)
        else:
            parts = name.split(".")
            module = ".".join(parts[3:-1])
            if module == "self_attn.q_proj":
                array = permuted(array, config.num_attention_heads)
            elif module == "self_attn.k_proj":
                array = permuted(array, config.num_key_value_heads)
            writer.add_tensor(f"blk.{parts[2]}.{names[module]}.weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


@pytest.fixture
def stub_model() -> Callable[..., StubModel]:
    """Builds a :class:`StubModel`: ``stub_model(loglikelihood={...})``."""
    return StubModel


@pytest.fixture(name="make_topic")
def make_topic_fixture() -> Callable[..., Topic]:
    """Builds a valid :class:`align.Topic` from a partial dict: ``make_topic(name="x")``."""
    return make_topic


@pytest.fixture
def plugin_manager() -> PluginHarness:
    """An isolated :class:`PluginHarness`: register your plugin, then check ``.registry`` or ``.run(...)``.

    Built-ins are opt-in: ``plugin_manager.add_builtins()``.
    """
    return PluginHarness()
