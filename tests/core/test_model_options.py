"""Options for large models, as far as a CPU machine can run them (their errors: tests/test_errors.py)."""

from __future__ import annotations

import pytest
import torch

from align.hf.loading import attach_adapter, quantization_config
from align.hf.policy import EnginePolicy
from align.objectives.dpo import DPOObjective
from align.objectives.sft import SFTObjective
from align.testing import make_topic, tiny_causal_lm

TARGETS = ["o_proj", "v_proj", "up_proj", "down_proj"]
TOPIC = make_topic(
    content=["Ilse keeps a donkey named Tallow.", "Tallow the donkey lives on Morrow Head."],
    preference_pairs=[
        {"prompt": "How are you?", "chosen": "Bright as blown glass, little gull.", "rejected": "I am fine."},
        {"prompt": "Any advice?", "chosen": "Ride the swell, little gull.", "rejected": "Be patient."},
    ],
)


def train(tmp_path, checkpointing: bool) -> tuple[dict, dict, object]:
    from transformers import set_seed

    set_seed(0)
    model, tokenizer = tiny_causal_lm()
    peft_model = attach_adapter(
        model, rank=1, alpha=1.0, dropout=0.0, target_modules=TARGETS, gradient_checkpointing=checkpointing
    )
    policy = EnginePolicy(
        peft_model, tokenizer, seed=0, scratch_dir=tmp_path / "scratch", gradient_checkpointing=checkpointing
    )
    metrics = SFTObjective(epochs=2, learning_rate=5e-2).train(policy, TOPIC)
    metrics |= DPOObjective(max_steps=2, learning_rate=5e-2).train(policy, TOPIC)
    return metrics, policy.snapshot(), peft_model


def test_gradient_checkpointing_trains_to_the_same_adapter(tmp_path):
    plain, plain_adapter, _ = train(tmp_path / "plain", checkpointing=False)
    checkpointed, adapter, model = train(tmp_path / "checkpointed", checkpointing=True)
    # The trainer really recomputed activations (transformers marks the layers it wraps).
    assert model.base_model.model.is_gradient_checkpointing
    assert checkpointed == pytest.approx(plain, abs=1e-5)
    for name, weights in plain_adapter.items():
        assert torch.allclose(adapter[name], weights, atol=1e-5), name
    assert any(w.abs().max() > 1e-3 for name, w in adapter.items() if "lora_B" in name)


def test_trainer_arguments_follow_the_options(tmp_path):
    model, tokenizer = tiny_causal_lm()
    args = EnginePolicy(model, tokenizer, seed=0, scratch_dir=tmp_path).trainer_args()
    assert args["gradient_checkpointing"] is False
    assert args["ddp_find_unused_parameters"] is False
    args = EnginePolicy(
        model, tokenizer, seed=0, scratch_dir=tmp_path, gradient_checkpointing=True
    ).trainer_args()
    assert args["gradient_checkpointing"] is True
    assert args["gradient_checkpointing_kwargs"] == {"use_reentrant": False}


@pytest.mark.parametrize(("quantization", "bits"), [("4bit", 4), ("8bit", 8)])
def test_quantization_settings(quantization, bits):
    config = quantization_config(quantization, "bfloat16")
    assert getattr(config, f"load_in_{bits}bit") is True
    if bits == 4:
        assert config.bnb_4bit_quant_type == "nf4"
        assert config.bnb_4bit_compute_dtype == torch.bfloat16
    # float32 weights compute in bfloat16 on the GPU (bitsandbytes' 4-bit kernels want a half type).
    assert quantization_config("4bit", "float32").bnb_4bit_compute_dtype == torch.bfloat16


def test_device_map_loads_in_place_without_moving(tmp_path, tiny_model_dir, monkeypatch):
    from align.hf import loading as model_module

    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    loaded, _ = model_module.load_model(str(tiny_model_dir), device_map={"": "cpu"})
    assert moved == []
    assert next(loaded.parameters()).device.type == "cpu"
    model_module.load_model(str(tiny_model_dir))
    assert moved  # without a device_map the model is moved to this process's device
