"""benchmarks/flops.py counts the useful FLOPs of what ran: the numbers behind the MFU rows."""

from tests.conftest import REPO


def _flops_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("align_bench_flops", REPO / "benchmarks" / "flops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flop_meter_counts_what_ran_through_the_decoder_and_the_head():
    import torch

    from align import compat
    from align.testing import tiny_causal_lm

    flops = _flops_module()
    model, _ = tiny_causal_lm()
    meter = flops.FlopMeter(model)
    config = model.config
    layer = model.model.layers[0]
    params = sum(p.numel() for p in layer.parameters() if p.dim() == 2)
    assert meter.layer_params == params
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with meter.watch(), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # the head runs on all 8 positions
    per_token = config.num_hidden_layers * (2 * params + 4 * config.hidden_size * 4)
    assert meter.decoder_tokens == 6  # the padding is not useful work
    assert meter.decoder_flops == 6 * per_token
    assert meter.head_tokens == 8
    assert meter.head_flops == 8 * 2 * config.hidden_size * config.vocab_size
    # TRL's chunked head counts too, twice over with gradients (the backward to the hidden states).
    hidden = torch.randn(5, config.hidden_size, requires_grad=True)
    with meter.watch():
        compat.chunked_log_probs(
            hidden, model.lm_head.weight, None, torch.tensor([1, 2, 3, 4, 5]), ("log_probs",)
        )
    assert meter.head_tokens == 13
    assert meter.head_flops == (8 + 2 * 5) * 2 * config.hidden_size * config.vocab_size
    # Outside watch() nothing is counted and TRL's kernel is its own again.
    import trl.kernels

    with torch.no_grad():
        model(input_ids=ids)
    assert meter.decoder_tokens == 6
    assert trl.kernels.ChunkedLogProbFunction.__name__ == "ChunkedLogProbFunction"
    result = flops.utilisation(meter, seconds=1e-6)
    assert result["useful_gflop"] == round(meter.flops / 1e9, 2)
    assert result["gemm_gflops"] > 0 and result["mfu"] > 0
