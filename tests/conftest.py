"""Shared test setup: offline, deterministic, small thread counts, and a free port for multi-process runs."""

import contextlib
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
# One torch thread per process: tiny models gain little from more, and the 2-process tests (or a busy
# 2-core machine) slow down 10-30x when threads outnumber cores. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# DeepSpeed's CPU engine tests JIT-build a C++ op: built in this venv's own folder, not ~/.cache, where a build killed
# mid-way left a lock on which every later DeepSpeed launch of any checkout waited forever, and checkouts whose venvs
# sit at other paths rebuilt the shared op in turn, each waiting on the other's lock. Subprocesses inherit it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

# transformers creates its log handler on first use, on the sys.stderr of that moment: created inside a test that
# captures output (capsys), it would keep writing to that test's closed stream, and every later test's stderr would
# hold a "--- Logging error --- Traceback". Created here, on the real stderr.
from transformers.utils import logging as transformers_logging  # noqa: E402

transformers_logging.get_logger("transformers")

# fixtures shared by the diffusion stage tests (configs, vae_dir)
pytest_plugins = ["diffusion_fixtures"]

REPO = Path(__file__).resolve().parents[1]
HFGEN = [sys.executable, "-m", "hfgen.cli"]


# `make test` runs one pytest process per core, side by side (the tests use one torch thread each): each takes the
# next test file no other process has taken (`--share-files-with DIR`, the claims as files in DIR), the heaviest
# first, so the last file started decides when both end. A file's tests run in one process (its module fixtures).
HEAVY_FILES_FIRST = [
    "test_kill_resume.py", "stages/test_preference.py", "stages/test_pretrain.py", "stages/test_ppo.py",
    "stages/test_grpo.py", "test_engines.py", "stages/test_t2i_buckets_dreambooth.py", "stages/test_sft.py",
    "stages/test_t2i_flow.py", "stages/test_reward.py", "stages/test_rlhf.py", "test_sweep.py",
    "data/test_layouts_train.py", "stages/test_t2i.py",
]  # fmt: skip
_files_taken: dict[Path, bool] = {}


