"""Generate text (or images) from a trained model: `hfgen generate MODEL_DIR --prompt TEXT`.

MODEL_DIR is a model dir or hub id, a LoRA adapter dir (loaded on its base), or a diffusers pipeline dir
(then images are rendered). Text generation is batched and KV-cached. With a chat template and `--chat`
(the default for models fine-tuned by sft/ppo), prompts are wrapped as a user turn.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NamedTuple


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hfgen.evaluation.command import Given
    from hfgen.recipe import expand_home

    parser.add_argument(
        "model", type=expand_home, help="model dir, hub id, LoRA adapter dir, or diffusers pipeline dir"
    )
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--num_samples", type=int, default=1, help="samples (texts or images) per prompt")
    parser.add_argument("--seed", type=int, default=0)
    # the text options (action=Given) and the image options (default None): refused where they do not apply
    text = parser.add_argument_group("text (causal LMs)")
    text.add_argument("--max_new_tokens", action=Given, type=int, default=48)
    text.add_argument("--temperature", action=Given, type=float, default=0.8, help="0 means greedy decoding")
    text.add_argument("--top_p", action=Given, type=float, default=0.95)
    chat = text.add_mutually_exclusive_group()
    chat.add_argument(
        "--chat", dest="chat", action="store_true", default=None, help="wrap prompts in the chat template"
    )
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="feed prompts as raw text")
    images = parser.add_argument_group("images (diffusers pipeline dirs; default: the run's recipe, else 25 / 3.0)")
    images.add_argument("--num_inference_steps", type=int)
    images.add_argument("--guidance_scale", type=float)
    images.add_argument(
        "--output_dir",
        default=None,
        type=expand_home,
        help="where PNGs and grid.png go (default: MODEL/generated); a later render there replaces only them",
    )


IMAGE_OPTIONS = ("num_inference_steps", "guidance_scale", "output_dir")  # unset: None


def main(args: argparse.Namespace) -> int:
    from hfgen.diffusion import is_pipeline_dir
    from hfgen.errors import UserError
    from hfgen.evaluation.command import refuse_options_that_do_not_apply
    from hfgen.models import hub_dir_problem

    model_path = Path(args.model)
    if not model_path.exists() and (problem := hub_dir_problem("MODEL", args.model, pipelines=True)):
        raise UserError(f"hfgen generate: {problem}")  # (an adapter's or a pipeline's kind is read from its dir)
    images = is_pipeline_dir(model_path)  # a diffusers pipeline dir or a t2i LoRA run
    refuse_options_that_do_not_apply("hfgen generate", "MODEL", args.model, args, images, IMAGE_OPTIONS)
    if problems := seed_problems(args.seed):  # images and text
        raise UserError("hfgen generate: " + "; ".join(problems) + ".")
    if images:
        from hfgen.diffusion import render_images

        paths = render_images(
            str(model_path), args.prompt, args.num_samples, args.num_inference_steps, args.guidance_scale, args.seed,
            args.output_dir or str(model_path / "generated"),
        )  # fmt: skip
        for path in paths:
            print(path)
        return 0
    problems = sampling_problems(args.num_samples, args.temperature, args.top_p)
    problems += ["--max_new_tokens must be at least 1"] * (args.max_new_tokens < 1)
    if (blank := next((p for p in args.prompt if not p.strip()), None)) is not None:  # as given ('   ' showed '')
        problems.append(f"--prompt {blank!r} is empty: give the text to continue")
    if problems:
        raise UserError("hfgen generate: " + "; ".join(problems) + ".")

    from hfgen.models import check_model_source, load_causal_lm, load_tokenizer, not_a_generator

    if problems := check_model_source("MODEL", args.model) or not_a_generator(args.model, "MODEL"):
        raise UserError(problems[0])

    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    chat = wants_chat(args.model, tokenizer) if args.chat is None else args.chat
    # each prompt's own seeds (as `hfgen eval`): its samples do not depend on the other prompts, and nothing drawn
    # before (a LoRA adapter's initialisation draws from the global RNG) moves them
    samples = generate_text(
        model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, num_samples=args.num_samples, chat=chat, seeds=prompt_seeds(args.seed, args.prompt),
    )  # fmt: skip
    for prompt, texts in zip(args.prompt, samples):
        for text in texts:
            print(f"### {prompt}\n{text if chat else prompt + text}\n")
    return 0


def sampling_problems(num_samples: int, temperature: float, top_p: float) -> list[str]:
    """The sampling options' problems (generate and eval): greedy decoding has one answer per prompt."""
    problems = []
    if num_samples < 1:
        problems.append("--num_samples must be at least 1")
    if not math.isfinite(temperature):  # nan passed the checks below, then failed in transformers (inf in torch)
        problems.append(f"--temperature must be a finite number (0 is greedy decoding), got {temperature}")
    elif temperature < 0:
        problems.append(f"--temperature must be >= 0 (0 is greedy decoding), got {temperature}")
    if temperature == 0 and num_samples > 1:
        problems.append(
            f"--temperature 0 decodes greedily, one answer per prompt: --num_samples {num_samples} would repeat it; "
            "give a temperature above 0 to sample, or --num_samples 1"
        )
    if not 0 < top_p <= 1:
        problems.append(f"--top_p must lie in (0, 1], got {top_p}")
    return problems


