"""Run each preference pair's prompt once in DPO, not once per answer.

TRL's ``DPOTrainer`` scores a batch of pairs as ``2B`` rows, ``prompt + chosen`` for each pair and
then ``prompt + rejected``, so every prompt goes through the model twice (with a chat template the
prompt, system turn included, is often longer than the answers). :func:`shared_prompt_forward`
wraps the fused forward TRL gives the model (``model(..., labels=..., fused_lm_head=True)``): it
runs the ``B`` prompts once, keeps their key/value cache, and runs the ``2B`` answers on that cache,
repeated for the two answers of each pair (prefix sharing; gradients flow through the cache into
the prompt pass). It returns the same :class:`FusedCausalLMOutput` fields at the same positions
(zero where the label is ``-100``), so TRL's loss code, every ``loss_type`` and the metrics, runs
unchanged on it; ``tests/objectives/test_shared_prompt.py`` checks losses and gradients against
TRL's own forward for each loss type.

Everything else goes to TRL's forward as it is: a batch not laid out that way (an odd number of
rows, a row without answer tokens, answers that are not one contiguous run, the two rows of a pair
with different prompts), and calls this cannot serve (gradient checkpointing, router logits,
pre-shifted labels, any argument but ``input_ids``, ``attention_mask``, ``labels``, ``use_cache``).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any, NamedTuple

from align import compat

#: The per-token fields TRL's DPO trainer reads from its fused forward (``log_sum_sq_probs`` feeds
#: its WPO weighting, ``use_weighting``).
FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


#: The arguments of a fused forward this can serve: anything else goes to TRL's forward.
PLAIN = frozenset({"input_ids", "attention_mask", "labels", "use_cache"})
#: Arguments that may come along as long as they are None (PEFT's ``PeftModelForCausalLM`` passes
#: them on unset).
UNSET_OK = frozenset({"inputs_embeds", "output_attentions", "output_hidden_states", "return_dict"})


class Layout(NamedTuple):
    """Where the prompt ends and the answer lies in each of the ``2B`` rows."""

    start: Any  # [2B]: index of each row's first answer token (= its prompt's length)
    length: Any  # [2B]: answer tokens in each row


def pair_layout(input_ids: Any, attention_mask: Any, labels: Any) -> Layout | None:
    """The layout of a DPO batch, or None where its prompts cannot be shared."""
    import torch

    rows, width = input_ids.shape
    if rows % 2 or rows == 0 or labels is None or labels.shape != input_ids.shape:
        return None
    pairs = rows // 2
    answer = labels != -100
    length = answer.sum(1)
    if not bool((length > 0).all()):
        return None
    start = answer.int().argmax(1)
    if not bool((start >= 1).all()):  # nothing before the first answer token to predict it
        return None
    positions = torch.arange(width, device=input_ids.device)
    contiguous = (positions >= start[:, None]) & (positions < (start + length)[:, None])
    if not torch.equal(contiguous, answer):
        return None
    if not torch.equal(start[:pairs], start[pairs:]):
        return None
    in_prompt = positions < start[:pairs, None]
    if not torch.equal(input_ids[:pairs][in_prompt], input_ids[pairs:][in_prompt]):
        return None
    if attention_mask is not None:
        real = contiguous | (positions < start[:, None])
        if not bool(attention_mask.bool()[real].all()):
            return None
    return Layout(start, length)


def _forward_shared(model: Any, input_ids: Any, layout: Layout, outputs: tuple[str, ...]) -> Any:
    """Score the answers of a DPO batch with each prompt run once; ``model`` is the causal LM whose
    ``base_model`` is the backbone (as TRL's fused forward reads it)."""
    import torch

    device = input_ids.device
    rows = input_ids.size(0)
    pairs = rows // 2
    start, length = layout
    prompt_width = int(start.max())
    answer_width = int(length.max())
    backbone = model.base_model

    prompt_mask = (torch.arange(prompt_width, device=device) < start[:pairs, None]).long()
    prompt = backbone(input_ids=input_ids[:pairs, :prompt_width], attention_mask=prompt_mask, use_cache=True)
    of_pair = torch.arange(rows, device=device) % pairs
    cache = compat.cache_rows(prompt.past_key_values, of_pair, model.config)

    steps = torch.arange(answer_width, device=device)
    answer_mask = steps < length[:, None]
    columns = (start[:, None] + steps).clamp(max=input_ids.size(1) - 1)
    answer_ids = input_ids.gather(1, columns)
    answers = backbone(
        input_ids=answer_ids,
        attention_mask=torch.cat([prompt_mask[of_pair], answer_mask.long()], dim=1),
        position_ids=start[:, None] + steps,
        past_key_values=cache,
        use_cache=True,
    )
    # The last prompt position predicts the first answer token; each answer position the next one.
    last_prompt = prompt.last_hidden_state[of_pair, start - 1]
    predicting = torch.cat([last_prompt[:, None], answers.last_hidden_state[:, :-1]], dim=1)

    head = model.get_output_embeddings()
    per_token = compat.chunked_log_probs(
        predicting[answer_mask].to(head.weight.device),
        head.weight,
        head.bias,
        answer_ids[answer_mask].to(head.weight.device),
        outputs,
    )
    # Back to TRL's layout: row r's log-prob of the token at position t sits at column t - 1.
    row_index = torch.arange(rows, device=device)[:, None].expand(rows, answer_width)[answer_mask]
    column_index = (start[:, None] - 1 + steps).expand(rows, answer_width)[answer_mask]
    shape = (rows, input_ids.size(1) - 1)

    def place(values: Any) -> Any:
        if values is None:
            return None
        return values.new_zeros(shape).index_put((row_index, column_index), values)

    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (place(v) for v in per_token)
    mask = place(torch.ones_like(row_index, dtype=torch.bool))
    return compat.fused_output(
        loss=-log_probs.sum() / mask.sum().clamp(min=1),
        log_probs=log_probs,
        entropy=entropy,
        log_sum_sq_probs=log_sum_sq_probs,
        mean_logits=mean_logits,
        is_top1=is_top1,
        label_mask=mask,
    )


@contextlib.contextmanager
def shared_prompt_forward(peft_model: Any, outputs: tuple[str, ...] = FIELDS) -> Iterator[dict[str, int]]:
    """While the block runs, fused forwards on DPO batches of ``peft_model`` run each prompt once.

    ``peft_model`` is the model a TRL DPO trainer was built with (its base model's forward already
    patched by TRL). Yields counters: ``shared`` batches served here, ``passed`` handed to TRL's
    forward. The model's forward is TRL's again afterwards, also after a failure.
    """
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    original = base.__dict__.get("forward")
    if original is None:  # not patched with TRL's fused head: nothing to wrap
        yield {"shared": 0, "passed": 0}
        return
    counts = {"shared": 0, "passed": 0}

    def forward(self: Any, *args: Any, fused_lm_head: bool = False, **kwargs: Any) -> Any:
        layout = None
        # PEFT's causal-LM wrapper passes its own arguments on, unset (None), as well.
        given = {key for key, value in kwargs.items() if value is not None or key not in UNSET_OK}
        if (
            fused_lm_head
            and not args
            and given <= PLAIN
            and kwargs.get("input_ids") is not None
            and not getattr(self, "is_gradient_checkpointing", False)
        ):
            layout = pair_layout(kwargs["input_ids"], kwargs.get("attention_mask"), kwargs.get("labels"))
        if layout is None:
            counts["passed"] += 1
            return original(*args, fused_lm_head=fused_lm_head, **kwargs)
        counts["shared"] += 1
        return _forward_shared(self, kwargs["input_ids"], layout, outputs)

    base.forward = types.MethodType(forward, base)
    try:
        yield counts
    finally:
        base.forward = original
