"""Supervised fine-tuning of a causal LM: full weights, LoRA, or QLoRA (4-bit base, CUDA + bitsandbytes), on TRL's
`SFTTrainer`.

    hfgen train recipes/tiny/sft_full.yaml
    hfgen train recipes/tiny/sft_lora.yaml
    ACCELERATE_USE_CPU=true accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml scripts/train.py recipes/tiny/sft_lora.yaml

Recipe keys are TRL's own: `ModelConfig` (model_name_or_path, use_peft, lora_r, lora_alpha, lora_dropout,
lora_target_modules, load_in_4bit, ...), `SFTConfig` (max_length, packing, completion_only_loss,
assistant_only_loss, ...) and hfgen's data keys. Data in any of the common layouts: plain text
(`dataset_text_field`), prompt/completion (loss on the completion by default), or conversational `messages`
rendered with the tokenizer's chat template (`assistant_only_loss: true` masks everything but assistant turns).

Beyond the training itself, the run records what a fine-tune is for: the held-out loss on *responses only*
(completions / final assistant turns) before and after training, so the gain is comparable whatever loss
masking or packing trained it, and sampled responses to held-out prompts with the fraction that ended with EOS
(a policy that never stops is useless to PPO). The output dir holds a full model, or for LoRA the adapter, each
with the tokenizer, so `hfgen generate OUTPUT_DIR` works on either and `hfgen merge` turns an adapter into a
plain model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import ModelConfig, SFTConfig
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling, SFTTrainer

from hfgen import guard, loop, tracking
from hfgen.data.prepare import (
    TextDataArguments,
    check_text_data,
    count_dropped,
    data_seed,
    data_source,
    drop_and_count,
    load_for_stage,
    record,
)
from hfgen.data.rendering import splits_without_doubled_bos, without_doubled_bos  # noqa: F401 (tests import it here)
from hfgen.errors import UserError
from hfgen.finetune import (
    build_trainer,
    check_model_config,
    count_trained_tokens,
    load_model,
    lora_config,
    restore_router_logits,
    router_logits_for_training,
    tokenizer_for,
)
from hfgen.models import not_a_causal_lm


@dataclass
class SFTDataArguments(TextDataArguments):
    num_samples: int = field(
        default=16, metadata={"help": "Held-out prompts answered after training, into samples.jsonl."}
    )
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Token budget of each sampled response."})


# TRL's ModelConfig rather than hfgen's ModelArguments: the two share model_name_or_path, dtype and
# attn_implementation (argparse refuses duplicate options), and ModelConfig carries the LoRA/QLoRA keys under the
# names TRL users know. trust_remote_code is SFTConfig's. None of these three dataclasses share a field.
ARGUMENTS = (ModelConfig, SFTDataArguments, SFTConfig)


def check(model_args: ModelConfig, data_args: SFTDataArguments, training_args: SFTConfig) -> list[str]:
    # An encoder first: the LoRA target check would build it as a causal LM (transformers bolts a decoder head on)
    problems = not_a_causal_lm(
        "model_name_or_path", model_args.model_name_or_path, training_args.trust_remote_code
    ) or check_model_config(model_args, training_args.trust_remote_code, trl_trainer="SFTTrainer")
    if training_args.padding_free and not training_args.packing and training_args.max_length is not None:
        problems.append(  # SFTTrainer's refusal, once the model had loaded
            f"padding_free: true without packing does not enforce max_length={training_args.max_length} (TRL refuses "
            "it): set packing: true, or max_length: null to train rows at their full length"
        )
    packs = training_args.packing if training_args.eval_packing is None else training_args.eval_packing
    if (training_args.packing or packs) and (training_args.dataset_num_proc or 1) > 1:
        # TRL packs with the same map as it tokenizes: each process's shard of the rows is packed apart (a bin never
        # mixes rows of two shards, and each shard ends in its own part-filled one), so the rows packed together,
        # and the weights, changed with the process count (probe 43 D6)
        problems.append(
            f"packing with dataset_num_proc {training_args.dataset_num_proc}: TRL packs each process's share of the "
            "rows apart, so which rows train together (and the trained weights) would depend on the number of "
            "processes: remove dataset_num_proc (the rows are then tokenized and packed in one process), or set "
            "packing: false"
        )
    tokenizer, tokenizer_problems = None, []
    if not problems:  # the template every row must render with (a row it refuses is named in the file by the load)
        try:
            tokenizer = tokenizer_for(model_args, training_args)
        except UserError as error:
            tokenizer_problems = [str(error)]
    loaded, data_problems = check_text_data(
        data_args, "sft", {"text": training_args.dataset_text_field}, seed=data_seed(training_args), template=tokenizer
    )
    problems += data_problems
    if loaded:
        columns = loaded[0].column_names
        if training_args.completion_only_loss and "completion" not in columns:
            records = loaded[2].get("mixture", [loaded[2]])
            layouts = sorted({entry["train"]["format"] for entry in records})
            problems.append(
                f"completion_only_loss: true needs prompt/completion data; {data_source(data_args)} is read as "
                f"{', '.join(layouts)} (columns {columns} after conversion): give a prompt/completion layout (alpaca, "
                "dolly, prompt_completion: set dataset_format), or set completion_only_loss: false"
            )
        problems += moved_completions_problems(loaded[2], columns, training_args)
        if training_args.assistant_only_loss and "text" in columns:
            problems.append(
                f"assistant_only_loss: true needs conversational data (or prompt/completion); the data is plain text "
                f"(columns {columns}): set assistant_only_loss: false to train on every token"
            )
        if not problems:  # the fast part of `hfgen check`: labels fully masked, EOS outside labels, template mismatch
            from hfgen.check import sft_rendering

            if tokenizer_problems:
                problems += tokenizer_problems
            else:
                problems += sft_rendering(loaded[0], model_args, training_args, data_source(data_args), tokenizer)[1]
                problems += new_template_tokens_problems(model_args, training_args, tokenizer)
    if data_args.num_samples < 0 or data_args.sample_max_new_tokens < 1:
        problems.append("num_samples must be >= 0 and sample_max_new_tokens >= 1")
    return problems


def new_template_tokens_problems(model_args, training_args, tokenizer) -> list[str]:
    """LoRA with `chat_template_path` naming a tokenizer whose special tokens the model's lacks: TRL's SFT would
    train the new tokens' embedding rows (peft's trainable_token_indices) and lm_head in full (modules_to_save), and
    peft cannot run the two on one layer (a ValueError, "TrainableTokensLayer wraps an unknown layer type", at the
    first forward pass, after the model has loaded); frozen under LoRA, their rows would stay random, as they do in
    the reward stage (its tokenizer holds them before RewardTrainer looks for tokens to train). `tokenizer`: with
    the template's tokens added (`finetune.tokenizer_for`)."""
    from hfgen.models import load_tokenizer

    if not model_args.use_peft or not training_args.chat_template_path:
        return []
    own = load_tokenizer(model_args.model_name_or_path, training_args.trust_remote_code)
    new = sorted(set(tokenizer.get_vocab()) - set(own.get_vocab()))
    if not new:
        return []
    return [
        f"chat_template_path '{training_args.chat_template_path}' brings {len(new)} token(s) the model's tokenizer "
        f"lacks ({', '.join(new[:4])}{', ...' if len(new) > 4 else ''}), whose new embedding rows LoRA does not train "
        "(they would stay random; TRL's SFT trains them beside LoRA in a way peft cannot run, lm_head in full): train "
        "without LoRA (use_peft: false) to learn the new tokens, or give a .jinja template written with tokens the "
        "tokenizer has"
    ]


