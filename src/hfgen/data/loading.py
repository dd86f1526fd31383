"""Load datasets from `embedded:NAME`, local files (json, jsonl, csv, parquet, txt, a dir) or hub ids, into
train and eval splits, and check them before training: `datasets` loads some broken files without a word
(a JSON row missing a key becomes None; a parquet with other column names loads fine), so the stage's
required columns are checked, and a sample of rows is read, before any model is built.
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import importlib.util
import lzma
import os
import re
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from hfgen.errors import UserError, error_chain
from hfgen.models import relative_to_cwd

FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",  # read with a tab separator (BUILDER_OPTIONS)
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".arrow": "arrow",  # a `datasets` cache file (data-00000-of-00001.arrow)
}
# A cell is missing only when it is empty: pandas' default reads the words None, NA, null, nan, N/A, #N/A, NULL as
# missing, which dropped such rows as "empty" or refused a file of answers "None" as lacking a value.
CSV_CELLS = {"keep_default_na": False, "na_values": [""]}
# utf-8-sig: a BOM (Windows editors write one) is no text; the text reader kept it as the first row's first character
TEXT_ENCODING = {"encoding": "utf-8-sig"}
BUILDER_OPTIONS = {".tsv": {"sep": "\t", **CSV_CELLS}, ".csv": CSV_CELLS, ".txt": TEXT_ENCODING, ".text": TEXT_ENCODING}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")  # `datasets` decompresses these itself
COMPRESSION_PACKAGES = {".zst": "zstandard", ".lz4": "lz4"}  # ... with these packages, which it does not require
ROWS_CHECKED = 1000
VALIDATED_BYTES, ROWS_VALIDATED = 2**30, 10**6  # text validity: whole sets up to 1 GiB, else their first rows
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_SUFFIXES = (".txt", ".caption")  # a caption file beside each image: kohya-style folders
NON_TEXT_COLUMNS = ("label",)  # columns whose values are not text (KTO's desirable/undesirable label)


DEFAULT_TEST_SPLIT = "test"
EVAL_SPLITS = ("validation", "valid", "val", "dev", "eval")  # held-out splits under other names, when there is no test


@dataclass
class DataArguments:
    """Which data a stage trains and evaluates on."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "embedded:NAME, a hub dataset id, a local file (json/jsonl/csv/tsv/parquet/txt/arrow, maybe "
            "compressed), a glob pattern of such files, or a local dir."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The hub dataset's configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default=DEFAULT_TEST_SPLIT,
        metadata={
            "help": "Split to evaluate on; when the default 'test' is absent, a 'validation' (valid, val, dev, eval) "
            "split, else a slice carved from train (validation_split_percentage)."
        },
    )
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Percent of train held out for evaluation when the data has no test split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation rows."})


def load_raw_as(key: str, name: str, config: str | None = None):
    """`load_raw` for data another key or option gives (ptx_dataset_name, eval_prompts_dataset, --eval_dataset): its
    problems, which name the recipe's `dataset_name`, name `key` instead."""
    try:
        return load_raw(name, config)
    except UserError as error:  # "dataset_name 'NAME' does not exist", "dataset_name 'NAME': ..."
        message = str(error)
        raise UserError(
            key + message.removeprefix("dataset_name") if message.startswith("dataset_name ") else message
        ) from None


