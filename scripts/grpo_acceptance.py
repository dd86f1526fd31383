"""The arithmetic acceptance run: pretrain -> SFT (each once, skipped when complete) -> GRPO with 3 seeds (and RLOO),
then held-out exact match of the SFT model and of each trained policy, and wall times.

    python scripts/grpo_acceptance.py                       # the full run (figures in the README)
    python scripts/grpo_acceptance.py --seeds 1 --max_steps 5 --root /tmp/quick   # a short one

Each GRPO/RLOO run's eval.json compares its starting (SFT) model and the trained policy on the held-out prompts with
the same random numbers (`sft/exact_match`, `grpo/exact_match`). The goal: GRPO raises held-out exact match by at
least 15 points (mean over seeds), each GRPO run under 10 minutes and the whole chain under 20 on 2 CPU cores.
Writes ROOT/acceptance.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(recipe: str, *overrides: str) -> Path:
    from hfgen import tracking
    from hfgen.recipe import load_recipe
    from hfgen.train import run_recipe

    loaded = load_recipe(recipe, list(overrides), check_inputs=False)
    if tracking.is_complete(loaded.output_dir) and (loaded.output_dir / "recipe.yaml").read_text() == loaded.to_yaml():
        print(f"== {recipe}: {loaded.output_dir} is complete, skipped", flush=True)
        return loaded.output_dir
    print(f"== {recipe} {' '.join(overrides)}", flush=True)
    return run_recipe(load_recipe(recipe, list(overrides)))


def wall_time(output_dir: Path) -> float:
    from hfgen import tracking

    return tracking.read_json(output_dir / tracking.COMPLETE_MARKER)["wall_time_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="outputs/tiny", help="where the runs go")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max_steps", type=int, default=None, help="override the GRPO/RLOO recipes' max_steps")
    parser.add_argument("--no_rloo", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(REPO)
    root = Path(args.root)
    steps = ["--max_steps", str(args.max_steps)] if args.max_steps else []

    pretrain = run("recipes/tiny/arithmetic_pretrain.yaml", "--output_dir", str(root / "arithmetic_pretrain"))
    sft = run("recipes/tiny/arithmetic_sft.yaml", "--model_name_or_path", str(pretrain),
              "--output_dir", str(root / "arithmetic_sft"))  # fmt: skip
    rows = []
    methods = ["grpo"] * args.seeds + ([] if args.no_rloo else ["rloo"])
    for index, method in enumerate(methods):
        seed = 1 + (index if method == "grpo" else 0)
        output = run(f"recipes/tiny/{method}_arithmetic.yaml", "--model_name_or_path", str(sft), "--seed", str(seed),
                     "--output_dir", str(root / f"{method}_arithmetic_seed{seed}"), *steps)  # fmt: skip
        figures = json.loads((output / "eval.json").read_text())
        rows.append(
            {
                "method": method, "seed": seed, "sft_exact_match": figures["sft/exact_match"],
                "exact_match": figures[f"{method}/exact_match"], "sft_format": figures["sft/answer_format"],
                "format": figures[f"{method}/answer_format"], "sft_correct_steps": figures.get("sft/oracle"),
                "correct_steps": figures.get(f"{method}/oracle"), "kl_to_reference": figures["kl_to_reference"],
                "wall_time_s": wall_time(output),
            }
        )  # fmt: skip
        row = rows[-1]
        print(f"{method} seed {seed}: exact match {row['sft_exact_match']:.3f} -> {row['exact_match']:.3f}, "
              f"{row['wall_time_s']:.0f} s", flush=True)  # fmt: skip

    grpo = [row for row in rows if row["method"] == "grpo"]
    gains = [row["exact_match"] - row["sft_exact_match"] for row in grpo]
    summary = {
        "pretrain_wall_time_s": wall_time(pretrain),
        "sft_wall_time_s": wall_time(sft),
        "grpo_gain_points_mean": 100 * statistics.mean(gains),
        "grpo_max_wall_time_s": max(row["wall_time_s"] for row in grpo),
        "chain_wall_time_s": wall_time(pretrain) + wall_time(sft) + grpo[0]["wall_time_s"],
        "runs": rows,
    }
    (root / "acceptance.json").write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print("method seed  SFT exact -> trained  format SFT -> trained  correct steps  KL    wall s")
    for row in rows:
        steps_text = (
            f"{row['sft_correct_steps']:.3f} -> {row['correct_steps']:.3f}" if row["correct_steps"] is not None else "-"
        )
        print(f"{row['method']:6s} {row['seed']:4d}  {row['sft_exact_match']:.3f} -> {row['exact_match']:.3f}     "
              f"{row['sft_format']:.3f} -> {row['format']:.3f}     {steps_text}  {row['kl_to_reference']:.2f}  "
              f"{row['wall_time_s']:.0f}")  # fmt: skip
    print(f"GRPO gain, mean of {len(grpo)} seeds: {summary['grpo_gain_points_mean']:+.1f} points (goal >= +15)")
    print(f"wall time: pretrain {summary['pretrain_wall_time_s']:.0f} s, SFT {summary['sft_wall_time_s']:.0f} s, "
          f"longest GRPO {summary['grpo_max_wall_time_s']:.0f} s (goal < 600), chain {summary['chain_wall_time_s']:.0f} s "
          "(goal < 1200)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
