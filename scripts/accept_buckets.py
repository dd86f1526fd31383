"""Acceptance-scale aspect-ratio buckets on both text-to-image paths: the UNet (`t2i`) and the flow-matching MMDiT
(`t2i_flow`) trained on the digits at three aspect ratios (embedded:digits-aspect: 16x16, 24x16 and 16x24 buckets),
then a table of the prompt adherence in every bucket beside real digits through the same bucket path.

    python scripts/accept_buckets.py [--threads 2] [--skip_training]

Runs recipes/tiny/vae_digits.yaml + t2i_digits_buckets.yaml and vae_digits16.yaml + t2i_flow_digits_buckets.yaml
(`--skip_training`: only read their outputs). The measure (eval.json's quality/prompt_adherence_bucket_WxH): each
sample's ink is cut to its bounding box, centred and padded to a black square, brought to 8x8 and classified by an
SVC trained on real digits normalised the same way; `centre crop` is the earlier measure (the centred square of the
shorter side, on the plain 8x8 classifier), for comparison. Acceptance: >= 0.85 in every bucket on both paths.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {  # name: (recipes run in order, the output whose eval.json is read)
    "UNet (t2i)": (
        ["recipes/tiny/vae_digits.yaml", "recipes/tiny/t2i_digits_buckets.yaml"],
        "outputs/tiny/t2i_buckets",
    ),
    "MMDiT flow (t2i_flow)": (
        ["recipes/tiny/vae_digits16.yaml", "recipes/tiny/t2i_flow_digits_buckets.yaml"],
        "outputs/tiny/t2i_flow_buckets",
    ),
}
THRESHOLD = 0.85
MEASURES = {"": "ink centred, padded to a square", "_centre_crop": "centre crop (earlier)"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip_training", action="store_true", help="Read the runs' outputs; train nothing.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(REPO)
    from accept_t2i_flow import train_and_read

    results = train_and_read(RUNS, args.threads, skip=lambda name: args.skip_training)
    if not results:
        print("no run outputs found: run without --skip_training first")
        return 1
    first = next(iter(results.values()))
    sizes = [m[1] for key in first if (m := re.fullmatch(r"quality/prompt_adherence_bucket_(\d+x\d+)", key))]
    print("| images | measure | " + " | ".join(sizes) + " |")
    print("|---" * (len(sizes) + 2) + "|")
    passed = bool(sizes)  # a run without per-bucket figures (unfinished) passes nothing
    for suffix, measure in MEASURES.items():
        cells = [first.get(f"quality/prompt_adherence_bucket_{s}{suffix}_real_images", float("nan")) for s in sizes]
        print(f"| real digits | {measure} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
        for name, figures in results.items():
            cells = [figures.get(f"quality/prompt_adherence_bucket_{s}{suffix}", float("nan")) for s in sizes]
            print(f"| {name} | {measure} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
            if not suffix:  # acceptance is on the measure; the centre crop is for comparison
                passed = passed and all(v >= THRESHOLD for v in cells)
    for name, figures in results.items():
        print(f"{name}: {figures.get('train/steps')} steps, training loop {figures.get('train/runtime_s', 0):.0f} s")
    print(f"every bucket >= {THRESHOLD} on both paths (the measure): {'yes' if passed else 'NO'}")
    return 0 if passed and len(results) == len(RUNS) else 1


if __name__ == "__main__":
    sys.exit(main())
