"""Dataset layouts, declared not guessed: converters from the layouts people have (Alpaca, Dolly, ShareGPT, chat
`messages`, prompt/completion, preference pairs, prompt-only, unpaired preferences) to the standard columns TRL's
trainers read, and one policy for bad rows.

    to_standard(dataset, kind, format=None, columns=None, source="data.jsonl") -> (dataset, report)

`kind` is what the stage trains on:

    text                 text                                   (pretraining)
    sft                  text | prompt, completion | messages   (SFT)
    preference           [prompt,] chosen, rejected             (reward models, DPO-style stages)
    prompt               prompt: a string or chat messages      (PPO, GRPO-style stages)
    unpaired_preference  prompt, completion, label              (KTO-style stages)

`format` names the layout (`dataset_format:` in a recipe); without it the layout is detected, and only when the
columns leave one choice. `columns` maps the layout's column names to the file's (`dataset_columns:`), e.g.
`{prompt: instruction, completion: output}` or, for Alpaca with other names, `{output: answer}`.

Bad rows: a row that lacks a required value (null, a missing JSON key) breaks the file: UserError naming the file,
row and column, since training on it would silently train on something else. Rows that are merely unusable (empty
text, an empty line of a CSV or text file, preference pairs with chosen equal to rejected) are dropped and counted
in the report; too many such pairs (over MAX_IDENTICAL_PAIRS of the file) is a UserError, since that is a broken
export rather than noise.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field

from hfgen.errors import UserError

KINDS = ("text", "sft", "preference", "prompt", "unpaired_preference")
MAX_IDENTICAL_PAIRS = 0.10  # a larger share of chosen == rejected pairs refuses the file
IDENTICAL = "chosen equal to rejected"  # the drop reason of such pairs
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SHAREGPT_ROLES |= {"chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant"}
SHAREGPT_ROLES |= {"function_call": "assistant", "observation": "tool"}  # LLaMA-Factory's tool turns (glaive)
# A turn's role under either key (`role` or ShareGPT's `from`): the roles chat templates render, kept as they are, and
# ShareGPT's speaker names (`{"role": "human"}` reached the template as an unknown role: Qwen's drops such a turn)
ROLE_NAMES = {role: role for role in ("tool", "ipython", "developer")} | SHAREGPT_ROLES
# OpenAI's legacy function calling: a `function` turn holds a function's result, what templates render as a `tool`
# turn (Qwen's renders no `function` role: the result vanished); the assistant's `function_call` becomes `tool_calls`
ROLE_NAMES |= {"function": "tool"}
# Per-turn training flags other formats write (axolotl's `weight: 0`, `train: false`): hfgen trains every assistant
# turn, so a conversation that marks an ASSISTANT turn as not trained is refused rather than trained whole (system and
# user turns are never trained: SlimOrca-style files mark them `weight: 0` and load). The values that say "not
# trained", compared exactly: a float such as a logged per-turn figure (0.0) is not a flag.
TURN_TRAINING_FLAGS = ("weight", "train", "training")


def _marked_untrained(value) -> bool:
    """Whether a per-turn flag's value says "not trained": False, the int 0, or the words false/no."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value == 0
    return isinstance(value, str) and value.strip().lower() in ("false", "no")


# Function definitions beside chat turns (OpenAI's, TRL's and LLaMA-Factory's `tools` column: a list, or its JSON
# text): kept with each row as JSON text, which TRL's SFT, DPO and KTO trainers read per row and hand the chat template
# (Qwen's writes them into its system turn). Dropped, the model trained to call functions its prompt never declared.
TOOLS_COLUMN = "tools"
STAGES_READING_TOOLS = ("sft", "dpo", "kto")


