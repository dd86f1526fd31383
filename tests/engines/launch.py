"""Test setup, never used by a user's run: the `accelerate launch` of tests/engines/run_recipes.py on 2 CPU
processes under an engine, as tests/test_engines.py and scripts/architecture_matrix.py launch it."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def engine_command(
    engine: str, port: int, env: dict | None = None, zero3_save_16bit_model: bool = True
) -> tuple[list[str], dict]:
    """(the command up to run_recipes.py's arguments, its environment) for `engine`: ddp and fsdp2 (gloo processes,
    FSDP2 switched on by fsdp2_launch with the environment fsdp.yaml's launch has, its RAM-efficient loading
    included, its state_dict_type FSDP_STATE_DICT_TYPE in `env` as a launch config sets it, default
    FULL_STATE_DICT), zero2 and zero3 (DeepSpeed's CPU accelerator; `zero3_save_16bit_model` as the launch
    flag, which accelerate leaves off by default)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(port)]
    environment = {**os.environ, **(env or {})}
    entry = [str(REPO / "tests/engines/run_recipes.py"), *(["--fsdp2"] if engine == "fsdp2" else [])]
    if engine in ("ddp", "fsdp2"):
        command += ["--config_file", str(REPO / "recipes/accelerate/cpu_2proc.yaml")]
        environment["ACCELERATE_USE_CPU"] = "true"
        if engine == "fsdp2":
            # as `accelerate launch --config_file recipes/accelerate/fsdp.yaml` sets it, RAM-efficient loading
            # included (transformers loads the weights on the first process alone, accelerate spreads them)
            environment.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_CPU_RAM_EFFICIENT_LOADING="true")
    else:
        command += ["--use_deepspeed", "--zero_stage", engine[-1], "--num_processes", "2", "--mixed_precision", "no"]
        command += ["--zero3_init_flag", "true"] if engine == "zero3" else []
        command += ["--zero3_save_16bit_model", "true"] if engine == "zero3" and zero3_save_16bit_model else []
        environment["DS_ACCELERATOR"] = "cpu"
        environment.pop("ACCELERATE_USE_CPU", None)
    return command + entry, environment