# torch's generators take a 64-bit seed (beyond it, torch.manual_seed's raw "ValueError: Overflow when unpacking long
# long"); the signed range, so that an image render's per-prompt seed (seed + the prompt's index) stays in it too
SEED_RANGE = (-(2**63), 2**63 - 1)


def seed_problems(seed: int) -> list[str]:
    """--seed's problem (generate and eval, text and images): out of the range torch can seed with."""
    low, high = SEED_RANGE
    return [] if low <= seed <= high else [f"--seed must be a 64-bit integer, from {low} to {high}; got {seed}"]


def prompt_seeds(seed: int, prompts: list) -> list[int]:
    """The sampling seed of each prompt (a text or a conversation) for `generate_tokens`' `seeds`: from `seed` and
    the prompt itself, with how many equal prompts came before it (a repeated prompt samples afresh), by the held-out
    comparison's `row_seed`. Not its place in the list: a prompt's samples do not depend on the batch size, on how
    many prompts are sampled nor on the others before or after it."""
    import hashlib
    import json

    from hfgen.evaluation.policy import row_seed

    seen: dict[str, int] = {}
    seeds = []
    for prompt in prompts:
        identity = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
        seen[identity] = seen.get(identity, 0) + 1
        digest = hashlib.sha256(f"{seen[identity]}:{identity}".encode()).digest()  # stable across processes
        seeds.append(row_seed(seed, int.from_bytes(digest[:8], "big")))
    return seeds


RUN_SUB_MODELS = ("ema",)  # the models a run saves beside its own (PPO's `ema_decay` copy), in the run's format


def wants_chat(model_path: str, tokenizer) -> bool:
    """Chat format by default for fine-tuned models: hfgen runs other than pretraining (and their sub-models, e.g.
    a PPO run's ema/), LoRA adapter dirs and `hfgen merge` outputs; raw text otherwise, and for a run (or its merge)
    that prompted its model raw (`trained_on_chat`: SFT on plain text or plain prompt/completion rows, a later stage
    on plain prompts), which it answers as it was trained. `--chat` / `--no-chat` decide explicitly."""
    if tokenizer.chat_template is None:
        return False
    if (chat := trained_on_chat(model_path)) is not None:
        return chat
    merged = (Path(model_path) / "merged_from.json").is_file()
    if made_by_run(model_path) is not None or merged:
        unrecorded = (
            f"the run that made {model_path} does not record whether it prompted its model in the chat template (an "
            "older hfgen, or no held-out rows)"
            if made_by_run(model_path) is not None
            else f"the merge {model_path} does not record whether its adapter's run prompted its model in the chat "
            "template (an adapter no hfgen run made, or an older hfgen merge whose adapter run is no longer where its "
            "merged_from.json says)"
        )
        print(f"hfgen: {unrecorded}: prompting in the chat template; --no-chat prompts raw text", file=sys.stderr)
        return True
    return (Path(model_path) / "adapter_config.json").is_file()