@dataclass(frozen=True)
class Format:
    """A dataset layout: the columns it needs, the ones it may have, the kinds it feeds, and its converter from
    one row to rows of each kind (None when the row is unusable, with the reason in `drop_reason`)."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    describe: str = ""


FORMATS = {
    f.name: f
    for f in (
        Format("text", ("text",), (), ("text", "sft", "prompt"), "one text per row; for prompts, one prompt per row"),
        Format("alpaca", ("instruction", "output"), ("input",), ("sft", "prompt"), "instruction, input, output"),
        Format("dolly", ("instruction", "response"), ("context",), ("sft", "prompt"), "instruction, context, response"),
        Format(
            "sharegpt",
            ("conversations",),
            ("system",),
            ("sft", "prompt"),
            "conversations of {from, value} (or {role, content}) turns",
        ),
        Format("messages", ("messages",), (), ("sft", "prompt"), "messages of {role, content} turns"),
        Format("prompt_completion", ("prompt", "completion"), (), ("sft", "prompt"), "prompt and completion"),
        Format(
            "preference",
            ("chosen", "rejected"),
            ("prompt", "conversations"),
            ("preference", "unpaired_preference", "prompt"),  # (KTO unpairs pairs itself)
            "[prompt (or LLaMA-Factory's conversations),] chosen, rejected: text or chat turns",
        ),
        Format("prompt", ("prompt",), (), ("prompt",), "a prompt: text or chat messages"),
        Format(
            "unpaired_preference",
            ("prompt", "completion", "label"),
            (),
            ("unpaired_preference", "sft", "prompt"),
            "prompt, completion, label (true = desirable)",
        ),
    )
}
# The columns a kind reads as they are: when they are present the data is already standard.
STANDARD = {
    "text": [("text",)],
    "sft": [("messages",), ("prompt", "completion"), ("text",)],
    "preference": [("chosen", "rejected")],
    "prompt": [("prompt",)],
    "unpaired_preference": [("prompt", "completion", "label")],
}
STANDARD_FORMAT = {("text",): "text", ("messages",): "messages", ("prompt", "completion"): "prompt_completion"}
STANDARD_FORMAT |= {("chosen", "rejected"): "preference", ("prompt",): "prompt"}
STANDARD_FORMAT |= {("prompt", "completion", "label"): "unpaired_preference"}


@dataclass
class DataReport:
    """What conversion did to one split: its layout, rows read and kept, rows dropped by reason, notes."""

    source: str
    format: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    # the kept rows' numbers in the file (counted from 1), for messages about a row found after conversion (not in
    # data.json): the split's rows are shuffled by the held-out slice
    file_rows: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "format": self.format,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "dropped": dict(self.dropped),
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {reason}" for reason, n in self.dropped.items())
        return f"{self.rows_kept} of {self.rows_read} rows ({self.format})" + (
            f"; dropped {dropped}" if dropped else ""
        )


# ---- choosing the layout ------------------------------------------------------------------------------


def detect_format(column_names: list[str], kind: str, source: str) -> str:
    """The layout of a dataset with these columns, for `kind`: its standard columns when present, else the one
    layout whose required columns are there (a layout needing more columns beats one needing a subset of them)."""
    present = set(column_names)
    standard = [cols for cols in STANDARD[kind] if present >= set(cols)]
    richer = [f for f in FORMATS.values() if kind in f.kinds and f.name != "text" and present >= set(f.required)]
    if standard == [("text",)] and kind != "text" and richer:
        standard = []  # a `text` column beside a richer layout is its rendering (tatsu-lab/alpaca's): the layout wins
    if len(standard) == 1 or (kind == "text" and standard):
        return STANDARD_FORMAT[standard[0]]
    candidates = [f for f in FORMATS.values() if kind in f.kinds and present >= set(f.required)]
    if len(candidates) > 1:  # a `text` column beside a richer layout is its rendering (tatsu-lab/alpaca's)
        candidates = [f for f in candidates if f.name != "text"]
    if len(standard) > 1:
        candidates = [FORMATS[STANDARD_FORMAT[cols]] for cols in standard]
    widest = [f for f in candidates if not any(set(f.required) < set(g.required) for g in candidates)]
    if len(widest) == 1:
        return widest[0].name
    suitable = ", ".join(f"{f.name} ({f.describe})" for f in FORMATS.values() if kind in f.kinds)
    if not widest and kind == "preference" and present >= set(FORMATS["unpaired_preference"].required):
        raise UserError(
            f"dataset '{source}' holds unpaired rows (prompt, completion, label: thumbs up or down), and this stage "
            "needs pairs (chosen, rejected) of answers to one prompt; the kto stage trains on unpaired rows"
        )
    if not widest:
        example = (
            f"{{text: {column_names[0]}}} (or the stage's text_column)"
            if kind == "text"
            else "{prompt: question, completion: answer}"
        )
        raise UserError(
            f"dataset '{source}' has columns {column_names}, which match no {kind} layout; set dataset_format to "
            f"one of: {suitable}; and dataset_columns to map other column names, e.g. dataset_columns: {example}"
        )
    raise UserError(
        f"dataset '{source}' has columns {column_names}, which fit several {kind} layouts "
        f"({', '.join(f.name for f in widest)}); set dataset_format to the one meant"
    )


# the recipe keys whose text may be pairs written `a=b,c=d`, one setting: dataset_columns' mapping (`parse_columns`)
# and optim_args, which transformers splits on its commas into the optimizer's arguments
# (trainer_optimizer._parse_optim_args); `hfgen sweep` takes such a value for one setting, not for an axis of the grid
PAIRS_TEXT_KEYS = ("dataset_columns", "optim_args")


def parse_columns(value) -> dict[str, str]:
    """`dataset_columns` from a recipe: a mapping (YAML or JSON) or `a=b,c=d`, LAYOUT_NAME -> FILE_COLUMN."""
    import json

    if not value:
        return {}
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                raise UserError(f"dataset_columns '{value}' is not a valid mapping: {error}") from None
        else:
            pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise UserError(f"dataset_columns '{value}': write a mapping, e.g. {{prompt: instruction}}")
            value = {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        # (YAML 1.1 reads a column named `yes`, `no`, `on`, `off`, `0755` or `12:30` as another type)
        quote = next((f"; '{k}' is {type(v).__name__} {v!r} (YAML 1.1's reading of an unquoted word): quote the column "
                      f'name, `{k}: "..."`' for k, v in value.items()
                      if not isinstance(v, str)), "") if isinstance(value, dict) else ""  # fmt: skip
        raise UserError(f"dataset_columns must map a layout's column names to the file's, got {value!r}{quote}")
    return dict(value)


# ---- conversion --------------------------------------------------------------------------------------------


def _is_empty(value) -> bool:
    """No text: None, blank text, or chat turns none of which says anything (`[{role: assistant, content: ""}]`
    as a completion would train the model to answer with nothing, as an empty text completion would). A turn that
    calls a tool (`tool_calls`, content null) says something: the call is the answer the template renders."""
    if isinstance(value, list):
        return all(isinstance(turn, dict) and _is_empty(_turn_text(turn)) and not _calls(turn) for turn in value)
    return value is None or (isinstance(value, str) and not value.strip())


def _calls(turn: dict) -> bool:
    """Whether a chat turn calls a tool (OpenAI's `tool_calls`, its legacy `function_call`)."""
    return bool(turn.get("tool_calls") or turn.get("function_call"))


def _holds_empty_answer(turns) -> bool:
    """Chat turns with an assistant turn that says nothing and calls no tool among others that do: trained, it
    teaches the model to end its answer at once (as a lone empty completion would, `_is_empty`)."""
    return isinstance(turns, list) and any(
        isinstance(turn, dict) and turn.get("role") == "assistant" and _is_empty([turn]) for turn in turns
    )


def _turn_text(turn: dict):
    return next((turn[content] for _, content in TURN_KEYS if content in turn), None)


# A turn's (speaker, text) keys: ShareGPT's and OpenAI's. Files mix them up (a `conversations` column of
# {role, content} turns is common), and either is read in either layout.
TURN_KEYS = (("from", "value"), ("role", "content"))


def _text(value, row: int, column: str, source: str):
    """A text field's value as text: numbers (a CSV column of figures, a JSON answer written as 42) become their
    text, as a tokenizer needs; any other value that is not text (true, an object, a list where text belongs) breaks
    the file, named by row and column. None stays None (the empty-value rules handle it)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    raise UserError(
        f"dataset '{source}' row {row + 1}, column '{column}': {type(value).__name__} value {str(value)[:60]!r} "
        "where text belongs; write it as text, or map another column (dataset_columns)"
    )


def _content(turn: dict, key: str, row: int, column: str, source: str) -> str:
    """A turn's content as text: OpenAI's list of parts ([{type: text, text: ...}]) joined; an assistant turn that
    only calls tools (content null beside tool_calls) is empty text. Non-text parts (images) break the file: the
    text stages train text models."""
    content = turn.get(key)
    if content is None and turn.get("tool_calls"):
        return ""
    if isinstance(content, list):
        if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
            kinds = sorted(
                {str(part.get("type")) if isinstance(part, dict) else type(part).__name__ for part in content}
            )
            raise UserError(
                f"dataset '{source}' row {row + 1}, column '{column}': a turn's content has parts of type "
                f"{kinds}; the text stages take text parts only ({{type: text, text: ...}})"
            )
        return "\n".join(_text(part.get("text"), row, column, source) or "" for part in content)
    return _text(content, row, column, source)


# Keys a chat turn keeps besides role and content: tool calls and tool results, which chat templates render.
TOOL_KEYS = ("tool_calls", "tool_call_id", "name")


def _turns(row: int, column: str, turns, role_key: str, content_key: str, source: str) -> list[dict]:
    """Chat turns as {role, content} (with their tool calls, if any; from their JSON text too); a turn without its
    role or content breaks the file, and so does text where turns belong."""
    turns = _json_turns(turns)
    if isinstance(turns, str):  # (was read character by character: "turn 1 lacks 'role' or 'content' ('[')")
        raise UserError(
            f"dataset '{source}' row {row + 1}, column '{column}': text ({turns[:60]!r}) where a list of chat turns "
            f"belongs; write the turns as a list of {{{role_key}, {content_key}}} objects (JSON text of one in a CSV)"
        )
    messages = []
    for i, turn in enumerate(turns):
        pairs = ((role_key, content_key), *TURN_KEYS) if isinstance(turn, dict) else ()  # the layout's keys first
        speaker, text = next(
            (
                (s, t)
                for s, t in pairs
                if turn.get(s) is not None
                and (turn.get(t) is not None or (t in turn and (turn.get("tool_calls") or turn.get("function_call"))))
            ),
            (None, None),
        )
        if speaker is None:
            raise UserError(
                f"dataset '{source}' row {row + 1}, column '{column}': turn {i + 1} lacks '{role_key}' or "
                f"'{content_key}' ({turn!r})"
            )
        role = ROLE_NAMES.get(str(turn[speaker]).lower())
        if role is None:
            raise UserError(
                f"dataset '{source}' row {row + 1}, column '{column}': turn {i + 1} has the unknown {speaker} "
                f"'{turn[speaker]}'; known: {', '.join(ROLE_NAMES)}"
            )
        if role == "assistant" and (untrained := [k for k in TURN_TRAINING_FLAGS if _marked_untrained(turn.get(k))]):
            raise UserError(
                f"dataset '{source}' row {row + 1}, column '{column}': turn {i + 1} is marked not to be trained "
                f"({untrained[0]}: {turn[untrained[0]]!r}); hfgen trains every assistant turn of a conversation "
                "(TRL's assistant mask has no per-turn flag). Drop such turns, or cut the conversation before them"
            )
        message = {"role": role, "content": _content(turn, text, row, column, source)}
        if speaker == "from" and str(turn[speaker]).lower() == "function_call" and (call := _tool_call(message)):
            message = {"role": "assistant", "content": "", "tool_calls": [call]}
        if turn.get("function_call") and not turn.get("tool_calls"):  # OpenAI's legacy call (the call was lost)
            if (call := _tool_call({"content": turn["function_call"]})) is None:
                raise UserError(
                    f"dataset '{source}' row {row + 1}, column '{column}': turn {i + 1}'s function_call "
                    f"{turn['function_call']!r} is not a call ({{name, arguments}})"
                )
            message["tool_calls"] = [call]
        messages.append(message | {key: turn[key] for key in TOOL_KEYS if turn.get(key) is not None})
    return messages


LABEL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}
LABEL_WORDS |= {"desirable": True, "undesirable": False, "good": True, "bad": False}


def _label(value, row: int, source: str) -> bool:
    """A KTO label: true/false, 1/0, or such a word; anything else breaks the file (`bool("no")` is True: a file
    of text labels trained every row as desirable)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    raise UserError(
        f"dataset '{source}' row {row + 1}, column 'label': {value!r} is not a label; write true (desirable) or false "
        f"(undesirable), 1/0, or one of {', '.join(LABEL_WORDS)}"
    )


def _tool_call(message: dict) -> dict | None:
    """A ShareGPT `function_call` turn's JSON ({"name": ..., "arguments": ...}; or OpenAI's legacy `function_call`
    object) as an OpenAI tool call, which chat templates render; None when it is not such JSON (the turn then stays
    text)."""
    import json

    try:
        call = message["content"] if isinstance(message["content"], dict) else json.loads(message["content"])
    except (TypeError, ValueError):
        return None
    if not isinstance(call, dict) or "name" not in call:
        return None
    arguments = call.get("arguments", {})
    with contextlib.suppress(TypeError, ValueError):  # OpenAI writes them as JSON text; templates `tojson` them
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    return {"type": "function", "function": {"name": call["name"], "arguments": arguments}}


def _instruction_prompt(instruction: str, extra: str | None) -> str:
    """Alpaca and Dolly as plain prompt/completion: the instruction, then its input or context, then a blank line."""
    return instruction + (f"\n\n{extra}" if extra and extra.strip() else "") + "\n\n"


def _prompt_of(messages: list[dict]) -> list[dict] | None:
    """A conversation's prompt: its turns up to the last user turn."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    return messages[: last + 1] if last is not None else None


# The layouts' columns that hold text, and those of them that may hold chat turns instead.
CHAT_COLUMNS = ("prompt", "completion", "chosen", "rejected", "conversations", "messages")
TEXT_COLUMNS = (*CHAT_COLUMNS, "text", "instruction", "input", "output", "context", "response", "system")


def _standard_row(fmt: str, kind: str, row: dict, index: int, source: str) -> dict | str:
    """One row in the kind's standard columns, or the reason it is unusable (a string)."""
    # every text value as text; chat turns (lists, LLaMA-Factory's one-turn dicts) and other columns as they are
    chat = (list, dict)
    row = {
        column: _text(value, index, column, source)
        if column in TEXT_COLUMNS and not (column in CHAT_COLUMNS and isinstance(value, chat))
        else value
        for column, value in row.items()
    }
    if fmt == "text":  # a prompt file of one prompt per line reads as text: each line is a prompt
        return {"prompt" if kind == "prompt" else "text": row["text"]} if not _is_empty(row["text"]) else "empty text"
    if fmt in ("alpaca", "dolly"):
        answer, extra = ("output", "input") if fmt == "alpaca" else ("response", "context")
        if _is_empty(row["instruction"]) or (kind == "sft" and _is_empty(row[answer])):
            return "empty text"
        prompt = _instruction_prompt(row["instruction"], row.get(extra))
        return {"prompt": prompt} if kind == "prompt" else {"prompt": prompt, "completion": row[answer]}
    if fmt in ("sharegpt", "messages"):
        column, role_key, content_key = (
            ("conversations", "from", "value") if fmt == "sharegpt" else ("messages", "role", "content")
        )
        messages = _turns(index, column, row[column], role_key, content_key, source)
        if fmt == "sharegpt" and row.get("system") and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": row["system"]}] + messages
        if kind == "prompt":
            prompt = _prompt_of(messages)
            return {"prompt": prompt} if prompt else "no user turn"
        if not any(m["role"] == "assistant" and not _is_empty([m]) for m in messages):
            return "no assistant turn"
        if _holds_empty_answer(messages):
            return "empty text"
        return {"messages": messages}
    if fmt == "prompt_completion" or fmt == "unpaired_preference":
        if _is_empty(row["prompt"]) or (kind != "prompt" and _is_empty(row["completion"])):
            return "empty text"
        if kind == "prompt":  # turns read as every layout reads them ({from, value} too; a broken turn by row)
            return {"prompt": _chat_or_text(row["prompt"], index, "prompt", source)}
        standard = {"prompt": row["prompt"], "completion": row["completion"]}
        if isinstance(row["prompt"], chat) or isinstance(row["completion"], chat):
            # chat turns on one side and text on the other (a chat prompt with a text answer): the text becomes one
            # turn, as for preference pairs; TRL needs both in one form (it fails on, or concatenates, a mixed row)
            standard = {
                "prompt": _chat_or_text(row["prompt"], index, "prompt", source),
                "completion": _chat_or_text(row["completion"], index, "completion", source),
            }
            for column, role in (("prompt", "user"), ("completion", "assistant")):
                if isinstance(standard[column], str):
                    standard[column] = [{"role": role, "content": standard[column]}]
            if _holds_empty_answer(standard["completion"]):
                return "empty text"
        return standard | ({"label": _label(row["label"], index, source)} if kind == "unpaired_preference" else {})
    if fmt == "preference":
        return _preference_row(kind, row, index, source)
    if fmt == "prompt":
        return (
            {"prompt": _chat_or_text(row["prompt"], index, "prompt", source)}
            if not _is_empty(row["prompt"])
            else "empty prompt"
        )
    raise KeyError(fmt)


def is_text_beside_conversations(row: dict) -> bool:
    """UltraFeedback-binarized's layout: a text prompt beside whole conversations (user turn included). The
    conversations are the pair; the shared turns before the answers are TRL's implicit prompt, and the text
    prompt is dropped (TRL would read the pair as text, since its prompt is)."""
    chosen = row.get("chosen")
    return (
        isinstance(row.get("prompt"), str)
        and isinstance(chosen, list)
        and any(isinstance(turn, dict) and turn.get("role") == "user" for turn in chosen)
    )


def _json_turns(value):
    """Chat turns written as JSON text (a CSV cell can hold them no other way) as a list, else the value as it is."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            turns = json.loads(value)
        except ValueError:
            return value
        if (
            isinstance(turns, list)
            and turns
            and all(isinstance(turn, dict) and any(s in turn and t in turn for s, t in TURN_KEYS) for turn in turns)
        ):
            return turns
    return value


def _chat_or_text(value, index: int, column: str, source: str):
    """A preference column's value: text as it is; chat turns (either pair of keys, or the one turn dict
    LLaMA-Factory writes for `chosen`/`rejected`, or their JSON text) as {role, content} turns."""
    value = _json_turns(value)
    if isinstance(value, dict):
        value = [value]
    return _turns(index, column, value, "role", "content", source) if isinstance(value, list) else value


DIFFERENT_PROMPTS = "chosen and rejected start with different prompts"
TURN_MARKER = re.compile(r"\n\n(Human|Assistant|User|System):")  # a dialogue turn of HH-RLHF-style text pairs


def prompts_differ(chosen, rejected) -> bool:
    """Whether an implicit-prompt pair's chosen and rejected part before their prompt ends (different questions:
    rows misaligned in an export): TRL's implicit prompt, their shared start, would then be a part of a prompt (no
    turn at all, or HH-RLHF's bare '\n\nHuman:') and both answers would start with the rest of their prompts. In
    conversations an answer then starts with a turn that is not the assistant's; in text, with a dialogue turn."""
    import os

    if isinstance(chosen, list) != isinstance(rejected, list) or _is_empty(chosen) or _is_empty(rejected):
        return False
    if isinstance(chosen, list):
        shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        return all(answer[shared:] and answer[shared].get("role") != "assistant" for answer in (chosen, rejected))
    shared = len(os.path.commonprefix([chosen, rejected]))  # (TRL's extract_prompt, at C speed)
    return all(TURN_MARKER.search(answer[shared:]) for answer in (chosen, rejected))


