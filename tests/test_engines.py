"""Every stage under every engine on 2 CPU processes: DDP, FSDP2 (accelerate's FSDP2 branch on gloo, switched on by
tests/engines/fsdp2_launch.py) and DeepSpeed ZeRO-2/3 (DeepSpeed's CPU accelerator). Each run ends with saved
models that load with the stock `from_pretrained` (a LoRA adapter with peft, on its base), identical full weights
on both ranks, and the same numbers as DDP for the same seed: pretraining (but from a config under ZeRO-3: see
`test_pretraining`), SFT (full and LoRA), the reward model and PPO to float tolerance, PPO's first update (losses,
KL, on the same sampled rollout) to 1e-4 relative. A bad launch exits 2 before any model loads.

One `accelerate launch` per engine (tests/engines/run_recipes.py runs that engine's recipes one after the other
through hfgen's training entry), made when a test first asks for the engine; the tests read its outputs.
"""

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
from engines.launch import engine_command
from hfgen import tracking

pytestmark = pytest.mark.slow
ORACLE = "hfgen.data.embedded:oracle_scores"
LORA = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
FIRST_UPDATE = ("loss/policy_avg", "loss/value_avg", "objective/kl", "objective/scores", "policy/approxkl_avg")


def launch(engine: str, port: int, *args, env=None, **options) -> subprocess.CompletedProcess:
    """`accelerate launch` of tests/engines/run_recipes.py on 2 CPU processes under `engine` (ddp, fsdp2, zero2,
    zero3): `args` are recipes with their overrides, separated by --then; `options` go to `engine_command`."""
    command, environment = engine_command(engine, port, {"HFGEN_WEIGHTS_FINGERPRINT": "1", **(env or {})}, **options)
    return subprocess.run(
        [*command, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=1800,
        env=environment,
    )  # fmt: skip


# ddp_backend: DeepSpeed's CPU accelerator needs gloo named (transformers sets up the processes itself); use_cpu off:
# the launch (engine and backend) decides the device, not the tiny recipes' CPU default
TRAINER_KEYS = {"save_strategy": "no", "logging_steps": 1, "seed": 3, "ddp_backend": "gloo", "use_cpu": False}


def write_pretrain(directory) -> str:
    """Pretraining from a config (the tiny test Llama's sizes) for a few steps."""
    from tiny_models import TINY_LLAMA_SIZES

    config = directory / "llama.json"
    config.write_text(json.dumps({**json.loads((REPO / "recipes/tiny/llama_tiny.json").read_text()),
                                  **TINY_LLAMA_SIZES}))  # fmt: skip
    return shrunk("pretrain.yaml", directory, config_name=str(config), block_size=64, max_steps=6, warmup_steps=0,
                  per_device_train_batch_size=8, per_device_eval_batch_size=16, max_train_samples=256,
                  max_eval_samples=32, output_dir=str(directory / "pretrain"), **TRAINER_KEYS)  # fmt: skip


def write_sft_lora(directory, pretrained) -> str:
    """LoRA SFT at a fifth of the recipe's learning rate (see `test_lora_runs_...`: Adam's steps on gradient noise)."""
    return shrunk("sft_lora.yaml", directory, model_name_or_path=str(pretrained), max_steps=3, learning_rate=1e-3,
                  warmup_steps=0, per_device_train_batch_size=8, max_train_samples=64, max_eval_samples=8,
                  num_samples=2, output_dir=str(directory / "sft_lora"), **TRAINER_KEYS)  # fmt: skip


def write_reward_lora(directory, pretrained) -> str:
    """A LoRA reward model (merged into its base when saved); its recipe beside the pipeline's, in lora/."""
    (directory / "lora").mkdir()
    return shrunk("reward.yaml", directory / "lora", model_name_or_path=str(pretrained), max_steps=3,
                  max_train_samples=64, max_eval_samples=8, output_dir=str(directory / "reward_lora"), **LORA,
                  **TRAINER_KEYS)  # fmt: skip


def write_pipeline(directory, pretrained) -> str:
    """The rlhf pipeline over shrunk tiny recipes, starting from a tiny pretrained Llama."""
    recipe = {
        "stage": "rlhf",
        "output_dir": str(directory / "rlhf"),
        "sft": shrunk("sft_full.yaml", directory, model_name_or_path=str(pretrained), max_steps=3,
                      max_train_samples=64, max_eval_samples=8, num_samples=2, output_dir=str(directory / "sft"),
                      **TRAINER_KEYS),
        "reward": shrunk("reward.yaml", directory, model_name_or_path=str(pretrained), max_steps=3,
                         max_train_samples=64, max_eval_samples=8, output_dir=str(directory / "reward"),
                         **TRAINER_KEYS),
        "ppo": shrunk("ppo.yaml", directory, total_episodes=32, per_device_train_batch_size=8, num_mini_batches=1,
                      num_ppo_epochs=1, response_length=8, max_eval_samples=4, eval_samples_per_prompt=1,
                      save_steps=0, logging_steps=1, sample_steps=1, seed=3, use_cpu=False, ema_decay=0.5,
                      output_dir=str(directory / "ppo")),
    }  # fmt: skip
    path = directory / "rlhf.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def write_ppo_lora(directory, sft, reward, name: str = "ppo_lora") -> str:
    """A LoRA policy on fixed models (the tiny pretrained Llama, a seeded reward model), or on an earlier LoRA run."""
    recipe = {
        "stage": "ppo", "model_name_or_path": str(sft), "reward_model_path": str(reward), "dataset_name":
        "embedded:prompts", "oracle_function": ORACLE, "output_dir": str(directory / name), "total_episodes": 32,
        "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "num_ppo_epochs": 1,
        "response_length": 8, "learning_rate": 1e-3, "max_eval_samples": 4, "eval_samples_per_prompt": 1,
        "sample_steps": 1, "seed": 5, "ema_decay": 0.5, **LORA,
    }  # fmt: skip
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def write_ppo_warmup(directory, pretrained, reward) -> str:
    """Full PPO whose first step is a critic warm-up (`critic_warmup_steps`), with a large weight decay: a policy
    step taken in the warm-up (zero gradients, but weight decay and Adam's step count) shows in step 2's KL. Its
    `reward` is a reward LoRA adapter (`write_reward_adapter`), which the reward model and the value model's start
    merge into their base."""
    recipe = {
        "stage": "ppo", "model_name_or_path": str(pretrained), "reward_model_path": str(reward), "dataset_name":
        "embedded:prompts", "output_dir": str(directory / "ppo_warmup"), "total_episodes": 32,
        "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "num_ppo_epochs": 1,
        "response_length": 8, "learning_rate": 1e-3, "weight_decay": 10.0, "critic_warmup_steps": 1,
        "max_eval_samples": 4, "eval_samples_per_prompt": 1, "sample_steps": 1, "seed": 5,
    }  # fmt: skip
    path = directory / "ppo_warmup.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def write_dpo(directory, pretrained, reward) -> str:
    """DPO: TRL's trainer, plus hfgen's own passes outside it (held-out log-probs, the generation comparison judged
    by the oracle and a reward model)."""
    return shrunk("dpo.yaml", directory, model_name_or_path=str(pretrained), reward_model_path=str(reward),
                  max_steps=2, per_device_train_batch_size=4, max_train_samples=32, max_eval_samples=8,
                  eval_num_prompts=4, eval_samples_per_prompt=1, eval_response_length=8,
                  output_dir=str(directory / "dpo"), **TRAINER_KEYS)  # fmt: skip


def write_grpo(directory, pretrained, reward) -> str:
    """GRPO scored by a reward model alone, and its held-out comparison with the starting model."""
    recipe = {
        "stage": "grpo", "model_name_or_path": str(pretrained), "reward_model_path": str(reward),
        "reward_functions": [], "oracle_function": ORACLE, "dataset_name": "embedded:prompts", "max_train_samples": 32,
        "max_eval_samples": 4, "eval_samples_per_prompt": 1, "num_generations": 2, "per_device_train_batch_size": 4,
        "max_completion_length": 8, "max_steps": 1, "bf16": False, "activation_checkpointing": False,
        "output_dir": str(directory / "grpo"), "report_to": "none", **TRAINER_KEYS,
    }  # fmt: skip
    path = directory / "grpo.yaml"
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


def write_reward_adapter(path, reward):
    """A reward LoRA adapter (SEQ_CLS, as a reward LoRA run's checkpoints hold) on the seeded reward model, its B
    matrices drawn non-zero so that merging it changes the scores (under ZeRO-3 it once merged into the empty
    placeholders of zero.Init's partitioned weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(reward, num_labels=1)
    adapter = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj"]))
    torch.manual_seed(1)
    for name, weight in adapter.named_parameters():
        if "lora_B" in name:
            weight.data.normal_(0, 0.5)
    adapter.save_pretrained(path)
    AutoTokenizer.from_pretrained(reward).save_pretrained(path)
    return path


# The jobs of each engine's launch, in order: pretraining from a config; the pipeline (SFT -> reward -> PPO, all full
# fine-tuning); SFT, reward and PPO with LoRA, and PPO's LoRA on the SFT LoRA run; the diffusion stages (a VAE, then
# t2i on it; the flow transformer on a 16-channel VAE trained beforehand), but for t2i and t2i_flow under ZeRO-3
# (refused); DPO and GRPO (TRL's trainers, with hfgen's passes outside them). PPO's critic warm-up under DDP and
# DeepSpeed (which steps inside the backward), its reward model a LoRA adapter.
TEXT_JOBS = ("pretrain", "pipeline", "sft_lora", "reward_lora", "ppo_lora", "ppo_on_lora")
JOBS = {
    "ddp": (*TEXT_JOBS, "ppo_warmup", "dpo", "grpo"),
    "zero3": (*TEXT_JOBS, "ppo_warmup", "vae", "dpo", "grpo"),
    "fsdp2": (*TEXT_JOBS, "vae", "t2i", "t2i_flow", "dpo", "grpo"),
    "zero2": (*TEXT_JOBS, "ppo_warmup", "vae", "t2i", "t2i_flow", "dpo", "grpo"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(engine) -> {job: output dir}: the engine's jobs, in one launch made on the first call (the seconds it
    took are printed)."""
    pytest.importorskip("deepspeed")
    from diffusion_fixtures import T2I_RECIPE, VAE_RECIPE, t2i_overrides, vae_overrides, write_tiny_configs
    from stages.test_t2i_flow import FLOW_RECIPE, flow_overrides, train_vae16, write_flow_configs
    from tiny_models import save_tiny_llama

    root = tmp_path_factory.mktemp("engines")
    pretrained = save_tiny_llama(root / "pretrained", pretrain_steps=30)
    reward = write_reward_model(root / "reward", pretrained)
    reward_adapter = write_reward_adapter(root / "reward_adapter", reward)
    configs = write_tiny_configs(root)
    (root / "flow_configs").mkdir()
    flow_configs = write_flow_configs(root / "flow_configs")
    vae16 = train_vae16(flow_configs, root / "vae16")
    launched = {}

    def run(engine: str) -> dict:
        if engine not in launched:
            launched[engine] = None  # a failed launch fails once; the tests that need it fail fast
            directory = root / engine
            directory.mkdir()
            jobs = {  # job -> (recipe and overrides, written on demand; output dir)
                "pretrain": (lambda: [write_pretrain(directory)], directory / "pretrain"),
                "pipeline": (lambda: [write_pipeline(directory, pretrained)], directory),
                "sft_lora": (lambda: [write_sft_lora(directory, pretrained)], directory / "sft_lora"),
                "reward_lora": (lambda: [write_reward_lora(directory, pretrained)], directory / "reward_lora"),
                "ppo_lora": (lambda: [write_ppo_lora(directory, pretrained, reward)], directory / "ppo_lora"),
                "ppo_on_lora": (lambda: [write_ppo_lora(directory, directory / "sft_lora", reward, "ppo_on_lora")],
                                directory / "ppo_on_lora"),
                "ppo_warmup": (lambda: [write_ppo_warmup(directory, pretrained, reward_adapter)], directory / "ppo_warmup"),
                "vae": (lambda: [VAE_RECIPE, *vae_overrides(configs, directory / "vae", steps=3)], directory / "vae"),
                "t2i": (lambda: [T2I_RECIPE, *t2i_overrides(configs, directory / "vae", directory / "t2i", steps=3),
                                 "--eval_images_per_prompt", "0"], directory / "t2i"),
                "t2i_flow": (lambda: [FLOW_RECIPE, *flow_overrides(flow_configs, vae16, directory / "t2i_flow", steps=3),
                                      "--eval_images_per_prompt", "0"], directory / "t2i_flow"),
                "dpo": (lambda: [write_dpo(directory, pretrained, reward)], directory / "dpo"),
                "grpo": (lambda: [write_grpo(directory, pretrained, reward)], directory / "grpo"),
            }  # fmt: skip
            args = [arg for job in JOBS[engine] for arg in ("--then", *jobs[job][0]())][1:]
            started = time.time()
            result = launch(engine, free_port(), *args)
            print(f"{engine}: {time.time() - started:.0f} s for {', '.join(JOBS[engine])}")
            assert result.returncode == 0, f"{engine}:\n{result.stderr[-6000:]}"
            launched[engine] = {job: jobs[job][1] for job in JOBS[engine]}
        if launched[engine] is None:
            pytest.fail(f"the {engine} launch failed (its first test shows why)")
        return launched[engine]

    return run


def fingerprints_agree(run_dir) -> bool:
    prints = [(run_dir / f"weights-rank{rank}.sha256").read_text() for rank in (0, 1)]
    return prints[0] == prints[1]


def assert_same_weights(ours: dict, theirs: dict, what: str, atol: float = 1e-5) -> None:
    assert ours.keys() == theirs.keys(), what
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=atol, msg=f"{what}: {name}")


