"""The full kill matrix: every stage killed (SIGKILL) at every named point, resumed with
`--resume_from_checkpoint true`, and compared with one uninterrupted run of the stage: final weights bit for bit,
metrics.jsonl rows equal (no duplicates, no gaps). Tiny models, CPU; prints a table (about 15 minutes on 2 cores).

    python scripts/kill_matrix.py [--stages pretrain ppo ...] [--work DIR]

The CI part of this matrix is tests/test_kill_resume.py; the harness is tests/kill_harness.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "src")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


from diffusion_fixtures import (  # noqa: E402
    LORA_RECIPE,
    SMALL_DATA,
    T2I_RECIPE,
    VAE_RECIPE,
    t2i_overrides,
    vae_overrides,
    write_tiny_configs,
)  # fmt: skip
from kill_harness import (  # noqa: E402
    GROUP_RL_ARGS,
    PREFERENCE_ARGS,
    killed_then_resumed,
    stable_rows,
    train,
    weight_differences,
)  # fmt: skip

TRAINER_ARGS = ["--max_train_samples", "64", "--max_eval_samples", "8", "--per_device_train_batch_size", "8",
                "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "2"]  # fmt: skip


def stage_setups(work: Path) -> dict[str, tuple[Path, list[str], list[str]]]:
    """stage -> (recipe, overrides, kill points in the order a run meets them)."""
    from stages.test_ppo import STOPS_AT_STEP_5, build_tiny_models, write_recipe
    from stages.test_t2i_flow import FLOW_LORA_RECIPE, FLOW_RECIPE, flow_overrides, train_vae16, write_flow_configs
    from tiny_models import save_tiny_llama

    tiny_lm = save_tiny_llama(work / "tiny_lm", pretrain_steps=150)
    every_point = ["step@3", "checkpoint@4", "final_save", "eval"]  # (in the order the stages below meet them)
    sft, reward = build_tiny_models(work / "ppo_models")
    ppo = write_recipe(work / "ppo_models", sft, reward_model_path=str(reward), total_episodes=80, save_steps=2)
    # stop_on_hacking stops at step 5 keeping the two policies of steps 1-5 it judges best: a kill after checkpoint-2
    # or -4 must keep the same ones
    (work / "ppo_stop").mkdir()
    ppo_stop = write_recipe(work / "ppo_stop", sft, **STOPS_AT_STEP_5, save_steps=2)
    configs = write_tiny_configs(work)
    vae_dir = work / "vae_for_t2i"
    assert train(VAE_RECIPE, vae_dir, vae_overrides(configs, vae_dir)).returncode == 0
    diffusion = ["--checkpointing_steps", "2", "--max_train_steps", "6"]
    (work / "flow_configs").mkdir()
    flow_configs = write_flow_configs(work / "flow_configs")
    vae16 = train_vae16(flow_configs, work / "vae16_for_flow")
    flow = [*flow_overrides(flow_configs, vae16, "unused", steps=6), *diffusion, "--eval_images_per_prompt", "2"]
    flow_base = work / "flow_base"
    assert train(FLOW_RECIPE, flow_base, flow_overrides(flow_configs, vae16, flow_base, steps=2)).returncode == 0
    group_rl = ["--model_name_or_path", str(tiny_lm), *GROUP_RL_ARGS, "--max_steps", "6"]
    preference = ["--model_name_or_path", str(tiny_lm), *PREFERENCE_ARGS, "--max_steps", "6"]
    lora = [*diffusion, "--logging_steps", "1", "--num_inference_steps", "2", "--eval_images_per_prompt", "2",
            "--validation_steps", "2", "--num_validation_images", "1", *SMALL_DATA]  # fmt: skip
    return {
        "pretrain": (REPO / "recipes/tiny/pretrain.yaml",
                     ["--max_train_samples", "200", "--max_eval_samples", "20", "--logging_steps", "2", "--max_steps",
                      "8", "--save_steps", "4", "--save_total_limit", "1"],
                     ["step@6", "checkpoint@8", "eval", "final_save"]),
        "sft_lora": (REPO / "recipes/tiny/sft_lora.yaml",
                     ["--model_name_or_path", str(tiny_lm), *TRAINER_ARGS, "--num_samples", "2"], every_point),
        "reward": (REPO / "recipes/tiny/reward.yaml", ["--model_name_or_path", str(tiny_lm), *TRAINER_ARGS],
                   every_point),
        "ppo": (ppo, [], every_point),
        "ppo_stop_on_hacking": (ppo_stop, [], ["step@3", "checkpoint@4", "step@5", "final_save", "eval"]),
        "vae": (VAE_RECIPE, [*vae_overrides(configs, "unused", steps=6), *diffusion],
                ["step@3", "checkpoint@4", "eval", "final_save"]),
        "t2i": (T2I_RECIPE, [*t2i_overrides(configs, vae_dir, "unused", steps=6), *diffusion],
                every_point),
        # the siblings of the stages the issue lists: every other stage, at every point
        "sft_full": (REPO / "recipes/tiny/sft_full.yaml",
                     ["--model_name_or_path", str(tiny_lm), *TRAINER_ARGS, "--num_samples", "2"], every_point),
        **{method: (REPO / f"recipes/tiny/{method}.yaml", preference, every_point)
           for method in ("dpo", "kto", "orpo", "simpo")},
        "grpo": (REPO / "recipes/tiny/grpo_arithmetic.yaml", group_rl, every_point),
        "rloo": (REPO / "recipes/tiny/rloo_arithmetic.yaml", group_rl, every_point),
        "t2i_lora": (LORA_RECIPE, [*lora, "--pretrained_model_name_or_path", t2i_base(work, configs, vae_dir)],
                     every_point),
        "t2i_flow": (FLOW_RECIPE, [*flow, "--use_ema", "true"], every_point),
        "t2i_flow_lora": (FLOW_LORA_RECIPE, [*lora, "--pretrained_model_name_or_path", flow_base],
                          every_point),
    }  # fmt: skip


def t2i_base(work: Path, configs, vae_dir) -> Path:
    """A 2-step t2i pipeline for the UNet LoRA run to start from."""
    base = work / "t2i_base"
    assert train(T2I_RECIPE, base, t2i_overrides(configs, vae_dir, base, steps=2)).returncode == 0
    return base


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", help="only these (default: all)")
    parser.add_argument("--work", help="scratch dir (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="kill_matrix_"))
    setups = stage_setups(work)
    rows, failures = [], 0
    for stage, (recipe, overrides, points) in setups.items():
        if args.stages and stage not in args.stages:
            continue
        reference = work / stage / "reference"
        result = train(recipe, reference, overrides)
        assert result.returncode == 0, result.stderr[-3000:]
        for point in points:
            started = time.time()
            killed = work / stage / point.replace("@", "-")
            try:
                notes = killed_then_resumed(recipe, killed, overrides, [point])
                weights = "identical" if not weight_differences(reference, killed) else "DIFFER"
                same_rows = "equal" if stable_rows(reference) == stable_rows(killed) else "DIFFER"
                skipped = "; ".join(n.split("resume: ")[-1] for n in notes) or "-"
            except AssertionError as error:
                weights, same_rows, skipped = "FAILED", "-", str(error).splitlines()[0][:80]
            failures += weights != "identical" or same_rows != "equal"
            rows.append((stage, point, weights, same_rows, f"{time.time() - started:.0f}", skipped))
            print(" | ".join(rows[-1]), flush=True)
    header = ("stage", "kill point", "final weights", "metrics rows", "s", "resume said")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{len(rows) - failures} of {len(rows)} cells pass")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