def _preference_row(kind: str, row: dict, index: int, source: str) -> dict | str:
    """A pair in TRL's layout. Chat turns are read with either pair of keys; a text prompt beside conversations
    that hold it is dropped (UltraFeedback-binarized), one beside answers alone becomes the user turn; text answers
    to a chat prompt become assistant turns (TRL needs the prompt and the answers in one form), and conversations that
    repeat a chat prompt lose the repeated turns."""
    prompt = row.get("prompt")
    if prompt is None and row.get("conversations"):  # LLaMA-Factory's preference layout: the turns before the answers
        prompt = row["conversations"]
    prompt, chosen, rejected = (
        _chat_or_text(value, index, column, source)
        for column, value in (("prompt", prompt), ("chosen", row["chosen"]), ("rejected", row["rejected"]))
    )
    if kind == "prompt":
        if _is_empty(prompt) and "prompt" not in row and not _is_empty(chosen) and not _is_empty(rejected):
            from trl.data_utils import maybe_extract_prompt  # an implicit prompt: the answers' shared start

            if prompts_differ(chosen, rejected):
                return DIFFERENT_PROMPTS
            prompt = maybe_extract_prompt({"chosen": chosen, "rejected": rejected}).get("prompt")
        if _is_empty(prompt):
            return "no prompt column" if "prompt" not in row else "empty prompt"
        return {"prompt": prompt}
    if _is_empty(chosen) or _is_empty(rejected) or _holds_empty_answer(chosen) or _holds_empty_answer(rejected):
        return "empty text"
    if _is_empty(prompt) and prompts_differ(chosen, rejected):  # (check_rows refuses these in a stage's data)
        return DIFFERENT_PROMPTS
    if isinstance(prompt, str) and isinstance(chosen, list):
        holds_prompt = is_text_beside_conversations({"prompt": prompt, "chosen": chosen})
        prompt = None if holds_prompt else [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        chosen, rejected = (
            [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer
            for answer in (chosen, rejected)
        )
        # a chat prompt beside whole conversations that repeat it (a prompt column added to UltraFeedback-style
        # pairs): the repeated turns are left out of the answers, as a text prompt is left out beside them, or TRL
        # would render the user turn twice
        if all(answer[: len(prompt)] == prompt for answer in (chosen, rejected)):
            chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
            if not chosen or not rejected:
                return "empty text"
    if chosen == rejected:
        return IDENTICAL
    return {"chosen": chosen, "rejected": rejected} | ({"prompt": prompt} if prompt is not None else {})


def check_required_values(dataset, columns: list[str], source: str, blank) -> None:
    """Every row that is not blank has a value in every required column: a null (a JSON row missing the key, an
    empty CSV cell in a row that has other values) breaks the file, named by row and column. A text column of
    true/false is refused too (numbers are read as their text: a spreadsheet column of figures). `blank`: the
    rows `_blank_mask` gives."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from hfgen.data.loading import NON_TEXT_COLUMNS

    for column in columns:
        values = dataset.data.column(column)
        if column not in NON_TEXT_COLUMNS and pa.types.is_boolean(values.type):
            raise UserError(
                f"dataset '{source}' column '{column}' holds true/false values, not text (row 1: "
                f"{values[0].as_py()!r}); map the column that holds the text (dataset_columns)"
            )
        nulls = pc.and_not(pc.is_null(values), blank)  # in Arrow: a list of one bool a row costs a corpus GBs
        if pc.any(nulls).as_py():
            rows = np.flatnonzero(nulls.to_numpy()) + 1
            raise UserError(
                f"dataset '{source}': {len(rows)} row(s) lack a value in required column '{column}' (rows "
                f"{rows[:5].tolist()}{'...' if len(rows) > 5 else ''}, counted from 1); fix or remove them"
            )


def _empty_text(column):
    """Per value of an Arrow column: null, or (text) nothing but whitespace. Arrow's whitespace is str.strip's (every
    code point agrees); tested in place, not by trimming, which would copy a corpus's whole text."""
    import pyarrow.compute as pc

    empty = pc.is_null(column)
    if str(column.type) in ("string", "large_string"):
        empty = pc.or_kleene(empty, pc.or_kleene(pc.equal(pc.binary_length(column), 0), pc.utf8_is_space(column)))
    return empty


def _blank_mask(dataset):
    """Rows with no value in any column (the empty lines of a text file, CSV or JSON-lines file), as an Arrow array
    of booleans: a Python list of them is one object a row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    blank = None
    for column in dataset.data.columns:
        empty = _empty_text(column)
        blank = empty if blank is None else pc.and_kleene(blank, empty)
    return pc.fill_null(blank, True) if blank is not None else pa.array([], pa.bool_())


def _blank_rows(dataset) -> list[bool]:
    """`_blank_mask` as a list, for a loop over the rows that skips the blank ones."""
    return _blank_mask(dataset).to_pylist()


def resolve_layout(dataset, kind: str, format: str | None, columns: dict[str, str] | None, source: str):
    """(dataset with the layout's column names, layout name): clean header names, apply the column mapping,
    detect or check the layout."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    dataset = dataset.flatten_indices()  # the Arrow checks read dataset.data, which a split's selection hides
    names = [c.strip().lstrip("\ufeff") for c in dataset.column_names]  # spreadsheets write a BOM, stray spaces
    twins = [(a, b) for i, a in enumerate(dataset.column_names) for b in dataset.column_names[i + 1:]
             if a.strip().lstrip("\ufeff") == b.strip().lstrip("\ufeff")]  # fmt: skip
    if twins:  # (renaming them to one name was a raw ValueError)
        raise UserError(
            f"dataset '{source}': columns {twins[0][0]!r} and {twins[0][1]!r} have the same name once spaces (and a "
            "BOM) are stripped; rename one of them in the file"
        )
    if names != dataset.column_names:
        dataset = dataset.rename_columns(dict(zip(dataset.column_names, names)))
    columns = columns or {}
    shared = {
        file_column: [name for name, c in columns.items() if c == file_column] for file_column in columns.values()
    }
    if twice := next(((c, names) for c, names in shared.items() if len(names) > 1), None):
        raise UserError(
            f"dataset_columns (or the stage's prompt_column / text_column) maps {' and '.join(twice[1])} to the same "
            f"column '{twice[0]}' of dataset '{source}'; a file column feeds one layout column: map each to its own"
        )
    missing = [file_column for file_column in columns.values() if file_column not in dataset.column_names]
    if any("." in column for column in missing):  # a nested field (`meta.body`): its own column once flattened
        dataset = dataset.flatten()
        missing = [file_column for file_column in columns.values() if file_column not in dataset.column_names]
    if missing:
        raise UserError(
            f"dataset_columns (or the stage's prompt_column / text_column) names column(s) {missing} that dataset "
            f"'{source}' lacks (it has {dataset.column_names})"
        )
    renames = {file_column: name for name, file_column in columns.items() if name != file_column}
    clashes = [name for name in renames.values() if name in dataset.column_names and name not in renames]
    if clashes:  # the file's own column of that name would be shadowed: keep it out of the way
        dataset = dataset.remove_columns(clashes)
    dataset = dataset.rename_columns(renames)

    fmt = format or detect_format(dataset.column_names, kind, source)
    if fmt not in FORMATS:
        raise UserError(f"dataset_format '{fmt}' is not a known layout; choose from {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    if kind not in spec.kinds:
        suitable = ", ".join(f.name for f in FORMATS.values() if kind in f.kinds)
        raise UserError(f"dataset_format '{fmt}' cannot feed this stage ({kind} data); it takes: {suitable}")
    lacking = [c for c in spec.required if c not in dataset.column_names]
    if lacking:
        raise UserError(
            f"dataset '{source}' ({fmt} layout: {spec.describe}) lacks column(s) {lacking}; it has "
            f"{dataset.column_names}. Map other names with dataset_columns, e.g. {{{lacking[0]}: YOUR_COLUMN}}"
        )
    return dataset, fmt


def required_columns(fmt: str, kind: str) -> list[str]:
    """The columns every row must have a value in: prompt-only stages need no answers."""
    if kind == "prompt":
        return (
            ["prompt"]
            if fmt in ("preference", "prompt_completion", "unpaired_preference")
            else [c for c in FORMATS[fmt].required if c not in ("output", "response")]
        )
    return list(FORMATS[fmt].required)


def check_rows(
    dataset, kind: str, format: str | None = None, columns: dict | None = None, source: str = "dataset",
    other_columns: bool | tuple[str, ...] = False,
):  # fmt: skip
    """The broken-file checks of `to_standard` alone, on a whole split as read: row numbers are the file's."""
    dataset, fmt = resolve_layout(dataset, kind, format, columns, source)
    needed = [c for c in required_columns(fmt, kind) if c in dataset.column_names]
    blank = _blank_mask(dataset)
    check_required_values(dataset, needed, source, blank)
    # the row loops below take the mask as a list (one object a row) only when they run: a corpus never does
    if fmt == "preference" and "prompt" not in dataset.column_names and "conversations" not in dataset.column_names:
        different = [
            i + 1 for i, (chosen, rejected, skip) in enumerate(zip(dataset["chosen"], dataset["rejected"], blank.to_pylist()))
            if not skip and prompts_differ(*(_chat_or_text(v, i, c, source) for v, c in ((chosen, "chosen"), (rejected, "rejected"))))
        ]  # fmt: skip
        if different:
            raise UserError(
                f"dataset '{source}': in {len(different)} row(s) (rows {different[:5]}{'...' if len(different) > 5 else ''}"
                ", counted from 1) chosen and rejected start with different prompts, and the prompt is the start they "
                "share (no prompt column): the rows are misaligned; fix or remove them, or give a prompt column"
            )
    _check_values(dataset, fmt, source, blank)
    if fmt == "unpaired_preference":  # KTO's labels, by the file's row too
        for row, (value, skip) in enumerate(zip(dataset["label"], blank.to_pylist())):
            if not skip:
                _label(value, row, source)
    if kind == "prompt" and fmt == "prompt":  # prompts to generate from, each followed by the generation prompt
        for row, (value, skip) in enumerate(zip(dataset["prompt"], blank.to_pylist())):
            turns = None if skip else _json_turns(value)
            last = turns[-1] if isinstance(turns, list) and turns and isinstance(turns[-1], dict) else {}
            if ROLE_NAMES.get(str(last.get("role", last.get("from"))).lower()) == "assistant":
                raise UserError(
                    f"dataset '{source}' row {row + 1}, column 'prompt': the prompt ends with an assistant turn (a "
                    "prefill); hfgen closes it and opens a new assistant turn after it (GRPO, RLOO, PPO and hfgen eval "
                    "generate after the generation prompt), so the answer would not continue it. End each prompt "
                    "with the user's turn"
                )
    named = set(other_columns) if isinstance(other_columns, tuple) else set()  # (GRPO's carried columns are free)
    for column in _carried(dataset, fmt, other_columns) & named & NUMBER_COLUMNS:
        for row, (value, skip) in enumerate(zip(dataset[column], blank.to_pylist())):
            if not skip:
                _number(value, row, column, source)


def _check_values(dataset, fmt: str, source: str, blank) -> None:  # (blank: `_blank_mask`)
    """The values `to_standard` refuses by row (chat turns without role or content, of an unknown role, marked not to
    be trained; a value that is not text where text belongs; tools that are not a list of definitions), found here by
    the file's row: `to_standard` sees a split's rows, shuffled by the held-out slice, and named the wrong one. A
    column typed as text is text."""
    if TOOLS_COLUMN in dataset.column_names:
        for row, (value, skip) in enumerate(zip(dataset[TOOLS_COLUMN], blank.to_pylist())):
            if not skip:
                _tools(value, row, source)
    spec = FORMATS[fmt]  # the layout's own columns, those `to_standard` converts: the others travel as they are (a
    # metadata `context` dict, a GRPO reference `output: [4, 5]`) or are dropped, whatever their name
    layout = [c for c in (*spec.required, *spec.optional) if c in TEXT_COLUMNS and c in dataset.column_names]
    for column in layout:
        chat = column in CHAT_COLUMNS
        if not chat and getattr(dataset.features[column], "dtype", None) in ("string", "large_string"):
            continue
        keys = ("from", "value") if fmt == "sharegpt" and column == "conversations" else ("role", "content")
        for row, (value, skip) in enumerate(zip(dataset[column], blank.to_pylist())):
            if skip or value is None:
                continue
            turns = _json_turns(value) if chat else value
            if isinstance(turns, (list, dict)) and chat:
                _turns(row, column, [turns] if isinstance(turns, dict) else turns, *keys, source)
            elif not isinstance(turns, str):
                _text(turns, row, column, source)


def _carried(dataset, fmt: str, other_columns: bool | tuple[str, ...]) -> set[str]:
    """The columns outside the layout that travel with each row (see `to_standard`; `tools` always does)."""
    spec = FORMATS[fmt]
    wanted = other_columns if isinstance(other_columns, tuple) else ()
    return {
        c for c in dataset.column_names
        if c not in (*spec.required, *spec.optional) and c != TOOLS_COLUMN and (other_columns is True or c in wanted)
    }  # fmt: skip


def _tools(value, row: int, source: str) -> str | None:
    """A row's `tools` value as JSON text of a list of definitions (None when it has none), or a UserError by row."""
    if isinstance(value, str) and value.strip():
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise UserError(
                f"dataset '{source}' row {row + 1}, column '{TOOLS_COLUMN}': not JSON ({error}); give the function "
                "definitions as a list (or its JSON text)"
            ) from None
    if value is None or value == [] or (isinstance(value, str) and not value.strip()):
        return None
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise UserError(
            f"dataset '{source}' row {row + 1}, column '{TOOLS_COLUMN}': {value!r} is not a list of function "
            "definitions ({type: function, function: {name, parameters, ...}})"
        )
    return json.dumps(value)


def row_tools(row: dict) -> list | None:
    """A standard row's function definitions as a chat template takes them (`tools=`), None when it has none."""
    tools = row.get(TOOLS_COLUMN)
    return json.loads(tools) if isinstance(tools, str) else tools


def tools_problems(rows, stage: str, source: str) -> list[str]:
    """The stage's refusal of data with function definitions when its trainer does not render them (ORPO's and
    SimPO's TRL trainers, the reward stage's scoring, PPO's, GRPO's and RLOO's prompts): the model would be trained
    on tool calls, or prompted, without the functions it may call."""
    if stage in STAGES_READING_TOOLS or TOOLS_COLUMN not in rows.column_names:
        return []
    if all(value is None for value in rows[TOOLS_COLUMN]):
        return []
    return [
        f"{source} has a '{TOOLS_COLUMN}' column (function definitions for the chat template), which the {stage} "
        f"stage does not render: its model would see tool calls, or be prompted, without the functions declared. "
        f"Train with sft, dpo or kto (their trainers render it), or remove the column (dataset_columns cannot drop "
        "it: write the file without it)"
    ]


# Columns outside a layout that a stage reads as numbers, refused by row when a value is not one: a reward
# stage's `margin` (TRL's RewardTrainer subtracts it from the reward difference in its loss).
REWARD_COLUMNS = ("margin",)
NUMBER_COLUMNS = frozenset(REWARD_COLUMNS)


def _number(value, row: int, column: str, source: str) -> float:
    """A number column's value as a float: a number, or its text (a CSV's cells are read as text)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise UserError(
            f"dataset '{source}' row {row + 1}, column '{column}': {type(value).__name__} value {str(value)[:60]!r} "
            "where a finite number belongs; fix the row, or rename the column if it is not a margin"
        )
    return float(value)


# Columns some layout reads into the prompt (Alpaca's input, Dolly's context, ShareGPT's system): a file's column of
# such a name that the chosen layout does not read leaves part of each prompt out, and is said.
PROMPT_PART_COLUMNS = ("input", "context", "system")


def left_out_notes(dataset, fmt: str, kind: str, carried) -> list[str]:
    """Notes naming the non-empty PROMPT_PART_COLUMNS the layout `fmt` leaves out (Alpaca mapped as prompt/completion
    keeps only the instruction), with the layouts that would read them."""
    spec = FORMATS[fmt]
    notes = []
    for column in PROMPT_PART_COLUMNS:
        if column not in dataset.column_names or column in (*spec.required, *spec.optional, *carried):
            continue
        filled = sum(not _is_empty(value) for value in dataset[column])
        if filled:
            readers = [f.name for f in FORMATS.values() if column in f.optional and kind in f.kinds]
            notes.append(
                f"column '{column}' (filled in {filled} of {len(dataset)} rows) is left out by the {fmt} layout"
                + (f"; the {' or '.join(readers)} layout reads it (dataset_format)" if readers else "")
            )
    return notes


def to_standard(
    dataset, kind: str, format: str | None = None, columns: dict[str, str] | None = None, source: str = "dataset",
    other_columns: bool | tuple[str, ...] = False, refuse_identical: bool = True,
):  # fmt: skip
    """(dataset in the kind's standard columns, DataReport). See the module docstring. `other_columns`: the file's
    columns outside its layout travel with each row (GRPO's reward functions read them, e.g. a reference answer);
    all of them (True) or those named (a reward stage's `margin`), those in NUMBER_COLUMNS checked as numbers."""
    from hfgen.data.loading import source_rows

    as_read = dataset  # (its view of the file's rows, which resolve_layout flattens: `source_rows`)
    dataset, fmt = resolve_layout(dataset, kind, format, columns, source)
    spec = FORMATS[fmt]
    report = DataReport(source=source, format=fmt, rows_read=len(dataset))
    blank = _blank_mask(dataset)
    needed = [c for c in required_columns(fmt, kind) if c in dataset.column_names]
    check_required_values(dataset, needed, source, blank)
    if _plain_text(dataset, fmt, other_columns):
        return _standard_text(dataset, kind, blank, report), report
    file_rows = source_rows(as_read, range(len(as_read)))  # (a list a row: not for a corpus, above)
    blank = blank.to_pylist()
    if any(blank):
        report.dropped["empty rows"] += sum(blank)
        dataset = dataset.select([i for i, b in enumerate(blank) if not b])

    keep = [c for c in (*spec.required, *spec.optional) if c in dataset.column_names]
    carried = [c for c in dataset.column_names if c in _carried(dataset, fmt, other_columns)]
    tools = [TOOLS_COLUMN] if TOOLS_COLUMN in dataset.column_names and TOOLS_COLUMN not in keep else []
    numbers = set(carried) & NUMBER_COLUMNS if isinstance(other_columns, tuple) else set()
    reasons: list[str | None] = []

    def convert(row, index):
        layout_row = {c: row[c] for c in keep} if carried or tools else row  # the converter sees the layout's columns
        result = _standard_row(fmt, kind, layout_row, index, source)
        if isinstance(result, dict) and tools:
            result[TOOLS_COLUMN] = _tools(row[TOOLS_COLUMN], index, source)
        reasons.append(result if isinstance(result, str) else None)
        values = {c: _number(row[c], index, c, source) if c in numbers else row[c] for c in carried}
        return {**values, **result} if isinstance(result, dict) else {}

    report.notes += left_out_notes(dataset, fmt, kind, carried)
    rows = [convert(row, i) for i, row in enumerate(dataset.select_columns(keep + carried + tools))]
    kept = [r for r in rows if r]
    report.file_rows = [n for n, b in zip(file_rows, blank) if not b]
    report.file_rows = [n for n, row in zip(report.file_rows, rows) if row]
    report.dropped.update(reason for reason in reasons if reason)
    report.rows_kept = len(kept)
    if refuse_identical:
        refuse_identical_pairs(source, {"data": report})
    return _from_rows(kept, source), report


def _plain_text(dataset, fmt: str, other_columns: bool | tuple[str, ...]) -> bool:
    """Text layout data whose text column is already text, with no column that travels beside it or that a note
    names (`left_out_notes`): its conversion only drops the rows without text (`_standard_text`)."""
    return (
        fmt == "text"
        and str(dataset.data.column("text").type) in ("string", "large_string")
        and not _carried(dataset, fmt, other_columns)
        and not any(column in dataset.column_names for column in PROMPT_PART_COLUMNS)
    )


def _has_text(texts: list) -> list[bool]:
    return [not _is_empty(text) for text in texts]


def _standard_text(dataset, kind: str, blank, report: DataReport):
    """`to_standard` of `_plain_text` data, done by datasets on the Arrow table: a pretraining corpus (GBs) stays
    memory-mapped in its cache file, where the row-by-row conversion held it all in memory as Python rows and
    left nothing for the packing's map to cache. The rows are dropped and counted as the conversion does: blank
    ones as empty rows, the others without text as empty text."""
    import pyarrow.compute as pc

    empty = _empty_text(dataset.data.column("text"))  # (a null in a row that is not blank was refused above)
    blank_rows, empty_rows = (int(pc.sum(mask).as_py() or 0) for mask in (blank, empty))
    if blank_rows:
        report.dropped["empty rows"] += blank_rows
    if empty_rows > blank_rows:
        report.dropped["empty text"] += empty_rows - blank_rows
    report.rows_kept = len(dataset) - empty_rows
    dataset = dataset.select_columns(["text"])
    if empty_rows:  # an indices mapping beside the data, in datasets' cache
        dataset = dataset.filter(_has_text, batched=True, input_columns=["text"], desc="dropping empty text")
    return dataset.rename_column("text", "prompt") if kind == "prompt" else dataset


def standard_prompts(
    rows, key: str, name: str, split: str, columns: dict[str, str] | None = None, hint: str = ""
) -> list:
    """The non-empty prompts of `rows`, split `split` of the data `name` that `key` gives (hfgen eval's
    --eval_dataset, the preference stages' eval_prompts_dataset), in any prompt layout. Its problems name `key`
    (the layout's, which name the file, followed by `hint`): a split left with none is one, with the rows and why
    they were dropped (the empty dataset `to_standard` leaves has no 'prompt' column: indexed, a raw ValueError)."""
    try:
        standard, report = to_standard(rows, "prompt", columns=columns, source=name)
    except UserError as error:
        raise UserError(f"{key}: {error}{hint}") from None
    if not len(standard):
        raise none_left(key, name, split, report, "prompt to sample from")
    return standard["prompt"]


def none_left(key: str, name: str, split: str, report: DataReport, what: str) -> UserError:
    """The problem of data that `key` gives whose split `to_standard` left without a row (every one empty or
    blank): named by the key, the file, its rows and why they were dropped."""
    dropped = ", ".join(f"{n} {reason}" for reason, n in report.dropped.items())
    return UserError(f"{key} '{name}' holds no non-empty {what}: its {split} split's {report.rows_read} row(s) "
                     f"({report.format} layout) were all dropped ({dropped})")  # fmt: skip


def refuse_identical_pairs(source: str, reports: dict[str, DataReport]) -> None:
    """A UserError when chosen equals rejected in more than MAX_IDENTICAL_PAIRS of the pairs of all `reports` (a
    source's splits, by name) together: a broken export, not noise. Counted over the whole data, so that one such
    pair in a small test split does not refuse a run; the message says how many each split holds."""
    identical = sum(report.dropped.get(IDENTICAL, 0) for report in reports.values())
    read = sum(report.rows_read for report in reports.values())
    if identical > MAX_IDENTICAL_PAIRS * read:
        where = ", ".join(f"{r.dropped.get(IDENTICAL, 0)} of {r.rows_read} in {name}" for name, r in reports.items())
        raise UserError(
            f"dataset '{source}': {identical} of {read} pairs have chosen equal to rejected ({where}; more than "
            f"{MAX_IDENTICAL_PAIRS:.0%}), which looks like a broken export; fix the file"
        )


def unpaired_rows(pairs, seed: int):
    """Preference pairs as KTO's unpaired rows (each pair a desirable and an undesirable row), shuffled (seeded):
    TRL's conversion leaves blocks of desirable rows followed by undesirable ones, and KTO reads its rows in order
    (its KL estimate pairs each row with its neighbours), so unshuffled it trains on one label at a time."""
    from trl.data_utils import unpair_preference_dataset

    return unpair_preference_dataset(pairs).shuffle(seed=seed)


def _has_tool_keys(value) -> bool:
    return isinstance(value, list) and any(isinstance(t, dict) and any(k in t for k in TOOL_KEYS) for t in value)


def _from_rows(rows: list[dict], source: str):
    """A Dataset of the converted rows; a column mixing text and chat turns cannot be one Arrow column."""
    import pyarrow as pa
    from datasets import Dataset

    try:
        dataset = Dataset.from_list(rows)
        if any(_has_tool_keys(value) for row in rows for value in row.values()):
            # Arrow gives every turn every key (None where a turn has none), and chat templates test `'tool_calls'
            # in message`: chat columns as JSON keep each turn's own keys (datasets' Json feature)
            from datasets import Features, Json, List

            features = Features(
                {c: List(Json()) if isinstance(rows[0][c], list) else f for c, f in dataset.features.items()}
            )
            dataset = Dataset.from_list(rows, features=features)
        return dataset
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise UserError(
            f"dataset '{source}' mixes text and chat messages in one column ({str(error).splitlines()[0]}); "
            "use one or the other"
        ) from None


def require_rows(dataset, report: DataReport, what: str = "training rows") -> None:
    """No usable row left is a UserError naming why the rows went."""
    if len(dataset) == 0:
        why = report.summary() if report.dropped else "the split is empty"
        raise UserError(f"dataset '{report.source}' has no usable {what}: {why}")
