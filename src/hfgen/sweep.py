"""Run a grid of recipe variants, then compare them in one report: `hfgen sweep RECIPE --key V1,V2 ...`.

    hfgen sweep recipes/tiny/pretrain.yaml --learning_rate 1e-3,3e-3 --warmup_steps 0,20
    hfgen sweep recipes/tiny/sft_lora.yaml --learning_rate 1e-4,3e-4 --lora_r 8,16 --output_root outputs/sweeps/lora

An override whose value holds commas is an axis of the grid; the grid is the product of the axes, and the
other overrides apply to every point. Each point gets its own output dir, ROOT/KEY=VALUE_KEY=VALUE (ROOT is
--output_root, by default the recipe's output_dir + "-sweep"). Every point's recipe is validated before the
first one runs; then the points run one after the other through `hfgen.train.run_step`, exactly as
`hfgen train` runs them. A point whose dir already holds a complete run of the same resolved recipe is
skipped, and a point that was interrupted continues from its newest complete checkpoint, so a sweep that
stopped half way picks up where it was; a point whose dir holds the complete run of another recipe, or an
unfinished one with complete checkpoints, is refused before anything runs (as `hfgen train` refuses it). A point
that fails (diverges, or finds bad data) does not stop the others: the sweep says which failed and exits non-zero
after the report. Last, ROOT/report.html compares the points (`hfgen report`); with --eval each point not yet
evaluated is first evaluated by `hfgen eval` with its defaults.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import signal
import sys
from pathlib import Path

from hfgen import guard
from hfgen.errors import Diverged, UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hfgen.recipe import expand_home

    parser.add_argument("recipe", type=expand_home, help="recipe YAML (see recipes/)")
    parser.add_argument("--output_root", type=expand_home, help="where the points' run dirs and report.html go")
    parser.add_argument("--eval", action="store_true", help="run `hfgen eval` on each point before the report")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(accepts_overrides=True)
    parser.epilog = "Other --key value pairs override the recipe; comma-separated values (--key a,b) form the grid."


def main(args: argparse.Namespace) -> int:
    from hfgen import tracking
    from hfgen.report import write_report
    from hfgen.train import check_step_output_dir, run_step

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if args.eval and processes > 1:  # every process's `hfgen eval` refused the launch: each point "failed" at the end
        raise UserError(
            f"hfgen sweep --eval: `hfgen eval` runs on one process, but {processes} were launched (WORLD_SIZE="
            f"{processes}): train the points under the launch without --eval, then run the same `hfgen sweep ... "
            "--eval` directly (not under accelerate launch or torchrun): it skips the complete points and evaluates "
            "each."
        )
    axes, fixed = split_grid(args.overrides)
    if not axes:
        raise UserError(f"hfgen sweep: no grid given{mappings_note(fixed)}; write comma-separated values, e.g. "
                        "--learning_rate 1e-4,3e-4.")  # fmt: skip
    if "output_dir" in axes or "--output_dir" in fixed:
        raise UserError("hfgen sweep: each point gets its own output_dir under --output_root; do not set output_dir.")
    root = Path(args.output_root) if args.output_root else default_root(args.recipe, fixed)
    if args.quiet:
        from hfgen.evaluation.command import quiet_libraries

        quiet_libraries()

    # Validate every point before running any: a typo in the last value must not cost the first runs.
    points = grid_points(axes)
    recipes, problems = {}, {}
    for name, tokens in points:
        try:
            recipes[name] = point_recipe(args.recipe, [*fixed, *tokens], root / name)
            # a point's dir holding the complete or unfinished run of another recipe (an earlier sweep with other
            # fixed keys) is refused as `hfgen train` refuses it, not trained over
            check_step_output_dir(recipes[name])
        except UserError as error:
            problems.setdefault(str(error), []).append(name)  # one message for the points that share it
    if problems:
        invalid = sum(map(len, problems.values()))
        details = " ".join(f"[{', '.join(names)}] {message}" for message, names in problems.items())
        raise UserError(f"hfgen sweep: {invalid} of {len(points)} points are invalid, none was run: {details}")

    print(f"sweep: {len(recipes)} points under {root}")
    failed: dict[str, Exception] = {}
    for index, (name, recipe) in enumerate(recipes.items(), 1):
        run_dir = root / name
        done, changed = tracking.complete_as_recipe(run_dir, recipe)  # (changed: a base retrained in place)
        try:
            if done:
                print(f"[{index}/{len(recipes)}] {name}: already complete, skipped")
            else:
                why = f" again: its inputs changed since it ran ({'; '.join(changed)})" if changed else ""
                print(f"[{index}/{len(recipes)}] {name}: training{why}")
                if args.quiet:
                    for config in recipe.configs:  # Trainer's progress bar: on the parsed config, not in recipe.yaml
                        if hasattr(config, "disable_tqdm"):
                            config.disable_tqdm = True
                run_step(recipe)
            if args.eval and not (done and was_evaluated(run_dir)):
                evaluate(run_dir, args.quiet)
        except (UserError, Diverged) as error:  # one point's failure (a diverged learning rate) is a finding
            failed[name] = error
            print(f"[{index}/{len(recipes)}] {name}: failed: {error}")
    runs = [root / name for name in recipes if (root / name).is_dir()]
    report = write_report(runs, root / "report.html", title=f"hfgen sweep {args.recipe}") if runs else None
    print(f"report: {report}" if report else "report: no point has a run dir")
    if failed:
        listing = "; ".join(f"{name}: {error}" for name, error in failed.items())
        others = " (the others ran)" if len(failed) < len(recipes) else ""
        message = f"hfgen sweep: {len(failed)} of {len(recipes)} points failed{others}: {listing}"
        raise Diverged(message) if all(isinstance(e, Diverged) for e in failed.values()) else UserError(message)
    return 0


def point_recipe(recipe_path: str, tokens: list[str], point_dir: Path):
    """The point's recipe, written into `point_dir`. A pipeline's (stage rlhf) steps write into their own recipes'
    output_dirs, which every point would share (point 2 retraining point 1's models in place, a rerun finding both
    complete): each step's output_dir becomes POINT_DIR/STEP, through its `STEP_overrides` (the user's own kept)."""
    from hfgen.recipe import load_recipe
    from hfgen.stages import rlhf

    tokens = [*tokens, "--output_dir", str(point_dir)]
    recipe = load_recipe(recipe_path, tokens)
    if recipe.stage != "rlhf":
        return recipe
    (pipeline,) = recipe.configs
    for step in rlhf.pipeline_steps(pipeline):
        overrides = {**rlhf.user_overrides(pipeline, step), "output_dir": str(point_dir / step)}
        tokens += [f"--{step}_overrides", json.dumps(overrides)]
    return load_recipe(recipe_path, tokens)


def was_evaluated(run_dir: Path) -> bool:
    """Whether `hfgen eval` has written its figures into the run's eval.json (a stage's own figures aside)."""
    from hfgen import tracking

    return "speed/peak_memory_mb" in tracking.read_json(run_dir / "eval.json", {})


def split_grid(tokens: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Override tokens -> (axes: key -> values, fixed tokens). `--lr 1e-4,3e-4` is an axis; `--steps 3`,
    lists (`--modules q v`), JSON/YAML values (`--x [1,2]`, `--y {a: 1}`), `k=v,k=v` pairs where `hfgen train`
    reads them as one setting (`--dataset_columns prompt=instruction,completion=output`, `--optim_args
    momentum=0.9,dampening=0.1`: `PAIRS_TEXT_KEYS`) and a value quoted whole (`--instance_prompt '"a dog, in snow"'`,
    one text holding commas) are fixed. Another key's values may hold `=` (an earlier sweep's point dirs,
    `.../lr=1e-3_seed=1`)."""
    from hfgen.data.formats import PAIRS_TEXT_KEYS
    from hfgen.recipe import quoted_text

    groups: list[list[str]] = []
    for token in tokens:
        if token.startswith("--"):
            key, eq, value = token.partition("=")
            groups.append([key, value] if eq else [key])
        elif groups:
            groups[-1].append(token)
        else:
            raise UserError(f"hfgen sweep: unexpected argument '{token}'; overrides take the form --key value.")
    keys = [key[2:].replace("-", "_") for key, *_ in groups]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:  # the later one replaced the earlier: an axis lost its values, or a fixed value its axis
        raise UserError(f"hfgen sweep: --{twice[0]} is given twice; give each key once (an axis as --key a,b,c)")
    axes, fixed = {}, []
    for key, *values in groups:
        name = key[2:].replace("-", "_")
        value = values[0] if len(values) == 1 else ""  # (a list's values and a flag alone are fixed)
        pairs = name in PAIRS_TEXT_KEYS and all("=" in part for part in value.split(","))
        one_setting = pairs or value.lstrip().startswith(("[", "{")) or quoted_text(value) is not None
        if "," in value and not one_setting:
            axis = [v.strip() for v in value.split(",") if v.strip()]
            if len(set(axis)) != len(axis):
                raise UserError(f"hfgen sweep: --{name} repeats a value: {value}")
            axes[name] = axis
        else:
            fixed += [key, *values]
    return axes, fixed


