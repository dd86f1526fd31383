"""`hfgen` command line: one subcommand per module, each exposing `add_arguments(parser)` and `main(args)`.

Subcommand modules keep heavy imports (torch, transformers) inside `main`, so `hfgen --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import locale
import os
import sys

from hfgen import __version__, process_state
from hfgen.errors import (
    EXIT_DIVERGED,
    EXIT_USAGE,
    UserError,
    disk_full_exits_2,
    exit_on_interrupt,
    exit_on_user_error,
    unwritable_exits_2,
)

COMMANDS = {
    "train": "hfgen.train",
    "generate": "hfgen.generate",
    "merge": "hfgen.merge",
    "eval": "hfgen.evaluation.command",
    "report": "hfgen.report",
    "sweep": "hfgen.sweep",
    "check": "hfgen.check",
    "compare": "hfgen.compare",
}


# Commands that run whole on one process: launched on several, each process ran all of it, writing the same files
# (the same temporary names) side by side
ONE_PROCESS_COMMANDS = ("eval", "generate", "merge")


def check_one_process(command: str) -> None:
    import os

    from hfgen.errors import UserError

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if command in ONE_PROCESS_COMMANDS and world_size > 1:
        raise UserError(
            f"`hfgen {command}` runs on one process, but {world_size} were launched (WORLD_SIZE={world_size}): each "
            f"would run all of it and write the same files. Run `hfgen {command} ...` directly, not under "
            "`accelerate launch` or torchrun."
        )


def _available_commands():
    for name, module_name in COMMANDS.items():
        try:
            yield name, importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: `compare --seed 1` was taken as --seeds (prefix matching), never as the recipe key it is
    parser = argparse.ArgumentParser(
        prog="hfgen",
        allow_abbrev=False,
        description="Train and evaluate generative models from recipe files: causal-LM pretraining, SFT (full, "
        "LoRA, QLoRA), reward models, PPO/RLHF, and text-to-image diffusion.",
        epilog="Run `hfgen COMMAND --help` for a command's options. Example: hfgen train recipes/tiny/pretrain.yaml",
    )
    parser.add_argument("--version", action="version", version=f"hfgen {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in _available_commands():
        summary = (module.__doc__ or "").strip().splitlines()[0]
        sub = subparsers.add_parser(
            name,
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )
        module.add_arguments(sub)
        sub.set_defaults(handler=module.main)
    return parser


def config_as_recipe(argv: list[str]) -> list[str]:
    """`hfgen train --config R --key v` (TRL's CLI style) as `hfgen train R --key v`: parsed as it was written, the
    recipe's slot took the first override's value (`3` of `--max_steps 3`)."""
    from hfgen.errors import UserError

    if not argv or argv[0] not in ("train", "check"):
        return argv
    rest = argv[1:]
    for i, token in enumerate(rest):
        if token == "--config" and i + 1 < len(rest):
            value, rest = rest[i + 1], rest[:i] + rest[i + 2 :]
        elif token.startswith("--config="):
            value, rest = token.partition("=")[2], rest[:i] + rest[i + 1 :]
        else:
            continue
        if rest and not rest[0].startswith("-"):
            raise UserError(f"two recipes given ('{rest[0]}' and --config '{value}'): give one")
        if second := next((t for t in rest if t == "--config" or t.startswith("--config=")), None):
            raise UserError(f"two recipes given (--config '{value}' and a second {second}): give one")
        return [argv[0], value, *rest]
    return argv


def printable_stdout() -> None:
    """Under a locale whose encoding is not UTF-8 (an old cluster's ISO-8859-1), a print of user text (a rendered
    example, a generation, a PPO sample) that it cannot encode ended the command in a UnicodeEncodeError: such
    characters are printed as escapes instead (stderr does so already). Files are written in UTF-8 whatever the
    locale."""
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    if encoding not in ("utf8", "utf8sig") and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def unreadable_argument(argv: list[str]) -> str | None:
    """The first command-line value holding UTF-8 text that the locale could not decode, as that text (None when
    there is none). Under a locale whose encoding is ASCII (LC_ALL=C with Python's UTF-8 mode off) Python gives its
    bytes as lone surrogates: a prompt ended in tokenizers' TypeError, a data path was "surrogates not allowed", and
    the text decoded cannot be used either, as such a locale's file system encoding cannot name the file. A value of
    bytes that are not UTF-8 (a Latin-1 file name under a UTF-8 locale) is a path the file system reads as given."""
    for value in argv:
        if not any("\udc80" <= char <= "\udcff" for char in value):
            continue
        try:
            return os.fsencode(value).decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


def deleted_working_directory() -> str | None:
    """The message when the working directory no longer exists (a shell left in a folder another job removed, a
    scratch dir cleaned up), else None: every command that loads torch died in it with MKL's "Cannot load
    libtorch_cpu.so", which reads as a broken torch install. Looked at before torch is imported (hfgen imports it
    lazily). The shell names the folder in PWD."""
    try:
        os.getcwd()
        return None
    except FileNotFoundError:
        folder = f" '{os.environ['PWD']}'" if os.environ.get("PWD") else ""
        return (
            f"the working directory{folder} no longer exists (deleted after this shell entered it): cd to an "
            "existing folder and run the command again"
        )


# deepspeed's own log line format, kept on stderr
DEEPSPEED_LOG_FORMAT = "[%(asctime)s] [%(levelname)s] [%(filename)s:%(lineno)d:%(funcName)s] %(message)s"


def deepspeed_logs_to_stderr() -> None:
    """deepspeed logs through a handler of its own on stdout: any save imports it (accelerate's unwrap does), and on
    a machine without a GPU its import warns 'Setting accelerator to CPU', which landed beside a command's result
    (`MERGED=$(hfgen merge ...)` got two lines). A filter on its logger writes each record to stderr instead and
    stops it there; set before deepspeed is imported (its import adds the stdout handler) or after, and without
    importing it (seconds). Each record goes to the sys.stderr of its moment: set once per process, a handler made
    with the first command's stderr wrote to a closed stream once a caller had replaced it (hfgen.cli.main called
    again in one process: a notebook, the tests' captured output), printing logging's own error and traceback."""
    import logging

    formatter = logging.Formatter(DEEPSPEED_LOG_FORMAT)

    def on_stderr(record: logging.LogRecord) -> bool:
        print(formatter.format(record), file=sys.stderr)
        return False  # (not to its stdout handler)

    logger = logging.getLogger("DeepSpeed")
    if not any(getattr(f, "__name__", "") == on_stderr.__name__ for f in logger.filters):  # once per process
        logger.addFilter(on_stderr)


def main(argv: list[str] | None = None) -> int:
    """`hfgen ARGV` in this process (the console script, a notebook, a driver script): 0 when the command succeeds;
    a failure leaves by SystemExit with the command line's exit code (2 bad input, 3 diverged, 130 interrupted, a
    launched process's code), whether it ran here or in launched processes."""
    with exit_on_interrupt():
        try:
            return run_command(sys.argv[1:] if argv is None else argv)
        except SystemExit as leaving:
            if leaving.code not in (EXIT_USAGE, EXIT_DIVERGED):
                raise
            code = leaving.code
        # (out of the except block: the refusal's frames, and any DDP model they hold, are gone)
        end_process_group()
        sys.exit(code)


def end_process_group() -> None:
    """A launched process refused its input (or diverged): its process group ends now, as a finished run's does
    (`train.main`). Left to the interpreter's teardown, gloo's worker threads, still holding the last collective's
    tensors, met the dying interpreter: the process aborted (SIGABRT, "terminate called without an active
    exception") instead of exiting 2, seen on a 2-process run whose processes all refused their output_dir."""
    if "torch" not in sys.modules:  # (a refusal before anything imported torch: `hfgen --help`, a bad argument)
        return
    from hfgen.tracking import shutdown_distributed

    shutdown_distributed()


def run_command(argv: list[str]) -> int:
    """`hfgen ARGV`: its exit code."""
    from hfgen.data.loading import datasets_cache_unwritable_exits_2  # (here: `hfgen --help` imports no more)

    printable_stdout()
    deepspeed_logs_to_stderr()
    with exit_on_user_error():
        if deleted := deleted_working_directory():
            raise UserError(deleted)
    parser = build_parser()
    with exit_on_user_error():
        if (text := unreadable_argument(argv)) is not None:
            raise UserError(
                f"the command line holds non-ASCII text ('{text}') that this locale's encoding "
                f"({locale.getpreferredencoding(False)}: LC_ALL=C or POSIX with Python's UTF-8 mode off) cannot read, "
                "nor name such a file: hfgen would get it garbled. Run hfgen under a UTF-8 locale: LC_ALL=C.UTF-8 (or "
                "PYTHONUTF8=1)"
            )
        argv = config_as_recipe(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    # a full disk, in any command (an evaluation, a report, a merge, generated images), is the user's to free; met
    # by datasets' cache (an evaluation's prompts), or that cache read-only, the cache is named, not the command's output
    output = next((getattr(args, key) for key in ("output", "out", "output_dir") if getattr(args, key, None)), None)
    with (
        exit_on_user_error(),
        disk_full_exits_2(output=output),
        unwritable_exits_2(output),
        datasets_cache_unwritable_exits_2(),
    ):
        check_one_process(args.command)
        with process_state.kept():  # for a caller's next command in this process (a notebook): as a new process
            return args.handler(args) or 0


if __name__ == "__main__":
    sys.exit(main())
