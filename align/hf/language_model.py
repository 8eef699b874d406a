"""The model as the :class:`align.LanguageModel` evaluators score: batched log-likelihoods and
greedy (or sampled) generation, split across the processes of a launch, or in lock step under FSDP."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from align.core import distributed

#: Prompts sharing fewer leading tokens than this are scored without a shared prefix.
MIN_SHARED_PREFIX = 4


class HFLanguageModel:
    """A transformers causal LM (optionally with its adapter) as an :class:`align.LanguageModel`.

    Prompts are user turns of the tokenizer's chat template when it has one. Scoring runs in
    batches under ``torch.inference_mode``, left-padded so every completion ends at the last
    position and only the completion positions' logits are computed (``logits_to_keep``).
    """

    def __init__(
        self, model: Any, tokenizer: Any, *, batch_size: int = 16, chat_template: bool | None = None
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.chat_template = bool(tokenizer.chat_template) if chat_template is None else chat_template
        self._prompt_cache: dict[str, list[int]] = {}
        self._forwards = 0

    @property
    def pad_id(self) -> int:
        """The token that pads batches: the tokenizer's pad token, else 0 (always masked out)."""
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def format_prompt(self, prompt: str) -> str:
        if not self.chat_template:
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def prompt_ids(self, prompt: str) -> list[int]:
        ids = self._prompt_cache.get(prompt)
        if ids is None:
            text = self.format_prompt(prompt)
            ids = self.tokenizer(text, add_special_tokens=not self.chat_template)["input_ids"]
            self._prompt_cache[prompt] = ids
        return ids

    def completion_ids(self, completion: str) -> list[int]:
        return self.tokenizer(completion, add_special_tokens=False)["input_ids"]

    def loglikelihood(self, prompts: list[str], completions: list[str]) -> list[float]:
        """The summed log-probability of each completion after its prompt.

        A prompt is run once however many completions it has (a quiz question's choices, a voice
        pair's two answers): a batch of prompts goes through the model with its KV cache kept,
        then every completion continues from its prompt's cache. The tokens scored are those of
        ``prompt_ids(prompt) + completion_ids(completion)``, as in one plain forward pass.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        rows = [(self.prompt_ids(p), self.completion_ids(c)) for p, c in zip(prompts, completions)]
        results = [0.0] * len(rows)
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for i, (prompt, completion) in enumerate(rows):
            if completion:  # an empty completion has log-probability 0
                by_prompt.setdefault(tuple(prompt), []).append(i)
        # Longest first, so batches hold prompts of similar length and padding stays small.
        unique = sorted(by_prompt, key=len, reverse=True)
        # Under a multi-process launch each process scores every world_size-th prompt (all of its
        # completions, so the prompt still runs once), and the scores are gathered by index.
        split = distributed.is_distributed()
        mine = unique[distributed.rank() :: distributed.world_size()] if split else unique
        chunks = [mine[start : start + self.batch_size] for start in range(0, len(mine), self.batch_size)]
        members = [
            [(row, i) for row, prompt in enumerate(chunk) for i in by_prompt[prompt]] for chunk in chunks
        ]
        # Under FSDP every process makes as many forward passes as the busiest one (_keep_step),
        # so each must know that number before its first pass: the passes are counted ahead.
        planned = self._planned_forwards(mine, members, rows) if split and distributed.lockstep() else None
        most = distributed.max_over_processes(planned) if planned is not None else 0
        with self._scoring():
            self._forwards = 0
            prefix = self._shared_prefix(mine)
            for chunk, chunk_members in zip(chunks, members):
                self._score_chunk([list(p) for p in chunk], chunk_members, rows, results, prefix)
            if planned is not None:
                if self._forwards != planned:
                    raise RuntimeError(f"made {self._forwards} forward passes where {planned} were planned")
                self._keep_step(most - self._forwards)
        if split:
            scored = [(i, results[i]) for prompt in mine for i in by_prompt[prompt]]
            for i, value in distributed.gather_objects(scored):
                results[i] = value
        return results

    def _shared_prefix(self, prompts: list[tuple[int, ...]]) -> tuple[int, Any] | None:
        """The tokens every prompt starts with (the chat template's system turn and the start of
        the user turn), run once: ``(length, KV cache of one row)``, or ``None`` when they share
        too little to be worth it. Each prompt keeps at least one token of its own, whose logits
        score its completions' first token."""
        import torch

        length = self._prefix_length(prompts)
        if length is None:
            return None
        device = next(self.model.parameters()).device
        out = self._forward(
            input_ids=torch.tensor([prompts[0][:length]], device=device), use_cache=True, logits_to_keep=1
        )
        return length, out.past_key_values

    @staticmethod
    def _prefix_length(prompts: list[tuple[int, ...]]) -> int | None:
        """How many tokens :meth:`_shared_prefix` runs once, or ``None``."""
        if len(prompts) < 2:
            return None
        length = min(len(p) for p in prompts) - 1
        first = prompts[0]
        for prompt in prompts[1:]:
            length = next((i for i in range(length) if prompt[i] != first[i]), length)
        return length if length >= MIN_SHARED_PREFIX else None

    def _planned_forwards(
        self,
        prompts: list[tuple[int, ...]],
        members: list[list[tuple[int, int]]],
        rows: list[tuple[list[int], list[int]]],
    ) -> int:
        """How many forward passes scoring ``prompts`` in chunks with ``members`` will make: the
        shared prefix (if any), each chunk's prompts, and each batch of its completions longer than
        one token (see :meth:`_score_chunk`)."""
        count = 0 if self._prefix_length(prompts) is None else 1
        for chunk_members in members:
            batches = self._completion_batches(chunk_members, rows)
            count += 1 + sum(1 for batch in batches if max(len(rows[i][1]) for _, i in batch) > 1)
        return count

    def _completion_batches(
        self, members: list[tuple[int, int]], rows: list[tuple[list[int], list[int]]]
    ) -> list[list[tuple[int, int]]]:
        """The completions ``members`` of a chunk in the batches :meth:`_score_chunk` scores them
        in: similar lengths together, longest first, at most ``batch_size`` a batch."""
        members = sorted(members, key=lambda member: -len(rows[member[1]][1]))
        return [members[begin : begin + self.batch_size] for begin in range(0, len(members), self.batch_size)]

    def _score_chunk(
        self,
        prompts: list[list[int]],
        members: list[tuple[int, int]],
        rows: list[tuple[list[int], list[int]]],
        results: list[float],
        prefix: tuple[int, Any] | None = None,
    ) -> None:
        """Score the completions ``members`` (prompt row, result index) of a batch of prompts,
        continuing from ``prefix`` (see :meth:`_shared_prefix`) when given."""
        import torch

        shared, past = prefix if prefix is not None else (0, None)
        input_ids, prompt_mask, position_ids = self._left_pad([p[shared:] for p in prompts])
        if past is not None:
            # The shared tokens sit before each row's left padding: positions go on from them.
            rows_of_prefix = torch.zeros(len(prompts), dtype=torch.long, device=input_ids.device)
            past = _select_rows(past, rows_of_prefix, self.model.config)
            position_ids = position_ids + shared
            prompt_mask = torch.cat([torch.ones_like(prompt_mask[:, :1]).expand(-1, shared), prompt_mask], -1)
        out = self._forward(
            input_ids=input_ids,
            attention_mask=prompt_mask,
            position_ids=position_ids,
            past_key_values=past,
            use_cache=True,
            logits_to_keep=1,
        )
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # each completion's first token
        cache = out.past_key_values
        lengths = prompt_mask.sum(-1)
        device = input_ids.device
        for batch in self._completion_batches(members, rows):
            index = torch.tensor([row for row, _ in batch], device=device)
            completions = [rows[i][1] for _, i in batch]
            width = max(len(c) for c in completions)
            pad = self.pad_id
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for n, completion in enumerate(completions):
                ids[n, : len(completion)] = torch.tensor(completion, dtype=torch.long)
                mask[n, : len(completion)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logprobs = first.index_select(0, index).gather(-1, ids[:, :1]).squeeze(-1)
            if width > 1:
                logits = self._forward(
                    input_ids=ids[:, :-1],
                    attention_mask=torch.cat([prompt_mask.index_select(0, index), mask[:, :-1]], dim=-1),
                    position_ids=lengths.index_select(0, index)[:, None]
                    + torch.arange(width - 1, device=device),
                    past_key_values=_select_rows(cache, index, self.model.config),
                    use_cache=True,
                ).logits
                rest = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                logprobs = logprobs + (rest * mask[:, 1:]).sum(-1)
            for n, (_, i) in enumerate(batch):
                results[i] = float(logprobs[n])

    def generate(self, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
        """Greedy continuations of ``prompts``; under a multi-process launch each process generates
        a contiguous slice and the slices are gathered in order.

        With sharded weights (FSDP) the processes generate in step, through the model's own
        forward pass (:meth:`_greedy_in_step`), and a process with fewer batches than another
        generates throw-away ones until both have made as many."""
        lockstep = distributed.is_distributed() and distributed.lockstep()
        mine = [prompts[i] for i in distributed.shard(len(prompts))]
        batches = [mine[start : start + self.batch_size] for start in range(0, len(mine), self.batch_size)]
        if lockstep:
            batches += [prompts[:1]] * (distributed.max_over_processes(len(batches)) - len(batches))
        outputs: list[str] = []
        with self._scoring():
            for batch in batches:
                chunk = [self.prompt_ids(p) for p in batch]
                input_ids, attention_mask, position_ids = self._left_pad(chunk)
                if lockstep:
                    new_tokens = self._greedy_in_step(input_ids, attention_mask, position_ids, max_new_tokens)
                else:
                    generated = self.model.generate(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )
                    new_tokens = generated[:, input_ids.shape[1] :]
                outputs.extend(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        return distributed.gather_objects([text.strip() for text in outputs[: len(mine)]])

    def _greedy_in_step(
        self, input_ids: Any, attention_mask: Any, position_ids: Any, max_new_tokens: int
    ) -> Any:
        """Greedy decoding, one forward pass of the whole model a token, in step with the other
        processes: each goes on until every process's answers have ended (at an end-of-sequence
        token, then padded) or ``max_new_tokens`` are made.

        Under FSDP, transformers' ``generate`` (reached through PEFT) calls the inner model's
        forward, not the sharded root's, which FSDP refuses; this loop calls the root. It picks the
        same tokens as ``generate(do_sample=False)`` with no logits processors.
        """
        import torch

        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        stops = torch.tensor(eos if isinstance(eos, list) else [eos], device=input_ids.device)
        pad = self.pad_id
        out = self._forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True
        )
        positions = position_ids[:, -1:]
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tokens = []
        for step in range(max_new_tokens):
            token = out.logits[:, -1].float().argmax(-1).masked_fill(finished, pad)
            tokens.append(token)
            finished |= torch.isin(token, stops)
            if step == max_new_tokens - 1 or distributed.max_over_processes(int(not finished.all())) == 0:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=-1)
            positions = positions + 1
            out = self._forward(
                input_ids=token[:, None],
                attention_mask=attention_mask,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        return torch.stack(tokens, dim=1)

    def _forward(self, **inputs: Any) -> Any:
        """One forward pass of the model, counted (see :meth:`_keep_step`)."""
        self._forwards += 1
        return self.model(**inputs)

    def _keep_step(self, missing: int) -> None:
        """Under FSDP, after this process's share of a scoring call: make ``missing`` one-token
        forward passes, as many as the busiest process made more. Every forward pass over sharded
        weights gathers each layer's weights from all the processes, so each must make the same
        number; what they compute does not matter to the gathering, only how many there are."""
        import torch

        device = next(self.model.parameters()).device
        pad = self.pad_id
        for _ in range(missing):
            self.model(input_ids=torch.tensor([[pad]], device=device), use_cache=False, logits_to_keep=1)

    def _left_pad(self, sequences: list[list[int]]) -> tuple[Any, Any, Any]:
        import torch

        device = next(self.model.parameters()).device
        width = max(len(s) for s in sequences)
        pad = self.pad_id
        input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, width - len(sequence) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return input_ids.to(device), attention_mask.to(device), position_ids.to(device)

    @contextlib.contextmanager
    def _scoring(self) -> Iterator[None]:
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            # FSDP gathers each layer's weights into buffers it keeps for training's passes, which
            # must not be made under inference mode: plain no_grad there.
            with torch.no_grad() if distributed.lockstep() else torch.inference_mode():
                yield
        finally:
            if was_training:
                self.model.train()


def whole(tensor: Any) -> Any:
    """``tensor`` itself, or the whole tensor when FSDP has sharded it across the processes (a
    DTensor: gathering it takes every process)."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if full_tensor is not None else tensor


def shard_like(value: Any, param: Any) -> Any:
    """``value`` (a whole tensor) laid out like ``param``: as is, or this process's shard of it
    when FSDP has sharded ``param`` (every process holds the same ``value``, so nothing moves)."""
    if getattr(param, "device_mesh", None) is None:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        value.to(param.device_mesh.device_type), param.device_mesh, param.placements, src_data_rank=None
    )


def _select_rows(cache: Any, index: Any, config: Any) -> Any:
    """A new KV cache holding rows ``index`` (repeats allowed) of ``cache``, which stays as it is."""
    from align import compat

    return compat.cache_rows(cache, index, config)
