"""``align chat``: talk to a trained adapter, turn by turn, through the model's chat template.

Each turn is the whole conversation so far rendered by the tokenizer's chat template (a system
message first when one is given), answered greedily by default, streamed as it is generated.
With ``base`` the bare model answers every turn too, from a conversation of its own (each model
sees its own earlier answers), so the two can be compared turn by turn. Reading from a pipe, it
answers each line and stops at the end of the input, so a conversation can be scripted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.errors import AlignError, ModelError

#: What a line may say instead of a message.
COMMANDS = {"/reset": "forget the conversation so far", "/quit": "end the chat"}


def resolve_adapter(path: str | Path) -> Path:
    """``path`` as an adapter directory: itself, or a run directory's last topic's adapter."""
    from align.tools.runs import ADAPTER_CONFIG, check_adapter, run_adapter

    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        return check_adapter(path)
    if path.is_dir() and ((path / "config.yaml").is_file() or (path / "summary.json").is_file()):
        return run_adapter(path)
    what = (
        "not found" if not path.exists() else f"neither an adapter directory (no {ADAPTER_CONFIG}) nor a run"
    )
    raise AlignError(f"{path}: {what}; give a run directory (runs/<name>) or one of its adapters/<topic>")


@dataclass
class Conversation:
    """One side of the chat: its messages so far (the system message first, when there is one)."""

    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []


class Chat:
    """A conversation with a loaded model (:class:`align.tools.LoadedModel`), and with its bare
    base model alongside when ``base``."""

    def __init__(
        self,
        loaded: Any,
        *,
        system: str | None = None,
        base: bool = False,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
    ):
        from align.tools.loading import check_generation_options

        check_generation_options(max_new_tokens, temperature)
        if not loaded.tokenizer.chat_template:
            raise ModelError(
                f"{loaded.settings['path']}: the tokenizer has no chat template (or the run set "
                "model.chat_template: false), so it cannot hold a conversation; use `align sample` for "
                "one plain-text prompt"
            )
        self.loaded = loaded
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.turn = 0
        self.sides = {"adapter": Conversation(system)}
        if base:
            self.sides["base"] = Conversation(system)

    def reset(self) -> None:
        self.turn = 0
        for side in self.sides.values():
            side.reset()

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation as the chat template renders it, ready for the assistant's answer."""
        tokenizer = self.loaded.tokenizer
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def answer(self, side: str, message: str, stream: Callable[[str], None] | None = None) -> str:
        """``side``'s answer to ``message`` in its conversation (``stream`` gets the text as it comes)."""
        import torch
        from transformers import TextStreamer

        conversation = self.sides[side]
        messages = [*conversation.messages, {"role": "user", "content": message}]
        ids = torch.tensor([self.prompt_ids(messages)], dtype=torch.long, device=self.loaded.model.device)
        options: dict[str, Any] = {"do_sample": False}
        if self.temperature > 0:
            options = {"do_sample": True, "temperature": float(self.temperature), "top_k": 0, "top_p": 1.0}
            torch.manual_seed(self.seed + self.turn)  # the same seed replays the same conversation
        streamer = None
        if stream is not None:

            class Streamer(TextStreamer):
                def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                    stream(text)

            streamer = Streamer(self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        bare = self.loaded.bare() if side == "base" else contextlib.nullcontext()
        with bare, torch.inference_mode():
            out = self.loaded.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.loaded.tokenizer.pad_token_id,
                streamer=streamer,
                **options,
            )
        text = self.loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        conversation.messages = [*messages, {"role": "assistant", "content": text}]
        return text

    def say(self, message: str, stream: Callable[[str, str], None] | None = None) -> dict[str, str]:
        """Every side's answer to ``message`` (``stream(side, text)`` as each is generated)."""
        answers = {}
        for side in self.sides:
            answers[side] = self.answer(side, message, (lambda t, s=side: stream(s, t)) if stream else None)
        self.turn += 1
        return answers


def run_chat(
    chat: Chat,
    lines: Iterable[str],
    write: Callable[[str], None],
    *,
    interactive: bool,
) -> int:
    """Answer each line of ``lines`` (``/reset`` and ``/quit`` are commands); returns the turns taken.

    ``write`` gets the output as it is produced: the answers streamed, each after a label when
    the bare model answers too, and in a terminal the ``you>`` prompt."""
    labelled = len(chat.sides) > 1
    turns = 0
    for raw in lines:
        message = raw.rstrip("\r\n")
        if not message.strip():
            continue
        command = message.strip()
        if command == "/quit":
            break
        if command == "/reset":
            chat.reset()
            write("(conversation reset)\n" if interactive else "")
            continue
        if command.startswith("/") and " " not in command:  # a mistyped command is not a message
            write(f"{command}: not a chat command ({'; '.join(f'{c}: {w}' for c, w in COMMANDS.items())})\n")
            continue
        for side in chat.sides:
            if labelled:
                write(f"{side}> ")
            chat.answer(side, message, write)
            write("\n")
        chat.turn += 1
        turns += 1
    return turns
