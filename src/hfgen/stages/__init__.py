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

STAGES = {
    "pretrain": "hfgen.stages.pretrain",  # causal-LM pretraining (from scratch or continued)
    "sft": "hfgen.stages.sft",  # supervised fine-tuning: full, LoRA, QLoRA (TRL SFTTrainer)
    "reward": "hfgen.stages.reward",  # Bradley-Terry reward model (TRL RewardTrainer)
    "ppo": "hfgen.stages.ppo",  # PPO against a reward model, with KL penalty (our own)
    "grpo": "hfgen.stages.grpo",  # GRPO with rule rewards and/or a reward model (TRL GRPOTrainer)
    "rloo": "hfgen.stages.rloo",  # RLOO, the same way (TRL RLOOTrainer)
    "dpo": "hfgen.stages.dpo",  # direct preference optimisation, every TRL loss type (TRL DPOTrainer)
    "kto": "hfgen.stages.kto",  # KTO from unpaired or paired preferences (TRL KTOTrainer)
    "orpo": "hfgen.stages.orpo",  # ORPO: SFT + odds-ratio penalty, no reference (TRL experimental ORPOTrainer)
    "simpo": "hfgen.stages.simpo",  # SimPO: length-normalised, reference-free (TRL experimental CPOTrainer)
    "rlhf": "hfgen.stages.rlhf",  # SFT -> reward -> PPO pipeline
    "vae": "hfgen.stages.vae",  # AutoencoderKL for latent diffusion
    "t2i": "hfgen.stages.t2i",  # text-to-image UNet training, full or LoRA
    "t2i_flow": "hfgen.stages.t2i_flow",  # flow-matching transformer (SD3 layout), full or LoRA
}


def load_stage(name: str):
    from hfgen.errors import UserError

    try:
        return importlib.import_module(STAGES[name])
    except ModuleNotFoundError as error:
        if error.name == STAGES[name]:
            raise UserError(f"stage '{name}' is not available in this version of hfgen.") from None
        raise
