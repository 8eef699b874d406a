"""Model FLOPs utilisation: the useful FLOPs a step did per second, against what torch's own matrix
multiply reaches on the model's shapes on the same machine, in the same process.

Useful FLOPs are counted from what actually ran through the model, by hooks, not estimated from a
config: every call of the decoder (its real, unpadded new tokens; attention over the call's
context) and every token the LM head scored (TRL's chunked log-prob kernel, which both TRL's fused
head and align's shared-prompt DPO forward use, or the ``lm_head`` module itself, as evaluation
does). Per token, a decoder layer's matrix multiplies cost ``2 * params`` FLOPs forward and its
attention ``4 * hidden * context``; the head ``2 * hidden * vocab``. A pass with gradients costs
twice its forward: the backward pass computes the gradient of each input (the same FLOPs as the
forward) but none for the frozen weights (the rank-1 adapter's own are negligible). Padding, the
full-vocabulary head over prompt positions and recomputation are not useful and not counted.

The ceiling is measured, not looked up: ``torch.mm`` on ``[tokens, hidden] @ [hidden, intermediate]``
(the MLP's shape, the largest of the layer's) and ``[tokens, hidden] @ [hidden, vocab]`` (the head),
best of several runs, with the token count a step actually used.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any


class FlopMeter:
    """Counts the useful FLOPs of everything a causal LM runs while :meth:`watch` is active."""

    def __init__(self, model: Any):
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder = causal.get_decoder() if hasattr(causal, "get_decoder") else causal.model
        self.head = causal.get_output_embeddings()
        config = causal.config
        self.hidden = config.hidden_size
        self.vocab = config.vocab_size
        self.intermediate = getattr(config, "intermediate_size", 4 * self.hidden)
        self.layers = config.num_hidden_layers
        layers = getattr(self.decoder, "layers", [])
        # Matrix-multiply parameters of one decoder layer (norms and the adapter's rank-1 A/B left out).
        self.layer_params = (
            sum(p.numel() for name, p in layers[0].named_parameters() if p.dim() == 2 and "lora_" not in name)
            if len(layers)
            else 0
        )
        self.decoder_flops = 0.0
        self.head_flops = 0.0
        self.decoder_tokens = 0
        self.head_tokens = 0
        self.calls = 0

    @property
    def flops(self) -> float:
        return self.decoder_flops + self.head_flops

    def _add_decoder(self, tokens: int, context: int, grad: bool) -> None:
        forward = tokens * self.layers * (2 * self.layer_params + 4 * self.hidden * context)
        self.decoder_flops += forward * (2 if grad else 1)
        self.decoder_tokens += tokens
        self.calls += 1

    def _add_head(self, tokens: int, grad: bool) -> None:
        self.head_flops += tokens * 2 * self.hidden * self.vocab * (2 if grad else 1)
        self.head_tokens += tokens

    @contextlib.contextmanager
    def watch(self) -> Iterator[FlopMeter]:
        import torch

        def before_decoder(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                return
            mask = kwargs.get("attention_mask")
            new = ids.size(-1)
            if mask is not None and mask.dim() == 2:
                tokens, context = int(mask[:, -new:].sum()), mask.size(-1)
            else:
                tokens, context = ids.numel(), new
            self._add_decoder(tokens, context, torch.is_grad_enabled())

        def after_head(module: Any, args: Any, output: Any) -> None:
            hidden = args[0]
            self._add_head(hidden.numel() // hidden.size(-1), torch.is_grad_enabled())

        hooks = [
            self.decoder.register_forward_pre_hook(before_decoder, with_kwargs=True),
            self.head.register_forward_hook(after_head),
        ]
        patched = []
        try:
            import trl.kernels as kernels
            import trl.trainer.utils as trl_utils

            function = kernels.ChunkedLogProbFunction
            original = function.apply
            meter = self

            def counting_apply(hidden: Any, *rest: Any) -> Any:
                meter._add_head(hidden.shape[0], torch.is_grad_enabled() and hidden.requires_grad)
                return original(hidden, *rest)

            class Counting:
                apply = staticmethod(counting_apply)

            for module, name in ((kernels, "ChunkedLogProbFunction"), (trl_utils, "_ChunkedLogProbFunction")):
                if getattr(module, name, None) is function:
                    patched.append((module, name, function))
                    setattr(module, name, Counting)
        except ImportError:
            pass
        try:
            yield self
        finally:
            for hook in hooks:
                hook.remove()
            for module, name, function in patched:
                setattr(module, name, function)


def gemm_flops_per_s(tokens: int, inner: int, outer: int, repeats: int = 5) -> float:
    """The best FLOP/s of ``torch.mm`` on ``[tokens, inner] @ [inner, outer]`` in fp32."""
    import torch

    tokens = max(1, tokens)
    a = torch.randn(tokens, inner)
    b = torch.randn(inner, outer)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - started) / 3)
    return 2 * tokens * inner * outer / best


def utilisation(meter: FlopMeter, seconds: float) -> dict[str, Any]:
    """MFU of what ``meter`` counted over ``seconds``, against the GEMM ceiling at the tokens per
    decoder call the step used."""
    tokens = round(meter.decoder_tokens / max(1, meter.calls))
    layer = gemm_flops_per_s(tokens, meter.hidden, meter.intermediate)
    head = gemm_flops_per_s(tokens, meter.hidden, meter.vocab)
    # The ceiling for the mix of work that ran: each part at its own shape's GEMM speed.
    ceiling = meter.flops / (meter.decoder_flops / layer + meter.head_flops / head) if meter.flops else layer
    achieved = meter.flops / seconds if seconds > 0 else 0.0
    return {
        "useful_gflop": round(meter.flops / 1e9, 2),
        "achieved_gflops": round(achieved / 1e9, 2),
        "gemm_gflops": round(ceiling / 1e9, 2),
        "tokens_per_call": tokens,
        "mfu": round(achieved / ceiling, 3) if ceiling else None,
    }
