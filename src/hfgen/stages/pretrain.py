"""Causal-LM pretraining, from a config (scratch) or a pretrained model (continued pretraining).

    hfgen train recipes/tiny/pretrain.yaml --output_dir outputs/tiny/pretrain
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml scripts/train.py recipes/tiny/pretrain.yaml

Texts are tokenized, joined with EOS between documents and cut into `block_size` blocks (packing), so no
compute is spent on padding. Training is transformers' Trainer. Validation loss and perplexity at step 0
and at the end, with a unigram model's perplexity as a floor to beat, go to OUTPUT_DIR/eval.json.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments

from hfgen import guard, loop, tracking
from hfgen.data.prepare import TextDataArguments, check_text_data, data_seed, load_for_stage, record
from hfgen.data.rendering import splits_without_doubled_bos
from hfgen.errors import UserError
from hfgen.models import ModelArguments, check_config_file, check_model_source, not_a_causal_lm

SAMPLE_PROMPTS = ("the cat", "a happy", "the red car", "the river")
PACK_BATCH = 1000  # documents tokenized (and their blocks cut) by one call of a map


@dataclass
class PretrainDataArguments(TextDataArguments):
    text_column: str = field(default="text", metadata={"help": "Column holding the raw text."})
    block_size: int = field(default=128, metadata={"help": "Tokens per packed training sequence."})
    train_tokenizer: bool = field(
        default=False,
        metadata={
            "help": "From scratch: train a byte-level BPE tokenizer of vocab_size tokens on the training split "
            "(instead of tokenizer_name); saved with the model."
        },
    )
    vocab_size: int = field(default=8000, metadata={"help": "Tokens of the tokenizer train_tokenizer trains."})


ARGUMENTS = (ModelArguments, PretrainDataArguments, TrainingArguments)
# upstream keys with no counterpart here (a spelling hint sent use_peft to use_cpu): `recipe.build_recipe`
KEYS_WITHOUT_COUNTERPART = {
    "use_peft": "pretraining trains every weight (LoRA is in the sft, reward, dpo, kto, orpo, simpo, ppo, grpo and rloo "
    "stages)",
}


def check(model_args: ModelArguments, data_args: PretrainDataArguments, training_args: TrainingArguments) -> list[str]:
    problems = []
    if bool(model_args.model_name_or_path) == bool(model_args.config_name):
        problems.append("set exactly one of model_name_or_path (continue pretraining) or config_name (from scratch)")
    if model_args.config_name and not model_args.tokenizer_name and not data_args.train_tokenizer:
        problems.append(
            "config_name (from scratch) needs tokenizer_name (e.g. embedded:tiny-bpe) or train_tokenizer: true"
        )
    if data_args.train_tokenizer and (model_args.tokenizer_name or model_args.model_name_or_path):
        problems.append(
            "train_tokenizer trains a new tokenizer for a model from scratch (config_name): drop tokenizer_name "
            "and model_name_or_path, or train_tokenizer"
        )
    if data_args.train_tokenizer and data_args.vocab_size < 300:
        problems.append(f"vocab_size must be at least 300 (256 bytes + special tokens), got {data_args.vocab_size}")
    source_problems = check_model_source("model_name_or_path", model_args.model_name_or_path)
    problems += source_problems or not_a_causal_lm(
        "model_name_or_path", model_args.model_name_or_path, model_args.trust_remote_code
    )
    problems += check_config_file("config_name", model_args.config_name, transformers_config=True)
    problems += check_model_source("tokenizer_name", model_args.tokenizer_name)
    if data_args.block_size < 2:
        problems.append(f"block_size must be at least 2, got {data_args.block_size}")
    return (
        problems + check_text_data(data_args, "text", {"text": data_args.text_column}, seed=data_seed(training_args))[1]
    )


def pack(dataset, tokenizer, text_column: str, block_size: int):
    """Tokenize, append EOS to each document that does not end with it already (text rendered with a chat template
    ends with the template's EOS, as TRL's SFT checks too), concatenate the whole text, and cut it into `block_size`
    blocks (the last remainder, shorter than a block, dropped). Blocks run across the batches of PACK_BATCH
    documents the maps work in: cut within each batch, each batch's remainder was lost (up to half of a corpus of
    short lines under a long block_size). Both maps are cached beside the text (a next start reuses them)."""
    import numpy as np
    import pyarrow.compute as pc
    from datasets.fingerprint import Hasher

    if tokenizer.eos_token_id is None:
        raise UserError(
            f"the tokenizer of '{tokenizer.name_or_path}' has no EOS token (a tokenizer.json without "
            "tokenizer_config.json?), and pretraining joins documents with it: give the tokenizer's "
            "tokenizer_config.json an eos_token, or the model's config.json an eos_token_id"
        )

    def tokenize(batch):
        eos, documents = [tokenizer.eos_token_id], []
        for text in batch[text_column]:
            document = tokenizer(text)["input_ids"]
            documents.append(document if document[-1:] == eos else document + eos)
        return {"input_ids": documents}

    documents = dataset.map(
        tokenize, batched=True, batch_size=PACK_BATCH, remove_columns=dataset.column_names, desc="tokenizing"
    )
    lengths = pc.list_value_length(documents.data.column("input_ids")).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])  # where each document starts in the text
    total = int(offsets[-1])

    def cut(batch, indices):
        """The blocks that start within this batch's documents, read on into the next ones where they run on."""
        first, last = indices[0], indices[-1] + 1
        begin, end = int(offsets[first]), int(offsets[last])
        starts = range(-(-begin // block_size) * block_size, min(end, total - block_size + 1), block_size)
        if not starts:
            return {"input_ids": [], "labels": []}
        ids = [token for document in batch["input_ids"] for token in document]
        needed = starts[-1] + block_size
        if needed > end:  # the last block runs on into the documents after this batch
            upto = int(np.searchsorted(offsets, needed, side="left"))
            ids += [token for document in documents[last:upto]["input_ids"] for token in document]
        blocks = [ids[at - begin : at - begin + block_size] for at in starts]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    return documents.map(
        cut, batched=True, batch_size=PACK_BATCH, with_indices=True, remove_columns=documents.column_names,
        new_fingerprint=Hasher.hash((documents._fingerprint, block_size, "blocks across batches")), desc="packing",
    )  # fmt: skip


def unigram_perplexity(train_blocks, eval_blocks, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on the training tokens: the floor to beat."""
    counts = Counter(token for block in train_blocks["input_ids"] for token in block)
    total = sum(counts.values()) + vocab_size
    eval_tokens = [token for block in eval_blocks["input_ids"] for token in block[1:]]  # the tokens the LM predicts
    nll = -sum(math.log((counts[t] + 1) / total) for t in eval_tokens) / len(eval_tokens)
    return math.exp(nll)


def mean_loss(model, blocks, batch_size: int) -> float:
    """Mean next-token loss over packed blocks (all of equal length, so the mean of batch means is exact)."""
    import torch

    model.eval()
    losses = []
    with torch.inference_mode():
        for start in range(0, len(blocks), batch_size):
            batch = torch.tensor(blocks[start : start + batch_size]["input_ids"], device=model.device)
            losses.append(model(input_ids=batch, labels=batch).loss.item() * len(batch))
    return sum(losses) / len(blocks)


def run(model_args: ModelArguments, data_args: PretrainDataArguments, training_args: TrainingArguments) -> Path:
    from transformers import Trainer, set_seed

    from hfgen.finetune import hfgen_trainer, keep_float32_weights
    from hfgen.generate import generate_text, prompt_seeds
    from hfgen.models import (
        adapter_base,
        build_causal_lm_from_config,
        fit_embeddings,
        load_causal_lm,
        load_tokenizer,
        merged,
        position_limit,
        train_bpe_tokenizer,
    )

    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)

    # Data: any text layout arrives as a `text` column, empty lines dropped and counted.
    train_text, eval_text, data_records = load_for_stage(
        data_args, "text", seed=data_seed(training_args), default_columns={"text": data_args.text_column}
    )

    # Model and tokenizer: from scratch (config + tokenizer) or continued from a pretrained model.
    if data_args.train_tokenizer:
        with training_args.main_process_first(desc="tokenizer"):  # deterministic: every process trains the same one
            tokenizer = train_bpe_tokenizer(train_text["text"], data_args.vocab_size)
    else:
        tokenizer = load_tokenizer(
            model_args.tokenizer_name or model_args.model_name_or_path, model_args.trust_remote_code
        )
    if model_args.config_name:
        model = build_causal_lm_from_config(model_args.config_name, tokenizer, model_args)
    else:
        model = load_causal_lm(
            model_args.model_name_or_path,
            model_args.dtype,
            model_args.trust_remote_code,
            model_args.attn_implementation,
        )
        if adapter_base(model_args.model_name_or_path):  # an earlier LoRA run: base+adapter, trained in full
            model = merged(model, f"model_name_or_path '{model_args.model_name_or_path}'").requires_grad_(True)
        fit_embeddings(model, tokenizer)  # `tokenizer_name` may name another (or load_tokenizer added a pad token)
    # dtype bfloat16/float16: float32 weights under mixed precision, as the other stages train (an AdamW update
    # smaller than 1/256 of a weight is lost in bfloat16)
    keep_float32_weights(model, training_args, lora=False)
    limit = position_limit(model.config)
    if limit and data_args.block_size > limit:
        raise UserError(
            f"block_size {data_args.block_size} is more than the {limit} positions the model learns "
            f"({model.config.model_type}'s max_position_embeddings): lower block_size to at most {limit}"
        )

    # text rendered with a chat template starts with the BOS the tokenizer adds itself: kept once, as SFT keeps it
    train_text, eval_text = splits_without_doubled_bos(train_text, eval_text, tokenizer, data_records)
    record(output_dir, data_records)
    with training_args.main_process_first(desc="packing"):
        train_blocks = pack(train_text, tokenizer, "text", data_args.block_size)
        eval_blocks = pack(eval_text, tokenizer, "text", data_args.block_size)
    for split, blocks, text in (("training", train_blocks, train_text), ("evaluation", eval_blocks, eval_text)):
        if len(blocks) == 0:
            tokens = sum(len(ids) + 1 for ids in tokenizer(list(text["text"]))["input_ids"])
            raise UserError(
                f"the {split} text of '{data_args.dataset_name or 'the mixture'}' gives no block of "
                f"block_size={data_args.block_size} tokens: it has {tokens} tokens in {len(text)} documents; lower "
                "block_size or give more (or longer) text"
            )

    # Trainer counts the tokens it feeds (train_tokens): an epoch's short last batch counts as what it holds.
    # "all", not finetune's "non_padding": blocks hold no padding, and their document-joining EOS may be the pad id.
    training_args.include_num_input_tokens_seen = "all"
    trainer = hfgen_trainer(Trainer)(
        model=model,
        args=training_args,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        processing_class=tokenizer,
        callbacks=tracking.trainer_callbacks(output_dir),
    )
    # Step-0 loss measured outside the Trainer: calling trainer.evaluate() before trainer.train() leaves the
    # model unwrapped by DDP in transformers 5.23 (ranks then drift apart), so it must not touch the trainer.
    # Whole weights under ZeRO-3, in the precision the prepared model computes the final loss in.
    with loop.gathered(trainer.accelerator, model) as (whole,), loop.computing_as_prepared(trainer.accelerator, whole):
        initial_loss = mean_loss(whole, eval_blocks, training_args.per_device_eval_batch_size)
    resume = tracking.trainer_resume(trainer, output_dir)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    with loop.gathered(trainer.accelerator, trainer.model_wrapped) as (whole,):  # every process: sharded engines
        # The final loss as the initial one, over every held-out block once: trainer.evaluate() on N processes
        # averages batch means, and accelerate pads the last process's batch with copies of blocks when they do
        # not split evenly over processes x per_device_eval_batch_size. Measured before the save: a model the last
        # update broke (the guard saw only that step's loss and gradients) is not saved.
        final_loss = mean_loss(whole, eval_blocks, training_args.per_device_eval_batch_size)
    guard.check_final_model(output_dir, trainer.state.global_step, {"held-out loss": final_loss})
    trainer.save_model(str(output_dir))  # safetensors, with config and tokenizer
    guard.kill_point("final_save")
    loop.maybe_write_fingerprint(trainer.accelerator, trainer.model, output_dir)  # tests only
    guard.kill_point("eval")  # (trainer.evaluate()'s callback held it when the final loss came from there)
    with loop.gathered(trainer.accelerator, trainer.model_wrapped) as (whole,):
        # each prompt from its own seed, as `hfgen generate --seed` draws it: not from wherever training left the
        # global generator (a sample `hfgen generate` of the saved model could not reproduce)
        samples = generate_text(
            whole, tokenizer, list(SAMPLE_PROMPTS), max_new_tokens=24, temperature=0.7,
            seeds=prompt_seeds(training_args.seed, list(SAMPLE_PROMPTS)),
        )  # fmt: skip
        parameters = sum(p.numel() for p in whole.parameters())
    best = tracking.best_model_record(trainer)
    # the Trainer's periodic evaluation may have logged the last step already (eval_strategy steps, the last step a
    # multiple of eval_steps): a second row for it gave the curve two points there (eval.json has the exact figure)
    evaluated_last = any(
        row.get("step") == result.global_step and "eval_loss" in row for row in trainer.state.log_history
    )
    if best.get("best_global_step", result.global_step) == result.global_step and not evaluated_last:
        # metrics.jsonl's last row, as trainer.evaluate() logged it; not for an earlier step's weights (load_best_
        # model_at_end), whose loss at the last step made the curve jump back (eval.json names their step)
        trainer.log({"eval_loss": final_loss})
    if trainer.is_world_process_zero():
        tracking.write_jsonl(
            output_dir / "samples.jsonl", [{"prompt": p, "response": s[0]} for p, s in zip(SAMPLE_PROMPTS, samples)]
        )
        tracking.update_eval(
            output_dir,
            {
                **best,
                "eval_loss_initial": initial_loss,
                "perplexity_initial": math.exp(initial_loss),
                "eval_loss": final_loss,
                "perplexity": math.exp(final_loss),
                "unigram_perplexity": unigram_perplexity(train_blocks, eval_blocks, len(tokenizer)),
                "train_tokens": trainer.state.num_input_tokens_seen,
                "train_runtime_s": result.metrics["train_runtime"],
                "parameters": parameters,
            },
        )
    return output_dir
