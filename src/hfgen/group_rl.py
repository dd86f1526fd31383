"""What the group-relative RL stages (`grpo`, `rloo`) share: thin wrappers over TRL's `GRPOTrainer` / `RLOOTrainer`.

The recipe keys are TRL's own (`GRPOConfig` / `RLOOConfig`: num_generations, max_completion_length, beta, epsilon,
epsilon_high, loss_type, scale_rewards, mask_truncated_completions, use_vllm, ...), TRL's `ModelConfig` (LoRA) and
hfgen's data and reward keys. hfgen adds what TRL leaves out:

- rewards named like PPO's: `reward_functions: [module:function]`, each called as function(prompt texts, response
  texts) (plus any dataset column the function names as a parameter, e.g. `answer`), and/or `reward_model_path`
  (a reward-stage output, read with its own tokenizer), weighted by `reward_weights` ([reward model, *functions]);
  `oracle_function` is logged and evaluated, never trained on;
- records: per reward component the share of groups whose rewards are all equal (no learning signal: a format
  reward stuck at 0 or 1 shows here), the time split generation / scoring / training and episodes/s, on top of
  TRL's reward means and stds, truncated share (`completions/clipped_ratio`), lengths, KL, clip ratios, entropy;
  a sample table every logging step (samples.jsonl); at the end the held-out comparison of the starting (SFT)
  model and the trained policy with the same random numbers (eval.json);
- exact resume: TRL regenerates the completions buffer after a resume (`_buffered_inputs` is None) and restarts its
  micro-step counter, so a checkpoint taken while a generation batch is only partly consumed
  (steps_per_generation > gradient_accumulation_steps, or num_iterations > 1) resumes on different completions;
  hfgen saves the buffer and the counter with each checkpoint and restores them;
- plain-string prompts given to a model with a chat template are sent as one user turn, the way SFT on
  conversational data trained it (`chat_prompts: auto`; raw to a model whose run prompted it raw), or refused.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hfgen import guard, loop, tracking
from hfgen.data.formats import tools_problems
from hfgen.data.prepare import (
    TextDataArguments,
    check_text_data,
    checking_template,
    data_seed,
    data_source,
    load_for_stage,
    record,
)
from hfgen.data.rendering import without_doubled_bos
from hfgen.errors import UserError
from hfgen.finetune import build_trainer, check_model_config, load_model, lora_config, run_first_hint, upcast_like
from hfgen.generate import made_by_run, prompts_are_chat, rendered_with_template, template_marks, trained_on_chat
from hfgen.models import answer_room, check_model_source, not_a_reward_model, position_limit, read_config
from hfgen.rl.monitor import HackingMonitorArguments, build_monitor, monitor_problems, reward_component_names
from hfgen.rl.records import start_samples

BUFFER_FILE = "hfgen_generation_buffer.pt"  # TRL's completion buffer and micro-step counter, per process
TRAINER_ARGUMENTS = ("trainer_state", "log_extra", "log_metric", "environments")  # what TRL adds to the columns


# Length keys of other GRPO/RLOO trainers (TRL before 0.2x, OpenRLHF) with no counterpart in TRL 1.16's: a spelling
# hint sent `max_prompt_length` to max_completion_length, which caps the answers instead (`recipe.build_recipe`)
KEYS_WITHOUT_COUNTERPART = {
    "max_prompt_length": "TRL's GRPO and RLOO cut no prompt (its trainers have no prompt limit; hfgen drops only "
    "the prompts that leave no room for max_completion_length in a model's learned positions): shorten or drop long "
    "prompts in the data; max_completion_length caps the answers",
    "max_length": "TRL's GRPO and RLOO cap the answers alone (max_completion_length) and cut no prompt",
    "max_seq_length": "TRL's GRPO and RLOO cap the answers alone (max_completion_length) and cut no prompt",
    "kl_target": "TRL's GRPO and RLOO weigh the KL by a fixed beta (no adaptive KL controller; ppo has one)",
}


def chat_prompts_field():
    """The `chat_prompts` key of the online RL stages (grpo, rloo, ppo)."""
    return field(
        default="auto",
        metadata={
            "help": "Plain-string prompts: 'auto' sends them as one user turn when the tokenizer has a chat template "
            "(as SFT on conversations trained; raw to a model whose hfgen run prompted it raw: its eval.json's "
            "trained_on_chat), 'never' keeps them raw, 'refuse' stops the recipe."
        },
    )


def disable_dropout_field():
    """hfgen's default of TRL's `disable_dropout` key in grpo/rloo: on (TRL's is off), as PPO turns dropout off: with
    dropout the log-probs of the same tokens differ between generation, the old-policy and reference passes and the
    update, so the ratio and KL start away from 1 and 0 (KL 0.004 at step 1 on GPT-2)."""
    return field(
        default=True,
        metadata={"help": "Turn dropout off in the policy and reference (hfgen's default: true, as in PPO)."},
    )


@dataclass
class GroupRLArguments(TextDataArguments, HackingMonitorArguments):
    """Data, rewards and evaluation of a grpo/rloo run (TRL's config holds `reward_weights`)."""

    reward_functions: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Rule rewards 'module:function' called as f(prompts, responses, [dataset columns it names]) -> floats."
        },
    )
    reward_model_path: str | None = field(
        default=None, metadata={"help": "Reward model dir (one-label sequence classifier, e.g. a reward run)."}
    )
    oracle_function: str | None = field(
        default=None, metadata={"help": "A judge 'module:function' logged and evaluated, never trained on."}
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Column of prompts: strings or chat messages."})
    chat_prompts: str = chat_prompts_field()
    eval_samples_per_prompt: int = field(
        default=4, metadata={"help": "Responses per held-out prompt in the final starting-vs-trained evaluation."}
    )
    eval_generation_batch_size: int = field(
        default=64, metadata={"help": "Sequences per generation chunk in that evaluation."}
    )
    freeze_modules: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Submodules of the policy kept fixed (e.g. model.embed_tokens, lm_head: tied ones together)."
        },
    )


def check(model_args, data_args: GroupRLArguments, config) -> list[str]:
    """Problems found before anything heavy loads: models, rewards, data, prompts vs chat template."""
    from hfgen.rl.rollout import load_function, same_name_problems, unmet_arguments

    trainer = "RLOOTrainer" if type(config).__name__.startswith("RLOO") else "GRPOTrainer"
    problems = check_model_config(model_args, config.trust_remote_code, trl_trainer=trainer)
    if data_args.reward_model_path:
        path = data_args.reward_model_path
        problems += check_model_source(
            "reward_model_path", path, hint=run_first_hint(path), trust_remote_code=config.trust_remote_code
        ) or not_a_reward_model(path, "reward_model_path")
    if not data_args.reward_model_path and not data_args.reward_functions:
        problems.append("no reward: set reward_functions and/or reward_model_path")
    problems += same_name_problems(data_args.reward_functions)
    components = reward_component_names(data_args)
    if config.reward_weights is not None and len(config.reward_weights) != len(components):
        problems.append(
            f"reward_weights has {len(config.reward_weights)} values for {len(components)} reward(s) {components}"
        )
    for spec in [*data_args.reward_functions, *([data_args.oracle_function] if data_args.oracle_function else [])]:
        try:
            load_function(spec)
        except ValueError as error:
            problems.append(f"reward function {error}")
    problems += trainer_key_problems(config)
    problems += generation_kwargs_problems(config, data_args)
    problems += chat_prompts_problems(data_args)
    if data_args.eval_samples_per_prompt < 0 or data_args.eval_generation_batch_size < 1:
        problems.append("eval_samples_per_prompt must be >= 0 and eval_generation_batch_size >= 1")
    problems += monitor_problems(data_args)
    splits, dataset_problems = check_text_data(
        data_args, "prompt", prompt_columns(data_args), other_columns=True, seed=data_seed(config),
        template=checking_template(model_args.model_name_or_path, config.trust_remote_code),
    )  # fmt: skip
    problems += dataset_problems
    if splits:  # TRL's trainers render the prompts without function definitions
        problems += tools_problems(
            splits[0], type(config).__name__.removesuffix("Config").lower(), data_source(data_args)
        )
    if splits:  # the rewards are called with the data's other columns by name
        columns = [c for c in splits[0].column_names if c != "prompt"]
        read = {}  # column -> the reward functions that read it
        for spec in [*data_args.reward_functions, *([data_args.oracle_function] if data_args.oracle_function else [])]:
            try:
                function = load_function(spec)
                unmet = unmet_arguments(function, columns)
            except ValueError:
                continue  # reported above
            if unmet:
                problems.append(
                    f"reward function '{spec}' needs argument(s) {unmet} after (prompts, responses), passed from the "
                    f"data's columns of those names; the data has {columns or 'none besides the prompt'}"
                )
            for column in set(unmet_arguments(function)) & set(columns):
                read.setdefault(column, []).append(spec)
        if read and not problems:
            problems += reward_column_problems(data_args, read)
    if not dataset_problems and not problems:
        problems += prompt_template_problems(model_args, data_args, config, splits[0])
    if not dataset_problems and not problems:
        problems += prompt_length_problems(model_args, data_args, config, splits)
    return problems


