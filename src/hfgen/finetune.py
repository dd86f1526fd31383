"""What the fine-tuning stages (`sft`, `reward`) share: recipe checks and model loading on TRL's `ModelConfig`, and
the construction of a TRL trainer, which every TRL-based stage (preference, grpo, rloo too) goes through.

Both stages take TRL's `ModelConfig` keys as they are (`use_peft`, `lora_r`, `lora_alpha`, `lora_dropout`,
`lora_target_modules`, `load_in_4bit`, ...), so a recipe written for `trl sft` reads the same here. The starting
model may be a hub id, a full model dir, or a LoRA adapter dir from an earlier run (merged into its base on load).
"""

from __future__ import annotations

import dataclasses
from importlib.util import find_spec
from pathlib import Path

from hfgen.data.prepare import data_seed
from hfgen.errors import UserError
from hfgen.models import (
    adapter_base,
    base_model_of,
    check_lora_targets,
    check_model_source,
    diffusers_dir_problem,
    fit_embeddings,
    fit_max_length,
    linear_layers_hint,
    load_causal_lm,
    merged,
    relative_to_cwd,
)


def run_first_hint(path: str) -> str:
    """For a missing `outputs/X/Y`: the recipe that writes it, when `recipes/X/Y.yaml` exists."""
    parts = Path(path).parts
    if "outputs" in parts:
        recipe = Path("recipes", *parts[parts.index("outputs") + 1 :]).with_suffix(".yaml")
        if recipe.is_file():
            return f"run `hfgen train {recipe}` first"
    return "run the recipe that writes it first"


def check_model_config(
    model_args,
    trust_remote_code: bool = False,
    task_type: str = "CAUSAL_LM",
    trl_trainer: str | None = None,
    trainer_prepared: bool = True,
) -> list[str]:
    """Problems with a fine-tuning recipe's model keys, found before anything heavy is loaded (`trust_remote_code`:
    the recipe's, on its training config; `task_type`: peft's name for the model the stage trains, which its LoRA
    adapter must carry; `trl_trainer`: the TRL trainer that trains it, whose refusal of an adapter on lm_head
    would come only once the model and data had loaded; `trainer_prepared`: a transformers Trainer prepares the
    model for the engine, not hfgen's own loop)."""
    name = model_args.model_name_or_path
    if not name:
        return [
            "model_name_or_path is not set: name the model to fine-tune (hub id, model dir, or an earlier run's output_dir)"
        ]
    problems = check_model_source(
        "model_name_or_path", name, hint=run_first_hint(name), trust_remote_code=trust_remote_code
    )
    # (a vae run or a pipeline: found at its tokenizer's load, after DPO's check had called the recipe valid)
    needs = "a transformers model" if task_type == "SEQ_CLS" else "a causal language model"
    problems += [] if problems else diffusers_dir_problem("model_name_or_path", name, needs)
    if model_args.load_in_4bit or model_args.load_in_8bit:
        key = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit"
        if not model_args.use_peft:
            problems.append(f"{key} (QLoRA) trains LoRA adapters on a frozen quantized base: set use_peft: true")
        if adapter_base(name):
            problems.append(f"{key}: model_name_or_path '{name}' is a LoRA adapter dir; merge it first (hfgen merge)")
        problems += quantization_problems(key)
    # QLoRA's 4-bit settings are read only with load_in_4bit (trl.get_quantization_config): set without it, they
    # would be ignored. (Compared with the defaults: a recipe spelling those out still checks.)
    defaults = {f.name: f.default for f in dataclasses.fields(model_args)}
    changed = [
        key for key in ("use_bnb_nested_quant", "bnb_4bit_quant_type", "bnb_4bit_quant_storage")
        if key in defaults and getattr(model_args, key) != defaults[key]
    ]  # fmt: skip
    if changed and not model_args.load_in_4bit:
        problems.append(
            f"{', '.join(changed)}: settings of 4-bit (QLoRA) loading, read only with load_in_4bit: true; drop them "
            "or set load_in_4bit: true"
        )
    # The adapter's task type decides which peft class loads it: another than the stage's trains another model (a
    # SEQ_CLS head on an SFT policy, which generate/merge then refuse) and a name peft lacks fails inside peft.
    # TRL's default (CAUSAL_LM) stands for "not set", which lora_config's `task_type` change overrides.
    if model_args.use_peft and model_args.lora_task_type not in (task_type, defaults["lora_task_type"]):
        problems.append(
            f"lora_task_type '{model_args.lora_task_type}': this stage trains adapters of task type {task_type} "
            f"(peft's name for the model it trains); drop the key or set lora_task_type: {task_type}"
        )
    targets = model_args.lora_target_modules
    if model_args.use_peft and trl_trainer and isinstance(targets, list) and "lm_head" in targets:
        problems.append(  # TRL's ValueError: it computes log-probs from lm_head.weight, never the adapter
            f"lora_target_modules: {trl_trainer} does not train a LoRA adapter on lm_head (its log-probabilities "
            "read lm_head's weight directly, so the adapter would never train); drop lm_head, or train the head "
            "in full with lora_modules_to_save: [lm_head]"
        )
    if not problems and model_args.use_peft:
        # a sequence classifier (SEQ_CLS) has no output embedding to share a weight with
        problems += lora_target_problems(model_args, trust_remote_code, trainer_prepared and task_type == "CAUSAL_LM")
    return problems