def assert_whole_run(run) -> None:
    """Complete, trained on 2 processes, the same full weights on both."""
    assert tracking.is_complete(run) and tracking.read_json(run / "env.json")["world_size"] == 2, run
    assert fingerprints_agree(run), run


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero2", "zero3"])
def test_pretraining(runs, engine):
    """From a config: the model loads, its loss fell, and under FSDP2 and ZeRO-2 it equals DDP's. Under ZeRO-3 transformers
    builds the model under `zero.Init` and draws its initial weights with the main process's RNG, without the
    default torch initialisation the other engines draw first: another (equally seeded) start, so not compared."""
    from transformers import AutoModelForCausalLM

    run = runs(engine)["pretrain"]
    assert_whole_run(run)
    results = tracking.read_json(run / "eval.json")
    assert results["eval_loss"] < results["eval_loss_initial"] - 0.1
    ours = AutoModelForCausalLM.from_pretrained(run).state_dict()
    if engine in ("fsdp2", "zero2"):
        theirs = AutoModelForCausalLM.from_pretrained(runs("ddp")["pretrain"]).state_dict()
        assert_same_weights(ours, theirs, engine)
    # tied embeddings saved once, as under DDP (ZeRO-2 and FSDP2 once wrote the LM head too)
    assert saved_names(run) == saved_names(runs("ddp")["pretrain"]), engine
    # the same tokens through the same model: the same total_flos (under ZeRO-3 Trainer counted the partitioned
    # parameters a process held, 0 for each process's first micro-batch, so a resumed run's figure differed)
    if engine == "zero3":
        flos = [row["total_flos"] for run in (run, runs("ddp")["pretrain"]) for row in tracking.read_metrics(run)
                if "total_flos" in row]  # fmt: skip
        assert len(flos) == 2 and flos[0] == flos[1], flos


