"""``align sample``: answer a prompt with a run's adapter (and with the bare model)."""

from __future__ import annotations

from pathlib import Path

from align.tools.loading import check_generation_options, generate, load


def sample(
    adapter: str | Path,
    prompt: str,
    *,
    base: bool = False,
    model: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    repetition_penalty: float = 1.0,
) -> dict[str, str]:
    """The answer to ``prompt`` with the adapter attached, and the bare model's with ``base``."""
    check_generation_options(max_new_tokens, temperature, repetition_penalty)
    loaded = load(adapter, model)
    options = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "repetition_penalty": repetition_penalty,
    }
    answers = {"adapter": generate(loaded, [prompt], **options)[0]}
    if base:
        with loaded.bare():
            answers["base"] = generate(loaded, [prompt], **options)[0]
    return answers


def repetition_note(answer: str) -> str | None:
    """A word for an answer that loops (a phrase said over and over, as a model stuck in a loop
    does until the token limit): the style evaluator's own test for a degenerate answer."""
    from align.evaluators.style import repeats

    if not repeats(answer):
        return None
    return "repeats itself (a word or phrase loops), which is not the person's voice"
