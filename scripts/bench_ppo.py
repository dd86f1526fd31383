"""Episodes/s of hfgen's PPO, with its time split (generation / scoring / training), against TRL's last PPOTrainer
(trl 1.10, `trl.experimental.ppo`) on the same models and settings, measured in the same run.

    .venv/bin/python scripts/bench_ppo.py
    .venv/bin/python scripts/bench_ppo.py --rounds 3 --peer_python .venv/trl110/bin/python

Settings (ANCHORS.md): a tiny random Llama (hidden 64, 2 layers, the embedded 512-token tokenizer) as policy,
reference, reward model and value model; 16 episodes per PPO step (one minibatch, no gradient accumulation), 2 PPO
epochs, 24 new tokens at temperature 0.7, float32 on CPU. A random policy almost never emits EOS, so every response
is 24 tokens long in both runs. Each run does --steps PPO steps in a fresh process; the first --warmup steps are
dropped and episodes/s is episodes over wall time of the rest. The runs alternate (ours, peer, ours, peer, ...) so
that load from other programs hits both alike; the median over rounds is reported.

The peer needs trl 1.10 next to the same torch/transformers: a side venv inside .venv/ (so git ignores it) that
reuses this venv's packages, with trl 1.10 in front of them (pip fetches the one wheel):
    python3 -m venv .venv/trl110
    .venv/bin/python -c "import site; print(site.getsitepackages()[0])" > .venv/trl110/lib/python3.11/site-packages/main.pth
    .venv/trl110/bin/pip install --no-deps trl==1.10.0
Without it, ours is printed beside the figure recorded in ANCHORS.md (about 28 episodes/s), clearly marked as not
measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ANCHOR_EPISODES_PER_S = 28.0  # ANCHORS.md: TRL 1.10's PPOTrainer on these settings, measured earlier on this machine
EPISODES_PER_STEP, PPO_EPOCHS, NEW_TOKENS, TEMPERATURE, LEARNING_RATE = 16, 2, 24, 0.7, 3e-6


def build_models(root: Path) -> None:
    """Policy (= reference) and reward (= value init) models: tiny random Llamas sharing the embedded tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from hfgen.data.embedded import generate_rows
    from hfgen.models import build_embedded_tokenizer

    tokenizer = build_embedded_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    (root / "prompts.json").write_text(json.dumps([row["prompt"] for row in generate_rows("prompts", "train")]))


def run_ours(root: Path, steps: int, warmup: int, tag: str) -> dict:
    run_dir = root / f"ours-{tag}"
    recipe = {
        "stage": "ppo", "model_name_or_path": str(root / "policy"), "reward_model_path": str(root / "reward"),
        "dataset_name": "embedded:prompts", "output_dir": str(run_dir), "total_episodes": steps * EPISODES_PER_STEP,
        "per_device_train_batch_size": EPISODES_PER_STEP, "gradient_accumulation_steps": 1, "num_mini_batches": 1,
        "num_ppo_epochs": PPO_EPOCHS, "response_length": NEW_TOKENS, "temperature": TEMPERATURE,
        "local_rollout_forward_batch_size": EPISODES_PER_STEP, "learning_rate": LEARNING_RATE,
        "eval_samples_per_prompt": 0, "sample_steps": 0, "logging_steps": 0, "use_cpu": True, "seed": 0,
    }  # fmt: skip
    path = root / f"ours-{tag}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = subprocess.run(
        [sys.executable, "-m", "hfgen.cli", "train", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=quiet_env(),
    )
    if result.returncode != 0:
        sys.exit(f"our PPO failed:\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][warmup:]
    step_seconds = [EPISODES_PER_STEP / row["eps"] for row in rows]
    split = {
        name: sum(row[f"time/{name}_s"] for row in rows) for name in ("generation", "scoring", "advantages", "training")
    }
    return {
        "episodes_per_s": EPISODES_PER_STEP * len(rows) / sum(step_seconds),
        "split_s": split,
        "total_s": sum(step_seconds),
    }


PEER_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    root, steps, output = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    settings = json.loads(sys.argv[4])
    tokenizer = AutoTokenizer.from_pretrained(root + "/policy")
    prompts = json.load(open(root + "/prompts.json"))  # the embedded prompts, as chat messages
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for p in prompts]
    dataset = Dataset.from_dict({"input_ids": ids})

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []
        def on_train_begin(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())
        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    args = PPOConfig(
        output_dir=output + ".run", per_device_train_batch_size=settings["batch"], gradient_accumulation_steps=1,
        num_mini_batches=1, num_ppo_epochs=settings["epochs"], response_length=settings["new_tokens"],
        temperature=settings["temperature"], total_episodes=steps * settings["batch"], learning_rate=settings["lr"],
        local_rollout_forward_batch_size=settings["batch"], stop_token="eos", num_sample_generations=0,
        bf16=False, gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, seed=0,
    )
    timer = StepTimes()
    trainer = PPOTrainer(
        args=args, processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(root + "/policy"),
        ref_model=AutoModelForCausalLM.from_pretrained(root + "/policy"),
        reward_model=AutoModelForSequenceClassification.from_pretrained(root + "/reward", num_labels=1),
        value_model=AutoModelForSequenceClassification.from_pretrained(root + "/reward", num_labels=1),
        train_dataset=dataset, callbacks=[timer],
    )
    trainer.train()
    durations = [b - a for a, b in zip(timer.times, timer.times[1:])]
    json.dump({"step_seconds": durations}, open(output, "w"))
    """
)


def run_peer(peer_python: str, root: Path, steps: int, warmup: int, tag: str) -> dict:
    script, output = root / "peer_ppo.py", root / f"peer-{tag}.json"
    script.write_text(PEER_SCRIPT)
    settings = {"batch": EPISODES_PER_STEP, "epochs": PPO_EPOCHS, "new_tokens": NEW_TOKENS,
                "temperature": TEMPERATURE, "lr": LEARNING_RATE}  # fmt: skip
    result = subprocess.run(
        [peer_python, str(script), str(root), str(steps), str(output), json.dumps(settings)],
        capture_output=True, text=True, cwd=REPO, env=quiet_env(),
    )  # fmt: skip
    if result.returncode != 0:
        sys.exit(f"the peer (trl 1.10 PPOTrainer) failed:\n{result.stderr[-3000:]}")
    step_seconds = json.loads(output.read_text())["step_seconds"][warmup:]
    return {"episodes_per_s": EPISODES_PER_STEP * len(step_seconds) / sum(step_seconds), "total_s": sum(step_seconds)}


def peer_version(peer_python: str | None) -> str | None:
    """trl's version in the peer interpreter when `trl.experimental.ppo.PPOTrainer` imports there, else None."""
    if not peer_python or not Path(peer_python).exists():
        return None
    probe = "import trl; from trl.experimental.ppo import PPOTrainer; print(trl.__version__)"
    result = subprocess.run([peer_python, "-c", probe], capture_output=True, text=True, env=quiet_env())
    return result.stdout.strip() if result.returncode == 0 else None


