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
- The reward model reads prompt + response re-rendered as text with its own tokenizer and chat template, exactly
  as TRL's RewardTrainer rendered its training pairs; so the reward model may use another tokenizer or template.
- Advantage (and reward) whitening and the adaptive KL controller use statistics of the global batch (all
  processes), so N processes behave like one process with N times the batch.
- The old log-probs pi_old come from the logits `generate` already computed (TRL did the same); reference and
  value forward passes run the LM head / value head on response positions only.
- Rollout prompts are a seeded permutation indexed by step, so resuming needs no dataloader state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from trl import ModelConfig

from hfgen import tracking
from hfgen.data.prepare import TextDataArguments, check_text_data, load_for_stage, record
from hfgen.errors import UserError
from hfgen.finetune import check_model_config, run_first_hint
from hfgen.models import check_model_source
from hfgen.rl import functional as F
from hfgen.rl.kl_control import AdaptiveKLController, FixedKLController
from hfgen.rl.metrics import RATES, format_evaluation, format_metrics, step_metrics
from hfgen.rl.rollout import (
    PolicyAndValue,
    RewardScorer,
    function_scores,
    left_pad,
    load_function,
    prompt_rows,
    prompt_text,
    reference_logprobs,
    response_texts,
    rollout_values,
    sample_responses,
)
from hfgen.rl.types import PPOStats, Rollout, RolloutDetails

SAMPLE_ROWS = 4  # rows of the sample table printed (and written to samples.jsonl) every `sample_steps`


@dataclass
class PPODataArguments(TextDataArguments):
    prompt_column: str = field(default="prompt", metadata={"help": "Column of prompts: strings or chat messages."})
    max_prompt_length: int = field(default=256, metadata={"help": "Prompts longer than this (tokens) are dropped."})
    eval_samples_per_prompt: int = field(
        default=4, metadata={"help": "Responses per held-out prompt in the final SFT-vs-PPO evaluation."}
    )


