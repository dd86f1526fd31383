"""The three-step RLHF pipeline (Ouyang et al. 2022) in one recipe: supervised fine-tuning -> reward model -> PPO.

    hfgen train recipes/tiny/rlhf.yaml            (what `make demo` runs)
    hfgen train recipes/tiny/rlhf.yaml --force    (redo every step)
    ACCELERATE_USE_CPU=true accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml scripts/train.py recipes/tiny/rlhf.yaml

The pipeline recipe names one step recipe per step, each with optional overrides (a mapping of recipe keys).
Each step runs through `hfgen.train.run_recipe`, the entry a user calls (no stage imports another), into its own
recipe's output_dir, so a step run by hand and the same step run here are one run. The outputs are wired
forward: the SFT model becomes PPO's policy and reference, the reward model PPO's reward model and (by PPO's
default) its value model's initialisation. A `prerequisite` recipe (the tiny pretraining) runs first when its
output is missing.

A step is skipped when its output dir is complete (COMPLETE marker) and was made by the same resolved recipe; a
step that runs makes every later step run too, since its inputs changed; `--force` reruns every step (not the
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

METHODS = ("ppo", "grpo", "rloo", "dpo", "kto", "orpo", "simpo")  # the third step; each step's recipe must be
OFFLINE_METHODS = ("dpo", "kto", "orpo", "simpo")  # of the stage of the same name. These learn from the preference
# pairs directly: the reward-model step runs only when a `reward:` recipe is given, as a judge of the evaluation.


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
    dpo: str | None = field(default=None, metadata={"help": "Recipe of the dpo step (method: dpo)."})
    dpo_overrides: str | None = field(default=None, metadata={"help": "Mapping of keys overriding the dpo recipe."})
    kto: str | None = field(default=None, metadata={"help": "Recipe of the kto step (method: kto)."})
    kto_overrides: str | None = field(default=None, metadata={"help": "Mapping of keys overriding the kto recipe."})
    orpo: str | None = field(default=None, metadata={"help": "Recipe of the orpo step (method: orpo)."})
    orpo_overrides: str | None = field(default=None, metadata={"help": "Mapping of keys overriding the orpo recipe."})
    simpo: str | None = field(default=None, metadata={"help": "Recipe of the simpo step (method: simpo)."})
    simpo_overrides: str | None = field(default=None, metadata={"help": "Mapping overriding the simpo recipe."})
    force: bool = field(default=False, metadata={"help": "Rerun every step even when its output is complete."})


ARGUMENTS = (RLHFArguments,)


def pipeline_steps(args: RLHFArguments) -> tuple[str, ...]:
    """("sft", "reward", method) when the method needs a reward model or a reward recipe is set, else ("sft", method)."""
    if args.method in OFFLINE_METHODS and not args.reward:
        return ("sft", args.method)
    return ("sft", "reward", args.method)


def check(args: RLHFArguments) -> list[str]:
    """Every step recipe exists, is of the right stage and has valid keys. Inputs are checked when a step runs,
    since the steps before it make them."""
    problems = [] if args.output_dir else ["output_dir is not set"]
    if args.method not in METHODS or not hasattr(args, args.method):
        available = [method for method in METHODS if hasattr(args, method)]
        return problems + [f"method '{args.method}' is not one of {', '.join(available)}"]
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
    if args.prerequisite and not Path(args.prerequisite).is_file():
        problems.append(f"prerequisite recipe '{args.prerequisite}' does not exist")
    return problems


def step_recipe(args: RLHFArguments, step: str, check_inputs: bool):
    """The step's recipe file, then the pipeline's wiring (PPO reads the SFT and reward steps' outputs), then the
    user's overrides for the step, which win."""
    from hfgen.recipe import build_recipe, read_recipe_file

    path = Path(getattr(args, step))
    values = read_recipe_file(path)
    if step == args.method:
        values["model_name_or_path"] = str(step_recipe(args, "sft", check_inputs=False).output_dir)
        if "reward" in pipeline_steps(args):  # offline methods: the judge of their held-out evaluation
            values["reward_model_path"] = str(step_recipe(args, "reward", check_inputs=False).output_dir)
    values.update(user_overrides(args, step))
    return build_recipe(values, source=path, check_inputs=check_inputs)


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
    from hfgen.recipe import load_recipe
    from hfgen.train import run_recipe

    if args.prerequisite:
        prerequisite = load_recipe(args.prerequisite, check_inputs=False)
        if not tracking.is_complete(prerequisite.output_dir):
            say(f"== prerequisite: {args.prerequisite} -> {prerequisite.output_dir}")
            run_recipe(load_recipe(args.prerequisite))

    rerun = args.force
    for step in pipeline_steps(args):
        recipe = step_recipe(args, step, check_inputs=False)
        done = tracking.is_complete(recipe.output_dir)
        same = done and (recipe.output_dir / "recipe.yaml").read_text() == recipe.to_yaml()
        if same and not rerun:
            say(f"== {step}: {recipe.output_dir} is complete, skipped (--force redoes it)")
            continue
        why = (
            "forced"
            if args.force
            else "an earlier step ran"
            if rerun
            else "recipe changed"
            if done
            else "no output yet"
        )
        say(f"== {step} ({why}): {getattr(args, step)} -> {recipe.output_dir}")
        run_recipe(step_recipe(args, step, check_inputs=True))
        rerun = True  # every later step consumes this step's output

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

    method = args.method
    steps = {step: step_recipe(args, step, check_inputs=False).output_dir for step in pipeline_steps(args)}
    if args.prerequisite:
        steps = {"prerequisite": load_recipe(args.prerequisite, check_inputs=False).output_dir, **steps}
    results = {f"wall_time_s/{step}": tracking.read_json(path / tracking.COMPLETE_MARKER)["wall_time_s"]
               for step, path in steps.items()}  # fmt: skip
    results |= {f"output_dir/{step}": str(path) for step, path in steps.items()}
    results["method"] = method
    sft, tuned = (tracking.read_json(steps[step] / "eval.json") for step in ("sft", method))
    results["sft/held_out_response_loss"] = sft["response_loss"]
    if "reward" in steps:
        results["reward/accuracy"] = tracking.read_json(steps["reward"] / "eval.json")["accuracy"]
    # The method's held-out comparison with SFT (absent when its recipe skips it)
    results |= {key: value for key, value in tuned.items() if key.split("/")[0] in ("sft", method, "win_rate")}
    results |= {key: tuned[key] for key in ("kl_to_reference",) if key in tuned}
    return results


def format_summary(summary: dict) -> str:
    method = summary.get("method", "ppo")
    name = method.upper()
    rows = [("SFT held-out response loss", summary["sft/held_out_response_loss"])]
    if "reward/accuracy" in summary:
        rows.append(("reward model accuracy (held-out pairs)", summary["reward/accuracy"]))
    for judge in ("reward_model", "oracle"):
        if f"{method}/{judge}" in summary:
            rows += [(f"{judge} score: SFT -> {name}", f"{summary[f'sft/{judge}']:.3f} -> {summary[f'{method}/{judge}']:.3f}"),
                     (f"{judge} win rate of {name} over SFT", summary[f"win_rate/{judge}"])]  # fmt: skip
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