def made_by_run(model_path: str) -> Path | None:
    """The recipe.yaml of the hfgen run that made the model at `model_path`: its own, that of the adapter run a merge
    names (merged_from.json), or the run's for a model it saved beside its own (ema/) or in one of its checkpoints
    (whose eval.json is the run's, beside the run's recipe). None when no run made it."""
    from hfgen import tracking

    path = Path(model_path)
    merged_from = tracking.read_json(path / "merged_from.json", {}).get("adapter")
    run = Path(merged_from) if merged_from and Path(merged_from).is_dir() else path
    recipe = run / "recipe.yaml"
    if (not recipe.is_file() and run.name in RUN_SUB_MODELS) or tracking.is_checkpoint_dir(run):
        recipe = run.parent / "recipe.yaml"  # a run's sub-model or checkpoint: the run's format
    return recipe if recipe.is_file() else None


def trained_on_chat(model_path: str) -> bool | None:
    """Whether the hfgen run that made the model prompted it in the chat template, as its eval.json records
    (`trained_on_chat`: SFT from its rows, the later stages from the prompts they trained on), or a merge's
    merged_from.json as `hfgen merge` copied it from the adapter's run; False for pretraining. The stages record it
    in data.json too when they start, for a checkpoint of a run not finished yet. A run that does not say (an older
    hfgen's) is read from the layout of its training rows in its data.json: plain text, Alpaca or Dolly rows are
    prompted raw, conversations in the template. None when unknown: no hfgen run made it, or neither record tells."""
    from hfgen import tracking
    from hfgen.models import recorded_stage

    merged = tracking.read_json(Path(model_path) / "merged_from.json", {})
    if isinstance(merged, dict) and merged.get("trained_on_chat") is not None:  # `hfgen merge` kept its run's word
        return merged["trained_on_chat"]
    recipe = made_by_run(model_path)
    if recipe is None:
        return None
    if recorded_stage(recipe) == "pretrain":
        return False
    recorded = tracking.read_json(recipe.parent / "eval.json", {}).get("trained_on_chat")
    data = tracking.read_json(recipe.parent / "data.json", {})
    if recorded is None:
        recorded = data.get("trained_on_chat")
    if recorded is not None:
        return recorded
    layout = data.get("train", {}).get("format")
    return {"text": False, "alpaca": False, "dolly": False, "messages": True, "sharegpt": True}.get(layout)


def prompts_are_chat(rows, tokenizer=None) -> bool | None:
    """Whether a stage's rows (their `prompt`, or for rows with none the `chosen` / `completion`) are chat messages,
    as the stage records `trained_on_chat`, or strings already rendered with the `tokenizer`'s chat template
    (`rendered_with_template`: the model was prompted in the template all the same); None for no rows."""
    if rows is None or not len(rows):
        return None
    first = rows[0]
    column = next((c for c in ("prompt", "chosen", "completion") if first.get(c) is not None), None)
    if column is None:
        return None
    if not isinstance(first[column], str):
        return True
    if column != "prompt" or tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        return False
    return rendered_with_template(first[column], template_marks(tokenizer))


def template_marks(tokenizer) -> tuple[str, str, list[str]]:
    """(what the chat template writes before a user's content, after it with the generation prompt, the special
    tokens among those): a string prompt holding one of the tokens (Llama 3's <|start_header_id|>, ChatML's
    <|im_start|>), or beginning with that opening, is already rendered."""
    sentinel = "\x00hfgen\x00"
    user = [{"role": "user", "content": sentinel}]
    opening, closing = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True).split(sentinel)
    special = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    return opening, closing, [token for token in special if token in opening + closing]


def rendered_with_template(prompt: str, marks: tuple[str, str, list[str]]) -> bool:
    """Whether a string prompt is already rendered with the chat template whose `template_marks` these are."""
    opening, _, tokens = marks
    return any(token in prompt for token in tokens) or bool(opening.strip() and prompt.startswith(opening))


