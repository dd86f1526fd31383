"""The three-step RLHF pipeline (Ouyang et al. 2022) in one recipe: supervised fine-tuning -> reward model -> PPO,
or with `method: grpo | rloo` GRPO/RLOO in PPO's place (on rule rewards, the reward model, or both; without a
`reward:` recipe the reward step is skipped).

    hfgen train recipes/tiny/rlhf.yaml            (what `make demo` runs)
    hfgen train recipes/tiny/rlhf.yaml --force    (redo every step)
    ACCELERATE_USE_CPU=true accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml scripts/train.py recipes/tiny/rlhf.yaml

The pipeline recipe names one step recipe per step, each with optional overrides (a mapping of recipe keys).
Each step runs through `hfgen.train.run_step` (`run_recipe`, the entry a user calls; no stage imports another),
into its own recipe's output_dir, so a step run by hand and the same step run here are one run; a step that was
interrupted continues from its newest complete checkpoint. The outputs are wired
forward: the SFT model becomes PPO's policy and reference, the reward model PPO's reward model and (by PPO's
default) its value model's initialisation. A `prerequisite` recipe (the tiny pretraining) runs first when its
output is missing.

A step is skipped when its output dir is complete (COMPLETE marker) and was made by the same resolved recipe from
the same inputs; a step that runs makes every later step run too, from scratch, since its inputs changed (each step
records the runs it consumed, the earlier steps' COMPLETE markers, in its OUTPUT_DIR/pipeline_inputs.json, so this
holds across a stop between two steps); `--force` reruns every step (not the
prerequisite). At the end a summary table (SFT held-out loss, reward-model accuracy, reward-model and oracle
scores of the SFT and PPO policies on held-out prompts, win rates, KL, wall time per step) is printed and written
to the pipeline's OUTPUT_DIR/eval.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hfgen import tracking
from hfgen.errors import UserError

METHODS = ("ppo", "grpo", "rloo", "dpo", "kto", "orpo", "simpo")  # the third step's stage
# dpo, kto, orpo and simpo learn from the preference pairs directly: the reward-model step runs only when a
# `reward:` recipe is given, as a judge of their evaluation; grpo and rloo can run on rule rewards alone.


def pipeline_steps(args) -> tuple[str, ...]:
    """("sft", "reward", method) when the method needs a reward model or a `reward:` recipe is set, else ("sft",
    method). Each step's recipe must be of the stage of the same name."""
    needs_reward_model = args.method == "ppo"
    return ("sft", "reward", args.method) if needs_reward_model or args.reward else ("sft", args.method)


@dataclass
class RLHFArguments:
    output_dir: str | None = field(default=None, metadata={"help": "Where the pipeline's summary goes."})
    prerequisite: str | None = field(
        default=None, metadata={"help": "Recipe run first when its output_dir is not complete (e.g. pretraining)."}
    )
    method: str = field(
        default="ppo",
        metadata={"help": "The step after SFT: ppo | grpo | rloo | dpo | kto | orpo | simpo (offline methods skip the "
                  "reward-model step unless `reward` names a recipe, whose model then judges their evaluation)."},
    )  # fmt: skip
    sft: str | None = field(default=None, metadata={"help": "Recipe of step 1 (stage sft)."})
    reward: str | None = field(default=None, metadata={"help": "Recipe of step 2 (stage reward)."})
    ppo: str | None = field(default=None, metadata={"help": "Recipe of step 3 (stage ppo)."})
    sft_overrides: str | None = field(default=None, metadata={"help": "Mapping of keys overriding the sft recipe."})
    reward_overrides: str | None = field(default=None, metadata={"help": "Mapping overriding the reward recipe."})
    ppo_overrides: str | None = field(default=None, metadata={"help": "Mapping of keys overriding the ppo recipe."})
    grpo: str | None = field(default=None, metadata={"help": "Recipe of the last step with method: grpo."})
    grpo_overrides: str | None = field(default=None, metadata={"help": "Mapping of keys overriding the grpo recipe."})
    rloo: str | None = field(default=None, metadata={"help": "Recipe of the last step with method: rloo."})
    rloo_overrides: str | None = field(default=None, metadata={"help": "Mapping of keys overriding the rloo recipe."})
    dpo: str | None = field(default=None, metadata={"help": "Recipe of the dpo step (method: dpo)."})
    dpo_overrides: str | None = field(default=None, metadata={"help": "Mapping of keys overriding the dpo recipe."})
    kto: str | None = field(default=None, metadata={"help": "Recipe of the kto step (method: kto)."})
    kto_overrides: str | None = field(default=None, metadata={"help": "Mapping of keys overriding the kto recipe."})
    orpo: str | None = field(default=None, metadata={"help": "Recipe of the orpo step (method: orpo)."})
    orpo_overrides: str | None = field(default=None, metadata={"help": "Mapping of keys overriding the orpo recipe."})
    simpo: str | None = field(default=None, metadata={"help": "Recipe of the simpo step (method: simpo)."})
    simpo_overrides: str | None = field(default=None, metadata={"help": "Mapping overriding the simpo recipe."})
    force: bool = field(default=False, metadata={"help": "Rerun every step even when its output is complete."})
    # not a recipe key: the pipeline recipe's own PASSED_TO_STEPS values, set by `recipe.build_recipe` (a field, so
    # that `dataclasses.replace` of the arguments, as `hfgen compare` makes them, keeps them)
    passed_to_steps: dict = field(default_factory=dict, metadata={"recipe_key": False})


