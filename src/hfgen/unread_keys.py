"""Recipe keys a stage would accept and never read, refused with the reason (`recipe.build_recipe` and
`recipe.installed_problems` call these): TrainingArguments keys a stage's TRL trainer replaces the code of
(`unread_key_problems`), keys of a feature that is off (`READ_ONLY_WHEN`), and `optim_args` names the chosen optimizer
does not take (`optim_args_problems`). Each was a run that exited 0 with weights bit-identical to the run without it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def refused_everywhere(stage: str) -> tuple[str, ...]:
    """Keys `unread_key_problems` refuses in `stage` whatever their value: never offered as the nearest spelling of
    an unknown key (ORPO's `label_smoothing`, a DPO key, was pointed at label_smoothing_factor, which is then
    refused)."""
    return ("label_smoothing_factor",) * (stage in OWN_LOSS_STAGES) + ("train_sampling_strategy",) * (
        stage in OWN_SAMPLER_STAGES
    )


# transformers' Trainer reads these keys in code that some stages' TRL trainers replace; set there, they did nothing
# (exit 0, the same weights) or failed after the data loaded
OWN_LOSS_STAGES = ("reward", "dpo", "kto", "orpo", "simpo", "grpo", "rloo")  # a compute_loss of their own
OWN_SAMPLER_STAGES = ("grpo", "rloo")  # TRL's RepeatSampler builds the prompt groups
# rows of chosen_/rejected_ or prompt_/completion_input_ids: no `input_ids` to take lengths from
PAIRED_ROW_STAGES = ("reward", "dpo", "kto", "orpo", "simpo")


def unread_key_problems(stage: str, configs) -> list[str]:
    """TrainingArguments keys set to something this stage's trainer never reads: `label_smoothing_factor` (the base
    Trainer's loss only: pretrain, and sft's nll loss type), `train_sampling_strategy` (GRPO/RLOO sample prompt
    groups their own way; a length-grouped order needs an `input_ids` column the pair stages' rows lack:
    transformers' ValueError at train; TRL's KTO refuses it only for its KL loss types),
    `dataloader_persistent_workers` and `dataloader_multiprocessing_context` without workers (torch's ValueError when
    the loader is built; transformers checks only `dataloader_prefetch_factor`); and `dataloader_in_order: false`,
    read, but an order that depends on the workers' timing (no reproducible run, no exact resume)."""
    problems = []
    for config in configs:
        if getattr(config, "label_smoothing_factor", 0) and stage in OWN_LOSS_STAGES:
            extra = (
                " (DPO's own `label_smoothing` works with its robust/exo_pair/aot loss types)" if stage == "dpo" else ""
            )
            problems.append(
                f"label_smoothing_factor {config.label_smoothing_factor} has no effect in stage '{stage}': TRL's "
                f"trainer computes its own loss and does not read it{extra}; remove it"
            )
        elif getattr(config, "label_smoothing_factor", 0) and stage == "sft" and config.loss_type != "nll":
            # (TRL's SFTTrainer applies transformers' label smoother in its nll branch only)
            problems.append(
                f"label_smoothing_factor {config.label_smoothing_factor} has no effect with loss_type "
                f"'{config.loss_type}': TRL's SFT trainer smooths the labels of its nll loss only; remove it, or use "
                "loss_type nll"
            )
        strategy = getattr(config, "train_sampling_strategy", "random")
        if (stage in OWN_SAMPLER_STAGES and strategy != "random") or (
            stage in PAIRED_ROW_STAGES and strategy in ("group_by_length", "batch_rebalance")
        ):
            why = (
                "TRL's trainer draws each prompt's group with a sampler of its own (shuffle_dataset decides the order)"
                if stage in OWN_SAMPLER_STAGES
                else "its rows are pairs (or prompt and completion), with no `input_ids` column for transformers to take "
                "lengths from"
            )
            problems.append(f"train_sampling_strategy '{strategy}' cannot be used in stage '{stage}': {why}; remove it")
        if getattr(config, "dataloader_persistent_workers", False) and not config.dataloader_num_workers:
            problems.append(
                "dataloader_persistent_workers: true keeps the data loader's worker processes between epochs, and "
                "dataloader_num_workers is 0 (none: the main process loads): set dataloader_num_workers above 0, or "
                "remove dataloader_persistent_workers"
            )
        if getattr(config, "dataloader_in_order", True) is False:
            # torch's DataLoader(in_order=False) yields batches as the workers finish them (a latency knob for
            # streamed data, which hfgen does not use): two runs of the same recipe trained different orders and
            # weights (probe 43 D7)
            problems.append(
                "dataloader_in_order: false lets the data loader's worker processes hand over batches as they finish "
                "them, so the order trained depends on their timing: two runs of the recipe would train different "
                "weights, and a resume would skip whichever batches came first; remove it"
            )
        context = getattr(config, "dataloader_multiprocessing_context", None)
        if context is not None and not config.dataloader_num_workers:
            problems.append(
                f"dataloader_multiprocessing_context: {context} says how the data loader's worker processes start, "
                "and dataloader_num_workers is 0 (none: the main process loads): set dataloader_num_workers above 0, "
                "or remove dataloader_multiprocessing_context"
            )
    return problems + feature_off_problems(configs)


