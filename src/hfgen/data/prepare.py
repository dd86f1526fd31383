"""A text stage's data, end to end: load each source, pick its splits, convert it to the stage's standard columns
(hfgen.data.formats), drop and count unusable rows, mix several sources (hfgen.data.mixture), and record what
happened in OUTPUT_DIR/data.json and on the console.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from hfgen.data.formats import (
    FORMATS,
    STANDARD_FORMAT,
    DataReport,
    check_rows,
    parse_columns,
    refuse_identical_pairs,
    require_rows,
    to_standard,
)
from hfgen.data.loading import DataArguments, capped, load_raw, split_dataset, with_file_lines
from hfgen.data.mixture import harmonise, interleave, parse_mixture
from hfgen.errors import UserError


@dataclass
class TextDataArguments(DataArguments):
    """Data keys of the text stages: the layout of the data, a column mapping, and mixtures."""

    dataset_format: str | None = field(
        default=None,
        metadata={
            "help": "Layout of the data: " + ", ".join(FORMATS) + ". Detected from the columns when unset and "
            "unambiguous.",
            "choices": [None, *FORMATS],
        },
    )
    dataset_columns: str | None = field(
        default=None,
        metadata={
            "help": "Map the layout's column names to the file's, e.g. {prompt: instruction, completion: output}."
        },
    )
    datasets: list[str] = field(
        default_factory=list,
        metadata={
            "help": "A mixture instead of dataset_name: [{name: DATA, weight: 0.7, format: alpaca, columns: {...}, "
            "config: C, train_split: S, test_split: T}, ...]; weight = probability of drawing from the set."
        },
    )

    def __post_init__(self):
        self.dataset_columns = parse_columns(self.dataset_columns) or None
        self.mixture = parse_mixture(self.datasets)


def _one_source(
    args,
    kind: str,
    seed: int,
    name: str,
    fmt,
    columns: dict,
    notes: list[str],
    other_columns: bool | tuple[str, ...],
    template=None,
    **split_keys,
):
    """(train, eval, train report, eval report) of one source; a row that `template` (a tokenizer) has a chat
    template and refuses to render is a UserError naming its row in the file."""
    raw = load_raw(name, split_keys.pop("config", None))
    try:
        for split in raw.values():  # before the held-out slice is carved, so rows are numbered as in the file
            check_rows(split, kind, fmt, columns, source=name, other_columns=other_columns)
    except UserError as error:
        raise UserError(with_file_lines(str(error), name)) from None
    source_args = dataclasses.replace(args, dataset_name=name, **{k: v for k, v in split_keys.items() if v})
    train, evaluation = split_dataset(raw, source_args, seed, notes, kind)
    train, train_report = to_standard(train, kind, fmt, columns, source=name, other_columns=other_columns,
                                      refuse_identical=False)  # fmt: skip
    evaluation, eval_report = to_standard(evaluation, kind, fmt, columns, source=name, other_columns=other_columns,
                                          refuse_identical=False)  # fmt: skip
    # chosen == rejected pairs refuse the source over its whole data, not one split (a 6-row test split)
    refuse_identical_pairs(name, {"the training split": train_report, "the evaluation split": eval_report})
    train_report.notes += notes
    require_rows(train, train_report)
    require_rows(evaluation, eval_report, "evaluation rows")
    if template is not None:
        from hfgen.data.rendering import template_refusals

        for rows, report in ((train, train_report), (evaluation, eval_report)):
            if refused := template_refusals(template, rows, f"dataset '{name}'", report.file_rows):
                raise UserError(refused[0])
    return train, evaluation, train_report, eval_report


# Inside `shared_loads()` (one `hfgen train` or `hfgen check`): the splits the recipe's check loaded, by what they
# were loaded from, for the run (or check's report) to take instead of reading and converting the data again.
_shared: dict | None = None


@contextlib.contextmanager
def shared_loads():
    """Within the block, the load a stage's check made (`check_text_data`) is handed to the next load_for_stage with
    the same data keys, kind, seed and columns (the run's, or check's report) instead of reading the data again,
    which takes it; whatever no load took is dropped at exit."""
    global _shared
    outer, _shared = _shared, {}
    try:
        yield
    finally:
        _shared = outer


def data_seed(training_args) -> int:
    """The seed of the data's draws (the held-out carve, a mixture's interleaving, shuffles): `data_seed` where the
    recipe sets it, as transformers' samplers read it, else `seed`; so a seed sweep with `data_seed` fixed trains
    and evaluates every seed on the same rows."""
    chosen = getattr(training_args, "data_seed", None)
    return training_args.seed if chosen is None else chosen


def load_for_stage(
    args,
    kind: str,
    seed: int = 0,
    default_columns: dict[str, str] | None = None,
    other_columns: bool | tuple[str, ...] = False,
    for_the_run: bool = False,
    template=None,
):
    """(train, eval, records): the stage's data in the standard columns of `kind` (and, with `other_columns`, the
    file's columns outside its layout); records say which layout, split and rows were used, which were dropped and
    why, and for a mixture how many rows each set gave. `for_the_run`: a check's load, kept for the run
    (`shared_loads`). `template`: a tokenizer whose chat template must render every row (`_one_source`), which a
    check gives; the run takes the check's load, so it is not part of what makes two loads the same."""
    default_columns = {k: v for k, v in (default_columns or {}).items() if k != v}
    if _shared is None:
        return _load_for_stage(args, kind, seed, default_columns, other_columns, template)
    key = (repr(args), kind, seed, repr(default_columns), repr(other_columns))
    loaded = _shared.pop(key, None) or _load_for_stage(args, kind, seed, default_columns, other_columns, template)
    if for_the_run:
        _shared[key] = loaded
    train, evaluation, records = loaded
    return train, evaluation, copy.deepcopy(records)  # callers count their drops in the records they are given


