"""PPO's models and sampling settings, from the recipe: the policy (and its frozen reference, or none with LoRA),
the value model, the reward scorer and the oracle, dropout off in all of them; AdamW parameter groups; the
tokenized prompts and the pinned generation config (also used by `hfgen.evaluation.policy`). `model_args` is trl's
`ModelConfig`, `config` a `hfgen.stages.ppo.PPOConfig`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from hfgen.errors import UserError
from hfgen.rl.rollout import RewardScorer, function_name, load_function


def disable_dropout(model) -> None:
    """Dropout off everywhere (Huang et al. detail 10): with it, log-probs of the same tokens differ between the
    rollout and the update, and the PPO ratio starts away from 1."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


HALF_PRECISION = {"bfloat16": "bf16", "float16": "fp16"}


def training_precision(model_args, config) -> tuple[str, object]:
    """(accelerate's mixed_precision, the model args the policy, its reference and the value model load with). PPO's side of
    `hfgen.finetune.keep_float32_weights`: with `dtype: bfloat16` (or float16, or `auto` on a half-precision
    checkpoint) and no LoRA, the trained policy and value model load in float32 and compute in the half dtype (mixed
    precision), decided before the accelerator exists; the frozen reference loads as the policy does, so that it
    computes as the policy's start (`hfgen.finetune.upcast_like` says why), and the reward model as asked. At PPO's
    learning rates a bfloat16 policy barely moves (measured: 0.3% of the tiny policy's weights changed in 16 updates
    at 1e-6)."""
    from hfgen.finetune import float32_weights_note, loaded_dtype

    dtype = loaded_dtype(model_args)
    precision = "bf16" if config.bf16 else "no"
    if model_args.use_peft or dtype not in HALF_PRECISION:
        return precision, model_args
    print(float32_weights_note(dtype, "the reference too (it computes as the policy's start); the reward model stays "
                                      "in it"))  # fmt: skip
    return HALF_PRECISION[dtype], dataclasses.replace(model_args, dtype="float32")


def load_policy_and_reference(model_args, config):
    """(tokenizer, policy, reference). With use_peft the policy is a PeftModel and the reference is None: it is
    the same model with its adapter disabled. Else the reference is the policy's start, loaded as it is (the
    model args `training_precision` gives: float32 where the policy trains float32 weights), so that the two
    compute alike until the policy trains."""
    from hfgen.finetune import load_model, lora_config
    from hfgen.models import load_tokenizer, pad_apart_from_eos

    tokenizer = load_tokenizer(model_args.model_name_or_path, config.trust_remote_code)
    tokenizer.padding_side = "left"
    pad_apart_from_eos(tokenizer)  # responses would never be seen to end otherwise
    policy = load_model(model_args, config, tokenizer)
    disable_dropout(policy)
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.config.use_cache = False  # `generate` turns the cache back on for itself
    if model_args.use_peft:
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(model_args, policy))
        disable_dropout(policy)  # again: the adapters bring their own dropout (lora_dropout)
        return tokenizer, policy, None
    reference = load_model(model_args, config, tokenizer).eval().requires_grad_(False)
    return tokenizer, policy, reference


def parameter_groups(trainable, config) -> list[dict]:
    """AdamW parameter groups of the trained parameters: weight decay on weight matrices only, never on biases or
    norms (transformers' Trainer rule), and the value model at `critic_learning_rate` when it is set."""
    from transformers.trainer_pt_utils import get_parameter_names

    no_decay_patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decayed = set(get_parameter_names(trainable, [torch.nn.LayerNorm], no_decay_patterns))
    groups = []
    for part in ("policy", "value_model"):
        lr = config.critic_learning_rate if part == "value_model" and config.critic_learning_rate is not None else None
        for decay in (True, False):
            params = [
                p for name, p in trainable.named_parameters()
                if p.requires_grad and name.startswith(part + ".") and (name in decayed) == decay
            ]  # fmt: skip
            if params:
                group = {"params": params, "weight_decay": config.weight_decay if decay else 0.0, "part": part}
                groups.append(group | ({"lr": lr} if lr is not None else {}))  # 0 too: a frozen critic
    return groups


