"""Acceptance-scale run of the flow-matching digits: the 16-channel VAE, then the SD3-layout pipeline, then a table
of its figures beside the UNet path's (recipes/tiny/t2i_digits.yaml, run first when its output is missing).

    python scripts/accept_t2i_flow.py [--threads 2] [--skip_unet]

Each run's figures come from its eval.json (prompt adherence by the digit classifier, Fréchet distance and
diversity against real digits, images/s) and its wall-clock training time (train/runtime_s: the loop only).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {  # name: (recipes run in order, the output whose eval.json is read)
    "UNet (t2i)": (["recipes/tiny/vae_digits.yaml", "recipes/tiny/t2i_digits.yaml"], "outputs/tiny/t2i"),
    "MMDiT flow (t2i_flow)": (
        ["recipes/tiny/vae_digits16.yaml", "recipes/tiny/t2i_flow_digits.yaml"],
        "outputs/tiny/t2i_flow",
    ),
}
FIGURES = {
    "quality/prompt_adherence": "adherence",
    "quality/frechet_distance": "Fréchet",
    "diversity/pairwise_distance_ratio": "diversity/real",
    "speed/images_per_s": "images/s",
    "train/runtime_s": "train s",
}


def train_and_read(runs: dict, threads: int, skip=lambda name: False) -> dict:
    """Run each of `runs` (name: (recipes, output dir)) in this process on `threads` torch threads, its recipes in
    order (not the runs `skip` names), then read every output's eval.json there is: {name: figures}."""
    import torch

    torch.set_num_threads(threads)
    from hfgen import tracking
    from hfgen.recipe import load_recipe
    from hfgen.train import run_recipe

    figures = {}
    for name, (recipes, output) in runs.items():
        if not skip(name):
            started = time.perf_counter()
            for recipe in recipes:
                run_recipe(load_recipe(recipe))
            print(f"{name}: {time.perf_counter() - started:.0f} s end to end")
        if (Path(output) / "eval.json").is_file():
            figures[name] = tracking.read_json(Path(output) / "eval.json")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip_unet", action="store_true", help="Do not run the UNet path (read it if present).")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(REPO)
    rows = train_and_read(RUNS, args.threads, skip=lambda name: args.skip_unet and name.startswith("UNet"))
    print("| path | " + " | ".join(FIGURES.values()) + " |")
    print("|---" * (len(FIGURES) + 1) + "|")
    for name, results in rows.items():
        print(f"| {name} | " + " | ".join(f"{results.get(key, float('nan')):.3g}" for key in FIGURES) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