ARGUMENTS = (RLHFArguments,)


INPUT_MODEL_KEYS = ("model_name_or_path", "reward_model_path", "value_model_path")  # a step's models to read

# The keys of every recipe (`recipe.RunArguments`) about how a run stops, which the pipeline recipe passes on to each
# step whose own recipe and `<step>_overrides` leave them out: each step is a run of its own, which read only its
# own recipe, so `save_on_signal: true` on the pipeline recipe was accepted and a preempted step saved nothing.
PASSED_TO_STEPS = ("save_on_signal", "nan_tolerance")


def check(args: RLHFArguments) -> list[str]:
    """Every step recipe exists, is of the right stage, has valid keys and values (the stage's own checks, less
    those about the models earlier steps make: they are checked when the step runs), and writes a dir of its own."""
    problems = []
    if args.method not in METHODS or not hasattr(args, args.method):
        available = [method for method in METHODS if hasattr(args, method)]
        return problems + [f"method '{args.method}' is not one of {', '.join(available)}"]
    if args.prerequisite and not Path(args.prerequisite).is_file():
        problems.append(f"prerequisite recipe '{args.prerequisite}' does not exist")
    # (name, recipe) in the order they run: the prerequisite, then the steps
    recipes = []
    if args.prerequisite and Path(args.prerequisite).is_file():
        try:
            recipes.append(("prerequisite", prerequisite_recipe(args, check_inputs=False)))
        except UserError as error:
            problems.append(f"prerequisite: {error}")
    for step in pipeline_steps(args):
        if not getattr(args, step):
            problems.append(f"{step} is not set: name the step's recipe, e.g. recipes/tiny/{step}.yaml")
            continue
        try:
            recipe = step_recipe(args, step, check_inputs=False)
        except UserError as error:
            problems.append(f"step {step}: {error}")
            continue
        if recipe.stage != step:
            problems.append(f"step {step}: recipe '{getattr(args, step)}' is stage '{recipe.stage}', not '{step}'")
            continue
        recipes.append((step, recipe))
    for name, recipe in recipes:
        try:
            _ = recipe.output_dir  # raises when the recipe sets none
        except UserError as error:
            problems.append(f"{'' if name == 'prerequisite' else 'step '}{name}: {error}")
    if problems:
        return problems
    problems += shared_dir_problems(args, recipes)
    # each step's values, before anything trains (a bad ppo_overrides value was found after SFT and reward trained)
    made = [recipe.output_dir for _, recipe in recipes]
    steps = [(name, recipe) for name, recipe in recipes if name != "prerequisite"]
    return problems + [f"step {step}: {problem}" for step, problem in value_problems(steps, made)]


def shared_dir_problems(args: RLHFArguments, recipes: list) -> list[str]:
    """Each step (and the prerequisite, and the pipeline's summary) writes a dir of its own, and no step reads a model
    from the dir of itself or of a later step: a PPO step writing into the SFT step's dir trained over the SFT
    model it had just loaded, then failed."""
    problems, writers = [], {}
    if args.output_dir:
        writers[Path(args.output_dir).resolve()] = "the pipeline's own"
    for index, (name, recipe) in enumerate(recipes):
        label = "the prerequisite" if name == "prerequisite" else f"step {name}"
        where = writers.setdefault(recipe.output_dir.resolve(), f"{label}'s")
        if where != f"{label}'s":
            problems.append(f"{label}: output_dir '{recipe.output_dir}' is also {where}; give each its own dir")
        made_later = {r.output_dir.resolve(): n for n, r in recipes[index:]}
        for key in INPUT_MODEL_KEYS:
            path = recipe.value(key)
            if isinstance(path, str) and Path(path).resolve() in made_later:
                maker = made_later[Path(path).resolve()]
                whose = "its own output_dir" if maker == name else f"the output_dir of step {maker}, which runs later"
                problems.append(f"{label}: {key} '{path}' is {whose}; give the step a model it does not write")
    return problems


