"""Check a recipe before training: `hfgen check RECIPE [--key value ...]`.

Everything that can be known in seconds without training: the recipe's keys and types, its models and data (the
checks `hfgen train` runs first), then the data after layout conversion (rows read, kept, dropped and why), and
for SFT three rendered examples with the trained tokens marked [[like this]], the share of rows whose labels are
fully masked after truncation, whether EOS is inside the labels (a model that never sees it never stops), and
whether the chat template's generation prompt is how the training conversations begin (else the model is
sampled from a prompt it never saw). Exit 2 on any fatal finding. Steps whose models a pipeline has not made yet
are skipped, and the report says so.
"""

from __future__ import annotations

import argparse
import math

TEXT_KINDS = {"pretrain": "text", "sft": "sft", "reward": "preference", "ppo": "prompt"}
TEXT_KINDS |= {"dpo": "preference", "orpo": "preference", "simpo": "preference", "kto": "unpaired_preference"}
TEXT_KINDS |= {"grpo": "prompt", "rloo": "prompt"}
GROUP_RL = ("grpo", "rloo")
PREFERENCE_STAGES = ("dpo", "orpo", "simpo", "kto")
MAX_FULLY_MASKED = 0.5  # a larger share of rows with no trained token is fatal
EXAMPLES = 3
ROWS_RENDERED = 1000  # rows whose rendering is checked: enough for the shares, fast on any dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hfgen.recipe import expand_home

    parser.add_argument("recipe", nargs="?", type=expand_home, help="recipe YAML (see recipes/)")
    parser.add_argument(
        "--config", dest="config_file", type=expand_home, help="the recipe, in TRL CLI style (instead of RECIPE)"
    )
    parser.set_defaults(accepts_overrides=True)
    parser.epilog = "Any --key value pair overrides that key of the recipe, as in `hfgen train`."


def main(args: argparse.Namespace) -> int:
    from hfgen.data.loading import datasets_cache_unwritable_exits_2
    from hfgen.data.prepare import shared_loads

    # (the report is of the data and renderings the recipe's check loaded, read once; a full or read-only datasets cache
    # is named)
    with shared_loads(), datasets_cache_unwritable_exits_2():
        return _check(args)


def _check(args: argparse.Namespace) -> int:
    from hfgen.errors import UserError
    from hfgen.recipe import load_recipe, recipe_values

    args.recipe = args.recipe or args.config_file  # `hfgen.cli.config_as_recipe` makes --config RECIPE the recipe
    if args.recipe is None:
        raise UserError("no recipe given: `hfgen check RECIPE.yaml [--key value ...]` (recipes live under recipes/).")
    values = recipe_values(args.recipe, args.overrides)
    pending = models_made_by_earlier_steps(values, args.recipe)
    # keys, types, models, data: as `hfgen train` does first; without the models an earlier step will make
    recipe = load_recipe(args.recipe, args.overrides, made_later=tuple(v for v, _ in pending.values()))
    if pending:
        print(
            f"recipe: {args.recipe} (stage {recipe.stage}): keys, types and settings are valid; model-dependent "
            "checks skipped, since earlier steps make "
            + ", ".join(f"{key} ({path}, written by {maker})" for key, (path, maker) in pending.items())
        )
    else:
        print(f"recipe: {args.recipe} (stage {recipe.stage}): keys, models and data are valid")
    if recipe.stage == "rlhf":
        from hfgen.stages.rlhf import pipeline_steps

        print(
            f"pipeline: every step's values checked ({', '.join(pipeline_steps(recipe.configs[0]))}); the checks of "
            "the models an earlier step makes were skipped; run `hfgen check STEP_RECIPE` once its input model exists"
        )
        return 0
    if recipe.stage not in TEXT_KINDS:
        print(f"stage {recipe.stage}: its images and captions were checked with the recipe; no text checks apply")
        return 0
    fatal = check_text_stage(recipe, with_models=not pending)
    if fatal:
        raise UserError(f"recipe '{args.recipe}' has {len(fatal)} fatal finding(s): " + "; ".join(fatal))
    return 0


