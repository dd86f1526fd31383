"""Every stage under every engine on 2 CPU processes: DDP, FSDP2 (accelerate's FSDP2 branch on gloo, switched on by
tests/engines/fsdp2_launch.py) and DeepSpeed ZeRO-2/3 (DeepSpeed's CPU accelerator). Each launch ends with saved
models that load with the stock `from_pretrained`, identical full weights on both ranks, and the same numbers as
DDP for the same seed: the pipeline's outputs (pretrain, SFT, reward model, PPO) to float tolerance, PPO's first
update (losses, KL, on the same sampled rollout) to 1e-4 relative. A bad launch exits 2 before any model loads.

One launch per (engine, job), run once per module; the tests read their outputs."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import REPO, shrunk
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


def write_pipeline(directory, pretrained) -> str:
    """The rlhf pipeline over shrunk tiny recipes, starting from a tiny pretrained Llama."""
    # ddp_backend: DeepSpeed's CPU accelerator needs gloo named (transformers sets up the processes itself);
    # use_cpu off: the launch (engine and backend) decides the device, not the tiny recipes' CPU default
    few = {"save_strategy": "no", "logging_steps": 1, "seed": 3, "ddp_backend": "gloo", "use_cpu": False}
    recipe = {
        "stage": "rlhf",
        "output_dir": str(directory / "rlhf"),
        "sft": shrunk("sft_full.yaml", directory, model_name_or_path=str(pretrained), max_steps=3,
                      max_train_samples=64, max_eval_samples=8, num_samples=2, output_dir=str(directory / "sft"), **few),
        "reward": shrunk("reward.yaml", directory, model_name_or_path=str(pretrained), max_steps=3,
                         max_train_samples=64, max_eval_samples=8, output_dir=str(directory / "reward"), **few),
        "ppo": shrunk("ppo.yaml", directory, total_episodes=32, per_device_train_batch_size=8, num_mini_batches=1,
                      num_ppo_epochs=1, response_length=8, max_eval_samples=4, eval_samples_per_prompt=1,
                      save_steps=0, logging_steps=1, sample_steps=1, seed=3, use_cpu=False,
                      output_dir=str(directory / "ppo")),
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_reward_model(path, pretrained):
    """A one-label classifier on the tiny Llama's weights with a seeded head: fixed input for every engine."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=1)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(pretrained).save_pretrained(path)
    return path


# (engine, job): the pipeline (SFT -> reward -> PPO) under every engine; a LoRA PPO run on fixed models under the
# engines that shard the policy; the diffusion stages (VAE, then t2i on that VAE) under FSDP2 and ZeRO-2.
JOBS = [("ddp", "pipeline"), ("zero3", "pipeline"), ("fsdp2", "pipeline"), ("zero2", "pipeline"), ("ddp", "lora"),
        ("zero3", "lora"), ("fsdp2", "lora"), ("fsdp2", "vae"), ("fsdp2", "t2i"), ("zero2", "vae"), ("zero2", "t2i")]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every (engine, job) launched once -> {(engine, job): output dir}; the seconds each took are printed."""
    pytest.importorskip("deepspeed")
    from diffusion_fixtures import T2I_RECIPE, VAE_RECIPE, t2i_overrides, vae_overrides, write_tiny_configs
    from tiny_models import save_tiny_llama

    root = tmp_path_factory.mktemp("engines")
    pretrained = save_tiny_llama(root / "pretrained", pretrain_steps=30)
    reward = write_reward_model(root / "reward", pretrained)
    configs = write_tiny_configs(root)
    outputs, seconds = {}, {}
    for engine, job in JOBS:
        directory = root / f"{engine}-{job}"
        directory.mkdir()
        if job == "pipeline":
            args, outputs[engine, job] = [write_pipeline(directory, pretrained)], directory
        elif job == "lora":
            args, outputs[engine, job] = [write_ppo(directory, pretrained, reward, **LORA)], directory / "ppo"
        elif job == "vae":
            args, outputs[engine, job] = [VAE_RECIPE, *vae_overrides(configs, directory, steps=3)], directory
        else:
            vae = outputs[engine, "vae"]
            args = [T2I_RECIPE, *t2i_overrides(configs, vae, directory, steps=3), "--eval_images_per_prompt", "0"]
            outputs[engine, job] = directory
        started = time.time()
        result = launch(engine, free_port(), *args)
        seconds[f"{engine} {job}"] = round(time.time() - started, 1)
        assert result.returncode == 0, f"{engine} {job}:\n{result.stderr[-4000:]}"
    print("seconds per launch:", json.dumps(seconds))
    return outputs


def fingerprints_agree(run_dir) -> bool:
    prints = [(run_dir / f"weights-rank{rank}.sha256").read_text() for rank in (0, 1)]
    return prints[0] == prints[1]


def assert_same_weights(ours: dict, theirs: dict, what: str) -> None:
    assert ours.keys() == theirs.keys(), what
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=f"{what}: {name}")


@pytest.mark.parametrize("engine", ["zero3", "fsdp2", "zero2"])
def test_pipeline_outputs_load_and_equal_ddp(runs, engine):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for step, model_class in (("sft", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification),
                              ("ppo", AutoModelForCausalLM)):  # fmt: skip
        run, ddp = runs[engine, "pipeline"] / step, runs["ddp", "pipeline"] / step
        assert tracking.is_complete(run) and tracking.read_json(run / "env.json")["world_size"] == 2, step
        assert fingerprints_agree(run), step
        ours, theirs = model_class.from_pretrained(run).state_dict(), model_class.from_pretrained(ddp).state_dict()
        assert_same_weights(ours, theirs, f"{engine} {step}")
    assert tracking.is_complete(runs[engine, "pipeline"] / "rlhf")


def first_updates(run_dir) -> tuple[list, list[dict]]:
    """(responses sampled at steps 1 and 2, metrics of steps 1 and 2): step 2's KL measures the first update."""
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return [row["response"] for row in samples if row["step"] <= 2], tracking.read_metrics(run_dir)[:2]