def load_raw(name: str, config: str | None = None):
    """A DatasetDict from any supported source; a missing or unreadable source is a UserError naming it."""
    import datasets
    from datasets.exceptions import DatasetsError

    embedded = name.startswith("embedded:")
    path = Path(name).expanduser()
    saved = path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists())
    if config and (embedded or path.is_file() or glob.has_magic(name) or saved):  # read without it: a silent no-op
        kind = (
            "an embedded dataset" if embedded else "a save_to_disk folder" if saved
            else "a data file" if path.is_file() else "a pattern of data files"
        )  # fmt: skip
        raise UserError(
            f"dataset_config '{config}' is set, but dataset '{name}' is {kind}, which has no configurations: remove "
            "dataset_config (in a mixture, set `config` on the entries that are hub datasets or hub-style folders)"
        )
    if embedded:
        from hfgen.data.embedded import NAMES, load_embedded

        if name.removeprefix("embedded:") not in NAMES:
            raise UserError(
                f"dataset_name '{name}': no such embedded dataset; choose from {', '.join('embedded:' + n for n in NAMES)}"
            )
        return load_embedded(name.removeprefix("embedded:"))
    files: list[Path] = []  # the local data files read, for the messages of a failed read
    try:
        if path.is_file() or glob.has_magic(name):
            # recursive: `**` is every folder level, as in `datasets`' own data_files patterns and globstar shells
            files = (
                [path]
                if path.is_file()
                else sorted(Path(f) for f in glob.glob(str(path), recursive=True) if Path(f).is_file())
            )
            builder = files_builder(name, files)
            for file in files:
                if is_empty_file(file):  # `datasets` fails on these oddly
                    raise UserError(f"dataset_name '{name}': '{file}' is an empty file: it holds no rows")
            options = reader_options(files)
            raw = datasets.load_dataset(builder, data_files={"train": list(map(str, files))}, **options)
            # SQuAD-style {"version": 1, "data": [rows]}: the rows are one field
            if data_suffix(files[0]) == ".json" and (field := rows_field(raw)):
                raw = datasets.load_dataset(builder, data_files={"train": list(map(str, files))}, field=field,
                                            cache_dir=options["cache_dir"])  # fmt: skip
            return valid_text(raw, name)
        if path.is_dir():
            if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
                loaded = load_saved(path)
                return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
            files = one_file_type(path)
            options = reader_options(files) if files else {}
            if "features" in options:  # CSV: the header of a file the configuration reads, not the folder's first
                options.pop("features")
                builder = datasets.load_dataset_builder(str(path), config, **options)
                read = [Path(file) for split in builder.config.data_files.values() for file in split]
                options["features"] = text_features(read, options) if read else None
            if images := captioned_image_folder(path):
                return images
            if files and not declares_configs(path):
                all_files_read(name, files, datasets.load_dataset_builder(str(path), config, **options))
            return valid_text(datasets.load_dataset(str(path), config, **options), name)
        if name.startswith((".", "/", "~")) or name.count("/") > 1 or data_suffix(path) in FILE_BUILDERS:
            raise UserError(f"dataset_name '{name}' does not exist{relative_to_cwd(name)}")
        return datasets.load_dataset(name, config)
    except UserError:
        raise
    except RuntimeError as error:  # (datasets 4+ runs no loading script; anything else is a bug)
        if "Dataset scripts are no longer supported" not in str(error):
            raise
        script = str(error).rpartition("found ")[2]
        raise UserError(
            f"dataset_name '{name}' holds a dataset loading script ({script}), which datasets no longer runs: point "
            f"dataset_name at its data files instead (a file, a folder of them or a pattern such as {name}/*.jsonl)"
        ) from None
    # What bad data or a bad name raises: OSError (FileNotFoundError, DatasetNotFoundError, EmptyDatasetError...),
    # ValueError (ArrowInvalid, UnicodeDecodeError, a CSV parser's errors), datasets' own build errors, and a
    # truncated or damaged compressed file's (EOFError, LZMAError, zlib.error: none of the others). Anything else is
    # a bug and keeps its traceback.
    except (OSError, ValueError, DatasetsError, EOFError, lzma.LZMAError, zlib.error) as error:
        if unwritable := datasets_cache_unwritable(error):  # its cache's disk, not the data, is the problem
            raise UserError(unwritable) from None
        error = error.__cause__ or error  # datasets' build errors wrap the reader's, which says what is wrong
        if wide := next((file for file in files if is_wide_text(file)), None):  # its JSON error said "row 0"
            raise UserError(
                f"dataset_name '{name}': '{wide}' is UTF-16 or UTF-32 text (Windows' 'Unicode'), not UTF-8; save it "
                "as UTF-8"
            ) from None
        message = load_error_text(error)
        if len(files) > 1 and (differ := types_that_differ(files)):
            message = differ  # one schema over all the files: pyarrow's "Failed to parse value" names none of them
        if choices := config_choices(str(error)):
            # datasets' first line alone ("Config name is missing.", "Couldn't find cache for ... for config 'fr'")
            # names neither the key nor the choices
            given = (
                f"dataset_config '{config}' is not one of its configurations"
                if config
                else "it has several configurations"
            )
            raise UserError(
                f"dataset_name '{name}': {given}; set dataset_config to one of {choices} (in a mixture, the "
                "entry's `config`)"
            ) from None
        if "OfflineModeIsEnabled" in str(error) and not path.exists():  # a hub id datasets' cache does not hold
            raise UserError(
                f"dataset_name '{name}' is neither a local path{relative_to_cwd(name)} nor in datasets' cache "
                "(HF_DATASETS_CACHE), and HF_HUB_OFFLINE is set: load it once online, or give its files"
            ) from None
        if empty := re.search(r'Instruction "(\w+)" corresponds to no data', str(error)):
            # an empty split file (test.jsonl of 0 rows): datasets' own words name neither the file nor the fix
            split = empty.group(1)
            fix = "give it rows" + (
                "" if split == "train" else ", or remove it (a held-out part of train is then used)"
            )
            raise UserError(f"dataset_name '{name}': its '{split}' split has no rows (an empty file?); {fix}") from None
        # a hub id's shape (`data/prompts`) that is also no folder where hfgen looked for one, as a relative path
        nowhere = not embedded and not glob.has_magic(name) and not path.exists() and relative_to_cwd(name)
        folder = f"; nor is it a folder{nowhere}" if nowhere else ""
        raise UserError(f"dataset_name '{name}' could not be loaded: {message}{folder}") from None