def models_made_by_earlier_steps(values: dict, recipe_path) -> dict[str, tuple[str, str]]:
    """{key: (path, the recipe that writes it)} for the recipe's model keys (`*_name_or_path`, `*_model_path`,
    `tokenizer_name`) naming a dir that does not exist yet and that a recipe beside this one writes (its
    output_dir): an earlier step of the sequence makes it. A missing path no recipe writes (a typo) is not pending:
    it is checked, and refused, as `hfgen train` would."""
    from pathlib import Path

    from hfgen.errors import UserError
    from hfgen.recipe import read_recipe_file

    missing = {
        key: value
        for key, value in values.items()
        if key.endswith(("name_or_path", "model_path", "tokenizer_name"))
        and isinstance(value, str)
        and value.strip()
        and not Path(value).expanduser().exists()
    }
    if not missing:
        return {}
    writers = {}
    for sibling in sorted(Path(recipe_path).resolve().parent.glob("*.y*ml")):
        try:
            output_dir = read_recipe_file(sibling).get("output_dir")
        except UserError:
            continue
        if isinstance(output_dir, str) and output_dir.strip():
            writers.setdefault(Path(output_dir).expanduser().resolve(), sibling.name)
    return {
        key: (value, writers[Path(value).expanduser().resolve()])
        for key, value in missing.items()
        if Path(value).expanduser().resolve() in writers
    }


def check_text_stage(recipe, with_models: bool = True) -> list[str]:
    """Print the data report and, `with_models`, the model-dependent checks; return the fatal findings."""
    from hfgen.data.formats import REWARD_COLUMNS
    from hfgen.data.prepare import TextDataArguments, data_seed, load_for_stage, summary_lines

    data_args = recipe.get(TextDataArguments)
    training_args = recipe.configs[-1]
    stage = recipe.stage
    defaults = {
        "pretrain": {"text": getattr(data_args, "text_column", "text")},
        "sft": {"text": getattr(training_args, "dataset_text_field", "text")},
        **dict.fromkeys(("ppo", *GROUP_RL), {"prompt": getattr(data_args, "prompt_column", "prompt")}),
    }.get(stage)
    train, evaluation, records = load_for_stage(
        data_args, TEXT_KINDS[stage], seed=data_seed(training_args), default_columns=defaults,  # the run's draws
        other_columns=True if stage in GROUP_RL else REWARD_COLUMNS if stage == "reward" else False,
    )  # fmt: skip
    if with_models and stage in PREFERENCE_STAGES:  # pairs that max_length makes equal count as equal pairs
        from hfgen.models import load_tokenizer, within_learned_positions
        from hfgen.preference import drop_truncated_identical_pairs

        model = recipe.configs[0].model_name_or_path
        tokenizer = load_tokenizer(model, training_args.trust_remote_code)
        drop_truncated_identical_pairs(
            tokenizer, (train, evaluation), records, within_learned_positions(model, training_args)
        )
    if with_models and stage == "ppo":  # prompts over max_prompt_length, as the run drops them
        from hfgen.stages.ppo import prompt_length_problems

        prompt_length_problems(recipe.configs[0], data_args, training_args, (train, evaluation), records)
        if training_args.ptx_dataset_name and training_args.ptx_coef:  # ptx examples, as the run drops them
            from hfgen.stages.ppo import ptx_length_problems

            ptx_length_problems(recipe.configs[0], training_args, records)
    if with_models and stage in GROUP_RL:  # prompts that leave no room to answer in learned positions, as dropped
        from hfgen.group_rl import prompt_length_problems

        prompt_length_problems(recipe.configs[0], data_args, training_args, (train, evaluation), records)
    print("\n".join(summary_lines(records)))
    if not with_models:
        return []
    if stage == "ppo":
        print("\n".join(check_rewards(recipe, train["prompt"])))
        return []
    if stage in GROUP_RL:
        print("\n".join(check_group_rewards(recipe, train)))
        return []
    if stage != "sft":
        print(f"model-dependent checks of stage {stage}: none beyond the data (rendered examples are for sft)")
        return []
    from hfgen.data.prepare import data_source

    lines, fatal = sft_rendering(train, recipe.configs[0], training_args, data_source(data_args))
    print("\n".join(lines))
    return fatal


REWARD_PROMPTS, REWARD_SAMPLES = 8, 4


