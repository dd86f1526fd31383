"""Recipes: a YAML file with `stage:` and flat keys, plus `--key value` overrides.

The keys are the fields of the stage's typed config dataclasses (transformers `TrainingArguments`,
TRL configs and our own), parsed with `HfArgumentParser` so every upstream option works without being
re-declared here. Everything is validated before any model is built, and every problem found is
reported at once, as one `UserError` (exit code 2) naming the offending keys.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import glob
import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hfgen import process_state
from hfgen.errors import UserError
from hfgen.stages import STAGES, load_stage
from hfgen.unread_keys import (
    field_default,
    optim_args_problems,
    refused_everywhere,
    switched_off_keys,
    unread_key_problems,
)

STAGE_KEY = "stage"
# Keys transformers/TRL renamed: the old name in a recipe points to the new one (difflib would suggest
# `torch_compile` for `torch_dtype`)
RENAMED = {"torch_dtype": "dtype", "evaluation_strategy": "eval_strategy"}
# Upstream keys (transformers' and TRL's PPO, diffusers' scripts) whose letters sent the did-you-mean hint to a key of
# another meaning here (num_train_epochs to PPO's num_ppo_epochs, the passes over each rollout; mini_batch_size, a
# size, to num_mini_batches, a count) or to none: the key that says it here, and how the value converts. Used where
# the stage has that key.
FOREIGN_SPELLINGS = {
    "num_train_epochs": (
        "total_episodes",
        "the prompts rolled out over the whole run (N epochs: N x the training prompts), not num_ppo_epochs, the "
        "passes over each rollout",
    ),
    "max_steps": (
        "total_episodes",
        "the prompts rolled out over the whole run (N updates: N x per_device_train_batch_size x "
        "gradient_accumulation_steps x num_mini_batches x processes)",
    ),
    "mini_batch_size": (
        "num_mini_batches",
        "a count, not a size: a minibatch is per_device_train_batch_size x gradient_accumulation_steps x processes "
        "sequences, and a rollout holds num_mini_batches of them",
    ),
    "kl_penalty": ("kl_estimator", "the per-token KL estimator, k1 or k3"),
    "per_device_eval_batch_size": (
        "local_rollout_forward_batch_size",
        "the held-out comparison generates in chunks of it, as the rollout does",
    ),
    "save_steps": ("checkpointing_steps", "a checkpoint every N optimizer steps (diffusers' name)"),
    "warmup_ratio": (
        "lr_warmup_steps",
        "a number of optimizer steps, not a share of the run (the share x the run's optimizer steps)",
    ),
    # GRPO's and PPO's names for one another's keys, and LoRA's names in the other libraries (spelling hints sent
    # them to keys of another meaning: max_completion_length to PPO's prompt cap, epsilon to adam_epsilon,
    # num_ppo_epochs to num_train_epochs, lora_rank to local_rank)
    "max_completion_length": ("response_length", "the answers' length cap, in tokens"),
    "epsilon": ("cliprange", "the clip range of the policy ratio"),
    "num_ppo_epochs": ("num_iterations", "the passes over each batch of generations"),
    "sft_model_path": ("model_name_or_path", "the policy to start from (the reference is its copy)"),
    "lora_rank": ("lora_r", "the LoRA rank"),
    "use_lora": ("use_peft", "LoRA adapters instead of training every weight (with lora_r, lora_alpha, ...)"),
    # data-pipeline keys of the other stages and of transformers before 5 (hints sent data_seed and dataset_num_proc
    # to dataset_name, which would take the number as the data set's name: probe 43 D5)
    "data_seed": (
        "seed",
        "which also draws this stage's data order, held-out rows and augmentations (it has no seed of the data's own)",
    ),
    "group_by_length": (
        "train_sampling_strategy",
        "with the value group_by_length (transformers 5's spelling of group_by_length: true)",
    ),
}
# Upstream data-pipeline keys some stages read and the others have no counterpart for (as a stage's own
# KEYS_WITHOUT_COUNTERPART): told so, not hinted to a key of similar letters (dataset_num_proc to dataset_name,
# shuffle_dataset to datasets: probe 43 D5)
WITHOUT_COUNTERPART = {
    "dataset_num_proc": "hfgen prepares this stage's data in one process (dataset_num_proc, the processes TRL "
    "tokenizes with, is a key of the sft, dpo, kto, orpo, simpo and reward stages)",
    "shuffle_dataset": "this stage draws its training order afresh every epoch already (from data_seed where it "
    "has one, else seed); shuffle_dataset is a key of the sft, grpo and rloo stages",
}
# `hfgen train`'s own options, not recipe keys: a recipe (or `hfgen check`) given one is told where it belongs
LAUNCH_OPTIONS = ("num_processes", "launch_config", "main_process_port")
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_BASE_60 = re.compile(r"[-+]?[\d_]+(:[\d_]+)+(\.[\d_]*)?")  # YAML 1.1's sexagesimal numbers: 4:3 is 243


@dataclass
class RunArguments:
    """Keys every stage accepts, about the run rather than the training (read by `hfgen.train.run_recipe`)."""

    nan_tolerance: int = field(
        default=0,
        metadata={"help": "Steps with a non-finite loss or gradient norm to skip before the run stops (exit code 3)."},
    )
    save_on_signal: bool = field(
        default=False, metadata={"help": "On SIGINT/SIGTERM, write a checkpoint after the current step, then exit."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Train into an output_dir holding the complete run of a different recipe."}
    )

    def __post_init__(self):
        if self.nan_tolerance < 0:
            raise ValueError(f"nan_tolerance must be >= 0, got {self.nan_tolerance}")


@dataclass
class Recipe:
    """A parsed and validated recipe."""

    stage: str
    values: dict[str, Any]  # the keys the user set (file, then overrides): re-runnable as is
    configs: tuple  # one instance per dataclass of the stage, in the stage's ARGUMENTS order
    source: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    run: RunArguments = field(default_factory=RunArguments)
    # torch's float32 matmul precision as parsing this recipe left it: transformers' TrainingArguments sets it for
    # `tf32` (and torch_compile under bf16) when parsed, process-wide, so a sweep that parsed its later points first
    # trained every point with the last one's (`process_state.fp32_precision`; set again when the run starts)
    fp32_precision: str | None = None

    def get(self, cls):
        """The config instance of type `cls` (or a subclass)."""
        for config in self.configs:
            if isinstance(config, cls):
                return config
        raise KeyError(cls.__name__)

    def value(self, key: str):
        """The parsed value of `key` (its default when the recipe leaves it out), from whichever config has it;
        None when none has."""
        return next((getattr(c, key) for c in (*self.configs, self.run) if hasattr(c, key)), None)

    @property
    def output_dir(self) -> Path:
        if recipe_output_dir(self.values) is not None:
            for config in self.configs:
                if getattr(config, "output_dir", None):
                    return Path(config.output_dir)
        raise UserError(f"the recipe for stage '{self.stage}' sets no output_dir; add `output_dir: PATH`.")

    def to_yaml(self) -> str:
        return yaml.safe_dump({STAGE_KEY: self.stage, **self.values}, sort_keys=False)


def recipe_output_dir(values: dict[str, Any]) -> Path | None:
    """The recipe's own output_dir (None when missing, null or empty): transformers' TrainingArguments would fill
    a missing one with ./trainer_output, and a run would land wherever it was started from. `~` expanded, as the
    stages' configs have it (`build_recipe`)."""
    value = values.get("output_dir")
    return Path(str(value)).expanduser() if value is not None and str(value).strip() else None


def expand_home(value: str) -> str:
    """A path argument with its leading `~` (the user's home) expanded; anything else as given. No hub id starts
    with '~'. The recipes' path keys (`build_recipe`) and the path arguments of hfgen eval, merge and generate (their
    argparse `type`) read a path this one way: a `--output=~/e.json`, which the shell leaves as written, wrote into a
    folder named '~' in the working directory, and a model '~/m' was taken for a hub id."""
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