def load_sequence_classifier(path: str, model_args, config, tokenizer, key: str):
    """A one-label sequence classifier from a full model dir, a classifier's LoRA adapter dir (merged), or a
    causal LM (its backbone, with a new score head); a classifier of several labels exits 2 naming `key`."""
    from hfgen.finetune import load_model, resolved
    from hfgen.models import reward_model_problem

    if problem := reward_model_problem(key, path, config.trust_remote_code):
        raise UserError(problem)

    adapter_config = Path(path) / "adapter_config.json"
    if (
        adapter_config.is_file()
        and json.loads(adapter_config.read_text(encoding="utf-8")).get("task_type") == "SEQ_CLS"
    ):
        from peft import AutoPeftModelForSequenceClassification

        from hfgen.models import merged, torch_dtype

        model = AutoPeftModelForSequenceClassification.from_pretrained(
            resolved(path), num_labels=1, trust_remote_code=config.trust_remote_code,
            dtype=torch_dtype(model_args.dtype or "auto"),
        )  # fmt: skip
        # peft loads an adapter for inference, every parameter frozen: a value model started from it never trained
        # (a reward model is frozen by its caller); and in the recipe's dtype, as a full model dir loads. Merged with
        # whole weights: under ZeRO-3 zero.Init partitioned the base as it loaded
        model = merged(model, f"{key} '{path}'").requires_grad_(True)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        classifier_args = dataclasses.replace(
            model_args, model_name_or_path=path, use_peft=False, load_in_4bit=False, load_in_8bit=False
        )
        model = load_model(classifier_args, config, tokenizer, sequence_classifier=True)
    disable_dropout(model)
    return model


def value_vocabulary_problem(path: str, policy_tokenizer, trust_remote_code: bool = False) -> str | None:
    """Why `value_model_path` cannot read the policy's tokens (another vocabulary), or None."""
    from hfgen.models import load_tokenizer
    from hfgen.rl.rollout import same_vocabulary

    if same_vocabulary(policy_tokenizer, load_tokenizer(path, trust_remote_code)):
        return None
    return (
        f"value_model_path '{path}' has another vocabulary than the policy's: the value model reads the policy's "
        "token ids, which would mean other tokens to it (or lie outside its embeddings); give a model of the "
        "policy's tokenizer (e.g. a reward model trained from the policy's SFT model), or leave value_model_path "
        "unset to start from the reward model (when it shares the vocabulary) or the policy"
    )


def load_value_model(model_args, config, tokenizer):
    """The value model, initialised from value_model_path, else the reward model (Huang et al. detail 6), else the
    policy's weights with a new head. It reads the policy's tokens, so it must share the policy's vocabulary
    (`value_model_path` of another exits 2; `hfgen check` says so first), and its per-token values come from a
    decoder's hidden states through a `score` head (a decoder's sequence classifier, or a causal LM's backbone)."""
    from hfgen.models import load_tokenizer
    from hfgen.rl.rollout import same_vocabulary

    key, path = "value_model_path", config.value_model_path
    if path:
        problem = value_vocabulary_problem(path, tokenizer, config.trust_remote_code)
        if problem:
            raise UserError(problem)
    elif config.reward_model_path:
        key, path = "reward_model_path", config.reward_model_path
        if not same_vocabulary(tokenizer, load_tokenizer(path, config.trust_remote_code)):
            # The reward model reads another vocabulary: it can judge text, but cannot read the policy's tokens.
            print(f"value model: '{path}' has another vocabulary than the policy; starting from the policy instead")
            key, path = "model_name_or_path", model_args.model_name_or_path
    else:
        key, path = "model_name_or_path", model_args.model_name_or_path
    model = load_sequence_classifier(path, model_args, config, tokenizer, key)
    if not hasattr(model, "score"):
        # token_values runs the backbone over the policy's tokens and reads every position through `score`: a
        # decoder's classifier (LlamaForSequenceClassification...) has one; an encoder's (BERT: `classifier` over a
        # pooled [CLS], attention to later tokens) cannot give per-token values of a response being written
        raise UserError(
            f"the value model from {key} '{path}' is a {type(model).__name__}, whose head is not a per-token "
            "`score` layer: PPO's value model must be a decoder (a causal LM, or its sequence classifier, e.g. a "
            f"reward model trained from the policy's SFT model) sharing the policy's vocabulary; "
            + (
                "give another value_model_path, or leave it unset to start from the reward model or the policy"
                if key == "value_model_path"
                else "set value_model_path to such a model"
            )
        )
    if model_args.use_peft:
        # LoRA on the critic too (same rank and target modules as the policy's); its new score head trains in full,
        # and so do the recipe's lora_modules_to_save it has (embed_tokens: the user's list was replaced by score;
        # a causal LM's lm_head it has not)
        from peft import get_peft_model

        from hfgen.finetune import lora_config

        names = [name for name, _ in model.named_modules()]
        asked = [m for m in model_args.lora_modules_to_save or [] if any(n == m or n.endswith(f".{m}") for n in names)]
        # lm_head among the targets is the policy's: the value model has none (its `score` head trains in full)
        targets = model_args.lora_target_modules
        dropped = {"target_modules": [t for t in targets if t != "lm_head"]} if isinstance(targets, list) else {}
        lora = lora_config(
            model_args, model, where=f"the value model (from {key} '{path}')", task_type="SEQ_CLS",
            modules_to_save=[*asked, "score"], **(dropped if dropped.get("target_modules") else {}),
        )  # fmt: skip
        model = get_peft_model(model, lora)
        disable_dropout(model)
    return model