def prompt_room(model_config, config) -> int | None:
    """The longest prompt the policy can answer max_completion_length tokens after within the positions of a model
    with learned position embeddings (`position_limit`: GPT-2, OPT); None for a model without that limit. TRL's
    GRPO and RLOO have no prompt limit, and a prompt + completion past those positions fails in the position lookup
    at the first generation (a raw IndexError). A max_completion_length that leaves no room is refused."""
    if not config.max_completion_length:
        return None
    return answer_room(model_config, "max_completion_length", config.max_completion_length)


def drop_unanswerable_prompts(tokenizer, rows, room: int | None, model_config, config, records: dict, split: str):
    """`rows` (prompts as the policy reads them, `prepare_prompts`) less those longer than `room` tokens
    (`prompt_room`), counted in `records`, as PPO drops its prompts over max_prompt_length; refused when none or
    fewer than half remain (`rl.models.drop_long_prompts`)."""
    from hfgen.rl.models import drop_long_prompts

    if room is None:
        return rows
    limit = (
        f"{room} tokens, the room max_completion_length={config.max_completion_length} leaves in the "
        f"{position_limit(model_config)} positions {model_config.model_type} models learn"
    )
    remedy = "lower max_completion_length"
    return drop_long_prompts(tokenizer, rows, room, records, split, limit, remedy)[0]


def prompt_length_problems(model_args, data_args, config, splits, records: dict | None = None) -> list[str]:
    """Prompts that leave no room for max_completion_length in a model's learned positions (`prompt_room`), as the
    run drops and refuses them, found before any model loads: on a sample of each split, or with `records` on every
    row, the drops counted there (hfgen check's data report)."""
    from hfgen.data.loading import ROWS_CHECKED
    from hfgen.models import load_tokenizer

    model_config = read_config(model_args.model_name_or_path, config.trust_remote_code)
    if model_config is None:
        return []
    try:
        room = prompt_room(model_config, config)
        if room is None:
            return []
        tokenizer = load_tokenizer(model_args.model_name_or_path, config.trust_remote_code)
        for rows, split in zip(splits[:2], ("train", "eval")):
            rows = rows if records is not None else rows.select(range(min(ROWS_CHECKED, len(rows))))
            prompts = prepare_prompts(rows, data_args, tokenizer, model_path=model_args.model_name_or_path)
            drop_unanswerable_prompts(tokenizer, prompts, room, model_config, config,
                                      {} if records is None else records, split)  # fmt: skip
    except UserError as error:
        return [str(error)]
    return []


def reward_column_problems(data_args, read: dict[str, list[str]]) -> list[str]:
    """Rows without a value (null: a JSON row missing the key) in a column a reward function reads, named by file,
    split, row (counted from 1, as in the file) and column, as the README's bad-rows policy names them: the reward
    function would raise on them mid-run, or score them against None."""
    from hfgen.data.formats import _blank_rows, parse_columns
    from hfgen.data.loading import load_raw

    top = data_args.dataset_columns or {}
    sources = [(e.name, e.config or data_args.dataset_config, parse_columns(e.columns) if e.columns is not None else top)
               for e in data_args.mixture]  # fmt: skip
    problems = []
    for name, config, mapping in sources or [(data_args.dataset_name, data_args.dataset_config, top)]:
        for split_name, split in load_raw(name, config).items():
            blank = _blank_rows(split.flatten_indices())  # empty lines: dropped as rows, not broken
            for column in sorted(c for c in read if mapping.get(c, c) in split.column_names):
                values = split[mapping.get(column, column)]
                rows = [i + 1 for i, (v, b) in enumerate(zip(values, blank)) if v is None and not b]
                if rows:
                    problems.append(
                        f"dataset '{name}' (split '{split_name}'): {len(rows)} row(s) lack a value in column '{column}',"
                        f" which reward function(s) {', '.join(read[column])} read (rows {rows[:5]}"
                        f"{'...' if len(rows) > 5 else ''}, counted from 1); fix or remove them"
                    )
    return problems


# TRL's GRPO checks these only when it uses them (after the first generation): a typo was a traceback then
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")
CHOICE_KEYS = {  # GRPO keys whose values TRL checks only at the first loss (after the models load and generate)
    "importance_sampling_level": ("token", "sequence"),
    "multi_objective_aggregation": ("sum_then_normalize", "normalize_then_sum"),
    "vllm_importance_sampling_mode": ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
}


# generation_kwargs keys (transformers' GenerationConfig) that the held-out comparison samples with as TRL's generate
# trains with them (`sampling_config`): each shapes a next token's distribution or when a response ends, one token at
# a time. Any other (num_beams > 1, do_sample: false, eos_token_id, guidance_scale, ...) changes what generate
# returns or needs what hfgen's sampling does not give it: refused while that comparison runs.
GENERATION_SAMPLING_KWARGS = (
    "top_p", "top_k", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
    "no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "suppress_tokens", "begin_suppress_tokens",
    "min_new_tokens", "min_length", "max_new_tokens", "exponential_decay_length_penalty", "remove_invalid_values",
    "renormalize_logits",
)  # fmt: skip
# ... and those that change how generate runs or what it returns besides the tokens, not what it samples: training's,
# left out of the comparison
GENERATION_ENGINE_KWARGS = (
    "use_cache", "cache_implementation", "cache_config", "compile_config", "disable_compile", "max_cache_len",
    "prefill_chunk_size", "output_scores", "output_logits", "output_attentions", "output_hidden_states",
    "return_dict_in_generate",
)  # fmt: skip
# ... and values that are what TRL's sampling does anyway (one sampled sequence per prompt): no-ops, left out too
GENERATION_NO_OP_VALUES = {"do_sample": True, "num_beams": 1, "num_return_sequences": 1}


def comparison_kwargs(config) -> dict:
    """The `generation_kwargs` the held-out comparison samples with: none under use_vllm (they are vLLM's
    SamplingParams there, not transformers' keys), else all but the engine keys and the no-op values."""
    if getattr(config, "use_vllm", False):
        return {}
    return {
        k: v for k, v in (config.generation_kwargs or {}).items()
        if k not in GENERATION_ENGINE_KWARGS and not (k in GENERATION_NO_OP_VALUES and GENERATION_NO_OP_VALUES[k] == v)
    }  # fmt: skip