@pytest.mark.parametrize("engine", ["zero3", "fsdp2", "zero2"])
def test_ppo_first_update_equals_ddp_on_the_same_rollout(runs, engine):
    for job in ("pipeline", "lora") if engine != "zero2" else ("pipeline",):
        run, ddp = (runs[name, job] / "ppo" if job == "pipeline" else runs[name, job] for name in (engine, "ddp"))
        (responses, ours), (ddp_responses, theirs) = first_updates(run), first_updates(ddp)
        assert responses == ddp_responses, job  # the same sampled tokens went into both updates
        for step in (0, 1):
            for key in FIRST_UPDATE:  # (the KL of step 1 is ~1e-7 noise: policy == reference there)
                assert ours[step][key] == pytest.approx(theirs[step][key], rel=1e-4, abs=1e-6), (job, step, key)


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_lora_ppo_saves_an_adapter_that_loads_on_its_base(runs, engine):
    from peft import AutoPeftModelForCausalLM

    run = runs[engine, "lora"]
    assert fingerprints_agree(run) and not (run / "model.safetensors").exists()
    ours = AutoPeftModelForCausalLM.from_pretrained(run).state_dict()
    assert_same_weights(ours, AutoPeftModelForCausalLM.from_pretrained(runs["ddp", "lora"]).state_dict(), engine)


@pytest.mark.parametrize("engine", ["fsdp2", "zero2"])
def test_diffusion_stages_save_whole_models_that_load(runs, engine):
    from diffusers import AutoencoderKL, DiffusionPipeline

    vae_dir, t2i_dir = runs[engine, "vae"], runs[engine, "t2i"]
    for run in (vae_dir, t2i_dir):
        assert tracking.is_complete(run) and fingerprints_agree(run)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    assert vae.config.scaling_factor == pytest.approx(tracking.read_json(vae_dir / "eval.json")["vae/scaling_factor"])
    pipeline = DiffusionPipeline.from_pretrained(t2i_dir)
    image = pipeline("a handwritten digit 3", num_inference_steps=2, output_type="np").images[0]
    assert image.shape[-1] == 3 and abs(image).sum() > 0


def test_bad_launches_exit_2_before_any_model_loads(tmp_path):
    # CPU processes without ACCELERATE_USE_CPU (the launch config's use_cpu alone): each would train alone.
    overrides = ["--output_dir", tmp_path / "vae", "--max_train_steps", "1"]
    environment = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               REPO / "recipes/accelerate/cpu_2proc.yaml", "--main_process_port", str(free_port()),
               REPO / "scripts/train.py", REPO / "recipes/tiny/vae_digits.yaml", *overrides]  # fmt: skip
    result = subprocess.run(list(map(str, command)), cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=environment)  # fmt: skip
    assert re.search(r"exitcode\s*:\s*2", result.stderr) and "ACCELERATE_USE_CPU=true" in result.stderr
    assert "hfgen: error:" in result.stderr and f'File "{REPO / "src"}' not in result.stderr  # no hfgen traceback
    assert not (tmp_path / "vae" / "config.json").exists()
    # An engine the stage refuses: the VAE's GAN discriminator under ZeRO-2.
    result = launch(
        "zero2", free_port(), REPO / "recipes/tiny/vae_digits.yaml", *overrides, "--adversarial_weight", "0.1"
    )
    assert re.search(r"exitcode\s*:\s*2", result.stderr) and "cannot run under zero2" in result.stderr
    assert "discriminator" in result.stderr
    assert "hfgen: error:" in result.stderr and f'File "{REPO / "src"}' not in result.stderr  # no hfgen traceback