@pytest.mark.parametrize("engine", ["zero3", "fsdp2", "zero2"])
def test_pipeline_outputs_load_and_equal_ddp(runs, engine):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for step, model_class in (("sft", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification),
                              ("ppo", AutoModelForCausalLM)):  # fmt: skip
        run, ddp = runs(engine)["pipeline"] / step, runs("ddp")["pipeline"] / step
        assert_whole_run(run)
        ours, theirs = model_class.from_pretrained(run).state_dict(), model_class.from_pretrained(ddp).state_dict()
        assert_same_weights(ours, theirs, f"{engine} {step}")
        assert saved_names(run) == saved_names(ddp), (engine, step)  # tied embeddings saved once, as under DDP
    # the policy's EMA (`ema_decay`), averaged shard by shard under FSDP2 / ZeRO-3: whole, and equal to DDP's
    ours, theirs = (
        AutoModelForCausalLM.from_pretrained(runs(name)["pipeline"] / "ppo" / "ema") for name in (engine, "ddp")
    )
    assert_same_weights(ours.state_dict(), theirs.state_dict(), f"{engine} ppo ema")
    policy = AutoModelForCausalLM.from_pretrained(runs(engine)["pipeline"] / "ppo").state_dict()
    assert any(not torch.equal(policy[k], v) for k, v in ours.state_dict().items())  # the average lags the policy
    assert tracking.is_complete(runs(engine)["pipeline"] / "rlhf")