PROMPT_COMPLETION_LAYOUTS = ("alpaca", "dolly", "prompt_completion", "unpaired_preference")


def moved_completions_problems(records: dict, columns: list[str], training_args: SFTConfig) -> list[str]:
    """A mixture's prompt/completion sets (Alpaca) made conversations beside sets of whole conversations
    (mixture._as_chat) lose TRL's completion-only loss, which alone they have by default: without
    assistant_only_loss the loss would fall on every token, their instructions and the template's system prompt
    too. Refused unless the loss is asked for on the assistant turns, or on every token (completion_only_loss: false)."""
    moved = [
        f"'{entry['name']}' ({entry['train']['format']})"
        for entry in records.get("mixture", [])
        if entry["train"]["format"] in PROMPT_COMPLETION_LAYOUTS
    ]
    if not moved or "messages" not in columns or training_args.assistant_only_loss:
        return []
    if training_args.completion_only_loss is False:
        return []
    return [
        f"the mixture's prompt/completion set(s) {', '.join(moved)} become conversations beside the other sets' "
        "(messages), where the loss is no longer on the completions only (TRL's completion_only_loss applies to "
        "prompt/completion rows): their instructions and the system prompt would train. Set assistant_only_loss: "
        "true (the loss on every set's assistant turns), or completion_only_loss: false to train every token"
    ]


