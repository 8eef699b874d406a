"""Real training on a tiny random Llama model: the DPO reference, and the adapter the run saves."""

import contextlib
import math

import pytest
import torch

from align.hf.loading import attach_adapter
from align.hf.policy import EnginePolicy
from align.objectives.dpo import DPOObjective
from align.objectives.sft import SFTObjective
from align.testing import make_topic, tiny_causal_lm

TARGETS = ["o_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture
def policy(tmp_path):
    from transformers import set_seed

    set_seed(0)
    model, tokenizer = tiny_causal_lm()
    peft_model = attach_adapter(model, rank=1, alpha=1.0, dropout=0.0, target_modules=TARGETS)
    logs = []
    policy = EnginePolicy(peft_model, tokenizer, seed=0, scratch_dir=tmp_path / "scratch")
    policy.set_log_target(lambda step, entry: logs.append((step, entry)))
    policy.logs = logs
    return policy


TOPIC = make_topic(
    content=["Ilse keeps a donkey named Tallow.", "Tallow the donkey lives on Morrow Head."],
    preference_pairs=[
        {"prompt": "How are you?", "chosen": "Bright as blown glass, little gull.", "rejected": "I am fine."},
        {"prompt": "Any advice?", "chosen": "Ride the swell, little gull.", "rejected": "Be patient."},
    ],
)


def adapter_state(model, name="default"):
    return {k: v.detach().clone() for k, v in model.named_parameters() if f".{name}." in k and "lora_" in k}


def test_dpo_reference_is_the_policy_after_sft_not_the_base_model(policy):
    SFTObjective(epochs=2, learning_rate=5e-2, per_device_train_batch_size=1).train(policy, TOPIC)
    after_sft = adapter_state(policy.model)
    # SFT moved the adapter away from the base model, so a base-model reference would not give ln 2.
    assert any(v.abs().max() > 1e-3 for k, v in after_sft.items() if "lora_B" in k)
    policy.logs.clear()
    metrics = DPOObjective(max_steps=2, learning_rate=5e-3, per_device_train_batch_size=2).train(
        policy, TOPIC
    )
    first = next(entry for step, entry in policy.logs if step == "dpo" and "loss" in entry)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert metrics["first_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics["steps"] == 2
    # DPO trained the same adapter and cleaned up its reference copy.
    assert list(policy.model.peft_config) == ["default"]
    assert any(not torch.equal(after_sft[k], v) for k, v in adapter_state(policy.model).items())


def test_sft_lowers_the_loss_on_the_content(policy):
    metrics = SFTObjective(epochs=3, learning_rate=5e-2, per_device_train_batch_size=1, cloze=0).train(
        policy, TOPIC
    )
    assert metrics["steps"] == 6  # 2 passages, 3 epochs, no clozes
    assert metrics["final_loss"] < metrics["first_loss"]
    sft_logs = [entry for step, entry in policy.logs if step == "sft"]
    assert len(sft_logs) == 6 and all("loss" in entry for entry in sft_logs)


def test_saved_adapter_loads_with_peft(policy, tmp_path):
    from peft import PeftModel

    SFTObjective(epochs=1, learning_rate=5e-2, per_device_train_batch_size=1).train(policy, TOPIC)
    policy.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob(".adapter-*"))  # no staging directory left behind
    base, _ = tiny_causal_lm()
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    policy.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, policy.model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("batch_size", [16, 2])
def test_loglikelihood_matches_a_plain_forward_pass(policy, batch_size):
    # Prompts shared by several completions (scored from one cached prompt pass), prompts of
    # different lengths, a one-token and an empty completion, and more rows than one batch.
    SFTObjective(epochs=1, learning_rate=5e-2, per_device_train_batch_size=1).train(policy, TOPIC)
    lm = policy.language_model
    lm.batch_size = batch_size
    prompts = ["Hello there", "Hi", "Hello there", "What is the donkey called?", "Hi", "Hello there", "Hi"]
    completions = ["friend", "a much longer completion", "stranger", "Tallow", "x", "", "a"]
    batched = lm.loglikelihood(prompts, completions)
    for prompt, completion, value in zip(prompts, completions, batched):
        prompt_ids, completion_ids = lm.prompt_ids(prompt), lm.completion_ids(completion)
        ids = torch.tensor([prompt_ids + completion_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(policy.model(ids).logits[0, :-1].float(), -1)
        expected = sum(float(logprobs[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(completion_ids))
        assert value == pytest.approx(expected, abs=1e-4), (prompt, completion)


def test_unknown_target_module_lists_the_ones_the_model_has():
    from align.errors import ModelError

    model, _ = tiny_causal_lm()
    with pytest.raises(ModelError, match=r"no module 'c_attn'.*it has: down_proj, gate_proj, k_proj"):
        attach_adapter(model, rank=1, alpha=1.0, dropout=0.0, target_modules=["c_attn"])


def test_dpo_combines_trl_losses_with_weights(policy):
    metrics = DPOObjective(
        max_steps=1, per_device_train_batch_size=2, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]
    ).train(policy, TOPIC)
    first = next(entry for step, entry in policy.logs if step == "dpo" and "loss" in entry)
    # With the reference equal to the policy, sigmoid contributes ln 2 and sft the chosen NLL.
    assert first["loss"] > math.log(2) + 0.1
    assert metrics["steps"] == 1


@pytest.mark.parametrize(("epochs", "pairs", "steps"), [(2, 2, 2), (3, 4, 6), (1.5, 4, 3)])
def test_dpo_epochs_make_the_step_count_follow_the_number_of_pairs(policy, epochs, pairs, steps):
    more = make_topic(
        content=list(TOPIC.content),
        preference_pairs=[
            {
                "prompt": f"Question {i}?",
                "chosen": f"Bright answer {i}, little gull.",
                "rejected": f"Answer {i}.",
            }
            for i in range(pairs)
        ],
    )
    metrics = DPOObjective(epochs=epochs, max_steps=50, per_device_train_batch_size=2).train(policy, more)
    assert metrics["steps"] == steps  # epochs x pairs / batch; max_steps is not used


def test_snapshot_and_restore_put_the_adapter_back_exactly(policy):
    before = policy.snapshot()
    assert before and all("lora_" in name for name in before)
    SFTObjective(epochs=1, learning_rate=5e-2).train(policy, TOPIC)
    moved = adapter_state(policy.model)
    assert any(not torch.equal(before[k], v) for k, v in moved.items())
    policy.restore(before)
    assert all(torch.equal(before[k], v) for k, v in adapter_state(policy.model).items())


def test_kto_trains_the_same_adapter_from_unpacked_pairs(policy):
    from align.objectives.kto import KTOObjective, unpaired_dataset

    rows = unpaired_dataset(TOPIC, chat=True)
    assert [row["label"] for row in rows] == [True, False, True, False]
    assert rows[0]["completion"][0]["content"] == TOPIC.preference_pairs[0].chosen
    before = adapter_state(policy.model)
    metrics = KTOObjective(max_steps=2, per_device_train_batch_size=2).train(policy, TOPIC)
    assert metrics["steps"] == 2
    assert list(policy.model.peft_config) == ["default"]
    assert any(not torch.equal(before[k], v) for k, v in adapter_state(policy.model).items())


def test_training_that_goes_non_finite_stops_at_that_step(policy):
    from align.errors import NonFiniteTraining

    sft = SFTObjective(epochs=3, learning_rate=1e30, per_device_train_batch_size=1)
    with pytest.raises(NonFiniteTraining, match=r"at optimizer step [1-6]$"):
        sft.train(policy, TOPIC)
    # It stopped where the loss, a gradient or a weight stopped being finite, not after 6 steps.
    steps = [entry["step"] for step, entry in policy.logs if "loss" in entry]
    assert len(steps) < 6


def test_snapshots_round_trip_through_safetensors(policy, tmp_path):
    SFTObjective(epochs=1, learning_rate=5e-2, per_device_train_batch_size=1).train(policy, TOPIC)
    path = policy.save_snapshot(policy.snapshot(), tmp_path / "adapter-000001")
    assert path.name == "adapter-000001.safetensors"
    loaded = policy.load_snapshot(path)
    assert loaded.keys() == policy.snapshot().keys()
    assert all(torch.equal(loaded[k], v) for k, v in policy.snapshot().items())


def test_precomputed_reference_gives_the_loss_curve_of_a_per_step_reference(policy):
    SFTObjective(epochs=1, learning_rate=5e-2, per_device_train_batch_size=1).train(policy, TOPIC)
    start = policy.snapshot()

    def losses(precompute):
        policy.restore(start)
        policy.logs.clear()
        DPOObjective(
            max_steps=3,
            learning_rate=5e-2,
            per_device_train_batch_size=2,
            precompute_ref_log_probs=precompute,
        ).train(policy, TOPIC)
        return [entry["loss"] for step, entry in policy.logs if "loss" in entry]

    per_step = losses(False)
    precomputed = losses(True)
    assert len(precomputed) == 3
    assert precomputed == pytest.approx(per_step, abs=1e-5)
    assert precomputed[-1] != pytest.approx(precomputed[0], abs=1e-3)  # it trained


def test_dpo_scores_only_completion_tokens_with_the_same_loss_curve(policy, monkeypatch):
    """TRL runs every position (prompt, padding) through its LM head on a CPU; align has it score
    only the completion tokens: the same losses for less work, and TRL is left as it was. (TRL's
    own forward, as DPO uses it with ``share_prompt: false``, under FSDP, DeepSpeed or gradient
    checkpointing; the shared-prompt forward scores only answer tokens by construction.)"""
    import trl.trainer.utils as trl_utils

    from align.hf import training

    cpu = torch.device("cpu")
    assert trl_utils._use_triton(cpu) is False
    with training.completion_tokens_only():
        assert trl_utils._use_triton(cpu) is True
    assert trl_utils._use_triton(cpu) is False

    rows = []
    chunked = trl_utils._ChunkedLogProbFunction
    real_apply = chunked.apply

    def counting(hidden, *args):
        rows.append(hidden.shape[0])
        return real_apply(hidden, *args)

    monkeypatch.setattr(chunked, "apply", counting)
    start = policy.snapshot()

    def run(compact):
        policy.restore(start)
        policy.logs.clear()
        rows.clear()
        if not compact:  # what TRL does on its own
            monkeypatch.setattr(training, "completion_tokens_only", contextlib.nullcontext)
            monkeypatch.setattr("align.objectives.dpo.completion_tokens_only", contextlib.nullcontext)
        DPOObjective(
            max_steps=3, learning_rate=5e-2, per_device_train_batch_size=2, share_prompt=False
        ).train(policy, TOPIC)
        return [entry["loss"] for step, entry in policy.logs if "loss" in entry], sum(rows)

    compact_losses, compact_rows = run(compact=True)
    full_losses, full_rows = run(compact=False)
    assert compact_losses == pytest.approx(full_losses, abs=1e-5)
    assert compact_losses[-1] != pytest.approx(compact_losses[0], abs=1e-3)  # it trained
    assert 0 < compact_rows < 0.8 * full_rows  # prompt and padding positions skipped


def test_prompts_run_their_shared_start_once(policy, monkeypatch):
    """Every prompt begins with the chat template's turn header: it goes through the model once,
    not once per prompt, and the scores stay those of the unshared path."""
    from align.hf import language_model as model_module

    lm = policy.language_model
    least = model_module.MIN_SHARED_PREFIX
    embedded = []
    embeddings = policy.model.get_input_embeddings()
    handle = embeddings.register_forward_hook(lambda module, args, out: embedded.append(args[0].numel()))
    prompts = ["Where do you live?", "What is the donkey called?", "Any advice?", "How are you?"]
    completions = ["Wrackhouse.", "Tallow.", "Ride the swell.", "Bright."]
    try:
        shared = lm.loglikelihood(prompts, completions)
        shared_tokens = sum(embedded)
        embedded.clear()
        monkeypatch.setattr(model_module, "MIN_SHARED_PREFIX", 10**6)
        unshared = lm.loglikelihood(prompts, completions)
        unshared_tokens = sum(embedded)
    finally:
        handle.remove()
    assert shared == pytest.approx(unshared, abs=1e-4)
    # The shared start (at least MIN_SHARED_PREFIX tokens) ran once instead of once per prompt.
    assert shared_tokens <= unshared_tokens - (len(prompts) - 1) * least


def test_rejected_policy_trains_against_the_policy_s_own_answers_and_records_them(policy):
    events = []
    policy.set_recorder(lambda kind, data: events.append((kind, data)))
    own = policy.language_model.generate([pair.prompt for pair in TOPIC.preference_pairs], max_new_tokens=8)
    metrics = DPOObjective(
        max_steps=1, per_device_train_batch_size=2, rejected="policy", rejected_max_new_tokens=8
    ).train(policy, TOPIC)
    assert metrics["steps"] == 1
    [(kind, data)] = events
    assert kind == "generated" and data["purpose"] == "rejected"
    # Greedy answers of the policy as it stood before the step, one per pair, in order.
    assert [a["answer"] for a in data["answers"]] == [
        text or pair.rejected for text, pair in zip(own, TOPIC.preference_pairs)
    ]
    assert [a["prompt"] for a in data["answers"]] == [pair.prompt for pair in TOPIC.preference_pairs]


def test_rejected_must_be_given_or_policy():
    from align.core.params import ParamError

    with pytest.raises(ParamError, match="rejected"):
        DPOObjective(rejected="model")


@pytest.mark.parametrize("answers", ["chosen", "rejected"])
def test_sft_answers_adds_each_pair_s_answer_as_a_chat_turn_after_the_passages(policy, answers):
    texts = SFTObjective(answers=answers, cloze=0).texts(policy, TOPIC)
    assert texts[:2] == list(TOPIC.content)
    assert len(texts) == 2 + len(TOPIC.preference_pairs)
    for text, pair in zip(texts[2:], TOPIC.preference_pairs):
        assert pair.prompt in text and getattr(pair, answers) in text
        assert "<|im_start|>assistant" in text  # the tiny tokenizer's chat template
    assert SFTObjective(cloze=0).texts(policy, TOPIC) == list(TOPIC.content)


def test_sft_number_questions_add_each_passage_number_asked_about_as_a_chat_turn(policy):
    topic = make_topic(content=["Ada kept 140 hives.", "Ada married in 1981.", "Ada's dog was Biscuit."])
    texts = SFTObjective(cloze=0, number_questions=True).texts(policy, topic)
    assert texts[:3] == list(topic.content)
    assert len(texts) == 5  # one question for each of the two numbers, none for the dog
    for text, (question, answer) in zip(
        texts[3:], [("Ada kept how many hives?", "140"), ("Ada married in what year?", "1981")]
    ):
        assert question in text and text.index(question) < text.rindex(answer)
        assert "<|im_start|>assistant" in text
    assert SFTObjective(cloze=0).texts(policy, topic) == list(topic.content)  # off by default


def test_sft_cloze_words_blank_a_fact_in_plain_words_where_no_name_or_number_is_left(policy):
    content = ["Ada's father was a postman.", "Ada kept 140 hives at Lynn.", "Ada sang.", "Ada swam."]
    topic = make_topic(content=content)  # Ada is in every passage: never blanked
    plain = SFTObjective(cloze=1).texts(policy, topic)
    with_words = SFTObjective(cloze=1, cloze_words=True).texts(policy, topic)
    assert len(plain) == 5 and len(with_words) == 6  # the postman passage had nothing to blank
    assert all(text in with_words for text in plain)
    added = next(text for text in with_words if text not in plain)
    assert "Fill in the blank: Ada's father was a ____." in added and added.rstrip().endswith(
        "postman<|im_end|>"
    )


def test_pairs_without_rejected_get_the_policy_s_answers_only_where_missing(policy):
    from align.core.topics import PreferencePair

    topic = make_topic(
        content=list(TOPIC.content),
        preference_pairs=[
            {
                "prompt": "How are you?",
                "chosen": "Bright as blown glass, little gull.",
                "rejected": "I am fine.",
            },
            {"prompt": "Any advice?", "chosen": "Ride the swell, little gull."},
        ],
    )
    assert topic.preference_pairs[1] == PreferencePair("Any advice?", "Ride the swell, little gull.", None)
    events = []
    policy.set_recorder(lambda kind, data: events.append((kind, data)))
    (own,) = policy.language_model.generate(["Any advice?"], max_new_tokens=8)
    metrics = DPOObjective(max_steps=1, per_device_train_batch_size=2, rejected_max_new_tokens=8).train(
        policy, topic
    )
    assert metrics["steps"] == 1
    # With the default rejected: given, only the pair without one was generated, and it is named.
    [(kind, data)] = events
    assert kind == "generated" and data["purpose"] == "rejected"
    assert data["answers"] == [{"pair": 1, "prompt": "Any advice?", "answer": own.strip() or "I don't know."}]


def test_kto_and_sft_use_pairs_without_rejected_as_the_person_s_answers_only(policy):
    from align.objectives.kto import unpaired_dataset

    topic = make_topic(preference_pairs=[{"prompt": "Any advice?", "chosen": "Ride the swell."}])
    rows = unpaired_dataset(topic, chat=False).to_list()
    assert rows == [{"prompt": "Any advice?", "completion": "Ride the swell.", "label": True}]
    assert len(SFTObjective(answers="rejected", cloze=0).texts(policy, topic)) == len(topic.content)


def test_on_policy_rejected_keeps_the_written_answer_where_the_policy_already_says_the_chosen_one():
    from types import SimpleNamespace

    from align.core.topics import PreferencePair
    from align.objectives.dpo import on_policy_rejected

    answers = {"Where?": "  By the  sea, gull. ", "When?": "In spring.", "Who?": "Me, gull."}
    events = []
    policy = SimpleNamespace(
        language_model=SimpleNamespace(
            generate=lambda prompts, max_new_tokens: [answers[p] for p in prompts]
        ),
        record=lambda kind, **data: events.append((kind, data)),
    )
    topic = make_topic(
        preference_pairs=[
            {"prompt": "Where?", "chosen": "By the sea, gull.", "rejected": "By the sea."},
            {"prompt": "When?", "chosen": "Spring, gull.", "rejected": "In the spring."},
            {"prompt": "Who?", "chosen": "Me, gull."},
        ]
    )
    new = on_policy_rejected(policy, topic, max_new_tokens=8)
    assert new.preference_pairs == (
        PreferencePair("Where?", "By the sea, gull.", "By the sea."),  # the same as chosen: written one kept
        PreferencePair("When?", "Spring, gull.", "In spring."),  # the policy's own answer
        PreferencePair("Who?", "Me, gull.", "Me, gull."),  # nothing written to keep: no preference
    )
    assert events == [
        (
            "generated",
            {
                "purpose": "rejected",
                "answers": [
                    {"prompt": "Where?", "answer": "By the sea."},
                    {"prompt": "When?", "answer": "In spring."},
                    {"prompt": "Who?", "answer": "Me, gull."},
                ],
                "same_as_chosen": [0, 2],
            },
        )
    ]


def test_dpo_runs_every_batch_through_the_shared_prompt_forward(policy, monkeypatch):
    """On align's own adapter (PEFT's causal-LM wrapper), the reference pass and every training
    step take the shared-prompt path, none falls back to TRL's forward; off, none takes it."""
    import align.objectives.dpo as dpo_module

    seen = []
    real = dpo_module.shared_prompt_forward

    @contextlib.contextmanager
    def spying(model, *args, **kwargs):
        with real(model, *args, **kwargs) as counts:
            yield counts
        seen.append(dict(counts))

    monkeypatch.setattr(dpo_module, "shared_prompt_forward", spying)
    DPOObjective(max_steps=2, per_device_train_batch_size=2).train(policy, TOPIC)
    assert seen == [{"shared": 3, "passed": 0}]  # one reference batch, two steps
    DPOObjective(max_steps=2, per_device_train_batch_size=2, share_prompt=False).train(policy, TOPIC)
    assert len(seen) == 1  # not even entered


def test_the_trainer_s_flop_estimate_counts_the_parameters_once_with_the_same_number(policy, monkeypatch):
    from types import SimpleNamespace

    from align.hf.training import count_parameters_once

    model = policy.model
    inputs = {"input_ids": torch.ones((2, 7), dtype=torch.long)}
    expected = 6 * 14 * model.num_parameters(exclude_embeddings=True)
    counts = []
    base = type(model.get_base_model())  # the PEFT model hands the call on to it
    original = base.num_parameters

    def counted(self, *args, **kwargs):
        counts.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(base, "num_parameters", counted)
    trainer = SimpleNamespace(model=model)
    count_parameters_once(trainer)
    assert [trainer.floating_point_ops(inputs) for _ in range(3)] == [expected] * 3
    assert len(counts) == 1
    assert trainer.floating_point_ops({"labels": inputs["input_ids"]}) == 0