class _RaisingParser:
    """Wraps `HfArgumentParser` so that argparse problems raise instead of printing usage and exiting."""

    def __init__(self, dataclass_types):
        from transformers import HfArgumentParser

        class Parser(HfArgumentParser):
            def error(self, message):  # argparse calls this on bad values; we collect instead
                raise UserError(message)

            @staticmethod
            def _parse_dataclass_field(parser, field):
                if is_recipe_key(field):  # (a field hfgen fills itself, as rlhf's passed_to_steps, takes no value)
                    HfArgumentParser._parse_dataclass_field(parser, field)

        self.parser = Parser(dataclass_types)
        self.actions = {
            action.dest: action
            for action in self.parser._actions
            if action.option_strings and action.dest != "help" and not action.option_strings[0].startswith("--no_")
        }


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (YAML keeps the last silently: a recipe
    edited in two places trained with whichever came later)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (line {key_node.start_mark.line + 1})", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_recipe_file(path: str | Path, stage: str | None = None) -> dict[str, Any]:
    """Read a recipe YAML into a dict; a missing file or bad YAML is a UserError. `stage`: the one the command line
    gives, which wins over the file's (its text keys are read as written, `_text_as_written`)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"recipe file '{path}' is a directory; give a recipe YAML file (recipes live under recipes/).")
    if not path.is_file():
        raise UserError(f"recipe file '{path}' does not exist.")
    try:
        source = path.read_text(encoding="utf-8")
        data = yaml.load(source, Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as error:
        raise UserError(
            f"recipe file '{path}' is not UTF-8 text (byte {error.start}: {error.object[error.start : error.start + 1]!r}); "
            "save it as UTF-8 YAML."
        ) from None
    except OSError as error:
        raise UserError(f"recipe file '{path}' cannot be read: {error.strerror or error}.") from None
    except yaml.YAMLError as error:
        raise UserError(f"recipe file '{path}' is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe file '{path}' must be a mapping of keys to values, got {type(data).__name__}.")
    return _text_as_written(data, source, path, stage or data.get(STAGE_KEY))


_YAML_NULL, _YAML_BOOL = "tag:yaml.org,2002:null", "tag:yaml.org,2002:bool"


def _text_as_written(data: dict[str, Any], source: str, path: Path, stage: Any) -> dict[str, Any]:
    """The recipe's values with each text key's unquoted scalars as written (`text_keys` of its stage), as the
    command line's overrides read them: YAML 1.1 turned `run_name: yes` into 'true', `0755` into '493', `0x10` into
    '16', `1:30` into '90', and a `~` among `validation_prompts` into the prompt 'None'. A key's own null (`~`,
    `null`) stays None; a null item of a list of text is refused, naming the key. YAML's boolean words stay booleans
    where they mean one (`_as_boolean_word`)."""
    text = text_keys(stage) if isinstance(stage, str) and stage in STAGES else frozenset()
    if not text:
        return data
    root = yaml.compose(source, Loader=yaml.SafeLoader)
    for key_node, value_node in root.value:
        if key_node.value in text:
            data[key_node.value] = _as_written(
                value_node, data[key_node.value], key_node.value, stage, f"recipe file '{path}'"
            )
    return data


def _as_written(node, value: Any, key: str, stage: str, where: str) -> Any:
    """`value`, YAML 1.1's reading of `node` for the text key `key` of `stage` (in the recipe file, or a flow list
    or mapping on the command line: `where`), with its unquoted scalars as written (`_scalar_as_written`): the
    value, each item of a list (a null item refused), and each text key's value in a pipeline's `<step>_overrides`
    mapping, by the step's stage (`sft_overrides: {run_name: 0755}` was '493')."""
    if isinstance(node, yaml.ScalarNode):
        return _scalar_as_written(node, value, key, stage)
    if isinstance(node, yaml.SequenceNode) and isinstance(value, list):
        for index, item in enumerate(node.value):
            if isinstance(item, yaml.SequenceNode):  # no text key holds lists of lists: `[a, [~]]` became 'None'
                raise UserError(
                    f"{where}: key '{key}' item {index + 1} is a list (`{yaml.serialize(item).strip()}`); give its "
                    "items as items of the key's own list, or quote it if you mean the text."
                )
            if not isinstance(item, yaml.ScalarNode):
                continue
            if item.tag == _YAML_NULL and item.style is None:
                raise UserError(
                    f"{where}: key '{key}' item {index + 1} is null (`{item.value}`); quote it "
                    f'(`"{item.value}"`) if you mean the text, or leave the item out.'
                )
            value[index] = _scalar_as_written(item, value[index], key, stage)
    step = key.removesuffix("_overrides")
    if isinstance(node, yaml.MappingNode) and isinstance(value, dict) and step != key and step in STAGES:
        for key_node, value_node in node.value:
            if key_node.value in text_keys(step) and key_node.value in value:
                value[key_node.value] = _as_written(
                    value_node, value[key_node.value], key_node.value, step, f"{where}: key '{key}'"
                )
    return value


def _scalar_as_written(node, value: Any, key: str, stage: str) -> Any:
    """`value`, YAML 1.1's reading of the scalar `node` of the text key `key`: the text as written where it is
    unquoted and YAML read another type (a number, a date, yes/no/on/off), but for a boolean word where it means one
    (`_as_boolean_word`), and `true`/`false`, which stay booleans (a text key takes them as the same words)."""
    if node.style is not None or node.tag == _YAML_NULL:
        return value  # quoted: YAML's reading is the text; or the key's own null
    word = _as_boolean_word(node.value, key, stage)
    if word is not None:
        return word
    if node.tag == _YAML_BOOL and node.value.lower() in ("true", "false"):
        return value
    return node.value


_BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _as_boolean_word(text: str, key: str, stage: str) -> bool | str | None:
    """The one rule for YAML 1.1's boolean words (yes/no, on/off, true/false, in any case) given to a text key, in
    the recipe file and on the command line, for the keys to which one means something (`boolean_word_keys`), as
    YAML 1.1 read them before text keys kept their text: `resume_from_checkpoint: no` is false (start afresh), and a
    choice key's word is the choice's own text (`save_strategy: off` is 'no', `true` 'yes'), so a run's recipe.yaml
    holds 'no' as the recipes before did (a boolean there made every earlier run "another recipe"). Else None: the key
    keeps the word as text (`run_name: yes`)."""
    if key not in boolean_word_keys(stage) or (flag := _BOOLEAN_WORDS.get(text.strip().lower())) is None:
        return None
    return flag if key == "resume_from_checkpoint" else ("yes" if flag else "no")


@functools.cache
def boolean_word_keys(stage: str) -> frozenset[str]:
    """The stage's text keys that take a boolean: `resume_from_checkpoint` (a path, or true: the newest checkpoint,
    false: start afresh) and each choice key whose choices hold 'no' or 'yes' (`build_recipe` reads false as 'no':
    save_strategy, eval_strategy, logging_strategy, vae/t2i's mixed_precision)."""
    actions = _RaisingParser((*load_stage(stage).ARGUMENTS, RunArguments)).actions
    return frozenset(
        key
        for key in text_keys(stage)
        if key == "resume_from_checkpoint"
        or key in actions
        and actions[key].choices
        and ({"no", "yes"} & set(actions[key].choices))
    )


def recipe_values(path: str | Path, overrides: list[str]) -> dict[str, Any]:
    """A recipe file's values with the command line's overrides over them, each read by its key's type in the
    recipe's stage (`parse_overrides`)."""
    values = read_recipe_file(path, (_override_tokens(overrides).get(STAGE_KEY) or [None])[0])
    return {**values, **parse_overrides(overrides, values.get(STAGE_KEY))}


def parse_overrides(tokens: list[str], stage: Any = None) -> dict[str, Any]:
    """`['--lr', '1e-4', '--flag', '--mods', 'q', 'v']` -> {'lr': '1e-4', 'flag': True, 'mods': ['q', 'v']}.

    Values stay strings (typed later by the dataclass field); YAML scalars are decoded so that the
    resolved recipe reads naturally (`true`, numbers, `null`). A key whose value is text in `stage` (or in the
    `--stage` the tokens give) keeps the text as typed (`text_keys`).
    """
    overrides = _override_tokens(tokens)
    stage = (overrides.get(STAGE_KEY) or [stage])[0]
    text = text_keys(stage) if isinstance(stage, str) and stage in STAGES else frozenset()
    resolved = {}
    for key, values in overrides.items():
        several = len(values) > 1
        decoded = [
            _decode_text(v, key, stage, index + 1 if several else None) if key in text else _decode_scalar(v)
            for index, v in enumerate(values)
        ]
        resolved[key] = True if not decoded else decoded[0] if len(decoded) == 1 else decoded
    return resolved


def _override_tokens(tokens: list[str]) -> dict[str, list[str]]:
    """`['--lr', '1e-4', '--mods', 'q', 'v']` -> {'lr': ['1e-4'], 'mods': ['q', 'v']}: each key's values as typed."""
    overrides: dict[str, list[str]] = {}
    key = None
    for token in tokens:
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            if not name:
                raise UserError(f"override '{token}' has no key name.")
            key = name.replace("-", "_")
            overrides[key] = [value] if eq else []  # given again, the last wins (callers add to the user's)
        elif key is None:
            raise UserError(f"unexpected argument '{token}': overrides take the form --key value.")
        else:
            overrides[key].append(token)
    return overrides


