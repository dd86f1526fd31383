"""Tiny models for tests, built in code: the repo's tiny Llama config shrunk further, with the embedded tokenizer,
random or briefly pretrained on the embedded corpus, saved with save_pretrained like a real run's output."""

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_LLAMA_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


def save_tiny_llama(
    path: Path, pretrain_steps: int = 0, seed: int = 0, tokenizer_name: str = "embedded:tiny-bpe"
) -> Path:
    """A ~110k-parameter Llama with the embedded tokenizer (chat template included), saved into `path`;
    `pretrain_steps` of next-token training on the embedded corpus first (150 steps: ~10 s on CPU, loss ~1.8)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hfgen.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_name)
    values = {**json.loads((REPO / "recipes/tiny/llama_tiny.json").read_text()), **TINY_LLAMA_SIZES}
    config = AutoConfig.for_model(**values)
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if pretrain_steps:
        pretrain(model, tokenizer, pretrain_steps)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def pretrain(model, tokenizer, steps: int, block_size: int = 64, batch_size: int = 16) -> None:
    """Next-token training on packed blocks of the embedded corpus (AdamW, linear decay)."""
    import torch

    from hfgen.data.embedded import generate_rows

    ids = [
        t
        for row in generate_rows("corpus", "train")
        for t in tokenizer(row["text"])["input_ids"] + [tokenizer.eos_token_id]
    ]
    blocks = torch.tensor(ids[: len(ids) // block_size * block_size]).view(-1, block_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()


_SESSION_MODELS: dict[str, Path] = {}


def pretrained_tiny_llama(tmp_path_factory) -> Path:
    """The briefly pretrained tiny Llama, built once per test session and shared by the test modules that ask."""
    if "pretrained" not in _SESSION_MODELS:
        _SESSION_MODELS["pretrained"] = save_tiny_llama(tmp_path_factory.mktemp("tiny_lm"), pretrain_steps=150)
    return _SESSION_MODELS["pretrained"]