def mappings_note(fixed: list[str]) -> str:
    """Which fixed values were read as one mapping (`k=v,k=v`) rather than as an axis, for the no-grid message."""
    from hfgen.data.formats import PAIRS_TEXT_KEYS

    pairs = [f"--{token[2:]} {value}" for token, value in zip(fixed, fixed[1:])
             if token.startswith("--") and token[2:].replace("-", "_") in PAIRS_TEXT_KEYS and "," in value]  # fmt: skip
    return f" ({', '.join(pairs)} is one mapping, k=v,k=v, not an axis)" if pairs else ""


def grid_points(axes: dict[str, list[str]]) -> list[tuple[str, list[str]]]:
    """(point name, override tokens) for each point of the product of the axes, the first axis slowest."""
    points, named = [], {}
    for values in itertools.product(*axes.values()):
        name = "_".join(f"{key}={safe(value)}" for key, value in zip(axes, values))
        if len(name.encode()) > NAME_BYTES:  # long values cut only here: a sweep's existing names stay as they were
            name = "_".join(f"{key}={safe(value, VALUE_BYTES)}" for key, value in zip(axes, values))
        if name in named:  # `a/b` and `a:b` are both `a-b`: two points would share one run dir
            spelled = " and ".join(" ".join(f"--{k} {v}" for k, v in zip(axes, vs)) for vs in (named[name], values))
            raise UserError(
                f"hfgen sweep: the points {spelled} would share the directory '{name}' (a value's characters other "
                "than letters, digits and . + - become -): give values that differ there"
            )
        if len(name.encode()) > NAME_BYTES:  # (each value is cut to VALUE_BYTES: many axes, or long keys)
            raise UserError(
                f"hfgen sweep: the point directory name '{name}' is {len(name.encode())} bytes, over the {NAME_BYTES} "
                "a file name may have; give fewer axes (the others as single values, the same at every point)"
            )
        named[name] = values
        points.append((name, [token for key, value in zip(axes, values) for token in (f"--{key}", value)]))
    return points


