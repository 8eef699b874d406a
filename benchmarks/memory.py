"""Computed GPU memory for align's DPO step on Llama 1B / 8B / 70B (docs/scaling.md's tables).

Nothing here is measured: it is arithmetic on the models' published shapes, with the formulas
docs/scaling.md states. Run ``python benchmarks/memory.py`` to print the tables.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Llama:
    name: str
    params: float
    hidden: int
    layers: int
    intermediate: int
    kv_heads: int
    head_dim: int
    vocab: int = 128256
    tied: bool = False

    @property
    def embedding_params(self) -> float:
        """Input embedding and LM head (bitsandbytes leaves both in 16 bits)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def linear_params(self) -> float:
        return self.params - self.embedding_params

    def adapter_params(self, rank: int = 1) -> int:
        """A rank-``rank`` LoRA on o_proj, v_proj, up_proj, down_proj: r * (in + out) each."""
        h, kv, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        per_layer = (h + h) + (h + kv) + (h + i) + (i + h)
        return rank * per_layer * self.layers


MODELS = [
    Llama("Llama-3.2-1B", 1.24e9, 2048, 16, 8192, 8, 64, tied=True),
    Llama("Llama-3.1-8B", 8.03e9, 4096, 32, 14336, 8, 128),
    Llama("Llama-3.1-70B", 70.6e9, 8192, 80, 28672, 8, 128),
]

#: Bytes per weight of a quantized linear layer: NF4 with double quantization is 4.127 bits.
BYTES = {"bf16": 2.0, "8bit": 1.0, "4bit": 4.127 / 8}


def weights(model: Llama, kind: str) -> float:
    if kind == "bf16":
        return model.params * 2
    return model.linear_params * BYTES[kind] + model.embedding_params * 2


def adapter_state(model: Llama) -> float:
    """fp32 adapter (PEFT keeps it in fp32), its gradient, Adam's two moments, and the ``ref`` copy."""
    return model.adapter_params() * (4 + 4 + 8 + 4)


def activations(model: Llama, seq: int = 1024, pairs: int = 2, checkpointing: bool = False) -> float:
    """Korthikanti et al. (2022), per layer 34*s*b*h bytes in 16 bits with the attention scores not
    stored (SDPA / flash attention); with checkpointing, each layer's input (2*s*b*h) plus one layer
    recomputed in full. Plus the logits: s*b*V in bf16 and once more in fp32 for the log-softmax.
    A DPO batch of ``pairs`` pairs is 2*pairs sequences (chosen and rejected)."""
    sbh = seq * 2 * pairs * model.hidden
    layers = (2 * sbh * model.layers + 34 * sbh) if checkpointing else 34 * sbh * model.layers
    logits = seq * 2 * pairs * model.vocab * (2 + 4)
    return layers + logits


def per_gpu(model: Llama, kind: str, strategy: str, gpus: int = 8, checkpointing: bool = True) -> float:
    w = weights(model, kind)
    state = adapter_state(model)
    act = activations(model, checkpointing=checkpointing)
    if strategy == "ddp":
        return w + state + act
    if strategy == "zero2":  # gradients and optimizer state sharded: of the adapter, i.e. nearly nothing
        return w + model.adapter_params() * 8 + model.adapter_params() * 12 / gpus + act
    # zero3 / fsdp: weights sharded, plus the largest layer gathered (twice: prefetch of the next)
    layer = (model.linear_params / model.layers) * (2 if kind == "bf16" else BYTES[kind])
    return w / gpus + 2 * layer + state / gpus + act


def main() -> None:
    print("| model | params | rank-1 adapter | adapter + grads + Adam + ref (fp32) |")
    print("| --- | --- | --- | --- |")
    for m in MODELS:
        print(
            f"| {m.name} | {m.params / 1e9:.2f}e9 | {m.adapter_params():,} params | {adapter_state(m) / 1e6:.1f} MB |"
        )
    print()
    print(
        "| model | weights bf16 | 8-bit | 4-bit (NF4) | activations, no checkpointing | with checkpointing |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for m in MODELS:
        print(
            f"| {m.name} | {weights(m, 'bf16') / GB:.1f} GB | {weights(m, '8bit') / GB:.1f} GB | "
            f"{weights(m, '4bit') / GB:.1f} GB | {activations(m) / GB:.1f} GB | "
            f"{activations(m, checkpointing=True) / GB:.1f} GB |"
        )
    print()
    print("| model, weights | DDP | ZeRO-2 | FSDP (ZeRO-3 alike) | seed's design under DDP |")
    print("| --- | --- | --- | --- | --- |")
    for m in MODELS:
        for kind in ("bf16", "4bit"):
            # align refuses quantized weights under FSDP (bitsandbytes' packed weights are not sharded).
            sharded = f"{per_gpu(m, kind, 'zero3') / GB:.1f} GB" if kind == "bf16" else "refused"
            print(
                f"| {m.name}, {kind} | {per_gpu(m, kind, 'ddp') / GB:.1f} GB | {per_gpu(m, kind, 'zero2') / GB:.1f} GB | "
                f"{sharded} | {(per_gpu(m, kind, 'ddp') + weights(m, kind)) / GB:.1f} GB |"
            )


if __name__ == "__main__":
    main()