def valueless_keys(tokens: list[str]) -> frozenset:
    """The override keys given as a bare `--key` (followed by another `--key` or nothing)."""
    keys = [(token[2:].replace("-", "_"), "=" in token) for token in tokens if token.startswith("--")]
    positions = [i for i, token in enumerate(tokens) if token.startswith("--")] + [len(tokens)]
    return frozenset(
        key
        for (key, has_eq), here, following in zip(keys, positions, positions[1:])
        if not has_eq and following == here + 1
    )


_NULLS = ("null", "Null", "NULL", "~", "")  # YAML's spellings of null


def _decode_scalar(text: str) -> Any:
    """A command-line value for a key of another type than text: YAML's reading where it is a number, a boolean,
    null or a flow list or mapping (`[a, b]`, `{k: v}`) as typed, else the text (the key's own type reads it, or
    says it cannot: YAML would read `5 #x` as 5, `&x` and `#3` as null)."""
    if text.lower() in ("yes", "no", "on", "off", "y", "n"):
        return text  # YAML 1.1 would make these booleans; `--save_strategy no` means the string
    if _BASE_60.fullmatch(text):
        return text  # `--aspect_ratio_buckets 4:3`, `--validation_prompts 12:30` mean the text, not 243 and 750
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, (int, float)) and not isinstance(value, bool) and _number_text(value) != text.strip():
        # YAML 1.1 reads more than the number a user typed: `010` is octal 8, `0x1F`, `1_000`, `1e3` written as
        # `1000.0`. The text goes on as typed and the key's own type reads it (a str key keeps `010`, an int key
        # reads 10, a float key `3e-3`), as it would from the recipe file
        return text
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text  # (`true #x`)
    if value is None and text.strip() not in _NULLS:
        return text  # a comment, an anchor or a tag alone (`#3`, `&x`), which YAML reads as null
    if isinstance(value, dict) or (
        isinstance(value, list) and all(isinstance(item, (str, int, float, bool, dict)) for item in value)
    ):
        # written as in the recipe file, the same value: `--loss_type "[sigmoid, sft]"`, `--dataset_columns
        # "{prompt: question}"` or "prompt: question", `--datasets "[{name: a.jsonl, weight: 0.7}, ...]"`
        return value
    return value if isinstance(value, (int, float, bool)) or value is None else text


def _decode_text(text: str, key: str, stage: str, item: int | None = None) -> Any:
    """A command-line value for a key whose value is text: the text as typed (YAML would cut `run #2` at its
    comment, make `a: b` a mapping, `- a` a list, `&x` an anchor, and strip spaces), but for YAML's nulls given
    alone (`--dataset_name ""`, `--eos_token ~`: unset; as the `item`-th of several values refused as the file's null
    item is, but for `~`, a text), a flow list or mapping (`[a, b]`, `{prompt: question}`) as the recipe file reads
    it, and YAML's boolean words where they mean a boolean, as in the file (`--resume_from_checkpoint no`,
    `--save_strategy off`: `_as_boolean_word`); a value quoted whole (`'"3:2"'`, `"'a #1'"`) is the text inside:
    single quotes as the recipe file reads them (`''` is `'`), double quotes without YAML's backslash escapes."""
    if text in _NULLS and (item is None or text != "~"):
        if item is not None:  # (it was the prompt 'None', or an empty prompt)
            shown = text or '""'
            raise UserError(
                f"the command line: key '{key}' item {item} is null (`{shown}`); quote it (`'\"{text}\"'`) if you "
                "mean the text, or leave the item out."
            )
        return None
    if (word := _as_boolean_word(text, key, stage)) is not None:
        return word
    if (quoted := quoted_text(text)) is not None:
        return quoted
    if not text.lstrip().startswith(("[", "{")):
        return text
    try:  # a flow list or mapping, read as in the recipe file (YAML 1.1 read `[12:30, yes]` as [750, True])
        node, value = yaml.compose(text, Loader=yaml.SafeLoader), yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return _as_written(node, value, key, stage, "the command line") if isinstance(value, (list, dict)) else text


def quoted_text(text: str) -> str | None:
    """The text inside a value quoted whole (`'"3:2"'`, `"'a, b'"`), else None (`"a","b"` is two quoted values):
    single quotes as the recipe file reads them (`''` is `'`), double quotes without YAML's backslash escapes
    (they put a newline and a tab in `"C:\\new\\table"` and refused `"C:\\Users\\me"`, where a shell user means the
    path)."""
    if len(text) >= 2 and text[0] == text[-1] == '"' and '"' not in text[1:-1]:
        return text[1:-1]
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # (`'"a\\"b"'`: YAML's escapes give a"b)
        with contextlib.suppress(yaml.YAMLError):
            if isinstance(quoted := yaml.safe_load(text), str):
                return quoted
    return None


@functools.cache
def text_keys(stage: str) -> frozenset[str]:
    """The stage's keys whose value is text: typed str (a path, a prompt, a name, a choice) or a list of text, None
    allowed or not, and the config files (`dict | str`: a path, or a mapping). The other mappings' keys (`dict | str`,
    keyword arguments) take YAML's reading, as the numbers do (`--lr_scheduler_kwargs 5` is said to be a number)."""
    import typing

    keys, seen = set(), set()
    for cls in (*load_stage(stage).ARGUMENTS, RunArguments):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if is_recipe_key(f) and f.name not in seen:  # (the first class's field, as `key_fields`)
                seen.add(f.name)
                if _is_text_type(hints.get(f.name)) or f.name in _CONFIG_FILE_KEYS:
                    keys.add(f.name)
    return frozenset(keys)


def _is_text_type(hint) -> bool:
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(hint) if member is not type(None)]
        return bool(members) and all(_is_text_type(member) for member in members)
    if origin is list:
        return all(_is_text_type(member) for member in typing.get_args(hint))
    if origin is typing.Literal:
        return all(isinstance(member, str) for member in typing.get_args(hint))
    return isinstance(hint, type) and issubclass(hint, (str, os.PathLike))


def _number_text(value: int | float) -> str:
    """How a number decoded by YAML prints back, to tell a typed `2.5` from a `2.50` (a str key's text)."""
    return repr(value) if isinstance(value, float) else str(value)


def _numbers_inside(value: Any) -> Any:
    """A mapping's (or list's) `1e-3` strings as floats, at any depth: YAML 1.1 wants a dot in a float, and a
    mapping's values reach the library untyped (a scheduler's `min_lr: '1e-3'` is a TypeError mid-run)."""
    if isinstance(value, dict):
        return {k: _numbers_inside(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers_inside(v) for v in value]
    return float(value) if isinstance(value, str) and _SCIENTIFIC.fullmatch(value) else value


def _to_argv_tokens(value: Any) -> list[str]:
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _to_argv_tokens(v)]
    if isinstance(value, dict):
        return [json.dumps(value)]
    return [str(value)]


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def is_recipe_key(field: dataclasses.Field) -> bool:
    return field.init and field.metadata.get("recipe_key", True)


def known_keys(stage: str) -> list[str]:
    return sorted(key_fields(stage))


def key_fields(stage: str) -> dict[str, dataclasses.Field]:
    """The stage's recipe keys and their dataclass fields (default, help)."""
    module = load_stage(stage)
    fields = {}
    for cls in (*module.ARGUMENTS, RunArguments):
        for f in dataclasses.fields(cls):
            if is_recipe_key(f):
                fields.setdefault(f.name, f)
    return fields


def key_lines(stage: str) -> list[str]:
    """`hfgen train RECIPE --list-keys`: each key as a recipe line, `key: default  # help` (the field's help, on one
    line), so that it can be pasted into a recipe. The default is the value a recipe that leaves the key out runs
    with (as parsed: TRL's bf16 null becomes true where bf16 is supported), else the field's own."""
    import yaml

    def as_yaml(value) -> str:
        value = getattr(value, "value", value)  # an Enum's spelling in a recipe
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()

    try:
        parsed = build_recipe({"stage": stage}, None, check_inputs=False).configs
    except UserError:  # (a stage that needs more keys to parse: the fields' own defaults)
        parsed = ()
    lines = []
    for name, f in sorted(key_fields(stage).items()):
        default = field_default(f)
        if name != "output_dir":  # (transformers fills in trainer_output; hfgen asks for one)
            default = next((getattr(config, name) for config in parsed if hasattr(config, name)), default)
        try:
            value = as_yaml(default)
        except yaml.representer.RepresenterError:  # parsed into an object (accelerator_config): the field's own
            value = as_yaml(f.default if f.default is not dataclasses.MISSING else None)
        text = " ".join(str(f.metadata.get("help") or "").replace("%%", "%").split())
        lines.append(f"{name}: {value}" + (f"  # {text}" if text else ""))
    return lines


