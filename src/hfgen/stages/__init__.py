"""Stage registry. Each stage is one module exposing:

    ARGUMENTS: tuple of dataclass types; the recipe's keys are the union of their fields.
    check(*configs) -> list[str]   (optional) problems found before heavy work: missing files, bad columns.
    run(*configs) -> pathlib.Path  trains, saves into `output_dir`, returns it.
    refused_engines(*configs) -> dict[str, str]   (optional) engines the stage cannot run under (ddp, fsdp2,
                                   zero2, zero3, ...) -> why; such a launch stops before any model loads.

`configs` are instances of ARGUMENTS, in order. A stage never imports another stage: the `rlhf`
pipeline runs its steps through `hfgen.train.run_recipe`, the same entry a user calls.
"""

from __future__ import annotations

import importlib

# name -> (module, what it trains: `hfgen train --help` lists these)
_REGISTRY = {
    "pretrain": ("hfgen.stages.pretrain", "causal-LM pretraining, from a config (scratch) or a pretrained model"),
    "sft": ("hfgen.stages.sft", "supervised fine-tuning, full / LoRA / QLoRA (TRL SFTTrainer)"),
    "reward": ("hfgen.stages.reward", "Bradley-Terry reward model from preference pairs (TRL RewardTrainer)"),
    "ppo": ("hfgen.stages.ppo", "PPO against a reward model with a KL penalty to the reference policy (hfgen's own)"),
    "grpo": ("hfgen.stages.grpo", "GRPO with rule rewards and/or a reward model (TRL GRPOTrainer)"),
    "rloo": ("hfgen.stages.rloo", "RLOO, the same way (TRL RLOOTrainer)"),
    "dpo": ("hfgen.stages.dpo", "direct preference optimisation, every TRL loss type, from preference pairs"),
    "kto": ("hfgen.stages.kto", "KTO, from unpaired (or paired) thumbs-up / thumbs-down data"),
    "orpo": ("hfgen.stages.orpo", "ORPO: SFT plus an odds-ratio penalty, no reference model"),
    "simpo": ("hfgen.stages.simpo", "SimPO: length-normalised implicit reward, no reference model"),
    "rlhf": ("hfgen.stages.rlhf", "the pipeline: SFT -> reward model -> PPO/GRPO/RLOO, or SFT -> DPO/KTO/ORPO/SimPO"),
    "vae": ("hfgen.stages.vae", "autoencoder (AutoencoderKL) for latent diffusion"),
    "t2i": ("hfgen.stages.t2i", "text-to-image UNet (SD 1.x layout), full or LoRA, buckets, DreamBooth"),
    "t2i_flow": (
        "hfgen.stages.t2i_flow",
        "flow-matching transformer (SD3 / Flux layout), full or LoRA, buckets, DreamBooth",
    ),
}
STAGES = {name: module for name, (module, _) in _REGISTRY.items()}
SUMMARIES = {name: summary for name, (_, summary) in _REGISTRY.items()}


def load_stage(name: str):
    from hfgen.errors import UserError

    try:
        return importlib.import_module(STAGES[name])
    except ModuleNotFoundError as error:
        if error.name == STAGES[name]:
            raise UserError(f"stage '{name}' is not available in this version of hfgen.") from None
        raise
