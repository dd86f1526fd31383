"""Compare post-SFT methods side by side: `hfgen compare RECIPE --methods ppo,dpo,kto --seeds 3`.

    hfgen compare recipes/tiny/compare.yaml --methods ppo,dpo,kto --seeds 3
    hfgen compare recipes/tiny/compare.yaml --methods dpo,kto --seeds 1 --prompts 256 --output_root /tmp/cmp

RECIPE is an `rlhf` pipeline recipe naming the SFT step, the reward step and one step recipe per method (`ppo:`,
`dpo:`, `kto:`, ...). The SFT model (and the reward model, when a method needs one or the recipe names it) is
trained once, as `hfgen train RECIPE` would; then every method trains from that one SFT model, once per seed, into
ROOT/METHOD/seed=S (ROOT: --output_root, default the pipeline's output_dir + "-compare").

Matched budget: every method sees the same number of training prompts (--prompts, default 1024). For PPO an
episode is one prompt (total_episodes); for the offline methods a preference pair is one prompt, so they train
ceil(prompts / batch) optimizer steps of per_device_train_batch_size x gradient_accumulation_steps pairs (KTO:
twice the rows, since each pair becomes a desirable and an undesirable row). Each run's own held-out evaluation is
switched off; instead all runs are evaluated alike afterwards (hfgen.evaluation.policy): the same held-out prompts,
samples and random numbers for every method and seed, against the same SFT answers, judged by the learned reward
model (when there is one) and the oracle.

ROOT/report.html (self-contained) holds, per method and seed: oracle and reward-model win rate over SFT with
bootstrap 95% intervals (prompts resampled), the reward-model-vs-oracle gap (reward-model win rate minus oracle win
rate: how much a method games the learned reward), KL to SFT, diversity (distinct-2, self-BLEU), response length,
wall time and peak memory; and each method's training curves side by side. Resumable like `hfgen sweep`: a run
already complete with the same resolved recipe, trained from the same SFT (and reward) model, is not retrained
(a retrained SFT model retrains every run, as a pipeline step that runs reruns the later steps), and its evaluation
is redone only when a model it reads was trained again or the evaluation settings change. A run dir that holds the
complete run of another recipe, or an unfinished one with complete checkpoints, is refused before anything trains
(--overwrite_output_dir true trains over it).
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import math
import os
import signal
import sys
from pathlib import Path

from hfgen import guard
from hfgen.errors import UserError

EVAL_FILE = "compare_eval.json"  # a run's comparison figures, beside the rows in ROWS_FILE
ROWS_FILE = "compare_eval.jsonl"  # the evaluation's rows, whose bootstrap gives the report's intervals
# A run's record of the SFT and reward models it was trained from (`model_stamp`) is a pipeline step's record of the
# runs it consumed (`tracking.INPUTS_RECORD`), written by `train.run_recipe` once the run's dir is cleared for a fresh
# start; an older hfgen wrote it, before training, into this file, which that clearing deleted
OLD_INPUTS_FILE = "compare_inputs.json"
OFFLINE = ("dpo", "kto", "orpo", "simpo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hfgen.evaluation.command import ORACLE_HELP
    from hfgen.recipe import expand_home

    parser.add_argument("recipe", type=expand_home, help="an rlhf pipeline recipe naming one step recipe per method")
    parser.add_argument("--methods", default="ppo,dpo,kto", help="comma-separated methods (default ppo,dpo,kto)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    parser.add_argument("--prompts", type=int, default=1024, help="training prompts seen by every method")
    parser.add_argument("--output_root", type=expand_home, help="where the runs and report.html go")
    parser.add_argument("--eval_dataset", default="embedded:prompts", help="held-out prompts (its test split)")
    parser.add_argument("--num_prompts", type=int, default=51, help="held-out prompts (default 51)")
    parser.add_argument("--samples_per_prompt", type=int, default=4, help="answers per prompt and policy")
    parser.add_argument("--response_length", type=int, default=24, help="maximum new tokens per answer")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    parser.add_argument("--oracle", default="auto", help=ORACLE_HELP)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(accepts_overrides=True)
    parser.epilog = "Other --key value pairs override every method's recipe, e.g. --learning_rate 1e-4."


def main(args: argparse.Namespace) -> int:
    from hfgen import tracking
    from hfgen.recipe import load_recipe
    from hfgen.stages import rlhf
    from hfgen.train import check_step_output_dir

    pipeline = load_recipe(args.recipe)
    if pipeline.stage != "rlhf":
        raise UserError(
            f"hfgen compare: '{args.recipe}' is a {pipeline.stage} recipe; compare takes a pipeline recipe (stage: "
            "rlhf) that names a step recipe for each method, e.g. recipes/tiny/compare.yaml"
        )
    (base,) = pipeline.configs
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    named = [m for m in rlhf.METHODS if getattr(base, m, None)]
    unknown = [m for m in methods if m not in named]
    if unknown or not methods:
        raise UserError(f"hfgen compare: --methods {unknown or args.methods}: each must be a method whose step "
                        f"recipe the pipeline '{args.recipe}' names ({', '.join(named) or 'none'})")  # fmt: skip
    if twice := sorted({m for m in methods if methods.count(m) > 1}):  # (one run, listed twice in the report)
        raise UserError(
            f"hfgen compare: --methods {args.methods} names {', '.join(twice)} twice; give each method once"
        )
    if args.seeds < 1 or args.prompts < 1:
        raise UserError("hfgen compare: --seeds and --prompts must be at least 1")
    if problems := evaluation_problems(args):  # found after all the training, they cost every run
        raise UserError(f"hfgen compare: nothing was run: {'; '.join(problems)}.")
    root = Path(args.output_root) if args.output_root else Path(f"{base.output_dir}-compare")
    if args.quiet:
        from hfgen.evaluation.command import quiet_libraries

        quiet_libraries()

    # Every run's recipe, validated before anything trains (inputs are checked when the run starts).
    runs = {}
    for method in methods:
        for seed in range(args.seeds):
            runs[(method, seed)] = point_recipe(base, method, seed, root, args)

    # A run dir holding the complete or unfinished run of another recipe is refused before anything trains, as
    # `hfgen sweep` refuses it (a retrain of the SFT model must not come first, only for the points to fail).
    # (and a root that cannot be written: the shared SFT step trained first, then the first run failed to start)
    problems = [problem] if (problem := tracking.path_problem(root, "--output_root", directory=True)) else []
    for recipe in runs.values():
        try:
            check_step_output_dir(recipe)
        except UserError as error:
            problems.append(str(error))
    if problems:
        raise UserError(f"hfgen compare: nothing was run: {' '.join(problems)} (for hfgen compare: "
                        "--overwrite_output_dir true, or another --output_root)")  # fmt: skip

    # The shared steps: prerequisite, SFT and (when any method needs it) the reward model, as `hfgen train` runs them.
    needs_reward = any("reward" in rlhf.pipeline_steps(dataclasses.replace(base, method=m)) for m in methods)
    shared = dataclasses.replace(base, force=False)
    run_shared_steps(shared, needs_reward)
    sft_dir = rlhf.step_recipe(shared, "sft", check_inputs=False).output_dir
    reward_dir = rlhf.step_recipe(shared, "reward", check_inputs=False).output_dir if needs_reward else None
    # Which SFT and reward models a run was trained from: a run of an older SFT model is stale even though its
    # recipe (which names the SFT model by its path) is the same. The offline methods train without the reward
    # model (it only judges them, below).
    sft_stamp, reward_stamp = model_stamp(sft_dir), model_stamp(reward_dir) if reward_dir else None

    print(f"compare: {len(runs)} runs ({', '.join(methods)} x {args.seeds} seeds) under {root}, "
          f"{args.prompts} training prompts each")  # fmt: skip
    for index, ((method, seed), recipe) in enumerate(runs.items(), 1):
        run_dir = recipe.output_dir
        label = f"[{index}/{len(runs)}] {method} seed {seed}"
        done, changed = tracking.complete_as_recipe(run_dir, recipe)  # (changed: its data or models, in place)
        inputs = {"sft": sft_stamp, "reward": None if method in OFFLINE else reward_stamp}
        recorded = tracking.read_json(run_dir / tracking.INPUTS_RECORD, None)
        same_inputs = (recorded or tracking.read_json(run_dir / OLD_INPUTS_FILE, {})) == inputs
        if done and same_inputs:
            print(f"{label}: already complete, skipped")
        else:
            why = (
                f" (its inputs changed since it ran: {'; '.join(changed)})"
                if changed
                else " (trained from an older SFT or reward model, or not recorded)"
                if done
                else ""
            )
            print(f"{label}: training{why} -> {run_dir}", flush=True)
            # recorded when it starts: an interrupted run of these inputs continues from its checkpoint (run_step),
            # one begun from other inputs starts over
            train_point(recipe, args.quiet, fresh=not same_inputs or bool(changed), inputs=inputs)
        evaluate_point(run_dir, method, sft_dir, reward_dir, args)
    report = write_compare_report(root, runs, methods, args)
    print(f"report: {report}")
    return 0


# ---- runs -------------------------------------------------------------------------------------------------


def point_recipe(base, method: str, seed: int, root: Path, args):
    """The method's step recipe as the pipeline wires it (SFT model, reward model), with the seed, the matched
    budget, its own output dir and its own evaluation switched off."""
    from hfgen.recipe import build_recipe, parse_overrides
    from hfgen.stages import rlhf

    wired = rlhf.step_recipe(dataclasses.replace(base, method=method), method, check_inputs=False)
    values = {"stage": wired.stage, **wired.values, **parse_overrides(args.overrides, wired.stage)}
    values |= {"seed": seed, "output_dir": str(root / method / f"seed={seed}")}
    if method in OFFLINE:
        values["eval_samples_per_prompt"] = 0
        per_step = int(values.get("per_device_train_batch_size", 8)) * int(values.get("gradient_accumulation_steps", 1))
        rows = 2 * args.prompts if method == "kto" else args.prompts  # KTO: a pair is two unpaired rows
        values |= {"max_steps": math.ceil(rows / per_step), "max_train_samples": None}
    else:  # online methods: one episode is one prompt
        values |= {"total_episodes": args.prompts, "eval_samples_per_prompt": 0}
    return build_recipe(values, source=wired.source, check_inputs=False)


def run_shared_steps(shared, needs_reward: bool) -> None:
    """Prerequisite, SFT and reward steps, skipped when complete with the same recipe (as the pipeline does). An
    interrupted step continues from its checkpoint (`run_step`) unless an earlier step ran just now; a complete step
    of another recipe is trained over only with its overwrite_output_dir (`run_recipe` refuses it otherwise)."""
    from hfgen import tracking
    from hfgen.stages import rlhf
    from hfgen.train import run_recipe, run_step

    if shared.prerequisite:
        prerequisite = rlhf.prerequisite_recipe(shared, check_inputs=False)
        if not tracking.is_complete(prerequisite.output_dir):
            print(f"== prerequisite: {shared.prerequisite} -> {prerequisite.output_dir}")
            run_step(rlhf.prerequisite_recipe(shared))
    ran = False
    for step in ("sft", "reward") if needs_reward else ("sft",):
        recipe = rlhf.step_recipe(shared, step, check_inputs=False)
        done = tracking.is_complete(recipe.output_dir)
        # (its inputs: the prerequisite, the SFT model, data, each as it is now, not only by its path; fingerprinted
        # only for a complete step)
        if done and tracking.complete_as_recipe(recipe.output_dir, recipe)[0]:
            print(f"== {step}: {recipe.output_dir} is complete, reused")
            continue
        print(f"== {step}: -> {recipe.output_dir}")
        step_recipe = rlhf.step_recipe(shared, step, check_inputs=True)
        if done:
            run_recipe(step_recipe)
        else:
            run_step(step_recipe, fresh=ran)
        ran = True


def train_point(recipe, quiet: bool, fresh: bool, inputs: dict) -> None:
    """Train one run in a child process, so that its peak memory is its own (written to peak_memory.json); as a
    sweep point (`run_step`: an interrupted run continues from its checkpoint, unless `fresh`), recording `inputs`."""
    recipe.output_dir.mkdir(parents=True, exist_ok=True)
    path = recipe.output_dir / "compare_recipe.yaml"
    path.write_text(recipe.to_yaml(), encoding="utf-8")
    code = (
        "import json; from hfgen.compare import run_point; "
        f"run_point({str(path)!r}, {quiet!r}, {fresh!r}, json.loads({json.dumps(inputs)!r}))"
    )
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    returncode = guard.run_child([sys.executable, "-c", code], env=env)
    if returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # stopped by a signal (its checkpoint is saved)
        sys.exit(returncode)
    if returncode == 2:  # the child's one-paragraph error is above
        raise UserError(f"hfgen compare: the run {recipe.output_dir} was refused (why is above); fix that, then rerun "
                        "the same command: complete runs are skipped")  # fmt: skip
    if returncode != 0:
        raise UserError(f"hfgen compare: the run {recipe.output_dir} failed (its output is above); the same command "
                        "continues it from its newest complete checkpoint, and skips the runs that are complete")  # fmt: skip


def run_point(recipe_path: str, quiet: bool = False, fresh: bool = False, inputs: dict | None = None) -> None:
    """The child process of `train_point`: the recipe's run (`run_step`), then the process's peak memory."""
    import torch

    from hfgen import tracking
    from hfgen.cli import deepspeed_logs_to_stderr, printable_stdout
    from hfgen.data.loading import datasets_cache_unwritable_exits_2
    from hfgen.errors import disk_full_exits_2, exit_on_interrupt, exit_on_user_error
    from hfgen.evaluation.speed import peak_memory, reset_peak_memory
    from hfgen.recipe import load_recipe
    from hfgen.train import run_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    printable_stdout()  # (a child process: not through hfgen.cli.main)
    deepspeed_logs_to_stderr()
    # a full disk as `hfgen train` says it (hfgen.train.main): the run's, or datasets' cache's
    with exit_on_interrupt(), exit_on_user_error(), datasets_cache_unwritable_exits_2():
        recipe = load_recipe(recipe_path)
        if quiet:  # as `hfgen sweep --quiet` runs its points: no progress bars of its own nor of the libraries
            from hfgen.evaluation.command import quiet_libraries

            quiet_libraries()
            for config in recipe.configs:
                if hasattr(config, "disable_tqdm"):
                    config.disable_tqdm = True
        reset_peak_memory(device)
        with disk_full_exits_2(recipe.output_dir), datasets_cache_unwritable_exits_2():
            run_step(recipe, fresh=fresh, inputs=inputs)
    megabytes, kind = peak_memory(device)
    tracking.write_json(Path(recipe.output_dir) / "peak_memory.json", {"peak_memory_mb": megabytes, "kind": kind})


# ---- evaluation -------------------------------------------------------------------------------------------


def model_stamp(model_dir: Path) -> dict | None:
    """What tells one training of a model dir from the next: its COMPLETE marker (finish time and wall time),
    rewritten by every run that finishes there. Cheap, unlike hashing the weights of a large model."""
    from hfgen import tracking

    return tracking.read_json(Path(model_dir) / tracking.COMPLETE_MARKER, None)


def evaluation_settings(args) -> dict:
    """What an evaluation's figures depend on besides the models: a cached one of other settings is redone. The
    prompts are keyed on their file's content (`fingerprint.path_fingerprint`), not only its name: a file rewritten
    under its name is other prompts; so is the oracle on its module's source (an oracle fixed in place judges anew)."""
    from hfgen import fingerprint
    from hfgen.evaluation.command import oracle_spec
    from hfgen.rl.rollout import import_module_or_file

    keys = ("eval_dataset", "num_prompts", "samples_per_prompt", "response_length", "temperature", "oracle")
    settings = {key: getattr(args, key) for key in keys}
    content = fingerprint.path_fingerprint(args.eval_dataset) if args.eval_dataset else None
    if content:
        settings["eval_dataset_content"] = content["digest"]
    if oracle := oracle_spec(args.oracle, args.eval_dataset):  # (importable: `evaluation_problems` checked it)
        source = getattr(import_module_or_file(oracle.rpartition(":")[0]), "__file__", None)
        settings["oracle_source"] = fingerprint.file_fingerprint(Path(source)) if source else None
    return settings