@dataclass(frozen=True)
class ReadOnlyWhen:
    """Keys only a feature reads. Changed from their default while `off` says the feature is off (or its mode does
    not use them), they were recorded in recipe.yaml and did nothing: exit 0, the same weights. `switch` is the key the
    rule is about; a stage without it has no such feature."""

    switch: str
    keys: tuple[str, ...]
    off: Any  # (values: _Values) -> bool
    why: str  # "... read only <why>" with the state of the switch
    fix: str  # what to set instead of removing them


class _Values:
    """The recipe's values by key across its configs, with each key's dataclass default."""

    def __init__(self, configs):
        self.configs = configs

    def has(self, key: str) -> bool:
        return any(hasattr(config, key) for config in self.configs)

    def __getattr__(self, key: str):
        for config in self.configs:
            if hasattr(config, key):
                return getattr(config, key)
        raise AttributeError(key)

    def changed(self, key: str) -> bool:
        for config in self.configs:
            for field_ in dataclasses.fields(config) if dataclasses.is_dataclass(config) else ():
                if field_.name == key:
                    default = field_default(field_)
                    value = getattr(config, key)
                    return getattr(value, "value", value) != getattr(default, "value", default)
        return False


def field_default(field_: dataclasses.Field):
    """A dataclass field's own default: its value, or what its factory makes; None for a field without one."""
    if field_.default is not dataclasses.MISSING:
        return field_.default
    if field_.default_factory is not dataclasses.MISSING:
        return field_.default_factory()
    return None


def _schedule_name(values: _Values, key: str) -> str:
    value = getattr(values, key)
    return str(getattr(value, "value", value))


# TRL's ModelConfig LoRA keys: peft reads them only when use_peft builds the adapters
TRL_LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
                 "lora_modules_to_save", "lora_task_type", "use_rslora", "use_dora")  # fmt: skip