def config_choices(text: str) -> str | None:
    """The configurations a datasets error over a missing or wrong configuration lists, as a list's text ("['de',
    'en']"), else None: of a hub-style folder ("Config name is missing ... available configs: [...]", "BuilderConfig
    ... Available: [...]"), or of a hub dataset read offline from datasets' cache ("There are multiple 'ORG/NAME'
    configurations in the cache: de, en", "Couldn't find cache for ... Available configs in the cache: [...]")."""
    if several := re.search(r"There are multiple '.*?' configurations in the cache: (.*)", text):
        return str([choice.strip() for choice in several.group(1).split(",")])
    listed = re.search(r"(?:available configs|Available|Available configs in the cache): (\[.*?\])", text)
    asked = ("Config name is missing", "BuilderConfig", "Couldn't find cache for")
    return listed.group(1) if listed and any(words in text for words in asked) else None


def datasets_cache_unwritable(error: BaseException) -> str | None:
    """The message for a write of datasets' cache (HF_DATASETS_CACHE: the arrow files of a load, a map, a filter)
    that failed for the cache's sake, not the data's, else None: the disk full, or the cache (or the folder it would
    be made in: a read-only HOME on a cluster's node) on a read-only disk or not this user's to write. Both were
    blamed on what the command read or wrote: a full disk's error names no file (the write is pyarrow's, into a
    tempfile), so the command's guard (`errors.disk_full_exits_2`) blamed "its output", which has room; a read-only
    cache was "dataset_name '<file>' could not be loaded". On a full disk the half-written tempfile, which datasets'
    own cleanup never reaches (its writer's final flush fails again first), is removed."""
    import datasets

    from hfgen.errors import disk_full

    cache = os.path.abspath(datasets.config.HF_DATASETS_CACHE)
    if disk_full(error):
        if not datasets_cache_full(error):
            return None
        reason = "the disk is full: "
        cause = "No space left on device"
        fix = "Free some space there, or set HF_DATASETS_CACHE to a folder on another disk"
    elif refused := refused_cache_write(error, Path(cache)):
        reason = ""
        cause = f"{refused.strerror}: '{refused.filename}'"
        fix = (
            "Set HF_DATASETS_CACHE to a folder this user can write to (unset, the cache is HF_HOME/datasets, else "
            "~/.cache/huggingface/datasets)"
        )
    else:
        return None
    return (
        f"{reason}datasets could not write its cache under '{cache}' (HF_DATASETS_CACHE; {cause}), where it keeps "
        f"the data it loads and prepares. {fix}, then run the same command again."
    )


def datasets_cache_full(error: BaseException) -> bool:
    """Whether the full disk of `error` (`errors.disk_full`) was met by a write of datasets (its frames in the
    chain), whose half-written tempfile it then removes."""
    import datasets

    package = str(Path(datasets.__file__).parent)
    frames = []
    for chained in error_chain(error):  # every frame of the chain: datasets' cleanup raised while handling the first
        traceback = chained.__traceback__
        while traceback is not None:
            frames.append(traceback.tb_frame)
            traceback = traceback.tb_next
    theirs = [frame for frame in frames if frame.f_code.co_filename.startswith(package)]
    for frame in theirs:  # the writing frame's own tempfile, by its name (no other process's)
        name = getattr(frame.f_locals.get("tmp_file"), "name", None)
        if isinstance(name, str) and Path(name).name.startswith("tmp"):
            Path(name).unlink(missing_ok=True)
    return bool(theirs)


def refused_cache_write(error: BaseException, cache: Path) -> OSError | None:
    """The OSError in `error`'s chain that refused a write in datasets' cache for the file system's reasons (a
    read-only disk, a folder without permission): its file is in the cache, the cache itself, or a folder the cache
    would be made in (~/.cache when HOME is read-only)."""
    import errno

    for link in error_chain(error):
        if isinstance(link, OSError) and link.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and link.filename:
            file = Path(os.path.abspath(link.filename))
            if file == cache or cache in file.parents or file in cache.parents:
                return link
    return None


