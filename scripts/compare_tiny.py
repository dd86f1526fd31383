"""The full tiny comparison: PPO, DPO and KTO from one tiny SFT model, 3 seeds each, 1,024 training prompts each,
then the figures as text (the HTML report is ROOT/report.html). Resumable: rerun it to pick up where it stopped.

    python scripts/compare_tiny.py                          # ppo,dpo,kto x 3 seeds
    python scripts/compare_tiny.py --methods ppo,dpo,kto,orpo,simpo --seeds 1

Run with OMP_NUM_THREADS=1 on a small CPU; the whole command's wall time is printed at the end.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from hfgen.cli import main as hfgen_main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="ppo,dpo,kto")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--output_root", default="outputs/tiny/compare-ppo-dpo-kto")
    args = parser.parse_args()
    started = time.time()
    code = hfgen_main(["compare", "recipes/tiny/compare.yaml", "--methods", args.methods, "--seeds", str(args.seeds),
                       "--prompts", str(args.prompts), "--output_root", args.output_root, "--quiet"])  # fmt: skip
    if code:
        return code
    wall = time.time() - started
    print(f"\n{'run':<14}{'oracle win':>11}{'RM win':>8}{'gap':>7}{'KL':>7}{'dist-2':>8}{'sBLEU':>7}{'len':>6}"
          f"{'train s':>9}{'peak MB':>9}")  # fmt: skip
    for run in sorted(Path(args.output_root).glob("*/seed=*")):
        results = json.loads((run / "compare_eval.json").read_text())["results"]
        complete = json.loads((run / "COMPLETE").read_text())
        memory = json.loads((run / "peak_memory.json").read_text())["peak_memory_mb"]
        oracle, reward = (
            results.get("win_rate/oracle", float("nan")),
            results.get("win_rate/reward_model", float("nan")),
        )
        print(f"{run.parent.name + ' ' + run.name:<14}{oracle:>11.3f}{reward:>8.3f}{reward - oracle:>7.3f}"
              f"{results['kl_to_reference']:>7.2f}{results['policy/distinct_2']:>8.3f}{results['policy/self_bleu']:>7.3f}"
              f"{results['policy/response_length']:>6.1f}{complete['wall_time_s']:>9.1f}{memory:>9.0f}")  # fmt: skip
    print(f"\nwhole command: {wall / 60:.1f} min (report: {args.output_root}/report.html)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
