"""PPO for language models (RLHF step 3): the SFT policy learns to please a reward model and/or rule-based reward
functions, held near the SFT model by a per-token KL penalty. Our own loop on transformers + accelerate.

    hfgen train recipes/tiny/ppo.yaml
    ACCELERATE_USE_CPU=true accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml scripts/train.py recipes/tiny/ppo.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml scripts/train.py recipes/smollm2-135m/rlhf/ppo.yaml

Four models (Ouyang et al. 2022; Huang et al. 2024): the policy (trained; `use_peft` trains LoRA adapters, and
then the reference is the same model with its adapters disabled, not a second copy), the frozen reference (the
SFT model), a frozen reward model (one-label `AutoModelForSequenceClassification`) and/or reward functions
(`module:function(prompts, responses) -> scores`), and a value model (the same class, initialised from the reward
model by default, trained). Each step: sample responses -> score them at the first EOS -> per-token KL penalty,
GAE and whitening -> `num_ppo_epochs` epochs of clipped policy and value losses over shuffled minibatches.
Keys follow TRL's last PPOTrainer (trl <= 1.10) where one existed, so its recipes carry over.

Deviations from the papers and from TRL's PPOTrainer, each deliberate:
- The score goes on the response's last token (its first EOS); TRL added it one token later, past the EOS.
- The reward model reads the policy's own token ids when it shares the policy's tokenizer (as TRL did), else
  prompt + response re-rendered as text with its own tokenizer and chat template, as TRL's RewardTrainer rendered
  its training pairs; either way a response cut off without EOS is shown unfinished (TRL appended EOS to all).
  `hfgen eval` scores with the same `RewardScorer`.
- Options TRL lacked (OpenRLHF / DeepSpeed-Chat): reward normalisation and clipping, a critic learning rate and
  warm-up, LoRA on the value model, an EMA of the policy, PPO-ptx, KL as a loss term, an entropy bonus, and a
  reward-hacking monitor (hfgen.rl.monitor) that can stop the run.
- Advantage (and reward) whitening and the adaptive KL controller use statistics of the global batch (all
  processes), so N processes behave like one process with N times the batch.
- The old log-probs pi_old come from the logits `generate` already computed (TRL did the same); reference and
  value forward passes run the LM head / value head on response positions only.
- Rollout prompts are a seeded permutation indexed by step, so resuming needs no dataloader state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal, NamedTuple

import torch
from trl import ModelConfig

from hfgen import guard, loop, tracking
from hfgen.data.formats import tools_problems
from hfgen.data.prepare import (
    TextDataArguments,
    check_text_data,
    checking_template,
    data_source,
    load_for_stage,
    record,
)
from hfgen.errors import UserError
from hfgen.evaluation.policy import Sampling, compare_to_reference, distinct_prompts, format_comparison, judge_policy
from hfgen.finetune import check_model_config, float32_fully_trained_modules, run_first_hint
from hfgen.generate import prompts_are_chat
from hfgen.group_rl import chat_prompts_field, chat_prompts_problems, prepare_prompts, prompt_template_problems
from hfgen.models import (
    check_model_source,
    diffusers_dir_problem,
    fit_max_length,
    not_a_reward_model,
    position_limit,
    read_config,
)
from hfgen.rl import functional as F
from hfgen.rl.kl_control import AdaptiveKLController, FixedKLController
from hfgen.rl.metrics import format_metrics, scored_figure, step_metrics
from hfgen.rl.models import (
    drop_long_prompts,
    load_oracle,
    load_policy_and_reference,
    load_scorer,
    load_value_model,
    make_generation_config,
    parameter_groups,
    prompt_room,
    stop_token_ids,
    training_precision,
)
from hfgen.rl.monitor import HackingMonitorArguments, build_monitor, monitor_problems
from hfgen.rl.policy_weights import PolicyEMA, PolicySnapshots
from hfgen.rl.ptx import draw_ptx, pretraining_loss, ptx_examples, ptx_rows, ptx_tokens
from hfgen.rl.records import global_means, reward_ceiling, start_samples, watch_for_hacking, write_samples
from hfgen.rl.rollout import (
    WHY_NO_COLUMNS,
    PolicyAndValue,
    episode_ids,
    function_name,
    function_scores,
    left_pad,
    load_function,
    prompt_rows,
    reference_logprobs,
    response_texts,
    rollout_values,
    same_name_problems,
    sample_responses,
    sampled_logprobs,
    unmet_arguments,
)
from hfgen.rl.types import PPOStats, Rollout, RolloutDetails


@dataclass
class PPODataArguments(TextDataArguments):
    prompt_column: str = field(default="prompt", metadata={"help": "Column of prompts: strings or chat messages."})
    chat_prompts: str = chat_prompts_field()
    max_prompt_length: int = field(default=256, metadata={"help": "Prompts longer than this (tokens) are dropped."})
    eval_samples_per_prompt: int = field(
        default=4, metadata={"help": "Responses per held-out prompt in the final SFT-vs-PPO evaluation."}
    )


@dataclass
class PPOConfig(HackingMonitorArguments):
    """PPO settings. Batch hierarchy per process, exactly TRL's (its `local_batch_size` was the same product): a
    rollout of per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches prompts, split into
    num_mini_batches shuffled minibatches for each of num_ppo_epochs epochs, each minibatch
    gradient_accumulation_steps micro-batches (one optimiser step)."""

    output_dir: str | None = field(default=None, metadata={"help": "Where the policy, value model and records go."})
    seed: int = field(default=42, metadata={"help": "Seed; each process samples with seed + its rank."})
    # -- models beside the policy (the policy and reference come from model_name_or_path)
    reward_model_path: str | None = field(
        default=None, metadata={"help": "Reward model dir (one-label sequence classifier), e.g. a reward run."}
    )
    reward_functions: list[str] = field(
        default_factory=list,
        metadata={"help": "Rule-based rewards 'module:function' taking (prompts, responses) -> list of floats."},
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Weights of [reward model, *reward_functions] in the score (default: all 1)."},
    )
    value_model_path: str | None = field(
        default=None, metadata={"help": "Value model init; default: the reward model, else the policy + a new head."}
    )
    oracle_function: str | None = field(
        default=None,
        metadata={"help": "A judge 'module:function' logged each step and in the final evaluation, never trained on."},
    )
    eval_functions: list[str] = field(
        default_factory=list,
        metadata={"help": "More judges 'module:function' for the final SFT-vs-PPO evaluation (e.g. on-topic share)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    # -- episodes and batches
    total_episodes: int = field(default=1024, metadata={"help": "Prompts to roll out over the whole run."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Micro-batch size (sequences)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per minibatch."})
    num_mini_batches: int = field(
        default=1, metadata={"help": "Minibatches per rollout (as in TRL, the rollout is this many minibatches)."}
    )
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    local_rollout_forward_batch_size: int = field(
        default=64,
        metadata={
            "help": "Sequences per no-grad generation/forward chunk in the rollout (the samples draw "
            "chunk by chunk: another size samples other responses from the same seed)."
        },
    )
    # -- sampling
    response_length: int = field(default=53, metadata={"help": "Maximum new tokens per response."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature, also applied to log-probs."})
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling; below 1 the samples no longer follow the policy exactly."}
    )
    missing_eos_penalty: float | None = field(
        default=1.0,
        metadata={
            "help": "Subtracted from the score of responses cut off without EOS (the reward model also sees them "
            "unfinished), so the policy learns to stop; about one standard deviation of a reward model's scores. "
            "None or 0: off."
        },
    )
    # -- reward shaping and advantages
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty coefficient beta (initial value if adaptive)."})
    kl_estimator: Literal["k1", "k3"] = field(default="k1", metadata={"help": "Per-token KL estimator."})
    kl_target: float | None = field(
        default=None, metadata={"help": "Adaptive KL control toward this KL (nats per response); None: fixed beta."}
    )
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive KL controller horizon, in episodes."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten per-token rewards before GAE."})
    reward_normalization: Literal["none", "running", "sft"] = field(
        default="none",
        metadata={
            "help": "Normalise scores to mean 0, std 1: 'running' with every score so far, 'sft' with the first "
            "rollout's (the SFT policy's responses, Huang et al. detail 11), 'none'."
        },
    )
    reward_clip: float | None = field(
        default=None, metadata={"help": "Clip the (normalised) score to [-reward_clip, reward_clip] (DeepSpeed-Chat)."}
    )
    kl_loss_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of KL(policy || reference) as a loss term; with kl_coef 0 it replaces the penalty."},
    )
    kl_loss_estimator: Literal["k2", "k3"] = field(default="k3", metadata={"help": "KL estimator of the loss term."})
    entropy_coef: float = field(
        default=0.0, metadata={"help": "Entropy bonus: subtracts coef x entropy from the loss."}
    )
    reward_ceiling: float | None = field(
        default=None,
        metadata={
            "help": "Scores above it are suspect (monitor); default: score_max of the reward run's eval.json, else off."
        },
    )
    ptx_coef: float = field(
        default=0.0, metadata={"help": "PPO-ptx (InstructGPT): weight of the LM loss on ptx_dataset_name per update."}
    )
    ptx_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Data of the ptx loss (train split): plain texts (loss on every token), or SFT data in any layout "
            "the sft stage reads, e.g. chat messages (embedded:instructions), rendered with the chat template, loss "
            "on the assistant's tokens: PPO then keeps the SFT skills."
        },
    )
    ptx_column: str = field(default="text", metadata={"help": "Text column of a plain-text ptx_dataset_name."})
    ptx_max_length: int = field(default=128, metadata={"help": "Tokens per ptx example (longer ones are cut)."})
    ema_decay: float | None = field(
        default=None, metadata={"help": "Keep an EMA copy of the policy's weights (DeepSpeed-Chat), saved to ema/."}
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    # -- losses and optimisation
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip range epsilon."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value prediction clip range."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss weight."})
    learning_rate: float = field(default=3e-6, metadata={"help": "AdamW learning rate (policy and value)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name."})
    warmup_steps: int = field(default=0, metadata={"help": "Warm-up, in PPO steps (rollouts)."})
    critic_learning_rate: float | None = field(
        default=None, metadata={"help": "AdamW learning rate of the value model; None: learning_rate."}
    )
    critic_warmup_steps: int = field(
        default=0, metadata={"help": "First N PPO steps train only the value model (the policy is frozen)."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-5, metadata={"help": "AdamW epsilon (1e-5 as in the RLHF papers)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 disables."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory (policy)."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision for the trained models."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on CPU even when a GPU is present."})
    # -- records
    logging_steps: int = field(
        default=1, metadata={"help": "Print a metrics line every N steps (all go to metrics.jsonl)."}
    )
    sample_steps: int = field(
        default=10, metadata={"help": "Print and save a prompt/response/score table every N steps."}
    )
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps; 0: no checkpoints."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint dir, or true for the latest in output_dir."}
    )
    report_to: list[str] = field(
        default_factory=lambda: ["none"], metadata={"help": "accelerate trackers (tensorboard, wandb, ...) or none."}
    )

    @property
    def model_init_kwargs(self) -> None:
        """Read by hfgen.finetune.load_model; PPO loads its models with the model keys alone."""
        return None


ARGUMENTS = (ModelConfig, PPODataArguments, PPOConfig)
# upstream keys with no counterpart here (a spelling hint sent max_length to max_prompt_length): `recipe.build_recipe`
KEYS_WITHOUT_COUNTERPART = {
    "max_length": "PPO caps the prompts (max_prompt_length) and the answers (response_length) apart",
}


VALUE_MODEL_NEEDED = (
    "a value model: give a decoder sharing the policy's vocabulary (a reward model, or a causal LM), or leave "
    "value_model_path out to start it from the reward model"
)


def check(model_args: ModelConfig, data_args: PPODataArguments, config: PPOConfig) -> list[str]:
    # hfgen's own loop prepares the policy (and value model) inside one module: a tied embedding in
    # lora_modules_to_save trains under FSDP2 there
    problems = check_model_config(model_args, config.trust_remote_code, trainer_prepared=False)
    for key in ("reward_model_path", "value_model_path"):
        if getattr(config, key):
            path = getattr(config, key)
            problems += check_model_source(key, path, run_first_hint(path), trust_remote_code=config.trust_remote_code)
    if config.reward_model_path and not problems:
        problems += not_a_reward_model(config.reward_model_path, "reward_model_path")
    if config.value_model_path and not problems:  # a vae or pipeline failed at its load, on the tokenizer
        problems += diffusers_dir_problem("value_model_path", config.value_model_path, VALUE_MODEL_NEEDED)
    if config.value_model_path and not problems:  # a classifier of several labels would not load as one, nor an
        from hfgen.models import reward_model_problem  # adapter whose base changed start from the one it trained

        problems += filter(None, [reward_model_problem("value_model_path", config.value_model_path,
                                                       config.trust_remote_code)])  # fmt: skip
    if config.value_model_path and not problems:
        from hfgen.models import load_tokenizer
        from hfgen.rl.models import value_vocabulary_problem

        policy_tokenizer = load_tokenizer(model_args.model_name_or_path, config.trust_remote_code)
        problems += filter(None, [value_vocabulary_problem(config.value_model_path, policy_tokenizer,
                                                           config.trust_remote_code)])  # fmt: skip
    if not config.reward_model_path and not config.reward_functions:
        problems.append("no reward: set reward_model_path and/or reward_functions")
    problems += same_name_problems(config.reward_functions)
    components = int(bool(config.reward_model_path)) + len(config.reward_functions)
    if config.reward_weights is not None and len(config.reward_weights) != components:
        problems.append(f"reward_weights has {len(config.reward_weights)} values for {components} reward(s)")
    for spec in [*config.reward_functions, *([config.oracle_function] if config.oracle_function else []),
                 *config.eval_functions]:  # fmt: skip
        try:
            unmet = unmet_arguments(load_function(spec))
        except ValueError as error:
            problems.append(f"reward function {error}")
            continue
        if unmet:
            problems.append(
                f"reward function '{spec}' needs argument(s) {unmet} after (prompts, responses); {WHY_NO_COLUMNS}"
            )
    positive = ("total_episodes", "per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches",
                "num_ppo_epochs", "local_rollout_forward_batch_size", "response_length", "kl_horizon")  # fmt: skip
    problems += [
        f"{key} must be at least 1, got {getattr(config, key)}" for key in positive if getattr(config, key) < 1
    ]
    if config.temperature <= 0 or not 0 < config.top_p <= 1:
        problems.append(f"temperature must be > 0 and top_p in (0, 1], got {config.temperature} and {config.top_p}")
    if not (0 <= config.gamma <= 1 and 0 <= config.lam <= 1):
        problems.append(f"gamma and lam must lie in [0, 1], got {config.gamma} and {config.lam}")
    if config.ptx_coef and not config.ptx_dataset_name:
        problems.append("ptx_coef needs ptx_dataset_name (the data of the ptx loss)")
    if config.ptx_dataset_name and config.ptx_coef:  # its data now, not after every model has loaded
        try:
            ptx_rows(config)
        except UserError as error:
            problems.append(str(error))
    if config.ptx_dataset_name and config.ptx_coef:
        problems += zero3_ptx_problems(model_args, config)
    if config.ptx_dataset_name and not config.ptx_coef:  # else the data would be silently unused
        problems.append(
            f"ptx_dataset_name '{config.ptx_dataset_name}' needs ptx_coef > 0 (the ptx loss's weight); "
            "ptx_dataset_name: null trains without ptx"
        )
    if config.kl_loss_estimator != PPOConfig.kl_loss_estimator and not config.kl_loss_coef:
        problems.append(
            f"kl_loss_estimator '{config.kl_loss_estimator}' needs kl_loss_coef > 0 (the KL loss's weight): without "
            "it there is no KL loss to estimate"
        )
    problems += monitor_problems(config)
    if config.ema_decay is not None and not 0 < config.ema_decay < 1:
        problems.append(f"ema_decay must lie in (0, 1), got {config.ema_decay}")
    if config.reward_clip is not None and config.reward_clip <= 0:
        problems.append(f"reward_clip must be > 0 (or unset), got {config.reward_clip}")
    for key in ("critic_warmup_steps", "entropy_coef", "kl_loss_coef", "ptx_coef", "critic_learning_rate"):
        if (getattr(config, key) or 0) < 0:
            problems.append(f"{key} must be >= 0, got {getattr(config, key)}")
    problems += scheduler_problems(config.lr_scheduler_type)
    if config.kl_target is not None and config.kl_target <= 0:
        problems.append(f"kl_target must be > 0 (or unset for a fixed kl_coef), got {config.kl_target}")
    problems += adaptive_kl_problems(config)
    if config.missing_eos_penalty is not None and config.missing_eos_penalty < 0:
        problems.append(
            f"missing_eos_penalty is subtracted from the score: give a positive value, got {config.missing_eos_penalty}"
        )
    if min(config.logging_steps, config.sample_steps, config.save_steps) < 0 or data_args.eval_samples_per_prompt < 0:
        problems.append("logging_steps, sample_steps, save_steps and eval_samples_per_prompt must be >= 0")
    problems += chat_prompts_problems(data_args)
    template = checking_template(model_args.model_name_or_path, config.trust_remote_code)  # renders every prompt
    splits, data_problems = check_text_data(
        data_args, "prompt", {"prompt": data_args.prompt_column}, seed=config.seed, template=template
    )
    if splits:  # the rollout renders the prompts without function definitions
        data_problems += tools_problems(splits[0], "ppo", data_source(data_args))
    if splits and not problems + data_problems:
        data_problems += prompt_template_problems(model_args, data_args, config, splits[0])
    if splits and not problems + data_problems:
        data_problems += prompt_length_problems(model_args, data_args, config, splits)
    if config.ptx_dataset_name and config.ptx_coef and not problems + data_problems:
        data_problems += ptx_length_problems(model_args, config)
    return problems + data_problems


def zero3_ptx_problems(model_args, config) -> list[str]:
    """PPO-ptx on a Mixture-of-Experts policy under DeepSpeed ZeRO-3: the PPO loss's and the ptx loss's policy
    forwards in one backward make ZeRO-3 put a routed model's parameter twice in one gradient bucket (DeepSpeed's
    bare AssertionError in __reduce_and_partition_ipg_grads at the first update, both ranks; z3 leaf modules on the
    MoE block do not help). A dense policy, ZeRO-2, FSDP2 and DDP train it."""
    from transformers import AutoConfig

    from hfgen.finetune import resolved
    from hfgen.loop import launched_engine
    from hfgen.models import base_model_of

    if launched_engine() != "zero3":
        return []
    try:
        policy = AutoConfig.from_pretrained(
            resolved(base_model_of(model_args.model_name_or_path)), trust_remote_code=config.trust_remote_code
        )
    except (OSError, ValueError):  # the model's own check says what is wrong with it
        return []
    if not hasattr(policy.get_text_config(), "output_router_logits"):  # (TRL's test for a MoE model too)
        return []
    return [
        f"ptx_coef {config.ptx_coef} under DeepSpeed ZeRO-3 with a Mixture-of-Experts policy "
        f"('{model_args.model_name_or_path}', {policy.model_type}): ZeRO-3 fails at the first update when the PPO and "
        "ptx losses' forwards of a routed model share one backward. Set ptx_coef: 0 and ptx_dataset_name: null, or "
        "launch under ZeRO-2 or FSDP2 (recipes/accelerate/deepspeed_zero2.yaml, fsdp.yaml)"
    ]


def ptx_length_problems(model_args, config, records: dict | None = None) -> list[str]:
    """ptx examples left with no token to learn within ptx_max_length, refused as the run refuses them
    (`ptx_examples`), found before any model loads: on a sample, or with `records` on every example, the drops
    counted there (hfgen check's data report). At the ptx_max_length the run trains with: a model with learned
    positions (GPT-2, OPT) lowers it to them (`fit_max_length`)."""
    from hfgen.data.loading import ROWS_CHECKED
    from hfgen.models import load_tokenizer, within_learned_positions

    tokenizer = load_tokenizer(model_args.model_name_or_path, config.trust_remote_code)
    config = within_learned_positions(model_args.model_name_or_path, config, "ptx_max_length")
    try:
        ptx_examples(tokenizer, config, records, rows_checked=None if records is not None else ROWS_CHECKED)
    except UserError as error:
        return [str(error)]
    return []


def adaptive_kl_problems(config) -> list[str]:
    """`kl_target`'s controller (`AdaptiveKLController`) multiplies kl_coef by 1 + clip(KL / kl_target - 1, +-0.2) x
    episodes / kl_horizon each step (Ziegler et al., for steps far smaller than the horizon): from 0 it stays 0, and
    with a step of at least 5 x kl_horizon episodes a KL under target makes it 0 or negative (a KL bonus). The step's
    episodes at the launched world size (WORLD_SIZE; `hfgen train --num_processes` checks at that size first)."""
    if config.kl_target is None or config.kl_target <= 0:
        return []
    problems = []
    if config.kl_coef <= 0:
        problems.append(
            f"kl_target {config.kl_target} adapts kl_coef by multiplying it: from kl_coef {config.kl_coef} it "
            "stays there for the whole run; give kl_coef > 0, its starting value"
        )
    local_batch = config.per_device_train_batch_size * config.gradient_accumulation_steps * config.num_mini_batches
    episodes = local_batch * int(os.environ.get("WORLD_SIZE", "1"))
    if config.kl_horizon >= 1 and 0.2 * episodes >= config.kl_horizon:
        problems.append(
            f"kl_horizon {config.kl_horizon} is at most 1/5 of a step's {episodes} episodes: kl_target's update "
            f"multiplies kl_coef by as little as 1 - 0.2 x {episodes} / {config.kl_horizon}, making it 0 or negative "
            f"(a KL bonus) the first time KL is under kl_target; give kl_horizon well above {5 * episodes} episodes "
            "(default 10000)"
        )
    return problems


def prompt_length_problems(model_args, data_args, config, splits, records: dict | None = None) -> list[str]:
    """More than half of (a sample of) the prompts over max_prompt_length, found before any model loads; with
    `records`, the drops counted there (hfgen check's data report)."""
    from hfgen.data.loading import ROWS_CHECKED
    from hfgen.models import load_tokenizer

    tokenizer = load_tokenizer(model_args.model_name_or_path, config.trust_remote_code)
    policy_config = read_config(model_args.model_name_or_path, config.trust_remote_code)
    room = data_args.max_prompt_length  # the limit the run keeps them within: lowered to a model's learned positions
    try:
        if policy_config is not None:
            room = prompt_room(SimpleNamespace(config=policy_config), room, config.response_length)
    except UserError as error:
        return [str(error)]
    for rows, split in zip(splits[:2], ("train", "eval")):
        rows = rows if records is not None else rows.select(range(min(ROWS_CHECKED, len(rows))))
        try:
            prompts = prepare_prompts(rows, data_args, tokenizer, model_path=model_args.model_name_or_path)
            drop_long_prompts(tokenizer, prompts, room, {} if records is None else records, split,
                              *prompt_limit_words(room, data_args, config, policy_config))  # fmt: skip
        except UserError as error:
            return [str(error)]
    return []


def prompt_limit_words(room: int, data_args, config, policy_config) -> tuple[str, str]:
    """(the prompt limit in words, what to change) for `drop_long_prompts`: max_prompt_length's own, unless
    `prompt_room` lowered it to what response_length leaves in a model's learned positions (raising
    max_prompt_length would change nothing)."""
    if room == data_args.max_prompt_length:
        return "", ""
    return (
        f"{room} tokens, the room response_length={config.response_length} leaves in the "
        f"{position_limit(policy_config)} positions {policy_config.model_type} models learn",
        "lower response_length",
    )


def scheduler_problems(name: str) -> list[str]:
    """The learning-rate schedules this loop can step: transformers' names, less the ones that need a metric
    (reduce_lr_on_plateau, greedy) or arguments PPO has no key for (min_lr, num_decay_steps)."""
    from transformers import SchedulerType

    needs_more = ("reduce_lr_on_plateau", "greedy", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                  "warmup_stable_decay")  # fmt: skip
    usable = [s.value for s in SchedulerType if s.value not in needs_more]
    if name in usable:
        return []
    return [f"lr_scheduler_type '{name}' is not one this loop can step; use one of {', '.join(usable)}"]


def run(model_args: ModelConfig, data_args: PPODataArguments, config: PPOConfig) -> Path:
    from accelerate.utils import set_seed

    from hfgen.recipe import SEED_MAX

    output_dir = Path(config.output_dir)
    trackers = [name for name in config.report_to if name != "none"]
    precision, trained_args = training_precision(model_args, config)
    accelerator = loop.make_accelerator(
        output_dir, config.seed, config.gradient_accumulation_steps, precision, cpu=config.use_cpu, log_with=trackers
    )
    local_batch = config.per_device_train_batch_size * config.gradient_accumulation_steps * config.num_mini_batches
    global_batch = local_batch * accelerator.num_processes
    total_steps = math.ceil(config.total_episodes / global_batch)
    if config.critic_warmup_steps >= total_steps:
        raise UserError(
            f"critic_warmup_steps {config.critic_warmup_steps} covers the whole run ({total_steps} steps of "
            f"{global_batch} episodes): the policy would never train; lower it or raise total_episodes"
        )

    # Models: policy (+ reference), value model, reward model and reward functions.
    tokenizer, policy, reference = load_policy_and_reference(trained_args, config)
    value_model = load_value_model(trained_args, config, tokenizer)
    if model_args.use_peft and precision != "no":
        for model in (policy, value_model):  # their modules_to_save (the value head) train float32, as LoRA does
            float32_fully_trained_modules(model)
    scorer = load_scorer(model_args, config, tokenizer)
    oracle = load_oracle(config)

    # Data: prompts tokenized once; each step takes a slice of a seeded permutation (see `prompt_rows`).
    # Any prompt layout (text, chat messages, a preference or SFT file's prompts) arrives as a `prompt` column.
    train_rows, eval_rows, data_records = load_for_stage(
        data_args, "prompt", seed=config.seed, default_columns={"prompt": data_args.prompt_column}
    )
    max_prompt_length = prompt_room(policy, data_args.max_prompt_length, config.response_length)
    # plain-string prompts to a chat model as one user turn (`chat_prompts`), as GRPO and RLOO send them
    train_rows = prepare_prompts(train_rows, data_args, tokenizer, data_records, model_args.model_name_or_path)
    eval_rows = prepare_prompts(eval_rows, data_args, tokenizer, model_path=model_args.model_name_or_path)
    # (the rows within max_prompt_length, and their token ids: the prompts are rendered and tokenized once)
    (train_rows, train_queries), (eval_rows, _) = (
        drop_long_prompts(
            tokenizer,
            rows,
            max_prompt_length,
            data_records,
            split,
            *prompt_limit_words(max_prompt_length, data_args, config, policy.config),
        )  # fmt: skip
        for rows, split in ((train_rows, "train"), (eval_rows, "eval"))
    )
    fit_max_length(policy, config, "ptx_max_length")
    ptx_data = ptx_examples(tokenizer, config, data_records) if config.ptx_coef else None
    record(output_dir, data_records)
    train_prompts, eval_prompts = list(train_rows["prompt"]), distinct_prompts(eval_rows["prompt"])

    # Optimiser over policy and value parameters; one PPO step = one rollout = one scheduler step.
    trainable = PolicyAndValue(policy, value_model)
    optimizer = adamw = loop.adamw(
        parameter_groups(trainable, config), config.learning_rate,
        (config.adam_beta1, config.adam_beta2), config.weight_decay, config.adam_epsilon, fused=True,
    )  # fmt: skip
    # the policy's schedule starts when it trains, after the critic warm-up (OpenRLHF's actor and critic schedules)
    starts = [config.critic_warmup_steps if group["part"] == "policy" else 0 for group in optimizer.param_groups]
    scheduler = loop.lr_schedule(
        accelerator, config.lr_scheduler_type, optimizer, config.warmup_steps, total_steps, starts
    )
    trainable, optimizer = loop.prepare(
        accelerator, trainable, optimizer,
        micro_batch_size=config.per_device_train_batch_size, max_grad_norm=config.max_grad_norm,
    )  # fmt: skip
    reference = loop.prepare_frozen(accelerator, reference)
    scorer.reward_model = loop.prepare_frozen(accelerator, scorer.reward_model)
    if config.kl_target is None:
        kl_controller = FixedKLController(config.kl_coef)
    else:
        kl_controller = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
    reward_normalizer = F.RewardNormalizer(config.reward_normalization, config.reward_clip)
    policy_ema = None
    if config.ema_decay is not None:
        policy_ema = PolicyEMA(accelerator, accelerator.unwrap_model(trainable).policy, config.ema_decay)
    monitor = build_monitor(config, reward_ceiling(config), config.reward_weights)
    accelerator.register_for_checkpointing(kl_controller, reward_normalizer, *filter(None, [policy_ema, monitor]))

    # stop_on_hacking's copies of recent policies travel with the checkpoints: an alert soon after a resume keeps
    # what it would have kept without the kill
    snapshots = PolicySnapshots() if config.stop_on_hacking else None
    save_snapshots, load_snapshots = (snapshots.save, snapshots.load) if snapshots is not None else (None, None)
    # weights (what trains), optimiser, scheduler, KL coefficient, every RNG
    budget = total_steps, f"total_episodes: {config.total_episodes} ({total_steps} steps of {global_batch} episodes)"
    start_step = loop.resume(accelerator, config.resume_from_checkpoint, output_dir, budget, load_snapshots)
    if not start_step:
        # each process samples differently (within numpy's seeds, which the check bounds `seed` by)
        set_seed((config.seed + accelerator.process_index) % (SEED_MAX + 1))
    metrics_logger = tracking.MetricsLogger(output_dir)  # cut back to the checkpoint by `loop.resume`
    if accelerator.is_main_process:
        start_samples(output_dir, start_step)
    divergence = guard.Divergence(output_dir)
    if trackers:
        settings = {k: v for k, v in dataclasses.asdict(config).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("hfgen-ppo", config=settings)
    accelerator.print(
        f"PPO: {total_steps} steps x {global_batch} episodes ({accelerator.num_processes} process(es)), "
        f"{config.num_ppo_epochs} epochs x {config.num_mini_batches} minibatch(es) x "
        f"{config.gradient_accumulation_steps} micro-batch(es) of {config.per_device_train_batch_size}"
    )

    stop_ids = stop_token_ids(tokenizer, policy)
    generation_config = make_generation_config(
        tokenizer, config.response_length, config.temperature, config.top_p, stop_ids, models=[policy]
    )
    all_reduce = (lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 else None
    judge = None
    if snapshots is not None:  # stop_on_hacking's judgement of the policy in place, on held-out prompts
        judging_prompts, per_prompt = monitor.judging_prompts(eval_prompts or distinct_prompts(train_prompts))
        judging = Sampling(
            per_prompt, config.response_length, config.temperature, config.top_p, config.seed,
            config.local_rollout_forward_batch_size, max_prompt_length,
        )  # fmt: skip

        def judge() -> float:
            with loop.gathered(accelerator, trainable, scorer.reward_model) as (whole, reward_model):
                with accelerator.autocast():
                    return judge_policy(
                        whole.policy, tokenizer, judging_prompts, judging,
                        dataclasses.replace(scorer, reward_model=reward_model), monitor.repeat_cost,
                    )  # fmt: skip

    started = time.perf_counter()
    last_step, stopped, rollout = total_steps, {}, None
    if monitor is not None and monitor.alerts and config.stop_on_hacking:
        # Resumed from the checkpoint of the step whose alert stopped the run (a kill during the final save or
        # evaluation, a resume of the complete run): the monitor raises each signal once, so the loop would train
        # on past the stop. The run ends as it did, keeping the same policies (their copies are in the checkpoint).
        last_step, stopped = monitor.alerts[0].step, stop_on_hacking(accelerator, trainable, snapshots, monitor, judge)
    for step in range(start_step + 1, total_steps + 1) if not stopped else ():
        # 1. Rollout: this process's prompts for the step, responses sampled from the current policy, scored.
        step_started = time.perf_counter()
        rows = prompt_rows(step, len(train_queries), global_batch, local_batch, accelerator.process_index, config.seed)
        prompts = [train_prompts[i] for i in rows]
        with loop.gathered(accelerator, trainable, reference, scorer.reward_model) as (unwrapped, ref, reward_model):
            rollout, details, timing = collect_rollout(
                accelerator, unwrapped, ref, dataclasses.replace(scorer, reward_model=reward_model), tokenizer,
                generation_config, prompts, [train_queries[i] for i in rows], config, reward_normalizer,
                values=not values_from_first_pass(config),
            )  # fmt: skip
        if snapshots is not None:  # the candidates to keep if the monitor stops the run a few steps later
            snapshots.take(step, accelerator.unwrap_model(trainable).policy, monitor.oldest_keepable_step())
        # 2. Rewards and advantages: KL-penalised per-token rewards, GAE, whitening. The values come from the
        # update's first forward pass when that pass covers the whole rollout (`values_from_first_pass`).
        first_pass, first_pass_started = None, time.perf_counter()
        if rollout.values is None:
            rollout, first_pass = first_training_pass(trainable, rollout)
        first_pass_s = time.perf_counter() - first_pass_started
        rollout, shaping = compute_advantages(rollout, kl_controller.value, config, all_reduce)
        timing["advantages"] = time.perf_counter() - step_started - sum(timing.values()) - first_pass_s
        # 3. PPO update: epochs of clipped policy and value losses over shuffled minibatches.
        train_started = time.perf_counter()
        guard.kill_point("step", step)
        check = functools.partial(divergence.check_step, step, optimizer=optimizer)
        train_policy = step > config.critic_warmup_steps
        with contextlib.nullcontext() if train_policy else policy_frozen(adamw):
            stats = ppo_update(
                accelerator, trainable, optimizer, rollout, config, train_policy, policy_ema, ptx_data, check,
                first_pass,
            )  # fmt: skip
        timing["training"] = time.perf_counter() - train_started + first_pass_s
        lr = scheduler.get_last_lr()[0]  # the rate this step's update used (read before the schedule moves on)
        scheduler.step()

        # 4. Records: global means of the step's figures, the KL controller's update, samples, checkpoint.
        local = step_metrics(
            rollout, details, shaping["kl"], shaping["kl_rewards"], stats, timing, config.num_ppo_epochs, all_reduce
        )
        if oracle is not None:  # the mean over the responses it scored (None: unscored), over every process
            local |= scored_figure("oracle/score", function_scores(oracle, prompts, details.texts, accelerator.device))
        metrics = global_means(accelerator, local)
        metrics |= {"objective/kl_coef": kl_controller.value, "lr": lr}
        kl_controller.update(metrics["objective/kl"], n_steps=global_batch)
        metrics |= {"episode": step * global_batch, "eps": global_batch / (time.perf_counter() - step_started)}
        alerts = watch_for_hacking(accelerator, monitor, step, metrics, details, rollout) if monitor else []
        metrics_logger.log(step, **metrics)
        if trackers:
            accelerator.log({name: value for name, value in metrics.items() if value is not None}, step=step)
        if config.logging_steps and (step % config.logging_steps == 0 or step in (1, total_steps)):
            accelerator.print(format_metrics(step, total_steps, metrics))
        if config.sample_steps and (step % config.sample_steps == 0 or step in (1, total_steps)):
            if accelerator.is_main_process:
                write_samples(output_dir, step, prompts, details.texts, rollout.scores, oracle)
        if (config.save_steps and step % config.save_steps == 0 and step < total_steps) or guard.signalled():
            checkpoint = loop.save_checkpoint(accelerator, output_dir, step, config.save_total_limit, save_snapshots)
            guard.exit_on_signal(checkpoint)
        if alerts and config.stop_on_hacking:
            last_step, stopped = step, stop_on_hacking(accelerator, trainable, snapshots, monitor, judge)
            break
    train_runtime = time.perf_counter() - started
    if rollout is not None:  # (a resume of a complete or stopped run trains nothing)
        check_final_models(accelerator, trainable, rollout, config, last_step)

    # Save: the policy (full model or LoRA adapter) with the tokenizer, the value model beside it; whole weights.
    state = loop.full_state_dict(accelerator, trainable)
    trained = accelerator.unwrap_model(trainable)
    if accelerator.is_main_process:
        trained.policy.save_pretrained(output_dir, state_dict=loop.part(state, "policy"))
        tokenizer.save_pretrained(output_dir)
        guard.kill_point("final_save")
        trained.value_model.save_pretrained(output_dir / "value_model", state_dict=loop.part(state, "value_model"))
    if policy_ema is not None:
        policy_ema.save(state, output_dir / "ema")
        if accelerator.is_main_process:  # ema/ is a model of its own: generate and eval read its tokenizer
            tokenizer.save_pretrained(output_dir / "ema")
    del state
    loop.maybe_write_fingerprint(accelerator, trainable, output_dir)

    # Evaluate: the SFT (reference) policy against the PPO policy on held-out prompts (`hfgen.evaluation.policy`).
    guard.kill_point("eval")
    sampling = Sampling(
        data_args.eval_samples_per_prompt, config.response_length, config.temperature, config.top_p, config.seed,
        config.local_rollout_forward_batch_size, max_prompt_length,
    )  # fmt: skip
    judges = {function_name(spec): load_function(spec) for spec in config.eval_functions}
    with loop.gathered(accelerator, trainable, reference, scorer.reward_model) as (trained, reference, reward_model):
        with accelerator.autocast():
            results, rows = compare_to_reference(
                accelerator, trained.policy, reference, tokenizer, eval_prompts, sampling,
                dataclasses.replace(scorer, reward_model=reward_model), oracle, name="ppo", judges=judges,
            )  # fmt: skip
    results |= {
        "episodes": last_step * global_batch,  # the whole run's, as group_rl's; the rate is this session's
        "train_runtime_s": train_runtime,
        "episodes_per_s": max(last_step - start_step, 0) * global_batch / max(train_runtime, 1e-9),
        "steps": last_step,
        # how its prompts were rendered, for `hfgen generate` / `eval` to prompt it the same way
        "trained_on_chat": prompts_are_chat(train_rows, tokenizer),
        "stopped_early": False,
        **stopped,
        # ema/ averages every update up to the last step trained, the stop's included: stop_on_hacking keeps
        # earlier policies, not an earlier EMA
        **({"ema_through_step": last_step} if policy_ema is not None else {}),
        **(monitor.summary() if monitor else {}),
    }
    if accelerator.is_main_process:
        tracking.update_eval(output_dir, results)
        if rows:
            tracking.write_jsonl(output_dir / "policy_eval.jsonl", rows)
            accelerator.print(format_comparison(results, "ppo"))
    tracking.finish_trackers(accelerator)  # the process group outlives the stage: tracking.shutdown_distributed
    return output_dir


def check_final_models(accelerator, trainable, rollout: Rollout, config: PPOConfig, step: int) -> None:
    """Before the save, on every process: the trained policy's log-probabilities of the last rollout's responses
    and the value model's values there (its first micro-batch). The guard saw only the last update's loss and
    gradients: an update that broke the models saved them, and the final evaluation then sampled from NaN."""
    rows = torch.arange(min(len(rollout), config.per_device_train_batch_size), device=rollout.input_ids.device)
    batch = rollout.select(rows)
    with torch.no_grad(), loop.gathered(accelerator, trainable) as (whole,), accelerator.autocast():
        whole.eval()
        logits, values = whole(batch.input_ids, batch.attention_mask, batch.context_length)
    logprobs = F.token_logprobs(logits, batch.response_ids, config.temperature)
    guard.check_final_model(
        config.output_dir,
        step,
        {
            "log-probability of the last rollout's responses": F.masked_mean(logprobs, batch.response_mask).item(),
            "value on the last rollout's responses": F.masked_mean(values, batch.response_mask).item(),
        },
    )


def stop_on_hacking(accelerator, trainable, snapshots: PolicySnapshots, monitor, judge=None) -> dict:
    """Put back the average of the recent policies the monitor judges best (`HackingMonitor.judged_keep`; `judge()`
    judges the policy in place, on every process), or without a judgement (`monitor_keep_samples` 0) those of the
    steps before the first alert's signal set in (`HackingMonitor.kept_steps`) -> eval.json's record of the stop."""
    from accelerate.utils import broadcast_object_list

    alert, policy = monitor.alerts[0], accelerator.unwrap_model(trainable).policy
    steps, judged = monitor.kept_steps(), {}
    if judge is not None and monitor.keep_samples:
        for step in (s for s in monitor.candidate_steps() if s in snapshots.copies):
            snapshots.restore(policy, [step])
            judged[step] = judge()
        if accelerator.num_processes > 1:  # the main process's figures: a kernel's rounding on one rank must not
            judged = broadcast_object_list([judged])[0]  # make it keep other steps than the rest (other shards)
        if judged:
            accelerator.print("stop_on_hacking: the policies judged (reward less the repeats' cost, held-out "
                              "answers): " + ", ".join(f"step {s} {score:.3f}" for s, score in judged.items()))  # fmt: skip
            steps = monitor.judged_keep(judged)
    kept = snapshots.restore(policy, steps)
    policies = f"the policy of step {kept[0]}"
    if len(kept) > 1:
        policies = f"the average of the policies of steps {', '.join(map(str, kept))}"
    accelerator.print(f"stop_on_hacking: stopped at step {alert.step}; the output is {policies}")
    return {"stopped_early": True, "stopped_at_step": alert.step, "stop_reason": alert.message,
            "stop_signal": alert.signal, "kept_policy_of_steps": kept,
            "judged_policies": {str(step): score for step, score in judged.items()}}  # fmt: skip


# ---- one PPO step -----------------------------------------------------------------------------------


def collect_rollout(
    accelerator, unwrapped, reference, scorer, tokenizer, generation_config, prompts, queries, config,
    reward_normalizer=None, values: bool = True,
):  # fmt: skip
    """Sample responses from the current policy, then score them: reward, reference log-probs, values (with
    `values=False` left to the update's first pass: `values_from_first_pass`). The models come unwrapped, with
    full weights (`loop.gathered`).
    -> (Rollout without advantages, RolloutDetails, {"generation": seconds, "scoring": seconds})."""
    unwrapped.eval()
    chunk = config.local_rollout_forward_batch_size
    query_ids, query_mask = left_pad(queries, tokenizer.pad_token_id, accelerator.device)
    started = time.perf_counter()
    with accelerator.autocast():  # bf16 rollouts when mixed precision is on (the models keep float32 weights)
        sampled = sample_responses(
            unwrapped.policy, query_ids, query_mask, generation_config, chunk, tokenizer.pad_token_id
        )
    generated = time.perf_counter()

    # Score at the first EOS (detail 1): everything after it is padding, masked out of every loss.
    stop_ids = generation_config.eos_token_id  # every stop token of the model (it may have several)
    mask = F.response_mask(sampled.response_ids, stop_ids)
    responses = F.truncate_after_eos(sampled.response_ids, stop_ids, tokenizer.pad_token_id)
    has_eos = F.has_stop_token(responses, stop_ids)
    input_ids = torch.cat([query_ids, responses], dim=1)
    attention_mask = torch.cat([query_mask, mask.long()], dim=1)
    context_length = query_ids.shape[1]
    texts = response_texts(tokenizer, responses, stop_ids)
    with accelerator.autocast():
        scores, components = scorer(
            prompts, texts, has_eos.tolist(), accelerator.device, episode_ids(queries, responses, mask)
        )
        ref_logprobs = reference_logprobs(
            unwrapped.policy, reference, input_ids, attention_mask, context_length, config.temperature, chunk
        )
        logprobs = sampled_logprobs(
            accelerator, unwrapped.policy, sampled, input_ids, attention_mask, context_length, config.temperature, chunk
        )
        old_values = None
        if values:
            old_values = rollout_values(unwrapped.value_model, input_ids, attention_mask, context_length, chunk) * mask
    all_reduce = (lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 else None
    scores = shape_scores(scores, has_eos, config, reward_normalizer, all_reduce)
    rollout = Rollout(
        input_ids=input_ids, attention_mask=attention_mask, context_length=context_length, response_mask=mask,
        logprobs=logprobs * mask, ref_logprobs=ref_logprobs * mask, values=old_values, scores=scores,
    )  # fmt: skip
    timing = {"generation": generated - started, "scoring": time.perf_counter() - generated}
    return rollout, RolloutDetails(texts, components, sampled.entropy, has_eos), timing


def shape_scores(scores, has_eos, config: PPOConfig, reward_normalizer=None, all_reduce=None) -> torch.Tensor:
    """The score PPO trains on: `missing_eos_penalty` off the score of a response that never stopped (detail 2), in
    the reward's own units (as TRL subtracts it), then normalised and clipped (`RewardNormalizer`; the statistics
    of every process's scores), so it lies in [-reward_clip, reward_clip] (DeepSpeed-Chat and OpenRLHF clip last)."""
    if config.missing_eos_penalty:
        scores = scores - config.missing_eos_penalty * (~has_eos).float()
    if reward_normalizer is not None:
        reward_normalizer.update(scores, all_reduce)
        scores = reward_normalizer(scores)
    return scores


def compute_advantages(rollout: Rollout, kl_coef: float, config: PPOConfig, all_reduce):
    """Per-token KL penalty plus the score at the end (detail 3), GAE over response tokens (detail 4), whitened
    advantages (detail 5). -> (Rollout with advantages and returns, {"kl": (B, T), "kl_rewards": (B, T)})."""
    mask = rollout.response_mask
    kl = F.kl_per_token(rollout.logprobs, rollout.ref_logprobs, config.kl_estimator) * mask
    rewards, kl_rewards = F.kl_penalised_rewards(rollout.scores, kl, kl_coef, mask)
    if config.whiten_rewards:
        rewards = F.masked_whiten(rewards, mask, shift_mean=False, all_reduce=all_reduce)
    advantages, returns = F.generalized_advantage_estimation(rewards, rollout.values, mask, config.gamma, config.lam)
    advantages = F.masked_whiten(advantages, mask, all_reduce=all_reduce)
    return dataclasses.replace(rollout, advantages=advantages, returns=returns), {"kl": kl, "kl_rewards": kl_rewards}


def values_from_first_pass(config: PPOConfig) -> bool:
    """Whether the rollout's values V_old come from the update's first forward pass rather than a no-grad pass of
    their own: with one micro-batch per update (num_mini_batches and gradient_accumulation_steps 1) that pass
    covers every episode with the weights that sampled them, so it gives the same values, one pass fewer."""
    return config.num_mini_batches == 1 and config.gradient_accumulation_steps == 1


class FirstPass(NamedTuple):
    rows: torch.Tensor  # (B,) the first epoch's shuffled order of the rollout
    outputs: tuple[torch.Tensor, torch.Tensor]  # the trained models' (logits, values) over it, with their graph


def first_training_pass(trainable, rollout: Rollout) -> tuple[Rollout, FirstPass]:
    """The update's first micro-batch forward pass, run before the advantages (`values_from_first_pass`): the
    whole rollout in the first epoch's shuffled order (drawn here, where `ppo_update` would draw it, so the random
    stream is unchanged). -> (the rollout with its values V_old, the pass for `ppo_update` to take the loss of)."""
    trainable.train()
    rows = torch.randperm(len(rollout), device=rollout.input_ids.device)
    batch = rollout.select(rows)
    logits, values = trainable(batch.input_ids, batch.attention_mask, batch.context_length)
    old_values = torch.empty_like(values, requires_grad=False)
    old_values[rows] = values.detach()
    return dataclasses.replace(rollout, values=old_values * rollout.response_mask), FirstPass(rows, (logits, values))


def ppo_update(
    accelerator, trainable, optimizer, rollout: Rollout, config: PPOConfig, train_policy: bool = True, ema=None,
    ptx_data: list[tuple[list[int], list[int]]] | None = None, check=None, first_pass: FirstPass | None = None,
) -> list[PPOStats]:  # fmt: skip
    """`num_ppo_epochs` passes over the rollout in shuffled minibatches of micro-batches (details 8, 15), one
    optimiser step per minibatch. `train_policy=False` (critic warm-up) takes the value loss only (the optimizer's
    steps leave the policy alone inside `policy_frozen`); `ema` (a
    `PolicyEMA` of the policy's trained weights) follows each step; `check(loss)` (the divergence
    guard) runs before each optimiser step; `first_pass` (`first_training_pass`) is the first micro-batch's forward
    pass, already run.

    Every loss term is a mean over the tokens of the whole minibatch (all its micro-batches, on every process), as
    transformers' Trainer weighs tokens with `num_items_in_batch`: a micro-batch's token mean is weighted by its
    share of the minibatch's tokens, times the micro-batches x processes that accelerate's backward and the
    engine's gradient averaging divide by. The update then does not depend on how the minibatch is split into
    per_device_train_batch_size x gradient_accumulation_steps x processes (with one micro-batch on one process
    every weight is exactly 1)."""
    trainable.train()
    micro_batch_size = config.per_device_train_batch_size
    minibatch_size = micro_batch_size * config.gradient_accumulation_steps
    divided_by = accelerator.gradient_accumulation_steps * accelerator.num_processes
    stats = []
    for epoch in range(config.num_ppo_epochs):
        if epoch == 0 and first_pass is not None:
            order = first_pass.rows
        else:
            order = torch.randperm(len(rollout), device=rollout.input_ids.device)
        for minibatch in order.split(minibatch_size):
            tokens = minibatch_tokens(accelerator, [rollout.response_mask[minibatch].sum()])
            ptx_batches = ptx_weights = [None] * config.gradient_accumulation_steps
            if ptx_data is not None:  # the minibatch's examples drawn at once, to count their tokens first
                picked = draw_ptx(ptx_data, len(minibatch))
                ptx_batches = [picked[i : i + micro_batch_size] for i in range(0, len(picked), micro_batch_size)]
                ptx_total = minibatch_tokens(accelerator, [ptx_tokens(picked)])
                ptx_weights = [ptx_tokens(batch) * divided_by / ptx_total for batch in ptx_batches]
            for rows, ptx_batch, ptx_weight in zip(minibatch.split(micro_batch_size), ptx_batches, ptx_weights):
                outputs, first_pass = (first_pass.outputs if first_pass is not None else None), None
                weight = rollout.response_mask[rows].sum().item() * divided_by / tokens
                with accelerator.accumulate(trainable):
                    loss, micro_batch_stats = ppo_loss(
                        accelerator, trainable, rollout.select(rows), config, train_policy, ptx_batch, outputs,
                        weight, ptx_weight,
                    )  # fmt: skip
                    accelerator.backward(loss)
                    loop.clip_gradients(accelerator, trainable, config.max_grad_norm)
                    if accelerator.sync_gradients and check is not None:
                        check(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                    if ema is not None and accelerator.sync_gradients and train_policy:
                        ema.update()
                stats.append(micro_batch_stats)
    return stats


@contextlib.contextmanager
def policy_frozen(adamw):
    """The optimizer steps taken inside leave the policy as it was (critic warm-up): its parameters' gradients are
    dropped just before each step, and AdamW skips a parameter without one (no update, no weight decay, no moments
    or step count), so the first real update is Adam's first step, as if the warm-up had not been. `adamw` is the
    torch optimizer itself (not accelerate's wrapper), hooked at its own step: DeepSpeed takes the step inside
    `accelerator.backward`, on flat copies of the parameter groups (the same group dicts, `part` kept), where
    gradients set to None after the backward would come too late and miss DeepSpeed's buffers."""

    def drop_policy_gradients(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            if group.get("part") == "policy":
                for parameter in group["params"]:
                    parameter.grad = None

    hook = adamw.register_step_pre_hook(drop_policy_gradients)
    try:
        yield
    finally:
        hook.remove()


def minibatch_tokens(accelerator, counts: list) -> float:
    """The sum of `counts` (this process's token counts) over all processes, at least 1."""
    total = torch.tensor([float(sum(counts))], device=accelerator.device)
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, "sum")
    return max(total.item(), 1.0)


def ppo_loss(
    accelerator, trainable, batch: Rollout, config: PPOConfig, train_policy: bool, ptx_batch=None, outputs=None,
    weight: float = 1.0, ptx_weight: float | None = 1.0,
):  # fmt: skip
    """One micro-batch's loss: clipped policy loss + vf_coef * clipped value loss (details 7, 14), minus
    entropy_coef * entropy, plus kl_loss_coef * KL to the reference, each a mean over the micro-batch's response
    tokens times `weight` (see `ppo_update`), plus ptx_coef * LM loss on `ptx_batch` (PPO-ptx, `draw_ptx`'s
    examples) times `ptx_weight`. `outputs`: the trained models' (logits, values) over `batch`, when already
    computed. -> (loss, PPOStats: the micro-batch's unweighted means)."""
    if outputs is None:
        outputs = trainable(batch.input_ids, batch.attention_mask, batch.context_length)
    logits, values = outputs
    logprobs, entropies = F.token_logprobs_and_entropy(
        logits, batch.response_ids, config.temperature, entropy_grad=config.entropy_coef > 0
    )
    mask = batch.response_mask
    policy = F.clipped_policy_loss(logprobs, batch.logprobs, batch.advantages, mask, config.cliprange)
    value = F.clipped_value_loss(values, batch.values, batch.returns, mask, config.cliprange_value)
    entropy = F.masked_mean(entropies, mask)
    policy_loss = policy.loss - config.entropy_coef * entropy
    if config.kl_loss_coef:
        policy_loss = policy_loss + config.kl_loss_coef * F.kl_loss(
            logprobs, batch.ref_logprobs, mask, config.kl_loss_estimator
        )
    policy_loss = policy_loss * weight
    ptx_loss = None
    if ptx_batch is not None:  # in the same backward pass, so DDP syncs it with the rest
        ptx_loss = pretraining_loss(accelerator, trainable, ptx_batch)
        policy_loss = policy_loss + config.ptx_coef * ptx_loss * ptx_weight
    # A frozen policy still joins the backward pass (times 0): DDP expects a gradient for it.
    loss = policy_loss * float(train_policy) + config.vf_coef * value.loss * weight
    stats = PPOStats(
        policy.loss.detach(), value.loss.detach(), policy.clip_fraction, value.clip_fraction, policy.approx_kl,
        entropy.detach(), policy.ratio, ptx_loss.detach() if ptx_loss is not None else None,
    )  # fmt: skip
    return loss, stats