@contextlib.contextmanager
def datasets_cache_unwritable_exits_2():
    """A write of datasets' cache within the block (loading, the stage's tokenization) that found its disk full or
    read-only ends the command with exit code 2 naming the cache (`datasets_cache_unwritable`); any other error passes
    as it was."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        if unwritable := datasets_cache_unwritable(error):
            raise UserError(unwritable) from None
        raise


def types_that_differ(files: list[Path]) -> str | None:
    """Which file gives a column another type than the first file does (`label` true/false in a.jsonl, "maybe" in
    b.jsonl), and its first row of another type, each file read alone: `datasets` reads the files with one schema,
    and pyarrow's error when a file breaks it names no file, row or column. None when the files read alike (the
    error is another one) or one fails alone (its error is its own)."""
    import datasets

    read = []
    for file in files:
        try:
            read.append(
                datasets.load_dataset(file_builder(file), data_files={"train": [str(file)]}, **reader_options([file]))[
                    "train"
                ]
            )
        except Exception:  # noqa: BLE001 -- the caller's message is then the reader's own
            return None
    for file, rows in zip(files[1:], read[1:], strict=True):
        if column := next(
            (c for c in rows.features if c in read[0].features and rows.features[c] != read[0].features[c]), None
        ):
            (reference, first), (file, rows) = (files[0], read[0]), (file, rows)
            if not hasattr(first.features[column], "dtype") and hasattr(rows.features[column], "dtype"):
                (reference, first), (file, rows) = (file, rows), (reference, first)  # the mixed column is the odd one
            wanted = first.features[column]
            kind = getattr(wanted, "dtype", type(wanted).__name__)
            python = {"bool": bool, "string": str, "large_string": str}.get(kind) or (
                (int, float) if kind.startswith(("int", "uint", "float")) else None
            )
            row = next(
                (i for i, value in enumerate(rows[column]) if python and value is not None
                 and (not isinstance(value, python) or (python is not bool and isinstance(value, bool)))),
                None,
            )  # fmt: skip
            where = (
                f"row {row + 1} of '{file}' holds {rows[column][row]!r}"
                if row is not None
                else f"'{file}' reads it otherwise"
            )
            return (
                f"the files give column '{column}' different types: '{reference}' reads it as {kind}, {where}; "
                "give the column one type in every file"
            )
    return None


def is_wide_text(path: Path) -> bool:
    """Whether a data file (looking through its compression) starts as UTF-16 or UTF-32 text: a byte-order mark of
    one, or NUL bytes, which UTF-8 text does not hold."""
    if file_builder(path) in ("parquet", "arrow", None):  # binary: NUL bytes are their own, not wide text's
        return False
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix.lower(), open)
    try:
        with opener(path, "rb") as stream:
            start = stream.read(64)
    except (OSError, EOFError, lzma.LZMAError):
        return False
    return start.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in start


def load_error_text(error: BaseException) -> str:
    """What a reader's error says is wrong, in a line: its first line, except where that is only a heading
    (datasets' "An error occurred while generating the dataset", pyarrow's "Couldn't cast") and the files or columns
    at fault come after it."""
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if differ := next((line for line in lines if line.startswith("All the data files must have the same")), None):
        file = re.search(r"generating data using\s+(\S+?),", text)
        return f"{differ}{f' (in {file.group(1)})' if file else ''}; give every file the same columns"
    if lines[0] == "Couldn't cast" and "to" in lines:  # schema lines 'name: type', then 'to', the features, 'because'
        found = [line.split(":")[0] for line in lines[1 : lines.index("to")]]
        return (
            f"rows with columns {found} among rows read with the columns {lines[lines.index('to') + 1]} "
            f"({lines[-1]}): the files (or the rows of one file) differ in their columns; give them all the same ones"
        )
    return lines[0]


def reader_options(files: list[Path]) -> dict:
    """The `datasets` reader's options for these data files (of one type): BUILDER_OPTIONS, the cache folder of their
    content, and for CSV/TSV every column read as text: pandas reads a column of figures as numbers, which a text
    column then trained re-formatted (`0010.50` as `10.5`, `26.0` as `26`, a zip code without its leading 0). The
    columns a stage reads as numbers (a reward stage's margin) are converted from their text by the stage's data."""
    options = BUILDER_OPTIONS.get(data_suffix(files[0]), {}) | {"cache_dir": content_cache_dir(files)}
    if file_builder(files[0]) == "csv":
        options["features"] = text_features(files, options)
    return options


def text_features(files: list[Path], options: dict):
    """`datasets` features that read every column of the CSV/TSV files' one header as text. None when their headers
    differ (train.csv with a margin column beside test.csv without): one header's features would drop the other
    files' columns without a word, so those files are read as `datasets` types them."""
    import datasets
    import pandas

    headers = {tuple(pandas.read_csv(file, nrows=0, sep=options.get("sep", ",")).columns) for file in files}
    if len(headers) != 1:
        return None
    return datasets.Features({column: datasets.Value("string") for column in headers.pop()})


def content_cache_dir(files: list[Path]) -> str:
    """A `datasets` cache folder for these data files' content: `datasets` keys its cache of a local file on the path
    and modification time only, so a file replaced by another with the same time (tar, unzip, cp -p, rsync -t)
    trained the old rows. The key adds each file's content fingerprint (`fingerprint.budgeted_fingerprints`, the rule
    of input folders: the whole content of files up to 64 MiB, FOLDER_HASH_BYTES in all, so that a dataset of many
    shards is not read through at every load; beyond, size and modification time)."""
    import hashlib

    import datasets

    from hfgen.fingerprint import budgeted_fingerprints

    digest = hashlib.sha256()
    for file, content in zip(files, budgeted_fingerprints(files)):
        digest.update(f"{file.resolve()}\0{content}\0".encode())
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "hfgen_files" / digest.hexdigest()[:20])


