"""Training throughput of the `grpo` stage vs TRL's `GRPOTrainer` called directly: same model, data, rewards and
settings, same run, alternating pairs.

    python scripts/bench_grpo.py [--recipe recipes/tiny/grpo_arithmetic.yaml] [--steps 10] [--pairs 5]

Both sides parse the recipe's `GRPOConfig` and train its model on its prompts with its two rule rewards for
`--steps` steps; TRL gets the model, tokenizer, rows and plain TRL-convention reward functions, hfgen runs end to
end through `hfgen.train.run_recipe` (its held-out evaluation and the oracle switched off: they are not training).
Both are timed by the Trainer's own `train_runtime`; episodes (completions) per second = steps x
generation_batch_size / train_runtime. Each pair runs the two in alternating order; the report is the median over
pairs of each side's episodes/s and of the pair's ratio hfgen / TRL (goal >= 0.97: the wrapper costs nothing).
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


def overrides(output_dir: str, steps: int) -> list[str]:
    return [
        "--output_dir", output_dir, "--max_steps", str(steps), "--save_strategy", "no", "--logging_steps", str(steps),
        "--eval_samples_per_prompt", "0", "--oracle_function", "", "--disable_tqdm", "true",
    ]  # fmt: skip


def exact_answer(prompts, completions, **kwargs):
    from hfgen.data import arithmetic

    return arithmetic.exact_answer([p[-1]["content"] for p in prompts], [c[0]["content"] for c in completions])


def answer_format(prompts, completions, **kwargs):
    from hfgen.data import arithmetic

    return arithmetic.answer_format([p[-1]["content"] for p in prompts], [c[0]["content"] for c in completions])


def trl_direct(recipe_path: str, arguments: list[str]) -> float:
    """Episodes/s of GRPOTrainer given the recipe's model, tokenizer, rows, rewards and GRPOConfig, nothing else."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from hfgen.data.loading import load_splits
    from hfgen.recipe import load_recipe

    model_args, data_args, args = load_recipe(recipe_path, arguments).configs
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=model_args.dtype)
    train_rows, _ = load_splits(data_args, seed=args.seed)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[exact_answer, answer_format],
        args=args,
        train_dataset=train_rows,
        processing_class=tokenizer,
    )
    result = trainer.train()
    return trainer.state.global_step * args.generation_batch_size / result.metrics["train_runtime"]


def hfgen_stage(recipe_path: str, arguments: list[str]) -> float:
    from hfgen import tracking
    from hfgen.recipe import load_recipe
    from hfgen.train import run_recipe

    output_dir = run_recipe(load_recipe(recipe_path, arguments))
    return tracking.read_json(output_dir / "eval.json")["episodes_per_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "recipes/tiny/grpo_arithmetic.yaml"))
    parser.add_argument("--steps", type=int, default=10, help="GRPO steps per run")
    parser.add_argument("--pairs", type=int, default=5, help="alternating (hfgen, TRL) pairs; at least 5")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(REPO)

    from hfgen.recipe import load_recipe

    model_args, data_args, config = load_recipe(args.recipe, overrides(tempfile.mkdtemp(), args.steps)).configs
    if data_args.reward_functions != ["hfgen.data.arithmetic:exact_answer", "hfgen.data.arithmetic:answer_format"]:
        print("this bench gives TRL the arithmetic task's two rewards; use an arithmetic recipe", file=sys.stderr)
        return 2
    print(
        f"{args.recipe}: model {model_args.model_name_or_path}, {args.steps} steps x {config.generation_batch_size} "
        f"episodes ({config.num_generations} per prompt), max_completion_length {config.max_completion_length}, "
        f"torch threads {torch.get_num_threads()}"
    )
    runs = {"hfgen": hfgen_stage, "TRL": trl_direct}
    results: dict[str, list[float]] = {name: [] for name in runs}
    for pair in range(args.pairs):
        order = list(runs) if pair % 2 == 0 else list(reversed(runs))  # neither side always goes first
        for name in order:
            with tempfile.TemporaryDirectory() as output_dir:
                results[name].append(runs[name](args.recipe, overrides(output_dir, args.steps)))
            print(f"pair {pair + 1}: {name:6s} {results[name][-1]:8.1f} episodes/s", flush=True)

    ratios = [h / t for h, t in zip(results["hfgen"], results["TRL"])]
    print()
    for name, values in results.items():
        print(f"{name:6s}: {statistics.median(values):8.1f} episodes/s (median of {args.pairs})")
    print(f"ratio hfgen/TRL: {statistics.median(ratios):.3f} (median of {args.pairs} pairs; goal >= 0.97)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
