"""PPO-ptx (InstructGPT's pretraining mix): the policy's next-token loss on a second dataset, added to the PPO loss
against the alignment tax. The dataset is plain texts (the pretraining mix: loss on every token) or SFT data in any
layout hfgen.data.formats reads (chat `messages`, prompt/completion, Alpaca, ShareGPT, ...), rendered as the SFT
stage renders it, with the loss on the answers only: PPO then keeps the skills SFT taught. `config` is a
`hfgen.stages.ppo.PPOConfig`."""

from __future__ import annotations

import torch

from hfgen.errors import UserError
from hfgen.rl.rollout import position_ids_from

IGNORE = -100  # label of a token that carries no loss (transformers' ignore_index)


def _conversation_example(tokenizer, messages: list[dict], tools=None) -> tuple[list[int], list[int], bool]:
    """(ids, labels, answers_marked) of a conversation, labelled on the assistant turns as the sft stage's
    assistant_only_loss labels them: by the {% generation %} markers of the chat template, or of TRL's training copy
    of a template without them (`marked_template`: Qwen's, Llama 3's, Gemma's, Phi-3's); with no such template (or
    no chat template: the plain 'User: ...' rendering) labelled everywhere."""
    from hfgen.data.rendering import marked_template, plain_conversation, uses_plain_template

    if uses_plain_template(tokenizer, True):
        ids = tokenizer(plain_conversation(messages))["input_ids"]
        return ids, list(ids), False
    try:
        template = marked_template(tokenizer)
    except ValueError:  # TRL has no marked copy of this template: rendered with its own, unmarked
        template = None
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=template,
        tools=tools,
    )  # fmt: skip
    ids, answer_mask = list(rendered["input_ids"]), rendered["assistant_masks"]
    if not any(answer_mask):
        return ids, list(ids), False
    return ids, [token if keep else IGNORE for token, keep in zip(ids, answer_mask)], True


def _example(tokenizer, row: dict) -> tuple[list[int], list[int], bool]:
    """(ids, labels, answers_marked) of one standard SFT row (hfgen.data.formats, kind 'sft'). Plain text and a text
    prompt/completion are tokenized as the sft stage tokenizes them (`sft.tokenize_response`, TRL's way): EOS after
    the text, so a ptx text learns to end; the completion from where its ids part from the prompt's alone, so a
    prompt ending in a space keeps the completion's first token (' the') in the loss. (A text's doubled BOS is
    removed beforehand, `ptx_examples`.)"""
    from hfgen.data.formats import row_tools
    from hfgen.stages.sft import tokenize_response

    if "messages" in row:
        return _conversation_example(tokenizer, row["messages"], row_tools(row))
    if "text" not in row and isinstance(row["prompt"], list):
        return _conversation_example(tokenizer, row["prompt"] + row["completion"], row_tools(row))
    prompt, completion = ("", row["text"]) if "text" in row else (row["prompt"], row["completion"])
    tokenized = tokenize_response(tokenizer, prompt, completion, None)
    if tokenized is None:  # (an empty completion: nothing to learn)
        return [], [], True
    ids, start = tokenized
    start = start if prompt else 0  # (a text trains whole; its first token is never predicted anyway)
    return ids, [IGNORE] * start + ids[start:], True


def ptx_rows(config, with_report: bool = False):
    """The ptx data's train split in the sft stage's standard columns (`to_standard`), for `ptx_examples` and the
    ppo stage's check; `with_report`: (rows, its DataReport). Its problems name the ptx keys: the loaders' messages name the prompt data's keys
    (dataset_name, dataset_format, dataset_columns), which say nothing about the ptx data. Read once a command
    (`shared_loads`): the stage's check, the check's report and the run each take them."""
    from hfgen.data.prepare import shared_once

    standard, report = shared_once(
        ("ptx_rows", config.ptx_dataset_name, config.ptx_column), lambda: _read_ptx_rows(config), keep=True
    )
    return (standard, report) if with_report else standard