def generation_kwargs_problems(config, data_args) -> list[str]:
    """`generation_kwargs` keys the held-out comparison could not sample with as training does (its figures would be
    measured under another sampling rule than the one trained); under use_vllm they are vLLM's SamplingParams, which
    the comparison leaves out (README says so) rather than refusing the run."""
    kwargs = comparison_kwargs(config)
    if "stop_strings" in kwargs:  # transformers' generate wants the tokenizer for them, which TRL does not pass it
        return [
            "generation_kwargs: stop_strings stops TRL's first generation (transformers' generate needs the tokenizer "
            "for them, which TRL does not pass); leave it out, or with use_vllm: true give vLLM's `stop`"
        ]
    if not data_args.eval_samples_per_prompt:
        return []
    problems = []
    for key in kwargs:
        if key == "temperature":
            problems.append(
                "generation_kwargs: temperature samples at another temperature than the one TRL scores "
                "log-probabilities at (the recipe's `temperature`): set `temperature` instead"
            )
        elif key not in GENERATION_SAMPLING_KWARGS:
            problems.append(
                f"generation_kwargs: '{key}' ({kwargs[key]!r}) is not one hfgen's held-out comparison (eval.json) can "
                f"sample with as training does; it takes {', '.join(GENERATION_SAMPLING_KWARGS)} (cache or compile "
                f"settings, which change no sample, and {', '.join(f'{k}: {v}' for k, v in GENERATION_NO_OP_VALUES.items())}"
                ", which TRL samples with anyway): leave it out, or set eval_samples_per_prompt: 0 to skip the comparison"
            )
    return problems