def completion_loss_instead(rows, training_args: SFTConfig) -> str | None:
    """`assistant_only_loss: true` on prompt/completion text (Alpaca, Dolly, a CSV of questions and answers) means
    what TRL's completion_only_loss does there, the loss on the answers; TRL would refuse it as not conversational.
    Switched over, with the note returned (None when nothing changed)."""
    if not training_args.assistant_only_loss or "completion" not in rows.column_names:
        return None
    if not len(rows) or not isinstance(rows[0]["completion"], str):
        return None
    training_args.assistant_only_loss = False
    training_args.completion_only_loss = True
    return (
        "assistant_only_loss: the data is prompt/completion text, not chat turns: the loss is on the completions "
        "(completion_only_loss), as assistant_only_loss asks"
    )


class ShufflesWithDataSeed(SFTTrainer):
    """SFTTrainer whose `shuffle_dataset` shuffle (of the rows before packing, and of the rows it trains, for the
    training and evaluation splits alike) is drawn from `data_seed` (else `seed`), as hfgen's other data draws are:
    TRL shuffles with `seed`, so a seed sweep with data_seed fixed trained each seed on another row order and, with
    packing, other rows packed together (probe 43 D1). TRL's preparation reads its config's seed for this shuffle
    alone; it is handed a shallow copy whose seed is the data's (the run's own config keeps `seed`)."""

    def _prepare_dataset(self, dataset, processing_class, args, *rest, **kwargs):
        shuffled_by_data_seed = copy.copy(args)
        shuffled_by_data_seed.seed = data_seed(args)
        return super()._prepare_dataset(dataset, processing_class, shuffled_by_data_seed, *rest, **kwargs)


# ---- packing without varlen attention kernels ----------------------------------------------------------

ROW_PACKING_ATTENTION = ("sdpa", "eager")  # kernels that take a dense mask; flash/flex attention handle varlen rows
# Batch key of PackedRowsCollator: each row's tokens (its tail padding not), for the logged num_tokens; taken out
# of the batch before the forward (PackedRowsCounted)
PACKED_ROW_TOKENS = "packed_row_tokens"


@dataclass
class PackedRowsCollator(DataCollatorForLanguageModeling):
    """Packed rows stay separate rows of the batch, and the documents inside a row are kept apart by position_ids
    alone: with no attention_mask, transformers builds a block-diagonal causal mask from the position resets
    (`masking_utils.find_packed_sequence_indices`), whatever the attention kernel.

    TRL's packing instead flattens the whole batch into one padding-free row, which varlen kernels (flash
    attention) process in O(sum of document lengths²), but sdpa and eager in O((batch x max_length)²): on those,
    this collator trains the same loss several times faster (see scripts/bench_sft.py)."""

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        # its presence would switch the packed-sequence mask off; what it counts goes on (PACKED_ROW_TOKENS)
        batch[PACKED_ROW_TOKENS] = batch.pop("attention_mask").sum(dim=1)
        return batch