def _read_ptx_rows(config):
    from hfgen.data.formats import none_left, resolve_layout, to_standard
    from hfgen.data.loading import load_raw_as

    name = config.ptx_dataset_name
    splits = load_raw_as("ptx_dataset_name", name)
    split = "train" if "train" in splits else next(iter(splits))
    rows = splits[split]
    columns = None
    if config.ptx_column != "text":
        if config.ptx_column not in rows.column_names:
            raise UserError(f"ptx_dataset_name '{name}' has no column '{config.ptx_column}' (ptx_column)")
        columns = {"text": config.ptx_column}
    try:
        resolve_layout(rows, "sft", None, columns, name)
    except UserError as error:  # it names dataset_format and dataset_columns, the prompt data's keys
        if "fit several" in str(error):  # its columns fit several layouts
            what = "they fit several SFT layouts; keep the columns of one, or set ptx_column to its text column"
        else:
            what = (
                f"neither plain texts in a column '{config.ptx_column}' (ptx_column) nor SFT data in a layout the "
                "sft stage reads (messages, prompt/completion, Alpaca, ShareGPT, ...); set ptx_column to its text column"
            )
        raise UserError(f"ptx_dataset_name '{name}' has columns {rows.column_names}: {what}") from None
    standard, report = to_standard(rows, "sft", columns=columns, source=name)
    if not len(standard):  # (else a check that passed, and a UserError once every model had loaded)
        raise none_left("ptx_dataset_name", name, split, report, "text to learn from")
    return standard, report


def ptx_examples(
    tokenizer, config, records: dict | None = None, rows_checked: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of the ptx data's train split, each cut to ptx_max_length. Examples left without a
    labelled token after the first (a prompt that fills ptx_max_length) are dropped and counted, as the README's
    bad-rows policy says: in `records` under `ptx` (data.json, hfgen check's report), and refused when none or
    fewer than half remain (ptx_max_length is wrong for the data). `rows_checked`: the first rows only (a check)."""
    from hfgen.data.rendering import without_doubled_bos

    name = config.ptx_dataset_name
    rows, report = ptx_rows(config, with_report=True)
    if rows_checked is not None:
        rows = rows.select(range(min(rows_checked, len(rows))))
    rows, note = without_doubled_bos(rows, tokenizer)  # as the sft stage feeds its text rows
    if note:
        print(f"ptx: {note}")
    examples, unmarked = [], 0
    for row in rows:
        ids, labels, answers_marked = _example(tokenizer, row)
        unmarked += not answers_marked
        ids, labels = ids[: config.ptx_max_length], labels[: config.ptx_max_length]
        if any(label != IGNORE for label in labels[1:]):  # the first token is never predicted
            examples.append((ids, labels))
    if unmarked:
        print(
            f"ptx: {unmarked} conversation(s) of '{name}' carry the loss on every token: the tokenizer's chat "
            "template does not mark the assistant's turns with {% generation %}, and TRL has no marked copy of it"
        )
    dropped = len(rows) - len(examples)
    if records is not None:
        from hfgen.data.prepare import count_dropped

        records["ptx"] = report.as_dict()  # (rows the conversion dropped, blank texts, counted there already)
        count_dropped(records, f"no token to learn within ptx_max_length={config.ptx_max_length}", dropped, "ptx")
    if not examples or len(examples) < len(rows) / 2:
        raise UserError(
            f"{dropped} of {len(rows)} examples of ptx_dataset_name '{name}' have no token to learn within "
            f"ptx_max_length={config.ptx_max_length} (their prompt fills it): raise ptx_max_length (or shorten the "
            "prompts)"
        )
    return examples


def draw_ptx(examples: list[tuple[list[int], list[int]]], count: int) -> list[tuple[list[int], list[int]]]:
    """`count` random ptx examples, drawn with the global RNG (which checkpoints restore)."""
    return [examples[i] for i in torch.randint(len(examples), (count,)).tolist()]


def ptx_tokens(picked: list[tuple[list[int], list[int]]]) -> int:
    """The tokens `pretraining_loss` averages over: the labelled ones after each example's first."""
    return sum(label != IGNORE for _, labels in picked for label in labels[1:])


def pretraining_loss(accelerator, trainable, picked: list[tuple[list[int], list[int]]]):
    """The policy's next-token loss on the ptx examples `picked` (`draw_ptx`), over their labelled tokens."""
    batch_size = len(picked)
    width = max(len(ids) for ids, _ in picked)
    input_ids = torch.zeros((batch_size, width), dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    labels = torch.full((batch_size, width), IGNORE, dtype=torch.long)
    for row, (ids, row_labels) in enumerate(picked):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor(row_labels)
    device = accelerator.device
    input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
    policy = accelerator.unwrap_model(trainable).policy
    return policy(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from(attention_mask),
        labels=labels, use_cache=False,
    ).loss  # fmt: skip