def check_rewards(recipe, prompts) -> list[str]:
    """PPO: the reward of a few sampled responses (REWARD_SAMPLES for each of REWARD_PROMPTS prompts) and the
    share of prompt groups whose rewards are all equal (such a group teaches a group-relative method nothing)."""
    import torch

    from hfgen.models import load_tokenizer
    from hfgen.rl.models import load_scorer

    model_args, _, config = recipe.configs
    tokenizer = load_tokenizer(model_args.model_name_or_path, config.trust_remote_code)
    prompts = list(prompts[:REWARD_PROMPTS])
    samples = sampled_responses(model_args, config, tokenizer, prompts, config.response_length)
    scorer = load_scorer(model_args, config, tokenizer)  # scored exactly as PPO scores its rollouts
    groups = []
    for prompt, completions in zip(prompts, samples):
        total, _ = scorer(
            [prompt] * len(completions), [c.text for c in completions], [c.finished for c in completions],
            torch.device("cpu"), [c.prompt_ids + c.completion_ids for c in completions],
        )  # fmt: skip
        groups.append(total.tolist())
    return reward_lines(groups)


def sampled_responses(model_args, config, tokenizer, prompts: list, max_new_tokens: int):
    """REWARD_SAMPLES completions of each prompt by the recipe's policy at its temperature and top-p (PPO's sampling
    rule, `hfgen.generate.sampling_config`; GRPO's top_k, min_p and repetition_penalty, which TRL adds when set, are
    left out of this sample), each prompt's drawn from the recipe's seed and the prompt (`prompt_seeds`, as `hfgen
    eval` and `hfgen generate --seed` draw them): a prompt's sample does not depend on the prompts beside it."""
    from hfgen.generate import generate_tokens, prompt_seeds
    from hfgen.models import load_causal_lm

    policy = load_causal_lm(model_args.model_name_or_path, "float32", config.trust_remote_code)
    prompts = list(prompts)
    return generate_tokens(
        policy, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=config.temperature, top_p=config.top_p,
        num_samples=REWARD_SAMPLES, chat=not isinstance(prompts[0], str), seeds=prompt_seeds(config.seed, prompts),
    )  # fmt: skip


def reward_lines(groups: list[list[float]], components: str = "", equal_means: str = "", silent=None) -> list[str]:
    """The report of the sampled rewards (one list per prompt; NaN: a response no reward function scored, which
    GRPO and RLOO leave out): their spread, and how many prompts' groups got one reward for all their scored
    responses (`components`, `equal_means`: what the stage adds to each line; `silent`: the groups that teach
    nothing when the stage tells them otherwise than by their rewards)."""
    from hfgen.group_rl import silent_groups

    rewards = [r for group in groups for r in group]
    scored = [r for r in rewards if not math.isnan(r)]
    spread = f"mean {sum(scored) / len(scored):.3f}, min {min(scored):.3f}, max {max(scored):.3f}" if scored else ""
    if len(scored) < len(rewards):
        spread += f"{', ' if scored else ''}{len(rewards) - len(scored)} scored by no reward function"
    equal = int((silent_groups(rewards, REWARD_SAMPLES, tolerance=1e-6) if silent is None else silent).sum())
    return [
        f"reward of {len(rewards)} sampled responses ({REWARD_SAMPLES} for each of {len(groups)} prompts): "
        f"{spread}{components}",
        f"prompt groups whose rewards are all equal{equal_means}: {equal} of {len(groups)}",
    ]