def trainer_key_problems(config) -> list[str]:
    """TRL keys that its trainers would refuse only mid-run or after the models load: GRPO's loss_type,
    scale_rewards and `CHOICE_KEYS`, eval_strategy (no eval_dataset is passed), use_vllm without vLLM installed."""
    import importlib.util

    problems = []
    if type(config).__name__.startswith("GRPO") and config.loss_type not in GRPO_LOSS_TYPES:
        problems.append(f"loss_type must be one of {', '.join(GRPO_LOSS_TYPES)}, got '{config.loss_type}'")
    if config.eval_strategy != "no":  # TRL wants an eval_dataset then, refused once the models have loaded
        problems.append(
            f"eval_strategy '{config.eval_strategy.value}': grpo and rloo evaluate on the held-out prompts once, after "
            "training (eval.json: the comparison with the starting model), not during it; set eval_strategy: no"
        )
    for key, choices in CHOICE_KEYS.items():
        value = getattr(config, key, None)
        if value is not None and value not in choices:
            problems.append(f"{key} must be one of {', '.join(choices)}, got '{value}'")
    scale = getattr(config, "scale_rewards", "group")
    if not isinstance(scale, bool) and str(scale) not in SCALE_REWARDS:
        problems.append(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got '{scale}'")
    if getattr(config, "use_vllm", False) and importlib.util.find_spec("vllm") is None:
        problems.append("use_vllm: true needs vLLM, which is not installed (pip install vllm, on a CUDA machine)")
    return problems


def chat_prompts_problems(data_args) -> list[str]:
    if data_args.chat_prompts not in ("auto", "never", "refuse"):
        return [f"chat_prompts must be auto, never or refuse, got '{data_args.chat_prompts}'"]
    return []


def prompt_columns(data_args: GroupRLArguments) -> dict[str, str]:
    """The layout's `prompt` is the recipe's `prompt_column` (unless `dataset_columns` maps it)."""
    return {"prompt": data_args.prompt_column}


def prompt_template_problems(model_args, data_args, config, train_rows) -> list[str]:
    """Chat-message prompts need a chat template; plain strings to a chat model are refused when asked to. Prompts
    sent in the chat template warn when generation would not stop at the template's turn end
    (`unstopped_turn_end`)."""
    from hfgen.models import load_tokenizer

    first = train_rows[0]["prompt"]
    source = data_source(data_args)
    model = model_args.model_name_or_path
    tokenizer = load_tokenizer(model, config.trust_remote_code)
    has_template = tokenizer.chat_template is not None
    if has_template and reaches_the_policy_templated(first, data_args, tokenizer, model):
        if end := unstopped_turn_end(tokenizer, model):
            print(
                f"warning: the chat template of '{model}' ends assistant turns with '{end}', which is not a token "
                f"generation stops at (the EOS '{tokenizer.eos_token}' and the generation_config's eos_token_id): "
                f"a response that closes its turn runs on past it (the next turn, scored by the rewards) and counts "
                f"as unfinished; add the id of '{end}' to the eos_token_id of the model's generation_config.json (as "
                "an SFT run with eos_token saves it), or start from a model trained to end its answers with EOS"
            )
    if not isinstance(first, str) and not has_template:
        return [
            f"the prompts of {source} hold chat messages, but the tokenizer of '{model}' has no chat template to "
            "render them: use a chat model (or one whose tokenizer has a chat_template), or give plain-string prompts"
        ]
    if isinstance(first, str) and has_template and data_args.chat_prompts == "refuse":
        return [
            f"the prompts of {source} are plain strings, but "
            f"'{model_args.model_name_or_path}' has a chat template (a chat model would see untemplated text): set "
            "chat_prompts: auto to send each as one user turn, or never to keep them raw"
        ]
    return []


def reaches_the_policy_templated(prompt, data_args, tokenizer, model: str) -> bool:
    """Whether a prompt reaches the policy in the chat template, as `templated_prompts` sends it: chat messages; a
    string already rendered with it (under any chat_prompts); a plain string under chat_prompts auto, unless the
    model's hfgen run prompted it raw (trained_on_chat false)."""
    if not isinstance(prompt, str):
        return True
    if rendered_with_template(prompt, template_marks(tokenizer)):
        return True
    return data_args.chat_prompts == "auto" and trained_on_chat(model) is not False


def unstopped_turn_end(tokenizer, model: str) -> str | None:
    """The special token the chat template ends an assistant turn with (`check.turn_end_token`) when it is none of
    the ids generation stops at (`rl.models.stop_token_ids`: the EOS and the generation config's): Qwen2.5 base's
    template ends turns with <|im_end|>, its EOS is <|endoftext|>. None otherwise."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from hfgen.check import turn_end_token
    from hfgen.models import base_model_of
    from hfgen.rl.models import stop_token_ids

    end = turn_end_token(tokenizer)
    if end is None:
        return None
    generation = None
    for path in dict.fromkeys([model, base_model_of(model)]):  # an adapter dir's own, else its base's
        try:
            generation = GenerationConfig.from_pretrained(path)
            break
        except (OSError, ValueError):  # none saved
            continue
    stops = stop_token_ids(tokenizer, SimpleNamespace(generation_config=generation))
    return None if tokenizer.convert_tokens_to_ids(end) in stops else end


# ---- prompts and rewards ------------------------------------------------------------------------------------


def prepare_prompts(dataset, data_args, tokenizer, records: dict | None = None, model_path: str | None = None):
    """The prompts as the policy is to read them (`templated_prompts`); those that stay strings, tokenized with the
    special tokens (TRL's GRPO and RLOO, hfgen's PPO), lose a leading BOS the tokenizer adds again
    (`without_doubled_bos`: a prompt rendered with a Llama 3 template, under chat_prompts: never), said and noted
    in `records` when given."""
    dataset = templated_prompts(dataset, data_args, tokenizer, records, model_path)
    dataset, note = without_doubled_bos(dataset, tokenizer, ("prompt",))
    if note and records is not None:  # (said once: for the training rows)
        print(f"note: {note}")
        records.setdefault("notes", []).append(note)
    return dataset


def templated_prompts(dataset, data_args, tokenizer, records: dict | None = None, model_path: str | None = None):
    """Plain-string prompts become one user turn for a chat model (`chat_prompts: auto`), since TRL would otherwise
    send them untemplated; not for a model whose hfgen run prompted it raw (`model_path`'s run records
    trained_on_chat false: SFT on plain text, or pretraining), which is prompted as it was trained. A string
    already rendered with the chat template (`template_marks`) is not wrapped in it again: one that renders a single
    user turn is read back as that turn (the policy reads the same tokens, reward functions the question), any
    other is kept as it is; said, and noted in `records` when given."""
    if not (isinstance(dataset[0]["prompt"], str) and tokenizer.chat_template is not None):
        return dataset
    if data_args.chat_prompts != "auto":
        return dataset
    chat = trained_on_chat(model_path) if model_path is not None else None
    if chat is False:
        note = (
            f"chat_prompts: auto: the run that made {model_path} prompted it raw (its eval.json: trained_on_chat "
            "false), so the string prompts stay raw"
        )
        if records is not None:  # (said once: for the training rows)
            print(f"note: {note}")
            records.setdefault("notes", []).append(note)
        return dataset
    if chat is None and model_path is not None and made_by_run(model_path) is not None and records is not None:
        note = (  # (an older hfgen's run on prompt/completion rows: neither its eval.json nor its data.json tells)
            f"chat_prompts: auto: the run that made {model_path} does not record whether it prompted its model in "
            "the chat template, so the string prompts are sent in it; chat_prompts: never keeps them raw"
        )
        print(f"note: {note}")
        records.setdefault("notes", []).append(note)
    opening, closing, tokens = template_marks(tokenizer)

    def turns(prompt: str) -> list[dict] | str:
        if not rendered_with_template(prompt, (opening, closing, tokens)):
            return [{"role": "user", "content": prompt}]  # a plain string
        if prompt.startswith(opening) and prompt.endswith(closing) and len(prompt) > len(opening + closing):
            content = prompt[len(opening) : len(prompt) - len(closing)]
            turn = [{"role": "user", "content": content}]
            one_turn = not any(token in content for token in tokens)  # not a whole conversation between the two
            if one_turn and tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True) == prompt:
                return turn
        return prompt  # rendered, but not one user turn: kept as it is

    prepared = [turns(prompt) for prompt in dataset["prompt"]]
    rendered = [
        i for i, (old, new) in enumerate(zip(dataset["prompt"], prepared)) if new != [{"role": "user", "content": old}]
    ]
    if not rendered:
        return dataset.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    kept = [i for i in rendered if isinstance(prepared[i], str)]
    if kept and len(kept) < len(dataset):  # one column holds either strings or conversations
        other = next(i for i in range(len(dataset)) if not isinstance(prepared[i], str))
        raise UserError(
            f"chat_prompts: auto: the prompts of {data_source(data_args)} mix strings already rendered with the "
            f"model's chat template as more than one user turn (row {kept[0]}) and questions that become one user "
            f"turn (row {other}): render all of them (and set chat_prompts: never) or none"
        )
    note = (
        f"chat_prompts: auto: {len(rendered)} of {len(dataset)} string prompts (row {rendered[0]} first) are already "
        "rendered with the model's chat template: not wrapped in it again, "
        + ("kept as they are" if kept else "read back as the user turn they render (the same tokens)")
    )
    print(f"note: {note}")
    if records is not None:
        records.setdefault("notes", []).append(note)
    return dataset.map(lambda row, index: {"prompt": prepared[index]}, with_indices=True)


def completion_text(completion) -> str:
    """A TRL completion as text: the string, or the assistant message's content."""
    return completion if isinstance(completion, str) else "".join(m["content"] for m in completion)


def call_reward_function(function, prompts: list, responses: list[str], columns: dict) -> list[float]:
    """function(prompts, response texts, **the dataset columns it names) as floats (a `recipe_function`)."""
    from hfgen.rl.rollout import reward_values

    parameters = inspect.signature(function).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    extra = {key: value for key, value in columns.items() if takes_all or key in parameters}
    # the prompts as they are: a recipe function (`recipe_function`) reads them in its convention
    return reward_values(function, function(list(prompts), responses, **extra), len(responses))


def trl_reward_function(spec: str):
    """A `module:function(prompts, responses)` reward in TRL's calling convention, named after the function (TRL
    logs it as rewards/NAME/mean and /std)."""
    from hfgen.rl.rollout import function_name, load_function

    function = load_function(spec)

    def reward(prompts, completions, **columns):
        columns = {key: value for key, value in columns.items() if key not in TRAINER_ARGUMENTS}
        return call_reward_function(function, prompts, [completion_text(c) for c in completions], columns)

    reward.__name__ = function_name(spec)
    return reward


def reward_model_function(reward_model, reward_tokenizer, stop_ids: list[int], chunk_size: int):
    """The reward model as a TRL reward function, scoring as PPO and eval.json score (rollout's RewardScorer, text
    path): TRL itself renders every completion as a closed assistant turn, so a completion cut off at
    max_completion_length (no stop id at its end) passed for a finished answer in training while eval.json showed
    it unfinished. `finished` here: the completion's ids (TRL passes them, cut after the first stop id) end with one
    of `stop_ids`, the ids TRL stops at. Named as TRL names a reward model (its dir), so the logs keep their keys;
    `.scorer` is the scorer, for the held-out comparison."""
    import torch

    from hfgen.rl.rollout import RewardScorer

    scorer = RewardScorer(reward_model, reward_tokenizer, {}, [1.0], chunk_size)
    stops = set(stop_ids)

    def reward(prompts, completions, completion_ids, **_):
        finished = [bool(ids) and ids[-1] in stops for ids in completion_ids]
        responses = [completion_text(c) for c in completions]
        device = next(scorer.reward_model.parameters()).device
        # no_grad, not inference_mode: FSDP2 keeps the unsharded weights it makes here, and inference tensors could
        # not be updated in place by the held-out comparison's passes, outside inference mode
        with torch.no_grad():
            return scorer(prompts, responses, finished, device)[0].tolist()

    reward.__name__ = str(reward_model.config.name_or_path).rstrip("/").split("/")[-1]
    reward.scorer = scorer
    return reward


def weighted_totals(rewards_per_func, weights):
    """(N,) each completion's reward as TRL 1.16 sums its (N, K) components: the weighted sum of those that scored
    it (a function's None is NaN, skipped); NaN where none did. TRL leaves such an unscorable completion out of its
    group's baseline and its logged `reward`, and gives it advantage 0 (a 0 in the sum would bias the baseline and
    hand it an advantage)."""
    import torch

    rewards = torch.as_tensor(rewards_per_func, dtype=torch.float32)
    totals = (rewards * torch.as_tensor(weights, dtype=torch.float32, device=rewards.device)).nansum(1)
    return totals.masked_fill(rewards.isnan().all(1), math.nan)


def silent_groups(rewards, num_generations: int, tolerance: float = 0.0):
    """(G,) bools: which groups (consecutive runs of `num_generations` completions of one prompt) have scored
    rewards all equal, within `tolerance` (NaN: unscored, out of the group's baseline as in TRL; a group with fewer
    than two scored is one of them): their group-relative advantages are zero, so they teach nothing."""
    import torch

    groups = torch.as_tensor(rewards, dtype=torch.float32).view(-1, num_generations)
    unscored = groups.isnan()
    lowest, highest = groups.masked_fill(unscored, math.inf).amin(1), groups.masked_fill(unscored, -math.inf).amax(1)
    return highest - lowest <= tolerance  # (-inf when none is scored)


def no_signal_share(rewards, num_generations: int) -> float:
    """Share of the groups that teach nothing (`silent_groups`)."""
    return silent_groups(rewards, num_generations).float().mean().item()


def silent_groups_by_aggregation(rewards_per_func, weights, num_generations: int, aggregation: str | None,
                                 tolerance: float = 0.0):  # fmt: skip
    """(G,) bools: the groups that teach nothing, by TRL's `multi_objective_aggregation`. The default sums the
    weighted components, then normalises within the group: no signal when the totals are equal. normalize_then_sum
    normalises each component within the group before the weighted sum: components that cancel in the total still
    teach, so no signal only when every component weighted other than 0 is constant in the group (a component
    weighted 0, a metric logged as a reward, adds 0 whatever it varies)."""
    import torch

    if aggregation != "normalize_then_sum":
        return silent_groups(weighted_totals(rewards_per_func, weights), num_generations, tolerance)
    rewards = torch.as_tensor(rewards_per_func, dtype=torch.float32)
    columns = [column for column, weight in zip(rewards.unbind(1), weights) if float(weight) != 0]
    if not columns:
        return torch.ones(rewards.shape[0] // num_generations, dtype=torch.bool)
    return torch.stack([silent_groups(column, num_generations, tolerance) for column in columns]).all(0)


def groups_no_signal_share(rewards_per_func, weights, num_generations: int, aggregation: str | None) -> float:
    """`groups/no_signal_share`: the share of groups that teach nothing (`silent_groups_by_aggregation`)."""
    return silent_groups_by_aggregation(rewards_per_func, weights, num_generations, aggregation).float().mean().item()


# ---- the trainer: TRL's, plus records and exact resume ------------------------------------------------------


class WithPositions:
    """`model` called with `position_ids` counted from the attention mask (`position_ids_from`, as generate and PPO
    number a left-padded row), whatever wraps it (PEFT, DeepSpeed, FSDP, DDP): only the call's arguments change."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **inputs):
        from hfgen.rl.rollout import position_ids_from

        return self.model(**inputs, position_ids=position_ids_from(inputs["attention_mask"]))


def recorded(trainer_class):
    """`trainer_class` (GRPOTrainer or RLOOTrainer) plus hfgen's records and exact resume."""

    class Recorded(trainer_class):
        def __init__(self, *args, oracle=None, reference=None, **kwargs):
            with reference_given(trainer_class, reference):
                super().__init__(*args, **kwargs)
            self.oracle = oracle
            self._timers = {"generation": 0.0, "scoring": 0.0, "step": 0.0}
            self._episodes = 0
            self._samples: list[dict] = []

        def _generate(self, prompts):
            start = time.perf_counter()
            try:
                return super()._generate(prompts)
            finally:
                self._timers["generation"] += time.perf_counter() - start

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            import torch

            start = time.perf_counter()
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            mode = "train" if self.model.training else "eval"
            share = groups_no_signal_share(
                rewards_per_func, self.reward_weights, self.num_generations,
                getattr(self, "multi_objective_aggregation", None),  # (GRPO's; RLOO sums)
            )  # fmt: skip
            self._metrics[mode]["groups/no_signal_share"].append(share)
            for column, name in enumerate(self.reward_func_names):
                share = no_signal_share(rewards_per_func[:, column], self.num_generations)
                self._metrics[mode][f"rewards/{name}/no_signal_share"].append(share)
            responses = [completion_text(c) for c in completions]
            if self.oracle is not None:
                from accelerate.utils import gather

                # the batch's dataset columns by name, as TRL passes them to the reward functions
                keys = [key for key in inputs[0] if key not in ("prompt", "completion", "completion_ids")]
                columns = {key: [row[key] for row in inputs] for key in keys}
                scores = call_reward_function(self.oracle, prompts, responses, columns)
                batch = gather(torch.tensor(scores, device=rewards_per_func.device))
                # the mean over the responses the oracle scored (None is "not scored", NaN here); NaN when none
                # is, which TRL's log leaves out (null when no batch it averages was scored)
                self._metrics[mode]["oracle/mean"].append(batch.nanmean().item())
            if mode == "train" and self.accelerator.is_main_process:
                self._samples = [
                    {"prompt": completion_text(p) if not isinstance(p, str) else p, "response": r,
                     **dict(zip(self.reward_func_names, tracking.finite_or_null(rewards_per_func[i].tolist())))}
                    for i, (p, r) in enumerate(zip(prompts[:4], responses[:4]))
                ]  # fmt: skip
            self._timers["scoring"] += time.perf_counter() - start
            return rewards_per_func

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, *args, **kwargs):
            # TRL scores the left-padded batch without position_ids, so a model with learned absolute positions that
            # ignores the mask there (GPT-2, OPT) reads each row shifted by its padding: log-probs unlike those it
            # sampled with. generate (and PPO's passes) number each row from its first real token; so do these.
            if kwargs.get("pixel_values") is None:  # a vision model computes its own (multimodal) positions
                model = WithPositions(model)
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, *args, **kwargs)

        def training_step(self, model, inputs, num_items_in_batch):
            start = time.perf_counter()
            output = super().training_step(model, inputs, num_items_in_batch)
            self._timers["step"] += time.perf_counter() - start
            # completions generated per micro-step: each is trained on num_iterations times
            self._episodes += self.args.per_device_train_batch_size / self.num_iterations
            return output

        def log(self, logs, start_time=None):
            if self.model.training and "loss" in logs:  # a training log: add the time split since the last one
                generation, scoring, step = (self._timers[k] for k in ("generation", "scoring", "step"))
                if step > 0:
                    logs["time/generation_share"] = generation / step
                    logs["time/scoring_share"] = scoring / step
                    logs["time/training_share"] = max(step - generation - scoring, 0.0) / step
                    logs["speed/episodes_per_s"] = self._episodes / step * self.accelerator.num_processes
                self._timers = dict.fromkeys(self._timers, 0.0)
                self._episodes = 0
                if self._samples and self.accelerator.is_main_process:
                    rows = [{"step": self.state.global_step, **row} for row in self._samples]
                    path = Path(self.args.output_dir) / "samples.jsonl"
                    with path.open("a", encoding="utf-8") as handle:
                        for row in rows:
                            handle.write(tracking.json_line(row))
            super().log(logs, start_time)

        # Exact resume across epochs: the sampler the training loop uses is kept, to be advanced past the epochs
        # the checkpoint trained (`skip_epoch_orders`) once the Trainer knows them.
        def _get_train_sampler(self, dataset=None):
            self._train_sampler = sampler = super()._get_train_sampler(dataset)
            if getattr(sampler, "generator", None) is not None and sampler.seed != data_seed(self.args):
                # TRL seeds its RepeatSampler with `seed`: data_seed (transformers' seed of the data samplers, and
                # of hfgen's draws) was never read, so a seed sweep with data_seed fixed drew other prompt orders.
                # (The same on every process: each keeps its share of the same groups.)
                sampler.seed = data_seed(self.args)
                sampler.generator.manual_seed(sampler.seed)
            return self._train_sampler

        def _init_training_state(self, *args, **kwargs):
            epochs_trained, steps_trained_in_current_epoch = super()._init_training_state(*args, **kwargs)
            skip_epoch_orders(getattr(self, "_train_sampler", None), epochs_trained)
            return epochs_trained, steps_trained_in_current_epoch

        # Exact resume: the completion buffer and micro-step counter travel with the checkpoint, and so does the
        # sample table of the buffered batch, which every logging step until the next generation writes again (a
        # resume inside a generation batch wrote no table until then: gaps in samples.jsonl).
        def _save_checkpoint(self, model, trial):
            import torch
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            super()._save_checkpoint(model, trial)
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            rank = self.accelerator.process_index
            state = {"step": self._step, "buffer": self._buffered_inputs, "samples": self._samples}
            torch.save(state, folder / f"{rank}-{BUFFER_FILE}")

        def _load_optimizer_and_scheduler(self, checkpoint):
            import torch
            from accelerate.utils import send_to_device

            super()._load_optimizer_and_scheduler(checkpoint)
            path = Path(checkpoint or "") / f"{self.accelerator.process_index}-{BUFFER_FILE}"
            if checkpoint is not None and path.is_file():
                # weights_only: a checkpoint given to resume from (another's) must not run code. Loaded on the CPU,
                # then moved: under CPU DDP the device is `cpu:0`, an indexed CPU location torch's
                # deserializer refuses ("don't know how to restore data location ... cpu:0").
                state = torch.load(path, map_location="cpu", weights_only=True)
                self._step = state["step"]
                self._buffered_inputs = send_to_device(state["buffer"], self.accelerator.device)
                self._samples = state.get("samples", [])  # (a checkpoint of an older hfgen has none)

    Recorded.__name__ = Recorded.__qualname__ = trainer_class.__name__
    return Recorded


