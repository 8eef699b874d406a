"""Score and generate with the tiny model, sharded by FSDP when launched on several processes.

    python scoring.py MODEL_DIR                      # one process: the reference
    torchrun --nproc_per_node 2 scoring.py MODEL_DIR # FSDP (with the accelerate settings and
                                                     # this folder on PYTHONPATH, see the test)

Prints, on the main process, one JSON line: the generations and log-likelihoods of prompt sets
that split unevenly over two processes (three prompts, one prompt), with batches of one so that
the processes make different numbers of forward passes.
"""

import json
import sys


def main(model_dir: str) -> None:
    import torch

    from align.core import distributed
    from align.hf.language_model import HFLanguageModel
    from align.hf.loading import attach_adapter, load_model
    from align.hf.training import shard_model

    distributed.setup()
    torch.manual_seed(0)
    model, tokenizer = load_model(model_dir)
    model = attach_adapter(model, rank=1, alpha=1.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # an adapter that changes the answers (its B starts at zero)
                param.normal_(0.0, 0.3)
        # Only letters and the end of sequence can win (the other bytes' rows of the LM head are
        # zeroed): the answers are "", "" and "wwwww", two ended at once and one after 5 tokens.
        head = model.get_output_embeddings().weight
        keep = torch.zeros(head.shape[0], dtype=torch.bool)
        for letter in "abcdefghijklmnopqrstuvwxyz":
            keep[tokenizer(letter, add_special_tokens=False)["input_ids"]] = True
        keep[tokenizer.eos_token_id] = True
        head[~keep] = 0.0
        head[tokenizer.eos_token_id] *= 2.5
    if distributed.lockstep():
        model = shard_model(model)
    scorer = HFLanguageModel(model, tokenizer, batch_size=1)
    prompts = ["Where is the lamp?", "What does Ilse write in the blue notebook?", "Tide?"]
    completions = ["By the window.", "The weather."]
    result = {
        "generate3": scorer.generate(prompts, max_new_tokens=6),
        "generate1": scorer.generate(prompts[:1], max_new_tokens=6),
        "score3": scorer.loglikelihood(
            [p for p in prompts for _ in completions], [c for _ in prompts for c in completions]
        ),
        "score1": scorer.loglikelihood(prompts[:1], completions[:1]),
    }
    if distributed.is_main():
        print(json.dumps(result))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