def check_group_rewards(recipe, rows) -> list[str]:
    """GRPO/RLOO: each reward component and the weighted total of a few sampled responses (REWARD_SAMPLES for each
    of REWARD_PROMPTS prompts, templated as the stage templates them), and the share of prompt groups whose totals
    are all equal: their group-relative advantages are zero, they teach nothing."""
    import torch

    from hfgen.evaluation.policy import mean
    from hfgen.group_rl import (
        load_reward_model,
        prepare_prompts,
        prompt_room,
        reward_component_names,
        silent_groups_by_aggregation,
        trl_reward_function,
        weighted_totals,
    )
    from hfgen.models import load_tokenizer, read_config
    from hfgen.rl.models import prompt_ids
    from hfgen.rl.rollout import RewardScorer

    model_args, data_args, config = recipe.configs
    tokenizer = load_tokenizer(model_args.model_name_or_path, config.trust_remote_code)
    model_config = read_config(model_args.model_name_or_path, config.trust_remote_code)
    room = prompt_room(model_config, config) if model_config is not None else None
    # (a few more, for prompts the run drops as leaving no room to answer in a model's learned positions)
    rows = rows.select(range(min(REWARD_PROMPTS * (1 if room is None else 4), len(rows))))
    rows = prepare_prompts(rows, data_args, tokenizer, model_path=model_args.model_name_or_path)
    if room is not None:
        rows = rows.select([i for i, ids in enumerate(prompt_ids(tokenizer, rows["prompt"])) if len(ids) <= room])
    rows = rows.select(range(min(REWARD_PROMPTS, len(rows))))
    samples = sampled_responses(model_args, config, tokenizer, rows["prompt"], config.max_completion_length)
    each = [(row, completion) for row, group in zip(rows, samples) for completion in group]
    prompts_each, texts, finished = ([row["prompt"] for row, _ in each], [c.text for _, c in each],
                                     [c.finished for _, c in each])  # fmt: skip
    columns = {key: [row[key] for row, _ in each] for key in rows.column_names if key != "prompt"}
    components = []
    if data_args.reward_model_path:  # scored as the stage's held-out comparison scores it
        model, reward_tokenizer = load_reward_model(data_args.reward_model_path, model_args, config)
        scorer = RewardScorer(model, reward_tokenizer, {}, [1.0], REWARD_PROMPTS * REWARD_SAMPLES)
        components.append(scorer(prompts_each, texts, finished, torch.device("cpu"))[0].tolist())
    for spec in data_args.reward_functions:
        components.append(trl_reward_function(spec)(prompts_each, texts, **columns))
    weights = config.reward_weights or [1.0] * len(components)
    rewards_per_func = [[math.nan if r is None else r for r in rewards] for rewards in zip(*components)]
    totals = weighted_totals(rewards_per_func, weights).tolist()  # as training sums them
    aggregation = getattr(config, "multi_objective_aggregation", None)  # (RLOO's config has none: sums)
    silent = silent_groups_by_aggregation(rewards_per_func, weights, REWARD_SAMPLES, aggregation, tolerance=1e-6)
    groups = [totals[i : i + REWARD_SAMPLES] for i in range(0, len(totals), REWARD_SAMPLES)]
    means = ", ".join(
        f"{name} " + ("none scored" if mean(values) is None else f"{mean(values):.3f}")
        for name, values in zip(reward_component_names(data_args), components)
    )
    return reward_lines(groups, f" (components: {means})", " (no signal for a group-relative method)", silent)


def assistant_mask_problems(tokenizer) -> list[str]:
    """`assistant_only_loss` masks by the chat template's `{% generation %}` markers. A template without them is
    swapped by SFTTrainer for its training version of the same template where TRL has one (Llama 3, Qwen, Gemma,
    Phi-3, ...); any other would fail in SFTTrainer's constructor after the model has loaded."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return []
    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        return [
            "assistant_only_loss: true masks the loss by the chat template's {% generation %} ... {% endgeneration %} "
            "markers around assistant turns; this tokenizer's template has none and TRL has no training version of "
            "it: set chat_template_path to a .jinja template with the markers (or a tokenizer dir whose template has "
            "them), or set assistant_only_loss: false (loss on every token), or give prompt/completion data "
            "(completion_only_loss)"
        ]
    return []


def turn_end_token(tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant turn's content (Gemma-it's
    <end_of_turn>, Llama 3's <|eot_id|>), None when it writes none there."""
    sentinel = "\x00hfgen\x00"
    talk = [{"role": "user", "content": "a"}, {"role": "assistant", "content": sentinel}]
    closing = tokenizer.apply_chat_template(talk, tokenize=False).split(sentinel)[-1]
    special = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    return next((token for token in special if closing.startswith(token)), None)


def marked_spans(tokenizer, ids: list[int], trained: list[int]) -> str:
    """The decoded ids with each run of trained tokens in [[...]]."""
    import itertools

    text, position = "", 0
    for mark, run in itertools.groupby(trained):
        length = len(list(run))
        span = tokenizer.decode(ids[position : position + length])
        text, position = text + (f"[[{span}]]" if mark else span), position + length
    return text


