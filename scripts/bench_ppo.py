"""Episodes/s of hfgen's PPO against TRL 1.10's PPOTrainer at one or more model sizes, in alternating pairs.

Both run the same random Llamas and settings (TRL's last PPOTrainer: `trl.experimental.ppo`, trl 1.10) and are
timed the same way.

    .venv/bin/python scripts/bench_ppo.py                                        # the default size, 5 pairs
    .venv/bin/python scripts/bench_ppo.py --hidden_size 64 128 192 64 --num_layers 2 2 3 2 \
        --vocab_size 512 512 512 16384       # the README's sizes: default, ~3x, ~10x (width and depth), ~10x (vocabulary)
    .venv/bin/python scripts/bench_ppo.py --vocab_size 4096 --pairs 7 --peer_python .venv/trl110/bin/python

Settings (ANCHORS.md): a random Llama as policy, reference, reward model and value model (default hidden 64,
2 layers, the embedded 512-token tokenizer; `--hidden_size`, `--num_layers`, `--vocab_size` give other sizes, the
MLP 4x the hidden size; a vocabulary beyond the tokenizer's gets placeholder tokens); 16 episodes per PPO step (one
minibatch, no gradient accumulation), 2 PPO epochs, 24 new tokens at temperature 0.7, missing-EOS penalty 1,
float32 on CPU, one torch thread. A random policy almost never emits EOS, so responses are 24 tokens on both sides.

Timing, the same on both sides: each run is a fresh process that takes `time.perf_counter()` at the end of every
PPO step, once the step's metrics are logged (hfgen: its metrics.jsonl row is written; TRL: its `on_step_end`
callback, which follows `self.log`). Both log every step. The first `--warmup` steps are dropped on both sides and
episodes/s is episodes over the wall time from the end of step `warmup` to the end of the last step: the whole
loop (rollout, advantages, update, logging, TRL's `gc.collect()`), not a sum of phases. Runs alternate within a
pair and the order alternates between pairs (hfgen first, then TRL first), so load from other programs hits both
alike; the figure is the median of the pairs' ratios. The machine's load (1-minute average) is printed with it.

Passes per episode (both sides, the same counter): the Llama backbone's forward is wrapped; a call on one new token
is a decoding step of generation, any other call a full forward pass (no-grad: rollout scoring, or prefill), a
forward pass with gradients is followed by a backward pass. Counts are over the timed steps, per episode. At these
settings (one micro-batch per update) hfgen takes the rollout's values from the update's first forward pass, so
it makes one no-grad pass fewer than TRL (3 against 4: prefill, reference, reward; TRL also a value pass).

The peer needs trl 1.10 next to the same torch/transformers: a side venv inside .venv/ (so git ignores it) that
reuses this venv's packages, with trl 1.10 in front of them (pip fetches the one wheel):
    python3 -m venv .venv/trl110
    .venv/bin/python -c "import site; print(site.getsitepackages()[0])" > .venv/trl110/lib/python3.11/site-packages/main.pth
    .venv/trl110/bin/pip install --no-deps trl==1.10.0
Without it, ours is printed beside the figure recorded in ANCHORS.md (about 28 episodes/s at the default size),
clearly marked as not measured in this run.
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
ANCHOR_EPISODES_PER_S = 28.0  # ANCHORS.md: TRL 1.10's PPOTrainer at the default size, measured earlier here
EPISODES_PER_STEP, PPO_EPOCHS, NEW_TOKENS, TEMPERATURE, LEARNING_RATE = 16, 2, 24, 0.7, 3e-6
MISSING_EOS_PENALTY = 1.0

# Run first in both sides' processes: step-end times and the pass counter, written to $BENCH_OUTPUT at exit.
INSTRUMENT = textwrap.dedent(
    """
    import atexit, json, os, time
    import torch
    from transformers.models.llama import modeling_llama

    step_ends, passes = [], {"decode": 0, "forward": 0, "forward_backward": 0}

    def counted(forward):
        def wrapper(self, input_ids=None, *args, **kwargs):
            shape = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape
            kind = "decode" if shape[1] == 1 else "forward_backward" if torch.is_grad_enabled() else "forward"
            if len(step_ends) >= int(os.environ["BENCH_WARMUP"]):  # count the timed steps only (after the warm-up)
                passes[kind] += shape[0]
            return forward(self, input_ids, *args, **kwargs)
        return wrapper

    modeling_llama.LlamaModel.forward = counted(modeling_llama.LlamaModel.forward)

    def step_end():
        step_ends.append(time.perf_counter())

    atexit.register(lambda: json.dump({"step_ends": step_ends, "passes": passes}, open(os.environ["BENCH_OUTPUT"], "w")))
    """
)

OURS_DRIVER = INSTRUMENT + textwrap.dedent(
    """
    import sys
    from hfgen import tracking
    from hfgen.cli import main

    log = tracking.MetricsLogger.log

    def log_and_time(self, step, **metrics):
        log(self, step, **metrics)
        step_end()

    tracking.MetricsLogger.log = log_and_time
    sys.exit(main(["train", sys.argv[1]]))
    """
)

PEER_DRIVER = INSTRUMENT + textwrap.dedent(
    """
    import sys
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    root, steps, output = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    settings = json.loads(sys.argv[4])
    tokenizer = AutoTokenizer.from_pretrained(root + "/policy")
    prompts = json.load(open(root + "/prompts.json"))  # the embedded prompts, as chat messages
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for p in prompts]

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_end()

    args = PPOConfig(
        output_dir=output + ".run", per_device_train_batch_size=settings["batch"], gradient_accumulation_steps=1,
        num_mini_batches=1, num_ppo_epochs=settings["epochs"], response_length=settings["new_tokens"],
        temperature=settings["temperature"], total_episodes=steps * settings["batch"], learning_rate=settings["lr"],
        local_rollout_forward_batch_size=settings["batch"], stop_token="eos", num_sample_generations=0,
        missing_eos_penalty=settings["missing_eos_penalty"], bf16=False, gradient_checkpointing=False, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=1, seed=0,
    )
    trainer = PPOTrainer(
        args=args, processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(root + "/policy"),
        ref_model=AutoModelForCausalLM.from_pretrained(root + "/policy"),
        reward_model=AutoModelForSequenceClassification.from_pretrained(root + "/reward", num_labels=1),
        value_model=AutoModelForSequenceClassification.from_pretrained(root + "/reward", num_labels=1),
        train_dataset=Dataset.from_dict({"input_ids": ids}), callbacks=[StepEnd()],
    )
    trainer.train()
    """
)


def build_models(root: Path, hidden_size: int, num_layers: int, vocab_size: int) -> int:
    """Policy (= reference) and reward (= value init) models: random Llamas sharing the embedded tokenizer, padded
    with placeholder tokens to `vocab_size`. -> the policy's parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from hfgen.data.embedded import generate_rows
    from hfgen.models import build_embedded_tokenizer

    tokenizer = build_embedded_tokenizer()
    if vocab_size < len(tokenizer):
        sys.exit(f"--vocab_size {vocab_size} is below the embedded tokenizer's {len(tokenizer)} tokens")
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(vocab_size - len(tokenizer))])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=max(hidden_size // 16, 1),
        num_key_value_heads=max(hidden_size // 16, 1), max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    policy = LlamaForCausalLM(config)
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    (root / "prompts.json").write_text(json.dumps([row["prompt"] for row in generate_rows("prompts", "train")]))
    return sum(p.numel() for p in policy.parameters())


def timed(command: list[str], output: Path, warmup: int, who: str) -> dict:
    """Run one side's driver; -> episodes/s over the timed steps and the passes per episode."""
    env = {**quiet_env(), "BENCH_OUTPUT": str(output), "BENCH_WARMUP": str(warmup)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    if result.returncode != 0:
        sys.exit(f"{who} failed:\n{result.stderr[-3000:]}")
    record = json.loads(output.read_text(encoding="utf-8"))
    ends = record["step_ends"][warmup - 1 :]  # from the end of step `warmup` to the end of the last
    episodes = EPISODES_PER_STEP * (len(ends) - 1)
    return {
        "episodes_per_s": episodes / (ends[-1] - ends[0]),
        "passes": {kind: count / episodes for kind, count in record["passes"].items()},
    }


def run_ours(root: Path, steps: int, warmup: int, tag: str, options: dict) -> dict:
    recipe = {
        "stage": "ppo", "model_name_or_path": str(root / "policy"), "reward_model_path": str(root / "reward"),
        "dataset_name": "embedded:prompts", "output_dir": str(root / f"ours-{tag}"),
        "total_episodes": steps * EPISODES_PER_STEP, "per_device_train_batch_size": EPISODES_PER_STEP,
        "gradient_accumulation_steps": 1, "num_mini_batches": 1, "num_ppo_epochs": PPO_EPOCHS,
        "response_length": NEW_TOKENS, "temperature": TEMPERATURE, "local_rollout_forward_batch_size": EPISODES_PER_STEP,
        "learning_rate": LEARNING_RATE, "missing_eos_penalty": MISSING_EOS_PENALTY, "eval_samples_per_prompt": 0,
        "sample_steps": 0, "logging_steps": 1, "use_cpu": True, "seed": 0, **options,
    }  # fmt: skip
    path = root / f"ours-{tag}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    driver = root / "ours_driver.py"
    driver.write_text(OURS_DRIVER)
    return timed([sys.executable, str(driver), str(path)], root / f"ours-{tag}.json", warmup, "our PPO")


def run_peer(peer_python: str, root: Path, steps: int, warmup: int, tag: str) -> dict:
    driver, output = root / "peer_driver.py", root / f"peer-{tag}.json"
    driver.write_text(PEER_DRIVER)
    settings = {"batch": EPISODES_PER_STEP, "epochs": PPO_EPOCHS, "new_tokens": NEW_TOKENS, "temperature": TEMPERATURE,
                "lr": LEARNING_RATE, "missing_eos_penalty": MISSING_EOS_PENALTY}  # fmt: skip
    command = [peer_python, str(driver), str(root), str(steps), str(output), json.dumps(settings)]
    return timed(command, output, warmup, "the peer (trl 1.10 PPOTrainer)")


def peer_version(peer_python: str | None) -> str | None:
    """trl's version in the peer interpreter when `trl.experimental.ppo.PPOTrainer` imports there, else None."""
    if not peer_python or not Path(peer_python).exists():
        return None
    probe = "import trl; from trl.experimental.ppo import PPOTrainer; print(trl.__version__)"
    result = subprocess.run([peer_python, "-c", probe], capture_output=True, text=True, env=quiet_env())
    return result.stdout.strip() if result.returncode == 0 else None


def quiet_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # fmt: skip


def listing(runs: list[dict]) -> str:
    return ", ".join(f"{run['episodes_per_s']:.1f}" for run in runs)


def passes_text(passes: dict) -> str:
    return (f"{passes['forward']:.1f} forward + {passes['forward_backward']:.1f} forward-backward + "
            f"{passes['decode']:.0f} decoding steps")  # fmt: skip


def bench_size(args, size: tuple[int, int, int], version: str | None, options: dict) -> dict:
    hidden_size, num_layers, vocab_size = size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        parameters = build_models(root, hidden_size, num_layers, vocab_size)
        load_before = os.getloadavg()[0]
        ours, peer = [], []
        for pair in range(args.pairs):
            sides = ["ours", "peer"] if version else ["ours"]
            for side in sides if pair % 2 == 0 else sides[::-1]:
                if side == "ours":
                    ours.append(run_ours(root, args.steps, args.warmup, str(pair), options))
                else:
                    peer.append(run_peer(args.peer_python, root, args.steps, args.warmup, str(pair)))
        load_after = os.getloadavg()[0]
    ours_eps = statistics.median(run["episodes_per_s"] for run in ours)
    print(f"hidden {hidden_size}, {num_layers} layers, vocabulary {vocab_size}: {parameters / 1e6:.2f}M parameters per "
          f"model; load {load_before:.1f} -> {load_after:.1f}")  # fmt: skip
    print(f"  hfgen PPO              {ours_eps:7.1f} episodes/s   "
          f"(runs: {listing(ours)})")  # fmt: skip
    print(f"    passes per episode   {passes_text(ours[0]['passes'])}")
    figures = {"size": size, "parameters": parameters, "ours": ours_eps, "load": (load_before, load_after)}
    if version:
        peer_eps = statistics.median(run["episodes_per_s"] for run in peer)
        ratios = [o["episodes_per_s"] / p["episodes_per_s"] for o, p in zip(ours, peer)]
        print(f"  trl {version} PPOTrainer {peer_eps:7.1f} episodes/s   "
              f"(runs: {listing(peer)})")  # fmt: skip
        print(f"    passes per episode   {passes_text(peer[0]['passes'])}")
        print(f"  ratio hfgen / trl      {statistics.median(ratios):7.2f}x   median of {len(ratios)} pairs "
              f"({', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip
        figures |= {"peer": peer_eps, "ratio": statistics.median(ratios), "ratios": ratios}
    else:
        print(f"  trl 1.10 PPOTrainer    {ANCHOR_EPISODES_PER_S:7.1f} episodes/s   NOT measured in this run: the "
              f"figure recorded in ANCHORS.md for the default size (no trl 1.10 at {args.peer_python}; see this "
              f"script's docstring)")  # fmt: skip
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden_size", type=int, nargs="+", default=[64], help="one per size (default 64)")
    parser.add_argument("--num_layers", type=int, nargs="+", default=[2], help="one per size, or one for all")
    parser.add_argument("--vocab_size", type=int, nargs="+", default=[512], help="one per size, or one for all")
    parser.add_argument("--steps", type=int, default=12, help="PPO steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the timing")
    parser.add_argument("--pairs", type=int, default=5, help="alternating pairs of runs per size (median reported)")
    parser.add_argument(
        "--ours", default="{}", help="extra recipe keys for hfgen's side, as JSON (e.g. an option under test)"
    )
    default_peer = REPO / ".venv/trl110/bin/python"
    parser.add_argument(
        "--peer_python", default=os.environ.get("HFGEN_PEER_PYTHON", str(default_peer) if default_peer.exists() else sys.executable),
        help="interpreter with trl 1.10 (default: $HFGEN_PEER_PYTHON, else .venv/trl110/bin/python, else this one)",
    )  # fmt: skip
    args = parser.parse_args()
    count = max(len(args.hidden_size), len(args.num_layers), len(args.vocab_size))
    if any(len(values) not in (1, count) for values in (args.hidden_size, args.num_layers, args.vocab_size)):
        parser.error("--hidden_size, --num_layers and --vocab_size take one value each, or one per size")
    sizes = [tuple(values[i] if len(values) > 1 else values[0] for values in
                   (args.hidden_size, args.num_layers, args.vocab_size)) for i in range(count)]  # fmt: skip
    if args.warmup < 1 or args.steps - args.warmup < 2:
        parser.error("--warmup must be at least 1, and --steps at least --warmup + 2")

    version = peer_version(args.peer_python)
    print(
        f"PPO, {EPISODES_PER_STEP} episodes/step, {PPO_EPOCHS} PPO epochs, {NEW_TOKENS} new tokens, CPU "
        f"({os.cpu_count()} cores, {quiet_env()['OMP_NUM_THREADS']} thread(s) per run); "
        f"{args.steps - args.warmup} timed steps of {args.steps} per run, {args.pairs} alternating pairs per size"
    )
    results = [bench_size(args, size, version, json.loads(args.ours)) for size in sizes]
    if version and len(results) > 1:
        print("\n| hidden x layers x vocabulary | parameters | hfgen eps | trl eps | ratio, median (range) | load |")
        print("|---|---|---|---|---|---|")
        for r in results:
            print(f"| {' x '.join(map(str, r['size']))} | {r['parameters'] / 1e6:.2f}M | {r['ours']:.1f} | "
                  f"{r['peer']:.1f} | {r['ratio']:.2f}x ({min(r['ratios']):.2f}-{max(r['ratios']):.2f}) | "
                  f"{r['load'][0]:.1f}-{r['load'][1]:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
