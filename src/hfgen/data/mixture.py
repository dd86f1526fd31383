"""Mixtures of datasets: `datasets: [{name: ..., weight: 0.7, format: ...}, ...]` in a recipe.

A weight is the probability that the next training example comes from that set (weights are normalised), as in
`datasets.interleave_datasets`. Stopping rule: the mixture ends when one set runs out ("first_exhausted"), so no
example is repeated and the weights hold over the whole mixture; the sets' evaluation splits are concatenated.
"""

from __future__ import annotations

import difflib
import json
import math
from collections import Counter
from dataclasses import dataclass

from hfgen.data.formats import TOOLS_COLUMN, unpaired_rows
from hfgen.errors import UserError

SOURCE_COLUMN = "_mixture_set"


@dataclass
class MixtureEntry:
    """One set of a mixture: where it comes from, its weight, and its layout."""

    name: str
    weight: float = 1.0
    format: str | None = None
    columns: dict | str | None = None
    config: str | None = None
    train_split: str | None = None
    test_split: str | None = None


ENTRY_KEYS = ("name", "weight", "format", "columns", "config", "train_split", "test_split")


def parse_mixture(entries: list) -> list[MixtureEntry]:
    """`datasets` from a recipe (mappings, or their JSON text as the command line passes them) -> entries."""
    parsed = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            try:
                entry = json.loads(entry) if entry.strip().startswith("{") else {"name": entry}
            except json.JSONDecodeError as error:
                raise UserError(f"datasets entry {i + 1} '{entry}' is not a mapping: {error}") from None
        if not isinstance(entry, dict) or "name" not in entry:
            raise UserError(f"datasets entry {i + 1} needs a name: {{name: DATASET, weight: 0.5, format: alpaca}}")
        unknown = [key for key in entry if key not in ENTRY_KEYS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], ENTRY_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(
                f"datasets entry {i + 1} ('{entry['name']}'): unknown key '{unknown[0]}'{hint}; keys: {', '.join(ENTRY_KEYS)}"
            )
        try:
            weight = float(entry.get("weight", 1.0))
        except (TypeError, ValueError):
            weight = -1.0
        if not (math.isfinite(weight) and weight > 0):  # .inf, or nan, made numpy's draw fail with a traceback
            raise UserError(f"datasets entry {i + 1} ('{entry['name']}'): weight must be a positive number")
        parsed.append(MixtureEntry(**{**entry, "weight": weight}))
    return parsed


def _is_chat(value) -> bool:
    return isinstance(value, list)


def _as_chat(dataset, kind: str, to_messages: bool = True):
    """A converted set's text rows as chat turns (the prompt a user turn, answers assistant turns), so that it
    mixes with sets in chat turns (Alpaca beside ShareGPT). SFT's prompt/completion rows become `messages` only
    beside sets of whole conversations (`to_messages`); beside conversational prompt/completion sets they stay
    prompt/completion, in turns, so that their loss stays on the completion. Text corpora and implicit-prompt pairs
    stay as they are."""
    columns = dataset.column_names
    if not len(dataset):
        return dataset

    def user(text):
        return text if _is_chat(text) else [{"role": "user", "content": text}]

    def assistant(text):
        return text if _is_chat(text) else [{"role": "assistant", "content": text}]

    if kind == "sft" and {"prompt", "completion"} <= set(columns) and not to_messages:
        return dataset.map(lambda row: {"prompt": user(row["prompt"]), "completion": assistant(row["completion"])})
    if kind == "sft" and {"prompt", "completion"} <= set(columns):
        return dataset.map(
            lambda row: {"messages": user(row["prompt"]) + assistant(row["completion"])},
            remove_columns=["prompt", "completion"],
        )
    if (
        "prompt" in columns
        and not _is_chat(dataset[0]["prompt"])
        and kind in ("prompt", "preference", "unpaired_preference")
    ):
        # (a prompt set's other columns are the reward functions' and stay as they are)
        answers = [c for c in ("chosen", "rejected", "completion") if c in columns and kind != "prompt"]
        return dataset.map(
            lambda row: {"prompt": user(row["prompt"]), **{c: assistant(row[c]) for c in answers}},
            remove_columns=["prompt", *answers],
        )
    return dataset