def sft_rendering(rows, model_args, training_args, source: str, tokenizer=None) -> tuple[list[str], list[str]]:
    """check_sft_rendering with the recipe's tokenizer (`tokenizer`, or loaded), computed once in a `hfgen check`:
    the recipe's check renders the rows for its fatal findings, the report prints the same rendering."""
    from hfgen.data.prepare import shared_once
    from hfgen.finetune import tokenizer_for
    from hfgen.models import within_learned_positions

    training_args = within_learned_positions(model_args.model_name_or_path, training_args)
    key = ("sft rendering", rows._fingerprint, len(rows), repr(model_args), repr(training_args), source)
    return shared_once(
        key,
        lambda: check_sft_rendering(rows, tokenizer or tokenizer_for(model_args, training_args), training_args, source),
    )


def check_sft_rendering(rows, tokenizer, training_args, source: str = "the data") -> tuple[list[str], list[str]]:
    """(report lines: rendered examples with trained tokens marked and the shares below, fatal findings: labels
    fully masked, no EOS in the labels, a chat template whose generation prompt does not begin the training
    conversations). The fatal part is what `hfgen train` checks first (stages/sft.py)."""
    from trl.data_utils import common_prefix_length

    from hfgen.data.formats import row_tools
    from hfgen.data.rendering import without_doubled_bos
    from hfgen.models import raise_length_advice
    from hfgen.stages.sft import (
        keep_end_ignored,
        row_cut,
        split_prompt_response,
        tokenize_response,
        trained_conversation,
    )

    fatal = []
    rows, bos_note = without_doubled_bos(rows, tokenizer)  # as `hfgen train` feeds SFTTrainer
    rows = rows.select(range(min(ROWS_RENDERED, len(rows))))
    masked_loss = "completion" in rows.column_names and training_args.completion_only_loss is not False
    masked_loss |= "messages" in rows.column_names and training_args.assistant_only_loss
    chat = "messages" in rows.column_names or isinstance(rows[0].get("completion", ""), list)
    if chat and tokenizer.chat_template is None:
        return [], [
            "the data is conversational but the tokenizer has no chat template: set chat_template_path (a .jinja file, "
            "or a tokenizer whose template to copy, e.g. an instruct model's)"
        ]
    if "messages" in rows.column_names and training_args.assistant_only_loss:
        fatal += assistant_mask_problems(tokenizer)
        if fatal:  # no template to mark the assistant turns with
            return [], fatal

    def trained_tokens(row, prompt, response, truncate: bool) -> tuple[list[int], list[int]]:
        """(ids, trained mask) of the row as SFTTrainer trains it, cut at max_length or not."""
        if "messages" in row:  # every assistant turn, in the template SFTTrainer trains with
            return trained_conversation(tokenizer, row, training_args, truncate=truncate)
        max_length, keep_end = row_cut(training_args) if truncate else (None, False)
        ids, start = tokenize_response(
            tokenizer, prompt, response, max_length, tools=row_tools(row), keep_end=keep_end
        ) or ([], 0)
        return ids, [int(i >= (start if masked_loss else 0)) for i in range(len(ids))]

    def trains_eos(ids, trained) -> bool:  # the first token is never a label
        return any(token == tokenizer.eos_token_id and mark for token, mark in zip(ids[1:], trained[1:]))

    cut_at = row_cut(training_args)[0]  # None where training cuts no row (packing_strategy bfd_split, wrapped)
    examples, fully_masked, with_eos, mismatched, cut_before_eos = [], 0, 0, 0, 0
    ends_lost = 0  # rows the packer cuts from their start under truncation_mode: keep_end (`keep_end_ignored`)
    for row in rows:
        prompt, response = split_prompt_response(row, "text")
        if response is None:
            continue
        ids, trained = trained_tokens(row, prompt, response, truncate=True)
        if keep_end_ignored(training_args):
            ends_lost += len(trained_tokens(row, prompt, response, truncate=False)[0]) > cut_at
        if not any(trained):
            fully_masked += 1
            continue
        eos = trains_eos(ids, trained)
        with_eos += eos
        if not eos and cut_at:  # would it, were the row not cut at max_length?
            cut_before_eos += trains_eos(*trained_tokens(row, prompt, response, truncate=False))
        if chat and prompt:
            prompt_ids = tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=True
            )
            prompt_ids = prompt_ids["input_ids"]
            full = tokenizer.apply_chat_template(prompt + response, tokenize=True, return_dict=True)["input_ids"]
            mismatched += common_prefix_length(prompt_ids, full) < len(prompt_ids)
        if len(examples) < EXAMPLES:
            examples.append(marked_spans(tokenizer, ids, trained))
    total = len(rows)
    lines = [f"note: {bos_note}"] if bos_note else []
    lines += ["rendered examples (trained tokens in [[...]]):"] + ["  " + e.replace("\n", "\\n") for e in examples]
    share_masked = fully_masked / total if total else 0.0
    truncation = f"after truncation (max_length={cut_at})" if cut_at else "(no row is cut at max_length)"
    lines.append(f"labels fully masked {truncation}: {share_masked:.1%}")
    lines.append(f"rows with EOS inside the labels: {with_eos} of {total - fully_masked}")
    if chat:
        lines.append(f"rows whose generation prompt differs from the training rendering: {mismatched}")
    if ends_lost:
        fatal.append(
            f"truncation_mode: keep_end with packing: true: {ends_lost} of {total} rows are longer than max_length="
            f"{cut_at}, and TRL's packing cuts them from their start (keeps their first tokens) whatever "
            "truncation_mode says, so the ends keep_end asks for would not train: set packing: false to keep the "
            "ends, truncation_mode: keep_start, or a max_length that holds the rows"
        )
    raise_it = raise_length_advice(training_args)  # (not when max_length was lowered to learned positions)
    if share_masked > MAX_FULLY_MASKED:
        fatal.append(
            f"{share_masked:.0%} of the rows have fully masked labels after truncation at max_length="
            f"{cut_at}: {raise_it}"
        )
    if total > fully_masked and with_eos == 0 and cut_before_eos:
        fatal.append(
            f"EOS ('{tokenizer.eos_token}') is inside no row's labels: max_length={cut_at} cuts "
            f"{cut_before_eos} of {total - fully_masked} rows before their EOS (uncut, their labels hold it), so the "
            f"model would never learn to stop: {raise_it}"
        )
    elif total > fully_masked and with_eos == 0:
        end = turn_end_token(tokenizer) if chat else None
        fatal.append(
            f"EOS ('{tokenizer.eos_token}') is inside no row's labels: the model would never learn to stop "
            + (
                f"(the chat template ends assistant turns with '{end}', not with EOS, as Gemma-it's does: set "
                f"eos_token: '{end}' so that it is the EOS trained and generation stops at)"
                if end and end != tokenizer.eos_token
                else "(plain text needs the tokenizer's eos_token; a chat template must end assistant turns with it)"
            )
        )
    if mismatched:
        fatal.append(
            f"the chat template's generation prompt does not begin the training conversations in {mismatched} rows: "
            "the model would be sampled from a prompt it never trained on; fix the template's add_generation_prompt"
        )
    return lines, fatal