class PackedRowsCounted(ShufflesWithDataSeed):
    """SFTTrainer whose logged `num_tokens` (and `eval_num_tokens`, the same count) counts the tokens trained in
    PackedRowsCollator's rows. Given no attention_mask, TRL counts `position_ids.size(1)` a batch, the length of
    its own packing's one flattened row: of hfgen's rows, one row's length (127 where 4 rows of ~124 tokens
    trained). The collator's count of each row's tokens is counted in its place; unpacked batches, TRL's count."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        row_tokens = inputs.pop(PACKED_ROW_TOKENS, None)  # no input of the model's forward
        counted = self._total_train_tokens
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if row_tokens is not None and self.model.training:  # TRL counts training batches alone, as here
            trained = self.accelerator.gather_for_metrics(row_tokens.sum()).sum().item()
            self._total_train_tokens = counted + trained // self._tp_size
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return result


def use_row_packing(training_args: SFTConfig, model) -> bool:
    """Best-fit-decreasing packing, not explicitly padding-free, on an attention kernel without varlen support."""
    return (
        training_args.packing
        and training_args.packing_strategy in ("bfd", "bfd_split")
        and not training_args.padding_free
        and model.config._attn_implementation in ROW_PACKING_ATTENTION
    )


def keeps_documents_apart(model) -> bool:
    """Whether `model` reads the documents of a packed row apart from its position_ids alone, as row packing needs
    (transformers' masks do so where a model passes position_ids on; OPT's forward does not): the logits of a short
    document packed after another equal its logits alone. A forward of five tokens, under no_grad, in eval mode."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    first, second = [1, 2, 3], [4, 5]
    try:
        with torch.no_grad():
            ids = torch.tensor([first + second], device=device)
            positions = torch.tensor([[0, 1, 2, 0, 1]], device=device)
            packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, len(first) :].float()
            alone = model(input_ids=torch.tensor([second], device=device), use_cache=False).logits[0].float()
    finally:
        model.train(training)
    return bool((packed - alone).abs().max() <= 0.02 * alone.abs().max() + 1e-4)  # bf16 noise, not a leak


# ---- held-out responses: loss before/after, and sampled answers --------------------------------------


def split_prompt_response(row: dict, text_field: str):
    """(prompt, response) of one row: the completion, or a conversation's last assistant turn. Plain text has no
    prompt: all of it is response."""
    if "messages" in row:
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        return (messages[:last], messages[last : last + 1]) if last is not None else (None, None)
    if "prompt" in row and "completion" in row:
        return row["prompt"], row["completion"]
    return "", row[text_field]


# TRL's packing strategies that cut no row: bfd_split packs a long row's overflow as further documents, wrapped
# concatenates every row and cuts the stream into max_length rows; every token trains either way
UNCUT_PACKING = ("bfd_split", "wrapped")


def keep_end_ignored(training_args) -> bool:
    """truncation_mode: keep_end under a packing that cuts rows: TRL's packer cuts a row longer than max_length from
    its start (keeps its first tokens) whatever truncation_mode says (`pack_dataset`, its truncation skipped), so the
    ends keep_end asks for would not train. The check refuses it when a row is that long (`check_sft_rendering`)."""
    cutting_packer = training_args.packing and training_args.packing_strategy not in UNCUT_PACKING
    return bool(cutting_packer and training_args.truncation_mode == "keep_end" and training_args.max_length)


def row_cut(training_args) -> tuple[int | None, bool]:
    """(the length SFTTrainer cuts each tokenized row to, None when it cuts none; whether the cut keeps the row's
    end): unpacked, its truncation at max_length, from the start or, under `truncation_mode: keep_end`, from the
    end; packed, the packer's cut (TRL skips its truncation when packing, and `pack_dataset`'s bfd keeps each row's
    first max_length tokens whatever truncation_mode says; bfd_split and wrapped cut none). What the check, the drop
    of fully masked rows and the held-out loss cut with, so that they judge the tokens that train."""
    if getattr(training_args, "packing", False):
        uncut = getattr(training_args, "packing_strategy", "bfd") in UNCUT_PACKING
        return (None if uncut else training_args.max_length or None), False
    keep_end = getattr(training_args, "truncation_mode", "keep_start") == "keep_end"
    return training_args.max_length or None, keep_end