def lora_target_problems(model_args, trust_remote_code: bool, tied_check: bool = True) -> list[str]:
    """`lora_config`'s check of `lora_target_modules`, on the model's architecture built on the meta device (no
    weights read), so a recipe written for another family fails in seconds rather than after the model loads; then,
    with `tied_check` (a causal LM a Trainer prepares), `tied_modules_to_save_problems`. Best effort: a model this cannot build here is
    checked once loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    name = base_model_of(model_args.model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(resolved(name), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 (any failure to build it here leaves the check to the loaded model)
        return []
    try:
        lora_config(model_args, model, warn=False)
    except UserError as error:
        return [str(error)]
    return tied_modules_to_save_problems(model_args, model) if tied_check else []


def tied_modules_to_save_problems(model_args, model) -> list[str]:
    """`lora_modules_to_save` naming the input or output embedding of a model whose two share one weight
    (tie_word_embeddings), launched under FSDP2. peft's trainable copy of the module (ModulesToSaveWrapper) hides the
    tie from accelerate's FSDP2 prepare of the Trainer's model, which then shards the shared weight in two groups,
    and torch stops at the first step. (PPO's own loop prepares its models inside one module, and trains them.)"""
    from hfgen.loop import launched_engine

    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if launched_engine() != "fsdp2" or outputs is None or inputs.weight is not outputs.weight:
        return []
    tied = [name for name, module in model.named_modules() if module is inputs or module is outputs]
    asked = [m for m in model_args.lora_modules_to_save or [] if any(n == m or n.endswith(f".{m}") for n in tied)]
    if not asked:
        return []
    return [
        f"lora_modules_to_save: {', '.join(asked)} under FSDP2: model '{model_args.model_name_or_path}' ties its "
        f"input and output embeddings ({' and '.join(tied)} share one weight, tie_word_embeddings), and peft's "
        "trainable copy of the module hides the tie from accelerate's FSDP2 sharding, which puts the shared weight "
        "in two groups (torch stops at the first step). Launch under DDP or DeepSpeed ZeRO-2/3, start from a model "
        f"with untied embeddings (tie_word_embeddings: false), or drop {', '.join(asked)} from the key"
    ]


def quantization_problems(key: str) -> list[str]:
    """bitsandbytes 4/8-bit weights need a CUDA GPU and the bitsandbytes package: say so before any loading."""
    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    if find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed (pip install 'hfgen[qlora]')")
    if not missing:
        return []
    return [
        f"{key} (QLoRA) needs a CUDA GPU and bitsandbytes, but {' and '.join(missing)}; drop {key} to train plain LoRA"
    ]


def resolved(name: str) -> str:
    """Local paths made absolute, so an adapter's recorded base (adapter_config.json) loads from any directory."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def tokenizer_for(model_args, training_args):
    """The tokenizer as TRL's SFTTrainer and RewardTrainer render with: the recipe's `eos_token`, then with
    `chat_template_path` that template (a .jinja file, or the template, added tokens and EOS of a tokenizer, as TRL's
    `clone_chat_template` copies them) in place of the model's own, so the checks, the pre-tokenized rows and the
    held-out responses see what training sees. The trainer applies the same again in its constructor (and, from a
    tokenizer, grows the model for its tokens)."""
    from hfgen.models import load_tokenizer

    tokenizer = load_tokenizer(model_args.model_name_or_path, training_args.trust_remote_code)
    if training_args.eos_token:
        if training_args.eos_token not in tokenizer.get_vocab():  # TRL's ValueError, once the model has loaded
            raise UserError(
                f"eos_token '{training_args.eos_token}' is not a token of the tokenizer of "
                f"'{model_args.model_name_or_path}'; name one of its tokens (its EOS is '{tokenizer.eos_token}')"
            )
        tokenizer.eos_token = training_args.eos_token
    path = training_args.chat_template_path
    if not path:
        return tokenizer
    if path.endswith((".jinja", ".j2")):
        if not Path(path).is_file():
            raise UserError(
                f"chat_template_path '{path}' does not exist{relative_to_cwd(path)} (a .jinja template file)"
            )
        tokenizer.chat_template = Path(path).read_text(encoding="utf-8")
        return tokenizer
    from transformers import AutoTokenizer

    if problems := check_model_source("chat_template_path", path):  # an uncached hub id offline, a missing dir
        raise UserError(problems[0] + " (a .jinja file, or a tokenizer dir or hub id whose template is copied)")
    try:
        source = AutoTokenizer.from_pretrained(path, trust_remote_code=training_args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(
            f"chat_template_path '{path}': no tokenizer loads from it ({str(error).strip().splitlines()[0]}); give "
            "a .jinja template file, or a tokenizer dir or hub id whose template is copied"
        ) from None
    tokenizer.chat_template = source.get_chat_template()
    tokenizer.add_tokens([t for t in source.added_tokens_decoder.values() if t.content not in tokenizer.vocab])
    tokenizer.eos_token = source.eos_token
    return tokenizer


def load_model(model_args, training_args, tokenizer, sequence_classifier: bool = False):
    """The model to fine-tune, before any LoRA wrapping: a causal LM, or (`sequence_classifier`) a one-label
    `AutoModelForSequenceClassification` whose new `score` head reads the last non-pad token.

    A LoRA adapter dir is merged into its base first. The embeddings grow if the tokenizer gained a pad token
    (`load_tokenizer` guarantees one, distinct from EOS), since a pad id past the embedding table crashes the
    first padded batch.
    """
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import get_quantization_config
    from trl.trainer.utils import create_model_from_path

    name = model_args.model_name_or_path
    if adapter_base(name):
        import torch

        # Loading an adapter draws random LoRA weights before reading the saved ones, and not the same draws under
        # ZeRO-3: the random state is put back, so a new adapter starts the same on every engine.
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            model = load_causal_lm(
                name, model_args.dtype, training_args.trust_remote_code, model_args.attn_implementation
            )
            # peft froze the base; full fine-tuning trains it
            model = merged(model, f"model_name_or_path '{name}'").requires_grad_(True)
        # peft records the model's name as a new adapter's base: the adapter dir, whose weights are merged in here
        # (the merged base alone would load without them); load_causal_lm follows such chains. The config's name is
        # what peft's model card gives as base_model: it named the first base, without the adapter merged in here.
        model.name_or_path = model.config.name_or_path = resolved(name)
        if sequence_classifier:
            model = sequence_classifier_from(model)
    else:
        kwargs = {
            "revision": model_args.model_revision,
            "dtype": model_args.dtype,
            "trust_remote_code": training_args.trust_remote_code,
            # Loaded where it is, then placed by Trainer/accelerate (DDP, FSDP and DeepSpeed all want device_map None).
            "device_map": None,
        }
        if model_args.attn_implementation:
            kwargs["attn_implementation"] = model_args.attn_implementation
        quantization = get_quantization_config(model_args)
        if quantization is not None:  # 4/8-bit weights are placed at load time, one copy per process
            kwargs |= {"quantization_config": quantization, "device_map": {"": PartialState().local_process_index}}
        if sequence_classifier:
            kwargs["num_labels"] = 1
        kwargs |= training_args.model_init_kwargs or {}
        architecture = AutoModelForSequenceClassification if sequence_classifier else AutoModelForCausalLM
        from safetensors import SafetensorError

        from hfgen.models import load_problem

        try:
            model = create_model_from_path(resolved(name), architecture, **kwargs)
        except (OSError, SafetensorError) as error:  # a shard missing or cut short: bad input, named
            what = "a sequence classifier" if sequence_classifier else "a causal language model"
            raise load_problem(what, name, error, training_args.trust_remote_code) from None
    fit_embeddings(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    fit_max_length(model, training_args)
    return model


def lora_config(model_args, model, warn: bool = True, where: str | None = None, **changes):
    """TRL's `get_peft_config(model_args)` (None without `use_peft`), with `changes` applied, checked against
    `model` before any stage wraps it, so a recipe written for another architecture exits 2 naming
    `lora_target_modules` and the model's linear layers instead of failing inside peft.

    TRL turns a one-item list into a string, which peft reads as a regular expression over whole module paths:
    `[c_attn]` would then match nothing. A bare module name stays a name here (peft's suffix match, as for a
    longer list); `all-linear` and real expressions stay strings.
    """
    import dataclasses
    import re

    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from trl import get_peft_config

    config = get_peft_config(model_args)
    if config is None:
        return None
    targets = config.target_modules
    if isinstance(targets, str) and targets != "all-linear" and re.fullmatch(r"[\w.]+", targets):
        changes = {"target_modules": [targets], **changes}
    config = dataclasses.replace(config, **changes) if changes else config
    targets = config.target_modules
    model_type = getattr(model.config, "model_type", None)
    where = where or f"model '{model_args.model_name_or_path}' ({model_type})"  # the model the warnings name
    if targets is None and config.target_parameters is None:
        if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
            raise UserError(
                f"lora_target_modules is not set and peft has no default for {where}: name the layers to adapt "
                f"({linear_layers_hint(model)})"
            )
    elif targets is not None and targets != "all-linear":
        check_lora_targets(targets, model, where, warn_partial=warn)
    if config.lora_dropout and (parameters := adapted_parameters(config, model)):
        raise UserError(  # peft's bare ValueError at wrapping time: "lora.ParamWrapper does not work with ..."
            f"lora_target_modules: {model_args.lora_target_modules} on {where}, a Mixture-of-Experts model, also "
            f"adapts its expert weights ({', '.join(sorted(parameters))}: parameters, not layers, which peft adapts "
            f"without dropout), but lora_dropout is {config.lora_dropout}: set lora_dropout: 0, or name only other "
            "layers in lora_target_modules (the attention projections, e.g. [q_proj, k_proj, v_proj, o_proj])"
        )
    return config


def adapted_parameters(config, model) -> set[str]:
    """The bare parameters (not layers) a LoRA `config` adapts on `model`: peft's `target_parameters`, which peft
    fills in itself on transformers-5 Mixture-of-Experts models (Mixtral, Qwen3-MoE), whose experts are fused weights,
    for `all-linear` or a list naming the experts' old projections (w1, gate_proj...)."""
    import copy

    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    probe = copy.deepcopy(config)  # peft converts the config in place when it wraps the model
    convert_peft_config_for_transformers(probe, model, conversions=None)
    return set(probe.target_parameters or [])


def sequence_classifier_from(causal_lm):
    """A one-label sequence classifier sharing `causal_lm`'s backbone weights, with a fresh `score` head."""
    import copy

    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    classifier = AutoModelForSequenceClassification.from_config(config, dtype=causal_lm.dtype)
    backbone = causal_lm.base_model_prefix
    getattr(classifier, backbone).load_state_dict(getattr(causal_lm, backbone).state_dict())
    classifier.config.name_or_path = causal_lm.config.name_or_path
    return classifier


def count_trained_tokens(training_args) -> None:
    """Have Trainer count the non-padding input tokens it trains on (`state.num_input_tokens_seen`, summed over
    processes), for tokens/s in eval.json: one count for every collator and trainer. (A recipe can only say
    true/false for this key, and true means "all", padding included.)"""
    training_args.include_num_input_tokens_seen = "non_padding"


def loaded_dtype(model_args) -> str | None:
    """The dtype `model_args` load the model in (`auto`: the checkpoint's, read from its config; None where no
    config says, e.g. an adapter dir, whose base decides, or a model built from scratch)."""
    dtype = model_args.dtype
    if dtype != "auto":
        return dtype
    from transformers import AutoConfig

    name = getattr(model_args, "model_name_or_path", None)
    if not name:
        return None
    try:
        checkpoint = AutoConfig.from_pretrained(resolved(name))
    except (OSError, ValueError):
        return None
    return str(getattr(checkpoint, "dtype", None) or "").removeprefix("torch.") or None


def float32_weights_note(dtype: str, frozen: str) -> str:
    """Why a model trained in full keeps float32 weights when `dtype` asks for a half dtype (said when it happens)."""
    resolution = {"bfloat16": 256, "float16": 2048}[dtype]  # half the spacing of its numbers, relative
    return (f"dtype {dtype}: the trained weights stay float32 and compute in {dtype} (mixed precision): an update "
            f"smaller than 1/{resolution} of a weight would be lost in {dtype} (AdamW's are about the learning rate); "
            f"{frozen}")  # fmt: skip


def router_logits_for_training(model, switch_on: bool = False) -> bool | None:
    """A Mixture-of-Experts model's `output_router_logits` as it came (None: not one), switched on with `switch_on`
    where its config weighs the load-balancing loss (router_aux_loss_coef): TRL's ORPO and CPO (SimPO) trainers
    train that loss only with the key on, which SFTTrainer switches on itself, and DPO, KTO, GRPO and RLOO's trainers
    ask the forward for. Give the value to `restore_router_logits` before the save."""
    text_config = model.config.get_text_config()
    loaded = getattr(text_config, "output_router_logits", None)
    if switch_on and loaded is False and getattr(text_config, "router_aux_loss_coef", 0):
        text_config.output_router_logits = True
    return loaded


def restore_router_logits(model, loaded: bool | None) -> None:
    """The saved config says what the model came with (`router_logits_for_training`): other tools' batched generate
    fails on a padded batch with output_router_logits on (hfgen's own turns it off for the call)."""
    if loaded is not None:
        model.config.get_text_config().output_router_logits = loaded


def keep_float32_weights(model, args, lora: bool) -> None:
    """A model loaded in bfloat16 (or float16) and trained in full by a Trainer would be updated in that dtype:
    AdamW's steps of about the learning rate round away against weights 1e3-1e4 times larger (measured: 15% of the
    tiny model's weights moved in 10 SFT steps at 2e-5, 0.3% of PPO's in 16 at 1e-6). So it trains float32 weights
    under mixed precision in that dtype, as FSDP2 (which upcasts) and DeepSpeed (float32 master weights) do; those
    are left to their engine. LoRA trains float32 adapters on the frozen half-precision base already. The starting
    model given as the reference is upcast with it (`upcast_like`)."""
    import torch

    dtype = next(model.parameters()).dtype
    if lora or dtype not in (torch.bfloat16, torch.float16) or getattr(args, "deepspeed_plugin", None) is not None:
        return
    model.float()
    args.bf16, args.fp16 = dtype == torch.bfloat16, dtype == torch.float16
    args.mixed_precision = "bf16" if args.bf16 else "fp16"
    name = str(dtype).removeprefix("torch.")
    print(float32_weights_note(name, "a frozen reference too (it computes as the policy's start); other frozen models "
                                     "stay in it"))  # fmt: skip


def float32_fully_trained_modules(model) -> None:
    """A LoRA model on a half-precision base, trained under that mixed precision: the modules peft trains in full
    (`modules_to_save`: the reward stage's and PPO's value `score` head, `lora_modules_to_save` such as embed_tokens)
    keep the base's dtype (peft upcasts its adapter layers only), and AdamW's steps round away against them as
    against a half-precision model trained in full (`keep_float32_weights`; measured: 81% of PPO's value-head
    updates lost at 1e-5), while fp16's GradScaler refuses their half-precision gradients outright. Their weights
    are cast to float32, in place; the autocast mixes them with the half-precision base. Without mixed precision
    (no autocast) they stay in the base's dtype, which their inputs have."""
    import torch

    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.bfloat16, torch.float16):
            parameter.data = parameter.data.float()


