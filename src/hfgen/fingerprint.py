"""What a run's inputs held when it read them: fingerprints of the local files and folders its recipe names, the
commit each hub model id it names resolves to in the local Hugging Face cache (`hub_fingerprint`), and the version of
each hub dataset that an offline load reads from datasets' cache (`hub_dataset_fingerprint`).

A recipe names its model, data and tokenizer by path, and a path may hold other contents later (a base retrained in
place, a data file rewritten under its name, a chat template edited). A run records these fingerprints when it
starts (`tracking.record_inputs`) and with each checkpoint: a resume, a sweep point or pipeline step judged complete,
a cached evaluation are then of the same inputs only when the fingerprints still match.

The rule for one file (`file_fingerprint`): files up to FULL_HASH_BYTES are hashed whole, so any edit shows (one that
keeps the size and the modification time too: cp -p, rsync -t, tar, a fixed-width field corrected); larger ones by
their size and modification time (ns) only: a copy moved back, a chmod, a staged copy on node-local scratch or another
mount is the same file, but an in-place edit of a large file that keeps both its size and its modification time is not
noticed (so is an unreadable file known). A folder's fingerprint is its files' (by relative path), the whole content
read for at most FOLDER_HASH_BYTES of them (a folder of a million images is not read through at each start), the rest
by the same size and time. It leaves out what hfgen itself writes into a folder it reads (`hfgen eval`'s eval.json,
`hfgen generate`'s images, a run's records, a nested run, merge or render output, the run's own output_dir inside an
input folder: `folder_files`): those are no part of the model or data. A folder that is a complete hfgen run is named
by its run id (`tracking.run_id`, new on every run into it), its weights covered by that id. Two records of one input
are compared by their content digest, not by the path it resolved to: a project moved with relative paths in its
recipe is the same run."""

from __future__ import annotations

import glob
import hashlib
import os
import re
from pathlib import Path
from typing import Any

FULL_HASH_BYTES = 64 * 2**20
FOLDER_HASH_BYTES = 256 * 2**20
# the files of a model folder that are the model (configs, tokenizer, chat template, remote code), beside its weights;
# its other files (a README, eval_samples.jsonl, images) are no part of it. An hfgen run's weights are covered by its
# run id; a plain model folder's (a downloaded base, a merge) by their own fingerprints
MODEL_FILE_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken", ".py")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".onnx")
MODEL_MARKS = ("config.json", "model_index.json", "adapter_config.json")  # a folder holding one is a model folder
# the records hfgen's commands write into a model folder, at any depth, which later commands update (`hfgen eval` writes
# eval.json into any model folder it evaluates, `hfgen generate` a manifest beside its images)
RUN_RECORDS = frozenset((
    "data.json", "env.json", "eval.json", "pipeline_inputs.json", "hfgen_inputs.json", "compare_eval.json",
    "compare_inputs.json", "trainer_state.json", "peak_memory.json", "hacking_monitor.json", "buckets.json",
    "hfgen_images.json",
))  # fmt: skip
# folders inside an input folder that are no part of it: a run's checkpoints, DreamBooth's class images, TensorBoard
SKIPPED_FOLDERS = re.compile(r"^(checkpoint-\d+|class_images|runs|\..*)$")
# a folder inside an input folder holding one of these is hfgen's output (rendered images, a merge, a run), not input
OUTPUT_MARKS = ("hfgen_images.json", "merged_from.json", "recipe.yaml")
LISTED_FILES = 64  # a folder of up to this many files records each one's fingerprint, so a change can name the file
# recipe keys whose values name inputs (a path among them is fingerprinted); other keys' strings are never paths.
# `*_config` and `deepspeed` name a JSON file or hold an inline mapping (or nothing): vae/t2i/t2i_flow's model
# configs (vae_config, unet_config, ...) build the model a resume loads its weights into, and so shape training
INPUT_KEY = re.compile(
    r"(_name_or_path|_path|_name|_dir|_file|_files|^datasets|_dataset|^reward_model|template|_config|^deepspeed)$"
)
NOT_INPUTS = frozenset(("output_dir", "logging_dir", "class_data_dir", "run_name", "hub_model_id", "pipeline_dir"))
OUTPUT_FOLDER_KEYS = ("output_dir", "logging_dir", "class_data_dir", "pipeline_dir")  # the folders a run writes
DATASET_KEY = re.compile(r"dataset")  # keys naming data: a hub id among them is a dataset (`hub_dataset_fingerprint`)
# the key that sets the hub revision a model key's hub id is loaded at (TRL's model_revision; diffusers' revision)
REVISION_KEYS = {"model_name_or_path": "model_revision", "pretrained_model_name_or_path": "revision"}
# recipe keys whose values are 'module:function' specs of code that scores the responses a run trains on (or stops on)
FUNCTION_KEYS = ("reward_functions", "oracle_function")