def tokenize_response(
    tokenizer,
    prompt,
    response,
    max_length: int | None,
    template_tail: bool = False,
    tools: list | None = None,
    keep_end: bool = False,
) -> tuple[list[int], int] | None:
    """(token ids of prompt+response up to the response's EOS, index where the response starts), tokenized the way
    SFTTrainer does: chat template for conversations (with the row's function definitions, `tools`), EOS after
    plain text; cut to `max_length` from the start, or from the end with `keep_end` (`row_cut`). None when
    truncation leaves no response token. `template_tail`: a conversation keeps the template's text after the EOS
    too (TRL's DPO and KTO train it)."""
    from trl.data_utils import common_prefix_length

    if isinstance(response, list):  # conversational
        render = dict(tokenize=True, return_dict=True, tools=tools)
        prompt_ids = (
            tokenizer.apply_chat_template(prompt, add_generation_prompt=True, **render)["input_ids"] if prompt else []
        )
        ids = tokenizer.apply_chat_template(prompt + response, **render)["input_ids"]
    else:
        prompt_ids = tokenizer(text=prompt)["input_ids"] if prompt else []
        text = prompt + response
        ids = tokenizer(text=text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token)["input_ids"]
    start = common_prefix_length(prompt_ids, ids)  # the template may render the prompt differently alone
    if keep_end and max_length and len(ids) > max_length:
        # SFTTrainer keeps the last max_length tokens of the whole rendering (the template's text after the EOS
        # too), and the prompt's start goes first
        start, ids = max(start - (len(ids) - max_length), 0), ids[-max_length:]
    if isinstance(response, list) and not template_tail and tokenizer.eos_token_id in ids[start:]:
        # the assistant turn ends at its EOS; template text after it is not scored. Plain text trains whole: a text
        # rendered with a chat template holds an EOS (Llama 3's <|eot_id|>) after every turn, the user's first
        ids = ids[: ids.index(tokenizer.eos_token_id, start) + 1]
    ids = ids[:max_length] if max_length else ids
    return (ids, max(start, 1)) if start < len(ids) else None


def trained_conversation(tokenizer, row: dict, training_args, truncate: bool = True) -> tuple[list[int], list[int]]:
    """(token ids, trained mask) of a `messages` row as SFTTrainer trains it: every assistant turn under
    assistant_only_loss (the assistant mask of the template it trains with: TRL's training version, with
    {% generation %} markers, of a template without them), every token otherwise; truncated to max_length as
    truncation_mode says. Not only the last turn: an earlier turn within max_length trains when the last is cut."""
    from hfgen.data.formats import row_tools
    from hfgen.data.rendering import marked_template

    assistant_only = bool(training_args.assistant_only_loss)
    template = marked_template(tokenizer) if assistant_only else None
    rendered = tokenizer.apply_chat_template(
        row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=assistant_only,
        chat_template=template, tools=row_tools(row),
    )  # fmt: skip
    ids = list(rendered["input_ids"])
    mask = list(rendered["assistant_masks"]) if assistant_only else [1] * len(ids)
    max_length, keep_end = row_cut(training_args)
    if max_length and truncate:
        cut = slice(-max_length, None) if keep_end else slice(None, max_length)
        ids, mask = ids[cut], mask[cut]
    return ids, mask


def response_loss(model, examples: list[tuple[list[int], int]], pad_token_id: int, batch_size: int) -> float:
    """Mean next-token loss over response tokens only (prompt tokens are context, not scored)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    model.eval()
    nll_sum, scored_tokens = 0.0, 0
    with torch.inference_mode():
        for begin in range(0, len(examples), batch_size):
            chunk = examples[begin : begin + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            scored = torch.zeros_like(input_ids, dtype=torch.bool)
            for row, (ids, start) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
                scored[row, start : len(ids)] = True
            input_ids, attention_mask, scored = input_ids.to(device), attention_mask.to(device), scored.to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
            nll_sum += nll[scored[:, 1:]].sum().item()
            scored_tokens += int(scored[:, 1:].sum())
    return nll_sum / max(scored_tokens, 1)


def sample_prompt(prompt, response):
    """What to answer at sampling time: the row's prompt, or the first words of a plain text."""
    return prompt if prompt or isinstance(response, list) else " ".join(response.split()[:3])