def load_scorer(model_args, config, policy_tokenizer=None) -> RewardScorer:
    from hfgen.models import load_tokenizer

    reward_model = reward_tokenizer = None
    if config.reward_model_path:
        reward_tokenizer = load_tokenizer(config.reward_model_path, config.trust_remote_code)
        reward_model = load_sequence_classifier(
            config.reward_model_path, model_args, config, reward_tokenizer, "reward_model_path"
        )
        reward_model.eval().requires_grad_(False)
    functions = {function_name(spec): load_function(spec) for spec in config.reward_functions}
    count = int(reward_model is not None) + len(functions)
    weights = config.reward_weights or [1.0] * count
    chunk = config.local_rollout_forward_batch_size
    return RewardScorer(reward_model, reward_tokenizer, functions, list(weights), chunk, policy_tokenizer)


def load_oracle(config):
    return load_function(config.oracle_function) if config.oracle_function else None


def stop_token_ids(tokenizer, policy) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS and all EOS ids of the policy's generation config
    (chat models often have several, e.g. end of text and end of turn)."""
    configured = getattr(policy.generation_config, "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return list(dict.fromkeys([tokenizer.eos_token_id, *configured]))


# GenerationConfig keys that reshape the sampled distribution (or when a response may end), at their off values.
# Off must be explicit: transformers 5 fills every key left None from the model's own generation_config.json.
SAMPLING_OFF = dict(
    top_k=0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
    no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, min_new_tokens=0, num_beams=1, guidance_scale=1.0,
)  # fmt: skip
# ... and those pinned only when a model sets them: min-p and the suppressed-token lists, whose off value still runs
# a logits processor (min_p=0.0 a softmax over the vocabulary at every step), and min_length, which min_new_tokens
# overrides anyway (transformers warns at every generate when both are set: at each PPO rollout, six times an
# `hfgen eval`, for the models that set neither)
OFF_WHEN_SET_BY_MODEL = dict(min_p=0.0, suppress_tokens=[], begin_suppress_tokens=[], min_length=0)


def sampling_keys_models_set(models, named) -> dict:
    """The off values (`SAMPLING_OFF`, `OFF_WHEN_SET_BY_MODEL`) of the sampling keys that one of `models`' generation
    configs sets to something else and `named` (the keys the recipe decides) leaves out: what a generate that
    passes only the recipe's keys would otherwise take from the model's generation_config.json."""
    pins = {}
    for key, off in (SAMPLING_OFF | OFF_WHEN_SET_BY_MODEL).items():
        values = [getattr(m.generation_config, key, None) for m in models if m is not None]
        if key not in named and any(value is not None and value != off for value in values):
            pins[key] = off
    return pins


def make_generation_config(
    tokenizer, max_new_tokens: int, temperature: float, top_p: float, stop_ids: list[int], models=None
):
    """Sampling from exactly softmax(logits / temperature) (top-p aside): every other knob that could reshape the
    distribution is pinned to its off value, so a model's generation_config.json (top_k=50, min_p, repetition
    penalty...) cannot leak in. Off must be explicit: transformers 5 fills every None from the model's own
    generation config (`_prepare_generation_config`), so min_p=None would not switch min-p off. The pad token is
    suppressed (`hfgen.models.unsampled_ids`): the log-probs stay those of the whole softmax.

    `models` (those that will sample with this config; None: unknown): min-p and the suppressed-token lists have no
    "off" value that skips their logits processor (min_p=0.0 still runs a softmax over the vocabulary at every
    step), so they are pinned off only when one of these models' generation configs sets them, and left unset
    (no processor at all) otherwise."""
    from transformers import GenerationConfig

    from hfgen.models import unsampled_ids

    set_by_model = {
        key: models is None or any(getattr(m.generation_config, key, None) is not None for m in models if m is not None)
        for key in OFF_WHEN_SET_BY_MODEL
    }
    return GenerationConfig(
        **SAMPLING_OFF, do_sample=True, temperature=temperature, top_p=top_p,
        min_p=0.0 if set_by_model["min_p"] else None,
        # the pad token is never sampled (`unsampled_ids`); nothing else is suppressed
        suppress_tokens=unsampled_ids(tokenizer, stop_ids) or ([] if set_by_model["suppress_tokens"] else None),
        begin_suppress_tokens=[] if set_by_model["begin_suppress_tokens"] else None,
        min_length=0 if set_by_model["min_length"] else None,
        max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id, use_cache=True,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip


def prompt_room(policy, max_prompt_length: int, response_length: int) -> int:
    """The longest prompt PPO keeps: `max_prompt_length`, lowered (and said) so that prompt + response fit in the
    positions a model with learned position embeddings can read (`hfgen.models.position_limit`: GPT-2, OPT)."""
    from hfgen.models import answer_room

    room = answer_room(policy.config, "response_length", response_length)
    if room is None or max_prompt_length <= room:
        return max_prompt_length
    print(f"max_prompt_length {max_prompt_length} + response_length {response_length} is more than the "
          f"{room + response_length} positions {policy.config.model_type} models learn: prompts over {room} tokens "
          "are dropped")  # fmt: skip
    return room


MAX_LONG_PROMPTS = 0.5  # a larger share of prompts over max_prompt_length: the limit is wrong for the data


def drop_long_prompts(
    tokenizer, rows, max_prompt_length: int, records: dict, split: str, limit: str = "", remedy: str = ""
):
    """(`rows` less the prompts longer than max_prompt_length tokens, the kept prompts' token ids as `prompt_ids`
    gives them), the dropped ones counted in the data records (data.json, hfgen check); refused, as the README's
    bad-rows policy says, when none remain or more than half the prompts are dropped (the limit is wrong for the
    data). `limit`, `remedy`: the limit in words and what to change, for a limit that is not PPO's
    max_prompt_length key (GRPO's room before max_completion_length)."""
    from hfgen.data.prepare import drop_and_count

    if not len(rows):
        return rows, []
    ids = prompt_ids(tokenizer, rows["prompt"])
    keep = [len(query) <= max_prompt_length for query in ids]
    kept = drop_and_count(
        rows, keep, records, f"longer than {limit or f'max_prompt_length={max_prompt_length}'}", split
    )
    if len(kept) == 0 or len(kept) < (1 - MAX_LONG_PROMPTS) * len(rows):
        raise UserError(
            f"{len(rows) - len(kept)} of {len(rows)} {split} prompts are longer than "
            f"{limit or f'max_prompt_length={max_prompt_length} tokens'}; {remedy or 'raise max_prompt_length'} (or "
            "shorten the prompts)"
        )
    return kept, [query for query, kept_it in zip(ids, keep) if kept_it]


def prompt_ids(tokenizer, prompts: list) -> list[list[int]]:
    """The prompts' token ids as the policy reads them: chat messages get the chat template with the assistant turn
    opened."""
    from hfgen.generate import format_prompts
    from hfgen.models import bos_added_twice

    chat = not isinstance(prompts[0], str)
    if chat and tokenizer.chat_template is None:
        raise UserError("the prompts are chat messages but the tokenizer of the policy has no chat template")
    texts = format_prompts(tokenizer, prompts, chat)
    if not chat and (bos := bos_added_twice(tokenizer)):  # a prompt already rendered with the template holds it
        texts = [text.removeprefix(bos) for text in texts]
    return tokenizer(texts, add_special_tokens=not chat)["input_ids"]


def tokenize_prompts(tokenizer, prompts: list, max_prompt_length: int | None) -> tuple[list, list[list[int]]]:
    """(prompts, token ids) for the prompts within max_prompt_length (None: every prompt); chat messages get the chat
    template with the assistant turn opened (`prompt_ids`)."""
    ids = prompt_ids(tokenizer, prompts)
    kept = [i for i, query in enumerate(ids) if max_prompt_length is None or len(query) <= max_prompt_length]
    if not kept:
        raise UserError(f"every prompt is longer than max_prompt_length={max_prompt_length} tokens")
    if len(kept) < len(ids):
        print(f"dropped {len(ids) - len(kept)} of {len(ids)} prompts longer than {max_prompt_length} tokens")
    return [prompts[i] for i in kept], [ids[i] for i in kept]