def file_fingerprint(path: Path, read: bool = True) -> str:
    """One file's content fingerprint (the module's rule; not `read`: by its status alone); "missing" for a file
    removed since it was listed (a folder being written to while a run starts: the next start sees the change)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "missing"
    by_status = f"stat:{stat.st_size}:{stat.st_mtime_ns}"  # (not inode or ctime: a copy moved back, a chmod)
    if not read or stat.st_size > FULL_HASH_BYTES:
        return by_status
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            while chunk := stream.read(2**20):
                digest.update(chunk)
    except OSError:  # unreadable here: whoever reads it names it
        return by_status
    return digest.hexdigest()[:32]


def budgeted_fingerprints(files: list[Path]) -> list[str]:
    """The files' fingerprints, read whole for FOLDER_HASH_BYTES in all at most (the rest by size and time)."""
    found, budget = [], FOLDER_HASH_BYTES
    for file in files:
        try:
            budget -= file.stat().st_size
        except FileNotFoundError:  # removed since the folder was listed (`file_fingerprint`)
            found.append("missing")
            continue
        found.append(file_fingerprint(file, budget >= 0))
    return found


def files_fingerprints(files: list[Path], root: Path) -> dict[str, str]:
    """{relative name: fingerprint} of a folder's (or a pattern's) files, read whole for FOLDER_HASH_BYTES at most."""
    names = [str(file.relative_to(root) if file.is_relative_to(root) else file) for file in files]
    return dict(zip(names, budgeted_fingerprints(files)))


def folder_files(folder: Path, run: bool, excluded: tuple[Path, ...] = ()) -> list[Path]:
    """The files that make up an input folder, sorted: not the output folders inside it (OUTPUT_MARKS, SKIPPED_FOLDERS,
    the `excluded` resolved dirs: the run's own output_dir); of a model folder (MODEL_MARKS) only its model files
    without hfgen's records (RUN_RECORDS, at any depth), and of an hfgen run (`run`) only its small ones (its weights
    are covered by its run id). A data folder keeps its other files (its data.json may be data)."""
    model = run or any((folder / mark).is_file() for mark in MODEL_MARKS)
    suffixes = MODEL_FILE_SUFFIXES + (() if run else WEIGHT_SUFFIXES)
    found, walked = [], set()
    # into linked sub-folders too (a data folder whose train/ links to a shared disk: its files are the data), each
    # real folder once (a link back up would walk forever)
    for top, dirs, files in os.walk(folder, followlinks=True):
        here = Path(top)
        real = here.resolve()
        if real in walked or (here != folder and (
            SKIPPED_FOLDERS.match(here.name) or real in excluded or any(m in files for m in OUTPUT_MARKS)
        )):  # fmt: skip
            dirs.clear()
            continue
        walked.add(real)
        for name in files:
            path = here / name
            if name[0] == "." or (model and (name in RUN_RECORDS or path.suffix not in suffixes)) or not path.is_file():
                continue
            found.append(path)
    return sorted(found)


def path_fingerprint(value: str, excluded: tuple[Path, ...] = ()) -> dict[str, Any] | None:
    """{"path", "digest", "run" (an hfgen run's id), "files" (a small folder's, by relative path)} of a local file,
    folder or glob pattern of files, without the `excluded` resolved dirs inside a folder; None for anything else
    (a hub id, an embedded dataset, a plain word)."""
    from hfgen import tracking

    path = Path(value).expanduser()
    if path.is_file():
        return {"path": str(path.resolve()), "digest": file_fingerprint(path)}
    if path.is_dir():
        run = tracking.run_id(path)
        root, files = path, folder_files(path, run is not None, excluded)
    elif glob.has_magic(value):
        run, root = None, Path(".")
        files = sorted(Path(f) for f in glob.glob(str(path), recursive=True) if Path(f).is_file())
        if not files:
            return None
    else:
        return None
    names = files_fingerprints(files, root)
    digest = hashlib.sha256(f"{run}\0{sorted(names.items())}".encode()).hexdigest()[:32]
    record = {"path": str(path.resolve()) if path.is_dir() else value, "digest": digest}
    return record | ({"run": run} if run else {}) | ({"files": names} if len(names) <= LISTED_FILES else {})


