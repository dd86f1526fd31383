"""Reward model from preference pairs (Bradley-Terry), on TRL's `RewardTrainer`.

    hfgen train recipes/tiny/reward.yaml
    ACCELERATE_USE_CPU=true accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml scripts/train.py recipes/tiny/reward.yaml

The model is an `AutoModelForSequenceClassification` with one label: a new linear `score` head on the starting
model's backbone, read at the last non-pad token (`pad_token_id` is set in its config). Training minimises
-log sigmoid(r(chosen) - r(rejected)) over pairs that share a prompt. Data: `chosen`/`rejected`, with or without a
separate `prompt`, plain text or conversational (rendered with the chat template, exactly as SFT and PPO see it).

The starting model is a base model, an SFT output dir, or an SFT LoRA adapter dir (merged into its base first).
With `use_peft`, LoRA trains adapters plus the whole new head (task type SEQ_CLS); the adapters are merged before
saving, so the output is always one plain classifier dir (safetensors + tokenizer): PPO loads it whole, as the
reward model and as the value model's starting point. eval.json holds the held-out pairwise accuracy and the mean
margin r(chosen) - r(rejected), before and after training.
"""

from __future__ import annotations

from pathlib import Path

from trl import ModelConfig, RewardConfig

from hfgen import guard, loop, tracking
from hfgen.data.formats import REWARD_COLUMNS, tools_problems
from hfgen.data.prepare import (
    TextDataArguments,
    check_text_data,
    data_seed,
    data_source,
    drop_and_count,
    load_for_stage,
    record,
)
from hfgen.data.rendering import sequence_ids, splits_without_doubled_bos, uses_plain_template
from hfgen.errors import UserError
from hfgen.finetune import (
    build_trainer,
    check_model_config,
    count_trained_tokens,
    load_model,
    lora_config,
    tokenizer_for,
)

# TRL's ModelConfig (LoRA/QLoRA keys under TRL's names) rather than hfgen's ModelArguments, which shares three of
# its fields; none of these three dataclasses share a field, so every key has one meaning. trust_remote_code is
# RewardConfig's.
ARGUMENTS = (ModelConfig, TextDataArguments, RewardConfig)
MAX_DROPPED_FOR_LENGTH = 0.5  # more pairs than this over max_length: the limit is wrong for the data


def check(model_args: ModelConfig, data_args: TextDataArguments, training_args: RewardConfig) -> list[str]:
    problems = check_model_config(model_args, training_args.trust_remote_code, task_type="SEQ_CLS")
    loaded, data_problems = check_text_data(
        data_args, "preference", other_columns=REWARD_COLUMNS, seed=data_seed(training_args)
    )
    problems += data_problems
    if loaded:  # its pairs are scored without function definitions
        problems += tools_problems(loaded[0], "reward", data_source(data_args))
    if loaded and not problems:  # pairs over max_length, found here rather than once the model has loaded
        from hfgen.data.loading import ROWS_CHECKED

        try:
            tokenizer = tokenizer_for(model_args, training_args)  # the recipe's eos_token and chat template
        except UserError as error:
            return [*problems, str(error)]
        if training_args.pad_token and training_args.pad_token == tokenizer.eos_token:
            return [
                *problems,
                f"pad_token '{training_args.pad_token}' is the EOS: the classifier reads each sequence's last token "
                "that is not the pad, which would be the one before the closing EOS, and the reward model could not "
                "tell a finished answer from a cut-off one; leave pad_token unset (a pad of its own is added)",
            ]
        from hfgen.stages.sft import new_template_tokens_problems

        if new_tokens := new_template_tokens_problems(model_args, training_args, tokenizer):
            return [*problems, *new_tokens]
        from hfgen.models import within_learned_positions

        # at the length training will cut at: lowered to a model's learned positions (GPT-2's: 1024 passed here,
        # then the run refused once the model had loaded)
        max_length = within_learned_positions(model_args.model_name_or_path, training_args).max_length
        for rows, split in zip(loaded[:2], ("train", "eval")):
            try:
                tokenized_pairs(rows.select(range(min(ROWS_CHECKED, len(rows)))), tokenizer, max_length, {},
                                split)  # fmt: skip
            except UserError as error:
                problems.append(str(error))
    return problems


# ---- held-out pairs: accuracy and margin ---------------------------------------------------------------


