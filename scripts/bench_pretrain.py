"""Training throughput of the `pretrain` stage vs a minimal hand-written PyTorch loop, same run.

    python scripts/bench_pretrain.py [--steps 120] [--repeats 2] [--recipe recipes/tiny/pretrain.yaml]

Both train the same model (built from the recipe's config with the same seed) on the same packed blocks
with the same batch size, optimizer (AdamW, the recipe's lr and weight decay), schedule, gradient clipping
and number of steps. The stage runs end to end through `hfgen.train.run_recipe` and is timed by the
Trainer's own `train_runtime`; the baseline loop is timed from its first step to its last. Prints
tokens/s for both and their ratio (goal: >= 0.95). Repeats alternate the two and keep each one's best,
which damps noise from other processes on the machine.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def hand_written_loop(recipe, steps: int) -> float:
    """tokens/s of the plainest correct loop: forward, loss, backward, clip, AdamW step, schedule."""
    from transformers import get_scheduler, set_seed

    from hfgen.data.loading import load_splits
    from hfgen.models import build_causal_lm_from_config, load_tokenizer
    from hfgen.stages.pretrain import pack

    model_args, data_args, args = recipe.configs
    set_seed(args.seed)
    tokenizer = load_tokenizer(model_args.tokenizer_name)
    model = build_causal_lm_from_config(model_args.config_name, tokenizer, model_args)
    train_text, _ = load_splits(data_args, seed=args.seed)
    blocks = torch.tensor(pack(train_text, tokenizer, data_args.text_column, data_args.block_size)["input_ids"])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
    )
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=steps
    )
    batch_size = args.per_device_train_batch_size
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.cat(
        [
            torch.randperm(len(blocks), generator=generator)
            for _ in range(math.ceil(steps * batch_size / len(blocks)) + 1)
        ]
    )
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = blocks[order[step * batch_size : (step + 1) * batch_size]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    return steps * batch_size * data_args.block_size / elapsed


def hfgen_stage(recipe_path: str, steps: int, output_dir: str) -> float:
    from hfgen import tracking
    from hfgen.recipe import load_recipe
    from hfgen.train import run_recipe

    overrides = [
        "--output_dir",
        output_dir,
        "--max_steps",
        str(steps),
        "--save_strategy",
        "no",
        "--logging_steps",
        "20",
    ]
    run_recipe(load_recipe(recipe_path, overrides))
    results = tracking.read_json(Path(output_dir) / "eval.json")
    return results["train_tokens"] / results["train_runtime_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "recipes/tiny/pretrain.yaml"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(REPO)

    from hfgen.recipe import load_recipe

    recipe = load_recipe(args.recipe, ["--output_dir", tempfile.mkdtemp()])
    model_args, data_args, training_args = recipe.configs
    print(f"model config {model_args.config_name}, batch {training_args.per_device_train_batch_size} x block "
          f"{data_args.block_size}, {args.steps} steps, torch threads {torch.get_num_threads()}")  # fmt: skip
    baseline, ours = [], []
    for repeat in range(args.repeats):
        baseline.append(hand_written_loop(recipe, args.steps))
        with tempfile.TemporaryDirectory() as output_dir:
            ours.append(hfgen_stage(args.recipe, args.steps, output_dir))
        print(
            f"repeat {repeat + 1}: hand-written {baseline[-1]:,.0f} tokens/s, hfgen pretrain {ours[-1]:,.0f} tokens/s"
        )
    best_baseline, best_ours = max(baseline), max(ours)
    print(f"\nhand-written loop : {best_baseline:,.0f} tokens/s")
    print(f"hfgen pretrain    : {best_ours:,.0f} tokens/s")
    print(f"ratio hfgen/hand  : {best_ours / best_baseline:.3f}  (goal >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
