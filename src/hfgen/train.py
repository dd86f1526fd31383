"""Train a stage from a recipe: `hfgen train RECIPE [--key value ...]`.

Recipe keys are the fields of the stage's config dataclasses (transformers TrainingArguments, TRL configs,
hfgen's model and data arguments); any key can be overridden on the command line. Stages:
{stages}

Also runs as `python -m hfgen.train RECIPE ...` and, on many processes or GPUs,
`accelerate launch [--config_file recipes/accelerate/X.yaml] scripts/train.py RECIPE ...`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from hfgen.stages import SUMMARIES

# the stage list of the docstring (`hfgen train --help`), from the registry
__doc__ = __doc__.replace("{stages}", "\n".join(f"  {name:9} {summary}" for name, summary in SUMMARIES.items()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hfgen.recipe import expand_home

    parser.add_argument("recipe", nargs="?", type=expand_home, help="recipe YAML (see recipes/)")
    parser.add_argument(
        "--config", dest="config_file", type=expand_home, help="the recipe, in TRL CLI style (instead of RECIPE)"
    )
    parser.add_argument(
        "--list-keys",
        "--list_keys",
        action="store_true",
        help="print every key the recipe's stage accepts, as `key: default  # what it does`, then exit",
    )
    launch = parser.add_argument_group("several processes (spawns `accelerate launch` for you)")
    launch.add_argument("--num_processes", type=int, help="processes (GPUs) to launch, e.g. 8")
    launch.add_argument(
        "--launch_config", type=expand_home, help="accelerate config, e.g. recipes/accelerate/fsdp.yaml"
    )
    launch.add_argument("--main_process_port", type=int, help="rendezvous port (another one for a second launch)")
    parser.set_defaults(accepts_overrides=True)
    parser.epilog = "Any other --key value pair overrides that key of the recipe, e.g. --learning_rate 1e-4."


def main(args: argparse.Namespace) -> int:
    from hfgen import tracking
    from hfgen.errors import UserError, disk_full_exits_2
    from hfgen.recipe import key_lines, load_recipe, recipe_stage, recipe_values

    recipe_path = args.recipe or args.config_file  # `hfgen.cli.config_as_recipe` makes --config RECIPE the recipe
    if recipe_path is None:
        raise UserError("no recipe given: `hfgen train RECIPE.yaml [--key value ...]` (recipes live under recipes/).")
    if args.list_keys:
        values = recipe_values(recipe_path, args.overrides)
        print("\n".join(key_lines(recipe_stage(values.get("stage"), f"recipe '{recipe_path}'"))))
        return 0
    from hfgen import loop, process_state
    from hfgen.check import check_spawn, launch_dynamo_backend, launch_mixed_precision

    loop.check_launch()  # before parsing: TrainingArguments would set up the processes its own way
    if args.num_processes is not None or args.launch_config or args.main_process_port is not None:
        if args.launch_config and not Path(args.launch_config).is_file():
            raise UserError(
                f"--launch_config '{args.launch_config}' does not exist; presets live in recipes/accelerate/."
            )
        # refused once here, not once per process
        processes = check_spawn(args.num_processes, args.launch_config, args.main_process_port)
        # checked against the precision and compiling the launch will ask of the processes (recipe.precision_problems,
        # recipe.compile_problems), as they will
        launched = {
            "ACCELERATE_MIXED_PRECISION": launch_mixed_precision(args.launch_config),
            "ACCELERATE_DYNAMO_BACKEND": launch_dynamo_backend(args.launch_config),
        }
        with process_state.environment_variables(launched):
            validate_for_processes(recipe_path, args.overrides, processes)
        code = launch_with_accelerate(
            recipe_path, args.overrides, args.num_processes, args.launch_config, args.main_process_port, processes
        )
        if code:  # a failure leaves a command as it does in one process (exit_on_user_error): SystemExit
            sys.exit(code)
        return 0
    from hfgen.data.loading import datasets_cache_unwritable_exits_2
    from hfgen.data.prepare import shared_loads

    if int(os.environ.get("LOCAL_RANK", "0")) != 0:  # a launch's other processes on this machine
        from hfgen.evaluation.command import quiet_libraries

        quiet_libraries()  # one set of data and loading bars per machine, as the Trainer's and log lines

    # The run trains on the data its recipe's check loaded, read once. A full disk is the run's own message (it is
    # unfinished, and how to continue it), or, met by datasets' cache (the check's, the stage's tokenization), the
    # cache's, as is a read-only cache.
    with shared_loads(), datasets_cache_unwritable_exits_2():
        recipe = load_recipe(recipe_path, args.overrides)
        with disk_full_exits_2(recipe.output_dir), datasets_cache_unwritable_exits_2():
            run_recipe(recipe)
    tracking.shutdown_distributed()  # after the stage has returned and its DDP models are gone
    return 0


def validate_for_processes(recipe_path, overrides, processes: int) -> None:
    """Validate the recipe before any process is spawned. TRL's GRPO/RLOO configs check their global batch against
    the world size, which this one process does not know: a recipe they refuse here is checked again with the
    per-device batch sizes times `processes` (the same global batch on one process), and if that passes the
    launched processes judge it at their real world size. A recipe refused that way too is refused with the figures
    of the launched processes (the one-process figures would be another batch); any other refusal stands."""
    import dataclasses

    from hfgen.errors import UserError
    from hfgen.recipe import load_recipe, recipe_values
    from hfgen.stages import load_stage

    try:
        load_recipe(recipe_path, overrides)
        return
    except UserError as error:
        if processes <= 1:
            raise
        refusal = error
    values = recipe_values(recipe_path, overrides)
    defaults = {f.name: f.default for cls in load_stage(values["stage"]).ARGUMENTS for f in dataclasses.fields(cls)}
    scaled = []
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        value = values.get(key, defaults.get(key))
        if isinstance(value, int):
            scaled += [f"--{key}", str(value * processes)]
    try:
        load_recipe(recipe_path, [*overrides, *scaled])
    except UserError as at_scale:
        if str(at_scale) == str(refusal):  # not about the batch: its message names the user's own values
            raise refusal from None
        raise UserError(
            f"on {processes} processes (the batch sizes of {processes} processes, each with the recipe's "
            f"per-device ones): {at_scale}"
        ) from None


def launch_with_accelerate(
    recipe_path,
    overrides,
    num_processes: int | None,
    config_file: str | None,
    main_process_port: int | None = None,
    processes: int = 1,
) -> int:
    """Re-run this same command under accelerate's launcher, which starts one process per device (`processes` of
    them, as `check.check_spawn` counted), and return the launched processes' exit code: a process's own code (2 bad
    input, 3 divergence, 128 + signal after save_on_signal), not the launcher's traceback and exit code 1."""
    import subprocess

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from hfgen import guard, process_state
    from hfgen.check import read_launch_config

    command = ["--config_file", config_file] if config_file else []
    command += ["--num_processes", str(num_processes)] if num_processes else []
    command += ["--main_process_port", str(main_process_port)] if main_process_port is not None else []
    engine = read_launch_config(config_file).get("distributed_type", "NO")  # (check_spawn has read it already)
    if processes > 1 and engine == "NO":
        # without a multi-process config accelerate starts ONE process (its simple launcher), which trained alone
        command.append("--multi_gpu")  # DDP: on CPUs (ACCELERATE_USE_CPU=true, as check_spawn asks) CPU processes
    command += ["--module", "hfgen.train", str(recipe_path), *overrides]
    # their parent (`guard.stop_with_launcher`), for this launch only: left in the caller's environment (a notebook,
    # a driver script), every later launch from it took this process for its launcher and stopped its own ranks
    launcher = {guard.LAUNCHER_PID: guard.launcher_identity()}
    try:
        with process_state.environment_variables(launcher):
            launch_command(launch_command_parser().parse_args(command))
    except subprocess.CalledProcessError as error:  # the one process (its output has been shown)
        return _exit_code(error.returncode)
    except ChildFailedError as error:  # torchrun: the first process that failed
        rank, failure = error.get_first_failure()
        print(f"hfgen: process {rank} of the launch exited with code {failure.exitcode}", file=sys.stderr)
        return _exit_code(failure.exitcode)
    return 0