def pytest_addoption(parser):
    parser.addoption(
        "--share-files-with",
        metavar="DIR",
        help="run beside other pytest processes given the same empty DIR: each test file runs in the first to reach it",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--share-files-with"):
        order = {name: rank for rank, name in enumerate(HEAVY_FILES_FIRST)}
        items.sort(key=lambda item: order.get(item.path.relative_to(REPO / "tests").as_posix(), len(order)))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    shared = item.config.getoption("--share-files-with")
    if not shared:
        return None
    if item.path not in _files_taken:
        claim = Path(shared) / item.path.relative_to(REPO).as_posix().replace("/", "--")
        try:
            claim.open("x").close()
            _files_taken[item.path] = True
        except FileExistsError:
            _files_taken[item.path] = False
    if not _files_taken[item.path]:
        return True  # handled (by the process that took the file)
    # The last item this process ran was torn down for its `nextitem`, which may be a skipped one of another file
    # in the same folder: pytest kept that folder's collectors set up, which this item (elsewhere) must not find.
    item.session._setupstate.teardown_exact(item)
    return None


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A locale whose encoding is ASCII, as an old cluster's ISO-8859-1 is not UTF-8 (Python would otherwise coerce C to
# UTF-8): what hfgen writes must still be UTF-8, and what it prints must not end the command.
ASCII_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": ""}


def run_hfgen(*args, cwd=REPO, timeout=900, env=None) -> subprocess.CompletedProcess:
    """Run the real `hfgen` CLI in a subprocess, as a user would."""
    return subprocess.run(
        [*HFGEN, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def count_calls(monkeypatch, calls: dict, module, name: str) -> None:
    """Count in `calls[name]` the calls of `module.name` (still called), for tests of work done once."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls[name] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def run_hfgen_here(*args, cwd=REPO) -> subprocess.CompletedProcess:
    """`hfgen ARGS` run by the CLI's own `main` in this process, for runs a test expects to stop at the check (exit 2):
    the same code as the console script without a new interpreter importing torch, transformers and diffusers again
    (about 5 s a call). A bug's exception is raised here, as its traceback would end the real CLI."""
    from accelerate.state import AcceleratorState, GradientState

    from hfgen.cli import main

    def fresh_accelerate():  # a new process's: another test's Accelerator (its mixed precision...) would persist
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    stdout, stderr, previous = io.StringIO(), io.StringIO(), os.getcwd()

    # what a new interpreter would find: the PYTHONPATH a test set (its reward modules), then the working directory
    added = [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path and path not in sys.path]
    sys.path[:0] = added
    os.chdir(cwd)
    fresh_accelerate()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                returncode = main([*map(str, args)])
            except SystemExit as exit_info:
                returncode = exit_info.code if isinstance(exit_info.code, int) else int(exit_info.code is not None)
    finally:
        os.chdir(previous)
        del sys.path[: len(added)]
        fresh_accelerate()
    return subprocess.CompletedProcess(["hfgen", *map(str, args)], returncode, stdout.getvalue(), stderr.getvalue())


def accelerate_launch(port, *args, cwd=REPO, timeout=900, env=None) -> subprocess.CompletedProcess:
    """`accelerate launch` on 2 CPU processes (gloo) with the repo's cpu_2proc config (`env`: more variables)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes/accelerate/cpu_2proc.yaml"),
        "--main_process_port", str(port), str(REPO / "scripts/train.py"), *map(str, args),
    ]  # fmt: skip
    return subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        # the weights fingerprint (hfgen.loop.maybe_write_fingerprint) is written only when a test asks for it
        env={**os.environ, "ACCELERATE_USE_CPU": "true", "HFGEN_WEIGHTS_FINGERPRINT": "1", **(env or {})},
    )


def shrunk(recipe: str, directory, **values) -> str:
    """A shipped tiny recipe with `values` changed (cut down to a few seconds), written into `directory`."""
    import yaml

    data = yaml.safe_load((REPO / "recipes/tiny" / recipe).read_text())
    data.update(values)
    path = Path(directory) / recipe
    path.write_text(yaml.safe_dump(data))
    return str(path)


def tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the run's TensorBoard event files under `run_dir` hold: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    scalars = {}
    for path in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                figure = value.tensor.float_val[0] if value.tensor.float_val else value.simple_value
                scalars.setdefault(value.tag, []).append((event.step, float(figure)))
    return scalars


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, options: str):
    """`folder`, made and mounted as a tmpfs with these mount options (a small disk, a read-only one); the test is
    skipped where mounting is not allowed. Unmounted lazily after: a file a failed run left open keeps it busy."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip(f"mounting a tmpfs ({options}) is not allowed here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


@pytest.fixture
def read_only_disk(tmp_path):
    """An empty folder on a read-only tmpfs."""
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1M") as disk:
        yield disk


@pytest.fixture
def full_datasets_cache(tmp_path, monkeypatch):
    """(cache, made): datasets' cache moved to `cache`, on a disk with no room left: each tempfile datasets makes
    there is linked to /dev/full (listed in `made`), so its first write fails with ENOSPC as on a full disk."""
    import tempfile

    import datasets

    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full, a device whose writes find the disk full")
    cache, made, real = tmp_path / "cache", [], tempfile.NamedTemporaryFile
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))

    def on_a_full_disk(*args, **kwargs):
        file = real(*args, **kwargs)
        if str(kwargs.get("dir", "")).startswith(str(cache)):
            Path(file.name).unlink()
            Path(file.name).symlink_to("/dev/full")
            made.append(Path(file.name))
        return file

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", on_a_full_disk)
    return cache, made


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """put(repo_id, folder, commit) -> snapshot dir: a Hugging Face hub cache in tmp_path (this process's
    huggingface_hub and transformers read it, and subprocesses by HF_HUB_CACHE) into which `put` lays a local model
    folder out as `hf download` does (blobs, `snapshots/<commit>/` links to them, `refs/main` naming the commit); a
    second `put` of another commit is a download after the repo got a new commit."""
    import hashlib

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    def put(repo_id: str, folder: Path, commit: str) -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            data = file.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / file.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return repo / "snapshots" / commit

    return put


@pytest.fixture
def datasets_hub_cache(tmp_path, monkeypatch):
    """put(repo_id, {split: rows}, sha, config="default") -> folder: datasets' cache moved into tmp_path, into which
    `put` writes what an online `load_dataset(repo_id)` of the commit `sha` leaves there
    (`ORG___NAME/CONFIG/0.0.0/SHA/`: NAME-SPLIT.arrow and dataset_info.json), which an offline load reads back, the
    newest first; each put is newer than the one before."""
    import json
    import shutil
    import time

    import datasets

    cache = tmp_path / "datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    made = []

    def put(repo_id: str, splits: dict, sha: str, config: str = "default") -> Path:
        namespace, name = repo_id.split("/")
        source = tmp_path / f"source-{sha}-{config}"
        source.mkdir()
        for split, rows in splits.items():
            (source / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        files = {split: str(source / f"{split}.jsonl") for split in splits}
        builder = datasets.load_dataset_builder("json", data_files=files, cache_dir=str(source / "cache"))
        builder.download_and_prepare()
        folder = cache / f"{namespace}___{name}" / config / "0.0.0" / sha
        folder.mkdir(parents=True)
        for arrow in Path(builder.cache_dir).glob("*.arrow"):  # json-train.arrow -> NAME-train.arrow
            shutil.copy(arrow, folder / arrow.name.replace("json-", f"{name}-"))
        info = json.loads((Path(builder.cache_dir) / "dataset_info.json").read_text())
        info.update(config_name=config, dataset_name=name, builder_name="parquet")
        (folder / "dataset_info.json").write_text(json.dumps(info))
        made.append(folder)
        stamp = time.time() + len(made)  # newer than every earlier put, whatever the clock's resolution
        os.utime(folder, (stamp, stamp))
        return folder

    return put