def sample_responses(model, tokenizer, prompts: list, max_new_tokens: int, seed: int) -> list[dict]:
    """One sampled response (temperature 0.7, top-p 0.95) per prompt, and whether it ended with EOS (any of the
    model's stop ids), by `hfgen eval`'s sampler (`generate.generate_tokens`): each prompt from its own seed
    (`generate.prompt_seeds`), so that its sample does not depend on how many prompts are sampled nor on the others.
    On a model with learned positions (GPT-2, OPT) a prompt gets the new tokens its positions leave
    (`generate.new_token_budgets`), and a prompt that fills them is left out, said: generate_tokens refuses it, and
    past them generation fails with an IndexError, after the training."""
    from hfgen.generate import format_prompts, generate_tokens, prompt_seeds
    from hfgen.models import position_limit

    if not prompts:
        return []
    chat = isinstance(prompts[0], list)
    if limit := position_limit(model.config):
        prompt_ids = tokenizer(format_prompts(tokenizer, prompts, chat), add_special_tokens=not chat)["input_ids"]
        if too_long := sum(len(ids) >= limit for ids in prompt_ids):
            print(f"samples: {too_long} of {len(prompts)} held-out prompts are left out: they fill the {limit} "
                  f"positions {model.config.model_type} models learn, leaving no room to answer")  # fmt: skip
            prompts = [prompt for prompt, ids in zip(prompts, prompt_ids) if len(ids) < limit]
    if not prompts:  # every one left out
        return []
    completions = generate_tokens(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.95, chat=chat,
        seeds=prompt_seeds(seed, prompts),
    )  # fmt: skip
    return [
        {"prompt": prompt, "response": sample.text, "ended_with_eos": sample.finished}
        for prompt, (sample,) in zip(prompts, completions)
    ]


def drop_fully_masked(rows, tokenizer, training_args: SFTConfig, records: dict):
    """Drop (and count) the rows whose loss would be on no token at all: prompts that fill max_length, so that
    truncation cuts every completion token. Refused when none or too few remain."""
    masked_loss = "completion" in rows.column_names and training_args.completion_only_loss is not False
    masked_loss |= "messages" in rows.column_names and training_args.assistant_only_loss
    chat = "completion" not in rows.column_names or isinstance(rows[0]["completion"], list)
    max_length, keep_end = row_cut(training_args)
    if not masked_loss or not max_length or (chat and tokenizer.chat_template is None):
        return rows
    if "messages" in rows.column_names:  # every assistant turn trains, not only the last one
        keep = [any(trained_conversation(tokenizer, row, training_args)[1]) for row in rows]
    else:
        keep = [
            tokenize_response(tokenizer, prompt, response, max_length, keep_end=keep_end) is not None
            for prompt, response in (split_prompt_response(row, "text") for row in rows)
        ]
    kept = drop_and_count(rows, keep, records, fully_masked_reason(training_args))
    refuse_too_many_fully_masked(len(rows), len(kept), training_args)
    return kept


def trl_drops_fully_masked(training_args: SFTConfig) -> bool:
    """Whether SFTTrainer drops the rows truncation leaves with no trained token itself (it does when it truncates
    the rows it tokenized: max_length set, no packing, its preparation not skipped)."""
    skipped = (training_args.dataset_kwargs or {}).get("skip_prepare_dataset", False)
    return training_args.max_length is not None and not training_args.packing and not skipped


def count_fully_masked(rows_given: int, trainer, training_args: SFTConfig, records: dict) -> None:
    """Count (and refuse, as drop_fully_masked) the training rows SFTTrainer dropped as fully masked: the rows it was
    given less the rows it kept, read from its tokenized data instead of tokenizing every row a second time."""
    kept = len(trainer.train_dataset)
    count_dropped(records, fully_masked_reason(training_args), rows_given - kept)
    refuse_too_many_fully_masked(rows_given, kept, training_args)


def fully_masked_reason(training_args: SFTConfig) -> str:
    return f"no trained token within max_length={training_args.max_length}"