def value_problems(recipes: list, made: list[Path]) -> list[tuple[str, str]]:
    """(step, problem) of each step's own checks (`stage.check`), run before anything trains, less the problems
    naming a dir the pipeline writes: the models earlier steps make do not exist yet (or are about to be made
    again); the step checks them when it runs. And each step's precision on this machine (bf16 without a GPU), and
    what the launch asks of it (precision, torch.compile)."""
    from hfgen.recipe import compile_problems, precision_problems
    from hfgen.stages import load_stage

    found = []
    for step, recipe in recipes:
        module = load_stage(recipe.stage)
        problems = module.check(*recipe.configs) if hasattr(module, "check") else []
        problems += precision_problems(recipe.configs, recipe.values) + compile_problems(recipe.configs)
        found += [(step, p) for p in problems if not any(str(path) in p for path in made)]
    return found


def step_recipe(args: RLHFArguments, step: str, check_inputs: bool):
    """The step's recipe file, then the pipeline's wiring (PPO reads the SFT and reward steps' outputs), then the
    user's overrides for the step, which win; then the pipeline recipe's own PASSED_TO_STEPS keys that neither
    the step's recipe nor its overrides set."""
    from hfgen.recipe import build_recipe, read_recipe_file

    path = Path(getattr(args, step))
    values = read_recipe_file(path)
    if step == args.method:
        values["model_name_or_path"] = str(step_recipe(args, "sft", check_inputs=False).output_dir)
        if "reward" in pipeline_steps(args):  # the reward model to train against, or (offline methods) the judge
            values["reward_model_path"] = str(step_recipe(args, "reward", check_inputs=False).output_dir)
    values.update(user_overrides(args, step))
    return build_recipe(with_passed_keys(args, values), source=path, check_inputs=check_inputs)


def prerequisite_recipe(args: RLHFArguments, check_inputs: bool = True):
    """The prerequisite's recipe file, with the pipeline's PASSED_TO_STEPS keys it leaves out, as a step's."""
    from hfgen.recipe import build_recipe, read_recipe_file

    path = Path(args.prerequisite)
    return build_recipe(with_passed_keys(args, read_recipe_file(path)), source=path, check_inputs=check_inputs)


def with_passed_keys(args: RLHFArguments, values: dict) -> dict:
    """A step's values, with the pipeline recipe's own PASSED_TO_STEPS keys that they leave out."""
    return {**values, **{key: value for key, value in args.passed_to_steps.items() if key not in values}}


def user_overrides(args: RLHFArguments, step: str) -> dict:
    text = getattr(args, f"{step}_overrides")
    try:
        overrides = json.loads(text) if text else {}
    except json.JSONDecodeError:
        overrides = None
    if not isinstance(overrides, dict):
        raise UserError(f"{step}_overrides must be a mapping of recipe keys to values, got {text!r}")
    return overrides


def run(args: RLHFArguments) -> Path:
    from hfgen.train import run_step

    consumed = {}  # the runs a step consumes (its inputs): the prerequisite and every earlier step
    if args.prerequisite:
        prerequisite = prerequisite_recipe(args, check_inputs=False)
        if not tracking.is_complete(prerequisite.output_dir):
            say(f"== prerequisite: {args.prerequisite} -> {prerequisite.output_dir}")
            run_step(prerequisite_recipe(args))
        consumed["prerequisite"] = prerequisite.output_dir

    earlier_ran = False
    for step in pipeline_steps(args):
        recipe = step_recipe(args, step, check_inputs=False)
        done = tracking.is_complete(recipe.output_dir)
        # (and of the same inputs: a model or data file outside the pipeline changed in place since, `inputs_changed`)
        changed = tracking.inputs_changed(recipe.output_dir, recipe)
        same = done and tracking.holds_recipe(recipe.output_dir, recipe.to_yaml()) and not changed
        # Whether an earlier step was made again since this one started (complete or interrupted: a checkpoint
        # trained on the old inputs is not resumed). Read from the step's dir, not only remembered here: a stop
        # between two steps (a signal during a step's final save, a kill while the next step cleared its dir) lost
        # that, and the next run skipped a step trained from the old SFT model. (A dir without the record, of a step
        # run by hand, is judged by its recipe alone.)
        inputs = tracking.inputs_of(consumed)
        recorded = tracking.read_json(recipe.output_dir / tracking.INPUTS_RECORD, None)
        inputs_changed = recorded is not None and recorded != inputs
        rerun = args.force or earlier_ran or inputs_changed or bool(changed)
        tracking.wait_for_everyone()  # every rank has read the record before rank 0 rewrites it
        consumed[step] = recipe.output_dir
        if same and not rerun:
            say(f"== {step}: {recipe.output_dir} is complete, skipped (--force redoes it)")
            continue
        why = (
            "forced"
            if args.force
            else "an earlier step ran"
            if earlier_ran
            else "an earlier step was made again since it ran"
            if inputs_changed
            else f"its inputs changed since it ran ({'; '.join(changed)})"
            if changed
            else "recipe changed"
            if done
            else "interrupted"
            if (recipe.output_dir / "recipe.yaml").is_file()
            else "no output yet"
        )
        say(f"== {step} ({why}): {getattr(args, step)} -> {recipe.output_dir}")
        run_step(step_recipe(args, step, check_inputs=True), fresh=rerun, inputs=inputs)
        earlier_ran = True  # every later step consumes this step's output

    if not tracking.is_main_process():
        return Path(args.output_dir)  # the summary is rank 0's to print and write
    summary = summarise(args)
    say(format_summary(summary))
    tracking.update_eval(args.output_dir, summary)
    return Path(args.output_dir)


