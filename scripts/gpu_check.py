"""Run each real-model recipe for a few steps under one GPU, DDP, FSDP2 and DeepSpeed ZeRO-3 (bf16) and print, per
cell, throughput (tokens/s, episodes/s or images/s), model FLOPs utilisation, peak GPU memory and pass / fail / refused.

    python scripts/gpu_check.py                     # every cell, on all the GPUs nvidia-smi sees
    python scripts/gpu_check.py --dry-run           # list the cells and their commands, run nothing
    python scripts/gpu_check.py --only sft_full --engines single,zero3 --steps 20 --peak_tflops 989

Each cell is a real `accelerate launch` of scripts/train.py with the shipped launcher preset of its engine
(recipes/accelerate/*.yaml) and overrides that cut the run to a few steps; the PPO cells start from the SFT and reward
models the single-GPU cells wrote. MFU is 6 x parameters x trained tokens/s over the GPUs' peak bf16 FLOP/s
(`--peak_tflops` per GPU, H100 SXM dense by default); it counts the forward and backward passes of the trained
model only (not PPO's generation or the frozen models). Peak memory is the highest `memory.used` nvidia-smi reported on
any GPU while the cell ran. A cell a stage refuses exits 2 before loading a model and is shown as refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = {  # name -> recipe; the PPO recipes read the outputs of the SFT and reward cells named beside them
    "smollm2-135m/sft_full": "recipes/smollm2-135m/sft_full.yaml",
    "smollm2-135m/sft_lora": "recipes/smollm2-135m/sft_lora.yaml",
    "smollm2-135m/reward": "recipes/smollm2-135m/reward.yaml",
    "smollm2-135m/ppo": "recipes/smollm2-135m/ppo.yaml",
    "pythia-410m/sft": "recipes/pythia-410m/rlhf_tldr/sft.yaml",
    "pythia-410m/reward": "recipes/pythia-410m/rlhf_tldr/reward.yaml",
    "pythia-410m/ppo": "recipes/pythia-410m/rlhf_tldr/ppo.yaml",
    "sd-1.5/t2i_full": "recipes/sd-1.5/t2i_full.yaml",
    "sd-1.5/t2i_lora": "recipes/sd-1.5/t2i_lora.yaml",
}
PPO_INPUTS = {
    "smollm2-135m/ppo": ("smollm2-135m/sft_full", "smollm2-135m/reward"),
    "pythia-410m/ppo": ("pythia-410m/sft", "pythia-410m/reward"),
}
ENGINES = {  # engine -> launcher preset
    "single": "recipes/accelerate/single_gpu.yaml",
    "ddp": "recipes/accelerate/multi_gpu.yaml",
    "fsdp2": "recipes/accelerate/fsdp.yaml",
    "zero3": "recipes/accelerate/deepspeed_zero3.yaml",
}


def stage_of(recipe: str) -> str:
    import yaml

    return yaml.safe_load((REPO / recipe).read_text())["stage"]


def overrides(stage: str, steps: int, output_dir: Path) -> list[str]:
    """Keys that cut a recipe to `steps` optimizer steps in bf16, with no checkpoints, evaluation or reports."""
    common = ["--output_dir", str(output_dir)]
    if stage in ("sft", "reward", "pretrain"):
        return common + ["--max_steps", str(steps), "--save_strategy", "no", "--eval_strategy", "no", "--bf16",
                         "true", "--use_cpu", "false", "--report_to", "none"]  # fmt: skip
    if stage == "ppo":  # the episode count and the input models are set in `command`
        return common
    return common + ["--max_train_steps", str(steps), "--checkpointing_steps", "0", "--validation_steps", "0",
                     "--eval_images_per_prompt", "0", "--mixed_precision", "bf16"]  # fmt: skip


def command(name: str, engine: str, gpus: int, steps: int, work: Path, port: int) -> list[str]:
    recipe = RECIPES[name]
    stage = stage_of(recipe)
    extra = overrides(stage, steps, work / engine / name)
    if stage == "ppo":
        import yaml

        values = yaml.safe_load((REPO / recipe).read_text())
        batch = values.get("per_device_train_batch_size", 16) * values.get("gradient_accumulation_steps", 1)
        batch *= values.get("num_mini_batches", 1) * (1 if engine == "single" else gpus)
        sft, reward = (str(work / "single" / cell) for cell in PPO_INPUTS[name])
        extra += ["--total_episodes", str(steps * batch), "--bf16", "true", "--use_cpu", "false",
                             "--model_name_or_path", sft, "--reward_model_path", reward, "--value_model_path", reward,
                             "--eval_samples_per_prompt", "0", "--save_steps", "0", "--sample_steps", "0"]  # fmt: skip
    processes = 1 if engine == "single" else gpus
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / ENGINES[engine]),
            "--num_processes", str(processes), "--main_process_port", str(port), str(REPO / "scripts/train.py"),
            str(REPO / recipe), *extra]  # fmt: skip


class PeakMemory:
    """Highest nvidia-smi `memory.used` (MiB) on any GPU, sampled every half second while a cell runs."""

    def __init__(self):
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        while self.running:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout  # fmt: skip
            self.peak = max([self.peak, *(int(v) for v in out.split() if v.isdigit())])
            time.sleep(0.5)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


def throughput(stage: str, output_dir: Path) -> tuple[str, float | None, float | None]:
    """(unit, per-second figure, trained tokens/s for MFU) from the run's eval.json."""
    results = json.loads((output_dir / "eval.json").read_text()) if (output_dir / "eval.json").is_file() else {}
    if stage == "t2i":
        return "images/s", results.get("train/images_per_s"), None
    if stage == "ppo":
        return "episodes/s", results.get("episodes_per_s"), None
    return "tokens/s", results.get("train_tokens_per_s"), results.get("train_tokens_per_s")