def skip_epoch_orders(sampler, epochs: int) -> None:
    """Advance TRL's train sampler past the prompt orders of `epochs` epochs, those a resumed run's checkpoint
    trained. RepeatSampler draws an epoch's order (one permutation per pass over it) from its own generator, seeded
    once when it is made: a resumed run's new sampler gave its first epoch epoch 0's order again, and every later
    epoch the order of another (the Trainer's set_epoch does not reach it). None (an iterable dataset: no sampler)
    or an unshuffled sampler: nothing to do."""
    import torch
    from trl.trainer.utils import RepeatSampler

    if not epochs or sampler is None or not getattr(sampler, "shuffle", False):
        return
    if type(sampler) is not RepeatSampler:  # a TRL whose sampler draws otherwise: found here, not as another order
        raise RuntimeError(
            f"TRL's train sampler is a {type(sampler).__name__}, not the RepeatSampler whose epoch orders "
            "skip_epoch_orders replays: a resumed run would not repeat the uninterrupted run's prompt orders"
        )
    for _ in range(epochs):  # what RepeatSampler.__iter__ draws from it per epoch
        torch.randperm(sampler.num_samples, generator=sampler.generator)


@contextlib.contextmanager
def reference_given(trainer_class, reference):
    """Within it, `trainer_class` (GRPOTrainer or RLOOTrainer) takes `reference` as its KL reference model.

    They take no reference argument: with beta != 0 and no LoRA they load one with
    `create_model_from_path(policy.config._name_or_path)`. For a policy merged from a LoRA adapter dir that name is
    the adapter's base, so the KL anchored to the bare base instead of the starting model (measured: kl 0.53 at step
    1 with learning rate 0), and for a base given a pad token the reference lacked the grown embeddings. That call
    returns `reference` here (the starting model as hfgen loaded the policy), which TRL then prepares as its own
    reference (dropout, fused LM head, placement for the engine). None: TRL's own loading, unchanged."""
    if reference is None:
        yield
        return
    module = sys.modules[trainer_class.__module__]  # where the trainer looks create_model_from_path up
    load_from_path = module.create_model_from_path
    taken = []

    def starting_model(model_id, *args, **kwargs):
        taken.append(model_id)
        return reference

    module.create_model_from_path = starting_model
    try:
        yield
    finally:
        module.create_model_from_path = load_from_path
    if len(taken) != 1:  # a TRL that builds its reference (or other models) otherwise: found here, not as a wrong KL
        raise RuntimeError(
            f"{trainer_class.__name__} did not load its reference model through create_model_from_path "
            f"once (calls: {taken}): hfgen's starting model was not passed as the reference"
        )