def _exit_code(returncode: int) -> int:
    """A child's return code as a shell reports it: killed by signal N (returncode -N) -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def run_recipe(recipe, inputs: dict | None = None) -> Path:
    """Run a validated recipe: records first, the stage, then the COMPLETE marker. Used by the CLI and by `rlhf`,
    whose steps record `inputs`, the runs they consume (`tracking.INPUTS_RECORD`), before they train."""
    from hfgen import guard, loop, process_state, tracking
    from hfgen.stages import load_stage

    stage = load_stage(recipe.stage)
    loop.check_launch(getattr(stage, "refused_engines", lambda *configs: {})(*recipe.configs))  # before any model
    started = time.time()
    output_dir = recipe.output_dir
    # The rlhf pipeline's own dir holds only its summary: a rerun with other settings skips or redoes its steps,
    # each of which is checked in its own dir (`run_step`).
    overwrite = recipe.run.overwrite_output_dir or recipe.stage == "rlhf"
    if tracking.nothing_to_resume(recipe.value("resume_from_checkpoint"), output_dir):
        for config in (*recipe.configs, recipe.run):  # a fresh start: the dir is cleared like one's
            if hasattr(config, "resume_from_checkpoint"):
                config.resume_from_checkpoint = None
    resuming = tracking.resume_requested(recipe.value("resume_from_checkpoint"))
    tracking.forget_resumed_loss_windows()  # (another run in this process may have resumed from the same path)
    read_from = tracking.current_inputs(recipe)  # what its input paths hold, before the stage reads them
    recipe_yaml = recipe.to_yaml()  # (what the resume is compared with, then recipe.yaml)
    if resuming:  # before the records are rewritten: a refused resume leaves the dir's run as it was (COMPLETE kept)
        tracking.check_resume_target(recipe.value("resume_from_checkpoint"), output_dir, read_from, recipe_yaml)
    tracking.write_run_records(output_dir, recipe_yaml, overwrite=overwrite, resuming=resuming)
    try:  # from here the dir is locked: a refusal below unlocks it too (a pipeline, a test, runs on in this process)
        tracking.check_output_dir_shared(output_dir)
        tracking.record_inputs(output_dir, read_from)  # (a checkpoint's state copies it)
        trained_on = tracking.input_runs(recipe)  # before the stage loads them: the runs whose weights it trains on
        if inputs is not None and tracking.is_main_process():
            tracking.write_json(output_dir / tracking.INPUTS_RECORD, inputs)
        guard.configure(recipe.run.nan_tolerance, recipe.run.save_on_signal)
        with process_state.kept():  # what the libraries set for this run (full_determinism) is not the next one's
            process_state.set_fp32_precision(recipe.fp32_precision)  # as its parse set it (a sweep parsed others since)
            stage.run(*recipe.configs)
        if recipe.stage in loop.TRAINER_STAGES:  # (the engine's save, not hfgen's: `guard.check_saved_model`)
            guard.check_saved_model(output_dir)
        info = {"stage": recipe.stage, "wall_time_s": round(time.time() - started, 2)}
        tracking.mark_complete(output_dir, **info, **({tracking.INPUT_RUNS: trained_on} if trained_on else {}))
    finally:
        tracking.unlock_output_dir(output_dir)  # (a killed process's lock goes with it)
        guard.restore_signal_handlers()  # what runs next here (a sweep's report, a pipeline's step) stops on Ctrl-C
    tracking.wait_for_everyone()  # in a pipeline, every rank's next step checks this marker, written by rank 0
    if tracking.is_main_process():
        print(closing_lines(output_dir))
    signum = guard.received_signal()
    if signum is not None:  # it came after the last step (the final save, evaluation): the run is complete
        print(f"hfgen: {output_dir} is complete; stopping here, as the signal asked", file=sys.stderr)
        sys.exit(128 + signum)  # a pipeline or sweep stops before its next step
    return output_dir


# figures measured after training only that still head a run's results: the image stages' held-out evaluation
HEADLINE_FIGURES = ("quality/prompt_adherence", "quality/frechet_distance")


def closing_lines(output_dir: Path) -> str:
    """How every stage's run ends on the console: its headline figures from eval.json (each measured before
    training too as before -> after, the tuned policy's win rates over its start, the image stages' quality) and
    where the complete run is. The Trainer printed its final evaluation only with disable_tqdm, and each loop ended
    its own way."""
    from hfgen import tracking
    from hfgen.evaluation.command import format_value

    results = tracking.read_json(Path(output_dir) / "eval.json", {})
    figures = [
        f"{key} {format_value(results[f'{key}_initial'])} -> {format_value(value)}"
        for key, value in results.items()
        if f"{key}_initial" in results
    ]
    figures += [
        f"{key} {format_value(value)}"
        for key, value in results.items()
        if key.startswith("win_rate/") or key in HEADLINE_FIGURES
    ]
    held_out = [f"hfgen: held-out figures (eval.json): {', '.join(figures)}"] if figures else []
    return "\n".join([*held_out, f"hfgen: complete, written to {output_dir}"])


def check_step_output_dir(recipe) -> None:
    """Refuse, before anything runs, the dir of a sweep's point or a comparison's run that holds what `hfgen train`
    refuses and `run_step` (which trains over the dir, its caller having compared the recipes) would delete: the
    complete run of another recipe (`tracking.check_output_dir`), or an unfinished one with complete checkpoints
    (`tracking.check_unfinished_run`); an unfinished run of this same recipe `run_step` continues. Unless the
    recipe's overwrite_output_dir."""
    from hfgen import tracking

    output_dir, recipe_yaml, overwrite = recipe.output_dir, recipe.to_yaml(), recipe.run.overwrite_output_dir
    if not output_dir.exists():
        return
    tracking.check_output_dir(output_dir, recipe_yaml, overwrite)
    if not tracking.holds_recipe(output_dir, recipe_yaml):
        tracking.check_unfinished_run(output_dir, recipe_yaml, overwrite)