def saved_names(run_dir) -> set[str]:
    from safetensors import safe_open

    with safe_open(run_dir / "model.safetensors", "pt") as weights:
        return set(weights.keys())


def first_updates(run_dir) -> tuple[list, list[dict]]:
    """(responses sampled at steps 1 and 2, metrics of steps 1 and 2): step 2's KL measures the first update."""
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return [row["response"] for row in samples if row["step"] <= 2], tracking.read_metrics(run_dir)[:2]


@pytest.mark.parametrize("engine", ["zero3", "fsdp2", "zero2"])
def test_ppo_first_update_equals_ddp_on_the_same_rollout(runs, engine):
    for job in ("pipeline", "ppo_lora"):
        run, ddp = (runs(name)[job] / "ppo" if job == "pipeline" else runs(name)[job] for name in (engine, "ddp"))
        (responses, ours), (ddp_responses, theirs) = first_updates(run), first_updates(ddp)
        assert responses == ddp_responses, job  # the same sampled tokens went into both updates
        for step in (0, 1):
            for key in FIRST_UPDATE:  # (the KL of step 1 is ~1e-7 noise: policy == reference there)
                assert ours[step][key] == pytest.approx(theirs[step][key], rel=1e-4, abs=1e-6), (job, step, key)


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_ppo_critic_warmup_leaves_the_policy_alone_as_under_ddp(runs, engine):
    """The warm-up step trains the value model only: the policy samples step 2 unchanged (KL to the reference ~0),
    and the first real update, Adam's first step, equals DDP's (DeepSpeed once took a policy step in the warm-up:
    weight decay, Adam's step count)."""
    from transformers import AutoModelForCausalLM

    run, ddp = runs(engine)["ppo_warmup"], runs("ddp")["ppo_warmup"]
    assert_whole_run(run)
    (responses, ours), (ddp_responses, theirs) = first_updates(run), first_updates(ddp)
    assert responses == ddp_responses
    assert abs(ours[1]["objective/kl"]) < 1e-4
    for step in (0, 1):
        for key in FIRST_UPDATE:
            assert ours[step][key] == pytest.approx(theirs[step][key], rel=1e-4, abs=1e-6), (step, key)
    ours, theirs = (AutoModelForCausalLM.from_pretrained(path).state_dict() for path in (run, ddp))
    assert_same_weights(ours, theirs, f"{engine} ppo_warmup")