def refuse_too_many_fully_masked(rows: int, kept: int, training_args: SFTConfig) -> None:
    if kept < rows / 2:
        raise UserError(
            f"{rows - kept} of {rows} training rows have prompts that fill max_length="
            f"{training_args.max_length} tokens, so truncation leaves them no trained token; raise max_length"
        )


# ---- the stage -----------------------------------------------------------------------------------------


def run(model_args: ModelConfig, data_args: SFTDataArguments, training_args: SFTConfig) -> Path:
    from transformers import set_seed

    from hfgen.models import count_parameters

    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)

    # Model and tokenizer. LoRA wrapping (peft_config) is SFTTrainer's; QLoRA's 4-bit base is loaded here.
    tokenizer = tokenizer_for(model_args, training_args)
    model = load_model(model_args, training_args, tokenizer)
    template = training_args.chat_template_path
    if model_args.use_peft and template and not template.endswith((".jinja", ".j2")):
        # A tokenizer's template and EOS are on `tokenizer` already (its new tokens were refused by the check). TRL's
        # clone_chat_template would also pad the vocabulary to a multiple of 64 with dummy tokens and train them
        # beside LoRA (trainable_token_indices, lm_head in modules_to_save), which peft cannot run: a ValueError
        # ("TrainableTokensLayer wraps an unknown layer type") at the first forward pass.
        model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        training_args.chat_template_path = None

    # Data: SFTTrainer renders conversations with the chat template, tokenizes, builds the loss masks, packs.
    # Data: any SFT layout, as TRL's text, prompt/completion or messages columns.
    train_rows, eval_rows, data_records = load_for_stage(
        data_args, "sft", seed=data_seed(training_args), default_columns={"text": training_args.dataset_text_field}
    )
    training_args.dataset_text_field = "text"  # the text column, whatever the file called it, is `text` now
    if note := completion_loss_instead(train_rows, training_args):
        print(note)
        data_records.setdefault("notes", []).append(note)
    train_rows, eval_rows = splits_without_doubled_bos(train_rows, eval_rows, tokenizer, data_records)
    if not trl_drops_fully_masked(training_args):  # else counted from what SFTTrainer kept (count_fully_masked)
        train_rows = drop_fully_masked(train_rows, tokenizer, training_args, data_records)
    count_trained_tokens(training_args)
    # SFTTrainer turns a Mixture-of-Experts config's output_router_logits on to train the load-balancing loss
    # (router_aux_loss_coef); the saved config says what the model came with (the checkpoints keep SFTTrainer's)
    loaded_router_logits = router_logits_for_training(model)
    trainer = build_trainer(
        PackedRowsCounted,
        output_dir,
        trainer_name="SFTTrainer",
        model=model,
        args=training_args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=tokenizer,
        peft_config=lora_config(model_args, model),
    )
    if trl_drops_fully_masked(training_args):
        count_fully_masked(len(train_rows), trainer, training_args, data_records)
    # How the run's prompts are rendered, for `hfgen generate` / `eval` to prompt its model the same way: in data.json
    # from the start too, for a checkpoint of a run not finished yet (eval.json gets it at the end)
    text_field = training_args.dataset_text_field
    pairs = [split_prompt_response(row, text_field) for row in eval_rows]
    rendered = [isinstance(response, list) for _, response in pairs if response is not None]
    trained_on_chat = any(rendered) if rendered else None  # (no held-out rows: unknown, the default stays)
    data_records["trained_on_chat"] = trained_on_chat
    # Held-out responses, tokenized after SFTTrainer has settled the tokenizer (eos_token, chat template).
    # scored on the tokens training cuts each row to; a packing that cuts none still within max_length (the model
    # reads no longer sequence in training: its fragments are packed apart)
    max_length, keep_end = row_cut(training_args)
    max_length = max_length or training_args.max_length
    held_out = [
        t
        for p, r in pairs
        if r is not None and (t := tokenize_response(tokenizer, p, r, max_length, keep_end=keep_end))
    ]
    # the evaluation rows left out of it (no response token within max_length), counted as the training rows are
    responses = sum(r is not None for _, r in pairs)
    count_dropped(data_records, f"no response token within max_length={max_length}", responses - len(held_out), "eval")
    record(output_dir, data_records)
    if use_row_packing(training_args, trainer.model):
        with loop.gathered(trainer.accelerator, trainer.model) as (whole,):
            apart = keeps_documents_apart(whole)
        if not apart:
            raise UserError(
                f"packing: true, but {model.config.model_type} models do not keep the documents of a packed row apart "
                "(their attention ignores the position_ids that mark where each starts; OPT's, for one), so documents "
                "would attend to each other: set packing: false"
            )
        trainer.data_collator = PackedRowsCollator(
            pad_token_id=tokenizer.pad_token_id,
            return_position_ids=True,
            pad_to_multiple_of=training_args.pad_to_multiple_of,
        )

    sample_prompts = [sample_prompt(p, r) for p, r in pairs[: data_args.num_samples] if r is not None]
    is_main = trainer.is_world_process_zero()
    eval_batch = training_args.per_device_eval_batch_size
    # Starting loss measured outside the Trainer: trainer.evaluate() before train() leaves DDP unwrapped. Every
    # process measures (with whole weights: a sharded engine needs them all), the main one records; in the precision
    # the prepared model computes the final loss in.
    with (
        loop.gathered(trainer.accelerator, trainer.model) as (model,),
        loop.computing_as_prepared(trainer.accelerator, model),
    ):
        initial_loss = response_loss(model, held_out, tokenizer.pad_token_id, eval_batch)

    # Train, then save: the full model, or only the LoRA adapter; with the tokenizer either way (safetensors).
    resume = tracking.trainer_resume(trainer, output_dir)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    # The final loss before the save: a model the last update broke (the guard saw only that step's loss and
    # gradients) or the steps nan_tolerance skipped left unusable is not saved
    with loop.gathered(trainer.accelerator, trainer.model_wrapped) as (whole,):
        final_loss = response_loss(whole, held_out, tokenizer.pad_token_id, eval_batch)
    guard.check_final_model(output_dir, trainer.state.global_step, {"held-out response loss": final_loss})
    restore_router_logits(trainer.model, loaded_router_logits)
    trainer.save_model(str(output_dir))
    if model_args.use_peft and is_main:
        # peft saves the adapter alone: the generation config SFTTrainer set (eos_token among its stop ids, the pad)
        # goes beside it, as in a full run's dir, for `hfgen merge` and other tools (the base's would stop only at
        # its own EOS, past the turn end)
        model.generation_config.save_pretrained(output_dir)
    guard.kill_point("final_save")
    loop.maybe_write_fingerprint(trainer.accelerator, trainer.model, output_dir)  # tests only

    guard.kill_point("eval")
    with loop.gathered(trainer.accelerator, trainer.model_wrapped) as (model,):
        samples = sample_responses(
            model, tokenizer, sample_prompts, data_args.sample_max_new_tokens, training_args.seed
        )
        parameters = count_parameters(model), count_parameters(model, trainable_only=True)
    if is_main:
        tracking.write_jsonl(output_dir / "samples.jsonl", samples)
        tokens = trainer.state.num_input_tokens_seen
        tracking.update_eval(
            output_dir,
            {
                **tracking.best_model_record(trainer),
                "response_loss_initial": initial_loss,
                "response_loss": final_loss,
                "held_out_responses": len(held_out),
                "eos_rate": sum(s["ended_with_eos"] for s in samples) / len(samples) if samples else None,
                "train_loss": tracking.run_train_loss(trainer, result.training_loss, resume),
                "train_tokens": tokens,
                "train_runtime_s": result.metrics["train_runtime"],
                "train_tokens_per_s": tokens / result.metrics["train_runtime"],
                "parameters": parameters[0],
                "trainable_parameters": parameters[1],
                "peft": model_args.use_peft,
                # how the run's prompts were rendered, for `hfgen generate` / `eval` to prompt it the same way
                "trained_on_chat": trained_on_chat,
            },
        )
    return output_dir