def listing(runs: list[dict]) -> str:
    return ", ".join(f"{run['episodes_per_s']:.1f}" for run in runs)


def quiet_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=14, help="PPO steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the figures")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each; the median is reported")
    default_peer = REPO / ".venv/trl110/bin/python"
    parser.add_argument(
        "--peer_python", default=os.environ.get("HFGEN_PEER_PYTHON", str(default_peer) if default_peer.exists() else sys.executable),
        help="interpreter with trl 1.10 (default: $HFGEN_PEER_PYTHON, else .venv/trl110/bin/python, else this one)",
    )  # fmt: skip
    args = parser.parse_args()

    version = peer_version(args.peer_python)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_models(root)
        ours, peer = [], []
        for round_index in range(args.rounds):
            ours.append(run_ours(root, args.steps, args.warmup, str(round_index)))
            if version:
                peer.append(run_peer(args.peer_python, root, args.steps, args.warmup, str(round_index)))

    print(f"PPO on a tiny Llama (hidden 64, 2 layers), {EPISODES_PER_STEP} episodes/step, {PPO_EPOCHS} PPO epochs, "
          f"{NEW_TOKENS} new tokens, CPU ({os.cpu_count()} cores); {args.steps - args.warmup} timed steps per run, "
          f"median of {args.rounds} alternating runs")  # fmt: skip
    best = sorted(ours, key=lambda r: r["episodes_per_s"])[len(ours) // 2]
    ours_eps = statistics.median(r["episodes_per_s"] for r in ours)
    split = best["split_s"]
    shares = ", ".join(f"{name} {100 * seconds / sum(split.values()):.0f}%" for name, seconds in split.items())
    print(f"  hfgen PPO            {ours_eps:7.1f} episodes/s   (runs: {listing(ours)})")
    print(f"    time split         {shares}")
    if version:
        peer_eps = statistics.median(r["episodes_per_s"] for r in peer)
        print(f"  trl {version} PPOTrainer {peer_eps:7.1f} episodes/s   (runs: {listing(peer)})")
        paired = ", ".join(f"{o['episodes_per_s'] / p['episodes_per_s']:.2f}" for o, p in zip(ours, peer))
        print(f"  ratio hfgen / trl    {ours_eps / peer_eps:7.2f}x   (same models, settings and machine, this run; "
              f"round by round: {paired})")  # fmt: skip
    else:
        print(f"  trl 1.10 PPOTrainer  {ANCHOR_EPISODES_PER_S:7.1f} episodes/s   NOT measured in this run: the figure "
              f"recorded in ANCHORS.md (no trl 1.10 at {args.peer_python}; see this script's docstring)")  # fmt: skip
        print(f"  ratio vs that figure {ours_eps / ANCHOR_EPISODES_PER_S:7.2f}x   (not a same-run comparison)")


if __name__ == "__main__":
    main()