@dataclass
class PPOConfig:
    """PPO settings. Batch hierarchy per process (as TRL's): a rollout of per_device_train_batch_size x
    gradient_accumulation_steps x num_mini_batches prompts, then num_ppo_epochs epochs over num_mini_batches
    shuffled minibatches, each of gradient_accumulation_steps micro-batches."""

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
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    # -- episodes and batches
    total_episodes: int = field(default=1024, metadata={"help": "Prompts to roll out over the whole run."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Micro-batch size (sequences)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per minibatch."})
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches per rollout batch."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Sequences per no-grad generation/forward chunk in the rollout."}
    )
    # -- sampling
    response_length: int = field(default=53, metadata={"help": "Maximum new tokens per response."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature, also applied to log-probs."})
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling; below 1 the samples no longer follow the policy exactly."}
    )
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of responses that never emit EOS."}
    )
    # -- reward shaping and advantages
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty coefficient beta (initial value if adaptive)."})
    kl_estimator: Literal["k1", "k3"] = field(default="k1", metadata={"help": "Per-token KL estimator."})
    kl_target: float | None = field(
        default=None, metadata={"help": "Adaptive KL control toward this KL (nats per response); None: fixed beta."}
    )
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive KL controller horizon, in episodes."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten per-token rewards before GAE."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    # -- losses and optimisation
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip range epsilon."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value prediction clip range."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss weight."})
    learning_rate: float = field(default=3e-6, metadata={"help": "AdamW learning rate (policy and value)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name."})
    warmup_steps: int = field(default=0, metadata={"help": "Warm-up, in PPO steps (rollouts)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
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


def check(model_args: ModelConfig, data_args: PPODataArguments, config: PPOConfig) -> list[str]:
    problems = check_model_config(model_args)
    for key in ("reward_model_path", "value_model_path"):
        if getattr(config, key):
            problems += check_model_source(key, getattr(config, key), hint=run_first_hint(getattr(config, key)))
    if not config.reward_model_path and not config.reward_functions:
        problems.append("no reward: set reward_model_path and/or reward_functions")
    components = int(bool(config.reward_model_path)) + len(config.reward_functions)
    if config.reward_weights is not None and len(config.reward_weights) != components:
        problems.append(f"reward_weights has {len(config.reward_weights)} values for {components} reward(s)")
    for spec in [*config.reward_functions, *([config.oracle_function] if config.oracle_function else [])]:
        try:
            load_function(spec)
        except ValueError as error:
            problems.append(f"reward function {error}")
    positive = ("total_episodes", "per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches",
                "num_ppo_epochs", "local_rollout_forward_batch_size", "response_length", "kl_horizon")  # fmt: skip
    problems += [
        f"{key} must be at least 1, got {getattr(config, key)}" for key in positive if getattr(config, key) < 1
    ]
    if config.temperature <= 0 or not 0 < config.top_p <= 1:
        problems.append(f"temperature must be > 0 and top_p in (0, 1], got {config.temperature} and {config.top_p}")
    if not (0 <= config.gamma <= 1 and 0 <= config.lam <= 1):
        problems.append(f"gamma and lam must lie in [0, 1], got {config.gamma} and {config.lam}")
    if config.kl_target is not None and config.kl_target <= 0:
        problems.append(f"kl_target must be > 0 (or unset for a fixed kl_coef), got {config.kl_target}")
    if config.missing_eos_penalty is not None and config.missing_eos_penalty < 0:
        problems.append(
            f"missing_eos_penalty is subtracted from the score: give a positive value, got {config.missing_eos_penalty}"
        )
    if min(config.logging_steps, config.sample_steps, config.save_steps) < 0 or data_args.eval_samples_per_prompt < 0:
        problems.append("logging_steps, sample_steps, save_steps and eval_samples_per_prompt must be >= 0")
    if not config.output_dir:
        problems.append("output_dir is not set")
    return problems + check_text_data(data_args, "prompt", {"prompt": data_args.prompt_column})[1]


def run(model_args: ModelConfig, data_args: PPODataArguments, config: PPOConfig) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    output_dir = Path(config.output_dir)
    trackers = [name for name in config.report_to if name != "none"]
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision="bf16" if config.bf16 else "no",
        cpu=config.use_cpu,
        log_with=trackers or None,
        project_dir=str(output_dir),
    )
    set_seed(config.seed)  # the same on every process: identical LoRA and value-head initialisation
    local_batch = config.per_device_train_batch_size * config.gradient_accumulation_steps * config.num_mini_batches
    global_batch = local_batch * accelerator.num_processes
    total_steps = math.ceil(config.total_episodes / global_batch)

    # Models: policy (+ reference), value model, reward model and reward functions.
    tokenizer, policy, reference = load_policy_and_reference(model_args, config)
    value_model = load_value_model(model_args, config, tokenizer)
    scorer = load_scorer(model_args, config)
    oracle = load_oracle(config)

    # Data: prompts tokenized once; each step takes a slice of a seeded permutation (see `prompt_rows`).
    # Any prompt layout (text, chat messages, a preference or SFT file's prompts) arrives as a `prompt` column.
    train_rows, eval_rows, data_records = load_for_stage(
        data_args, "prompt", seed=config.seed, default_columns={"prompt": data_args.prompt_column}
    )
    record(output_dir, data_records)
    train_prompts, train_queries = tokenize_prompts(tokenizer, train_rows["prompt"], data_args)
    eval_prompts, _ = tokenize_prompts(tokenizer, eval_rows["prompt"], data_args)

    # Optimiser over policy and value parameters; one PPO step = one rollout = one scheduler step.
    trainable = PolicyAndValue(policy, value_model)
    optimizer = torch.optim.AdamW(
        [p for p in trainable.parameters() if p.requires_grad],
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )
    # Not passed to `prepare`: accelerate would step it once per process; it is checkpointed by registration.
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, config.warmup_steps, total_steps)
    trainable, optimizer = accelerator.prepare(trainable, optimizer)
    for frozen in (reference, scorer.reward_model):
        if frozen is not None:
            frozen.to(accelerator.device)
    if config.kl_target is None:
        kl_controller = FixedKLController(config.kl_coef)
    else:
        kl_controller = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
    accelerator.register_for_checkpointing(scheduler, kl_controller)

    start_step = 0
    resume = tracking.resolve_resume(config.resume_from_checkpoint, output_dir)
    if resume is not None:
        # weights (what trains), optimiser, scheduler, KL coefficient, every RNG
        start_step = tracking.load_checkpoint(accelerator, resume)
        accelerator.print(f"resumed from {resume} at step {start_step}")
    else:
        set_seed(config.seed + accelerator.process_index)  # each process samples differently
    metrics_logger = start_metrics(output_dir, start_step)
    if trackers:
        accelerator.init_trackers("hfgen-ppo", config=scalar_settings(config))
    accelerator.print(
        f"PPO: {total_steps} steps x {global_batch} episodes ({accelerator.num_processes} process(es)), "
        f"{config.num_ppo_epochs} epochs x {config.num_mini_batches} minibatch(es) x "
        f"{config.gradient_accumulation_steps} micro-batch(es) of {config.per_device_train_batch_size}"
    )

    generation_config = make_generation_config(tokenizer, config.response_length, config.temperature, config.top_p)
    all_reduce = (lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 else None
    started = time.perf_counter()
    for step in range(start_step + 1, total_steps + 1):
        # 1. Rollout: this process's prompts for the step, responses sampled from the current policy, scored.
        step_started = time.perf_counter()
        rows = prompt_rows(step, len(train_queries), global_batch, local_batch, accelerator.process_index, config.seed)
        prompts = [train_prompts[i] for i in rows]
        rollout, details, timing = collect_rollout(
            accelerator, trainable, reference, scorer, tokenizer, generation_config, prompts,
            [train_queries[i] for i in rows], config,
        )  # fmt: skip
        # 2. Rewards and advantages: KL-penalised per-token rewards, GAE, whitening.
        rollout, shaping = compute_advantages(rollout, kl_controller.value, config, all_reduce)
        timing["advantages"] = time.perf_counter() - step_started - sum(timing.values())
        # 3. PPO update: epochs of clipped policy and value losses over shuffled minibatches.
        train_started = time.perf_counter()
        stats = ppo_update(accelerator, trainable, optimizer, rollout, config)
        timing["training"] = time.perf_counter() - train_started
        scheduler.step()

        # 4. Records: global means of the step's figures, the KL controller's update, samples, checkpoint.
        local = step_metrics(
            rollout, details, shaping["kl"], shaping["kl_rewards"], stats, timing, config.num_ppo_epochs
        )
        if oracle is not None:
            local["oracle/score"] = function_scores(oracle, prompts, details.texts, accelerator.device).mean()
        metrics = global_means(accelerator, local)
        metrics |= {"objective/kl_coef": kl_controller.value, "lr": scheduler.get_last_lr()[0]}
        kl_controller.update(metrics["objective/kl"], n_steps=global_batch)
        metrics |= {"episode": step * global_batch, "eps": global_batch / (time.perf_counter() - step_started)}
        metrics_logger.log(step, **metrics)
        if trackers:
            accelerator.log(metrics, step=step)
        if config.logging_steps and (step % config.logging_steps == 0 or step in (1, total_steps)):
            accelerator.print(format_metrics(step, total_steps, metrics))
        if config.sample_steps and (step % config.sample_steps == 0 or step in (1, total_steps)):
            if accelerator.is_main_process:
                write_samples(output_dir, step, prompts, details.texts, rollout.scores, oracle)
        if config.save_steps and step % config.save_steps == 0 and step < total_steps:
            recipe = output_dir / "recipe.yaml"
            tracking.save_checkpoint(
                accelerator, output_dir, step, config.save_total_limit, recipe.read_text() if recipe.is_file() else None
            )
    train_runtime = time.perf_counter() - started

    # Save: the policy (full model or LoRA adapter) with the tokenizer, the value model beside it.
    accelerator.wait_for_everyone()
    trained = accelerator.unwrap_model(trainable)
    if accelerator.is_main_process:
        trained.policy.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        trained.value_model.save_pretrained(output_dir / "value_model")
    if accelerator.num_processes > 1:
        tracking.write_weights_fingerprint(trained.policy, output_dir)

    # Evaluate: the SFT (reference) policy against the PPO policy on held-out prompts.
    results = evaluate_against_reference(
        accelerator, trained.policy, reference, scorer, oracle, tokenizer, eval_prompts, data_args, config
    )
    results |= {
        "episodes": (total_steps - start_step) * global_batch,
        "train_runtime_s": train_runtime,
        "episodes_per_s": (total_steps - start_step) * global_batch / max(train_runtime, 1e-9),
        "steps": total_steps,
    }
    if accelerator.is_main_process:
        tracking.update_eval(output_dir, results)
        if "kl_to_reference" in results:
            accelerator.print(format_evaluation(results))
    tracking.finish_trackers(accelerator)  # the process group outlives the stage: tracking.shutdown_distributed
    return output_dir


# ---- models -----------------------------------------------------------------------------------------


def disable_dropout(model) -> None:
    """Dropout off everywhere (Huang et al. detail 10): with it, log-probs of the same tokens differ between the
    rollout and the update, and the PPO ratio starts away from 1."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_policy_and_reference(model_args: ModelConfig, config: PPOConfig):
    """(tokenizer, policy, reference). With use_peft the policy is a PeftModel and the reference is None: it is
    the same model with its adapter disabled."""
    from trl import get_peft_config

    from hfgen.finetune import load_model
    from hfgen.models import load_tokenizer

    tokenizer = load_tokenizer(model_args.model_name_or_path, config.trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        # EOS == PAD would make every EOS look like padding: responses would never be seen to end.
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    policy = load_model(model_args, config, tokenizer)
    disable_dropout(policy)
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.config.use_cache = False  # `generate` turns the cache back on for itself
    if model_args.use_peft:
        from peft import get_peft_model

        return tokenizer, get_peft_model(policy, get_peft_config(model_args)), None
    reference = load_model(model_args, config, tokenizer).eval().requires_grad_(False)
    return tokenizer, policy, reference


def load_sequence_classifier(path: str, model_args: ModelConfig, config: PPOConfig, tokenizer):
    """A one-label sequence classifier from a full model dir, a classifier's LoRA adapter dir (merged), or a
    causal LM (its backbone, with a new score head)."""
    from hfgen.finetune import load_model, resolved

    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.is_file() and json.loads(adapter_config.read_text()).get("task_type") == "SEQ_CLS":
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(resolved(path), num_labels=1)
        model = model.merge_and_unload()
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        classifier_args = dataclasses.replace(
            model_args, model_name_or_path=path, use_peft=False, load_in_4bit=False, load_in_8bit=False
        )
        model = load_model(classifier_args, config, tokenizer, sequence_classifier=True)
    disable_dropout(model)
    return model


def load_value_model(model_args: ModelConfig, config: PPOConfig, tokenizer):
    """The value model, initialised from value_model_path, else the reward model (Huang et al. detail 6), else the
    policy's weights with a new head. It reads the policy's tokens, so it must share the policy's vocabulary."""
    from hfgen.models import load_tokenizer

    path = config.value_model_path or config.reward_model_path or model_args.model_name_or_path
    if path == config.reward_model_path and not config.value_model_path:
        reward_vocabulary, vocabulary = load_tokenizer(path).get_vocab(), tokenizer.get_vocab()
        if any(vocabulary.get(token) != index for token, index in reward_vocabulary.items()):
            # The reward model reads another vocabulary: it can judge text, but cannot read the policy's tokens.
            print(f"value model: '{path}' has another vocabulary than the policy; starting from the policy instead")
            path = model_args.model_name_or_path
    model = load_sequence_classifier(path, model_args, config, tokenizer)
    if not hasattr(model, "score"):
        raise UserError(f"value model '{path}' has no `score` head; use an AutoModelForSequenceClassification model")
    return model


def load_scorer(model_args: ModelConfig, config: PPOConfig) -> RewardScorer:
    from hfgen.models import load_tokenizer

    reward_model = reward_tokenizer = None
    if config.reward_model_path:
        reward_tokenizer = load_tokenizer(config.reward_model_path, config.trust_remote_code)
        reward_model = load_sequence_classifier(config.reward_model_path, model_args, config, reward_tokenizer)
        reward_model.eval().requires_grad_(False)
    functions = {spec.rpartition(":")[2]: load_function(spec) for spec in config.reward_functions}
    count = int(reward_model is not None) + len(functions)
    weights = config.reward_weights or [1.0] * count
    chunk = config.local_rollout_forward_batch_size
    return RewardScorer(reward_model, reward_tokenizer, functions, list(weights), chunk)


def load_oracle(config: PPOConfig):
    return load_function(config.oracle_function) if config.oracle_function else None


def make_generation_config(tokenizer, max_new_tokens: int, temperature: float, top_p: float):
    """Sampling from exactly softmax(logits / temperature) (top-p aside): every other knob that could reshape the
    distribution is pinned, so a model's generation_config.json (top_k=50, repetition_penalty...) cannot leak in."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, temperature=temperature, top_p=top_p, top_k=0, min_p=None, typical_p=1.0,
        repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0, max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip


# ---- data -------------------------------------------------------------------------------------------


def tokenize_prompts(tokenizer, prompts: list, data_args: PPODataArguments) -> tuple[list, list[list[int]]]:
    """(prompts, token ids) for the prompts within max_prompt_length; chat messages get the chat template with
    the assistant turn opened."""
    from hfgen.generate import format_prompts

    chat = not isinstance(prompts[0], str)
    if chat and tokenizer.chat_template is None:
        raise UserError("the prompts are chat messages but the tokenizer of the policy has no chat template")
    ids = tokenizer(format_prompts(tokenizer, prompts, chat), add_special_tokens=not chat)["input_ids"]
    kept = [i for i, query in enumerate(ids) if len(query) <= data_args.max_prompt_length]
    if not kept:
        raise UserError(f"every prompt is longer than max_prompt_length={data_args.max_prompt_length} tokens")
    if len(kept) < len(ids):
        print(f"dropped {len(ids) - len(kept)} of {len(ids)} prompts longer than {data_args.max_prompt_length} tokens")
    return [prompts[i] for i in kept], [ids[i] for i in kept]


# ---- one PPO step -----------------------------------------------------------------------------------


def collect_rollout(accelerator, trainable, reference, scorer, tokenizer, generation_config, prompts, queries, config):
    """Sample responses from the current policy, then score them: reward, reference log-probs, values.
    -> (Rollout without advantages, RolloutDetails, {"generation": seconds, "scoring": seconds})."""
    unwrapped = accelerator.unwrap_model(trainable)
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
    mask = F.response_mask(sampled.response_ids, tokenizer.eos_token_id)
    responses = F.truncate_after_eos(sampled.response_ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
    input_ids = torch.cat([query_ids, responses], dim=1)
    attention_mask = torch.cat([query_mask, mask.long()], dim=1)
    context_length = query_ids.shape[1]
    texts = response_texts(tokenizer, responses, tokenizer.eos_token_id)
    with accelerator.autocast():
        scores, components = scorer(prompts, texts, accelerator.device)
        ref_logprobs = reference_logprobs(
            unwrapped.policy, reference, input_ids, attention_mask, context_length, config.temperature, chunk
        )
        values = rollout_values(unwrapped.value_model, input_ids, attention_mask, context_length, chunk)
    has_eos = (responses == tokenizer.eos_token_id).any(dim=1)
    if config.missing_eos_penalty is not None:  # detail 2: a response that never stops is penalised
        scores = scores - config.missing_eos_penalty * (~has_eos).float()
    rollout = Rollout(
        input_ids=input_ids, attention_mask=attention_mask, context_length=context_length, response_mask=mask,
        logprobs=sampled.logprobs * mask, ref_logprobs=ref_logprobs * mask, values=values * mask, scores=scores,
    )  # fmt: skip
    timing = {"generation": generated - started, "scoring": time.perf_counter() - generated}
    return rollout, RolloutDetails(texts, components, sampled.entropy, has_eos), timing


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


def ppo_update(accelerator, trainable, optimizer, rollout: Rollout, config: PPOConfig) -> list[PPOStats]:
    """`num_ppo_epochs` passes over the rollout in shuffled minibatches of micro-batches (details 8, 15): clipped
    policy loss + vf_coef * clipped value loss (details 7, 14), one optimiser step per minibatch."""
    trainable.train()
    minibatch_size = config.per_device_train_batch_size * config.gradient_accumulation_steps
    stats = []
    for _ in range(config.num_ppo_epochs):
        for minibatch in torch.randperm(len(rollout), device=rollout.input_ids.device).split(minibatch_size):
            for rows in minibatch.split(config.per_device_train_batch_size):
                batch = rollout.select(rows)
                with accelerator.accumulate(trainable):
                    logits, values = trainable(batch.input_ids, batch.attention_mask, batch.context_length)
                    logprobs = F.token_logprobs(logits, batch.response_ids, config.temperature)
                    mask = batch.response_mask
                    policy = F.clipped_policy_loss(logprobs, batch.logprobs, batch.advantages, mask, config.cliprange)
                    value = F.clipped_value_loss(values, batch.values, batch.returns, mask, config.cliprange_value)
                    accelerator.backward(policy.loss + config.vf_coef * value.loss)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainable.parameters(), config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                with torch.no_grad():
                    entropy = F.masked_mean(F.entropy_from_logits(logits, config.temperature), mask)
                stats.append(
                    PPOStats(policy.loss.detach(), value.loss.detach(), policy.clip_fraction, value.clip_fraction,
                             policy.approx_kl, entropy, policy.ratio)
                )  # fmt: skip
    return stats


# ---- records ----------------------------------------------------------------------------------------


def global_means(accelerator, local: dict) -> dict[str, float]:
    """Means over processes of this process's figures, in one collective; rates are summed instead."""
    names = list(local)
    means = accelerator.reduce(torch.stack([local[n].float().to(accelerator.device) for n in names]), "mean")
    metrics = {name: value.item() for name, value in zip(names, means)}
    for name in RATES:
        metrics[name] *= accelerator.num_processes
    return metrics


def start_metrics(output_dir: Path, start_step: int) -> tracking.MetricsLogger:
    """A fresh metrics.jsonl, or on resume the old one cut back to the checkpoint's step (the steps after it are
    about to be redone)."""
    if start_step and tracking.is_main_process():
        kept = [row for row in tracking.read_metrics(output_dir) if row["step"] <= start_step]
        tracking.write_jsonl(output_dir / "metrics.jsonl", kept)
    return tracking.MetricsLogger(output_dir, fresh=start_step == 0)


def scalar_settings(config: PPOConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(config).items() if isinstance(v, (int, float, str, bool))}


def write_samples(output_dir: Path, step: int, prompts, texts, scores, oracle) -> None:
    """A table of prompts, responses and scores (detail 12: the way to see reward hacking), printed and appended
    to samples.jsonl; call on the main process."""
    rows = []
    for i in range(min(SAMPLE_ROWS, len(texts))):
        row = {"step": step, "prompt": prompt_text(prompts[i]), "response": texts[i], "score": float(scores[i])}
        if oracle is not None:
            row["oracle"] = float(oracle([row["prompt"]], [texts[i]])[0])
        rows.append(row)
    with (output_dir / "samples.jsonl").open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    for row in rows:
        judged = f"score {row['score']:+.2f}" + (f", oracle {row['oracle']:+.2f}" if "oracle" in row else "")
        print(f"    [{judged}] {row['prompt'][:40]!r} -> {row['response'][:80]!r}")


# ---- final evaluation -------------------------------------------------------------------------------


def evaluate_against_reference(
    accelerator, policy, reference, scorer, oracle, tokenizer, prompts, data_args, config
) -> dict:
    """Sample `eval_samples_per_prompt` responses per held-out prompt from the reference (SFT) policy and from the
    PPO policy, with the same random numbers, and compare them: mean scores (training reward, reward model, oracle),
    win rates of PPO over SFT (ties count half), and KL(PPO || SFT) per response (k1 summed over the response
    tokens of PPO's samples). Prompts are split over the processes and the results gathered."""
    from accelerate.utils import gather_object

    from hfgen.evaluation.text import win_rate

    prompts = [p for p in prompts for _ in range(data_args.eval_samples_per_prompt)]
    if not prompts:
        return {}
    _, queries = tokenize_prompts(tokenizer, prompts, data_args)
    policy.eval()
    generation_config = make_generation_config(tokenizer, config.response_length, config.temperature, config.top_p)
    chunk = config.local_rollout_forward_batch_size
    judged: dict[str, dict[str, list[float]]] = {}
    kl_values: list[float] = []
    with accelerator.split_between_processes(list(zip(prompts, queries))) as shard, accelerator.autocast():
        shard_prompts = [prompt for prompt, _ in shard]
        query_ids, query_mask = left_pad([query for _, query in shard], tokenizer.pad_token_id, accelerator.device)
        for name in ("sft", "ppo"):
            torch.manual_seed(config.seed + 1)  # common random numbers: a less noisy comparison
            use_reference = name == "sft" and reference is not None
            with policy.disable_adapter() if name == "sft" and reference is None else nullcontext():
                sampled = sample_responses(
                    reference if use_reference else policy, query_ids, query_mask, generation_config, chunk,
                    tokenizer.pad_token_id,
                )  # fmt: skip
            mask = F.response_mask(sampled.response_ids, tokenizer.eos_token_id)
            texts = response_texts(tokenizer, sampled.response_ids, tokenizer.eos_token_id)
            score, components = scorer(shard_prompts, texts, accelerator.device)
            figures = {"score": score}  # the training reward, without the missing-EOS penalty
            if "reward_model" in components:
                figures["reward_model"] = components["reward_model"]
            if oracle is not None:
                figures["oracle"] = function_scores(oracle, shard_prompts, texts, accelerator.device)
            figures["response_length"] = mask.sum(1).float()
            figures["eos_rate"] = (sampled.response_ids == tokenizer.eos_token_id).any(1).float()
            judged[name] = {key: values.tolist() for key, values in figures.items()}
        input_ids = torch.cat([query_ids, sampled.response_ids], dim=1)  # PPO's samples
        attention_mask = torch.cat([query_mask, mask.long()], dim=1)
        ref = reference_logprobs(
            policy, reference, input_ids, attention_mask, query_ids.shape[1], config.temperature, chunk
        )
        kl_values = ((sampled.logprobs - ref) * mask).sum(1).tolist()

    merged: dict[str, dict[str, list[float]]] = {name: {key: [] for key in judged[name]} for name in judged}
    all_kl: list[float] = []
    for shard_judged, shard_kl in gather_object([(judged, kl_values)]):  # one (judged, kl) pair per process
        for name, figures in shard_judged.items():
            for key, values in figures.items():
                merged[name][key] += values
        all_kl += shard_kl
    results = {
        "eval/num_prompts": len(prompts) // data_args.eval_samples_per_prompt,
        "eval/samples_per_prompt": data_args.eval_samples_per_prompt,
        "kl_to_reference": sum(all_kl) / len(all_kl),
    }
    for key in merged["ppo"]:
        results[f"sft/{key}"] = sum(merged["sft"][key]) / len(merged["sft"][key])
        results[f"ppo/{key}"] = sum(merged["ppo"][key]) / len(merged["ppo"][key])
        if key not in ("response_length", "eos_rate"):
            results[f"win_rate/{key}"] = win_rate(merged["ppo"][key], merged["sft"][key])
    return results
