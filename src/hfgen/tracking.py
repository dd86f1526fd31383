"""The run directory: records, metrics, evaluation results, checkpoints. Written once, used by every stage.

A run directory holds:
    recipe.yaml      the resolved recipe (re-runnable as is: `hfgen train OUTPUT_DIR/recipe.yaml`)
    env.json         package versions, git commit, hardware
    metrics.jsonl    one JSON object per logged step: {"step": int, "<name>": float, ...}
    eval.json        final evaluation figures, a flat {"<name>": value} mapping
    samples.jsonl    sample generations (text stages), or samples/*.png and grid.png (image stages)
    checkpoint-N/    checkpoints (Trainer's or accelerate's `save_state`), rotated; each complete one ends with
                     hfgen_state.json, written last: a checkpoint without it was cut short and is never resumed from
    COMPLETE         written last: a directory without it is an unfinished run, never mistaken for output
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from hfgen.errors import UserError

COMPLETE_MARKER = "COMPLETE"
TRACKED_PACKAGES = (
    "hfgen", "torch", "transformers", "trl", "peft", "diffusers", "datasets", "accelerate", "evaluate",
    "tokenizers", "safetensors",
)  # fmt: skip


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def git_commit(where: str | Path, tracking_file: str | Path | None = None) -> str | None:
    """The commit of the git repository holding `where`, with '+dirty' if its tracked files are modified; None
    outside one, or (given `tracking_file`) when the repository does not track that file: hfgen installed as a
    package into a venv inside another project answered with that project's commit."""

    def git(*args) -> str:
        return subprocess.run(
            ["git", *args], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        if tracking_file is not None:
            git("ls-files", "--error-unmatch", str(tracking_file))
        commit = git("rev-parse", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


@functools.cache
def hfgen_commit() -> str | None:
    """hfgen's own checkout's commit (None when installed as a package): its version number stays the same across
    the commits of a checkout, whose changes may change what a run trains on."""
    return git_commit(Path(__file__).resolve().parent, tracking_file=Path(__file__).resolve())


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "packages": package_versions(),
        # hfgen's own checkout (None when installed as a package), and the working directory's repository: the
        # user's project, where a recipe's reward or oracle functions live
        "git_commit": hfgen_commit(),
        "working_dir_git_commit": git_commit(Path.cwd()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def write_run_records(
    output_dir: str | Path, recipe_yaml: str, overwrite: bool = False, resuming: bool = False
) -> None:
    """Start a run: the resolved recipe and the environment, and no COMPLETE marker until the run ends. The dir is
    this process's alone while it runs (`lock_output_dir`); a fresh start (not `resuming`) leaves nothing of an
    earlier run in it (`clear_previous_run`)."""
    check_output_dir(output_dir, recipe_yaml, overwrite)
    if not is_main_process():
        return
    output_dir = Path(output_dir)
    lock_output_dir(output_dir)
    try:  # a refusal here (an unfinished run's checkpoints, a full disk) unlocks: the caller's process may live on
        remove_deletion_leftovers(output_dir)
        if not resuming:  # nothing of an earlier run is left to mix with this one's
            check_unfinished_run(output_dir, recipe_yaml, overwrite)
            clear_previous_run(output_dir)
        (output_dir / COMPLETE_MARKER).unlink(missing_ok=True)
        # env.json first: a dir is a run's once both are there (`is_run_dir`), so a kill in between leaves no
        # recipe.yaml that the next start would take for a user's own (`foreign_files_problem`)
        write_json(output_dir / "env.json", environment())
        (output_dir / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
    except BaseException:
        unlock_output_dir(output_dir)
        raise


# Keys that may change between a run and its continuation in the same directory.
CONTINUATION_KEYS = ("resume_from_checkpoint", "overwrite_output_dir", "save_on_signal")


def comparable_recipe(recipe_yaml: str):
    """A recipe.yaml's values as compared between the run a dir holds and a recipe that writes that dir
    (`holds_recipe`, `check_output_dir`): without output_dir, since the dir compared is the one the recipe names
    either way, wherever the run was made (`./x` and `/abs/x`, or a run copied or moved to another dir: a complete
    copy was "a different recipe (output_dir)", and the advice, overwrite_output_dir, would have deleted it). None
    for a file that is not a YAML mapping."""
    import yaml

    try:
        values = yaml.safe_load(recipe_yaml)
    except yaml.YAMLError:
        return None
    if not isinstance(values, dict):
        return None
    values.pop("output_dir", None)
    # how a run stops or continues, not what it trains (it resumes only from its own checkpoints: `check_same_run`):
    # an interrupted sweep rerun with --resume_from_checkpoint true was "another recipe" in its own points' dirs
    for key in ("save_on_signal", "resume_from_checkpoint"):
        values.pop(key, None)
    return values


def holds_recipe(output_dir: str | Path, recipe_yaml: str) -> bool:
    """Whether OUTPUT_DIR/recipe.yaml records this same resolved recipe (but for where it was made: `comparable_recipe`)."""
    previous = Path(output_dir) / "recipe.yaml"
    if not previous.is_file():
        return False
    try:
        before = comparable_recipe(previous.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return False
    return before is not None and before == comparable_recipe(recipe_yaml)


def check_output_dir(output_dir: str | Path, recipe_yaml: str, overwrite: bool = False) -> None:
    """`output_dir` must be a writable directory (created if missing) and must not hold the complete run of a
    different recipe, unless `overwrite_output_dir: true` (a rerun of the same recipe repeats the run)."""
    from hfgen.errors import UserError

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output_dir '{output_dir}' is a file, not a directory; give a directory path.")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"output_dir '{output_dir}' cannot be created: {error.strerror or error}.") from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise UserError(f"output_dir '{output_dir}' is not writable; choose another output_dir.")
    problem = foreign_files_problem(output_dir)
    if problem:
        raise UserError(problem)
    if overwrite or not (is_complete(output_dir) and (output_dir / "recipe.yaml").is_file()):
        return
    changed = differing_keys(output_dir, recipe_yaml)
    if changed:
        raise UserError(
            f"output_dir '{output_dir}' holds a complete run of a different recipe (differing keys: "
            f"{', '.join(changed)}); choose another output_dir, or set overwrite_output_dir: true to train over it."
        )


def differing_keys(output_dir: str | Path, recipe_yaml: str) -> list[str]:
    """The keys whose values differ between the recipe OUTPUT_DIR/recipe.yaml records and `recipe_yaml`
    (`comparable_recipe`, but for `CONTINUATION_KEYS`); ['the recipe file'] where they differ otherwise (a recorded
    recipe that is no YAML mapping); [] for the same recipe."""
    try:
        before = comparable_recipe((Path(output_dir) / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        before = None
    now = comparable_recipe(recipe_yaml) or {}
    if isinstance(before, dict):
        for key in CONTINUATION_KEYS:
            before.pop(key, None)
            now.pop(key, None)
    if before == now:
        return []
    return sorted(k for k in set(before or {}) | set(now) if (before or {}).get(k) != now.get(k)) or ["the recipe file"]


def check_unfinished_run(output_dir: str | Path, recipe_yaml: str, overwrite: bool = False) -> None:
    """A fresh start into `output_dir` over an unfinished run with complete checkpoints would delete work a resume
    continues: refused unless `overwrite`, naming the differing keys when the run is another recipe's. (`hfgen sweep`
    and `hfgen compare` refuse their runs' dirs with it before anything runs: `train.check_step_output_dir`.)"""
    output_dir = Path(output_dir)
    resumable = [p.name for p in checkpoints(output_dir) if is_complete_checkpoint(p)]
    if not resumable or overwrite or is_complete(output_dir):
        return
    changed = differing_keys(output_dir, recipe_yaml) if (output_dir / "recipe.yaml").is_file() else []
    of = f" of a different recipe (differing keys: {', '.join(changed)})" if changed else ""
    raise UserError(
        f"output_dir '{output_dir}' holds an unfinished run{of} with complete checkpoints ({', '.join(resumable)}): "
        "continue it with --resume_from_checkpoint true, or start again over it with overwrite_output_dir: true "
        "(its checkpoints are then deleted), or choose another output_dir."
    )


_locks: dict[Path, Any] = {}  # output dir -> its open lock file, held while its run runs
LOCK_FILE = ".hfgen.lock"
# what a fresh start over an earlier run keeps in its dir: the lock, and DreamBooth's generated class images (its
# default class_data_dir), which later runs reuse by design (generating them again costs the base model's passes)
KEPT_ON_FRESH_START = (LOCK_FILE, "class_images")


def lock_output_dir(output_dir: Path) -> None:
    """Hold an exclusive lock on OUTPUT_DIR/.hfgen.lock while this process runs there (`unlock_output_dir` at the
    end): a second run started into the same dir (by mistake, or a scheduler's duplicate job) exits 2 instead of
    interleaving its metrics rows, checkpoints and weights with this one's. A process that dies, however (a SIGKILL
    too), releases it."""
    import fcntl

    key = output_dir.resolve()
    if key in _locks:
        return  # this process holds it already (a pipeline step run again, a test running twice)
    handle = open(key / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):  # (only these mean: held by another)
            handle.close()
            raise UserError(
                f"output_dir '{output_dir}' is on a file system that does not support file locks (flock: "
                f"{error.strerror}; some Lustre, NFS, FUSE or SMB mounts): hfgen locks the run dir against a second "
                "run into it; mount it with flock support, or choose an output_dir elsewhere."
            ) from None
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise UserError(
            f"output_dir '{output_dir}' is in use by another running hfgen process ({holder or 'pid unknown'}); "
            "wait for it to end, or choose another output_dir."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {platform.node()}\n")
    handle.flush()
    _locks[key] = handle


def check_output_dir_shared(output_dir: str | Path) -> None:
    """On several processes, every one must see the dir the main process writes: only it writes the records, the
    weights and the checkpoints' shared files, so on a machine whose output_dir is its own disk the run left
    checkpoint dirs holding only that machine's rng states, which no later start or resume could use. Each process
    reads the lock file the main process has just written (`lock_output_dir`); all of them exit 2 together."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    from accelerate.utils import gather_object

    wait_for_everyone()  # the main process has written its lock
    try:
        seen = (Path(output_dir) / LOCK_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        seen = None
    views = gather_object([(platform.node(), seen)])
    blind = [f"{rank} (on {node})" for rank, (node, view) in enumerate(views) if view != views[0][1]]
    if blind:
        raise UserError(
            f"output_dir '{output_dir}' is not the same directory for every process: process(es) "
            f"{', '.join(blind)} do not see the run process 0 ({views[0][0]}) has just started there. On several "
            "machines output_dir must be on a filesystem every machine sees (a shared disk): only process 0 writes "
            "the run's records, weights and checkpoints."
        )


def unlock_output_dir(output_dir: Path) -> None:
    """The run in `output_dir` has ended (complete or failed): another may start there."""
    handle = _locks.pop(Path(output_dir).resolve(), None)
    if handle is not None:
        handle.close()


RUN_RECORDS = ("env.json", "recipe.yaml")  # what every run writes first (`write_run_records`)


def is_run_dir(path: Path) -> bool:
    """Whether `path` holds an hfgen run: its records (recipe.yaml with env.json), its COMPLETE marker or a complete
    checkpoint of it. A recipe.yaml alone is not one (the user's own recipe, kept in the dir it names: a fresh start
    deleted everything beside it), nor another tool's checkpoint-N (a plain transformers Trainer's output)."""
    records = all((path / name).is_file() for name in RUN_RECORDS)
    return records or is_complete(path) or bool(complete_checkpoints(path))


def foreign_files_problem(output_dir: Path) -> str | None:
    """A dir that holds no run but files a run writes over or takes for its own: a recipe.yaml (the run writes its
    resolved recipe there) or checkpoint-N dirs (rotated, or resumed from, as the run's own)."""
    if not output_dir.is_dir() or is_run_dir(output_dir):
        return None
    if (output_dir / "recipe.yaml").exists():
        return (
            f"output_dir '{output_dir}' holds a recipe.yaml that no hfgen run wrote (no env.json beside it); a run "
            "writes its resolved recipe there, over yours: keep the recipe file outside the run's dir, or choose "
            "another output_dir."
        )
    found = checkpoints(output_dir)
    if found:
        return (
            f"output_dir '{output_dir}' holds checkpoint dirs that no hfgen run wrote "
            f"({', '.join(p.name for p in found[:3])}{', ...' if len(found) > 3 else ''}: no hfgen_state.json in "
            "them, no hfgen records beside them); a run would rotate them away or resume from them as its own: "
            "choose another output_dir, or move them out."
        )
    return None


def clear_previous_run(output_dir: Path) -> None:
    """A fresh start over an earlier run: what that run wrote goes, so none of it mixes with the new run's: its
    checkpoints (the new run's rotation and a later resume would take them for its own), and its outputs (an `ema/`
    or `value_model/` the new recipe does not write, a full model.safetensors beside a new LoRA adapter, which
    `from_pretrained` loads instead of the adapter, another stage's samples.jsonl). Only a dir that holds a run is
    cleared (not a dir of the user's that never held one), and in it neither `KEPT_ON_FRESH_START` nor a folder with
    runs in it (a pipeline's steps or a sweep kept under the rlhf pipeline's dir). (An unfinished run's complete
    checkpoints are work a resume would continue: without overwrite_output_dir the start is refused before this,
    `check_unfinished_run`.)"""
    if not is_run_dir(output_dir):
        return
    # The marker first, then the checkpoints, each gone at once (`remove_dir`): a kill half way leaves an unfinished
    # run with no checkpoint to resume, never a complete-looking dir or checkpoint missing some of its files.
    (output_dir / COMPLETE_MARKER).unlink(missing_ok=True)
    for path in [*checkpoints(output_dir), *output_dir.iterdir()]:
        if kept_on_fresh_start(path) or not os.path.lexists(path):
            continue
        if path.is_dir() and not path.is_symlink():
            remove_dir(path)
        else:
            path.unlink(missing_ok=True)


def kept_on_fresh_start(path: Path) -> bool:
    """Whether `clear_previous_run` keeps this entry of a run dir: `KEPT_ON_FRESH_START`, or a folder with runs in it."""
    holds_runs = path.is_dir() and not _CHECKPOINT.match(path.name) and any(path.rglob("recipe.yaml"))
    return path.name in KEPT_ON_FRESH_START or holds_runs


def deleted_by_fresh_start(path: str | Path, output_dir: str | Path) -> bool:
    """Whether a fresh start into `output_dir` (now, or the next one over this run) deletes `path`: the dir itself,
    or a file or folder inside it that `clear_previous_run` does not keep."""
    path, output_dir = Path(path).expanduser().resolve(), Path(output_dir).expanduser().resolve()
    if path == output_dir:
        return True
    if output_dir not in path.parents:
        return False
    return not kept_on_fresh_start(output_dir / path.relative_to(output_dir).parts[0])


DELETING_PREFIX = ".deleting-"


def remove_dir(path: Path) -> None:
    """Delete a dir as if at once: renamed first (atomic) to a hidden name no reader takes for a checkpoint or output,
    then removed. `shutil.rmtree` alone, killed half way, left e.g. a checkpoint-N with its state files but not its
    optimizer, scheduler or RNG state, which a resume then took for complete (other weights, a learning rate of 0)."""
    import uuid

    doomed = path.with_name(f"{DELETING_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        path.rename(doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def remove_deletion_leftovers(output_dir: Path, of: str | None = None) -> None:
    """What a kill during `remove_dir` left (renamed, not yet removed): removed when a run starts in the dir. With
    `of`, only the leftovers of `remove_dir(output_dir / of)` (the dir is the user's, e.g. a merge's parent)."""
    import glob
    import re

    prefix = DELETING_PREFIX if of is None else f"{DELETING_PREFIX}{of}-"
    for path in output_dir.glob(glob.escape(prefix) + "*"):
        if re.search("-[0-9a-f]{8}$", path.name) and path.is_dir() and not path.is_symlink():  # remove_dir's names
            shutil.rmtree(path, ignore_errors=True)


def path_problem(path: str | Path, label: str, directory: bool) -> str | None:
    """An output path that is the wrong kind of thing (a folder where a file goes, or the reverse) or cannot be
    written (a read-only disk), as a problem naming the option: writing would fail half way (IsADirectoryError,
    NotADirectoryError), after the evaluation or generation it was to hold."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        return f"{label} '{path}' is a file; give a directory"
    if not directory and path.is_dir():
        return f"{label} '{path}' is a directory; give the file to write, e.g. '{path / 'out'}'"
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"{label} '{path}': '{parent}' is a file, not a directory"
    writes_into = path if path.is_dir() else parent  # (a run dir that exists is written into)
    if writes_into is not None and not os.access(writes_into, os.W_OK):  # said before the work, not after it
        return f"{label} '{path}': '{writes_into}' cannot be written to (a read-only disk, or no permission); give a path elsewhere"
    return None


def write_text(path: str | Path, text: str) -> None:
    """Write a file atomically (a reader, or a process killed meanwhile, never leaves half a file)."""
    write_texts({path: text})


def write_texts(files: dict[str | Path, str]) -> None:
    """Write files that belong together (figures and the samples they were measured on), each atomically: every
    one is written to its tmp before any replaces its file, so a write that fails (a full disk) changes none of them
    and leaves no tmp; they replace their files in the order given. A failed write's OSError names the file it was
    for (a full disk's error from `write` names none)."""
    tmps = {Path(path): Path(path).with_suffix(Path(path).suffix + ".tmp") for path in files}
    try:
        for (path, tmp), text in zip(tmps.items(), files.values()):
            try:
                tmp.write_text(text, encoding="utf-8")
            except OSError as error:
                error.filename = str(path)  # (not its tmp: a read-only disk's error names that one)
                raise
        for path, tmp in tmps.items():
            tmp.replace(path)
    finally:
        for tmp in tmps.values():
            with contextlib.suppress(OSError):  # (a read-only folder refuses this too: its first error is the one)
                tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any, exact: bool = False) -> None:
    """Write JSON atomically (a reader never sees half a file); `exact`: see `json_text`."""
    write_text(path, json_text(data, exact))


def json_text(data: Any, exact: bool = False) -> str:
    """Strict JSON, as every record hfgen writes is (`json_line` too): a non-finite figure (a skipped step's loss,
    a run's train_loss then) is null, as a reward function's unscored response is; Python's NaN and Infinity are no
    JSON, and JavaScript's JSON.parse, Go's and Rust's decoders refuse the file. `exact`: NaN and inf kept, for a
    checkpoint's state, which only hfgen reads back and resumes with as it was."""
    return json.dumps(data if exact else finite_or_null(data), indent=2, default=_jsonable, allow_nan=exact) + "\n"


def json_line(row: Any) -> str:
    """One line of a JSON-lines record (metrics.jsonl, samples.jsonl, ...): strict JSON, as `json_text`."""
    return json.dumps(finite_or_null(row), default=_jsonable, allow_nan=False) + "\n"


def finite_or_null(value):
    """`value` with each non-finite float (a numpy or torch scalar's too) as None, JSON's null, at any depth (a
    tuple as a list): what hfgen's records hold for a skipped step's loss and for a response a reward function or
    oracle did not score (NaN in `hfgen.rl.rollout.reward_values`). The records' writers (`json_line`, `json_text`)
    and the score lists kept for them (samples.jsonl, the held-out comparisons' rows, hfgen eval's) read non-finite
    numbers this one way."""
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # a numpy or torch scalar
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    write_text(path, jsonl_text(rows))


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json_line(row) for row in rows)


def read_json(path: str | Path, default=None):
    """A JSON file's value (`default` when it is missing); a file that is not JSON is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"'{path}' is not valid JSON ({error}): restore or delete it") from None


def update_eval(output_dir: str | Path, results: dict[str, Any]) -> dict[str, Any]:
    """Merge `results` into OUTPUT_DIR/eval.json (main process only) and return the merged dict."""
    path = Path(output_dir) / "eval.json"
    merged = {**read_json(path, {}), **results}
    if is_main_process():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        write_json(path, merged)
    return merged


def best_model_record(trainer) -> dict[str, Any]:
    """With load_best_model_at_end the saved weights, and so the figures eval.json measures on them, are the best
    checkpoint's, not the last step's: eval.json says which step that was and its metric_for_best_model figure."""
    state = trainer.state
    if not trainer.args.load_best_model_at_end or state.best_global_step is None:
        return {}
    return {"best_global_step": state.best_global_step, "best_metric": state.best_metric,
            "metric_for_best_model": trainer.args.metric_for_best_model}  # fmt: skip


def weights_readable_as_umask(folder: str | Path) -> None:
    """Give the weight files under `folder` the mode any other output gets under the umask. safetensors writes
    each to a tempfile (mode 0600) that it renames, so in a group-shared output dir (umask 002) colleagues could read
    a run's config, records and optimizer state but not its weights."""
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
    for file in Path(folder).rglob("*.safetensors"):
        with contextlib.suppress(OSError):  # (another owner's file, a read-only copy: left as it is)
            if file.is_file() and not file.is_symlink() and file.stat().st_mode & 0o777 != mode:
                file.chmod(mode)


def mark_complete(output_dir: str | Path, **info) -> None:
    """The run ended. `run`, a random id, tells this run's output from the next run's into the same dir (a pipeline
    compares it with the id its later steps recorded as their input: `inputs_of`). Its weights get the umask's
    mode (`weights_readable_as_umask`)."""
    import uuid

    if is_main_process():
        weights_readable_as_umask(output_dir)
        marker = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run": uuid.uuid4().hex, **info}
        write_json(Path(output_dir) / COMPLETE_MARKER, marker)


def run_id(path: str | Path | None) -> str | None:
    """The id of the complete hfgen run in `path` (its COMPLETE marker's `run`), or None: a hub id, a plain model
    dir, an unfinished run."""
    if not isinstance(path, (str, Path)) or not Path(path).expanduser().is_dir():
        return None
    marker = read_json(Path(path).expanduser() / COMPLETE_MARKER, None)
    return marker.get("run") if isinstance(marker, dict) else None


# The model runs a run trained on, in its COMPLETE marker: {key: the run id of that key's model dir}, so that an
# adapter is loaded only onto the base weights it was trained on (`base_changed_problem`)
INPUT_RUNS = "input_runs"
INPUT_RUN_KEYS = ("model_name_or_path", "pretrained_model_name_or_path")


def input_runs(recipe) -> dict[str, str]:
    """{key: run id} of the recipe's models that are complete hfgen runs, read before the run loads them."""
    ids = {key: run_id(recipe.value(key)) for key in INPUT_RUN_KEYS}
    return {key: value for key, value in ids.items() if value is not None}


def base_changed_problem(adapter: str | Path, base: str | Path, key: str = "model_name_or_path") -> str | None:
    """An adapter run whose base dir holds another run than the one it trained on (the base was retrained in place
    since), or whose base checkpoint-N holds other files than when it trained (its run was trained again in place):
    base + adapter is not the pair that trained, and merged or sampled it gives other outputs without a word. None
    when they match, or when either records nothing to compare (an adapter from an older hfgen). A hub base is
    compared by the snapshot commit the cache resolved it to (`hub_base_changed`)."""
    adapter = Path(adapter)
    trained_on = trained_on_run(adapter, key)
    if trained_on is None and (recorded := recorded_input(adapter, key)) is not None and recorded.get("hub"):
        return hub_base_changed(adapter, base, recorded)
    if trained_on is not None:
        if run_id(base) == trained_on:
            return None
        now = run_id(base)
        changed = f"was trained on the run {trained_on} in '{base}', which now holds " + (
            f"another run ({now})" if now else "no complete run"
        )
    else:
        # A checkpoint has no run id (its run draws one when it finishes): its files, as the adapter's run
        # fingerprinted them when it started, tell
        if not is_complete_checkpoint(base):
            return None
        from hfgen import fingerprint

        recorded, now = recorded_input(adapter, key), fingerprint.path_fingerprint(str(base))
        if recorded is None or now is None or fingerprint.content(recorded) == fingerprint.content(now):
            return None
        changed = f"was trained on the checkpoint '{base}', which {fingerprint.what_changed(recorded, now)}"
    return (
        f"the adapter '{adapter}' {changed}: the base was trained again in place since, so base and adapter are not "
        "the pair that trained; train the adapter again on the new base, or restore the base it was trained on"
    )


def hub_base_changed(adapter: Path, base: str | Path, recorded: dict[str, Any]) -> str | None:
    """An adapter trained on a hub base (`recorded`: its run's `fingerprint.hub_fingerprint` of it) whose id the
    Hugging Face cache now resolves to another snapshot (a download fetched a newer commit since): loaded on it, the
    adapter would sit on other weights than it trained on. None while the cache resolves it as then, or not at all
    (the load names that)."""
    from hfgen import fingerprint, hub_cache

    now = fingerprint.hub_fingerprint(str(base), recorded.get("revision"))
    if now is None or now["commit"] == recorded.get("commit"):
        return None
    return (
        f"the adapter '{adapter}' was trained on the snapshot {recorded.get('commit')} of '{base}', which the Hugging "
        f"Face cache now resolves to the snapshot {now['commit']} (a download fetched another commit since), so base "
        "and adapter are not the pair that trained; train the adapter again on the new snapshot, or point the cache "
        f"back at the one it trained on (its commit in {hub_cache.refs_file(str(base), recorded.get('revision'))})"
    )


def trained_on_run(adapter: Path, key: str) -> str | None:
    """The run id of the `key` model that the adapter in `adapter` trained on: a finished run's COMPLETE marker names
    it; a checkpoint-N has no marker, but the inputs its run recorded (`recorded_input`) name each hfgen run among
    them by its id."""
    marker = read_json(adapter / COMPLETE_MARKER, None)
    if isinstance(marker, dict):
        return (marker.get(INPUT_RUNS) or {}).get(key)
    return (recorded_input(adapter, key) or {}).get("run")


def recorded_input(run: Path, key: str) -> dict[str, Any] | None:
    """The fingerprint of its `key` input that the run which wrote `run` recorded when it started (`record_inputs`):
    a checkpoint-N's state holds it (or else its run's hfgen_inputs.json), a finished run's hfgen_inputs.json."""
    state = read_json(run / CHECKPOINT_STATE, None)
    inputs = state.get("inputs") if isinstance(state, dict) else None
    if inputs is None:
        inputs = read_json((run.parent if is_checkpoint_dir(run) else run) / RUN_INPUTS, None)
    recorded = inputs.get(key) if isinstance(inputs, dict) else None
    return recorded if isinstance(recorded, dict) else None


# What a run's training inputs held when it started (`fingerprint.recipe_inputs` of the keys that shape training):
# OUTPUT_DIR/hfgen_inputs.json, and in each checkpoint's state, so that a resume, or a complete run judged reusable, is
# of the same inputs, not only of the same paths (a base retrained in place, a data file rewritten under its name)
RUN_INPUTS = "hfgen_inputs.json"


def current_inputs(recipe) -> dict[str, Any]:
    """The fingerprints of the recipe's training inputs as they are now."""
    from hfgen import fingerprint

    return fingerprint.recipe_inputs(recipe.values, shapes_training)


def record_inputs(output_dir: str | Path, inputs: dict[str, Any]) -> None:
    if is_main_process():
        write_json(Path(output_dir) / RUN_INPUTS, inputs)


def complete_as_recipe(run_dir: str | Path, recipe) -> tuple[bool, list[str]]:
    """(whether `run_dir` holds the complete run of this same resolved `recipe`, made from inputs as they are now;
    how its inputs changed in place, `inputs_changed`): what a sweep's point or a comparison's run skips on. The
    inputs are compared only for a run of this recipe: another recipe's record names other inputs."""
    same_recipe = holds_recipe(run_dir, recipe.to_yaml())
    changed = inputs_changed(run_dir, recipe) if same_recipe else []
    return is_complete(run_dir) and same_recipe and not changed, changed


def inputs_changed(run_dir: str | Path, recipe) -> list[str]:
    """How the inputs of the run in `run_dir` (complete, of this recipe) differ from what its paths hold now, in
    words; [] when they are the same, or when the run recorded none (an older hfgen: judged by its recipe alone)."""
    from hfgen import fingerprint

    recorded = read_json(Path(run_dir) / RUN_INPUTS, None)
    return [] if recorded is None else fingerprint.changes(recorded, current_inputs(recipe))


# A pipeline step's record of the runs it consumed (the earlier steps' COMPLETE markers, `inputs_of`), written when
# it starts: a step whose inputs were made again since is run again from scratch, even when a stop between steps
# made the pipeline forget that an earlier step ran.
INPUTS_RECORD = "pipeline_inputs.json"


def inputs_of(run_dirs: dict[str, Path]) -> dict[str, Any]:
    """{name: the COMPLETE marker of that run (its id and end time), or None when it has none}."""
    return {name: read_json(Path(path) / COMPLETE_MARKER, None) for name, path in run_dirs.items()}


def wait_for_everyone() -> None:
    """A barrier across the launched processes, when there is a process group (single-process runs have none;
    `shutdown_distributed` ends it when the command is done)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def is_complete(output_dir: str | Path) -> bool:
    return (Path(output_dir) / COMPLETE_MARKER).is_file()


def start_metrics(output_dir: str | Path, resume: Path | None) -> None:
    """Before training: metrics.jsonl as it was when the `resume` checkpoint was written (its rows after that are
    about to be logged again), or none at all on a fresh start. A resumed or repeated run never duplicates rows."""
    if not is_main_process():
        return
    path = Path(output_dir) / "metrics.jsonl"
    if resume is None:
        path.unlink(missing_ok=True)
        return
    state = read_json(Path(resume) / CHECKPOINT_STATE, {})
    source = Path(resume).parent
    if source.resolve() != Path(output_dir).resolve():
        copy_checkpoint_metrics(source, output_dir, state)
        return
    rows = read_metrics(output_dir)
    if "metrics_rows" in state:
        kept = rows[: state["metrics_rows"]]
    else:  # a checkpoint from an older hfgen: rows up to its step
        kept = [row for row in rows if row["step"] <= state.get("step", 0)]
    if path.is_file():
        write_jsonl(path, kept)


def copy_checkpoint_metrics(source: Path, output_dir: str | Path, state: dict[str, Any]) -> None:
    """A resume from another dir's checkpoint: metrics.jsonl starts with that run's rows up to the checkpoint (its
    dir's first `metrics_rows` rows), as the uninterrupted run's does; the new dir's file held none of them. When that
    run's file no longer holds them (deleted, or cut back by a later resume), the new one starts at the checkpoint,
    and says so."""
    import sys

    rows, count, step = read_metrics(source), state.get("metrics_rows"), state.get("step", 0)
    path = Path(output_dir) / "metrics.jsonl"
    if count is not None and len(rows) >= count and all(row.get("step", 0) <= step for row in rows[:count]):
        write_jsonl(path, rows[:count])
        return
    path.unlink(missing_ok=True)
    print(
        f"hfgen: resume: '{source / 'metrics.jsonl'}' no longer holds the rows of the run up to step {step}, so "
        f"'{path}' starts after that step",
        file=sys.stderr,
    )


class MetricsLogger:
    """Appends one JSON line per call to OUTPUT_DIR/metrics.jsonl (main process only)."""

    def __init__(self, output_dir: str | Path, fresh: bool = False):
        self.path = Path(output_dir) / "metrics.jsonl"
        if is_main_process():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if fresh:
                self.path.unlink(missing_ok=True)

    def log(self, step: int, **metrics) -> None:
        if not is_main_process():
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json_line({"step": step, **metrics}))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (none when it is missing)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"'{path}' is not UTF-8 text ({error}): restore or delete it") from None
    lines = [line for line in text.splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):  # the line being appended when the run was killed: it never happened
                break
            raise UserError(f"'{path}' line {number} is not valid JSON ({error}): restore or delete it") from None
    return rows


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def trainer_callbacks(output_dir: str | Path) -> list:
    """What every Trainer-based stage adds to its Trainer: logs mirrored into metrics.jsonl, checkpoints marked
    complete (hfgen_state.json written last, then rotation), the divergence guard, a save on SIGINT/SIGTERM
    (`save_on_signal`), and the kill points of the resume tests."""
    from transformers import TrainerCallback

    from hfgen import guard

    logger = MetricsLogger(output_dir)
    divergence = guard.Divergence(output_dir)

    class RunCallback(TrainerCallback):
        total_limit = None
        # set by `trainer_resume` (every Trainer stage calls it before training): the Trainer, whose loss counters
        # a checkpoint keeps (`loss_window`), and the checkpoint the run resumed from
        trainer, resumed_from = None, None
        last_loss_row = 0  # the step of the last row with a loss (its window starts after it)

        def on_init_end(self, args, state, control, **kwargs):
            # Trainer rotates checkpoints before the completion marker exists: a kill in between would leave no
            # complete checkpoint. Rotation moves after the marker (`finish_checkpoint`), with the recipe's limit.
            self.total_limit, args.save_total_limit = args.save_total_limit, None

        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            from hfgen import loop

            loop.note_repeated_rows(train_dataloader, output_dir)
            restore_loss_window(self.trainer, self.resumed_from)
            self.last_loss_row = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                # A step the guard skipped (nan_tolerance) had a non-finite loss, which transformers'
                # logging_nan_inf_filter replaced by the mean of its window so far (0 right after a row): the row
                # read as a good step, 0.0 where training broke. It is NaN, as the accelerate loops log it.
                if any(self.last_loss_row < step <= state.global_step for step in guard.skipped_steps):
                    logs["loss"] = math.nan
                self.last_loss_row = state.global_step
            if logs and "train_loss" in logs and self.trainer is not None:
                # the closing row: the Trainer's figure covers only the steps since the resume (as eval.json's did)
                logs["train_loss"] = run_train_loss(self.trainer, logs["train_loss"], self.resumed_from)
            if state.is_world_process_zero and logs:
                logger.log(state.global_step, **{"epoch": state.epoch, **logs})
            divergence.note_loss(state.global_step, (logs or {}).get("loss"))

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            guard.kill_point("step", state.global_step + 1)
            divergence.check_step(state.global_step + 1, optimizer=optimizer)

        def on_step_end(self, args, state, control, **kwargs):
            if guard.signalled():
                control.should_save = True
            if control.should_save:
                start_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}")

        on_epoch_end = on_step_end

        def on_save(self, args, state, control, model=None, **kwargs):
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            guard.check_checkpoint(output_dir, path, state.global_step, [model])  # (every process, before marking)
            window = loss_window(self.trainer)  # (every process: a gather)
            wait_for_everyone()  # every rank's files (its RNG state) are written
            if args.should_save:
                finish_checkpoint(
                    output_dir, path, state.global_step, self.total_limit, state.best_model_checkpoint, window
                )
            wait_for_everyone()
            guard.exit_on_signal(path)

        def on_prediction_step(self, args, state, control, **kwargs):
            guard.kill_point("eval", state.global_step)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            check_best_metric(args.metric_for_best_model, metrics or {})

    return [RunCallback()]


def check_best_metric(name: str | None, metrics: dict[str, Any]) -> None:
    """`metric_for_best_model` must name a figure the evaluation logs. Which figures a stage logs is known only once
    it has evaluated (TRL's trainers add their own), and transformers then looked the name up with a KeyError
    traceback; this says it as the recipe's error, at the first evaluation, before the Trainer looks."""
    if not name:
        return
    key = name if name.startswith("eval_") else f"eval_{name}"
    if key not in metrics:
        logged = ", ".join(sorted(k.removeprefix("eval_") for k in metrics if k.startswith("eval_")))
        raise UserError(
            f"metric_for_best_model: '{name}' is not a figure this stage's evaluation logs (looked up as '{key}' in "
            f"its metrics.jsonl rows); it logs: {logged}. Name one of these (with or without 'eval_')."
        )


# The loss the Trainer sums since its last logged row (each process its own), kept in a checkpoint: a checkpoint at a
# step that is not a logging step (a signal's, or save_steps not a multiple of logging_steps) left the steps since
# that row out of the next row after a resume, which then averaged fewer steps than the uninterrupted run's.
LOSS_WINDOW = "loss_window"


# Where TRL's trainers keep the per-step figures they average into the next logged row: `_metrics[mode]` (SFT, DPO,
# KTO, GRPO, ...), `_stored_metrics[mode]` (the experimental ORPO and CPO/SimPO trainers)
TRL_PENDING_FIGURES = ("_metrics", "_stored_metrics")


def loss_window(trainer) -> dict[str, Any]:
    """{LOSS_WINDOW: {"since_step": the last logged step, "sums": each process's loss sum since}} (transformers 5's
    `_tr_loss` and `_globalstep_last_logged`), or {} when the Trainer keeps no such counters. With TRL's trainers
    also what they log beside the loss: the figures of each step since that row (`TRL_PENDING_FIGURES`: SFT's entropy
    and token accuracy, DPO's rewards..., gathered, so the same on every process) and SFT's token count so far."""
    if trainer is None or not hasattr(trainer, "_tr_loss") or not hasattr(trainer, "_globalstep_last_logged"):
        return {}
    sums = trainer.accelerator.gather(trainer._tr_loss.detach().reshape(1)).tolist()
    window: dict[str, Any] = {"since_step": trainer._globalstep_last_logged, "sums": sums}
    pending = {
        attribute: {key: [float(v) for v in values] for key, values in getattr(trainer, attribute)["train"].items()}
        for attribute in TRL_PENDING_FIGURES
        if isinstance(getattr(trainer, attribute, None), dict)
    }
    if pending:
        window["trl_metrics"] = pending
    if hasattr(trainer, "_total_train_tokens"):
        window["total_train_tokens"] = trainer._total_train_tokens
    return {LOSS_WINDOW: window}


_loss_windows: dict[Path, dict | None] = {}  # resumed checkpoint -> its loss window, read while it still exists


def forget_resumed_loss_windows() -> None:
    """At a run's start: a checkpoint another run in this process resumed from may have been written again at the
    same path since (a notebook's or a sweep's next run into the dir), and its window read then is not this one's."""
    _loss_windows.clear()


def resumed_loss_window(checkpoint: Path | None) -> dict | None:
    """The loss window the checkpoint a run resumed from kept, read once at the resume: by the end of the run the
    checkpoint may be rotated away (save_total_limit), and the run's train_loss then left its steps out."""
    if checkpoint is None:
        return None
    key = Path(checkpoint).resolve()
    if key not in _loss_windows:
        _loss_windows[key] = read_json(key / CHECKPOINT_STATE, {}).get(LOSS_WINDOW)
    return _loss_windows[key]


def note_window_not_kept(checkpoint: Path, step: int, logging_steps: int, max_steps: int) -> None:
    """A checkpoint of an earlier hfgen (before the loss window travelled with it) between two logged rows: the
    losses of the steps since the last row are not in it, so the first row after the resume averages only the steps
    since the checkpoint. Said on the console, as that row differs from the uninterrupted run's."""
    import sys

    if logging_steps and step % logging_steps and step < max_steps:
        last, row = step - step % logging_steps, min(step - step % logging_steps + logging_steps, max_steps)
        print(
            f"hfgen: resume: {Path(checkpoint).name}, an earlier hfgen's, keeps no loss of steps {last + 1}-{step}: "
            f"the first logged row after the resume (step {row}) averages only steps {step + 1}-{row}",
            file=sys.stderr,
        )


def restore_loss_window(trainer, checkpoint: Path | None) -> None:
    """At the start of a resumed `train()`: each process's loss sum since the last logged step back, so the next row
    averages the same steps as the uninterrupted run's. Those steps' loss is already in the run-wide train_loss
    (`run_train_loss`), so it is taken out of the Trainer's figure for this call, which covers the steps it trains."""
    window = resumed_loss_window(checkpoint)
    if window is None and checkpoint is not None and hasattr(trainer, "_tr_loss"):
        if trainer.args.logging_strategy == "steps" and is_main_process():
            note_window_not_kept(
                checkpoint, trainer.state.global_step, trainer.state.logging_steps, trainer.state.max_steps
            )
    if window and "total_train_tokens" in window and hasattr(trainer, "_total_train_tokens"):
        trainer._total_train_tokens = window["total_train_tokens"]  # (at the checkpoint's step, not the last row's)
    if not window or not hasattr(trainer, "_tr_loss") or window["since_step"] >= trainer.state.global_step:
        return
    for attribute, figures in window.get("trl_metrics", {}).items():  # what TRL averages into the next row
        if isinstance(getattr(trainer, attribute, None), dict):
            getattr(trainer, attribute)["train"].clear()
            getattr(trainer, attribute)["train"].update({key: list(values) for key, values in figures.items()})
    trainer._tr_loss.fill_(window["sums"][trainer.accelerator.process_index])
    trainer._globalstep_last_logged = window["since_step"]
    trainer._total_loss_scalar -= sum(window["sums"]) / len(window["sums"])  # (the logged loss: their mean)


# ---- checkpoints: complete when hfgen_state.json is written (Trainer writes the files of its own) ------------

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


CHECKPOINT_STATE = "hfgen_state.json"  # written last into a checkpoint: {"step": N, "metrics_rows": K}


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint dirs under output_dir, complete or not, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def is_checkpoint_dir(path: str | Path) -> bool:
    """Whether `path` is a checkpoint-N dir of an hfgen run (complete or not): named so, beside its run's recipe."""
    path = Path(path)
    return bool(_CHECKPOINT.match(path.name)) and (path.parent / "recipe.yaml").is_file()


def is_complete_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CHECKPOINT_STATE).is_file()


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoints that were written to the end, oldest step first."""
    return [p for p in checkpoints(output_dir) if is_complete_checkpoint(p)]


def start_checkpoint(path: str | Path) -> None:
    """Before (re)writing checkpoint-N: it is incomplete until `finish_checkpoint` marks it again."""
    if is_main_process():
        (Path(path) / CHECKPOINT_STATE).unlink(missing_ok=True)


def finish_checkpoint(
    output_dir: str | Path,
    path: str | Path,
    step: int,
    total_limit: int | None,
    keep: str | None = None,
    state: dict[str, Any] | None = None,
) -> None:
    """Mark a fully written checkpoint complete (its state file, written atomically and last, also records how many
    metrics.jsonl rows it covers, and `state`: what else a resume takes back), then rotate: the oldest complete
    checkpoints beyond `total_limit` go (never `keep`, the best one), and so do incomplete ones older than this one
    (left by a killed run). A kill at any moment thus leaves at least the newest complete checkpoint."""
    from hfgen import guard

    guard.kill_point("checkpoint", step)
    weights_readable_as_umask(path)
    recipe = Path(output_dir) / "recipe.yaml"
    if recipe.is_file() and not (Path(path) / "recipe.yaml").is_file():  # what a resume is compared with
        # written whole or not at all (a half copy, kept by a later save of this checkpoint, read as another recipe),
        # and a full disk names this file, not the recipe read (shutil.copyfile's error names its source)
        write_text(Path(path) / "recipe.yaml", recipe.read_text(encoding="utf-8"))
    write_json(Path(path) / CHECKPOINT_STATE, {
        "step": step,
        "metrics_rows": len(read_metrics(output_dir)),
        **launch_identity(),
        "skipped_steps": sorted(guard.skipped_steps),
        "packages": package_versions(),  # (`note_other_versions`)
        "hfgen_commit": hfgen_commit(),
        **({"inputs": inputs} if (inputs := read_json(Path(output_dir) / RUN_INPUTS, None)) is not None else {}),
        **(state or {}),
    }, exact=True)  # fmt: skip
    # Checkpoints of later steps than this one are of a line of training the run left (it resumed from an earlier
    # one): they go, never this run's own (rotation keeping a stale "newest" one deleted each new one as written).
    complete = [p for p in complete_checkpoints(output_dir) if _step_of(p) <= step]
    doomed = [p for p in checkpoints(output_dir) if _step_of(p) > step]
    doomed += complete[:-total_limit] if total_limit and total_limit > 0 else []
    doomed += [p for p in checkpoints(output_dir) if not is_complete_checkpoint(p) and _step_of(p) < step]
    for old in doomed:
        if keep is None or Path(old).resolve() != Path(keep).resolve():
            remove_dir(Path(old))


def _step_of(path: Path) -> int:
    return int(_CHECKPOINT.match(path.name).group(1))


def save_checkpoint(
    accelerator,
    output_dir: str | Path,
    step: int,
    total_limit: int | None,
    recipe_yaml: str | None = None,
    save_extra=None,
) -> Path:
    """`accelerator.save_state` (models, optimizers, schedulers, RNG, registered objects) into checkpoint-STEP,
    with the recipe beside it, marked complete last (`finish_checkpoint`), then rotated. `save_extra(path)`, run on
    every process, writes what `save_state` cannot (each process's own files) before the checkpoint is complete."""
    from hfgen import guard

    path = Path(output_dir) / f"checkpoint-{step}"
    start_checkpoint(path)
    guard.check_checkpoint(output_dir, path, step, accelerator._models)  # what save_state writes, before it does
    hook = accelerator.register_save_state_pre_hook(_drop_frozen_parameters)
    try:
        accelerator.save_state(str(path))
    finally:
        hook.remove()
    if save_extra is not None:
        save_extra(path)
    accelerator.wait_for_everyone()  # every rank's files (its RNG state) are written
    if accelerator.is_main_process:
        if recipe_yaml:
            (path / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
        finish_checkpoint(output_dir, path, step, total_limit)
    accelerator.wait_for_everyone()
    return path


def _frozen_parameters(model) -> set[str]:
    return {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _drop_frozen_parameters(models, weights, output_dir) -> None:
    """Save-state hook: a checkpoint keeps what trains (and buffers). Frozen parameters (a LoRA base, a frozen
    embedding) are the ones the run started from and come back from `model_name_or_path` on resume: a 7B LoRA
    policy's part of a checkpoint is then tens of MB, not 14 GB (its base in bf16). FSDP and DeepSpeed models are saved
    their own way and are not in `weights`."""
    for model, state in zip(models, weights):
        for name in _frozen_parameters(model) & state.keys():
            del state[name]


def load_checkpoint(accelerator, path: str | Path) -> int:
    """`accelerator.load_state` for a checkpoint written by `save_checkpoint` -> its step. Only frozen parameters
    may be missing from its weights (they are the freshly loaded ones); anything else missing is an error."""
    from accelerate.utils import DistributedType

    check_registered_states(path)
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM):
        accelerator.load_state(str(path))  # saved whole, by their own savers
        return checkpoint_step(path)
    hook = accelerator.register_load_state_pre_hook(_check_trainable_weights_saved)
    try:
        accelerator.load_state(str(path), strict=False)  # strict=False: the frozen parameters are not in the file
    finally:
        hook.remove()
    return checkpoint_step(path)


def check_registered_states(path: str | Path) -> None:
    """accelerate unpickles a checkpoint's registered objects' states (custom_checkpoint_N.pkl: schedule, EMA, RNG,
    KL controller, ...) with weights_only=False, so a crafted file given as resume_from_checkpoint (a colleague's, a
    downloaded one) would run code. hfgen's states are tensors, numbers and containers of them: each file must load
    under weights_only=True first (mmap: a model-sized EMA state is not read into memory twice), or it is refused."""
    import pickle

    import torch

    for state_file in sorted(Path(path).glob("custom_checkpoint_*.pkl")):
        try:
            torch.load(state_file, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
            # torch's own text advises turning the guard off: only the object it refused is named
            refused = re.search(r"GLOBAL ([\w.]+)", str(error))
            reason = f"it names {refused.group(1)}" if refused else str(error).split(". ")[0].strip()
            raise UserError(
                f"resume_from_checkpoint: '{state_file}' is no state hfgen wrote: it does not load as tensors, "
                f"numbers and lists or dicts of them ({reason}), and resuming from it would run what its pickle "
                "names. Resume only from checkpoints of runs you trust; hfgen does not load this one."
            ) from None


def _check_trainable_weights_saved(models, input_dir) -> None:
    """Load-state hook: every weight of every model but its frozen parameters must be in the checkpoint."""
    from safetensors import safe_open

    from hfgen.errors import UserError

    for i, model in enumerate(models):  # weights files are numbered in prepare order
        weights_file = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
        if not weights_file.is_file():
            raise UserError(f"checkpoint '{input_dir}' has no {weights_file.name}; it was not written by this stage.")
        with safe_open(str(weights_file), "pt") as f:
            present = set(f.keys()) | _frozen_parameters(model)
        tied: dict[int, list[str]] = {}  # names sharing one tensor (tied embeddings) are saved once
        for name, tensor in model.state_dict().items():
            tied.setdefault(tensor.data_ptr(), []).append(name)
        missing = [names[0] for names in tied.values() if not present.intersection(names)]
        if missing:
            raise UserError(
                f"checkpoint '{input_dir}' lacks {len(missing)} trainable weights of this run's model (e.g. "
                f"'{missing[0]}'): it was written by a run with other model or LoRA settings."
            )


def resolve_resume(resume_from_checkpoint: str | bool | None, output_dir: str | Path) -> Path | None:
    """`--resume_from_checkpoint true` means the newest complete checkpoint in output_dir (newer incomplete ones,
    cut short by a kill, are skipped and named); a path means that one, which must be complete. Either must have
    been written by this run (`check_same_run`); the steps the divergence guard skipped come back with it."""
    path = _resume_path(resume_from_checkpoint, output_dir)
    if path is not None:
        from hfgen import guard

        check_same_run(path, output_dir)
        guard.skipped_steps.update(read_json(path / CHECKPOINT_STATE, {}).get("skipped_steps", []))
    return path


def trainer_resume(trainer, output_dir: str | Path) -> Path | None:
    """A Trainer stage's resume: the checkpoint to pass to `trainer.train` (None: a fresh start), with
    metrics.jsonl cut back to it (`start_metrics`), TRL's token count as it was then, and the trackers (report_to)
    placed to log the rows as metrics.jsonl has them (`_trackers_after_records`)."""
    _count_whole_model_flos(trainer)
    path = resolve_resume(trainer.args.resume_from_checkpoint, output_dir)
    if path is not None and trainer.args.save_only_model:
        # (check_same_run has made sure the checkpoint was written under the same value)
        raise UserError(
            f"resume_from_checkpoint: checkpoint '{path}' was written with save_only_model: true, so it holds the "
            "weights but no optimizer, scheduler or RNG state; resumed from it, training would go on with a fresh "
            "optimizer and learning-rate schedule, another run than the uninterrupted one. Start afresh (a new "
            "output_dir, or overwrite_output_dir: true without --resume_from_checkpoint), or keep save_only_model "
            "false in runs you may resume."
        )
    for callback in trainer.callback_handler.callbacks:
        if hasattr(callback, "resumed_from"):  # trainer_callbacks' RunCallback
            callback.trainer, callback.resumed_from = trainer, path
    _trackers_after_records(trainer)
    if path is not None:
        # eval_on_start is the run's start: transformers evaluates at the start of every train() call, which added a
        # row at the resumed step that the uninterrupted run has not (the step-0 row is among those kept)
        trainer.args.eval_on_start = False
    start_metrics(output_dir, path)
    if path is not None:
        _finish_if_trained_to_the_end(trainer, path)
    if path is not None and is_main_process() and hasattr(trainer, "_total_train_tokens"):
        # TRL (1.16) keeps its `num_tokens` count in the trainer, not in the checkpoint: the curve restarted at 0.
        # The main process logs it; the count is the same on every process (a gathered sum). The last row's count,
        # for a checkpoint of an earlier hfgen: `restore_loss_window` takes the count at the checkpoint's own step.
        counts = [row["num_tokens"] for row in read_metrics(output_dir) if "num_tokens" in row]
        trainer._total_train_tokens = counts[-1] if counts else 0
    return path


def _trackers_after_records(trainer) -> None:
    """Trainer calls its report_to callbacks (TensorBoard, W&B, ...) before the stage's: they logged each row before
    hfgen's callbacks rewrote it (the closing train_loss made run-wide after a resume, the reward stage's batch-mean
    names), so a tracker's figure differed from metrics.jsonl's under the same name. Moved after them, the trackers
    log the rows as metrics.jsonl has them."""
    from transformers.integrations import get_reporting_integration_callbacks

    for tracker in get_reporting_integration_callbacks(trainer.args.report_to):
        callback = trainer.pop_callback(tracker)
        if callback is not None:
            trainer.add_callback(callback)


def _count_whole_model_flos(trainer) -> None:
    """Under ZeRO-3, Trainer's `total_flos` (6 x tokens x `model.num_parameters(exclude_embeddings=True)` per
    micro-batch) counts `numel()` of partitioned parameters, which is what this process holds at that moment: the
    first micro-batch of each process counted 0 (its parameters released), so a resumed run (a new process) counted
    one micro-batch per process fewer than the uninterrupted run, with identical weights. The whole model's count,
    taken once before training (DeepSpeed's `ds_numel` where already partitioned), is used instead, as under DDP."""
    from torch import nn

    from hfgen import loop

    model = trainer.model
    main_input = getattr(model, "main_input_name", "input_ids")
    if loop.engine(trainer.accelerator) != "zero3" or not hasattr(model, "num_parameters"):
        return  # whole parameters on every process: transformers' own count stands
    embeddings = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Embedding)}
    count = sum(getattr(p, "ds_numel", p.numel()) for name, p in model.named_parameters() if name not in embeddings)
    trainer.floating_point_ops = lambda inputs: 6 * inputs[main_input].numel() * count if main_input in inputs else 0


def _finish_if_trained_to_the_end(trainer, checkpoint: Path) -> None:
    """From a checkpoint of the run's last step (a stop during the final evaluation or save), `trainer.train` loads
    it (weights, optimizer, state, log history) and ends as training ends (its closing metrics row, the best model
    when asked), training no step: transformers (5.24-5.25) checks max_steps only after a step, so where the last
    step is not an epoch's last it trained one step more. Any epoch left is skipped, and the RNG state comes back from
    the checkpoint (as a resumed epoch restores it) for what samples after training (generations, held-out
    comparisons): the uninterrupted run's. A run extended past the checkpoint (a larger max_steps or
    num_train_epochs) trains on from it; one shortened to before it is refused (`check_budget_reaches`).
    Whether it is the last step's is decided once transformers has counted this run's steps (its first epoch, or its
    end where no epoch is left): the checkpoint's trainer_state.json keeps ceil(num_train_epochs), so a run of half an
    epoch extended to a whole one read as trained to the end of it, and only the data loader tells how many steps a
    fraction of an epoch is."""
    import sys

    run_epoch, finalize = trainer._run_epoch, trainer._finalize_training
    decided: list[bool] = []  # [whether the checkpoint is the last step's], once known

    def at_the_end() -> bool:
        if not decided:
            state, args = trainer.state, trainer.args
            epochs = f"num_train_epochs: {args.num_train_epochs} ({state.max_steps} steps)"
            budget = f"max_steps: {args.max_steps}" if args.max_steps > 0 else epochs
            check_budget_reaches(checkpoint, state.global_step, state.max_steps, budget)
            decided.append(state.global_step >= state.max_steps)
            if decided[0] and is_main_process():
                # (resuming from an earlier checkpoint, or from none, trained again what was trained, and the
                # rotation then deleted the new run's checkpoints in favour of this one)
                print(
                    f"hfgen: resume: {checkpoint.name} is the last step's; finishing the run from it", file=sys.stderr
                )
        return decided[0]

    def epoch_unless_at_the_end(*args, **kwargs):
        if at_the_end():
            trainer.control.should_training_stop = True
            return None
        return run_epoch(*args, **kwargs)

    def finalize_from_checkpoint(*args, **kwargs):
        if at_the_end():
            trainer._load_rng_state(str(checkpoint))
        return finalize(*args, **kwargs)

    trainer._run_epoch, trainer._finalize_training = epoch_unless_at_the_end, finalize_from_checkpoint


def run_train_loss(trainer, training_loss: float, resumed_from: Path | None) -> float:
    """The mean training loss over the whole run's steps, for eval.json and the closing metrics.jsonl row (the
    Trainer's own `train_loss`). After a resume the Trainer's `training_loss`
    covers only the steps this call trained (transformers 5), so a resumed run recorded another figure than the
    uninterrupted one; the earlier steps' losses come from the log history restored with the checkpoint (each
    logged loss is the mean over the steps since the log before it); the steps after the checkpoint's last log, from
    the loss sum the checkpoint kept (`loss_window`; a checkpoint of an older hfgen has none: they are left out).
    NaN when the divergence guard skipped a step (`nan_tolerance`): the Trainer counted its loss as its window's mean
    so far, a made-up figure, so the run's mean is not known."""
    from hfgen import guard

    if guard.skipped_steps:
        return math.nan
    if resumed_from is None:
        return training_loss
    start = _step_of(resumed_from)
    total, steps, previous = 0.0, 0, 0
    for row in trainer.state.log_history:
        if "loss" in row and row.get("step", start + 1) <= start:
            total += row["loss"] * (row["step"] - previous)
            steps += row["step"] - previous
            previous = row["step"]
    window = resumed_loss_window(resumed_from)
    if window and window["since_step"] < start:
        total += sum(window["sums"]) / len(window["sums"])
        steps += start - window["since_step"]
    trained = trainer.state.global_step - start
    return (total + training_loss * trained) / max(steps + trained, 1)


def resume_requested(resume_from_checkpoint) -> bool:
    return resume_from_checkpoint not in (None, False, "", "false", "False")


def nothing_to_resume(resume_from_checkpoint, output_dir: str | Path) -> bool:
    """`--resume_from_checkpoint true` with no complete checkpoint in output_dir (a run killed before its first one,
    a new dir): the run starts afresh, as the README promises a restart script that always passes it, and says so
    (the dir is then cleared as for a fresh start, not mixed into the new run)."""
    import sys

    if resume_from_checkpoint not in (True, "true", "True") or complete_checkpoints(output_dir):
        return False
    if is_main_process():
        incomplete = [p.name for p in checkpoints(output_dir)]
        which = f" (only incomplete ones: {', '.join(incomplete)})" if incomplete else ""
        print(f"hfgen: resume: no complete checkpoint in '{output_dir}'{which}; starting afresh", file=sys.stderr)
    return True


def _resume_path(resume_from_checkpoint, output_dir) -> Path | None:
    import sys

    if not resume_requested(resume_from_checkpoint):
        return None
    if resume_from_checkpoint in (True, "true", "True"):
        found = checkpoints(output_dir)
        complete = [p for p in found if is_complete_checkpoint(p)]
        skipped = [
            p.name
            for p in found
            if not is_complete_checkpoint(p) and (not complete or _step_of(p) > _step_of(complete[-1]))
        ]
        if not complete:
            nothing_to_resume(resume_from_checkpoint, output_dir)  # says so: a fresh start
            return None
        if skipped and is_main_process():
            print(
                f"hfgen: resume: skipped {', '.join(skipped)} (incomplete: the run stopped while writing it); "
                f"resuming from {complete[-1].name}",
                file=sys.stderr,
            )
        return complete[-1]
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise UserError(f"resume_from_checkpoint: '{path}' is not a directory.")
    if not is_complete_checkpoint(path) and not _CHECKPOINT.match(path.name) and is_run_dir(path):
        found = ", ".join(p.name for p in checkpoints(path)) or "none"
        raise UserError(
            f"resume_from_checkpoint: '{path}' is a run dir, not a checkpoint; give one of its checkpoint-N dirs "
            f"(it holds: {found}), or, to continue the run in output_dir, `--resume_from_checkpoint true` (the newest "
            "complete checkpoint there)."
        )
    if not is_complete_checkpoint(path):
        raise UserError(
            f"resume_from_checkpoint: '{path}' is an incomplete checkpoint (no {CHECKPOINT_STATE}: the run stopped "
            "while writing it, or it was not written by hfgen); give an earlier checkpoint, or "
            "`--resume_from_checkpoint true` for the newest complete one."
        )
    return path


# Keys that may change between a run and its resume: where and how often it saves, logs and reports, how it is
# evaluated and sampled (`eval_*`, `validation_*` and the keys below), and how long it trains (a resume may extend a
# run). Any other change would make the resumed run another run than the checkpoint's.
RESUMABLE_PREFIXES = ("eval_", "validation_")
# ... but for these, which the prefixes would let through: the held-out slice decides which rows train
NOT_RESUMABLE = frozenset(("validation_split_percentage",))
RESUMABLE_CHANGES = frozenset((
    "per_device_eval_batch_size", "max_eval_samples", "num_validation_images", "num_inference_steps",
    "guidance_scale", "num_samples", "sample_max_new_tokens", "sample_steps",
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "save_on_signal", "nan_tolerance",
    "logging_steps", "logging_dir", "logging_first_step", "report_to", "run_name", "disable_tqdm", "log_level",
    "save_steps", "save_strategy", "save_total_limit", "checkpointing_steps", "checkpoints_total_limit",
    "max_steps", "num_train_epochs", "total_episodes", "max_train_steps",
    "dataloader_num_workers", "ddp_backend", "ddp_timeout", "use_cpu",
    "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo",
))  # fmt: skip


def shapes_training(key: str) -> bool:
    """Whether a recipe key's value must stay the same between a run and its resume (`RESUMABLE_CHANGES`)."""
    return key in NOT_RESUMABLE or (key not in RESUMABLE_CHANGES and not key.startswith(RESUMABLE_PREFIXES))


def launch_identity() -> dict[str, Any]:
    """How this run is launched, as a checkpoint records it: processes and engine, and under FSDP its state-dict
    type. A checkpoint's optimizer, data order and shards are those of its launch (a ZeRO-3 checkpoint has no
    optimizer.pt a DDP run could read, a run on another number of processes draws other batches, and accelerate reads
    an FSDP checkpoint only in the layout of the launch's `fsdp_state_dict_type`: `fsdp_layout_on_disk`)."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    from hfgen import loop

    # (read from accelerate's shared state, which a process that reset it, a notebook's earlier run, may hold empty)
    processes = PartialState._shared_state.get("num_processes") or int(os.environ.get("WORLD_SIZE", "1"))
    identity = {"processes": processes, "engine": loop.current_engine()}
    if identity["engine"].startswith("fsdp") and AcceleratorState._shared_state:
        identity["fsdp_state_dict_type"] = AcceleratorState().fsdp_plugin.state_dict_type.name
    return identity


def fsdp_layout_on_disk(checkpoint: Path) -> str | None:
    """The `fsdp_state_dict_type` an FSDP checkpoint was saved under, read from its files (checkpoints of an hfgen
    that did not record it): accelerate's FULL_STATE_DICT writes the first model whole as pytorch_model_fsdp.bin,
    SHARDED_STATE_DICT as a pytorch_model_fsdp_0/ folder of shards (the Trainer and `accelerator.save_state` alike)."""
    if (checkpoint / "pytorch_model_fsdp_0").is_dir():
        return "SHARDED_STATE_DICT"
    if (checkpoint / "pytorch_model_fsdp.bin").is_file():
        return "FULL_STATE_DICT"
    return None


def check_same_run(checkpoint: Path, output_dir: str | Path) -> None:
    """A resume continues the checkpoint's run: the same stage and recipe (but for `RESUMABLE_CHANGES`), the same
    number of processes, engine and FSDP state-dict type; otherwise a UserError naming what differs (a resumed run
    that silently ran with other values, or on another launch, would be neither the old run nor the new one, and
    accelerate reads an FSDP checkpoint of the other layout with a raw error on every rank)."""
    state = read_json(checkpoint / CHECKPOINT_STATE, {})
    now = launch_identity()
    if "fsdp_state_dict_type" in now and "fsdp_state_dict_type" not in state and state.get("engine") == now["engine"]:
        # a checkpoint of an hfgen that did not record it: its files say (neither file: nothing to compare)
        state["fsdp_state_dict_type"] = fsdp_layout_on_disk(checkpoint) or now["fsdp_state_dict_type"]
    changed = [key for key in now if key in state and state[key] != now[key]]
    if changed:
        launch = ", ".join(f"{key}: {state[key]!r} -> {now[key]!r}" for key in changed)
        layout = (
            " (accelerate reads an FSDP checkpoint only under the fsdp_state_dict_type it was saved with: the launch "
            "config's fsdp_state_dict_type, or FSDP_STATE_DICT_TYPE)"
            if "fsdp_state_dict_type" in changed
            else ""
        )
        raise UserError(
            f"resume_from_checkpoint: checkpoint '{checkpoint}' was written by another launch ({launch}); "
            f"its optimizer state and data order belong to that launch{layout}. Resume with the launch config it was "
            "written with (the same number of processes, engine and FSDP state-dict type), or start afresh (a new "
            "output_dir, or overwrite_output_dir: true without resume_from_checkpoint)."
        )
    check_same_recipe(checkpoint, output_dir)


def check_resume_target(
    resume_from_checkpoint, output_dir: str | Path, inputs: dict | None = None, recipe_yaml: str | None = None
) -> None:
    """What `resolve_resume` refuses in the checkpoint itself (not a checkpoint, incomplete, another stage's or
    recipe's, or of other `inputs`: `current_inputs`), checked when the run starts: the stage resolves its resume only
    after loading its data and models, minutes on a real run. (The launch is checked there: before the stage's
    Accelerator, the engine is not known.) `recipe_yaml`: this run's recipe, when output_dir's recipe.yaml is not yet
    rewritten (`train.run_recipe` checks before it writes the run's records, so that a refused resume leaves the run
    in the dir as it was: a complete run kept its COMPLETE marker and recipe.yaml)."""
    if resume_from_checkpoint in (True, "true", "True"):
        complete = complete_checkpoints(output_dir)
        path = complete[-1] if complete else None
    else:
        path = _resume_path(resume_from_checkpoint, output_dir)
    if path is not None:
        check_same_recipe(path, output_dir, recipe_yaml)
        budget = _steps_in_recipe(recipe_yaml if recipe_yaml is not None else Path(output_dir) / "recipe.yaml")
        if budget is not None:
            check_budget_reaches(path, checkpoint_step(path), *budget)
        if inputs is not None:
            check_same_inputs(path, inputs)
        note_other_versions(path)


def note_other_versions(checkpoint: Path) -> None:
    """A resume under other package versions than its checkpoint's (an upgrade between a kill and the resume) is
    said: the defaults of the keys the recipe leaves out (hfgen's, transformers', TRL's) may have changed, so the
    resumed steps may train under other values, and nothing else would show it (recipe.yaml records the keys written,
    env.json this start's versions). Not refused: most upgrades change no default a run uses. A checkpoint of an
    older hfgen records none."""
    import sys

    state = read_json(checkpoint / CHECKPOINT_STATE, {})
    then = state.get("packages")
    if not isinstance(then, dict) or not is_main_process():
        return
    now = package_versions()
    changed = [f"{name} {then.get(name)} -> {now.get(name)}" for name in sorted(set(then) | set(now))
               if then.get(name) != now.get(name)]  # fmt: skip
    if "hfgen_commit" in state and state["hfgen_commit"] != hfgen_commit():  # a checkout's commits share a version
        changed.append(f"hfgen's commit {_short_commit(state['hfgen_commit'])} -> {_short_commit(hfgen_commit())}")
    if changed:
        print(
            f"hfgen: resume: {checkpoint.name} was written under other package versions ({', '.join(changed)}): "
            "the defaults of keys the recipe leaves out may differ, and the resumed steps train under this run's; "
            "write out the keys that matter, or resume under the versions it was written with",
            file=sys.stderr,
        )


def _short_commit(commit: str | None) -> str:
    return (
        "none (an installed package)"
        if commit is None
        else commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")
    )


def _steps_in_recipe(recipe: Path | str) -> tuple[int, str] | None:
    """(steps, the key that says so) where the recipe (a recipe.yaml, or its text) gives its step count outright (a
    Trainer stage's max_steps, a loop's max_train_steps); a count of epochs or episodes is known only once the data
    and the launch are (the stage checks it then: `check_budget_reaches`)."""
    import yaml

    if isinstance(recipe, Path):
        recipe = recipe.read_text(encoding="utf-8") if recipe.is_file() else ""
    values = yaml.safe_load(recipe) or {}
    for key in ("max_steps", "max_train_steps"):
        steps = values.get(key)
        if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
            return steps, f"{key}: {steps}"
    return None


def check_budget_reaches(checkpoint: Path, step: int, max_steps: int, budget: str) -> None:
    """A resume may lengthen a run (`RESUMABLE_CHANGES`: max_steps, epochs, episodes) but not end it before its
    checkpoint's step: those steps are trained, so the run 'finished' from the checkpoint was COMPLETE with more steps,
    trained under the longer schedule, than its recipe.yaml says. `budget`: the keys that set `max_steps`, as named."""
    if step > max_steps:
        raise UserError(
            f"resume_from_checkpoint: checkpoint '{checkpoint}' is at step {step}, past this run's {budget}: a resume "
            "may lengthen a run, not end it before its checkpoint (its steps are trained, under the longer run's "
            f"schedule). Resume with at least {step} steps, from an earlier checkpoint, or start afresh (a new "
            "output_dir, or overwrite_output_dir: true without resume_from_checkpoint)."
        )


def check_same_inputs(checkpoint: Path, inputs: dict[str, Any]) -> None:
    """The checkpoint's training inputs (its state's `inputs`) against what their paths hold now: a resume on a
    retrained base (a LoRA adapter or DPO policy half trained on each), another data file under the same name or an
    edited chat template would continue on other inputs without a word, and its COMPLETE marker would name the new
    base as the one it trained on. A checkpoint of an older hfgen records none."""
    from hfgen import fingerprint

    then = read_json(checkpoint / CHECKPOINT_STATE, {}).get("inputs")
    changed = fingerprint.changes(then, inputs) if isinstance(then, dict) else []
    if changed:
        raise UserError(
            f"resume_from_checkpoint: checkpoint '{checkpoint}' was trained on other inputs than these paths hold now: "
            f"{'; '.join(changed)}. A resume continues that run as it was: restore those inputs, or start afresh on "
            "the new ones (a new output_dir, or overwrite_output_dir: true without resume_from_checkpoint)."
        )


def check_same_recipe(checkpoint: Path, output_dir: str | Path, recipe_yaml: str | None = None) -> None:
    """`check_same_run`'s recipe half: the checkpoint's recipe.yaml against this run's (`recipe_yaml`, else
    output_dir's)."""
    import yaml

    then_file, now_file = checkpoint / "recipe.yaml", Path(output_dir) / "recipe.yaml"
    if not then_file.is_file() or (recipe_yaml is None and not now_file.is_file()):
        return  # a checkpoint of an older hfgen
    then_text = then_file.read_text(encoding="utf-8")
    now_text = recipe_yaml if recipe_yaml is not None else now_file.read_text(encoding="utf-8")
    then_yaml, now_yaml = yaml.safe_load(then_text) or {}, yaml.safe_load(now_text) or {}
    if then_yaml.get("stage") != now_yaml.get("stage"):
        raise UserError(
            f"resume_from_checkpoint: checkpoint '{checkpoint}' was written by a {then_yaml.get('stage')} run, "
            f"not a {now_yaml.get('stage')} run; give a checkpoint of this run."
        )
    changed = _training_changes(then_text, now_text)
    if changed:
        raise UserError(
            f"resume_from_checkpoint: checkpoint '{checkpoint}' was written by a run with other values of keys that "
            f"shape training ({', '.join(changed)}); a resume continues that run as it was. Resume with those values, "
            "or start afresh (a new output_dir, or overwrite_output_dir: true without resume_from_checkpoint)."
        )


@functools.cache
def _training_changes(then_text: str, now_text: str) -> tuple[str, ...]:
    """The keys that shape training (`shapes_training`) whose values differ between two recipes of a stage, as
    'key: then -> now'; parsed, so that a key left out and the same key at its default agree.
    Cached, so that a resume parses them once, at the run's start (`check_resume_target`): parsing builds
    TrainingArguments, which resets accelerate's process-wide state (transformers' `_setup_devices`), and parsed again
    from `resolve_resume`, after the Trainer was built, it left the Trainer's Accelerator without one: a resume whose
    recipe wrote a key out at its default crashed at the Trainer's first `prepare`."""
    import yaml

    from hfgen.recipe import build_recipe

    then_yaml, now_yaml = yaml.safe_load(then_text) or {}, yaml.safe_load(now_text) or {}
    keys = sorted(key for key in set(then_yaml) | set(now_yaml) if shapes_training(key))
    if all(then_yaml.get(key) == now_yaml.get(key) for key in keys):
        return ()
    then = _parsed_without_refused_keys(then_yaml, now_yaml)
    try:  # (this run's last: what parsing sets process-wide, its precision in the environment, stays this run's)
        now = build_recipe(now_yaml, check_inputs=False)
    except UserError:
        return ()  # (this run's recipe, which has parsed: a guard)
    if then is None:  # what can still be compared: the keys both recipes write out
        return tuple(
            f"{key}: {then_yaml[key]!r} -> {now_yaml[key]!r}"
            for key in keys
            if key in then_yaml and key in now_yaml and then_yaml[key] != now_yaml[key]
        )
    return tuple(
        f"{key}: {then.value(key)!r} -> {now.value(key)!r}" for key in keys if then.value(key) != now.value(key)
    )


def _parsed_without_refused_keys(then_yaml: dict, now_yaml: dict):
    """The checkpoint's recipe as this hfgen parses it (a `Recipe`). One of an older hfgen may hold keys this one
    refuses (a key of a feature that is off: `unread_keys.READ_ONLY_WHEN`), which the refusal tells its user to
    leave out of the resumed recipe: of the keys the resumed recipe leaves out, those the checkpoint's recipe does
    not parse with are dropped, and every other key is compared (given up whole, a resume could change every key
    unnoticed). None where it still does not parse."""
    from hfgen.recipe import build_recipe

    def parsed(values: dict):
        try:
            return build_recipe(values, check_inputs=False)
        except UserError:
            return None

    whole = parsed(then_yaml)
    if whole is not None:
        return whole
    kept = {key: value for key, value in then_yaml.items() if key in now_yaml}
    for key in [key for key in then_yaml if key not in now_yaml]:
        if parsed({**kept, key: then_yaml[key]}) is not None:
            kept[key] = then_yaml[key]
    return parsed(kept)


def checkpoint_step(path: str | Path) -> int:
    return int(read_json(Path(path) / "hfgen_state.json", {"step": 0})["step"])


def finish_trackers(accelerator) -> None:
    """The end of a stage's own accelerate loop: its trackers closed. Unlike `accelerator.end_training()`, the
    process group stays up: the next step of a pipeline runs in this process (parsing its TrainingArguments would
    otherwise start a new group and wait for ranks that have left). `shutdown_distributed` ends it."""
    for tracker in accelerator.trackers:
        tracker.finish()


def shutdown_distributed() -> None:
    """Destroy the process group once a command is done, after the DDP models are gone.

    Why the order matters: a DDP model's reducer holds a reference to the group. Were the group destroyed while a
    DDP wrapper lived, the reducer's later dealloc would destroy the group itself, with the GIL held, joining gloo's
    worker threads while one of them waits for the GIL to free the last collective's tensors: a deadlock, seen as a
    2-process run that printed its results and never exited. If a wrapper is still referenced somewhere, the group
    is left for interpreter exit (as after Trainer-based stages)."""
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()  # DDP wrappers kept alive only by reference cycles go now
    if any(issubclass(type(obj), DistributedDataParallel) for obj in gc.get_objects()):
        return
    from accelerate import PartialState

    PartialState().destroy_process_group()


def write_weights_fingerprint(state_dict: dict, output_dir: str | Path) -> str:
    """This rank's SHA-256 of `state_dict` (whole tensors) to OUTPUT_DIR/weights-rank{R}.sha256, so a multi-process
    test can check that every rank ends with identical weights. Called only when a test asks for it
    (`hfgen.loop.maybe_write_fingerprint`)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    rank = int(os.environ.get("RANK", "0"))
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / f"weights-rank{rank}.sha256").write_text(digest.hexdigest() + "\n", encoding="utf-8")
    return digest.hexdigest()