def load_recipe(
    path: str | Path | None,
    overrides: list[str] | None = None,
    check_inputs: bool = True,
    made_later: tuple[str, ...] = (),
) -> Recipe:
    """Read, merge, type-check and validate a recipe. Raises one UserError listing every problem. `made_later`:
    see `build_recipe`."""
    values = recipe_values(path, overrides or []) if path is not None else parse_overrides(overrides or [])
    bare = valueless_keys(overrides or [])
    source = Path(path) if path else None
    return build_recipe(values, source, check_inputs=check_inputs, valueless=bare, made_later=made_later)


def recipe_stage(stage: Any, where: str = "recipe") -> str:
    """The recipe's `stage:` value, refused unless it names one stage."""
    if stage is None:
        raise UserError(f"{where} has no 'stage' key; set one of: {', '.join(STAGES)}.")
    if not isinstance(stage, str):
        raise UserError(
            f"{where}: key 'stage' must be one stage name, got {type(stage).__name__} {stage!r}; "
            f"stages: {', '.join(STAGES)}."
        )
    if stage not in STAGES:
        raise UserError(
            f"{where}: unknown stage '{stage}'{_suggest(str(stage), list(STAGES))}; stages: {', '.join(STAGES)}."
        )
    return stage


def build_recipe(
    values: dict[str, Any],
    source: Path | None = None,
    check_inputs: bool = True,
    valueless: frozenset = frozenset(),
    made_later: tuple[str, ...] = (),
) -> Recipe:
    """`valueless`: the keys given on the command line as a bare `--key`, which only a flag (bool key) may be.
    `made_later`: model paths an earlier step has not made yet (`hfgen check` of a step): the stage's checks that
    name them are left out, every other check is made."""
    from hfgen.models import relative_to_cwd

    values = dict(values)
    where = f"recipe '{source}'" if source else "recipe"
    stage = recipe_stage(values.pop(STAGE_KEY, None), where)
    module = load_stage(stage)
    parser = _RaisingParser((*module.ARGUMENTS, RunArguments))

    errors = []
    argv: list[str] = []
    empty_lists: list[str] = []
    nulls: list[str] = []
    for key, value in values.items():
        action = parser.actions.get(key)
        if action is None:
            if RENAMED.get(key) in parser.actions:  # a spelling from older recipes, closer to another key's letters
                errors.append(f"unknown key '{key}' for stage '{stage}': it is now '{RENAMED[key]}'")
            elif key in getattr(module, "KEYS_WITHOUT_COUNTERPART", {}):  # an upstream key this stage has no match for
                errors.append(f"unknown key '{key}' for stage '{stage}': {module.KEYS_WITHOUT_COUNTERPART[key]}")
            elif key in WITHOUT_COUNTERPART:
                errors.append(f"unknown key '{key}' for stage '{stage}': {WITHOUT_COUNTERPART[key]}")
            elif (
                key in FOREIGN_SPELLINGS
                and FOREIGN_SPELLINGS[key][0] in parser.actions
                and FOREIGN_SPELLINGS[key][0] not in refused_everywhere(stage)
            ):
                here, meaning = FOREIGN_SPELLINGS[key]
                errors.append(f"unknown key '{key}' for stage '{stage}': this stage says {here}, {meaning}")
            elif spelling := precision_spelling(key, value, parser.actions):
                errors.append(f"unknown key '{key}' for stage '{stage}': this stage says {spelling}")
            elif key in LAUNCH_OPTIONS:
                errors.append(
                    f"'{key}' is an option of `hfgen train` (it launches the processes), not a recipe key: "
                    f"`hfgen train RECIPE --{key} ...`"
                )
            else:
                refused = (
                    *getattr(module, "NOT_SUGGESTED", ()),
                    *refused_everywhere(stage),
                    *switched_off_keys(values, {name: action.default for name, action in parser.actions.items()}),
                )
                offered = [known for known in parser.actions if known not in refused]
                errors.append(f"unknown key '{key}' for stage '{stage}'{_suggest(key, offered)}")
            continue
        if isinstance(value, str) and (
            value in ("None", "none") and action.type in (int, float)
            or value == "None" and _allows_none(module.ARGUMENTS + (RunArguments,), key) and "None" not in (action.choices or ())
        ):  # fmt: skip
            value = None  # Python's spelling of null (`--max_steps None`; `--eos_token None`, not the text 'None')
        # A mapping reaches the library untyped (`lr_scheduler_kwargs: {min_lr: 1e-3}`); a plain list's items are
        # typed by the field (`1e-3` for a str key stays a str)
        if isinstance(value, dict) or isinstance(value, list) and any(isinstance(v, dict) for v in value):
            value = values[key] = _numbers_inside(value)
        if _takes_mapping(module.ARGUMENTS + (RunArguments,), key) and not _mapping_like(value):
            # the library would apply `**value` mid-run (a TypeError once the data had loaded)
            errors.append(
                f"key '{key}' takes a mapping of names to values, got {type(value).__name__} {value!r}; write "
                f'`{key}: {{name: value}}` in the recipe, `--{key} "{{name: value}}"` on the command line'
            )
            continue
        if isinstance(value, str) and value.lower() in ("on", "off") and action.const is True:
            # a flag (bool key): YAML 1.1's on/off, read as the recipe file reads them (`--use_peft off`; the command
            # line keeps on/off as text for the keys whose choices take them, and transformers' bool knows yes/no)
            value = values[key] = value.lower() == "on"
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value) and action.type is int:
            value = float(value)  # `max_steps: 1e3`: YAML 1.1 reads a string, int() would refuse it
        if isinstance(value, float) and value.is_integer() and action.type is int:
            value = int(value)
        if value is None and key == "report_to":
            value = "none"  # null means no tracker: transformers would keep None as a tracker's name and fail on it
        if value is None:  # YAML null: the field's None (TRL's `max_length: None` = no truncation)
            if not _allows_none(module.ARGUMENTS + (RunArguments,), key):
                errors.append(f"key '{key}' cannot be null; give it a value or leave the key out for its default")
            else:
                nulls.append(key)
            continue
        if key == "ddp_backend" and "WORLD_SIZE" not in os.environ:
            # a process-group backend outside any launch (`hfgen check`, a one-process run of a recipe made for a
            # DeepSpeed-on-CPU launch): accelerate would ask torch for a group no one made. Kept in recipe.yaml, and
            # under a launch (its WORLD_SIZE; one DeepSpeed process needs it too)
            continue
        if key in PATH_KEYS and isinstance(value, (dict, list)):
            # (a `--output_dir "{a: b}"` trained into a folder named by the mapping's JSON text)
            errors.append(f"key '{key}' takes a path, got {type(value).__name__} {value!r}")
            continue
        if key in (*INPUT_PATH_KEYS, *OTHER_PATH_KEYS) and isinstance(value, str) and value.startswith("~"):
            # no hub id starts with '~': a path under home, expanded once here for every stage, so that every loader
            # (transformers' took `~/models/x` for a hub id) reads the same path the checks found, and every stage
            # writes where `~/...` says (TrainingArguments expanded its output_dir, the accelerate loops of vae, t2i
            # and ppo wrote into a folder named '~' in the working directory)
            value = expand_home(value)
        if key in _CONFIG_FILES_READ_AT_PARSE and isinstance(value, str) and not Path(value).is_file():
            # transformers opens it while the configs are made: a raw FileNotFoundError traceback otherwise
            errors.append(
                f"key '{key}': no file '{value}'{relative_to_cwd(value)}; give the path of a JSON config file, or "
                "the settings as a mapping"
            )
            continue
        if key in valueless and action.const is not True:
            errors.append(f"key '{key}' was given no value (`--{key} VALUE`)")
            continue
        if isinstance(value, bool) and action.choices and ("no" if not value else "yes") in action.choices:
            value = "yes" if value else "no"  # YAML 1.1 reads a bare `no` as false: `save_strategy: no`
        tokens = _to_argv_tokens(value)
        if not tokens and action.nargs in ("+", "*"):  # `reward_functions: []`: argparse takes no empty list
            empty_lists.append(key)
            continue
        problem = _check_value(action, tokens)
        if problem:
            errors.append(f"key '{key}': {problem}")
            continue
        # one value as --key=VALUE: argparse takes a separate token that starts with '-' and is not a plain negative
        # number (-inf, -1e-05: str() of logit_mean: -1.0e-5) for an option, "expected one argument"
        argv += [f"--{key}={tokens[0]}"] if action.nargs in (None, "?") else [f"--{key}", *tokens]
    errors += _alias_conflicts(values, parser.actions)
    errors += unexpanded_variable_problems(values, parser.actions)
    errors += _revision_problem(values) if "model_revision" in parser.actions else []
    if errors:
        raise UserError(f"{where} has {_count(errors, 'problem')}: " + "; ".join(errors).rstrip(".") + ".")

    try:
        configs = _parse_into_dataclasses(parser.parser, argv, nulls)
    except UserError as error:
        raise UserError(f"{where}: {error}") from None
    except (ValueError, TypeError, ImportError) as error:  # raised by the configs' __post_init__ checks
        raise UserError(f"{where}: {error}") from None
    for key in empty_lists:
        for config in configs:
            if hasattr(config, key):
                setattr(config, key, [])
    *configs, run = configs
    for config in configs:  # a pipeline's own save_on_signal / nan_tolerance, for its steps (`rlhf.step_recipe`)
        if hasattr(config, "passed_to_steps"):
            config.passed_to_steps = {key: getattr(run, key) for key in module.PASSED_TO_STEPS if key in values}
    recipe = Recipe(stage=stage, values=values, configs=tuple(configs), source=source, run=run)
    recipe.fp32_precision = process_state.fp32_precision()
    problems = value_problems((*recipe.configs, run)) + unread_key_problems(stage, recipe.configs)
    if check_inputs:
        problems += installed_problems((*recipe.configs, run))
        problems += precision_problems(recipe.configs, values) + compile_problems(recipe.configs)
    if check_inputs and not recipe_output_dir(values):
        problems.append("no output_dir: add `output_dir: PATH` to the recipe or give `--output_dir PATH`")
    if check_inputs and recipe_output_dir(values):
        problems += inputs_in_output_dir(values, recipe_output_dir(values))
    if check_inputs and hasattr(module, "check"):
        problems += [  # every problem at once, out-of-range values with the rest
            problem for problem in module.check(*recipe.configs) if not any(path in problem for path in made_later)
        ]
    if problems:
        raise UserError(f"{where} has {_count(problems, 'problem')}: " + "; ".join(problems).rstrip(".") + ".")
    return recipe