def upcast_like(start, trained):
    """`start` (a frozen copy of the starting model: a KL reference, a comparison's baseline, loaded in the half
    dtype asked) in float32 when `trained` was upcast from it to train (`keep_float32_weights`, PPO's
    `rl.models.training_precision`), in place; None and a model already in the trained dtype stay as they are.
    Under the same mixed-precision autocast a float32 model keeps its residual stream, norms and embeddings in
    float32 where a bfloat16 copy of the same weights rounds them: the reference's log-probs then differed from the
    policy's start (measured on the tiny model: 0.04 nats a token, PPO's KL 0.005 and GRPO's held-out
    kl_to_reference 0.023 at learning rate 0). Upcast, it computes as the policy did at its start, bit for bit; the
    cost is the reference's weights at 4 bytes a parameter instead of 2, against the 16 of the trained model's
    weights, gradients and AdamW moments."""
    import torch

    if start is None:
        return start
    half = next(start.parameters()).dtype
    if half in (torch.bfloat16, torch.float16) and next(trained.parameters()).dtype == torch.float32:
        start.float()
    return start


def build_trainer(trainer_class, output_dir, *, trainer_name: str | None = None, callbacks=(), eval_dataset=None,
                  **kwargs):  # fmt: skip
    """`trainer_class(**kwargs)` with what every TRL-based stage gives its trainer: hfgen's records
    (`tracking.trainer_callbacks(output_dir)`, after the stage's own `callbacks`) and `eval_dataset` only when
    `args.eval_strategy` evaluates. TRL validates the config against the data and the model in the constructor, so
    a ValueError there is the recipe's, as is a NotImplementedError (a combination of keys TRL does not support,
    e.g. sync_ref_model with LoRA): a UserError naming the trainer (`trainer_name`, default the class's) and TRL's
    reason."""
    from hfgen import tracking

    keep_float32_weights(kwargs["model"], kwargs["args"], lora=kwargs.get("peft_config") is not None)
    # the starting model hfgen hands over as the KL reference (DPO and KTO's ref_model, GRPO and RLOO's `reference`,
    # group_rl.recorded): upcast as the policy was. (A reference TRL builds itself, from model_init_kwargs, takes the
    # policy's dtype by default.)
    for frozen in ("ref_model", "reference"):
        upcast_like(kwargs.get(frozen), kwargs["model"])
    if kwargs["args"].eval_strategy != "no":
        kwargs["eval_dataset"] = eval_dataset
    try:
        trainer = hfgen_trainer(trainer_class)(
            callbacks=[*callbacks, *tracking.trainer_callbacks(output_dir)], **kwargs
        )
    except (ValueError, NotImplementedError) as error:
        raise UserError(f"{trainer_name or trainer_class.__name__} rejected the recipe: {error}") from None
    args = kwargs["args"]
    if (
        kwargs.get("peft_config") is not None
        and (args.bf16 or args.fp16)
        and getattr(args, "deepspeed_plugin", None) is None
    ):
        # (the trainer wrapped the model in peft; DeepSpeed and FSDP2 keep float32 trained weights themselves)
        float32_fully_trained_modules(trainer.model)
    return trainer


