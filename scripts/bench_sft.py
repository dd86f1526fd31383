"""Training throughput of the `sft` stage vs TRL's `SFTTrainer` called directly, same model, data and settings, same run.

    python scripts/bench_sft.py [--recipe recipes/tiny/sft_full.yaml] [--samples 1500] [--repeats 2]

Both sides train the recipe's model on the same rows (the first `--samples` of its dataset, one epoch) with the
same `SFTConfig` parsed from the recipe; TRL gets the model, tokenizer and config directly, hfgen runs end to end
through `hfgen.train.run_recipe`. Both are timed by the Trainer's own `train_runtime` and count the non-padding
tokens they train on (Trainer's `num_input_tokens_seen`), so tokens/s compares useful work. Three comparisons:

  unpacked        packing off on both: what the wrapper costs (goal: ratio >= 1.0)
  packed          packing on both: hfgen keeps packed rows apart and separates documents by position_ids
                  (block-diagonal mask per row), TRL flattens the batch into one padding-free row, which only
                  varlen kernels (flash attention) handle without attending over the whole flattened batch
  packed vs TRL   hfgen's packed run against TRL's default (no packing, padding to the longest in the batch),
  default         at about the same tokens per step (--packed_batch_size rows of max_length)

Repeats run the four in alternating order and keep each one's best, which damps noise from other processes on the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def settings(recipe_path: str, samples: int, output_dir: str, packing: bool, batch_size: int) -> list[str]:
    return [
        "--output_dir", output_dir, "--max_train_samples", str(samples), "--max_eval_samples", "32", "--num_samples", "0",
        "--num_train_epochs", "1", "--max_steps", "-1", "--packing", str(packing).lower(),
        "--per_device_train_batch_size", str(batch_size), "--save_strategy", "no", "--eval_strategy", "no",
        "--logging_steps", "50", "--disable_tqdm", "true",
    ]  # fmt: skip


def trl_direct(recipe_path: str, overrides: list[str]) -> float:
    """tokens/s of SFTTrainer given the recipe's model, tokenizer, rows and SFTConfig, nothing else."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer, get_peft_config

    from hfgen.data.loading import load_splits
    from hfgen.recipe import load_recipe

    model_args, data_args, args = load_recipe(recipe_path, overrides).configs
    args.include_num_input_tokens_seen = "non_padding"  # as the stage counts
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=model_args.dtype)
    train_rows, _ = load_splits(data_args, seed=args.seed)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    result = trainer.train()
    return trainer.state.num_input_tokens_seen / result.metrics["train_runtime"]


def hfgen_stage(recipe_path: str, overrides: list[str]) -> float:
    from hfgen import tracking
    from hfgen.recipe import load_recipe
    from hfgen.train import run_recipe

    output_dir = run_recipe(load_recipe(recipe_path, overrides))
    results = tracking.read_json(output_dir / "eval.json")
    return results["train_tokens_per_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "recipes/tiny/sft_full.yaml"))
    parser.add_argument("--samples", type=int, default=1500, help="training rows (one epoch)")
    parser.add_argument("--batch_size", type=int, default=32, help="rows per step without packing")
    parser.add_argument("--packed_batch_size", type=int, default=8, help="packed rows (of max_length) per step")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(REPO)

    from hfgen.recipe import load_recipe

    recipe = load_recipe(args.recipe, ["--output_dir", tempfile.mkdtemp()])  # checks the model dir exists
    model_args, data_args, training_args = recipe.configs
    print(
        f"{args.recipe}: model {model_args.model_name_or_path}, data {data_args.dataset_name} ({args.samples} rows, 1 epoch), "
        f"max_length {training_args.max_length}, batch {args.batch_size} rows unpacked / {args.packed_batch_size} packed "
        f"rows, LoRA {model_args.use_peft}, torch threads {torch.get_num_threads()}"
    )
    runs = {  # name: (function, packing, batch size)
        "TRL unpacked": (trl_direct, False, args.batch_size),
        "hfgen unpacked": (hfgen_stage, False, args.batch_size),
        "TRL packed": (trl_direct, True, args.packed_batch_size),
        "hfgen packed": (hfgen_stage, True, args.packed_batch_size),
    }
    best: dict[str, float] = {}
    for repeat in range(args.repeats):
        order = list(runs) if repeat % 2 == 0 else list(reversed(runs))  # alternate, so neither side always goes first
        for name in order:
            function, packing, batch_size = runs[name]
            with tempfile.TemporaryDirectory() as output_dir:
                tokens_per_s = function(
                    args.recipe, settings(args.recipe, args.samples, output_dir, packing, batch_size)
                )
            best[name] = max(best.get(name, 0.0), tokens_per_s)
            print(f"repeat {repeat + 1}: {name:15s} {tokens_per_s:9,.0f} tokens/s")

    print()
    for name, value in best.items():
        print(f"{name:15s}: {value:9,.0f} tokens/s (best of {args.repeats})")
    print(f"ratio unpacked  hfgen/TRL          : {best['hfgen unpacked'] / best['TRL unpacked']:.3f}  (goal >= 1.0)")
    print(f"ratio packed    hfgen/TRL          : {best['hfgen packed'] / best['TRL packed']:.3f}")
    print(f"ratio hfgen packed / TRL default   : {best['hfgen packed'] / best['TRL unpacked']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