def hub_fingerprint(value: str, revision: str | None = None) -> dict[str, Any] | None:
    """{"path", "hub", "commit", "digest", "revision" (when given)} of a hub id served from the local Hugging Face
    cache: the commit it resolves to there (`hub_cache.cached_snapshot`), which names its content (a download of a new
    commit moves the id to other weights under the same name); None for anything the cache does not resolve, and
    online, where the run's own load resolves the hub's commit and may move the cache after this record (a resume
    would then be refused for the commit it trained on), as `hub_dataset_fingerprint` is."""
    from huggingface_hub.constants import HF_HUB_OFFLINE

    from hfgen.hub_cache import cached_snapshot

    if not HF_HUB_OFFLINE:
        return None
    snapshot = cached_snapshot(value, revision)
    if snapshot is None:
        return None
    record = {"path": value, "hub": value, "commit": snapshot.name, "digest": snapshot.name}
    return record | ({"revision": revision} if revision else {})


def hub_dataset_fingerprint(value: str, config: str | None = None) -> dict[str, Any] | None:
    """{"path", "hub", "version", "digest"} of a hub dataset read offline: the version of it in datasets' cache that
    the load reads (`hub_cache.cached_dataset_version`); None online or for anything that cache does not hold."""
    from hfgen.hub_cache import cached_dataset_version

    version = cached_dataset_version(value, config)
    return None if version is None else {"path": value, "hub": value, "version": version, "digest": version}


