"""Training throughput of the `dpo` stage vs TRL's `DPOTrainer` called directly: same model, rows and `DPOConfig`,
in the same run, in alternating pairs; the median of each side's tokens/s and their ratio (goal >= 0.97).

    python scripts/bench_dpo.py [--recipe recipes/tiny/dpo.yaml] [--pairs 256] [--rounds 5]

Both sides train the recipe's starting model (outputs/tiny/sft_full for the tiny recipe) on the first `--pairs`
training pairs for one epoch, with the `DPOConfig` parsed from the recipe; TRL gets the model, tokenizer, rows and
config directly (and builds its own reference model, as its docs show), hfgen runs end to end through
`hfgen.train.run_recipe` (data checks, reference, records; its generation comparison off, its log-prob evaluation
on a few held-out pairs, outside the timed part). Each side is timed by the Trainer's own `train_runtime`; tokens
are the prompt+chosen and prompt+rejected tokens of the rows as TRL tokenizes them, the same for both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def overrides(output_dir: str, pairs: int) -> list[str]:
    return [
        "--output_dir", output_dir, "--max_train_samples", str(pairs), "--max_eval_samples", "16",
        "--eval_samples_per_prompt", "0", "--num_train_epochs", "1", "--max_steps", "-1", "--save_strategy", "no",
        "--eval_strategy", "no", "--logging_steps", "50", "--disable_tqdm", "true",
    ]  # fmt: skip


def trl_direct(recipe_path: str, tokens: list, argv: list[str]) -> float:
    """tokens/s of DPOTrainer given the recipe's model, tokenizer, rows and DPOConfig, nothing else."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from hfgen.data.loading import load_splits
    from hfgen.recipe import load_recipe

    model_args, data_args, args = load_recipe(recipe_path, argv).configs
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=model_args.dtype)
    train_rows, _ = load_splits(data_args, seed=args.seed)
    trainer = DPOTrainer(model=model, args=args, train_dataset=train_rows, processing_class=tokenizer)
    if not tokens:  # count once: prompt+chosen and prompt+rejected tokens of the rows, as TRL tokenized them
        tokens.append(sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                          for r in trainer.train_dataset))  # fmt: skip
    result = trainer.train()
    return tokens[0] / result.metrics["train_runtime"]


def hfgen_stage(recipe_path: str, tokens: list, argv: list[str]) -> float:
    from hfgen import tracking
    from hfgen.recipe import load_recipe
    from hfgen.train import run_recipe

    output_dir = run_recipe(load_recipe(recipe_path, argv))
    return tokens[0] / tracking.read_json(output_dir / "eval.json")["train_runtime_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "recipes/tiny/dpo.yaml"))
    parser.add_argument("--pairs", type=int, default=256, help="training pairs (one epoch)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating pairs of runs (at least 5 for the median)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(REPO)

    from hfgen.recipe import load_recipe

    model_args, data_args, training_args = load_recipe(args.recipe, overrides(tempfile.mkdtemp(), args.pairs)).configs
    print(f"{args.recipe}: model {model_args.model_name_or_path}, {args.pairs} pairs of {data_args.dataset_name}, "
          f"batch {training_args.per_device_train_batch_size}, loss {training_args.loss_type}, max_length "
          f"{training_args.max_length}, torch threads {torch.get_num_threads()}")  # fmt: skip
    tokens: list[int] = []
    speeds: dict[str, list[float]] = {"TRL direct": [], "hfgen dpo": []}
    sides = {"TRL direct": trl_direct, "hfgen dpo": hfgen_stage}
    for round_index in range(args.rounds):
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))  # TRL first in round 1 (counts tokens)
        for name in order:
            with tempfile.TemporaryDirectory() as output_dir:
                speeds[name].append(sides[name](args.recipe, tokens, overrides(output_dir, args.pairs)))
            print(f"round {round_index + 1}: {name:10s} {speeds[name][-1]:9,.0f} tokens/s", flush=True)
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    print()
    for name, value in medians.items():
        print(f"{name:10s}: {value:9,.0f} tokens/s (median of {args.rounds})")
    print(f"ratio hfgen/TRL: {medians['hfgen dpo'] / medians['TRL direct']:.3f}  (goal >= 0.97)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
