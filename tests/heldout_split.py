"""The held-out comparison (`hfgen.evaluation.policy.compare_to_reference`) of two tiny random Llamas on 6 prompts x
2 samples, its prompts split over the processes as asked: every prompt's answers must be those of one process, in
any chunking (tests/evaluation/test_text.py). Run as a script under `accelerate launch` for the split over
processes:

    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml tests/heldout_split.py TOP_P OUT.json
"""

import json
import sys

import torch


def heldout_answers(accelerator, top_p: float, chunk_size: int = 64) -> list[list[str]]:
    """[prompt, SFT's answer, the policy's answer] per sampled row, in the order of the whole list."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hfgen.evaluation.policy import Sampling, compare_to_reference
    from hfgen.models import build_embedded_tokenizer

    tokenizer = build_embedded_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(LlamaForCausalLM(config).eval())
    prompts = [f"describe the {colour} {thing}." for colour in ("red", "blue", "green") for thing in ("cat", "hill")]
    sampling = Sampling(samples_per_prompt=2, response_length=8, temperature=1.0, top_p=top_p, chunk_size=chunk_size)
    _, rows = compare_to_reference(accelerator, models[1], models[0], tokenizer, prompts, sampling)
    return [[row["prompt"], row["sft/response"], row["policy/response"]] for row in rows]


if __name__ == "__main__":
    from accelerate import Accelerator

    top_p, out = float(sys.argv[1]), sys.argv[2]
    accelerator = Accelerator()  # (a PartialState() would not read ACCELERATE_USE_CPU: one process each)
    answers = heldout_answers(accelerator, top_p)
    assert accelerator.num_processes > 1, "run under accelerate launch on several processes"
    if accelerator.is_main_process:
        with open(out, "w", encoding="utf-8") as file:
            json.dump(answers, file)