def input_strings(key: str, value) -> list[str]:
    """The strings of a recipe value that may name inputs: itself, or a mixture's entries' `name`/`path`/files."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [text for item in value for text in input_strings(key, item)]
    if isinstance(value, dict):
        return [text for k, v in value.items() if k in ("name", "path", "files", "data_files")
                for text in input_strings(k, v)]  # fmt: skip
    return []


def recipe_inputs(values: dict[str, Any], keys=None) -> dict[str, dict]:
    """{key: fingerprint} of the local inputs a recipe's `values` name (only those `keys` when given: the ones that
    shape training), and of the hub models and datasets it names that the local caches hold (`key_hub_fingerprint`);
    a key naming several (a mixture) records a list. The run's own folders (OUTPUT_FOLDER_KEYS: an output_dir inside
    its base's folder, class images generated inside the instance images') are no part of them."""
    excluded = tuple(
        Path(v).expanduser().resolve() for k in OUTPUT_FOLDER_KEYS if isinstance(v := values.get(k), (str, Path))
    )
    found = {}
    for key, value in values.items():
        if key in FUNCTION_KEYS and (keys is None or keys(key)):
            texts = [str(file) for spec in input_strings(key, value) if (file := function_source(spec)) is not None]
        elif key in NOT_INPUTS or not INPUT_KEY.search(key) or (keys is not None and not keys(key)):
            continue
        else:
            texts = input_strings(key, value)
        prints = [
            p for text in texts if (p := path_fingerprint(text, excluded) or key_hub_fingerprint(key, text, values))
        ]
        if prints:
            found[key] = prints[0] if isinstance(value, str) else prints
    return found


def key_hub_fingerprint(key: str, text: str, values: dict[str, Any]) -> dict[str, Any] | None:
    """`hub_fingerprint` of a model key's hub id, at the revision its recipe loads it at (REVISION_KEYS); of a dataset
    key's, the version datasets reads offline (`hub_dataset_fingerprint`: not the hub cache's refs)."""
    if DATASET_KEY.search(key):
        if key != "dataset_name":  # (a mixture's entry: its own config is not known here, and another's version
            return None  # would be recorded; not recorded, as before)
        config = values.get("dataset_config")
        return hub_dataset_fingerprint(text, config if isinstance(config, str) else None)
    revision = values.get(REVISION_KEYS.get(key, ""))
    return hub_fingerprint(text, revision if isinstance(revision, str) else None)


def function_source(spec: str) -> Path | None:
    """The file of a 'module:function' (or 'path/to/file.py:function') spec's module where it is the run's own code: a
    reward module edited between a kill and the resume trained the resumed steps on another reward. None for a module
    of an installed package or of hfgen (they change with their versions), or one that does not import (the stage's
    check names it)."""
    import hfgen
    from hfgen.rl.rollout import import_module_or_file

    module_name = spec.rpartition(":")[0]
    if module_name.endswith(".py"):
        return Path(module_name).expanduser()
    try:
        source = getattr(import_module_or_file(module_name), "__file__", None)
    except Exception:  # (any error of the user's module: its check reports it)
        return None
    if source is None:
        return None
    source = Path(source).resolve()
    if {"site-packages", "dist-packages"} & set(source.parts) or source.is_relative_to(Path(hfgen.__file__).parent):
        return None
    return source


def changes(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two `recipe_inputs` records, in words (nothing of a key the older record lacks, an older
    hfgen's: nothing to compare). A local input recorded then that its value no longer names (`now` lacks the key: the
    folder moved away, the file deleted) is a change: whatever the value loads now is not what trained (a name that
    a hub id's shape falls back to the hub model); a hub model the cache no longer holds is not (the load says so)."""
    said = []
    for key in sorted(set(then) - set(now)):
        if isinstance(before := then[key], dict) and not before.get("hub"):
            said.append(f"{key} '{before.get('path')}' is gone: its value no longer names that file or folder")
        elif isinstance(before, list) and any(isinstance(b, dict) and not b.get("hub") for b in before):
            said.append(f"{key}: the files it named are gone")
    for key in sorted(set(then) & set(now)):
        before, after = then[key], now[key]
        if content(before) == content(after):  # (not the path it resolved to: a moved project is the same run)
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            said.append(f"{key} '{before.get('path')}' {what_changed(before, after)}")
        elif isinstance(before, list) and isinstance(after, list) and len(before) == len(after):  # each one named
            said += [changes({key: b}, {key: a})[0] for b, a in zip(before, after) if content(b) != content(a)]
        else:
            said.append(f"{key}: the content of its files changed")
    return said


def content(record):
    """A fingerprint record's content (its digest and run id), or a list of them (a mixture's)."""
    if isinstance(record, list):
        return [content(item) for item in record]
    return (record.get("digest"), record.get("run")) if isinstance(record, dict) else record


def hub_version(record: dict) -> str:
    """What a hub record (`hub_fingerprint`, `hub_dataset_fingerprint`) names, in words."""
    if record.get("commit"):
        return f"the hub model in the Hugging Face cache (the snapshot {record['commit']})"
    return f"the hub dataset in datasets' cache (the version {record.get('version')})"


def what_changed(before: dict, after: dict) -> str:
    if after.get("hub") and not before.get("hub"):  # the folder moved away: its name is now a hub id's
        return f"is gone: '{after['hub']}' now names {hub_version(after)}, not that local file or folder"
    if before.get("hub") and not after.get("hub"):
        return f"({hub_version(before)}) now names the local '{after.get('path')}'"
    if before.get("version") and after.get("version"):  # a hub dataset (`hub_dataset_fingerprint`)
        return (
            f"changed since (datasets' cache held the version {before['version']} then, and reads "
            f"{after['version']} now: an online load fetched another)"
        )
    if before.get("commit") and after.get("commit"):  # a hub id (`hub_fingerprint`)
        return (
            f"changed since (the Hugging Face cache resolved it to the snapshot {before['commit']}, now to "
            f"{after['commit']}: a download fetched another commit)"
        )
    if before.get("run") != after.get("run"):
        now = after.get("run")
        return f"now holds {f'another run ({now})' if now else 'no complete run'}, not the run {before.get('run')}"
    if "files" in before and "files" in after:
        names = sorted(
            n for n in set(before["files"]) | set(after["files"]) if before["files"].get(n) != after["files"].get(n)
        )
        if names:
            return f"changed since (its files {', '.join(names[:5])}{' ...' if len(names) > 5 else ''})"
    return "changed since (its content)"
