"""Test setup, never used by a user's run: several recipes in one `accelerate launch`, so the engine tests pay the
start-up of 2 processes (torch, transformers, TRL, DeepSpeed imports; the process group) once per engine.

    accelerate launch ... tests/engines/run_recipes.py [--fsdp2] RECIPE [--key value ...] [--then RECIPE ...]

Each recipe runs through `hfgen.train.run_recipe`, the entry `hfgen train` and the rlhf pipeline's steps use, one
after the other in the same processes (as the pipeline runs its steps). `--fsdp2` first switches accelerate onto
its FSDP2 branch on CPU processes (`fsdp2_launch`).
"""

import sys


def split_runs(argv: list[str]) -> list[list[str]]:
    """[RECIPE, overrides...] for each run of `argv`, runs separated by `--then`."""
    runs = [[]]
    for argument in argv:
        if argument == "--then":
            runs.append([])
        else:
            runs[-1].append(argument)
    return [run for run in runs if run]


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--fsdp2":
        import fsdp2_launch  # noqa: F401  (switches every Accelerator created from here on onto FSDP2)

        argv = argv[1:]
    from hfgen import loop, tracking
    from hfgen.errors import exit_on_user_error
    from hfgen.recipe import load_recipe
    from hfgen.train import run_recipe

    with exit_on_user_error():
        loop.check_launch()
        for recipe, *overrides in split_runs(argv):
            run_recipe(load_recipe(recipe, overrides))
    tracking.shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