def hfgen_trainer(trainer_class):
    """`trainer_class` (a TRL trainer, or transformers' Trainer for pretrain) as every Trainer stage trains with it:
    its order of `group_by_length` from data_seed, every held-out row evaluated, whole models saved, the closing
    train_loss over every process."""
    return train_loss_over_every_process(
        saving_whole_models(every_held_out_row_evaluated(length_groups_from_data_seed(trainer_class)))
    )


def train_loss_over_every_process(trainer_class):
    """`trainer_class` whose closing `train_loss` (the run's `training_loss`, the closing metrics.jsonl row's and
    eval.json's, `tracking.run_train_loss`) averages every process's losses, as each logged `loss` row does.
    transformers' `_finalize_training` adds this process's loss sum since the last logged row, not gathered: on
    several processes the steps after the last logged row counted the main process's batches alone (all of them
    with logging_steps past max_steps: SFT 2.956 on 2 processes, 3.146 on one, at learning rate 0; probe 44 D2). A
    resumed run's earlier steps were averaged over the processes already (`tracking.loss_window`)."""

    class TrainLossOverEveryProcess(trainer_class):
        def _finalize_training(self, *args, **kwargs):
            from transformers.trainer_pt_utils import nested_gather

            # as `_maybe_log_save_evaluate` averages a logged row's: gathered and averaged (every process reaches
            # this, a collective), so each process holds the same sum of mean losses
            self._tr_loss = nested_gather(self._tr_loss.detach(), self.args.parallel_mode).mean()
            return super()._finalize_training(*args, **kwargs)

    TrainLossOverEveryProcess.__name__ = TrainLossOverEveryProcess.__qualname__ = trainer_class.__name__
    return TrainLossOverEveryProcess


