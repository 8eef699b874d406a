"""One test per private or undocumented library API in :mod:`align.compat`.

Each checks, cheaply and without a real model, that the installed version still has what align
leans on and that it behaves as align expects; a failure names the library version that moved it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import inspect
import re
from types import SimpleNamespace

import pytest
import torch

from align import compat


def changed(library: str, what: str, expects: str) -> str:
    """The failure message: ``TRL 1.17 changed <what>: align expects <expects>``."""
    distribution = {"TRL": "trl", "transformers": "transformers", "accelerate": "accelerate", "peft": "peft"}
    version = importlib.metadata.version(distribution[library])
    return f"{library} {version} changed {what}: align expects {expects} (see align/compat.py)"


def test_trl_use_triton_switch_decides_the_compact_lm_head():
    import trl.trainer.utils as trl_utils

    expects = "a module global trl.trainer.utils._use_triton(device) -> bool, False on a CPU, that its fused LM head calls"
    switch = getattr(trl_utils, "_use_triton", None)
    assert callable(switch), changed("TRL", "_use_triton", expects)
    assert list(inspect.signature(switch).parameters) == ["device"], changed("TRL", "_use_triton", expects)
    cpu = torch.device("cpu")
    assert switch(cpu) is False, changed("TRL", "_use_triton", expects)
    calls = re.findall(r"\b_use_triton\(", inspect.getsource(trl_utils))
    assert calls, changed("TRL", "_use_triton", expects)
    with compat.fused_lm_head_compact_on_cpu():
        assert trl_utils._use_triton(cpu) is True
    assert trl_utils._use_triton is switch  # put back


def test_trl_dpo_compute_ref_log_probs_takes_model_and_inputs():
    from trl import DPOTrainer

    expects = "DPOTrainer.compute_ref_log_probs(model, inputs) -> (chosen, rejected)"
    method = getattr(DPOTrainer, "compute_ref_log_probs", None)
    assert callable(method), changed("TRL", "compute_ref_log_probs", expects)
    assert list(inspect.signature(method).parameters) == ["self", "model", "inputs"], changed(
        "TRL", "compute_ref_log_probs", expects
    )
    calls = []
    trainer = SimpleNamespace(
        model="model", compute_ref_log_probs=lambda m, b: calls.append((m, b)) or (1, 2)
    )
    assert compat.dpo_reference_logps(trainer, {"x": 1}) == (1, 2)
    assert calls == [("model", {"x": 1})]


def test_trl_dpo_reads_precomputed_reference_columns():
    from datasets import Dataset
    from trl.trainer import dpo_trainer

    expects = (
        "the DPO collator passes ref_chosen_logps/ref_rejected_logps columns on and the loss reads them "
        "when trainer.precompute_ref_logps is set"
    )
    source = inspect.getsource(dpo_trainer)
    for needle in ('"ref_chosen_logps"', '"ref_rejected_logps"', "self.precompute_ref_logps"):
        assert needle in source, changed("TRL", f"the DPO trainer's {needle}", expects)
    loss_source = inspect.getsource(dpo_trainer.DPOTrainer)
    assert re.search(
        r"if self\.precompute_ref_logps:\s*\n\s*ref_chosen_logps, ref_rejected_logps = inputs\[", loss_source
    ), changed("TRL", "precompute_ref_logps", expects)
    trainer = SimpleNamespace(train_dataset=Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}]))
    compat.use_dpo_reference_logps(trainer, [-1.0, -2.0], [-3.0, -4.0])
    assert trainer.precompute_ref_logps is True
    assert trainer.train_dataset["ref_chosen_logps"] == [-1.0, -2.0]
    assert trainer.train_dataset["ref_rejected_logps"] == [-3.0, -4.0]


@pytest.mark.parametrize("trainer_name", ["DPOTrainer", "KTOTrainer"])
def test_trl_preference_trainers_copy_the_policy_as_the_ref_adapter(trainer_name):
    import trl

    expects = (
        f"{trainer_name} handed a PEFT model and no ref_model adds the adapter "
        f"'{compat.REFERENCE_ADAPTER}' (add_adapter(name, config)) and scores its reference with it"
    )
    trainer = getattr(trl, trainer_name)
    init = inspect.getsource(trainer.__init__)
    assert f'model.add_adapter("{compat.REFERENCE_ADAPTER}", ' in init, changed(
        "TRL", "the 'ref' adapter", expects
    )
    assert f'adapter_name="{compat.REFERENCE_ADAPTER}"' in inspect.getsource(trainer), changed(
        "TRL", "the 'ref' adapter", expects
    )


def test_trl_dpo_loss_types_are_the_ones_align_accepts():
    from trl.trainer import dpo_trainer

    implemented = set(re.findall(r'loss_type == "(\w+)"', inspect.getsource(dpo_trainer.DPOTrainer)))
    assert implemented == set(compat.DPO_LOSS_TYPES), changed(
        "TRL",
        "DPOTrainer's loss types",
        f"exactly {sorted(compat.DPO_LOSS_TYPES)} (it has {sorted(implemented)}; update DPO_LOSS_TYPES)",
    )


def test_trl_kto_loss_types_are_the_ones_align_accepts():
    from trl import KTOConfig

    field = {f.name: f for f in dataclasses.fields(KTOConfig)}["loss_type"]
    choices = field.metadata.get("choices")
    assert choices is not None and set(choices) == set(compat.KTO_LOSS_TYPES), changed(
        "TRL",
        "KTOConfig.loss_type's choices",
        f"exactly {sorted(compat.KTO_LOSS_TYPES)} (it has {choices}; update KTO_LOSS_TYPES)",
    )


def test_accelerate_fsdp2_prepare_model_takes_accelerator_and_model():
    import accelerate.utils

    expects = "accelerate.utils.fsdp2_prepare_model(accelerator, model) -> model"
    prepare = getattr(accelerate.utils, "fsdp2_prepare_model", None)
    assert callable(prepare), changed("accelerate", "fsdp2_prepare_model", expects)
    assert list(inspect.signature(prepare).parameters) == ["accelerator", "model"], changed(
        "accelerate", "fsdp2_prepare_model", expects
    )


def test_accelerate_fsdp_auto_wrap_policy_no_wrap_wraps_nothing(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    expects = "FSDP_AUTO_WRAP_POLICY=NO_WRAP in the environment gives an FSDP plugin with no auto_wrap_policy"
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    assert FullyShardedDataParallelPlugin(fsdp_version=2).auto_wrap_policy is not None, changed(
        "accelerate", "FSDP_AUTO_WRAP_POLICY", expects
    )
    compat.disable_fsdp_auto_wrap()
    assert FullyShardedDataParallelPlugin(fsdp_version=2).auto_wrap_policy is None, changed(
        "accelerate", "FSDP_AUTO_WRAP_POLICY", expects
    )


def test_transformers_dynamic_cache_builds_from_ddp_cache_data():
    from transformers import LlamaConfig

    expects = "DynamicCache(ddp_cache_data=[(keys, values), ...], config=...) with .layers[i].keys/.values"
    config = LlamaConfig(num_hidden_layers=2, hidden_size=8, num_attention_heads=2, num_key_value_heads=2)
    keys = [torch.randn(3, 2, 4, 4) for _ in range(2)]
    values = [torch.randn(3, 2, 4, 4) for _ in range(2)]
    try:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=list(zip(keys, values)), config=config)
        rows = compat.cache_rows(cache, torch.tensor([2, 0, 2]), config)
        layers = rows.layers
    except (TypeError, AttributeError, ImportError) as exc:
        pytest.fail(changed("transformers", "DynamicCache", f"{expects} ({type(exc).__name__}: {exc})"))
    assert len(layers) == 2, changed("transformers", "DynamicCache", expects)
    for layer, k, v in zip(layers, keys, values):
        assert torch.equal(layer.keys, k[[2, 0, 2]]), changed("transformers", "DynamicCache", expects)
        assert torch.equal(layer.values, v[[2, 0, 2]]), changed("transformers", "DynamicCache", expects)
    assert torch.equal(cache.layers[0].keys, keys[0])  # the source cache is left as it was


def test_transformers_tensorboard_callback_writes_to_its_logging_dir(tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed (pip install tensorboard)")
    expects = (
        "TensorBoardCallback() whose logging_dir attribute, set before on_train_begin, is where it writes"
    )
    directory = tmp_path / "topic-sft"
    try:
        callback = compat.tensorboard_callback(str(directory))
    except TypeError as exc:
        pytest.fail(changed("transformers", "TensorBoardCallback", f"{expects} ({exc})"))
    args = SimpleNamespace(output_dir=str(tmp_path / "elsewhere"), to_json_string=lambda: "{}")
    state = SimpleNamespace(is_world_process_zero=True, is_hyper_param_search=False, global_step=1)
    callback.on_train_begin(args, state, None)
    callback.on_log(args, state, None, logs={"loss": 1.0})
    callback.on_train_end(args, state, None)
    assert any(p.name.startswith("events.out.tfevents") for p in directory.iterdir()), changed(
        "transformers", "TensorBoardCallback.logging_dir", expects
    )
    assert not (tmp_path / "elsewhere").exists(), changed(
        "transformers", "TensorBoardCallback.logging_dir", expects
    )


def test_accelerate_launch_runs_as_a_module():
    expects = f"python -m {compat.accelerate_launch_module()} runs `accelerate launch`"
    spec = importlib.util.find_spec(compat.accelerate_launch_module())
    assert spec is not None and spec.origin is not None, changed(
        "accelerate", "accelerate.commands.launch", expects
    )
    with open(spec.origin, encoding="utf-8") as handle:
        source = handle.read()
    assert re.search(r'if __name__ == "__main__":\s*\n\s*main\(\)', source), changed(
        "accelerate", "accelerate.commands.launch", expects
    )


def test_accelerate_default_config_file_is_where_launch_looks(monkeypatch, tmp_path):
    import accelerate.commands.config as accelerate_config
    from accelerate.commands.config import config_args

    expects = "accelerate.commands.config.default_config_file: the path `accelerate launch` reads with no --config_file"
    assert isinstance(getattr(accelerate_config, "default_config_file", None), str), changed(
        "accelerate", "default_config_file", expects
    )
    assert compat.accelerate_default_config_file() == accelerate_config.default_config_file
    assert config_args.default_config_file == accelerate_config.default_config_file, changed(
        "accelerate", "default_config_file", expects
    )
    monkeypatch.setattr(accelerate_config, "default_config_file", str(tmp_path / "moved.yaml"))
    assert compat.accelerate_default_config_file() == str(tmp_path / "moved.yaml")  # read at each call


def tiny_peft_model() -> object:
    from peft import LoraConfig, get_peft_model

    from align.testing import tiny_causal_lm

    model, _ = tiny_causal_lm(layers=1)
    config = LoraConfig(r=1, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.add_adapter(compat.REFERENCE_ADAPTER, config)
    return peft_model


def test_peft_names_each_adapter_s_lora_weights_after_it():
    model = tiny_peft_model()
    expects = "LoRA weights named <module>.lora_A.<adapter>.weight / lora_B, and no other weight so named"
    names = [name for name, _ in model.named_parameters()]
    default = [name for name in names if compat.is_adapter_weight(name, "default")]
    ref = [name for name in names if compat.is_adapter_weight(name, compat.REFERENCE_ADAPTER)]
    assert len(default) == len(ref) == 4, changed(
        "peft", "its LoRA weights' names", f"{expects} (got {names})"
    )
    assert {n.replace(".default.", ".ref.") for n in default} == set(ref), changed(
        "peft", "its LoRA weights' names", expects
    )
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trained == set(default), changed("peft", "its LoRA weights' names", expects)


def test_peft_lora_layers_hold_a_b_and_scaling_by_adapter_name():
    model = tiny_peft_model()
    expects = "LoraLayer modules with lora_A/lora_B module dicts and scaling/use_dora dicts keyed by adapter"
    try:
        layers = list(compat.lora_layers(model, "default"))
    except (AttributeError, KeyError, TypeError) as exc:
        pytest.fail(changed("peft", "LoraLayer", f"{expects} ({type(exc).__name__}: {exc})"))
    base = dict(model.get_base_model().named_modules())
    assert sorted(layer.base_name for layer in layers) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ], changed("peft", "LoraLayer", expects)
    for layer in layers:
        assert layer.peft_name.startswith("base_model.model."), changed("peft", "LoraLayer", expects)
        assert layer.base_name in base, changed("peft", "LoraLayer", expects)
        linear = base[layer.base_name].base_layer
        assert tuple(layer.a.shape) == (1, linear.in_features), changed("peft", "LoraLayer", expects)
        assert tuple(layer.b.shape) == (linear.out_features, 1), changed("peft", "LoraLayer", expects)
        assert layer.scaling == 4.0 and layer.dora is False, changed("peft", "LoraLayer", expects)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ACCELERATE_USE_FSDP", '"true"'),
        ("FSDP_VERSION", "str(args.fsdp_version)"),
        ("ACCELERATE_USE_DEEPSPEED", '"true"'),
        ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "str(args.zero_stage)"),
        ("ACCELERATE_DEEPSPEED_CONFIG_FILE", "str(args.deepspeed_config_file)"),
    ],
)
def test_accelerate_launch_tells_its_processes_the_sharding_through_the_environment(variable, value):
    from accelerate.utils import launch

    expects = f"`accelerate launch` sets {variable} = {value} for the processes it starts"
    source = inspect.getsource(launch)
    assert f'current_env["{variable}"] = {value}' in source, changed("accelerate", variable, expects)


def test_launch_environment_reads_as_accelerate_writes_it(monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    assert not compat.launched_with_fsdp() and not compat.launched_with_deepspeed()
    assert compat.launched_fsdp_version() == "1"
    assert compat.launched_zero_stage() is None and compat.launched_deepspeed_config_file() is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "1")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "zero.json")
    assert compat.launched_with_fsdp() and compat.launched_with_deepspeed()
    assert compat.launched_fsdp_version() == "2"
    assert compat.launched_zero_stage() == "3" and compat.launched_deepspeed_config_file() == "zero.json"


def test_trl_chunked_log_prob_kernel_scores_labels_under_the_head():
    import trl.trainer.utils as trl_utils

    expects = (
        "trl.kernels.ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size, "
        "softcapping, logit_scale, outputs) -> (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), "
        "chunk size trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE"
    )
    assert isinstance(getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", None), int), changed(
        "TRL", "_CHUNKED_LOGPROB_CHUNK_SIZE", expects
    )
    torch.manual_seed(0)
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    labels = torch.tensor([0, 3, 10, 4, 4])
    try:
        got = compat.chunked_log_probs(hidden, weight, None, labels, ("log_probs", "entropy", "is_top1"))
    except (ImportError, TypeError) as error:
        raise AssertionError(changed("TRL", "ChunkedLogProbFunction", f"{expects} ({error})")) from error
    assert len(got) == 5, changed("TRL", "ChunkedLogProbFunction", expects)
    log_probs, entropy, log_sum_sq, mean_logits, is_top1 = got
    reference = torch.log_softmax(hidden @ weight.T, dim=-1)
    torch.testing.assert_close(log_probs, reference.gather(1, labels[:, None])[:, 0])
    torch.testing.assert_close(entropy, -(reference.exp() * reference).sum(-1))
    assert log_sum_sq is None and mean_logits is None, changed("TRL", "ChunkedLogProbFunction", expects)
    assert is_top1.tolist() == (reference.argmax(-1) == labels).tolist()
    log_probs.sum().backward()
    assert hidden.grad is not None and weight.grad is not None


def test_trl_fused_output_has_the_fields_its_dpo_trainer_reads():
    expects = "trl.trainer.utils.FusedCausalLMOutput(loss, log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1, label_mask)"
    try:
        output = compat.fused_output(
            loss=1, log_probs=2, entropy=3, log_sum_sq_probs=4, mean_logits=5, is_top1=6, label_mask=7
        )
    except (ImportError, TypeError) as error:
        raise AssertionError(changed("TRL", "FusedCausalLMOutput", f"{expects} ({error})")) from error
    assert (output.log_probs, output.entropy, output.is_top1) == (2, 3, 6)
