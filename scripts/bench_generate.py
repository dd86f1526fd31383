"""Generation throughput of hfgen's generation path vs plain `model.generate`, same model, same run.

    python scripts/bench_generate.py [--model DIR | --config recipes/tiny/llama_tiny.json] [--batch_size 16]
                                     [--new_tokens 64] [--repeats 5] [--device cuda] [--dtype bfloat16]

hfgen's path is `hfgen.generate.generate_text`, which `hfgen generate`, `hfgen eval` and the stages' samples
use. The baseline is what a user writes by hand: tokenize with left padding, `model.generate`, decode the new
tokens. Both get the same prompts, batch size and sampling settings, and exactly `--new_tokens` new tokens
(min_new_tokens = max_new_tokens), so neither gains by stopping early at EOS. Without --model the model is a
Llama built from --config with random weights and the embedded tokenizer. Repeats alternate the two and keep
each one's best, which damps noise from other processes. Prints tokens/s of both at batch 1 and at
--batch_size, and the ratio hfgen/plain (goal >= 0.95).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ("the cat", "a happy dog", "the red car is", "the river runs by", "describe the lamp.", "the moon")


def load_model(args):
    from hfgen.models import ModelArguments, build_causal_lm_from_config, load_causal_lm, load_tokenizer

    if args.model:
        tokenizer, model = load_tokenizer(args.model), load_causal_lm(args.model, dtype=args.dtype)
    else:
        torch.manual_seed(0)
        tokenizer = load_tokenizer("embedded:tiny-bpe")
        model = build_causal_lm_from_config(args.config, tokenizer, ModelArguments())
        if args.dtype != "auto":
            model = model.to(getattr(torch, args.dtype))
    return tokenizer, model.to(args.device).eval()


def plain_generate(model, tokenizer, prompts, new_tokens: int, sampling: dict) -> list[str]:
    """The hand-written baseline."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    with torch.inference_mode():
        output = model.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, **sampling,
        )  # fmt: skip
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def hfgen_generate(model, tokenizer, prompts, new_tokens: int, sampling: dict) -> list[list[str]]:
    from hfgen.generate import generate_text

    return generate_text(
        model, tokenizer, prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        temperature=sampling["temperature"], top_p=sampling["top_p"], batch_size=len(prompts),
    )  # fmt: skip


def timed(function, *args) -> float:
    from hfgen.evaluation.speed import synchronize

    device = args[0].device
    synchronize(device)
    start = time.perf_counter()
    function(*args)
    synchronize(device)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model dir or hub id (default: a random Llama from --config)")
    parser.add_argument("--config", default=str(REPO / "recipes/tiny/llama_tiny.json"))
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    tokenizer, model = load_model(args)
    sampling = {"do_sample": True, "temperature": 0.8, "top_p": 0.95}
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model {args.model or args.config} ({parameters / 1e6:.1f}M parameters, {next(model.parameters()).dtype}) "
          f"on {args.device}, {args.new_tokens} new tokens, torch threads {torch.get_num_threads()}")  # fmt: skip
    for batch_size in (1, args.batch_size):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
        tokens = batch_size * args.new_tokens
        for generate in (plain_generate, hfgen_generate):  # warm-up: kernels, caches, allocator
            generate(model, tokenizer, prompts, args.new_tokens, sampling)
        plain, ours = [], []
        for _ in range(args.repeats):
            plain.append(tokens / timed(plain_generate, model, tokenizer, prompts, args.new_tokens, sampling))
            ours.append(tokens / timed(hfgen_generate, model, tokenizer, prompts, args.new_tokens, sampling))
        print(f"\nbatch {batch_size}")
        print(f"  plain model.generate : {max(plain):,.0f} tokens/s")
        print(f"  hfgen generate_text  : {max(ours):,.0f} tokens/s")
        print(f"  ratio hfgen/plain    : {max(ours) / max(plain):.3f}  (goal >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
