"""Every stage under every engine on 2 CPU processes: DDP, FSDP2 (accelerate's FSDP2 branch on gloo, switched on by
tests/engines/fsdp2_launch.py) and DeepSpeed ZeRO-2/3 (DeepSpeed's CPU accelerator). Each launch ends with saved
models that load with the stock `from_pretrained`, identical full weights on both ranks, and the same numbers as
DDP for the same seed: the pipeline's outputs (pretrain, SFT, reward model, PPO) to float tolerance, PPO's first
update (losses, KL, on the same sampled rollout) to 1e-4 relative. A bad launch exits 2 before any model loads.

One launch per (engine, job), run once per module; the tests read their outputs."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO
from hfgen import tracking

pytestmark = pytest.mark.slow
ORACLE = "hfgen.data.embedded:oracle_scores"
LORA = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
FIRST_UPDATE = ("loss/policy_avg", "loss/value_avg", "objective/kl", "objective/scores", "policy/approxkl_avg")


def launch(engine: str, port: int, *args, env=None) -> subprocess.CompletedProcess:
    """`accelerate launch` of hfgen's training entry on 2 CPU processes under `engine` (ddp, fsdp2, zero2, zero3)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(port)]
    environment = {**os.environ, "HFGEN_WEIGHTS_FINGERPRINT": "1", **(env or {})}
    entry = REPO / "scripts/train.py"
    if engine in ("ddp", "fsdp2"):
        command += ["--config_file", str(REPO / "recipes/accelerate/cpu_2proc.yaml")]
        environment["ACCELERATE_USE_CPU"] = "true"
        if engine == "fsdp2":
            entry = REPO / "tests/engines/fsdp2_launch.py"
    else:
        command += ["--use_deepspeed", "--zero_stage", engine[-1], "--num_processes", "2", "--mixed_precision", "no"]
        command += ["--zero3_init_flag", "true", "--zero3_save_16bit_model", "true"] if engine == "zero3" else []
        environment["DS_ACCELERATOR"] = "cpu"
        environment.pop("ACCELERATE_USE_CPU", None)
    return subprocess.run(
        [*command, str(entry), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=900,
        env=environment,
    )  # fmt: skip


def shrunk(recipe: str, directory, **values) -> str:
    data = yaml.safe_load((REPO / "recipes/tiny" / recipe).read_text()) | {"use_cpu": False} | values
    path = directory / recipe
    path.write_text(yaml.safe_dump(data))
    return str(path)


def write_pipeline(directory, pretrained) -> str:
    """The rlhf pipeline over shrunk tiny recipes, starting from a tiny pretrained Llama."""
    # ddp_backend: DeepSpeed's CPU accelerator needs gloo named (transformers sets up the processes itself)
    few = {"save_strategy": "no", "logging_steps": 1, "seed": 3, "ddp_backend": "gloo"}
    recipe = {
        "stage": "rlhf",
        "output_dir": str(directory / "rlhf"),
        "sft": shrunk("sft_full.yaml", directory, model_name_or_path=str(pretrained), max_steps=3,
                      max_train_samples=64, max_eval_samples=8, num_samples=2, output_dir=str(directory / "sft"), **few),
        "reward": shrunk("reward.yaml", directory, model_name_or_path=str(pretrained), max_steps=3,
                         max_train_samples=64, max_eval_samples=8, output_dir=str(directory / "reward"), **few),
        "ppo": shrunk("ppo.yaml", directory, total_episodes=32, per_device_train_batch_size=8, num_mini_batches=1,
                      num_ppo_epochs=1, response_length=8, max_eval_samples=4, eval_samples_per_prompt=1,
                      save_steps=0, logging_steps=1, sample_steps=1, seed=3, output_dir=str(directory / "ppo")),
    }  # fmt: skip
    path = directory / "rlhf.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def write_ppo(directory, sft, reward, **values) -> str:
    recipe = {
        "stage": "ppo", "model_name_or_path": str(sft), "reward_model_path": str(reward), "dataset_name":
        "embedded:prompts", "oracle_function": ORACLE, "output_dir": str(directory / "ppo"), "total_episodes": 32,
        "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "num_ppo_epochs": 1,
        "response_length": 8, "learning_rate": 1e-3, "max_eval_samples": 4, "eval_samples_per_prompt": 1,
        "sample_steps": 1, "seed": 5,
    } | values  # fmt: skip
    path = directory / "ppo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


ENGINES = ("ddp", "zero3", "fsdp2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per engine: the pipeline (SFT -> reward -> PPO) from one tiny pretrained Llama, and a LoRA PPO run on fixed
    SFT and reward models. -> {engine: {"pipeline": dir, "lora": dir, "seconds": {...}}}."""
    import socket
    import time

    pytest.importorskip("deepspeed")
    from tiny_models import save_tiny_llama

    root = tmp_path_factory.mktemp("engines")
    pretrained = save_tiny_llama(root / "pretrained", pretrain_steps=30)
    results = {}
    for engine in ENGINES:
        directory = root / engine
        directory.mkdir()
        results[engine] = {"pipeline": directory, "seconds": {}}
        for job, recipe in (("pipeline", write_pipeline(directory, pretrained)),):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            started = time.time()
            result = launch(engine, port, recipe)
            results[engine]["seconds"][job] = round(time.time() - started, 1)
            assert result.returncode == 0, f"{engine} {job}:\n{result.stderr[-4000:]}"
    print(json.dumps({engine: value["seconds"] for engine, value in results.items()}))
    return results


def fingerprints_agree(run_dir) -> bool:
    prints = [(run_dir / f"weights-rank{rank}.sha256").read_text() for rank in (0, 1)]
    return prints[0] == prints[1]


@pytest.mark.parametrize("engine", ENGINES[1:])
def test_pipeline_outputs_load_and_equal_ddp(runs, engine):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for step, model_class in (("sft", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification),
                              ("ppo", AutoModelForCausalLM)):  # fmt: skip
        run, ddp = runs[engine]["pipeline"] / step, runs["ddp"]["pipeline"] / step
        assert tracking.is_complete(run), step
        assert tracking.read_json(run / "env.json")["world_size"] == 2
        assert fingerprints_agree(run), step
        ours, theirs = model_class.from_pretrained(run).state_dict(), model_class.from_pretrained(ddp).state_dict()
        assert ours.keys() == theirs.keys()
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=f"{step} {name}")


@pytest.mark.parametrize("engine", ENGINES[1:])
def test_ppo_first_update_equals_ddp_on_the_same_rollout(runs, engine):
    run, ddp = runs[engine]["pipeline"] / "ppo", runs["ddp"]["pipeline"] / "ppo"
    samples = [[json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()] for d in (run, ddp)]
    first = [[row["response"] for row in rows if row["step"] == 1] for rows in samples]
    assert first[0] == first[1]  # the same sampled tokens went into both first updates
    ours, theirs = tracking.read_metrics(run)[0], tracking.read_metrics(ddp)[0]
    for key in FIRST_UPDATE:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-7), key