def evaluation_problems(args) -> list[str]:
    """The evaluation options' problems, with `hfgen eval`'s checks (its --num_samples is --samples_per_prompt here)."""
    from hfgen.evaluation.command import load_prompts, resolve_oracle
    from hfgen.generate import sampling_problems

    problems = [
        f"--{name} must be at least 1" for name in ("num_prompts", "response_length") if getattr(args, name) < 1
    ]
    sampling = sampling_problems(args.samples_per_prompt, args.temperature, top_p=1.0)
    problems += [problem.replace("--num_samples", "--samples_per_prompt") for problem in sampling]
    for check in (lambda: resolve_oracle(args.oracle, args.eval_dataset),
                  lambda: load_prompts(args.eval_dataset, "test", "prompt", 1)):  # fmt: skip
        try:
            check()
        except UserError as error:
            problems.append(str(error))
    return problems


def evaluate_point(run_dir: Path, method: str, sft_dir: Path, reward_dir: Path | None, args) -> dict:
    """The run's policy against the SFT model on the held-out prompts (hfgen.evaluation.policy); cached in the run
    dir and redone when the evaluation settings change or any of the models it reads was trained again."""
    import torch
    from accelerate import PartialState

    from hfgen import tracking
    from hfgen.evaluation.command import load_prompts, resolve_oracle
    from hfgen.evaluation.policy import Sampling, compare_to_reference, distinct_prompts, load_judges
    from hfgen.models import adapter_base, load_causal_lm, load_tokenizer

    settings = {**evaluation_settings(args), "reward_model": str(reward_dir) if reward_dir else None}
    settings["prompts"] = "distinct"  # an evaluation cached before repeated prompts were answered once is redone
    settings["models"] = {"policy": model_stamp(run_dir), "sft": model_stamp(sft_dir)}
    settings["models"]["reward"] = model_stamp(reward_dir) if reward_dir else None
    cached = tracking.read_json(run_dir / EVAL_FILE, {})
    if cached.get("settings") == settings and tracking.read_jsonl(run_dir / ROWS_FILE):  # (the report reads both)
        return cached
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(str(run_dir))
    policy = load_causal_lm(str(run_dir), "float32").to(device)
    reference = None if adapter_base(run_dir) else load_causal_lm(str(sft_dir), "float32").to(device)
    scorer, _ = load_judges(str(reward_dir) if reward_dir else None, None, 64, device)
    oracle = resolve_oracle(args.oracle, args.eval_dataset)
    prompts = distinct_prompts(load_prompts(args.eval_dataset, "test", "prompt", None))[: args.num_prompts]
    sampling = Sampling(args.samples_per_prompt, args.response_length, args.temperature, seed=1234)
    results, rows = compare_to_reference(
        PartialState(), policy, reference, tokenizer, prompts, sampling, scorer, oracle, name="policy"
    )
    tracking.write_jsonl(run_dir / ROWS_FILE, rows)
    record = {"settings": settings, "method": method, "results": results}
    tracking.write_json(run_dir / EVAL_FILE, record)
    return record