# the keys whose value is a model, data or config file or dir the run reads (a hub id where it does not exist)
INPUT_PATH_KEYS = (
    "model_name_or_path", "pretrained_model_name_or_path", "pretrained_vae_name_or_path", "vae_name_or_path",
    "reward_model_path", "value_model_path", "tokenizer_name", "config_name", "chat_template_path", "dataset_name",
    "ptx_dataset_name", "eval_prompts_dataset", "instance_data_dir", "vae_config", "unet_config", "scheduler_config",
    "text_encoder_config", "transformer_config",
)  # fmt: skip


# the other keys whose value is a path: where the run writes (output_dir; dreambooth's class images, made when
# missing), the checkpoint it resumes from, a config file, and an rlhf pipeline's recipes
OTHER_PATH_KEYS = (
    "output_dir", "class_data_dir", "resume_from_checkpoint", "deepspeed", "fsdp_config", "accelerator_config",
    "prerequisite", "sft", "reward", "ppo", "grpo", "rloo", "dpo", "kto", "orpo", "simpo",
)  # fmt: skip
# keys typed `dict | str` whose string is a file path (a DeepSpeed/FSDP/accelerate config file), not a mapping
_CONFIG_FILE_KEYS = ("deepspeed", "fsdp_config", "accelerator_config")
# those whose string transformers can only open as a file (a DeepSpeed string may also be base64 JSON; a missing
# file is refused there with a ValueError naming it)
_CONFIG_FILES_READ_AT_PARSE = ("fsdp_config", "accelerator_config")
# the keys whose value is a path and nothing else (a DeepSpeed, FSDP or accelerate config may be a mapping)
PATH_KEYS = tuple(key for key in (*INPUT_PATH_KEYS, *OTHER_PATH_KEYS) if key not in _CONFIG_FILE_KEYS)
_VARIABLE = re.compile(r"\$(\{\w+\}|[A-Za-z_]\w*)")  # a shell's $NAME or ${NAME}


def unexpanded_variable_problems(values: dict[str, Any], actions: dict) -> list[str]:
    """Path values holding a `$NAME` that names no existing path: a recipe's text is not a shell's, and nothing
    expands it (`~` aside). `output_dir: $SCRATCH/run` trained into a folder literally named '$SCRATCH/run' under the
    working directory, exit 0, where the same variable in a model path was refused."""
    from hfgen.models import relative_to_cwd

    named = [(key, value) for key, value in values.items() if key in (*INPUT_PATH_KEYS, *OTHER_PATH_KEYS)]
    mixture = values.get("datasets")  # (not yet type-checked here) entries are mappings with a name, or names
    for entry in mixture if isinstance(mixture, list) else []:
        named.append(("datasets", entry.get("name") if isinstance(entry, dict) else entry))
    problems = []
    for key, value in named:
        if key not in actions or not isinstance(value, str) or not (found := _VARIABLE.search(value)):
            continue
        if Path(value).expanduser().exists():
            continue  # a path whose name holds a '$' (what nothing would expand either)
        what = "does not exist" if key in INPUT_PATH_KEYS or key == "datasets" else "is used as written"
        # (a mixture's entry has no command-line spelling of its own)
        shell = (
            ""
            if key == "datasets"
            else f', or give it on the command line, where the shell expands it (`--{key} "{value}"`)'
        )
        problems.append(
            f"{key} '{value}' {what}{relative_to_cwd(value)}; $VARIABLES are not expanded in a recipe "
            f"({found.group(0)} stays as written): write the path out{shell}"
        )
    return problems


def inputs_in_output_dir(values: dict[str, Any], output_dir: Path) -> list[str]:
    """The recipe's inputs that a fresh start into its output_dir deletes (the dir itself, or what it clears in it):
    `--output_dir BASE --overwrite_output_dir true` on a model BASE deleted the model before loading it. A glob
    pattern is judged by the folder before its first wildcard, a mixture by each entry's name."""
    from hfgen.tracking import deleted_by_fresh_start

    named = [(key, value) for key, value in values.items() if key in INPUT_PATH_KEYS]
    for entry in values.get("datasets") or []:  # a mixture: entries are mappings with a name, or names
        name = entry.get("name") if isinstance(entry, dict) else entry
        named.append(("datasets", name))
    problems = []
    for key, value in named:
        if not isinstance(value, str) or not value.strip():
            continue
        parts = Path(value).expanduser().parts
        fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
        path = Path(*parts[:fixed]) if fixed else None
        if path is not None and path.exists() and deleted_by_fresh_start(str(path), output_dir):
            problems.append(
                f"key '{key}' ('{value}') is the run's output_dir or inside it, which a fresh start clears before "
                "the run reads it; choose another output_dir"
            )
    return problems


# transformers' deprecated names, read only when the new name is unset: the shipped TRL-stage recipes set
# activation_checkpointing, so a `gradient_checkpointing: true` beside it was ignored without a word
ALIASES = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def precision_spelling(key: str, value, actions: dict) -> str | None:
    """Mixed precision as another stage spells it: the Trainer stages' (and ppo's) `bf16: true` / `fp16: true`,
    the image stages' `mixed_precision: bf16`. The key of this stage that says the same, with its value."""
    text = str(value).lower()
    if key in ("bf16", "fp16") and "mixed_precision" in actions:
        return f"`mixed_precision: {key if text in ('true', '1', 'yes') else 'no'}`"
    if key == "mixed_precision" and "bf16" in actions:
        if text in actions:  # bf16, fp16
            return f"`{text}: true`"
        return "`bf16: false`" if text == "no" else "`bf16: true` (bfloat16 mixed precision)"
    return None


def _alias_conflicts(values: dict[str, Any], actions: dict) -> list[str]:
    """A key and its deprecated alias both set, to different values: which one wins is transformers' rule (the new
    name), which the recipe does not show."""
    from transformers.hf_argparser import string_to_bool

    def normal(value):
        return string_to_bool(str(value)) if isinstance(value, (bool, str)) else value

    problems = []
    for old, new in ALIASES.items():
        if old in actions and new in actions and values.get(old) is not None and values.get(new) is not None:
            if normal(values[old]) != normal(values[new]):
                problems.append(
                    f"keys '{old}' ({' '.join(_to_argv_tokens(values[old]))}) and '{new}' ({' '.join(_to_argv_tokens(values[new]))}) disagree: {old} is transformers' "
                    f"old name of {new}, read only when {new} is unset; set {new} alone"
                )
    return problems


def _revision_problem(values: dict[str, Any]) -> list[str]:
    """TRL's `model_revision` other than main: the policy's weights loaded at that revision, but the tokenizer (its
    chat template, EOS, pad, max length), the checks and the reference/reward models from main, so a run trained one
    revision's weights with another's tokenizer and saved them together; a revision missing from the cache was an
    OSError traceback after the data loaded. A local snapshot dir gives every loader the same files."""
    revision = values.get("model_revision")
    if revision in (None, "main"):
        return []
    return [
        f"key 'model_revision' ('{revision}') is not carried past the model's weights (its tokenizer would come from "
        "main); give model_name_or_path that revision's local dir instead (`hf download ORG/NAME --revision "
        f"{revision}` prints it), and leave model_revision out"
    ]