def shared_once(key: tuple, compute, keep: bool = False):
    """compute(); inside `shared_loads`, the result an earlier call with the same key computed, taken once (a
    check's work on the loaded data that the run or check's report would repeat). `keep`: left for every later call
    in the block (an unchanging value that several readers take: PPO-ptx's rows)."""
    if _shared is None:
        return compute()
    if ("result", *key) in _shared:
        return _shared[("result", *key)] if keep else _shared.pop(("result", *key))
    _shared[("result", *key)] = result = compute()
    return result


def _load_for_stage(
    args, kind: str, seed: int, default_columns: dict[str, str], other_columns: bool | tuple[str, ...], template=None
):
    import datasets

    if args.mixture and args.dataset_name:
        raise UserError("set either dataset_name or datasets (a mixture), not both")
    if not args.mixture:
        if not args.dataset_name:
            raise UserError("dataset_name is not set")
        columns = {**default_columns, **(args.dataset_columns or {})}
        train, evaluation, train_report, eval_report = _one_source(
            args, kind, seed, args.dataset_name, args.dataset_format, columns, [], other_columns, template,
            config=args.dataset_config,
        )  # fmt: skip
        records = {"train": train_report.as_dict(), "eval": eval_report.as_dict()}
        return train, evaluation, records | ({"dataset_config": args.dataset_config} if args.dataset_config else {})

    trains, evals, reports = [], [], []
    # max_train_samples / max_eval_samples cap the run's rows, not each set's: the sets are read whole and the caps
    # applied to the mixture (capping each set gave N sets up to N times the cap, and cut the sets the weights draw from)
    uncapped = dataclasses.replace(args, max_train_samples=None, max_eval_samples=None)
    for entry in args.mixture:
        # The top-level dataset_columns / dataset_format / dataset_config are every set's defaults, as the top-level
        # splits already are: an entry's own columns / format / config replace them for that set.
        own_columns = parse_columns(entry.columns) if entry.columns is not None else (args.dataset_columns or {})
        columns = {**default_columns, **own_columns}
        fmt = entry.format or args.dataset_format
        train, evaluation, train_report, eval_report = _one_source(
            uncapped, kind, seed, entry.name, fmt, columns, [], other_columns, template,
            config=entry.config or args.dataset_config,
            dataset_train_split=entry.train_split, dataset_test_split=entry.test_split,
        )  # fmt: skip
        trains.append(train)
        evals.append(evaluation)
        reports.append((train_report, eval_report))
    names = [f"{i + 1}:{entry.name}" for i, entry in enumerate(args.mixture)]
    notes = uneven_columns(trains, names, other_columns) if other_columns else []
    if isinstance(other_columns, tuple):  # named number columns (a reward stage's margin): the others' rows get 0
        trains, evals = (with_zero_columns(sets, other_columns) for sets in (trains, evals))
    trains = harmonise(trains, kind, seed, common_columns_only=bool(other_columns))
    evals = harmonise(evals, kind, seed, common_columns_only=bool(other_columns))
    mixed, drawn = interleave(trains, [e.weight for e in args.mixture], seed, names, args.max_train_samples)
    mixed = capped(mixed, args, "max_train_samples")
    evaluation = datasets.concatenate_datasets(evals)
    if args.max_eval_samples:  # shuffled first, so that a capped evaluation holds rows of every set
        evaluation = evaluation.shuffle(seed=seed)
    evaluation = capped(evaluation, args, "max_eval_samples")
    records = {
        "mixture": [
            {"name": e.name, "weight": e.weight, "rows_drawn": drawn[n], "train": t.as_dict(), "eval": v.as_dict()}
            | ({"config": e.config or args.dataset_config} if e.config or args.dataset_config else {})
            for e, n, (t, v) in zip(args.mixture, names, reports)
        ],
        "stopping_strategy": "first_exhausted",
        "train_rows": len(mixed),
        "eval_rows": len(evaluation),
    } | ({"notes": notes} if notes else {})
    return mixed, evaluation, records