@pytest.mark.parametrize("engine", ["zero3", "fsdp2", "zero2"])
def test_lora_runs_save_adapters_that_load_on_their_base_and_equal_ddp(runs, engine):
    """SFT and PPO with a LoRA policy: an adapter (no full model) that peft loads on its base, equal to DDP's; a LoRA
    reward model: one plain classifier, its adapters merged, equal to DDP's."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForSequenceClassification

    from hfgen.models import load_causal_lm

    for job, inside in (("sft_lora", ""), ("ppo_lora", ""), ("ppo_lora", "ema")):
        run, ddp = runs(engine)[job] / inside, runs("ddp")[job] / inside
        if not inside:  # the EMA adapter (`ema_decay`) sits inside the PPO run
            assert_whole_run(run)
        assert (run / "adapter_model.safetensors").is_file() and not (run / "model.safetensors").exists()
        ours = AutoPeftModelForCausalLM.from_pretrained(run).state_dict()
        # Adam moves a weight by about the learning rate whatever its gradient's size, so float noise in a gradient
        # near zero leaves an odd adapter element ~1e-5 off (LoRA's B matrices start at zero); the losses agree.
        theirs = AutoPeftModelForCausalLM.from_pretrained(ddp).state_dict()
        assert_same_weights(ours, theirs, f"{engine} {job} {inside}", atol=1e-4)
    # PPO's LoRA on the SFT LoRA run: the earlier adapter merged in first (its weights gathered under ZeRO-3), the
    # new adapter's base that run, loaded as a chain by hfgen
    run, ddp = runs(engine)["ppo_on_lora"], runs("ddp")["ppo_on_lora"]
    assert_whole_run(run)
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        runs(engine)["sft_lora"]
    )
    ours, theirs = (load_causal_lm(str(path), "float32").state_dict() for path in (run, ddp))
    assert_same_weights(ours, theirs, f"{engine} ppo_on_lora", atol=1e-4)
    losses = [
        [row["loss"] for row in tracking.read_metrics(runs(name)["sft_lora"]) if "loss" in row]
        for name in (engine, "ddp")
    ]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    run, ddp = runs(engine)["reward_lora"], runs("ddp")["reward_lora"]
    assert_whole_run(run)
    assert not (run / "adapter_model.safetensors").exists()
    ours = AutoModelForSequenceClassification.from_pretrained(run).state_dict()
    theirs = AutoModelForSequenceClassification.from_pretrained(ddp).state_dict()
    assert_same_weights(ours, theirs, f"{engine} reward_lora")


@pytest.mark.parametrize("engine", ["zero3", "fsdp2", "zero2"])
def test_trl_stages_own_passes_see_whole_weights_and_equal_ddp(runs, engine):
    # DPO's held-out log-probs and generation comparison, GRPO's comparison, both scored by a reward model too:
    # hfgen's passes outside TRL's Trainer (under ZeRO-3 they once read partitioned weights, or hung on rank 0 alone;
    # DPO's judge, loaded partitioned and never gathered, failed the run after its save: probe 44 D1)
    for job, keys in (("dpo", ("logps/chosen", "logps/rejected", "kl_to_reference", "dpo/oracle", "sft/reward_model",
                               "dpo/reward_model")),
                      ("grpo", ("kl_to_reference", "sft/reward", "grpo/reward", "grpo/oracle"))):  # fmt: skip
        assert_whole_run(runs(engine)[job])
        ours, ddp = (tracking.read_json(runs(name)[job] / "eval.json") for name in (engine, "ddp"))
        assert ours["parameters"] == ddp["parameters"] > 0, job
        for key in keys:
            assert ours[key] == pytest.approx(ddp[key], rel=1e-4, abs=1e-6), (job, key)


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_diffusion_stages_save_whole_models_that_load(runs, engine):
    """The VAE loads with its latent scaling factor and equals ZeRO-2's (DDP's arithmetic); the t2i pipeline
    trained on it loads and renders; the flow pipeline loads and renders, its transformer equal to ZeRO-2's."""
    from diffusers import AutoencoderKL, DiffusionPipeline, SD3Transformer2DModel

    vae_dir = runs(engine)["vae"]
    assert_whole_run(vae_dir)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    assert vae.config.scaling_factor == pytest.approx(tracking.read_json(vae_dir / "eval.json")["vae/scaling_factor"])
    if engine != "zero2":
        assert_same_weights(vae.state_dict(), AutoencoderKL.from_pretrained(runs("zero2")["vae"]).state_dict(), engine)
    if "t2i" in runs(engine):
        assert_whole_run(runs(engine)["t2i"])
        pipeline = DiffusionPipeline.from_pretrained(runs(engine)["t2i"])
        image = pipeline("a handwritten digit 3", num_inference_steps=2, output_type="np").images[0]
        assert image.shape[-1] == 3 and abs(image).sum() > 0
    if "t2i_flow" in runs(engine):
        run = runs(engine)["t2i_flow"]
        assert_whole_run(run)
        pipeline = DiffusionPipeline.from_pretrained(run, text_encoder_3=None, tokenizer_3=None)
        image = pipeline("a handwritten digit 3", num_inference_steps=2, max_sequence_length=0, output_type="np")
        assert abs(image.images[0]).sum() > 0
        if engine != "zero2":
            ours, theirs = (SD3Transformer2DModel.from_pretrained(runs(name)["t2i_flow"], subfolder="transformer")
                            for name in (engine, "zero2"))  # fmt: skip
            assert_same_weights(ours.state_dict(), theirs.state_dict(), f"{engine} t2i_flow")


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_trainer_stages_save_whole_models_whatever_the_launch_says_to_save(tmp_path, engine):
    """Under ZeRO-3 launched without --zero3_save_16bit_model (accelerate's default) the Trainer saved DeepSpeed's
    shards (global_step*/) and no weights; under FSDP2 with SHARDED_STATE_DICT (recipes/accelerate/fsdp.yaml's) it
    saved nothing at all. Both runs ended COMPLETE without a model, and the next stage failed on it (probe 42 B1, B2).
    The run now holds a model that loads, its checkpoints the engine's state a resume reads (under ZeRO-3 the 16-bit
    model too; under FSDP2's sharded state dict nothing gathered: review 42 #2): the run given a third step continues
    from checkpoint-2."""
    from transformers import AutoModelForCausalLM

    from tiny_models import save_tiny_llama

    pretrained = save_tiny_llama(tmp_path / "pretrained")
    run = tmp_path / "continued"
    recipe = shrunk("pretrain.yaml", tmp_path, model_name_or_path=str(pretrained), config_name=None,
                    tokenizer_name=None, block_size=64, max_steps=2, warmup_steps=0, per_device_train_batch_size=4,
                    max_train_samples=32, max_eval_samples=8, output_dir=str(run),
                    **{**TRAINER_KEYS, "save_strategy": "steps", "save_steps": 1})  # fmt: skip
    options = {"env": {"FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}} if engine == "fsdp2" else {}
    more = [recipe, "--max_steps", "3", "--overwrite_output_dir", "true", "--resume_from_checkpoint", "true"]
    result = launch(engine, free_port(), recipe, "--then", *more, zero3_save_16bit_model=False, **options)
    assert result.returncode == 0, result.stderr[-6000:]
    assert_whole_run(run)
    assert [row["step"] for row in tracking.read_metrics(run) if "loss" in row] == [1, 2, 3]
    # checkpoint-2 is the first run's, kept (resumed from), not written again by a fresh start after env.json
    written = (run / "checkpoint-2" / tracking.CHECKPOINT_STATE).stat().st_mtime_ns
    assert written < (run / "env.json").stat().st_mtime_ns < (run / "checkpoint-3").stat().st_mtime_ns
    resume_state = "global_step3" if engine == "zero3" else "pytorch_model_fsdp_0"
    checkpoints = [run / "checkpoint-2", run / "checkpoint-3"]
    for saved in [run, *checkpoints] if engine == "zero3" else [run]:
        assert AutoModelForCausalLM.from_pretrained(saved).num_parameters() > 0, saved
        assert saved_names(saved) == saved_names(pretrained), saved
    if engine == "fsdp2":  # the sharded state alone: no whole model gathered at each save
        assert not any((checkpoint / "model.safetensors").exists() for checkpoint in checkpoints)
    assert (run / "checkpoint-3" / resume_state).is_dir()
    assert not list(run.glob("global_step*"))  # the finished run: the model alone


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
    # A recipe that keeps `use_cpu: true` (the tiny recipes' default) under a DeepSpeed launch: PPO's own loop died
    # on an AttributeError inside accelerate's set-up.
    ppo = ["--model_name_or_path", tiny_model(tmp_path), "--reward_model_path", "null", "--reward_functions",
           ORACLE, "--output_dir", tmp_path / "ppo", "--use_cpu", "true"]  # fmt: skip
    result = launch("zero3", free_port(), REPO / "recipes/tiny/ppo.yaml", *ppo)
    assert re.search(r"exitcode\s*:\s*2", result.stderr) and "set use_cpu: false" in result.stderr
    assert "hfgen: error:" in result.stderr and f'File "{REPO / "src"}' not in result.stderr  # no hfgen traceback


def tiny_model(directory):
    from tiny_models import save_tiny_llama

    return save_tiny_llama(directory / "tiny")