# ---- launch checks (`hfgen train --num_processes`: before it spawns processes) ----


def read_launch_config(launch_config: str | None) -> dict:
    """The accelerate config file of `--launch_config` as a mapping ({} without one); a UserError naming it when it
    cannot be read as one."""
    import yaml

    from hfgen.errors import UserError

    if not launch_config:
        return {}
    try:
        with open(launch_config, encoding="utf-8") as stream:
            config = yaml.safe_load(stream) or {}
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"--launch_config '{launch_config}' cannot be read as YAML: {error}") from None
    if not isinstance(config, dict):
        raise UserError(f"--launch_config '{launch_config}' must be an accelerate config (a mapping of keys)")
    # read as `accelerate launch` will read it: a file it refuses (a key it does not know, a distributed_type it
    # has not) raised its ValueError as a traceback in the launcher, after every check here had passed
    from accelerate.commands.config import load_config_from_file

    try:
        load_config_from_file(str(launch_config))
    except (ValueError, TypeError) as error:
        raise UserError(f"--launch_config '{launch_config}': accelerate refuses it: {error}") from None
    return config


def launched_config(launch_config: str | None) -> dict:
    """The accelerate config `accelerate launch` will read: the launch config, or without one the default accelerate
    config ({} without either)."""
    from pathlib import Path

    from accelerate.commands.config import default_config_file

    if not launch_config and Path(default_config_file).is_file():
        launch_config = default_config_file
    return read_launch_config(launch_config)