def say(message: str) -> None:
    if tracking.is_main_process():
        print(message, flush=True)


def summarise(args: RLHFArguments) -> dict:
    """The pipeline's figures, read from each step's eval.json and COMPLETE marker."""
    from hfgen.recipe import load_recipe

    steps = {step: step_recipe(args, step, check_inputs=False).output_dir for step in pipeline_steps(args)}
    if args.prerequisite:
        steps = {"prerequisite": load_recipe(args.prerequisite, check_inputs=False).output_dir, **steps}
    results = {f"wall_time_s/{step}": tracking.read_json(path / tracking.COMPLETE_MARKER)["wall_time_s"]
               for step, path in steps.items()}  # fmt: skip
    results |= {f"output_dir/{step}": str(path) for step, path in steps.items()}
    sft, method = (tracking.read_json(steps[step] / "eval.json") for step in ("sft", args.method))
    results |= {"method": args.method, "sft/held_out_response_loss": sft["response_loss"]}
    if "reward" in steps:
        results["reward/accuracy"] = tracking.read_json(steps["reward"] / "eval.json")["accuracy"]
    # The method step's held-out comparison with the SFT model (absent when its recipe switches it off)
    results |= {key: value for key, value in method.items() if key.split("/")[0] in ("sft", args.method, "win_rate")}
    results |= {key: method[key] for key in ("kl_to_reference",) if key in method}
    return results


def format_summary(summary: dict) -> str:
    method = summary.get("method", "ppo")
    name = method.upper()
    rows = [("SFT held-out response loss", summary["sft/held_out_response_loss"])]
    if "reward/accuracy" in summary:
        rows.append(("reward model accuracy (held-out pairs)", summary["reward/accuracy"]))
    judges = [key.split("/", 1)[1] for key in summary if key.startswith("win_rate/")]
    for judge in sorted(judges, key=lambda j: (j not in ("reward_model", "oracle"), j)):
        if summary.get(f"{method}/{judge}") is not None and summary.get(f"sft/{judge}") is not None:
            label = judge if judge.endswith("score") else f"{judge} score"
            rows += [(f"{label}: SFT -> {name}", f"{summary[f'sft/{judge}']:.3f} -> {summary[f'{method}/{judge}']:.3f}"),
                     (f"{judge} win rate of {name} over SFT", summary[f"win_rate/{judge}"])]  # fmt: skip
    if f"{method}/exact_match" in summary:
        rows.append(
            (
                f"exact match: SFT -> {name}",
                f"{summary['sft/exact_match']:.3f} -> {summary[f'{method}/exact_match']:.3f}",
            )
        )
    if "kl_to_reference" in summary:
        rows.append((f"KL({name} || SFT) per response, nats", summary["kl_to_reference"]))
    rows += [
        (f"wall time {key.split('/')[1]}, s", value) for key, value in summary.items() if key.startswith("wall_time_s/")
    ]
    width = max(len(label) for label, _ in rows)
    lines = ["", f"RLHF pipeline summary ({method}; held-out prompts)"]
    for label, value in rows:
        lines.append(f"  {label:<{width}}  {value:.3f}" if isinstance(value, float) else f"  {label:<{width}}  {value}")
    return "\n".join(lines)