def format_prompts(tokenizer, prompts: list, chat: bool) -> list[str]:
    """Plain strings, or chat-formatted: a prompt may be a string (one user turn) or a list of messages."""
    if not chat:
        return list(prompts)
    if tokenizer.chat_template is None:
        from hfgen.errors import UserError

        raise UserError(
            f"the tokenizer of this model ({tokenizer.name_or_path}) has no chat template to wrap the prompts in: "
            "drop --chat (the prompts are fed as raw text)"
        )
    formatted = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        formatted.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return formatted


def generate_text(
    model, tokenizer, prompts: list, *, max_new_tokens: int = 48, temperature: float = 0.8, top_p: float = 0.95,
    num_samples: int = 1, chat: bool = False, batch_size: int = 64, min_new_tokens: int | None = None,
    seeds: list[int] | None = None,
) -> list[list[str]]:  # fmt: skip
    """`num_samples` completions for each prompt (completion text only, special tokens removed).
    Left-padded batches, KV cache on, stop at EOS."""
    samples = generate_tokens(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        num_samples=num_samples, chat=chat, batch_size=batch_size, min_new_tokens=min_new_tokens, seeds=seeds,
    )  # fmt: skip
    return [[sample.text for sample in group] for group in samples]


class Completion(NamedTuple):
    text: str  # the completion, special tokens removed
    prompt_ids: list[int]  # the prompt's token ids as the model read them (unpadded)
    completion_ids: list[int]  # up to and including the first EOS
    finished: bool  # it ended with EOS (rather than at max_new_tokens)


