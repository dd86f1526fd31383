"""Every text stage on eleven architectures, not only the Llama the tiny recipes use: gpt2, gpt_neox, opt, qwen2,
qwen3, mistral, gemma2, phi3, olmo2, mixtral (Mixture-of-Experts) and llama, each from a tiny config
(tests/tiny_models.py's ARCHITECTURES) through `hfgen train`: pretraining from the config, SFT (full and LoRA on all
linear layers), a reward model, PPO (full, and LoRA on policy and critic), DPO, KTO, ORPO, SimPO, GRPO and RLOO, a
few steps each. With `--engines`, PPO (full and LoRA) again under each named engine on 2 CPU processes (DDP, FSDP2,
ZeRO-2, ZeRO-3, as tests/test_engines.py launches them). Prints one row per architecture: `ok` or the exit code (the logs are in
--work). About 2 minutes an architecture on 2 cores, plus ~1.5 minutes an engine.

    python scripts/architecture_matrix.py [--architectures gpt2 phi3 ...] [--engines fsdp2 zero3] [--work DIR]

The CI case is tests/stages/test_architectures.py (GPT-2: SFT and PPO with LoRA on `[c_attn]`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "src")]

from engines.launch import engine_command  # noqa: E402
from tiny_models import ARCHITECTURES  # noqa: E402

SHORT_PRETRAINING = ["--max_steps", "30", "--save_strategy", "no"]
FEW_STEPS = ["--max_steps", "4", "--max_train_samples", "256", "--max_eval_samples", "16"]
FEW_EPISODES = ["--total_episodes", "128", "--eval_samples_per_prompt", "1", "--max_eval_samples", "8"]
LORA = ["--use_peft", "true", "--lora_target_modules", "all-linear", "--lora_dropout", "0.0"]  # MoE experts: no dropout
GROUP_RL = ["--model_name_or_path", "{sft}", "--dataset_name", "embedded:prompts", "--reward_functions",
            "[hfgen.data.embedded:oracle_scores]", "--reward_weights", "[1.0]", "--oracle_function",
            "hfgen.data.embedded:oracle_scores", "--freeze_modules", "[]", "--max_steps", "2",
            "--per_device_train_batch_size", "16", "--eval_samples_per_prompt", "1", "--max_eval_samples", "8",
            "--save_strategy", "no", "--learning_rate", "1e-3"]  # fmt: skip


def stages(config: Path) -> dict[str, list[str]]:
    """stage name -> `hfgen train` arguments ({sft}, {reward}: the runs of those names; every run's output_dir is
    added by `run`)."""
    preference = ["--model_name_or_path", "{sft}", *FEW_STEPS]
    ppo = ["recipes/tiny/ppo.yaml", "--model_name_or_path", "{sft}", "--reward_model_path", "{reward}", *FEW_EPISODES]
    return {
        "pretrain": ["recipes/tiny/pretrain.yaml", "--config_name", str(config), *SHORT_PRETRAINING],
        "sft": ["recipes/tiny/sft_full.yaml", "--model_name_or_path", "{pretrain}", *FEW_STEPS],
        "sft_lora": ["recipes/tiny/sft_lora.yaml", "--model_name_or_path", "{pretrain}", *FEW_STEPS],
        "reward": ["recipes/tiny/reward.yaml", "--model_name_or_path", "{sft}", *FEW_STEPS],
        "ppo": ppo,
        "ppo_lora": [*ppo, *LORA],
        "dpo": ["recipes/tiny/dpo.yaml", *preference],
        "kto": ["recipes/tiny/kto.yaml", *preference],
        "orpo": ["recipes/tiny/orpo.yaml", *preference],
        "simpo": ["recipes/tiny/simpo.yaml", *preference],
        "grpo": ["recipes/tiny/grpo_arithmetic.yaml", *GROUP_RL],
        "rloo": ["recipes/tiny/rloo_arithmetic.yaml", *GROUP_RL],
    }


def run(command: list[str], log: Path, environment: dict | None = None) -> int:
    with log.open("w", encoding="utf-8") as out:
        return subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=environment).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--stages", nargs="*", help="default: all of them, in order (later ones need earlier ones); "
                        "none: only the --engines runs, on the stages' outputs already in --work")  # fmt: skip
    parser.add_argument("--engines", nargs="*", default=[], choices=("ddp", "fsdp2", "zero2", "zero3"))
    parser.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp(prefix="architecture_matrix-")))
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    hfgen = [sys.executable, "-m", "hfgen.cli", "train"]
    table, port = {}, 29700
    for architecture in args.architectures:
        work = (args.work / architecture).resolve()
        work.mkdir(parents=True, exist_ok=True)
        config = work / "config.json"
        config.write_text(json.dumps(ARCHITECTURES[architecture], indent=1))
        plan = stages(config)
        outputs = {name: str(work / name) for name in plan}
        row = table.setdefault(architecture, {})
        for name in plan if args.stages is None else args.stages:
            command = [arg.format(**outputs) for arg in plan[name]]
            code = run([*hfgen, *command, "--output_dir", outputs[name]], work / f"{name}.log")
            row[name] = "ok" if code == 0 else f"exit {code}"
            print(architecture, name, row[name], flush=True)
        for engine in args.engines:
            port += 1
            launch, environment = engine_command(engine, port)
            on_processes = ["--use_cpu", "false", "--per_device_train_batch_size", "16"]
            runs = []
            for name in ("ppo", "ppo_lora"):
                runs += ["--then", *[arg.format(**outputs) for arg in plan[name]], *on_processes,
                         "--output_dir", f"{outputs[name]}_{engine}"]  # fmt: skip
            code = run([*launch, *runs[1:]], work / f"engine_{engine}.log", environment)
            row[f"ppo+lora {engine}"] = "ok" if code == 0 else f"exit {code}"
            print(architecture, engine, row[f"ppo+lora {engine}"], flush=True)
    columns = list(dict.fromkeys(key for row in table.values() for key in row))
    print("\n| architecture | " + " | ".join(columns) + " |\n|" + " --- |" * (len(columns) + 1))
    for architecture, row in table.items():
        print(f"| {architecture} | " + " | ".join(row.get(column, "") for column in columns) + " |")
    print(f"\nlogs: {args.work}")
    return 0 if all(value == "ok" for row in table.values() for value in row.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