def tokenize_pair(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """(chosen ids, rejected ids) of one pair, tokenized as RewardTrainer does: the prompt joined to each response,
    conversations through the chat template (a plain template when the tokenizer has none, as encoders), plain
    text with EOS appended when the tokenizer has one."""
    prompt = row.get("prompt")
    return sequence_ids(tokenizer, prompt, row["chosen"]), sequence_ids(tokenizer, prompt, row["rejected"])


def tokenized_pairs(rows, tokenizer, max_length: int | None, records: dict, split: str):
    """`chosen_ids`/`rejected_ids` columns (RewardTrainer then skips its own tokenization, which needs an EOS
    token), pairs longer than max_length dropped and counted; refused when none or too few fit."""
    pairs = [tokenize_pair(tokenizer, row) for row in rows]
    fits = [max_length is None or max(len(c), len(r)) <= max_length for c, r in pairs]
    rows = rows.add_column("chosen_ids", [c for c, _ in pairs]).add_column("rejected_ids", [r for _, r in pairs])
    kept = drop_and_count(rows, fits, records, f"longer than max_length={max_length}", split)
    if len(kept) == 0 or len(kept) < (1 - MAX_DROPPED_FOR_LENGTH) * len(rows):
        raise UserError(
            f"{len(rows) - len(kept)} of {len(rows)} {split} pairs are longer than max_length={max_length} tokens; "
            "raise max_length (or shorten the data)"
        )
    return kept


def scores(model, sequences: list[list[int]], pad_token_id: int, batch_size: int) -> list[float]:
    """The reward model's scalar for each token sequence (right-padded batches)."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    results = []
    with torch.inference_mode():
        for begin in range(0, len(sequences), batch_size):
            chunk = sequences[begin : begin + batch_size]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, ids in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            results += logits[:, 0].float().tolist()
    return results


def pairwise_eval(model, tokenizer, pairs: list[tuple[list[int], list[int]]], batch_size: int) -> dict[str, float]:
    """Accuracy (chosen scored strictly above rejected) and mean margin over held-out pairs."""
    chosen = scores(model, [c for c, _ in pairs], tokenizer.pad_token_id, batch_size)
    rejected = scores(model, [r for _, r in pairs], tokenizer.pad_token_id, batch_size)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": sum(margins) / len(margins),
            "score_max": max(chosen + rejected)}  # fmt: skip


# ---- the stage -----------------------------------------------------------------------------------------


BATCH_MEAN_KEYS = {"eval_accuracy": "eval_batch_mean_accuracy", "eval_margin": "eval_batch_mean_margin"}


def batch_mean_names():
    """A callback that renames TRL's logged held-out accuracy and margin (metrics.jsonl): RewardTrainer logs the mean
    of the evaluation batches' means, which is not the per-pair figure eval.json records when the last batch is
    smaller (0.8125 logged against 0.7 of 10 pairs in batches of 8 and 2). Placed before hfgen's records."""
    from transformers import TrainerCallback

    class BatchMeanNames(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key, name in BATCH_MEAN_KEYS.items():
                if logs and key in logs:
                    logs[name] = logs.pop(key)

    return BatchMeanNames()


def peft_copy(peft_model):
    """An untrained copy of a LoRA classifier's architecture (same base config, same adapters), built in full on this
    process: outside ZeRO-3's `zero.Init`, which would partition it over processes that are not building it."""
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.modeling_utils import set_zero3_state

    base = peft_model.get_base_model()
    with set_zero3_state():  # (transformers' own switch: "zero.Init has been entered already")
        copy = AutoModelForSequenceClassification.from_config(base.config, dtype=base.dtype)
    return get_peft_model(copy, peft_model.peft_config["default"])


def run(model_args: ModelConfig, data_args: TextDataArguments, training_args: RewardConfig) -> Path:
    from accelerate.utils import is_peft_model
    from transformers import set_seed
    from trl import RewardTrainer

    from hfgen.models import count_parameters, pad_apart_from_eos

    set_seed(training_args.seed)  # the new score head is drawn at random
    output_dir = Path(training_args.output_dir)

    # Model: a one-label sequence classifier on the starting model's backbone.
    # With the recipe's eos_token and chat_template_path applied here, before the pairs are tokenized (RewardTrainer
    # applies them in its constructor, after: the pairs were rendered with the model's own template and EOS)
    tokenizer = tokenizer_for(model_args, training_args)
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        # the classifier reads the last token that is not the pad: the one before the closing EOS, so the model
        # would never learn (nor PPO, GRPO and `hfgen eval` see) whether an answer ended or was cut off
        print(f"the tokenizer's pad token is its EOS ('{tokenizer.eos_token}'): adding a pad token of its own")
        pad_apart_from_eos(tokenizer)
    model = load_model(model_args, training_args, tokenizer, sequence_classifier=True)

    # Data: any preference layout, as prompt+chosen and prompt+rejected token ids; pairs over max_length dropped.
    train_rows, eval_rows, data_records = load_for_stage(
        data_args, "preference", seed=data_seed(training_args), other_columns=REWARD_COLUMNS
    )
    if "margin" in train_rows.column_names:
        data_records["margin"] = (
            "column 'margin' used in the loss: -log sigmoid(r(chosen) - r(rejected) - margin) (TRL's RewardTrainer)"
        )
    # plain text is tokenized with the special tokens; its sequences open with the prompt, or the responses
    opening = ("prompt",) if "prompt" in train_rows.column_names else ("chosen", "rejected")
    train_rows, eval_rows = splits_without_doubled_bos(train_rows, eval_rows, tokenizer, data_records, opening)
    conversational = isinstance(train_rows[0]["chosen"], list)
    if uses_plain_template(tokenizer, conversational):
        data_records["rendering"] = "plain template ('User: ...', 'Assistant: ...'): the tokenizer has no chat template"
    train_rows = tokenized_pairs(train_rows, tokenizer, training_args.max_length, data_records, "train")
    eval_rows = tokenized_pairs(eval_rows, tokenizer, training_args.max_length, data_records, "eval")
    record(output_dir, data_records)
    count_trained_tokens(training_args)
    # SEQ_CLS: PEFT then trains and saves the new score head in full (modules_to_save), beside the adapters.
    peft_config = lora_config(model_args, model, task_type="SEQ_CLS")
    trainer = build_trainer(
        RewardTrainer,
        output_dir,
        model=model,
        args=training_args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[batch_mean_names()],
    )

    held_out = list(zip(eval_rows["chosen_ids"], eval_rows["rejected_ids"]))
    is_main = trainer.is_world_process_zero()
    eval_batch = training_args.per_device_eval_batch_size
    # Measured outside the Trainer: trainer.evaluate() before train() leaves DDP unwrapped. Every process, whole
    # weights, in the precision the prepared model computes the final scores in.
    with (
        loop.gathered(trainer.accelerator, trainer.model) as (model,),
        loop.computing_as_prepared(trainer.accelerator, model),
    ):
        initial = pairwise_eval(model, tokenizer, held_out, eval_batch)

    resume = tracking.trainer_resume(trainer, output_dir)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    # The trained model's held-out scores before the save: a model the last update broke (the guard saw only that
    # step's loss and gradients) scored NaN, and was saved COMPLETE for PPO to train on. A non-finite score makes
    # the margin non-finite. (LoRA: the same scores unmerged.)
    with loop.gathered(trainer.accelerator, trainer.model_wrapped) as (model,):
        final = pairwise_eval(model, tokenizer, held_out, eval_batch)
        parameters = count_parameters(model)
    guard.check_final_model(output_dir, trainer.state.global_step, {"held-out score margin": final["margin"]})

    loop.maybe_write_fingerprint(trainer.accelerator, trainer.model, output_dir)  # tests only
    # Save one plain classifier: LoRA adapters (and the trained head copy) merged into the backbone, on the main
    # process from whole weights (gathered into a copy there under ZeRO-3 and FSDP2).
    if is_peft_model(trainer.model):
        whole = loop.whole_on_main(trainer.accelerator, trainer.model_wrapped, lambda: peft_copy(trainer.model))
        if is_main:
            merged = whole.merge_and_unload()
            merged.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
            parameters = count_parameters(merged)
    else:
        trainer.save_model(str(output_dir))
    guard.kill_point("final_save")

    guard.kill_point("eval")
    if is_main:
        tokens = trainer.state.num_input_tokens_seen
        tracking.update_eval(
            output_dir,
            {
                **tracking.best_model_record(trainer),
                "accuracy_initial": initial["accuracy"],
                "margin_initial": initial["margin"],
                "accuracy": final["accuracy"],
                "margin": final["margin"],
                "score_max": final["score_max"],  # PPO's reward-hacking monitor: scores above it are suspect
                "held_out_pairs": len(held_out),
                "train_loss": tracking.run_train_loss(trainer, result.training_loss, resume),
                "train_tokens": tokens,
                "train_runtime_s": result.metrics["train_runtime"],
                "train_tokens_per_s": tokens / result.metrics["train_runtime"],
                "parameters": parameters,
                "peft": model_args.use_peft,
            },
        )
    return output_dir