def launch_mixed_precision(launch_config: str | None) -> str:
    """The mixed precision `accelerate launch` will give the spawned processes (ACCELERATE_MIXED_PRECISION): the
    launch config's, or without one the default accelerate config's, else "no"."""
    return str(launched_config(launch_config).get("mixed_precision") or "no").lower()


def launch_dynamo_backend(launch_config: str | None) -> str:
    """The torch.compile backend `accelerate launch` will give the spawned processes (ACCELERATE_DYNAMO_BACKEND): the
    dynamo_backend of the launch config's dynamo_config (a top-level dynamo_backend in older configs), or without one
    the default accelerate config's, else "no"."""
    config = launched_config(launch_config)
    dynamo = config.get("dynamo_config") or {}
    return str(
        (dynamo.get("dynamo_backend") if isinstance(dynamo, dict) else None) or config.get("dynamo_backend") or "no"
    ).lower()


def check_spawn(num_processes: int | None, launch_config: str | None, main_process_port: int | None = None) -> int:
    """Before `hfgen train --num_processes N --launch_config CFG` spawns anything: the launch the processes would
    refuse, refused once here (each process printed the refusal, then torchrun its own traceback, exit code 1).
    Returns the number of processes the launch will start."""
    import torch
    from accelerate.utils import parse_flag_from_env

    from hfgen.errors import UserError
    from hfgen.loop import deepspeed_on_cpu_flag_problem

    config = read_launch_config(launch_config)
    if num_processes is not None and num_processes < 1:
        raise UserError(f"--num_processes {num_processes}: must be at least 1")
    # accelerate's own check of it is a raw OverflowError after the recipe's checks (and 0 was dropped for 29500)
    if main_process_port is not None and not 1 <= main_process_port <= 65535:
        raise UserError(f"--main_process_port {main_process_port}: must be a port number, 1-65535")
    processes = num_processes or int(config.get("num_processes") or max(torch.cuda.device_count(), 1))
    deepspeed = config.get("distributed_type") == "DEEPSPEED"
    use_cpu = parse_flag_from_env("ACCELERATE_USE_CPU")
    if deepspeed and use_cpu:
        raise UserError(deepspeed_on_cpu_flag_problem())
    if processes > 1 and not deepspeed and not use_cpu and not torch.cuda.is_available():
        raise UserError(
            f"{processes} processes on a machine where torch sees no GPU: each would train alone, writing the same "
            "output. Set ACCELERATE_USE_CPU=true in the environment for CPU processes (`use_cpu: true` in the launch "
            "config is not enough), e.g. `ACCELERATE_USE_CPU=true hfgen train RECIPE --num_processes 2 --launch_config "
            "recipes/accelerate/cpu_2proc.yaml`; on GPUs check that torch sees them"
        )
    if processes > 1 and not use_cpu and torch.cuda.is_available():
        # Each process takes its own GPU: accelerate gives process i cuda:(i % GPUs), and NCCL refuses two processes
        # on one GPU at their first collective, in every process.
        machines = int(config.get("num_machines") or 1)
        gpu_ids = str(config.get("gpu_ids") or "all")
        gpus = torch.cuda.device_count() if gpu_ids == "all" else len([i for i in gpu_ids.split(",") if i.strip()])
        if (here := math.ceil(processes / machines)) > gpus:
            where = "this machine" if machines == 1 else f"each of the {machines} machines"
            has = f"torch sees {gpus}" if gpu_ids == "all" else f"the launch config's gpu_ids '{gpu_ids}' name {gpus}"
            raise UserError(
                f"{processes} processes put {here} on {where}, where {has} GPU(s): each process needs its own GPU. "
                f"Pass --num_processes {gpus * machines} or fewer (or set num_processes in the launch config), or "
                "ACCELERATE_USE_CPU=true for CPU processes"
            )
    return processes
