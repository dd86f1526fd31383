"""PPO-ptx (InstructGPT's pretraining mix): the policy's next-token loss on pretraining texts, added to the PPO loss
against the alignment tax. `config` is a `hfgen.stages.ppo.PPOConfig`."""

from __future__ import annotations

import torch

from hfgen.errors import UserError
from hfgen.rl.rollout import position_ids_from


def tokenize_ptx_texts(tokenizer, config) -> list[list[int]]:
    """Token ids of the pretraining texts for the ptx loss, each cut to ptx_max_length."""
    from hfgen.data.loading import load_raw

    splits = load_raw(config.ptx_dataset_name)
    rows = splits["train"] if "train" in splits else splits[next(iter(splits))]
    if config.ptx_column not in rows.column_names:
        raise UserError(f"ptx_dataset_name '{config.ptx_dataset_name}' has no column '{config.ptx_column}'")
    ids = tokenizer(list(rows[config.ptx_column]), truncation=True, max_length=config.ptx_max_length)["input_ids"]
    return [text for text in ids if len(text) > 1]


def pretraining_loss(accelerator, trainable, texts: list[list[int]], batch_size: int) -> torch.Tensor:
    """The policy's next-token loss on `batch_size` random pretraining texts (drawn with the global RNG, which
    checkpoints restore)."""
    picked = torch.randint(len(texts), (batch_size,)).tolist()
    width = max(len(texts[i]) for i in picked)
    pad = 0
    input_ids = torch.full((batch_size, width), pad, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    for row, i in enumerate(picked):
        input_ids[row, : len(texts[i])] = torch.tensor(texts[i])
        attention_mask[row, : len(texts[i])] = 1
    input_ids, attention_mask = input_ids.to(accelerator.device), attention_mask.to(accelerator.device)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    policy = accelerator.unwrap_model(trainable).policy
    return policy(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from(attention_mask),
        labels=labels, use_cache=False,
    ).loss  # fmt: skip