def _allows_none(dataclass_types, key: str) -> bool:
    """Whether the field `key` may be None: typed Optional (`X | None`), or None by default."""
    import types
    import typing

    for cls in dataclass_types:
        for f in dataclasses.fields(cls):
            if f.name == key and f.init:
                hint = typing.get_type_hints(cls).get(key)
                union = typing.get_origin(hint) in (typing.Union, types.UnionType)
                return f.default is None or (union and type(None) in typing.get_args(hint))
    return False


def _takes_mapping(dataclass_types, key: str) -> bool:
    """Whether the field `key` is keyword arguments or settings (typed `dict`, `dict | str`: its JSON text), which
    the library reads as a mapping (`lr_scheduler_kwargs`, `model_init_kwargs`, `generation_kwargs`, ...)."""
    import typing

    if key in _CONFIG_FILE_KEYS:
        return False
    for cls in dataclass_types:
        for f in dataclasses.fields(cls):
            if f.name == key and f.init:
                hint = typing.get_type_hints(cls).get(key)
                return any(typing.get_origin(t) is dict or t is dict for t in (hint, *typing.get_args(hint)))
    return False


def _mapping_like(value) -> bool:
    """A mapping, or JSON text of one (transformers decodes a `{...}` string), or null."""
    return value is None or isinstance(value, dict) or isinstance(value, str) and value.lstrip().startswith("{")


def _parse_into_dataclasses(parser, argv: list[str], nulls: list[str]) -> tuple:
    """HfArgumentParser.parse_args_into_dataclasses, with the keys in `nulls` set to None before the configs are
    built (argparse has no spelling of None for a typed value), so their __post_init__ checks see the None."""
    from transformers import TrainingArguments

    namespace = parser.parse_args(args=argv)
    for key in nulls:
        setattr(namespace, key, None)
    configs = []
    for cls in parser.dataclass_types:
        keys = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in vars(namespace).items() if k in keys}
        refused = []
        if issubclass(cls, TrainingArguments):
            bf16 = kwargs.get("bf16")
            bf16 = not kwargs.get("fp16") if bf16 is None else bf16  # TRL's configs: unset is bf16 unless fp16
            refused = refused_bf16_keys(bf16, kwargs.get("bf16_full_eval"), kwargs.get("use_cpu"))
        config = cls(**{**kwargs, **dict.fromkeys(refused, False)})
        for key in refused:  # as the recipe asks: `precision_problems` reports it with the recipe's other problems
            setattr(config, key, True)
        configs.append(config)
    return tuple(configs)


def refused_bf16_keys(bf16, bf16_full_eval, use_cpu) -> list[str]:
    """The bf16 keys transformers' TrainingArguments refuses on this machine: bfloat16 without a GPU that has it,
    unless use_cpu. Its __post_init__ raises that alone, before the recipe's other problems are looked for (a GPU
    recipe checked on a laptop said only "Your setup doesn't support bf16/gpu"), so the config is built with them
    off, and `precision_problems` reports them among the rest."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    if use_cpu or is_torch_bf16_gpu_available() or is_torch_xla_available():
        return []
    return [key for key, on in (("bf16", bf16), ("bf16_full_eval", bf16_full_eval)) if on]


SEED_MAX = 2**32 - 1  # the largest seed numpy takes
# Numeric keys of any stage, by name (whichever config holds them): (minimum, maximum, minimum allowed itself).
_AT_LEAST_ONE = (
    "per_device_train_batch_size", "per_device_eval_batch_size", "train_batch_size", "eval_batch_size",
    "gradient_accumulation_steps", "num_ppo_epochs", "num_mini_batches", "total_episodes", "response_length",
    "local_rollout_forward_batch_size", "max_prompt_length", "lora_r", "lora_rank", "block_size", "resolution",
    "max_caption_tokens", "num_inference_steps", "discriminator_channels", "kl_horizon", "max_length",
    "max_completion_length", "eval_response_length", "num_iterations",
)  # fmt: skip
_NON_NEGATIVE = (
    "learning_rate", "num_train_epochs", "warmup_steps", "lr_warmup_steps", "weight_decay", "adam_weight_decay",
    "adam_epsilon", "max_grad_norm", "lora_alpha", "save_steps", "eval_steps", "logging_steps", "sample_steps",
    "save_total_limit", "checkpoints_total_limit", "max_train_samples", "max_eval_samples", "nan_tolerance",
    "num_samples", "eval_samples_per_prompt", "eval_images_per_prompt", "num_validation_images",
    "validation_steps", "text_encoder_pretraining_steps", "adversarial_start_step", "kl_weight", "adversarial_weight",
    "kl_coef", "vf_coef", "cliprange", "cliprange_value", "noise_offset", "dataloader_num_workers", "beta",
    "eval_num_prompts",
)  # fmt: skip
_FRACTIONS = ("lora_dropout", "condition_dropout", "adam_beta1", "adam_beta2", "gamma", "lam", "ema_decay")
BOUNDS = {
    **dict.fromkeys(_AT_LEAST_ONE, (1, None, True)),
    **dict.fromkeys(_NON_NEGATIVE, (0, None, True)),
    **dict.fromkeys(_FRACTIONS, (0, 1, True)),
    "temperature": (0, None, False),
    "eval_temperature": (0, None, False),  # the preference stages' held-out sampling (0 trained, then crashed)
    "top_p": (0, 1, False),
    # numpy's seeds: transformers' and accelerate's set_seed seed np.random with them (a traceback then)
    "seed": (0, SEED_MAX, True),
    "data_seed": (0, SEED_MAX, True),
}


# The float keys whose `inf` means something: TRL's wait for a vLLM server, forever (nan is refused all the same).
INFINITE_ALLOWED = ("vllm_server_timeout",)


def non_finite_problems(config) -> list[str]:
    """Float keys of any stage (and lists of floats: loss_weights, reward_weights) that are nan or inf, which no
    key means: each passed the range checks (nan compares false, inf passes a lower bound) and made a loss NaN at
    the first step (label_smoothing_factor, a coefficient, a weight), a validation image black or silently unguided
    (guidance_scale), or
    its term silently a no-op (snr_gamma: inf clamps no SNR, min-SNR weighting off)."""
    problems = []
    for key in (f.name for f in dataclasses.fields(config)):
        value = getattr(config, key, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        refused = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
        if refused and not (key in INFINITE_ALLOWED and all(v == math.inf for v in refused)):
            problems.append(f"key '{key}' must be a finite number, got {value}")
    return problems


def value_problems(configs) -> list[str]:
    """Numbers no training can run with (a batch of 0, a negative learning rate, no steps at all, a nan or inf),
    named by their recipe keys, before a library rejects them under its own parameter names (LoRA's `r` for
    `lora_r`)."""
    problems = []
    for config in configs:
        problems += non_finite_problems(config)
        for key, (low, high, low_allowed) in BOUNDS.items():
            value = getattr(config, key, None)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue  # (not finite: said above)
            if not (value >= low if low_allowed else value > low) or (high is not None and not value <= high):
                wanted = (
                    f"between {low} and {high}"
                    if high is not None
                    else f"{'at least' if low_allowed else 'above'} {low}"
                )
                problems.append(f"key '{key}' must be {wanted}, got {value}")
        problems += tracker_problems(getattr(config, "report_to", None))
        problems += schedule_problems(config)
        if hasattr(config, "max_steps") and hasattr(config, "num_train_epochs"):  # transformers' TrainingArguments
            if config.max_steps < -1 or config.max_steps == 0:  # transformers trains one step for 0
                problems.append(
                    f"key 'max_steps' must be a number of steps (1 or more), or -1 for num_train_epochs; "
                    f"got {config.max_steps}"
                )
            elif config.max_steps <= 0 and config.num_train_epochs <= 0:
                problems.append(
                    f"max_steps {config.max_steps} and num_train_epochs {config.num_train_epochs} train nothing: set "
                    "max_steps (optimizer steps) or num_train_epochs to a positive number"
                )
    return problems


def schedule_problems(config) -> list[str]:
    """The learning-rate schedule can be built from the recipe: `lr_scheduler_kwargs` fit the function
    `lr_scheduler_type` names (a misspelt or missing argument), cosine_with_min_lr has its floor, polynomial decays
    to an end below the learning rate. transformers checks only when the schedule is built, after the model has
    loaded: a TypeError or ValueError traceback. (The accelerate loops' `lr_scheduler` has no kwargs key.)"""
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    key = next((k for k in ("lr_scheduler_type", "lr_scheduler") if getattr(config, k, None) is not None), None)
    if key is None:
        return []
    try:
        kind = SchedulerType(getattr(getattr(config, key), "value", getattr(config, key)))
    except ValueError:  # (an unknown name: the stage's own check names it)
        return []
    kwargs = getattr(config, "lr_scheduler_kwargs", None) or {}
    has_kwargs = hasattr(config, "lr_scheduler_kwargs")
    if not isinstance(kwargs, dict) or kind in (SchedulerType.CONSTANT, SchedulerType.CONSTANT_WITH_WARMUP):
        return []  # (get_scheduler passes these two no arguments)
    how = (
        "set them with lr_scheduler_kwargs"
        if has_kwargs
        else f"this stage has no lr_scheduler_kwargs key to set them: choose another {key}"
    )
    given = {"optimizer": None, **kwargs}  # what transformers' get_scheduler passes, with the recipe's kwargs
    if kind not in (SchedulerType.REDUCE_ON_PLATEAU, SchedulerType.GREEDY):
        given["num_warmup_steps"] = 0
        if kind != SchedulerType.INVERSE_SQRT:
            given["num_training_steps"] = 1
    parameters = inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[kind]).parameters
    named = [
        name for name in parameters if name not in ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")
    ]
    try:
        inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[kind]).bind(**given)
    except TypeError as error:
        return [
            f"{key} {kind.value} cannot be built from lr_scheduler_kwargs {kwargs}: {error}; its arguments are "
            f"{', '.join(named) or 'none'} ({how})"
        ]
    if kind in (SchedulerType.COSINE_WITH_MIN_LR, SchedulerType.COSINE_WARMUP_WITH_MIN_LR) and not (
        {"min_lr", "min_lr_rate"} & set(kwargs)
    ):
        return [f"{key} {kind.value} needs its floor, min_lr or min_lr_rate ({how})"]
    learning_rate, lr_end = getattr(config, "learning_rate", None), kwargs.get("lr_end", 1e-7)
    if kind == SchedulerType.POLYNOMIAL and isinstance(learning_rate, (int, float)) and not learning_rate > lr_end:
        return [
            f"{key} polynomial decays from learning_rate {learning_rate} to lr_end {lr_end}, which must be smaller: "
            + (
                "set a smaller lr_end with lr_scheduler_kwargs"
                if has_kwargs
                else f"raise learning_rate or choose another {key} (this stage has no lr_scheduler_kwargs key)"
            )
        ]
    return _schedule_build_problems(key, kind, kwargs, given, learning_rate)