# ---- the stage ----------------------------------------------------------------------------------------------


def suppress_pad(config, tokenizer, model) -> None:
    """TRL's generation never samples the pad token (`hfgen.models.unsampled_ids`: the one hfgen adds to a tokenizer
    without one is an untrained row, sampled about once in V tokens otherwise): added to the recipe's
    `generation_kwargs`, which TRL passes to transformers' generate. vLLM takes other sampling parameters: left as
    it is there."""
    from hfgen.models import unsampled_ids
    from hfgen.rl.models import stop_token_ids

    pad = unsampled_ids(tokenizer, stop_token_ids(tokenizer, model))
    if pad and not getattr(config, "use_vllm", False):
        kwargs = dict(config.generation_kwargs or {})
        kwargs["suppress_tokens"] = sorted({*(kwargs.get("suppress_tokens") or []), *pad})
        config.generation_kwargs = kwargs


def pin_model_sampling(config, models) -> None:
    """The sampling keys `models`' generation_config.json sets (min_p, no_repeat_ngram_size, typical_p...) and the
    recipe does not, pinned off in `generation_kwargs`: TRL passes the recipe's temperature/top_p/top_k/min_p/
    repetition_penalty (min_p None) and transformers 5 fills every other key left None from the model's own config,
    so training and the held-out comparison (`sampling_config`) would sample under settings the recipe never named,
    while the loss scores the plain tempered softmax. vLLM takes other sampling parameters: left as it is there."""
    from hfgen.rl.models import sampling_keys_models_set

    if getattr(config, "use_vllm", False):
        return
    kwargs = dict(config.generation_kwargs or {})
    named = {*kwargs, *(key for key in ("top_k", "min_p", "repetition_penalty") if getattr(config, key) is not None)}
    pins = sampling_keys_models_set(models, named)
    if pins:
        config.generation_kwargs = kwargs | pins