def load_saved(path: Path):
    """A `save_to_disk` folder's Dataset(Dict), read through a folder of links to its files under `datasets`' cache:
    `datasets` writes the cache files of every later step (the held-out split, select, map) beside the memory-mapped
    files it read, and wrote them into the user's folder (which may be shared, versioned or read-only; a glob of its
    `.arrow` files then failed on the copies). The links keep the data where it is."""
    import hashlib

    import datasets

    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    mirror = Path(datasets.config.HF_DATASETS_CACHE) / "hfgen_saved_datasets" / key
    for file in (p for p in path.rglob("*") if p.is_file()):
        link = mirror / file.relative_to(path)
        link.parent.mkdir(parents=True, exist_ok=True)
        temporary = link.with_name(f".{link.name}.{os.getpid()}")
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(file.resolve())
        os.replace(temporary, link)  # atomic: processes of one run (one per GPU) read the same folder at once
    return datasets.load_from_disk(str(mirror))


def files_builder(name: str, files: list[Path]) -> str:
    """The one `datasets` builder of the data files a name (a file or a glob pattern) stands for; a UserError when
    there are none, the type is not a data file's, a compression's package is missing, or the types differ."""
    if not files:
        raise UserError(f"dataset_name '{name}' matches no file")
    builders = {file_builder(file) for file in files}
    types = {"tsv" if data_suffix(file) == ".tsv" else file_builder(file) for file in files}  # one reader's options
    if None in builders:
        other = next(file for file in files if file_builder(file) is None)
        raise UserError(
            f"dataset_name '{name}': unsupported file type '{other.suffix}' ('{other}'); use "
            f"{', '.join(sorted(FILE_BUILDERS))}, optionally compressed ({', '.join(COMPRESSIONS)})"
        )
    if len(types) > 1:  # (.csv beside .tsv: the .tsv files were read with commas)
        raise UserError(
            f"dataset_name '{name}' holds files of different types ({', '.join(sorted(types))}); a dataset is "
            "read with one reader: give one type, or several sets as a mixture (datasets: [{name: ...}, ...])"
        )
    for file in files:
        package = COMPRESSION_PACKAGES.get(file.suffix.lower())
        if package and importlib.util.find_spec(package) is None:
            raise UserError(
                f"dataset_name '{name}': reading '{file.name}' needs the {package} package: pip install {package}"
            )
    return builders.pop()


def rows_field(raw) -> str | None:
    """The field of a one-object JSON file that holds its rows (a list of objects), when that is all it holds (a
    layout's own chat column, one row's turns, is not such a field)."""
    from hfgen.data.formats import CHAT_COLUMNS

    train = raw["train"]
    if len(train) != 1:
        return None
    lists = [c for c in train.column_names if isinstance(train[0][c], list) and train[0][c] and c not in CHAT_COLUMNS
             and all(isinstance(item, dict) for item in train[0][c])]  # fmt: skip
    return lists[0] if len(lists) == 1 else None


def with_file_lines(message: str, name: str) -> str:
    """A row message about a JSON-lines file with blank lines, its rows named by their lines: `datasets` skips blank
    lines, so the rows it read (and the messages count) were not the file's lines, and row 21 was line 26."""
    path = Path(name).expanduser()
    if not path.is_file() or data_suffix(path) != ".jsonl":
        return message
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix.lower(), open)
    with opener(path, "rb") as stream:
        lines = [number for number, line in enumerate(stream, 1) if line.strip()]
    if not lines or lines[-1] == len(lines):  # no blank line before the last row: rows are lines
        return message

    def line(row: str) -> str:
        return str(lines[int(row) - 1]) if 0 < int(row) <= len(lines) else row

    message = re.sub(r"\brows \[([\d, ]+)\]", lambda m: f"lines [{', '.join(map(line, m[1].split(', ')))}]", message)
    return re.sub(r"\brow (\d+)\b", lambda m: f"line {line(m[1])}", message)


def is_empty_file(path: Path) -> bool:
    """Whether a data file holds nothing but white space, looking through its compression."""
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix.lower())
    if opener is None:
        return path.stat().st_size < 2**20 and not path.read_bytes().strip()
    try:
        with opener(path) as stream:
            return not stream.read(2**20).strip()
    except (OSError, EOFError, lzma.LZMAError):
        return False  # a broken archive: `datasets` names what is wrong with it


def visible_files(folder: Path) -> list[Path]:
    """The files under `folder` that `datasets` reads: none of the names below the folder hidden (starting with ".",
    as a notebook's `.ipynb_checkpoints/`). The folder's own path does not hide them: tested on the whole path, a
    `../` or a dataset under `~/.cache` hid every file, and the folder was read with none of the rules below."""
    return [
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]  # fmt: skip