def _schedule_build_problems(key: str, kind, kwargs: dict, given: dict, learning_rate) -> list[str]:
    """Values the schedule's function refuses only when it runs (cosine_with_min_lr given both min_lr and
    min_lr_rate, warmup_stable_decay's decay_type cubic, a misspelt argument of reduce_lr_on_plateau, whose function
    takes any name: `given`, the arguments `schedule_problems` bound): it is built here on a throwaway optimizer, as
    the Trainer would build it."""
    import warnings

    import torch
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION

    lr = learning_rate if isinstance(learning_rate, (int, float)) and learning_rate > 0 else 1e-3
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    # (a run's length, for the schedules that take one: its figures are not what is checked here)
    built = {**given, "optimizer": optimizer} | ({"num_training_steps": 100} if "num_training_steps" in given else {})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            TYPE_TO_SCHEDULER_FUNCTION[kind](**built)
    except (TypeError, ValueError, ArithmeticError) as error:  # (inverse_sqrt with timescale 0 divides by it)
        return [f"{key} {kind.value} cannot be built from lr_scheduler_kwargs {kwargs}: {error}"]
    return []


# attn_implementation values a model loads with, and what each needs here (transformers checks when it loads)
_ATTENTION_NEEDS = {
    "flash_attention_2": ("is_flash_attn_2_available", "the flash-attn package and a CUDA GPU"),
    "flash_attention_3": ("is_flash_attn_3_available", "flash-attn 3 (flash_attn_interface) and a Hopper GPU"),
    "flash_attention_4": ("is_flash_attn_4_available", "flash-attn 4 and a recent NVIDIA GPU"),
    "flex_attention": ("is_torch_flex_attn_available", "a torch with flex attention"),
}


# transformers' optimizer groups (trainer_optimizer.py) whose package is optional: (its availability check in
# transformers.utils, what to install). transformers checks only once the model has loaded and the Trainer is built.
_OPTIMIZER_PACKAGES = {
    "_BITSANDBYTES_OPTIMIZERS": ("is_bitsandbytes_available", "bitsandbytes (pip install bitsandbytes; a CUDA GPU)"),
    "_TORCHAO_OPTIMIZERS": ("is_torchao_available", "torchao (pip install torchao)"),
    "_GALORE_OPTIMIZERS": ("is_galore_torch_available", "galore-torch (pip install galore-torch)"),
    "_APOLLO_OPTIMIZERS": ("is_apollo_torch_available", "apollo-torch (pip install apollo-torch)"),
    "_SCHEDULE_FREE_OPTIMIZERS": ("is_schedulefree_available", "schedulefree (pip install schedulefree)"),
}
# the single optimizers with an optional package: (optim value, availability check or module, what to install)
_OPTIMIZER_MODULES = {
    "lomo": ("is_lomo_available", "lomo-optim (pip install lomo-optim)"),
    "adalomo": ("is_lomo_available", "lomo-optim (pip install lomo-optim)"),
    "grokadamw": ("is_grokadamw_available", "grokadamw (pip install grokadamw)"),
    "stable_adamw": ("is_torch_optimi_available", "torch-optimi (pip install torch-optimi)"),
    "adamw_anyprecision": ("torchdistx", "torchdistx (github.com/pytorch/torchdistx)"),
    "adamw_torch_xla": ("torch_xla", "torch_xla (a TPU)"),
    "adamw_torch_npu_fused": ("torch_npu", "torch_npu (an Ascend NPU)"),
}


def optimizer_problems(optim) -> list[str]:
    """`optim` names an optimizer whose package is installed here: transformers imports it only when the Trainer
    builds its optimizer, after the model has loaded (an ImportError traceback, a half-written run dir)."""
    import transformers.trainer_optimizer as optimizers
    import transformers.utils

    if optim is None:
        return []
    name = getattr(optim, "value", optim)
    needs = dict(_OPTIMIZER_MODULES)
    for group, need in _OPTIMIZER_PACKAGES.items():
        needs |= {getattr(member, "value", member): need for member in getattr(optimizers, group, [])}
    if name not in needs:
        return []
    check, package = needs[name]
    available = getattr(transformers.utils, check, None)
    installed = available() if available else importlib.util.find_spec(check) is not None
    if installed:
        return []
    return [
        f"key 'optim': {name} needs {package}, which is not installed here; use adamw_torch (or leave optim out: adamw_torch_fused)"
    ]


def installed_problems(configs) -> list[str]:
    """Keys that need a package (or hardware) this machine lacks, said before any model loads; checked where the
    recipe is to run (not when a finished run's recipe is read back)."""
    import torch

    problems = []
    for config in configs:
        problems += attention_problems(getattr(config, "attn_implementation", None))
        # (a handler that cannot import its package cannot say which optim_args it reads)
        problems += optimizer_problems(getattr(config, "optim", None)) or optim_args_problems(config)
        if getattr(config, "activation_offloading", False) and (
            torch.accelerator.current_accelerator() is None or getattr(config, "use_cpu", False)
        ):  # TRL moves activations from the accelerator to the CPU: without one it crashed once training started
            problems.append(
                "key 'activation_offloading': true needs a GPU (it offloads the GPU's activations to CPU memory), "
                f"and {'use_cpu: true runs on the CPU' if getattr(config, 'use_cpu', False) else 'none is visible'}; "
                "set activation_offloading: false"
            )
        if getattr(config, "use_liger_kernel", False) and importlib.util.find_spec("liger_kernel") is None:
            problems.append(
                "key 'use_liger_kernel': true needs the liger-kernel package, which is not installed here "
                "(pip install liger-kernel); or set use_liger_kernel: false"
            )
    return problems