NAME_BYTES = 255  # the longest file name most file systems take
VALUE_BYTES = 64  # the most of a point's name one value takes, when the whole name would be too long


def safe(value: str, most_bytes: int | None = None) -> str:
    """A value as a piece of a directory name; with `most_bytes`, a longer one (a prompt) cut to that, its end a
    hash of the whole value: two 320-character prompts made a name longer than a file name may be, and the points
    failed with "File name too long" after every point had been checked."""
    piece = re.sub(r"[^\w.+-]", "-", value)
    if most_bytes is None or len(piece.encode()) <= most_bytes:
        return piece
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    head = piece.encode()[: most_bytes - len(digest) - 1].decode(errors="ignore")  # (no half of a character)
    return f"{head}-{digest}"


def default_root(recipe_path: str, fixed: list[str]) -> Path:
    from hfgen.recipe import load_recipe

    return Path(f"{load_recipe(recipe_path, fixed, check_inputs=False).output_dir}-sweep")


def evaluate(run_dir: Path, quiet: bool) -> None:
    """`hfgen eval RUN_DIR` with its defaults, in a process of its own: on a CPU its `speed/peak_memory_mb` is the
    process's peak RSS, which in the sweep's process would be the largest of all the points' training runs."""
    command = [sys.executable, "-m", "hfgen.cli", "eval", str(run_dir), *(["--quiet"] if quiet else [])]
    returncode = guard.run_child(command)
    if returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        sys.exit(returncode)
    if returncode != 0:  # its one-paragraph error or its traceback is above
        raise UserError(f"hfgen sweep: `hfgen eval {run_dir}` failed (exit code {returncode}; why is above)")