def one_file_type(path: Path) -> list[Path]:
    """The data files of a folder read as one dataset, which must be of one type: `datasets` reads the commonest
    and leaves the others out without a word (a.jsonl and b.csv gave a.jsonl's rows). Image folders are
    `datasets`' own (imagefolder with its metadata file) or `captioned_image_folder`'s: [] for them."""
    files = visible_files(path)
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
        return []
    data_files = sorted(p for p in files if file_builder(p) is not None and not is_documentation(p))
    if data_files:
        files_builder(str(path), data_files)
    return data_files


def declares_configs(path: Path) -> bool:
    """Whether a hub-style folder's README.md names its configurations and their files (`configs:` in its YAML
    header): then each configuration reads its own files, and the others are not left out by mistake."""
    readme = path / "README.md"
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8", errors="replace")
    header = text[3:].split("\n---", 1)[0] if text.startswith("---") else ""
    return bool(re.search(r"^configs\s*:", header, re.MULTILINE))


def all_files_read(name: str, data_files: list[Path], builder) -> None:
    """A UserError naming the folder's data files that `datasets` would leave out without a word: beside files named
    for a split (train.jsonl, test.jsonl) it reads only those, and it knows only its own lower-case suffixes (a
    `.text` beside a `.txt`, a `b.JSONL` beside `a.jsonl`: hfgen reads both as one type, `datasets` did not)."""
    used = {Path(file).resolve() for files in builder.config.data_files.values() for file in files}
    left_out = [file for file in data_files if file.resolve() not in used]
    if left_out:
        shown = ", ".join(f"'{file.relative_to(Path(name).expanduser())}'" for file in left_out[:5])
        raise UserError(
            f"dataset_name '{name}': `datasets` would read {len(data_files) - len(left_out)} of the folder's "
            f"{len(data_files)} data files and leave out {len(left_out)} ({shown}{', ...' if len(left_out) > 5 else ''}): "
            "in a folder, files named for a split (train, test, validation...) form those splits and the others are "
            "not read, and only lower-case suffixes it knows are (.txt, not .text or .JSONL); rename or move those "
            f"files, or give a glob pattern of them all (e.g. '{Path(name) / '**' / ('*' + ''.join(left_out[0].suffixes))}')"
        )


def is_documentation(path: Path) -> bool:
    """A dataset repository's files that are not its rows: LICENSE.txt, dataset_infos.json and the like."""
    return path.stem.upper().startswith(("LICENSE", "README", "NOTICE", "CHANGELOG", "CITATION")) or path.name in (
        "dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json"
    )  # fmt: skip


def valid_text(raw, name: str):
    """The loaded splits, after Arrow's full check: text that is not UTF-8 loads, and fails only when a later
    step reads it (a raw pyarrow error)."""
    import pyarrow as pa

    for split, dataset in raw.items():
        table = dataset.data.table
        if table.nbytes > VALIDATED_BYTES:  # a full pass over a large memory-mapped set costs minutes: its start
            table = table.slice(0, ROWS_VALIDATED)
        try:
            table.validate(full=True)
        except pa.ArrowInvalid as error:
            raise UserError(
                f"dataset_name '{name}' ({split} split) is not valid text: {error}; save it as UTF-8"
            ) from None
    return raw


def captioned_image_folder(path: Path):
    """A DatasetDict of `image` and `text` from a folder of images each with its caption in a file of the same name
    (`cat.png` + `cat.txt` or `cat.caption`, the layout of kohya-style LoRA trainers), or None when the folder is not
    one (no caption files, or a metadata file, which `datasets`' imagefolder reads itself). Without this `datasets`
    reads such a folder as a text dataset of the captions alone. Images under top-level `train/`, `test/` or
    `validation/` folders form those splits, as in an imagefolder."""
    import datasets

    files = sorted(visible_files(path))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images or any(p.stem == "metadata" for p in files):
        return None
    captions = {
        image: next((c for c in map(image.with_suffix, CAPTION_SUFFIXES) if c.is_file()), None) for image in images
    }
    missing = [image for image, caption in captions.items() if caption is None]
    if len(missing) == len(images):
        return None
    if missing:
        raise UserError(
            f"dataset_name '{path}': {len(images) - len(missing)} image(s) have a caption file beside them, "
            f"but {len(missing)} {'has' if len(missing) == 1 else 'have'} none (e.g. '{missing[0]}'); give every "
            "image a caption file "
            f"({' or '.join(CAPTION_SUFFIXES)} of the same name), or move those images out"
        )
    splits: dict[str, dict[str, list]] = {}
    for image, caption in captions.items():
        folders = image.relative_to(path).parts[:-1]
        split = folders[0] if folders and folders[0] in ("train", "test", "validation") else "train"
        rows = splits.setdefault(split, {"image": [], "text": []})
        rows["image"].append(str(image))
        try:
            # utf-8-sig: Notepad and many captioning tools start the file with a BOM, which strip() keeps and
            # the tokenizer makes a token that no typed prompt has
            rows["text"].append(caption.read_text(encoding="utf-8-sig").strip())
        except UnicodeDecodeError as error:
            raise UserError(f"dataset_name '{path}': caption file '{caption}' is not UTF-8 text ({error})") from None
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.DatasetDict({k: datasets.Dataset.from_dict(v, features=features) for k, v in splits.items()})