def harmonise(sets: list, kind: str, seed: int = 0, common_columns_only: bool = False) -> list:
    """The sets of a mixture in one form: when some hold chat turns and others text, the text ones as chat turns
    (`_as_chat`); for KTO's data, pairs beside unpaired rows as unpaired rows (`unpaired_rows`); function definitions
    (`tools`) of some sets given as none to the others' rows; with `common_columns_only`, only the columns every set
    has (the carried columns of GRPO's data). Pairs whose prompt is implicit (the conversations' or texts' shared
    start) beside sets with a `prompt` get theirs extracted (as TRL extracts it)."""
    from datasets import Value

    implicit = ["chosen" in d.column_names and "prompt" not in d.column_names for d in sets]
    if any(implicit) and not all(implicit):
        from trl.data_utils import maybe_extract_prompt

        sets = [d.map(maybe_extract_prompt) if "chosen" in d.column_names else d for d in sets]
    if kind == "unpaired_preference" and len({"label" in d.column_names for d in sets}) > 1:
        sets = [d if "label" in d.column_names else unpaired_rows(d, seed) for d in sets]
    layout_columns = ("prompt",) if kind == "prompt" else ("prompt", "chosen", "completion")  # not carried ones
    chat = [
        _is_chat(d[0]["messages"]) if "messages" in d.column_names else
        any(_is_chat(d[0][c]) for c in layout_columns if c in d.column_names)
        for d in sets if len(d)
    ]  # fmt: skip
    if any(chat) and not all(chat):
        to_messages = any("messages" in d.column_names for d in sets)
        sets = [_as_chat(d, kind, to_messages) for d in sets]
    if any(TOOLS_COLUMN in d.column_names for d in sets):  # function definitions: the others' rows have none
        sets = [d if TOOLS_COLUMN in d.column_names else d.add_column(TOOLS_COLUMN, [None] * len(d)) for d in sets]
        sets = [d.cast_column(TOOLS_COLUMN, Value("string")) for d in sets]
    if common_columns_only and sets:
        common = set.intersection(*(set(d.column_names) for d in sets))
        sets = [d.select_columns([c for c in d.column_names if c in common]) for d in sets]
    return _json_turns_alike(sets)


def _json_turns_alike(sets: list) -> list:
    """The sets with their chat columns in one Arrow form: a set with tool calls holds its turns as JSON (each turn
    its own keys, see formats._from_rows), the others as {role, content} structs, and the mixture refused them as
    different layouts though all are chat turns; the others' turns become JSON too."""
    from datasets import Dataset, Features, Json, List

    as_json = List(Json())
    columns = {c for d in sets for c, feature in d.features.items() if feature == as_json}
    converted = []
    for d in sets:
        other = [c for c in columns if c in d.column_names and d.features[c] != as_json]
        if other:
            features = Features({c: as_json if c in other else f for c, f in d.features.items()})
            d = Dataset.from_list(d.to_list(), features=features)
        converted.append(d)
    return converted


def interleave(sets: list, weights: list[float], seed: int, names: list[str], limit: int | None = None):
    """(mixed training set, rows drawn from each set by name): its first `limit` rows when given (max_train_samples)."""
    import datasets

    features = sets[0].features
    for name, dataset in zip(names[1:], sets[1:]):
        if dataset.features != features:
            raise UserError(
                f"the datasets of the mixture convert to different columns ('{names[0]}': {dict(features)}; "
                f"'{name}': {dict(dataset.features)}): give them the same layout (e.g. all chat messages)"
            )
    tagged = [d.add_column(SOURCE_COLUMN, [i] * len(d)) for i, d in enumerate(sets)]
    largest = max(weights)  # scaled first: finite weights near the float limit (1e308 each) overflow their sum
    scaled = [w / largest for w in weights]
    mixed = datasets.interleave_datasets(
        tagged, probabilities=[w / sum(scaled) for w in scaled], seed=seed, stopping_strategy="first_exhausted"
    )
    if limit and limit > 0:
        mixed = mixed.select(range(min(limit, len(mixed))))
    drawn = Counter(mixed[SOURCE_COLUMN])
    return mixed.remove_columns(SOURCE_COLUMN), {name: drawn.get(i, 0) for i, name in enumerate(names)}