READ_ONLY_WHEN = (
    ReadOnlyWhen("use_peft", TRL_LORA_KEYS, lambda v: not v.use_peft,
                 "by the LoRA adapters, and use_peft is false (the whole model trains)", "set use_peft: true"),
    ReadOnlyWhen("use_lora", ("lora_rank", "lora_alpha", "lora_target_modules"), lambda v: not v.use_lora,
                 "by the LoRA adapters, and use_lora is false (the whole denoiser trains)", "set use_lora: true"),
    ReadOnlyWhen("use_ema", ("ema_decay",), lambda v: not v.use_ema,
                 "by the weights' EMA, and use_ema is false", "set use_ema: true"),
    ReadOnlyWhen("with_prior_preservation", ("class_prompt", "prior_loss_weight", "num_class_images", "class_data_dir"),
                 lambda v: not v.with_prior_preservation,
                 "by DreamBooth's prior preservation, and with_prior_preservation is false (no class images, no "
                 "prior loss)", "set with_prior_preservation: true"),
    ReadOnlyWhen("max_caption_tokens", ("max_caption_tokens",), lambda v: v.tokenizer_name != "embedded:caption-bpe",
                 "by the caption tokenizer built from scratch (tokenizer_name: embedded:caption-bpe); a pretrained "
                 "pipeline's or a named tokenizer keeps its own model_max_length", "use tokenizer_name: "
                 "embedded:caption-bpe"),
    ReadOnlyWhen("kl_target", ("kl_horizon",), lambda v: v.kl_target is None,
                 "by kl_target's adaptive KL controller, and kl_target is unset (a fixed kl_coef)", "set kl_target"),
    ReadOnlyWhen("ptx_dataset_name", ("ptx_column", "ptx_max_length"), lambda v: not v.ptx_dataset_name,
                 "by the ptx loss, and ptx_dataset_name is unset (no ptx)", "set ptx_dataset_name and ptx_coef"),
    ReadOnlyWhen("adversarial_weight", ("adversarial_start_step", "discriminator_channels"),
                 lambda v: not v.adversarial_weight,
                 "by the GAN discriminator, and adversarial_weight is 0 (none)", "set adversarial_weight above 0"),
    ReadOnlyWhen("optim", ("adam_beta1", "adam_beta2", "adam_epsilon"), lambda v: not _reads_adam_settings(v.optim),
                 "by optimizers with Adam's betas and epsilon, and optim {optim} has neither (its settings go in "
                 "optim_args)", "choose an Adam-like optim"),
    # transformers' get_scheduler returns these before it reads num_warmup_steps or passes any kwargs
    ReadOnlyWhen("lr_scheduler_type", ("warmup_steps",),
                 lambda v: _schedule_name(v, "lr_scheduler_type") in ("constant", "reduce_lr_on_plateau", "greedy"),
                 "by a schedule with a warm-up, and lr_scheduler_type {lr_scheduler_type} has none",
                 "use lr_scheduler_type constant_with_warmup (or another with a warm-up)"),
    ReadOnlyWhen("lr_scheduler_type", ("lr_scheduler_kwargs",),
                 lambda v: _schedule_name(v, "lr_scheduler_type") in ("constant", "constant_with_warmup"),
                 "by schedules with arguments, and lr_scheduler_type {lr_scheduler_type} takes none",
                 "choose a schedule that takes them"),
    ReadOnlyWhen("lr_scheduler", ("lr_warmup_steps",), lambda v: _schedule_name(v, "lr_scheduler") == "constant",
                 "by a schedule with a warm-up, and lr_scheduler constant has none",
                 "use lr_scheduler constant_with_warmup (or another with a warm-up)"),
)  # fmt: skip


def feature_off_problems(configs) -> list[str]:
    """The READ_ONLY_WHEN keys changed from their defaults while their feature is off: one problem per rule, naming
    every key to drop and the switch to set."""
    values = _Values(configs)
    problems = []
    for rule in READ_ONLY_WHEN:
        if not values.has(rule.switch):
            continue
        changed = [key for key in rule.keys if values.has(key) and values.changed(key)]
        if not changed or not rule.off(values):
            continue
        named = ", ".join(f"{key} {_shown(getattr(values, key))}" for key in changed)
        why = rule.why.format(**{rule.switch: _schedule_name(values, rule.switch)})
        problems.append(
            f"{named} {'is' if len(changed) == 1 else 'are'} read only {why}: nothing would read "
            f"{'it' if len(changed) == 1 else 'them'}; remove {', '.join(changed)}, or {rule.fix}"
        )
    return problems


def switched_off_keys(values: dict[str, Any], defaults: dict[str, Any]) -> set[str]:
    """The READ_ONLY_WHEN keys whose feature is off in a recipe's raw values (a switch left out is at its default in
    `defaults`): never offered as the nearest spelling of an unknown key (`use_lora` was pointed at use_rslora, which
    is then refused without use_peft; PPO's `max_length` at ptx_max_length without ptx data)."""
    raw = _RawValues(values, defaults)
    off = set()
    for rule in READ_ONLY_WHEN:
        if rule.switch in defaults and rule.off(raw):
            off.update(rule.keys)
    return off


