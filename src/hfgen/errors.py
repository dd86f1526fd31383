"""User-facing errors: bad recipes, data, model paths or CLI input.

Anything raised as `UserError` is printed as one paragraph and the process exits with code 2,
without a traceback; a run stopped by the divergence guard (`Diverged`) exits with code 3 the same way.
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command Ctrl-C stopped


class UserError(Exception):
    """A problem with what the user gave us (recipe, data, paths, flags), not with hfgen."""


class Diverged(Exception):
    """Training stopped on a non-finite loss or gradient norm (see `hfgen.guard`)."""


@contextmanager
def exit_on_user_error(program: str = "hfgen"):
    """Turn a `UserError` into a one-paragraph message on stderr and exit code 2 (`Diverged`: exit code 3)."""
    try:
        yield
    except UserError as error:
        print(f"{program}: error: {user_message(error)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except Diverged as error:
        print(f"{program}: diverged: {error}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    except Exception as error:
        if weights_refused(error) and loading_a_model(error):  # (generate, eval and merge name it: load_problem)
            print(f"{program}: error: {WEIGHTS_REFUSED}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        # A chat template's own refusal of a row (its raise_exception: a TemplateError itself, not a subclass such
        # as a syntax error) past the rows the check renders: the data does not fit the model's template.
        from jinja2.exceptions import TemplateError

        if type(error) is not TemplateError:
            raise
        from hfgen.data.rendering import template_refusal

        print(f"{program}: error: {template_refusal(error, 'a row of the data')}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


@contextmanager
def exit_on_interrupt(program: str = "hfgen"):
    """Turn Ctrl-C (SIGINT's KeyboardInterrupt) into one line on stderr and exit code 130, wherever it lands (an
    import, a model load, a step), as SIGTERM ends a command quietly with 143: not a traceback of the line it
    happened to interrupt. The `finally` blocks on the way (a run dir's lock) have run; a run with save_on_signal
    catches the signal itself and never gets here during training."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


WEIGHTS_REFUSED = (
    "a model's .bin weights file holds objects other than tensors (a pickle that would run code when loaded): torch's "
    "weights-only guard refused it, no code ran, and hfgen does not load such weights; use the model's safetensors "
    "weights (or convert its .bin where you trust it)"
)


def weights_refused(error: BaseException) -> bool:
    """Whether `error` is torch's weights-only guard refusing a pickled weights file (a model's .bin holding other
    objects than tensors): bad input wherever a model loads, not a bug."""
    import pickle

    return isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error)


# The functions a model's weights load through (transformers' from_pretrained and its load_state_dict, PEFT's
# from_pretrained): a weights-only refusal below one of them is a model's .bin; elsewhere (a checkpoint's rng_state.pth,
# optimizer.pt, a stage's own state) it is another file, whose refusal keeps its traceback (torch's message names none)
MODEL_LOADERS = ("from_pretrained", "load_state_dict", "_load_pretrained_model", "load_adapter")


def loading_a_model(error: BaseException) -> bool:
    """Whether `error` was raised below one of `MODEL_LOADERS` (a frame of its traceback)."""
    trace = error.__traceback__
    while trace is not None:
        if trace.tb_frame.f_code.co_name in MODEL_LOADERS:
            return True
        trace = trace.tb_next
    return False


def disk_full(error: BaseException | None, directory: Path | None = None) -> bool:
    """Whether `error` is a write that found the disk full: ENOSPC anywhere in its chain, or the errors safetensors
    and torch wrap it in, which keep only its text (torch's zip writer not even that: a short write, "unexpected
    pos", taken for a full disk only when the disk of `directory` is indeed (almost) full)."""
    import errno
    import shutil

    for link in error_chain(error):
        text = str(link)
        if isinstance(link, OSError) and link.errno == errno.ENOSPC or "No space left on device" in text:
            return True
        if "unexpected pos" in text and directory is not None:
            try:
                return shutil.disk_usage(directory).free < 64 * 2**20
            except OSError:
                return False
    return False


def written_file(error: BaseException) -> str | None:
    """The file a failed write was writing, as its OSError in the chain names it: a copy's destination
    (`filename2`), not its source (`filename`)."""
    for link in error_chain(error):
        if isinstance(link, OSError) and (link.filename2 or link.filename):
            return str(link.filename2 or link.filename)
    return None


def error_chain(error: BaseException | None):
    """`error`, then the error it was raised from or while handling, and so down the chain: a library's error wraps
    the OSError that says what happened (safetensors', torch's, datasets')."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


@contextmanager
def disk_full_exits_2(output_dir: Path | None = None, output: str | Path | None = None):
    """A write that fills the disk ends the command with exit code 2 naming the file (it was a traceback from
    Python, safetensors or torch). `output_dir`: a training run's dir (`hfgen train`), which then has no COMPLETE
    marker, so it reads as unfinished, and is continued by a resume. Otherwise (every other command, `hfgen.cli`)
    `output` is what the command writes, named when the error names no file; its outputs are written beside and
    moved into place, so none is left half written."""
    try:
        yield
    except UserError:
        raise  # already said (an inner guard's message: its chain still holds the OSError)
    except Exception as error:
        if not disk_full(error, Path(output_dir or output or ".")):
            raise
        where = written_file(error) or output_dir or output or "its output"
        if output_dir is None:
            raise UserError(
                f"the disk is full: writing '{where}' failed (No space left on device); nothing was written under that "
                "name. Free some space (or write to another disk), then run the same command again."
            ) from None
        raise UserError(
            f"the disk is full: writing under '{where}' failed (No space left on device), so the run in "
            f"'{output_dir}' is unfinished. Free some space (or choose an output_dir on another disk; save_total_limit "
            "keeps fewer checkpoints), then run the same command again (with --resume_from_checkpoint true it continues "
            "from the newest complete checkpoint)."
        ) from None


@contextmanager
def unwritable_exits_2(output: str | Path | None = None):
    """A file the command could not write (or read) for the file system's reasons, a read-only mount or a folder
    without permission, ends it with exit code 2 naming the file: `hfgen eval` of a model on a read-only share
    evaluated everything, then ended in an OSError traceback writing its eval.json beside the model. `output`: what
    the command writes (its --output, --out or --output_dir); a file elsewhere (a class_data_dir, a cache) is named
    alone, without advice about an output it is not."""
    import errno

    try:
        yield
    except OSError as error:
        if error.errno not in (errno.EROFS, errno.EACCES) or not error.filename:
            raise
        under_output = output is not None and Path(output).resolve() in (
            Path(error.filename).resolve(),
            *Path(error.filename).resolve().parents,
        )
        advice = (
            "give the command an output path elsewhere, or fix the permissions"
            if under_output
            else "make it writable (and readable), or point the key or variable that names it elsewhere"
        )
        raise UserError(
            f"'{error.filename}': {error.strerror} (a read-only disk, or a file or folder this user may not write "
            f"or read); {advice}"
        ) from None


def user_message(error: UserError) -> str:
    """The error's message. A DataLoader worker's UserError (a bad image met mid-training with
    dataloader_num_workers > 0) reaches the main process re-raised by torch with "Caught UserError in DataLoader
    worker process N" and the worker's whole traceback as its message: only the original message is the user's."""
    text = str(error)
    marker = f"\n{UserError.__module__}.{UserError.__name__}: "
    if text.startswith("Caught UserError in DataLoader worker") and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text
