"""GRPO (group relative policy optimization) with verifiable rewards and/or a reward model, on TRL's `GRPOTrainer`.

    hfgen train recipes/tiny/grpo_arithmetic.yaml      (after recipes/tiny/arithmetic_sft.yaml)
    ACCELERATE_USE_CPU=true accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml scripts/train.py recipes/tiny/grpo_arithmetic.yaml

Recipe keys are TRL's `GRPOConfig` (num_generations, max_completion_length, beta, epsilon, epsilon_high, loss_type,
scale_rewards, mask_truncated_completions, use_vllm, ...), `ModelConfig` (LoRA) and hfgen's data and reward keys
(see hfgen.group_rl, which also says what hfgen adds to TRL: records, exact resume, prompt templating).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trl import GRPOConfig as TRLGRPOConfig
from trl import ModelConfig

from hfgen import group_rl
from hfgen.group_rl import GroupRLArguments, disable_dropout_field


@dataclass
class GRPOConfig(TRLGRPOConfig):
    """TRL's, with dropout off by default (`group_rl.disable_dropout_field`)."""

    disable_dropout: bool = disable_dropout_field()


ARGUMENTS = (ModelConfig, GroupRLArguments, GRPOConfig)
KEYS_WITHOUT_COUNTERPART = group_rl.KEYS_WITHOUT_COUNTERPART  # (read by hfgen.recipe: no spelling hint for them)


def check(model_args: ModelConfig, data_args: GroupRLArguments, config: GRPOConfig) -> list[str]:
    return group_rl.check(model_args, data_args, config)


def run(model_args: ModelConfig, data_args: GroupRLArguments, config: GRPOConfig) -> Path:
    from trl import GRPOTrainer

    return group_rl.run(GRPOTrainer, "grpo", model_args, data_args, config)