def every_held_out_row_evaluated(trainer_class):
    """`trainer_class` whose evaluation loaders keep the last partial batch whatever `dataloader_drop_last` says:
    transformers applies it to every loader it builds, so the periodic evaluation left the held-out split's last
    rows out (metrics.jsonl's eval_loss over 4 of 5 blocks beside eval.json's over 5, for the same weights), and a
    split smaller than the evaluation batch logged no eval_loss at all, which then stopped a run with
    `metric_for_best_model: eval_loss` as a figure the stage does not log (probe 43 D4). drop_last is for the
    training batches (a step of equal-sized batches); evaluation is over every held-out row, as hfgen's own final
    measure is."""

    class EveryHeldOutRowEvaluated(trainer_class):
        def _get_dataloader(self, *args, is_training: bool = False, **kwargs):
            drop_last = self.args.dataloader_drop_last
            self.args.dataloader_drop_last = drop_last and is_training
            try:
                return super()._get_dataloader(*args, is_training=is_training, **kwargs)
            finally:
                self.args.dataloader_drop_last = drop_last

    EveryHeldOutRowEvaluated.__name__ = EveryHeldOutRowEvaluated.__qualname__ = trainer_class.__name__
    return EveryHeldOutRowEvaluated


def length_groups_from_data_seed(trainer_class):
    """`trainer_class` whose `train_sampling_strategy: group_by_length` sampler draws each epoch's order from
    `data_seed` (else `seed`) and the epoch (`EpochSeededLengthGroups`). transformers builds the training
    LengthGroupedSampler with no generator, so each epoch's order came from torch's global RNG when the epoch began:
    a seed sweep with data_seed fixed trained each seed on another order (probe 43 D3), and a run resumed in an epoch
    after the first drew that epoch's order right after its start, not after the earlier epochs' draws, so it skipped
    the first batches of another order (D2). The Trainer sets each epoch on the sampler before the epoch's iterator;
    the resumed epoch is set here too, once the checkpoint says which it is (a skipping loader on several processes
    does not pass set_epoch on)."""

    class LengthGroupsFromDataSeed(trainer_class):
        def _get_train_sampler(self, dataset=None):
            from transformers.trainer_pt_utils import LengthGroupedSampler

            sampler = super()._get_train_sampler(dataset)
            if type(sampler) is LengthGroupedSampler:
                sampler = EpochSeededLengthGroups(sampler, data_seed(self.args))
            self._epoch_seeded_sampler = sampler if isinstance(sampler, EpochSeededLengthGroups) else None
            return sampler

        def _init_training_state(self, *args, **kwargs):
            epochs_trained, steps_trained_in_current_epoch = super()._init_training_state(*args, **kwargs)
            if getattr(self, "_epoch_seeded_sampler", None) is not None:
                self._epoch_seeded_sampler.set_epoch(epochs_trained)
            return epochs_trained, steps_trained_in_current_epoch

    LengthGroupsFromDataSeed.__name__ = LengthGroupsFromDataSeed.__qualname__ = trainer_class.__name__
    return LengthGroupsFromDataSeed


