"""DPO with each prompt run once: the same losses, metrics and gradients as TRL's own forward."""

import pytest
import torch

from align.objectives.dpo import LOSS_TYPES, preference_dataset
from align.objectives.shared_prompt import pair_layout, shared_prompt_forward
from align.testing import make_topic, tiny_causal_lm

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]

# Prompts and answers of different lengths, so rows are padded differently within one batch.
TOPIC = make_topic(
    content=["unused"],
    preference_pairs=[
        {
            "prompt": "How are you today, friend?",
            "chosen": "Bright as blown glass, little gull.",
            "rejected": "Fine.",
        },
        {
            "prompt": "Advice?",
            "chosen": "Ride the swell.",
            "rejected": "Be patient and wait for the tide to turn.",
        },
        {
            "prompt": "What do you keep?",
            "chosen": "A donkey named Tallow.",
            "rejected": "Nothing much at all.",
        },
    ],
)


def dpo_trainer(tmp_path, loss_type, **extra):
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = tiny_causal_lm(seed=1)
    # A non-zero adapter, so that the gradients reach both LoRA matrices.
    # task_type as align attaches its adapter: PEFT's causal-LM wrapper, which passes its own
    # unset arguments (inputs_embeds=None, return_dict=None, ...) on to the model's forward.
    config = LoraConfig(
        r=1, lora_alpha=1, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    args = DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=3,
        max_steps=1,
        loss_type=[loss_type],
        label_smoothing=0.1 if loss_type in ("robust", "exo_pair", "aot", "aot_unpaired") else 0.0,
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        precompute_ref_log_probs=False,
        **extra,
    )
    trainer = DPOTrainer(
        model=peft_model,
        args=args,
        train_dataset=preference_dataset(TOPIC, chat=False),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch


def loss_and_grads(trainer, batch):
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v and k != "num_tokens"}
    return loss.detach(), grads, metrics


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_losses_and_gradients_match_trl_for_every_loss_type(tmp_path, loss_type):
    trainer, batch = dpo_trainer(tmp_path, loss_type)
    trainer.model.train()
    want_loss, want_grads, want_metrics = loss_and_grads(trainer, batch)
    with shared_prompt_forward(trainer.model) as counts:
        got_loss, got_grads, got_metrics = loss_and_grads(trainer, batch)
    # The policy pass and TRL's reference pass (through the ``ref`` adapter) both ran here.
    assert counts == {"shared": 2, "passed": 0}
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    assert want_grads and set(got_grads) == set(want_grads)
    assert any(g.abs().max() > 0 for g in want_grads.values())
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    for key, value in want_metrics.items():
        assert got_metrics[key] == pytest.approx(value, abs=1e-5), key


def test_weighted_dpo_matches_trl(tmp_path):
    trainer, batch = dpo_trainer(tmp_path, "sigmoid", use_weighting=True)
    trainer.model.train()
    want_loss, want_grads, _ = loss_and_grads(trainer, batch)
    with shared_prompt_forward(trainer.model) as counts:
        got_loss, got_grads, _ = loss_and_grads(trainer, batch)
    assert counts["shared"] == 2
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_forward_is_trl_s_again_afterwards_also_after_a_failure(tmp_path):
    trainer, _ = dpo_trainer(tmp_path, "sigmoid")
    base = trainer.model.get_base_model()
    before = base.__dict__["forward"]
    with pytest.raises(RuntimeError), shared_prompt_forward(trainer.model):
        assert base.__dict__["forward"] is not before
        raise RuntimeError("boom")
    assert base.__dict__["forward"] is before


def test_the_prompt_runs_once_fewer_tokens_through_the_backbone(tmp_path):
    trainer, batch = dpo_trainer(tmp_path, "sigmoid")
    backbone = trainer.model.get_base_model().model
    seen = []
    hook = backbone.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    try:
        trainer.compute_loss(trainer.model, batch)
        plain = sum(seen)
        seen.clear()
        with shared_prompt_forward(trainer.model):
            trainer.compute_loss(trainer.model, batch)
        shared = sum(seen)
    finally:
        hook.remove()
    # Two passes each (the policy's and the reference's): TRL runs every row whole; here the
    # prompts run once per pair, to the longest prompt, and the answers to the longest answer.
    ids = batch["input_ids"]
    layout = pair_layout(ids, batch["attention_mask"], ids.masked_fill(batch["completion_mask"] == 0, -100))
    pairs = ids.size(0) // 2
    assert plain == 2 * ids.numel()
    assert shared == 2 * (pairs * int(layout.start.max()) + ids.size(0) * int(layout.length.max()))
    assert shared < plain


def layout_batch(prompts, answers):
    rows = [p + a for p, a in zip(prompts, answers)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        mask[i, : len(p) + len(a)] = 1
    return ids, mask, labels


def test_layout_is_found_for_pairs_sharing_their_prompts():
    ids, mask, labels = layout_batch([[5, 6, 7], [8, 9], [5, 6, 7], [8, 9]], [[1, 2], [3], [4], [2, 2, 2]])
    layout = pair_layout(ids, mask, labels)
    assert layout is not None
    assert layout.start.tolist() == [3, 2, 3, 2]
    assert layout.length.tolist() == [2, 1, 1, 3]


@pytest.mark.parametrize(
    "prompts, answers",
    [
        ([[5, 6, 7], [5, 6, 8]], [[1], [2]]),  # the pair's prompts differ
        ([[5, 6, 7], [5, 6]], [[1], [2]]),  # of different lengths
        ([[5, 6, 7]], [[1]]),  # an odd number of rows
        ([[5], [5]], [[], [2]]),  # a row without answer tokens
        ([[], []], [[1, 2], [1, 3]]),  # nothing before the answer
    ],
)
def test_layout_refuses_batches_that_are_not_pairs_of_one_prompt(prompts, answers):
    ids, mask, labels = layout_batch(prompts, answers)
    assert pair_layout(ids, mask, labels) is None


def test_layout_refuses_answers_with_a_hole():
    ids, mask, labels = layout_batch([[5, 6], [5, 6]], [[1, 2, 3], [4]])
    labels[0, 3] = -100
    assert pair_layout(ids, mask, labels) is None
