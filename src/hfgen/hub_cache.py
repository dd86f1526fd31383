"""Where a hub id resolves to in the local Hugging Face caches, read without the network.

`hf download ORG/NAME` (or a first load online) lays a repo out as `CACHE/models--ORG--NAME/`: `snapshots/<commit>/`
holds each commit's files, `refs/main` names the commit the id means now. A later download of a new commit moves
`refs/main`, and every later load of the id reads the other snapshot, under the same name. So a run records a hub
input as the commit it resolves to (`fingerprint.hub_fingerprint`: the commit names the content, no multi-GB hashing),
and the checks that look into a local model dir (its tokenizer files, its weights' shards) look into the snapshot.
A hub dataset read offline comes from `datasets`' own cache instead (`cached_dataset_version`)."""

from __future__ import annotations

import re
from pathlib import Path

COMMIT = re.compile(r"^[0-9a-f]{40}$")  # a revision that is a commit sha names its snapshot itself


def cached_snapshot(name: str | None, revision: str | None = None) -> Path | None:
    """The cached snapshot folder (named by its commit) of the model repo `name` at `revision` (main when None), as
    huggingface_hub's offline lookups resolve it (`try_to_load_from_cache`: refs/<revision> -> snapshots/<commit>).
    None for a local path, a string that is no hub id, or a repo or revision the cache does not hold."""
    from hfgen.models import looks_local

    if not isinstance(name, str) or not name or looks_local(name):
        return None
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:  # a plain word with a space, `embedded:NAME`: no hub id
        return None
    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type="model")
    revision = revision or "main"
    if COMMIT.match(revision):
        commit = revision
    else:
        try:
            commit = (storage / "refs" / revision).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
    snapshot = storage / "snapshots" / commit
    return snapshot if commit and snapshot.is_dir() else None


def refs_file(name: str, revision: str | None = None) -> Path:
    """The cache's file naming the commit `name` resolves to at `revision` (for a message on how to go back)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return (
        Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type="model") / "refs" / (revision or "main")
    )


def cached_dataset_version(name: str | None, config: str | None = None) -> str | None:
    """Offline, the version of the hub dataset `name` that `datasets.load_dataset(name, config)` reads: the newest
    (by modification time) of the folders an online load prepared in datasets' cache,
    `ORG___NAME/CONFIG/VERSION/HASH`, as datasets' offline lookup picks it (`packaged_modules.cache`), said as
    'CONFIG/VERSION/HASH' (the hash names the commit it was prepared from). A later online load of a new commit (by
    any project on the machine) adds a newer one, which the next offline load reads under the same name. None online
    (the load resolves the hub's commit itself), for a local path, no hub id, or a dataset the cache does not hold."""
    from hfgen.models import looks_local

    if not isinstance(name, str) or not name or looks_local(name) or name.count("/") != 1:
        return None
    import datasets.config
    from datasets.naming import camelcase_to_snakecase

    if not datasets.config.HF_HUB_OFFLINE:
        return None
    namespace, dataset = name.split("/")
    root = Path(datasets.config.HF_DATASETS_CACHE).expanduser() / f"{namespace}___{camelcase_to_snakecase(dataset)}"
    found = [folder for folder in root.glob(f"{config or '*'}/*/*") if folder.is_dir()]
    if not found:
        return None
    newest = sorted(found, key=lambda folder: folder.stat().st_mtime)[-1]  # (datasets' own order)
    return "/".join(newest.parts[-3:])