class EpochSeededLengthGroups:
    """transformers' LengthGroupedSampler (`groups`) whose epoch `e` draws its order from a generator seeded
    `seed + e`, as accelerate's SeedableRandomSampler draws the random strategy's: the same order on every process
    and in a resumed run. (A data loader takes any sized iterable of indices as its sampler.)"""

    def __init__(self, groups, seed: int):
        self.groups, self.seed, self.epoch = groups, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        import torch

        self.groups.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(self.groups)


def saving_whole_models(trainer_class):
    """`trainer_class` whose saves (the final one and each checkpoint's) write one whole model that `from_pretrained`
    loads under every engine, as hfgen's own loops do (`loop.prepare`, `loop.full_state_dict`):
    - under ZeRO-3 the Trainer gathers the partitioned weights only with DeepSpeed's
      `stage3_gather_16bit_weights_on_model_save` (accelerate's `--zero3_save_16bit_model`, off by default); without
      it the run ended COMPLETE with DeepSpeed's shards (global_step*/) and no weights. It is set before the engine
      starts. The checkpoints keep DeepSpeed's shards too, which a resume reads.
    - under FSDP the Trainer saves a model only with `state_dict_type: FULL_STATE_DICT`; with SHARDED_STATE_DICT (as
      recipes/accelerate/fsdp.yaml ships) it saved nothing, and the run ended COMPLETE without a model. The final
      save gathers the whole state dict as it is for FULL_STATE_DICT (accelerate's `get_state_dict` gathers every
      shard whatever the type); the checkpoints keep the sharded state alone, which a resume reads
      (`save_fsdp_model`), as a sharded state dict asks (no gather to one process at every save_steps).
    - tied weights (embeddings and LM head) are written once, as under DDP: under ZeRO-2 and FSDP2 the Trainer hands
      `_save` a whole state dict with a copy per name (`loop.tied_as_in`)."""
    from hfgen import loop

    class WholeModelSaves(trainer_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.is_deepspeed_enabled:  # (the engine starts in train(), from this config)
                plugin = self.accelerator.state.deepspeed_plugin
                plugin.deepspeed_config.setdefault("zero_optimization", {})[
                    "stage3_gather_16bit_weights_on_model_save"
                ] = True
                plugin.zero3_save_16bit_model = True

        def save_model(self, output_dir=None, _internal_call=False):
            # (a checkpoint's save, `_internal_call`, keeps the sharded state alone: gathering every save_steps is
            # what a sharded state dict is chosen to avoid; the checkpoint's model shards are saved for the resume)
            if (
                self.is_fsdp_enabled
                and not _internal_call
                and "FULL_STATE_DICT" not in str(self.accelerator.state.fsdp_plugin.state_dict_type)
            ):
                self._save(output_dir or self.args.output_dir, state_dict=self.accelerator.get_state_dict(self.model))
                if self.args.push_to_hub and not _internal_call:  # as the Trainer's own save_model does
                    self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
                return
            super().save_model(output_dir, _internal_call)

        def _save(self, output_dir=None, state_dict=None):
            if state_dict is not None:
                state_dict = loop.tied_as_in(self.accelerator.unwrap_model(self.model), state_dict)
            super()._save(output_dir, state_dict)

    WholeModelSaves.__name__ = WholeModelSaves.__qualname__ = trainer_class.__name__
    return WholeModelSaves