def parameters(output_dir: Path) -> int | None:
    results = json.loads((output_dir / "eval.json").read_text()) if (output_dir / "eval.json").is_file() else {}
    return results.get("parameters")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their commands; run nothing")
    parser.add_argument("--only", default="", help="comma-separated substrings of recipe names to keep")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps (PPO: rollouts) per cell")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs for the multi-GPU engines (default: all)")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s of one GPU")
    parser.add_argument("--work_dir", default=None, help="where the cells write (default: a temporary dir)")
    args = parser.parse_args()

    gpus = args.gpus
    if gpus is None:
        listed = shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        gpus = len(listed.stdout.splitlines()) if listed and listed.returncode == 0 else 0
    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {unknown}; choose from {list(ENGINES)}")
    names = [n for n in RECIPES if not args.only or any(part in n for part in args.only.split(","))]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="hfgen-gpu-check-"))
    # single-GPU cells first: the PPO cells of the other engines start from their SFT and reward outputs
    cells = [(name, engine) for engine in sorted(engines, key=lambda e: e != "single") for name in names]

    if args.dry_run:
        for i, (name, engine) in enumerate(cells):
            print(f"{engine:6} {name:22} " + " ".join(command(name, engine, max(gpus, 2), args.steps, work, 29500 + i)))
        return 0
    if gpus == 0:
        print("no GPU found (nvidia-smi -L): nothing to check; --dry-run lists the cells")
        return 1

    rows = []
    for i, (name, engine) in enumerate(cells):
        stage, output_dir = stage_of(RECIPES[name]), work / engine / name
        if engine != "single" and gpus < 2:
            rows.append((engine, name, "skipped (1 GPU)", "", "", ""))
            continue
        memory, started = PeakMemory(), time.time()
        result = subprocess.run(
            command(name, engine, gpus, args.steps, work, 29500 + i), capture_output=True, text=True
        )
        peak, seconds = memory.stop(), time.time() - started
        status = {0: "pass", 2: "refused"}.get(result.returncode, f"FAIL ({result.returncode})")
        if "exitcode  : 2" in result.stderr or "exitcode: 2" in result.stderr:
            status = "refused"
        if status.startswith("FAIL"):
            (work / f"{engine}-{name.replace('/', '_')}.log").write_text(result.stdout + result.stderr)
        unit, rate, tokens_per_s = throughput(stage, output_dir)
        count = parameters(output_dir)
        processes = 1 if engine == "single" else gpus
        mfu = 6 * count * tokens_per_s / (processes * args.peak_tflops * 1e12) if count and tokens_per_s else None
        rows.append((engine, name, f"{status} {seconds:.0f}s", f"{rate:,.1f} {unit}" if rate else "",
                     f"{mfu:.1%}" if mfu else "", f"{peak / 1024:.1f} GiB" if peak else ""))  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)

    print("\n| engine | recipe | result | throughput | MFU | peak memory |\n|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nlogs of failed cells and outputs: {work}")
    return 0 if all(not row[2].startswith("FAIL") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