def training_precision(configs) -> tuple[str, str] | None:
    """(the mixed precision a run of `configs` trains in: no, bf16 or fp16; the recipe setting that decides it), as
    each stage sets it: the image stages' `mixed_precision`; in the other stages a half `dtype` (or `auto` on a
    half-precision checkpoint) trained in full, which trains float32 weights in that dtype's mixed precision
    (`finetune.keep_float32_weights`, PPO's `rl.models.training_precision`), else `bf16` / `fp16`. None for a
    stage that trains nothing itself (rlhf: its steps are checked one by one)."""
    from hfgen.finetune import loaded_dtype
    from hfgen.rl.models import HALF_PRECISION

    def holding(key):  # the config with the field `key` (TrainingArguments sets a mixed_precision of its own)
        return next((config for config in configs if key in {f.name for f in dataclasses.fields(config)}), None)

    if (loop := holding("mixed_precision")) is not None:
        return loop.mixed_precision, f"mixed_precision: {loop.mixed_precision}"
    training, model = holding("bf16"), holding("dtype")
    if training is None:
        return None
    # LoRA keeps its base in the dtype (not mixed precision); DeepSpeed keeps its own float32 master weights
    full = model is not None and not getattr(model, "use_peft", False)
    if full and getattr(training, "deepspeed_plugin", None) is None:
        dtype = loaded_dtype(model)
        half = HALF_PRECISION.get(dtype)
        if half:
            return half, f"dtype: {model.dtype}" + (f" (the checkpoint's {dtype})" if model.dtype == "auto" else "")
    if training.bf16:
        return "bf16", "bf16: true"
    if getattr(training, "fp16", False):
        return "fp16", "fp16: true"
    return "no", "bf16: false"


def precision_problems(configs, values: dict | None = None) -> list[str]:
    """The recipe decides the precision of every stage, which trains in it or says why not (`values`: the ones the
    recipe sets, `Recipe.values`):
    - a half `dtype` trained in full decides the mixed precision (`training_precision`): `fp16: true` beside a
      bfloat16 one, or a `bf16: true` the recipe sets beside a float16 one, would be dropped without a word (TRL's
      default bf16, which the recipe leaves out, is not the recipe's ask);
    - fp16 mixed precision without a CUDA GPU (or with use_cpu) would run float32 without a word (accelerate has no
      fp16 autocast on CPU), the image stages' rule (`diffusion.training.check_loop_arguments`) for every stage;
    - bf16 in the Trainer stages without a GPU that has it, unless use_cpu (`refused_bf16_keys`);
    - a launch asking for another precision (`accelerate launch --mixed_precision`, the mixed_precision of its
      config, the default config's too: ACCELERATE_MIXED_PRECISION) would override the recipe in the Trainer stages
      and be ignored by ppo, vae and t2i, silently either way. A launch asking for none ("no", accelerate's
      default) leaves it to the recipe."""
    import torch
    from accelerate.utils import parse_flag_from_env
    from transformers import TrainingArguments

    problems = []
    for config in configs:
        if isinstance(config, TrainingArguments):
            for key in refused_bf16_keys(config.bf16, config.bf16_full_eval, config.use_cpu):
                where = (
                    "this CUDA GPU has none: Ampere or newer has" if torch.cuda.is_available() else "no GPU is visible"
                )
                problems.append(
                    f"{key}: true trains in bfloat16, which needs a GPU that supports it ({where}); set {key}: false "
                    f"to train in float32 (TRL's stages turn bf16 on unless the recipe says false), or use_cpu: true "
                    "to train in bf16 on the CPU"
                )
    resolved = training_precision(configs)
    if resolved is None:
        return problems
    precision, setting = resolved
    if setting.startswith("dtype"):
        other = {"bf16": "fp16", "fp16": "bf16"}[precision]
        other_dtype = {"bf16": "bfloat16", "fp16": "float16"}[other]
        if (values or {}).get(other) is True:
            problems.append(
                f"{setting} trained in full trains float32 weights in {precision} mixed precision, but the recipe "
                f"also sets {other}: true, which would be dropped: set {other}: false to train in {precision}, or "
                f"dtype: float32 (or {other_dtype}) to train in {other}"
            )
    on_cpu = any(getattr(config, "use_cpu", False) for config in configs) or parse_flag_from_env("ACCELERATE_USE_CPU")
    if precision == "fp16" and (on_cpu or not torch.cuda.is_available()):
        where = "use_cpu runs on the CPU" if on_cpu else "no CUDA GPU is visible"
        problems.append(
            f"{setting} trains in fp16 mixed precision, which needs a CUDA GPU ({where}: it would train float32 "
            "instead); use bf16 or no on CPU"
        )
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if asked not in ("no", precision):
        problems.append(
            f"the launch asks for mixed precision {asked} (ACCELERATE_MIXED_PRECISION={asked}: `accelerate launch "
            f"--mixed_precision {asked}`, or mixed_precision: {asked} in its config or the default accelerate config) "
            f"but the recipe trains in {precision if precision != 'no' else 'float32 (no mixed precision)'} ({setting}); "
            f"the recipe decides precision: set the recipe to {asked}, or launch with --mixed_precision {precision}"
        )
    return problems


def compile_problems(configs) -> list[str]:
    """The recipe decides whether the model is compiled: a launch asking for torch.compile (`accelerate launch
    --dynamo_backend`, the dynamo_config of its config or of the default accelerate config, which `accelerate config`
    writes when asked to "optimize with torch dynamo": ACCELERATE_DYNAMO_BACKEND) compiled it although the recipe says
    torch_compile: false (accelerate's TorchDynamoPlugin reads the variable when the Trainer has no backend to pass,
    and `loop.make_accelerator`'s stages pass none), silently: minutes of compiling before the first step. A recipe
    with torch_compile: true compiles with its own torch_compile_backend (the Trainer passes it), whatever the launch
    asks. A launch asking for "no" (accelerate's default) leaves it to the recipe."""
    from transformers import TrainingArguments

    asked = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").strip().lower()
    if asked == "no" or training_precision(configs) is None:  # a stage that trains nothing itself: rlhf's steps
        return []
    launch = (
        f"ACCELERATE_DYNAMO_BACKEND={asked}: `accelerate launch --dynamo_backend {asked}`, or dynamo_backend: "
        f"{asked.upper()} in the dynamo_config of its config or the default accelerate config"
    )
    without = "launch without it (--dynamo_backend no, or no dynamo_config in the accelerate config)"
    trainer = next((config for config in configs if isinstance(config, TrainingArguments)), None)
    if trainer is None:
        return [
            f"the launch asks to compile the model with torch.compile ({launch}) but this stage's training loop is "
            f"not compiled (it has no torch_compile key); {without}"
        ]
    if not trainer.torch_compile:
        return [
            f"the launch asks to compile the model with torch.compile ({launch}) but the recipe has torch_compile: "
            f"false; the recipe decides: set torch_compile: true (and torch_compile_backend: {asked}) in it, or "
            f"{without}"
        ]
    return []


def attention_problems(name: str | None) -> list[str]:
    """`attn_implementation` names a kernel transformers knows (or a hub kernel, `org/repo`, with the kernels
    package), whose package is installed: otherwise the run stops with a traceback once the model is built."""
    import transformers.utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not name:
        return []
    if "/" in name:  # a kernel from the hub (transformers' `kernels` integration)
        if transformers.utils.is_kernels_available():
            return []
        return [
            f"key 'attn_implementation': '{name}' is a hub kernel, which needs the kernels package (pip install kernels)"
        ]
    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if name not in known:
        return [
            f"key 'attn_implementation': '{name}' is not an attention kernel{_suggest(name, known)}; choose from {', '.join(known)}"
        ]
    check, needs = _ATTENTION_NEEDS.get(name.removeprefix("paged|"), (None, None))
    if check and not getattr(transformers.utils, check)():
        return [f"key 'attn_implementation': {name} needs {needs}, not available here; use sdpa (or eager)"]
    return []


def tracker_problems(report_to) -> list[str]:
    """`report_to` names trackers that exist (transformers' integrations, or accelerate's for the accelerate-loop
    stages) and are installed: otherwise the run would stop with a traceback once the model is built."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [name for name in names if name not in ("none", "all")]
    if not names:
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    known = sorted({*INTEGRATION_TO_CALLBACK, *LOGGER_TYPE_TO_CLASS})
    installed = {*get_available_reporting_integrations(), *(n for n in ("aim",) if importlib.util.find_spec(n))}
    problems = []
    for name in names:
        if name not in known:
            problems.append(
                f"key 'report_to': '{name}' is not a tracker{_suggest(name, known)}; choose from {', '.join(known)}, or none"
            )
        elif name not in installed:
            problems.append(
                f"key 'report_to': tracker '{name}' is not installed here; install it or set report_to: none"
            )
    return problems


def _check_value(action: argparse.Action, tokens: list[str]) -> str | None:
    """Type-check one key's tokens the way argparse would, so all bad keys are reported together."""
    takes_list = action.nargs in ("+", "*")
    if not takes_list and len(tokens) != 1:
        return f"expected one value, got {len(tokens)}: {tokens}"
    for token in tokens:
        try:
            converted = action.type(token) if action.type else token
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            type_name = getattr(action.type, "__name__", "value")
            return f"invalid {type_name} value '{token}'"
        if action.choices is not None and converted not in action.choices:
            return f"'{token}' is not one of {list(action.choices)}"
    return None


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}"