# ---- report -----------------------------------------------------------------------------------------------


def run_figures(run_dir: Path) -> dict:
    """The report's figures of one run, with bootstrap intervals from its evaluation rows."""
    from hfgen import tracking
    from hfgen.evaluation.policy import bootstrap_interval, scored
    from hfgen.evaluation.text import win_rate

    results = tracking.read_json(run_dir / EVAL_FILE)["results"]
    rows = tracking.read_jsonl(run_dir / ROWS_FILE)
    figures = dict(results)
    for judge in ("oracle", "reward_model"):
        ours, sft = f"policy/{judge}", f"sft/{judge}"
        # over the pairs the judge scored on both sides, as its win rate (`policy.compared_figures`); none: no interval
        pairs = [row for row in rows if scored(row.get(ours)) and scored(row.get(sft))]
        if pairs:
            figures[f"ci/{judge}"] = bootstrap_interval(
                pairs, lambda sample, a=ours, b=sft: win_rate([r[a] for r in sample], [r[b] for r in sample])
            )
    if figures.get("win_rate/reward_model") is not None and figures.get("win_rate/oracle") is not None:
        figures["gap"] = figures["win_rate/reward_model"] - figures["win_rate/oracle"]
    complete = tracking.read_json(run_dir / tracking.COMPLETE_MARKER, {})
    figures["wall_time_s"] = complete.get("wall_time_s")
    figures["peak_memory_mb"] = tracking.read_json(run_dir / "peak_memory.json", {}).get("peak_memory_mb")
    return figures


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def with_interval(figures: dict, judge: str) -> str:
    value = figures.get(f"win_rate/{judge}")
    if value is None:
        return "–"
    low, high = figures[f"ci/{judge}"]
    return f"{value:.3f} <span class='ci'>[{low:.3f}, {high:.3f}]</span>"