def generate_tokens(
    model, tokenizer, prompts: list, *, max_new_tokens: int = 48, temperature: float = 0.8, top_p: float = 0.95,
    num_samples: int = 1, chat: bool = False, batch_size: int = 64, min_new_tokens: int | None = None,
    seeds: list[int] | None = None,
) -> list[list[Completion]]:  # fmt: skip
    """`generate_text` with the token ids kept and whether each completion finished: what a reward model that
    shares the tokenizer reads (`hfgen.rl.rollout.RewardScorer`).

    Sampling is PPO's (`sampling_config`): softmax(logits / temperature) with top-p, nothing else from the model's
    generation_config.json, stopping at every EOS id (`hfgen.rl.models.stop_token_ids`). A prompt gets
    `max_new_tokens`, lowered only for the prompts that would run past a model's learned positions
    (`new_token_budgets`): prompts are batched with those of the same budget.

    `seeds` (one per prompt, `prompt_seeds`): each sample draws from a generator of its own (`row_seed` of its
    prompt's seed and its number), so a prompt's samples do not depend on the prompts batched beside it; without,
    the draws come from torch's global generator in batch order."""
    import torch

    from hfgen.evaluation.policy import row_seed
    from hfgen.rl.models import stop_token_ids
    from hfgen.rl.rollout import InverseTransformSampler, picking_the_draw

    texts = format_prompts(tokenizer, prompts, chat)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    model.eval()
    device = next(model.parameters()).device
    stop_ids = stop_token_ids(tokenizer, model)
    prompt_ids = tokenizer(texts, add_special_tokens=not chat)["input_ids"]
    budgets = new_token_budgets(model, [len(ids) for ids in prompt_ids], max_new_tokens)
    outputs: list[list[Completion] | None] = [None] * len(texts)
    try:
        for budget in dict.fromkeys(budgets):  # one group (in order) unless some prompts are near the limit
            indices = [i for i, b in enumerate(budgets) if b == budget]
            seeded = seeds is not None and temperature > 0  # (greedy decoding draws nothing)
            # seeded, greedy picks the sampler's draw, and greedy returns one sequence a row: the rows are repeated
            config = sampling_config(
                tokenizer, model, budget, temperature, top_p, stop_ids, min_new_tokens, 1 if seeded else num_samples
            )
            if seeded:
                config = picking_the_draw(config)
            for start in range(0, len(indices), batch_size):
                rows = indices[start : start + batch_size]
                batch = tokenizer.pad({"input_ids": [prompt_ids[i] for i in rows]}, return_tensors="pt").to(device)
                sampler = None
                if seeded:  # each prompt num_samples times in a row, as num_return_sequences: one seed a sequence
                    batch = {key: value.repeat_interleave(num_samples, dim=0) for key, value in batch.items()}
                    row_seeds = [row_seed(seeds[i], sample) for i in rows for sample in range(num_samples)]
                    sampler = [InverseTransformSampler(temperature, top_p, row_seeds)]
                with torch.inference_mode():
                    generated = model_generate(model, **batch, generation_config=config, logits_processor=sampler)
                completions = generated[:, batch["input_ids"].shape[1] :].tolist()
                decoded = tokenizer.batch_decode(completions, skip_special_tokens=True)
                for row, (ids, text) in enumerate(zip(completions, decoded)):
                    prompt = prompt_ids[rows[row // num_samples]]
                    end = next((at for at, token in enumerate(ids) if token in stop_ids), None)
                    kept = ids if end is None else ids[: end + 1]
                    completion = Completion(text, list(prompt), kept, end is not None)
                    if row % num_samples == 0:
                        outputs[rows[row // num_samples]] = []
                    outputs[rows[row // num_samples]].append(completion)
    finally:
        tokenizer.padding_side = padding_side
    return outputs


def model_generate(model, **generate_kwargs):
    """`model.generate(**generate_kwargs)`: every hfgen text generation goes through here (`generate_tokens`, which
    SFT's and pretraining's held-out samples use too, the RL rollouts and held-out comparisons of
    `hfgen.rl.rollout.sample_responses`).

    A Mixture-of-Experts model whose config says `output_router_logits: true` (what TRL's SFTTrainer sets to train
    the load-balancing loss, and what many fine-tunes on the hub carry) makes transformers compute that loss inside
    `generate`, which fails on a padded batch at the second token (a size mismatch in load_balancing_loss_func):
    sampling needs no router logits, so they are turned off for the call."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config.get_text_config(), "output_router_logits", False):
        generate_kwargs["output_router_logits"] = False
    return model.generate(**generate_kwargs)


def sampling_config(
    tokenizer, model, max_new_tokens: int, temperature: float, top_p: float, stop_ids: list[int],
    min_new_tokens: int | None = None, num_samples: int = 1,
):  # fmt: skip
    """The GenerationConfig of `generate_tokens`: PPO's (`hfgen.rl.models.make_generation_config`, which pins off
    top_k, repetition penalties, min-p... that transformers would otherwise take from the model's
    generation_config.json, top_k=50 by default), so that `hfgen generate` / `hfgen eval` sample a PPO policy as
    PPO did; greedy (do_sample off) at temperature 0, `num_samples` sequences per prompt, and no logits kept (all in
    the config: transformers deprecates generation arguments beside a generation_config)."""
    from hfgen.rl.models import make_generation_config

    config = make_generation_config(tokenizer, max_new_tokens, temperature or 1.0, top_p, stop_ids, models=[model])
    config.update(
        return_dict_in_generate=False, output_logits=False, min_new_tokens=min_new_tokens,
        num_return_sequences=num_samples,
    )  # fmt: skip
    if temperature == 0:  # greedy: temperature and top-p would not apply (transformers warns when set)
        config.update(do_sample=False, temperature=1.0, top_p=1.0)
    return config


def new_token_budgets(model, prompt_lengths: list[int], max_new_tokens: int) -> list[int]:
    """`max_new_tokens` for each prompt, lowered (with a line saying so) for the prompts that would otherwise run past
    a model with learned positions (GPT-2's n_positions, OPT's): past them generation fails with an IndexError (a
    device assert on a GPU). Only those prompts: a long prompt does not shorten the answers of the others."""
    from hfgen.errors import UserError
    from hfgen.models import position_limit

    limit = position_limit(model.config)
    if limit is None:
        return [max_new_tokens] * len(prompt_lengths)
    if max(prompt_lengths) >= limit:
        raise UserError(
            f"a prompt of {max(prompt_lengths)} tokens leaves no room to answer in this model's {limit} positions: "
            "give shorter prompts"
        )
    budgets = [min(max_new_tokens, limit - length) for length in prompt_lengths]
    if lowered := sum(budget < max_new_tokens for budget in budgets):
        print(
            f"max_new_tokens {max_new_tokens} lowered to {min(budgets)} (for {lowered} of {len(budgets)} prompts): "
            f"the model reads at most {limit} positions"
        )
    return budgets