def run_step(recipe, fresh: bool = False, inputs: dict | None = None) -> Path:
    """Run one step of a pipeline (`rlhf`) or one point of a sweep, which its caller has decided must run (its
    output is missing, unfinished, of another recipe or inputs, or forced). An unfinished run of this same recipe
    continues from its newest complete checkpoint rather than from scratch, unless `fresh` (its inputs, an earlier
    step's output, were made again) or its recorded inputs changed (`tracking.inputs_changed`): then it starts over,
    its old checkpoints deleted. `inputs`: see `run_recipe`."""
    from hfgen import tracking

    output_dir = recipe.output_dir
    unfinished_same_run = (
        not fresh
        and not tracking.is_complete(output_dir)
        and tracking.holds_recipe(output_dir, recipe.to_yaml())
        and not tracking.inputs_changed(output_dir, recipe)  # its checkpoints trained on what its paths held then
    )
    if unfinished_same_run and tracking.complete_checkpoints(output_dir):
        for config in recipe.configs:
            if hasattr(config, "resume_from_checkpoint") and not config.resume_from_checkpoint:
                config.resume_from_checkpoint = "true"
                print(f"hfgen: {output_dir} was interrupted: continuing from its newest complete checkpoint")
    recipe.run.overwrite_output_dir = True  # the caller compared the recipes itself
    return run_recipe(recipe, inputs)


def cli(argv: list[str] | None = None) -> int:
    """Entry for `python -m hfgen.train` and `scripts/train.py`: the same as `hfgen train`."""
    from hfgen import guard
    from hfgen.cli import main as hfgen_main

    if "LOCAL_RANK" in os.environ:  # a process of a launch (`launch_with_accelerate`, accelerate launch, torchrun)
        guard.stop_with_launcher()

    return hfgen_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(cli())