class _RawValues:
    """A recipe's values before they are typed, as `READ_ONLY_WHEN`'s rules read them: each key's value, or its
    default when the recipe leaves it out."""

    def __init__(self, values: dict[str, Any], defaults: dict[str, Any]):
        self.values, self.defaults = values, defaults

    def __getattr__(self, key: str):
        if key in ("values", "defaults"):
            raise AttributeError(key)
        return self.values.get(key, self.defaults.get(key))


def _shown(value) -> str:
    value = getattr(value, "value", value)
    return f"'{value}'" if isinstance(value, str) else str(value)


def _reads_adam_settings(optim) -> bool:
    """Whether transformers' handler for `optim` reads adam_beta1/adam_beta2/adam_epsilon (its adam_kwargs): SGD,
    Adagrad, RMSprop and Adafactor build their kwargs without them. A handler that cannot run here is not judged."""
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS, OptimizerContext

    name = getattr(optim, "value", optim)
    adam_kwargs = _NamesAsked({"betas": (0.9, 0.999), "eps": 1e-8})
    context = OptimizerContext(args=_AnyArgs(), model=None, optimizer_kwargs={"lr": 1e-3}, adam_kwargs=adam_kwargs,
                               optim_args={})  # fmt: skip
    try:
        _, kwargs = _OPTIMIZER_HANDLERS[name](context)
    except Exception:  # noqa: BLE001 -- a handler that needs its package or the model: not judged here
        return True
    return bool(adam_kwargs.asked) or "betas" in kwargs or "eps" in kwargs


class _AnyArgs:
    """TrainingArguments as a handler reads them (only for which kwargs it builds)."""

    def __getattr__(self, key):
        return None


class _NamesAsked(dict):
    """optim_args as transformers' optimizer handler reads them, noting every name it asks about (present or not);
    a handler that hands them all on (bitsandbytes' extra kwargs) iterates them: all read."""

    def __init__(self, values: dict):
        super().__init__(values)
        self.asked: set[str] = set()

    def __contains__(self, key):
        self.asked.add(key)
        return super().__contains__(key)

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)

    def pop(self, key, *default):
        self.asked.add(key)
        return super().pop(key, *default)

    def __iter__(self):
        self.asked.update(super().keys())
        return super().__iter__()

    def keys(self):
        self.asked.update(super().keys())
        return super().keys()

    def items(self):
        self.asked.update(super().keys())
        return super().items()


def optim_args_problems(config) -> list[str]:
    """`optim_args` names the chosen optimizer never reads: transformers' handlers take a fixed list of names (SGD's
    momentum, dampening, weight_decay, nesterov; AdamW and Adafactor none) and drop the rest without a word, so a
    misspelt `momentun=0.9` trained as if unset. Asks the handler itself which names it reads; an optimizer whose
    handler cannot run here (a package or the model missing) is not judged."""
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS, OptimizerContext, _parse_optim_args

    if not getattr(config, "optim_args", None) or not hasattr(config, "optim"):
        return []
    name = getattr(config.optim, "value", config.optim)
    try:
        given = _NamesAsked(_parse_optim_args(config.optim_args))
    except ValueError:  # "a=1,b" (no `=`): transformers' unpacking error when the Trainer is built
        return [f"key 'optim_args' must be comma-separated name=value pairs, got '{config.optim_args}'"]
    context = OptimizerContext(
        args=config, model=None, optimizer_kwargs={"lr": config.learning_rate}, adam_kwargs={}, optim_args=given
    )
    try:
        _OPTIMIZER_HANDLERS[name](context)
    except Exception:  # noqa: BLE001 -- a handler that needs its package or the model: not judged here
        return []
    unread = [key for key in dict.keys(given) if key not in given.asked]
    if not unread:
        return []
    reads = sorted(given.asked - set(unread))
    hint = (
        ": AdamW's settings are the keys adam_beta1, adam_beta2, adam_epsilon, weight_decay" if "adam" in name else ""
    )
    return [
        f"key 'optim_args': optim {name} does not read {', '.join(unread)} (it reads "
        f"{', '.join(reads) if reads else 'none' + hint}); transformers would drop them without a word"
    ]