def data_suffix(path: Path) -> str | None:
    """A data file's type suffix, looking through a compression suffix (data.jsonl.gz -> .jsonl)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else None


def file_builder(path: Path) -> str | None:
    """The `datasets` builder of a data file (data.jsonl.gz -> json)."""
    return FILE_BUILDERS.get(data_suffix(path))


def resolve_split(
    raw, wanted: str, key: str, source: str, preferred: str | None = None
) -> tuple[str | None, str | None]:
    """(split name, note): `wanted` itself, or the one split whose name starts with it (`train` -> `train_sft`),
    with a note for the run's records; (None, None) when no split starts with it. Several candidates are a
    UserError listing the splits, unless `preferred` is one of them."""
    if wanted in raw:
        return wanted, None
    candidates = [split for split in raw if split.startswith(wanted)]
    if preferred in candidates and len(candidates) > 1:
        note = (
            f"{key} '{wanted}' is not a split of '{source}'; used '{preferred}', the one for this stage's data among "
            f"the splits starting with it ({', '.join(candidates)})"
        )
        return preferred, note
    if len(candidates) == 1:
        note = f"{key} '{wanted}' is not a split of '{source}'; used '{candidates[0]}', the one split starting with it"
        return candidates[0], note
    if candidates:
        raise UserError(
            f"{key} '{wanted}' is not a split of '{source}' and several splits start with it ({', '.join(candidates)}); "
            f"set {key} to one of: {', '.join(raw)}"
        )
    return None, None


def load_splits(args: DataArguments, seed: int = 0, kind: str | None = None):
    """(train, eval) Datasets per the data arguments (`kind`: the stage's kind of data, see `split_dataset`)."""
    return split_dataset(load_raw(args.dataset_name, args.dataset_config), args, seed, kind=kind)


# Splits named for what they hold, as UltraFeedback-binarized's train_prefs / train_sft / train_gen: when several
# splits start with the recipe's split name, the one for the stage's kind of data is taken.
KIND_SPLIT_SUFFIX = {"preference": "_prefs", "unpaired_preference": "_prefs", "sft": "_sft", "prompt": "_gen"}


def split_dataset(raw, args: DataArguments, seed: int = 0, notes: list[str] | None = None, kind: str | None = None,
                  hold_out: bool = True):  # fmt: skip
    """(train, eval) from a DatasetDict: the named splits (or the one split starting with each name, or the one
    named for `kind`'s data among several, said in `notes`), a held-out slice of train if there is no test split
    (`hold_out=False`, for a stage that evaluates on no held-out rows: all of train, and an empty eval), and the
    max_*_samples caps."""
    source = args.dataset_name
    preferred = args.dataset_train_split + KIND_SPLIT_SUFFIX[kind] if kind in KIND_SPLIT_SUFFIX else None
    train_split, note = resolve_split(raw, args.dataset_train_split, "dataset_train_split", source, preferred)
    if train_split is None:
        raise UserError(
            f"dataset_train_split '{args.dataset_train_split}' is not a split of '{source}'; it has {', '.join(raw)}"
        )
    # train_prefs -> test_prefs: the test split of the same family, when there is one
    suffix = train_split.removeprefix("train") if train_split.startswith("train") else ""
    test_split, test_note = resolve_split(
        raw, args.dataset_test_split, "dataset_test_split", source, preferred=args.dataset_test_split + suffix
    )
    if test_split is None and args.dataset_test_split != DEFAULT_TEST_SPLIT:
        raise UserError(
            f"dataset_test_split '{args.dataset_test_split}' is not a split of '{source}'; it has {', '.join(raw)} "
            f"(without dataset_test_split, the '{DEFAULT_TEST_SPLIT}' split, else a validation split, else "
            f"validation_split_percentage of the training split is held out)"
        )
    if test_split is None:  # no `test`: a validation split is what the data's authors held out
        test_split = next((split for split in EVAL_SPLITS if split in raw and split != train_split), None)
        if test_split:
            test_note = f"'{source}' has no '{DEFAULT_TEST_SPLIT}' split: evaluating on its '{test_split}' split"
    if notes is not None:
        notes += [n for n in (note, test_note) if n]
    train = raw[train_split]
    if test_split is not None and test_split != train_split:
        evaluation = raw[test_split]
    elif not hold_out:
        evaluation = train.select([])
    else:
        import datasets

        from hfgen.data.formats import _blank_rows

        # carved from the rows with text: blank lines (a corpus's between paragraphs, dropped and counted later)
        # made the held-out share, and whether any usable evaluation row was left, depend on the seed
        blank = _blank_rows(train) if train._indices is None else []
        rows = [i for i, b in enumerate(blank) if not b]  # the file's rows with text, split by their numbers
        usable = datasets.Dataset.from_dict({"row": rows}) if any(blank) else train
        try:
            parts = usable.train_test_split(test_size=args.validation_split_percentage / 100, seed=seed)
        except ValueError:  # too few rows to hold out a slice, or a percentage outside (0, 100)
            raise UserError(
                f"dataset '{args.dataset_name}' has {len(usable)} row(s) with text and no '{args.dataset_test_split}' split: cannot "
                f"hold out validation_split_percentage {args.validation_split_percentage}% of it for evaluation; give "
                "more rows, a test split (dataset_test_split), or a percentage between 0 and 100 that leaves rows on "
                "both sides."
            ) from None
        if any(blank):  # the blank rows stay in train, where they are dropped and counted with its other rows
            blanks = [i for i, b in enumerate(blank) if b]
            train, evaluation = train.select(list(parts["train"]["row"]) + blanks), train.select(parts["test"]["row"])
        else:
            train, evaluation = parts["train"], parts["test"]
    return capped(train, args, "max_train_samples"), capped(evaluation, args, "max_eval_samples")


def capped(dataset, args: DataArguments, key: str):
    """The first `args.<key>` (max_train_samples / max_eval_samples) rows of `dataset`, or all when it is unset."""
    cap = getattr(args, key)
    if cap is not None and cap < 1:
        raise UserError(f"{key} must be at least 1 (or unset for every row), got {cap}")
    return dataset.select(range(min(cap, len(dataset)))) if cap else dataset


def column_problems(dataset, columns: list[str] | tuple[str, ...], source: str, files=None) -> list[str]:
    """Missing columns, and empty (None) values in the first rows, as messages naming the source; `files`
    (positions -> a phrase naming their files) for data whose rows come from several files (an image folder),
    where a row number alone names nothing the user can open."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        return [f"dataset '{source}' lacks column(s) {missing} (it has {dataset.column_names})"]
    problems = []
    sample = dataset.select(range(min(ROWS_CHECKED, len(dataset))))
    for column in columns:
        empty = [i for i, value in enumerate(sample[column]) if value is None or value == "" or value == []]
        if empty:
            rows = source_rows(dataset, empty[:5])
            problems.append(
                f"dataset '{source}' has empty values in column '{column}' (rows {rows}"
                f"{'...' if len(empty) > 5 else ''}, counted from 1{files(empty[:5]) if files else ''})"
            )
        numbers = [i for i, value in enumerate(sample[column]) if isinstance(value, (int, float))]
        if numbers and column not in NON_TEXT_COLUMNS:  # a column of numbers loads as numbers: no tokenizer takes them
            problems.append(
                f"dataset '{source}' column '{column}' holds numbers, not text (row {source_rows(dataset, numbers)[0]}: "
                f"{sample[column][numbers[0]]!r}); write the values as text (quoted in JSON), or name another column"
            )
    if len(dataset) == 0:
        problems.append(f"dataset '{source}' has no rows")
    return problems


def source_rows(dataset, positions: list[int]) -> list[int]:
    """The rows, counted from 1 as the layout checks count them, of the loaded data that `positions` of `dataset`
    hold: a held-out split (train_test_split shuffles) or a max_*_samples selection is a view whose row i is
    another row of the data, and a message must name the row the user can find in their file."""
    indices = dataset._indices  # datasets' view mapping (None when the dataset is the loaded data itself)
    if indices is None:
        return [position + 1 for position in positions]
    column = indices.column(0).to_pylist()
    return [column[position] + 1 for position in positions]


def load_splits_for_check(load, args) -> tuple[tuple | None, list[str]]:
    """`load(args)` for a stage's check -> ((train, evaluation), []), or (None, [the loading error]). Quiet: a
    check's findings are its only output."""
    import datasets

    shown = datasets.is_progress_bar_enabled()  # (off already in a quiet sweep or compare: left off)
    datasets.disable_progress_bars()
    try:
        return load(args), []
    except UserError as error:
        return None, [str(error)]
    finally:
        if shown:
            datasets.enable_progress_bars()


def check_dataset(args: DataArguments, any_of_columns: list[tuple[str, ...]], kind: str | None = None) -> list[str]:
    """Problems with the recipe's dataset for a stage that accepts any of several column layouts."""
    if not args.dataset_name:
        return ["dataset_name is not set"]
    splits, problems = load_splits_for_check(partial(load_splits, kind=kind), args)
    if problems:
        return problems
    train, evaluation = splits
    for columns in any_of_columns:
        if all(c in train.column_names for c in columns):
            return column_problems(train, columns, args.dataset_name) + column_problems(
                evaluation, columns, args.dataset_name
            )
    layouts = " or ".join(str(list(c)) for c in any_of_columns)
    return [f"dataset '{args.dataset_name}' needs columns {layouts}; it has {train.column_names}"]