def load_reward_model(path: str, model_args, config):
    """A reward-stage output (one-label sequence classifier) and its own tokenizer; one without a chat template (an
    encoder: BERT, DeBERTa) is given the plain template the reward stage trained it on, as TRL renders conversations
    for a reward model only through a chat template."""
    from transformers import AutoModelForSequenceClassification

    from hfgen.data.rendering import with_plain_chat_template
    from hfgen.models import load_tokenizer, reward_model_problem, torch_dtype

    if problem := reward_model_problem("reward_model_path", path, config.trust_remote_code):
        raise UserError(problem)
    tokenizer = with_plain_chat_template(load_tokenizer(path, config.trust_remote_code))
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=torch_dtype(model_args.dtype or "auto"), trust_remote_code=config.trust_remote_code
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def run(trainer_class, name: str, model_args, data_args: GroupRLArguments, config) -> Path:
    """Train with `trainer_class` (TRL's GRPOTrainer or RLOOTrainer); `name` labels the trained policy in eval.json."""
    from transformers import set_seed

    from hfgen.models import count_parameters, load_tokenizer
    from hfgen.rl.rollout import load_function

    set_seed(config.seed)
    output_dir = Path(config.output_dir)
    tokenizer = load_tokenizer(model_args.model_name_or_path, config.trust_remote_code)
    tokenizer.padding_side = "left"  # TRL generates from left-padded prompts
    model = load_model(model_args, config, tokenizer)
    # the KL reference is the starting model, loaded as the policy is (a LoRA run's reference is the adapter-disabled
    # policy, as TRL makes it; beta 0 has none)
    reference = None if model_args.use_peft or not config.beta else load_model(model_args, config, tokenizer)
    suppress_pad(config, tokenizer, model)
    pin_model_sampling(config, [model, reference])
    room = prompt_room(model.config, config)  # (refused when max_completion_length leaves none)
    for module_name in data_args.freeze_modules:
        try:
            model.get_submodule(module_name).requires_grad_(False)
        except AttributeError:
            raise UserError(f"freeze_modules: the model has no submodule '{module_name}'") from None
    if data_args.freeze_modules and model_args.use_peft:
        # LoRA trains adapters only: every base weight, the listed modules' among them, stays as it is
        print(
            f"freeze_modules {data_args.freeze_modules}: with use_peft only the LoRA adapters train (base weights stay)"
        )
    elif data_args.freeze_modules and not any(p.requires_grad for p in model.parameters()):
        raise UserError(
            f"freeze_modules {data_args.freeze_modules} freezes every parameter of the model: nothing is left to "
            "train; list fewer modules"
        )

    rewards, reward_model = [], None
    if data_args.reward_model_path:
        from hfgen.rl.models import stop_token_ids

        reward_model, reward_tokenizer = load_reward_model(data_args.reward_model_path, model_args, config)
        stop_ids = stop_token_ids(tokenizer, model)  # what TRL stops generation at
        chunk = data_args.eval_generation_batch_size
        rewards.append(reward_model_function(reward_model, reward_tokenizer, stop_ids, chunk))
    rewards += [trl_reward_function(spec) for spec in data_args.reward_functions]
    oracle = load_function(data_args.oracle_function) if data_args.oracle_function else None

    # any prompt layout (text, chat messages, an SFT or preference file's prompts) as `prompt`, the file's other
    # columns beside it for the reward functions that name them (a reference answer)
    train_rows, eval_rows, data_records = load_for_stage(
        data_args, "prompt", seed=data_seed(config), default_columns=prompt_columns(data_args), other_columns=True
    )
    train_rows = prepare_prompts(train_rows, data_args, tokenizer, data_records, model_args.model_name_or_path)
    eval_rows = prepare_prompts(eval_rows, data_args, tokenizer, model_path=model_args.model_name_or_path)
    train_rows, eval_rows = (
        drop_unanswerable_prompts(tokenizer, rows, room, model.config, config, data_records, split)
        for rows, split in ((train_rows, "train"), (eval_rows, "eval"))
    )
    # how its prompts are rendered (eval.json says at the end): for a checkpoint of a run not finished yet
    data_records["trained_on_chat"] = prompts_are_chat(train_rows, tokenizer)
    record(output_dir, data_records)
    monitor = hacking_monitor(data_args, config, rewards)
    trainer = build_trainer(
        recorded(trainer_class),
        output_dir,
        trainer_name=trainer_class.__name__,
        model=model,
        reward_funcs=rewards,
        args=config,
        train_dataset=train_rows,
        processing_class=tokenizer,
        peft_config=lora_config(model_args, model),
        callbacks=[monitor] if monitor else [],  # before hfgen's records: its alerts reach metrics.jsonl
        oracle=oracle,
        reference=reference,
    )

    if reward_model is not None:  # a reward function to TRL, which does not place it: placed for the engine as
        # PPO's (under ZeRO-3 its weights were partitioned at load; every process scores its own completions)
        rewards[0].scorer.reward_model = loop.prepare_frozen(trainer.accelerator, reward_model)
    resume = tracking.trainer_resume(trainer, output_dir)
    if monitor and resume:
        monitor.load(resume)
    if trainer.is_world_process_zero():  # the rows of the steps after the checkpoint are about to be written again
        start_samples(output_dir, tracking.checkpoint_step(resume) if resume else 0)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    check_final_policy(trainer, eval_rows if len(eval_rows) else train_rows, config)
    trainer.save_model(str(output_dir))
    guard.kill_point("final_save")
    loop.maybe_write_fingerprint(trainer.accelerator, trainer.model, output_dir)  # tests only

    # On every process, with whole weights (gathered under ZeRO-3, unsharded under FSDP2): the reward model's passes
    # and the starting model's load are collective there, and rank 0 alone would wait for the others for ever.
    starting = None
    if data_args.eval_samples_per_prompt and not model_args.use_peft:
        starting = frozen_reference(trainer, reference, config) or load_model(model_args, config, tokenizer)
        upcast_like(starting, trainer.model)  # a loaded one: as the policy was at its start (TRL's reference is)
    # the starting model computing as the trained policy does: under the mixed-precision autocast, as TRL's prepared
    # reference does already (a loaded model is given it): kl_to_reference 0.023 at learning rate 0 otherwise
    with (
        loop.gathered(trainer.accelerator, trainer.model_wrapped, starting) as (policy, starting),
        loop.computing_as_prepared(trainer.accelerator, starting),
    ):
        guard.kill_point("eval")
        figures = {
            "train_runtime_s": result.metrics["train_runtime"],
            "episodes": generated_completions(trainer.state.global_step, config),
            "parameters": count_parameters(policy),
            "trainable_parameters": count_parameters(policy, trainable_only=True),
            "peft": model_args.use_peft,
            # how its prompts were rendered, for `hfgen generate` / `eval` to prompt it the same way
            "trained_on_chat": prompts_are_chat(train_rows, tokenizer),
        }
        if data_args.eval_samples_per_prompt:
            figures |= evaluate_against_start(trainer, policy, starting, eval_rows, data_args, config, name, oracle)
    figures["episodes_per_s"] = figures["episodes"] / result.metrics["train_runtime"]
    figures |= monitor.summary() if monitor else {}
    if trainer.is_world_process_zero():
        tracking.update_eval(output_dir, figures)
    return output_dir


def frozen_reference(trainer, reference, config):
    """TRL's prepared KL reference when it is still the starting model as hfgen loads it, for the final evaluation to
    sample from instead of loading the starting model a third time (a third full model resident); else None.
    Not when sync_ref_model mixed the policy into it during training, nor with cast_lm_head_to_fp32 (its LM head
    was cast to float32, the starting model's is not)."""
    if reference is None or config.sync_ref_model or getattr(config, "cast_lm_head_to_fp32", False):
        return None
    return trainer.ref_model


def generated_completions(steps: int, config) -> int:
    """Completions generated over `steps` optimizer steps (all processes): TRL generates one generation batch every
    steps_per_generation x num_iterations micro-steps (the first at micro-step 0), not one per optimizer step."""
    micro_steps = steps * config.gradient_accumulation_steps
    generate_every = config.steps_per_generation * config.num_iterations
    return -(-micro_steps // generate_every) * config.generation_batch_size


# ---- final evaluation ---------------------------------------------------------------------------------------


def prompt_ids(tokenizer, prompts: list, config) -> list[list[int]]:
    """The prompts' token ids as the policy reads them in training: chat prompts rendered with the chat template
    (and the recipe's chat_template_kwargs), up to the assistant's turn; strings as they are."""
    chat = not isinstance(prompts[0], str)
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True, **(config.chat_template_kwargs or {}))
        if chat else p
        for p in prompts
    ]  # fmt: skip
    return tokenizer(texts, add_special_tokens=not chat)["input_ids"]


def hacking_monitor(data_args, config, rewards: list):
    """The reward-hacking monitor's callback (None with `hacking_monitor: false`), reading TRL's log of each of
    `rewards` (the reward functions in the trainer's order) under the recipe's name of its component, which its
    `reward_weights` entry is keyed by: TRL logs the reward model under its folder's name."""
    from hfgen.monitoring import HackingMonitorCallback

    if not data_args.hacking_monitor:
        return None
    names = dict(zip((reward.__name__ for reward in rewards), reward_component_names(data_args)))
    monitor = build_monitor(data_args, reward_weights=config.reward_weights)
    return HackingMonitorCallback(monitor, stop_on_hacking=data_args.stop_on_hacking, component_names=names)