def uneven_columns(sets: list, names: list[str], other_columns: bool | tuple[str, ...]) -> list[str]:
    """Notes on the carried columns (outside the layout) that only some sets of a mixture have: a stage's named
    number columns (a reward stage's margin) are given 0 in the others, any other column is left out."""
    standard = {column for columns in STANDARD_FORMAT for column in columns}  # the layouts' own: harmonise's job
    uneven = set().union(*(d.column_names for d in sets)) - set.intersection(*(set(d.column_names) for d in sets))
    notes = []
    for column in sorted(uneven - standard):
        holders = [name for name, d in zip(names, sets) if column in d.column_names]
        if isinstance(other_columns, tuple) and column in other_columns:
            notes.append(f"column '{column}' is in {', '.join(holders)} only: the other sets' rows have {column} 0")
        elif other_columns is True:
            notes.append(f"column '{column}' is in {', '.join(holders)} only: left out, as every set must have it")
    return notes


def with_zero_columns(sets: list, columns: tuple[str, ...]) -> list:
    """The sets, each given the named number columns that another set has and it lacks, as 0 (of the type of the
    first set that has it), so that a mixture keeps them."""
    for column in columns:
        holder = next((d for d in sets if column in d.column_names), None)
        if holder is not None:
            feature = holder.features[column]
            sets = [
                d if column in d.column_names else d.add_column(column, [0] * len(d), feature=feature) for d in sets
            ]
    return sets


def summary_lines(records: dict) -> list[str]:
    """The records as console lines."""
    if "mixture" in records:
        lines = [f"data: mixture of {len(records['mixture'])} sets, {records['train_rows']} training rows"]
        for entry in records["mixture"]:
            report = DataReport(**{k: v for k, v in entry["train"].items()})
            lines.append(
                f"  {entry['name']} (weight {entry['weight']}): {entry['rows_drawn']} drawn; {report.summary()}"
            )
        return lines + [f"  {note}" for note in records.get("notes", [])]
    train, evaluation = (DataReport(**records[s]) for s in ("train", "eval"))
    ptx = [f"data: ptx {DataReport(**records['ptx']).summary()}"] if "ptx" in records else []  # PPO-ptx's data
    return [f"data: train {train.summary()}; eval {evaluation.summary()}"] + [f"  {n}" for n in train.notes] + ptx


def record(output_dir, records: dict) -> None:
    """data.json in the run dir, and the summary on the console (main process only)."""
    from hfgen import tracking

    if not tracking.is_main_process():
        return
    tracking.write_json(Path(output_dir) / "data.json", records)
    print("\n".join(summary_lines(records)))


def drop_and_count(dataset, keep: list[bool], records: dict, reason: str, split: str = "train"):
    """Drop rows the stage found unusable (e.g. longer than max_length), counted in `records`."""
    dropped = len(keep) - sum(keep)
    if dropped:
        count_dropped(records, reason, dropped, split)
        dataset = dataset.select([i for i, k in enumerate(keep) if k])
    return dataset


def count_dropped(records: dict, reason: str, dropped: int, split: str = "train") -> None:
    """Count in `records` `dropped` rows of `split` that were found unusable for `reason` (here or by a trainer)."""
    if not dropped:
        return
    target = records[split] if split in records else None
    if target is not None:
        target["dropped"][reason] = target["dropped"].get(reason, 0) + dropped
        target["rows_kept"] -= dropped
    else:
        records.setdefault(f"{split}_dropped", {})[reason] = dropped


def data_source(args) -> str:
    """The recipe's data in words, for messages: its dataset, or its mixture."""
    return f"dataset '{args.dataset_name}'" if args.dataset_name else "the datasets' mixture"


def checking_template(model: str | None, trust_remote_code: bool | None = False):
    """The tokenizer of `model` for `check_text_data`'s `template`, or None when there is no model or it does not
    load (the model's own check names that)."""
    from hfgen.models import load_tokenizer

    try:
        return load_tokenizer(model, trust_remote_code) if model else None
    except (UserError, OSError, ValueError):
        return None


def check_text_data(
    args,
    kind: str,
    default_columns: dict[str, str] | None = None,
    other_columns: bool | tuple[str, ...] = False,
    seed: int = 0,
    template=None,
) -> tuple[tuple | None, list[str]]:
    """For a stage's check: ((train, eval, records), []) or (None, [the problem]); quiet. `seed`: the run's, so that
    the check sees the rows the run draws, and the run takes this load (`shared_loads`) instead of reading again.
    `template`: the tokenizer whose chat template must render every row (see `load_for_stage`)."""
    from hfgen.data.loading import load_splits_for_check

    return load_splits_for_check(lambda a: load_for_stage(a, kind, seed=seed, default_columns=default_columns,
                                                          other_columns=other_columns, for_the_run=True,
                                                          template=template), args)  # fmt: skip