def write_compare_report(root: Path, runs: dict, methods: list[str], args) -> Path:
    from hfgen.report import STYLE, curve_figure, load_run, metric_groups, png_base64, table

    figures = {key: run_figures(recipe.output_dir) for key, recipe in runs.items()}
    header = ["method", "seed", "oracle win rate [95% CI]", "reward-model win rate [95% CI]", "RM − oracle gap",
              "KL to SFT (nats)", "distinct-2", "self-BLEU", "length (tokens)", "wall time (s)", "peak memory (MB)"]  # fmt: skip

    def row(method, seed, f):
        return [html.escape(method), str(seed), with_interval(f, "oracle"), with_interval(f, "reward_model"),
                fmt(f.get("gap")), fmt(f.get("kl_to_reference")), fmt(f.get("policy/distinct_2")),
                fmt(f.get("policy/self_bleu")), fmt(f.get("policy/response_length"), 1), fmt(f.get("wall_time_s"), 1),
                fmt(f.get("peak_memory_mb"), 0)]  # fmt: skip

    rows = [row(method, seed, f) for (method, seed), f in figures.items()]
    means = []
    for method in methods:
        group = [f for (m, _), f in figures.items() if m == method]
        keys = ("win_rate/oracle", "win_rate/reward_model", "gap", "kl_to_reference", "policy/distinct_2",
                "policy/self_bleu", "policy/response_length", "wall_time_s", "peak_memory_mb")  # fmt: skip
        mean = {k: sum(f[k] for f in group) / len(group) for k in keys if all(f.get(k) is not None for f in group)}
        means.append([html.escape(method), str(len(group))] + [fmt(mean.get(k)) for k in keys])
    first = next(iter(figures.values()))
    sft = [["SFT (the common starting point)", fmt(first.get("sft/oracle")), fmt(first.get("sft/reward_model")),
            fmt(first.get("sft/distinct_2")), fmt(first.get("sft/self_bleu")), fmt(first.get("sft/response_length"), 1)]]  # fmt: skip

    parts = [f"<h1>hfgen compare: {html.escape(', '.join(methods))}</h1>"]
    parts.append(
        f"<p>One SFT model, one data and reward setup. Matched budget: every run saw <b>{args.prompts} training "
        "prompts</b> (PPO: episodes; offline methods: preference pairs, KTO as two unpaired rows each). All runs "
        f"answer the same {args.num_prompts} held-out prompts of {html.escape(args.eval_dataset)} "
        f"{args.samples_per_prompt} times, with the same random numbers as the SFT model they are compared with. "
        "Win rates count ties as one half; intervals are percentile bootstrap 95% intervals over prompts.</p>"
    )
    parts.append("<h2>Per run</h2>" + table(header, rows, "eval"))
    parts.append("<h2>Mean over seeds</h2>" + table(
        ["method", "seeds", "oracle win rate", "RM win rate", "RM − oracle gap", "KL to SFT", "distinct-2",
         "self-BLEU", "length", "wall time (s)", "peak memory (MB)"], means, "eval"))  # fmt: skip
    parts.append("<h2>SFT</h2>" + table(["", "oracle score", "reward-model score", "distinct-2", "self-BLEU",
                                         "length"], sft, "eval"))  # fmt: skip
    parts.append("<h2>Training curves</h2><div class='side'>")
    for method in methods:
        method_runs = [load_run(runs[(m, s)].output_dir, f"{m} seed {s}") for (m, s) in runs if m == method]
        groups = metric_groups(method_runs)
        for title, keys in groups[:2]:  # loss, and rewards/scores: the curves to compare at a glance
            image = png_base64(curve_figure(method_runs, keys[:3], f"{method}: {title}"))
            parts.append(f"<div><img class='plot' alt='{html.escape(method)} {html.escape(title)}' "
                         f"src='data:image/png;base64,{image}'></div>")  # fmt: skip
    parts.append("</div>")
    style = STYLE + ".ci { color: #777; font-size: 0.85em; } .side { display: flex; flex-wrap: wrap; gap: 1em; }"
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>hfgen compare</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")  # fmt: skip
    out = root / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
