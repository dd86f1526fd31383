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


# Other architectures, as small as the tiny Llama: their module names (gpt2's fused Conv1D `c_attn`, phi3's
# `qkv_proj`), position embeddings (learned in gpt2 and opt), heads (tied or not), norms and attention (gemma2's
# soft-capping) differ from Llama's, and a stage that assumes Llama's breaks on them.
# scripts/architecture_matrix.py runs every text stage on each.
_SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 256}  # fmt: skip
ARCHITECTURES = {
    "llama": {**json.loads((REPO / "recipes/tiny/llama_tiny.json").read_text()), **TINY_LLAMA_SIZES},
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
    "gpt_neox": {"model_type": "gpt_neox", **_SMALL},
    "opt": {"model_type": "opt", **_SMALL, "ffn_dim": 128, "word_embed_proj_dim": 64},
    "qwen2": {"model_type": "qwen2", **_SMALL, "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", **_SMALL, "head_dim": 16},
    "mistral": {"model_type": "mistral", **_SMALL},
    "gemma2": {"model_type": "gemma2", **_SMALL, "head_dim": 16},
    "phi3": {"model_type": "phi3", **_SMALL},
    "olmo2": {"model_type": "olmo2", **_SMALL},
    # Mixture-of-Experts: fused expert weights (peft's all-linear adapts them as target_parameters), router logits
    # and a load-balancing loss (router_aux_loss_coef, 0.001 by default), which TRL's stages switch on
    "mixtral": {"model_type": "mixtral", **_SMALL, "num_local_experts": 4, "num_experts_per_tok": 2},
}


def save_tiny_llama(
    path: Path, pretrain_steps: int = 0, seed: int = 0, tokenizer_name: str = "embedded:tiny-bpe"
) -> Path:
    """A ~110k-parameter Llama with the embedded tokenizer (chat template included), saved into `path`;
    `pretrain_steps` of next-token training on the embedded corpus first (150 steps: ~10 s on CPU, loss ~1.8)."""
    return save_tiny_causal_lm(path, "llama", pretrain_steps, seed, tokenizer_name)


def save_tiny_causal_lm(
    path: Path, architecture: str = "llama", pretrain_steps: int = 0, seed: int = 0,
    tokenizer_name: str = "embedded:tiny-bpe",
) -> Path:  # fmt: skip
    """A tiny causal LM of one of `ARCHITECTURES` with the embedded tokenizer, saved into `path` (see
    `save_tiny_llama`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hfgen.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_name)
    config = AutoConfig.for_model(**ARCHITECTURES[architecture])
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if architecture != "llama":
        config.bos_token_id = None  # gpt2's and opt's defaults are ids of their own, larger vocabularies
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if architecture != "llama":
        model.generation_config.bos_token_id = None
    if pretrain_steps:
        pretrain(model, tokenizer, pretrain_steps)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_gpt2_without_pad(path: Path) -> Path:
    """A tiny random GPT-2 whose tokenizer has no pad token, as GPT-2's and Llama 3's have none: hfgen adds one when
    it loads it, and the model's embeddings grow by a row (which a LoRA run saves with its adapter). The embedded
    corpus's BPE and hfgen's chat template otherwise."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from hfgen.data import embedded
    from hfgen.models import CHAT_TEMPLATE, EOS, ROLE_TOKENS

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(embedded.tokenizer_training_text(), trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS, *ROLE_TOKENS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS, additional_special_tokens=list(ROLE_TOKENS)
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = AutoConfig.for_model(**ARCHITECTURES["gpt2"])
    config.vocab_size, config.bos_token_id, config.eos_token_id = len(tokenizer), None, tokenizer.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = None, tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


BOS = "<|begin_of_text|>"


def bos_adding_tokenizer():
    """The embedded tokenizer putting a BOS of its own in front of every text, as Llama 3's (Gemma's, Llama 2's)
    does: text rendered with such a model's chat template already starts with that BOS."""
    from tokenizers.processors import TemplateProcessing

    from hfgen.models import build_embedded_tokenizer

    tokenizer = build_embedded_tokenizer()
    tokenizer.add_special_tokens({"bos_token": BOS})
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tokenizer.bos_token_id)]
    )
    return tokenizer


def save_tiny_llama_adding_bos(path: Path) -> Path:
    """A tiny random Llama whose tokenizer adds a BOS to every text (`bos_adding_tokenizer`), saved into `path`."""
    bos_adding_tokenizer().save_pretrained(path)
    return save_tiny_llama(path, tokenizer_name=str(path))


def save_tiny_llama_ending_turns_apart(path: Path) -> Path:
    """A tiny random Llama whose chat template ends assistant turns with a token that is not its EOS, as Qwen2.5
    base's (turns end <|im_end|>, EOS and generation_config eos <|endoftext|>): the embedded tokenizer with an EOS
    '<|endoftext|>' of its own, the template's turns still ending with '<|end|>'."""
    from hfgen.models import build_embedded_tokenizer

    tokenizer = build_embedded_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    tokenizer.save_pretrained(path)
    return save_tiny_llama(path, tokenizer_name=str(path))


def rendered_with_bos(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    """`messages` as text rendered with a Llama 3 chat template: the BOS first, then the turns."""
    return tokenizer.bos_token + tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


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