def check_final_policy(trainer, rows, config, count: int = 8) -> None:
    """Before the save, on every process: the trained policy's mean log-probability of the tokens of `count` of
    `rows`' prompts (held-out ones). The guard saw only the last update's loss and gradients: an update that broke
    the policy saved it COMPLETE, the final evaluation sampling from NaN."""
    import torch

    from hfgen.rl.functional import masked_mean, token_logprobs
    from hfgen.rl.rollout import response_logits, right_pad

    tokenizer = trainer.processing_class
    queries = prompt_ids(tokenizer, [row["prompt"] for row in rows.select(range(min(count, len(rows))))], config)
    # right-padded: every scored position reads real tokens only (a row of nothing but padding can be NaN)
    ids, mask = right_pad(queries, tokenizer.pad_token_id, trainer.accelerator.device)
    with torch.no_grad(), loop.gathered(trainer.accelerator, trainer.model_wrapped) as (policy,):
        policy.eval()
        logits = response_logits(policy, ids, mask, 1)  # predicting each prompt token after the first
    mean = masked_mean(token_logprobs(logits, ids[:, 1:]), mask[:, 1:]).item()
    guard.check_final_model(config.output_dir, trainer.state.global_step, {"held-out prompts' log-probability": mean})


def evaluate_against_start(
    trainer, policy, starting, eval_rows, data_args: GroupRLArguments, config, name: str, oracle
):
    """`eval_samples_per_prompt` responses per held-out prompt from the starting model (`sft/...`, as PPO names it)
    and from the trained policy (`NAME/...`), sampled as in training and with the same random numbers: mean of every reward component and the
    oracle, exact match (the `exact_answer` reward when present), win rates of the trained policy (ties half), and
    KL(trained || start) per response (`kl_to_reference`) (summed over the trained policy's response tokens)."""
    import torch

    from hfgen.evaluation.policy import compared_figures, row_seed
    from hfgen.rl.functional import has_stop_token, response_mask
    from hfgen.rl.models import stop_token_ids
    from hfgen.rl.rollout import (
        draw_can_be_seeded,
        left_pad,
        reference_logprobs,
        response_texts,
        sample_responses,
        sampled_logprobs,
    )

    tokenizer = trainer.processing_class
    device = trainer.accelerator.device
    prompts = [row["prompt"] for row in eval_rows for _ in range(data_args.eval_samples_per_prompt)]
    columns = {
        key: [row[key] for row in eval_rows for _ in range(data_args.eval_samples_per_prompt)]
        for key in eval_rows.column_names
        if key != "prompt"
    }
    query_ids, query_mask = left_pad(prompt_ids(tokenizer, prompts, config), tokenizer.pad_token_id, device)
    # every id that ends a completion in training (TRL stops at the tokenizer's EOS and all of the policy's
    # generation_config eos ids), so eos_rate and lengths measure what training sampled
    stop_ids = stop_token_ids(tokenizer, policy)
    generation_config = sampling_config(tokenizer, config, stop_ids)
    # each row's random numbers from its own seed, its place in the list (as compare_to_reference's): the same for
    # both models (common random numbers, a less noisy comparison) and whatever eval_generation_batch_size chunks
    # the rows (one seed for the whole list drew each chunk's numbers after the previous chunk's: the starting
    # model's own figures changed with that memory knob). Sampling narrowed by typical-p, top-h or an epsilon/eta
    # cutoff is generate's own, from one seed.
    seeds = [row_seed(config.seed + 1, index) for index in range(len(prompts))]
    seeds = seeds if draw_can_be_seeded(generation_config) else None
    judged, sampled = {}, None
    # components by hfgen's names ("reward_model", not TRL's name of the model's dir: outputs/tiny/reward would be
    # "reward", the total's name)
    names = reward_component_names(data_args)
    for label, model in (("sft", starting), (name, policy)):
        torch.manual_seed(config.seed + 1)  # (generate's own draw, when the rows are not seeded)
        use_adapter_off = label == "sft" and model is None
        model = policy if model is None else model.to(device)
        model.eval()
        with policy.disable_adapter() if use_adapter_off else _nothing():
            sampled = sample_responses(
                model,
                query_ids,
                query_mask,
                generation_config,
                data_args.eval_generation_batch_size,
                tokenizer.pad_token_id,
                seeds,
            )
        responses = response_texts(tokenizer, sampled.response_ids, stop_ids)
        ended = has_stop_token(sampled.response_ids, stop_ids)
        figures = {}
        for reward, reward_name in zip(trainer.reward_funcs, names):
            if hasattr(reward, "scorer"):  # the reward model, scored as in training, PPO and `hfgen eval`
                figures[reward_name] = reward.scorer(prompts, responses, ended.tolist(), device)[0].tolist()
            else:
                figures[reward_name] = reward(prompts, responses, **columns)
        # as training sums them: a component's None (NaN here) is skipped; none scored, left out (NaN)
        figures["reward"] = weighted_totals(list(zip(*figures.values())), trainer.reward_weights).tolist()
        if oracle is not None:
            figures["oracle"] = call_reward_function(oracle, prompts, responses, columns)
        figures["eos_rate"] = ended.float().tolist()
        # up to and including the first stop id: a pad that is also the EOS (GRPO keeps the model's) is counted
        figures["response_length"] = response_mask(sampled.response_ids, stop_ids).sum(1).float().tolist()
        judged[label] = figures
    input_ids = torch.cat([query_ids, sampled.response_ids], dim=1)  # the trained policy's samples
    kept = response_mask(sampled.response_ids, stop_ids)  # the closing EOS too, when it is also the pad
    attention_mask = torch.cat([query_mask, kept.long()], dim=1)
    reference = starting.to(device) if starting is not None else None
    passes = (input_ids, attention_mask, query_ids.shape[1], config.temperature, data_args.eval_generation_batch_size)
    ref = reference_logprobs(policy, reference, *passes)
    logprobs = sampled_logprobs(trainer.accelerator, policy, sampled, *passes)
    kl = ((logprobs - ref) * kept).sum(1)

    results = {
        "heldout/num_prompts": len(eval_rows),  # not eval/: `hfgen eval` owns those and replaces them
        "heldout/samples_per_prompt": data_args.eval_samples_per_prompt,
        "kl_to_reference": kl.mean().item(),
    }
    for key in judged[name]:  # means over the scored responses, win rates over the pairs scored on both sides
        results |= compared_figures(key, judged[name][key], judged["sft"][key], name)
    if "exact_answer" in judged[name]:
        results["sft/exact_match"] = results["sft/exact_answer"]
        results[f"{name}/exact_match"] = results[f"{name}/exact_answer"]
    return results


def _nothing():
    from contextlib import nullcontext

    return nullcontext()


def sampling_config(tokenizer, config, stop_ids: list[int]):
    """Sampling as in training: softmax(logits / temperature) with the config's top_p/top_k/min_p and
    repetition_penalty, then its `generation_kwargs` on top (as TRL builds its generation config; those
    `generation_kwargs_problems` lets through, and the off values `pin_model_sampling` added there), nothing else (a
    model's own generation_config.json cannot leak in),
    ending at any of `stop_ids`, never the pad token (as in training, `suppress_pad`)."""
    from transformers import GenerationConfig

    from hfgen.models import unsampled_ids

    extra = comparison_kwargs(config)
    suppressed = {*(extra.pop("suppress_tokens", None) or []), *unsampled_ids(tokenizer, stop_ids)}
    sampling = dict(
        do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or 0,
        min_p=config.min_p, repetition_penalty=config.repetition_penalty, max_new_tokens=config.max_completion_length,
    )  # fmt: skip
    return GenerationConfig(
        **sampling | extra, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id, use_cache=True,
        suppress_tokens=sorted(suppressed) or None, return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
