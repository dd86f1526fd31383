"""Text as a model reads it: a prompt and a response joined the way TRL's trainers join them, for tokenizers with
and without an EOS token or a chat template (encoder classifiers such as BERT or DeBERTa have neither: their own
[CLS]/[SEP] special tokens frame the text, and conversations are written with a plain template)."""

from __future__ import annotations


def plain_conversation(messages: list[dict]) -> str:
    """A conversation as plain text, for a tokenizer without a chat template: 'User: ...' / 'Assistant: ...'."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def with_plain_chat_template(tokenizer):
    """The tokenizer, given `plain_conversation` as its chat template when it has none (an encoder classifier), framed
    by the special tokens its encoding adds ([CLS] ... [SEP]; BOS): for libraries that render conversations only
    through a chat template and then tokenize without special tokens (TRL's GRPO and RLOO score with their reward
    model's template so), the same token ids as the plain template encoded with them."""
    import json

    if getattr(tokenizer, "chat_template", None):
        return tokenizer
    framed, bare = tokenizer("x")["input_ids"], tokenizer("x", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(framed)) if framed[i : i + len(bare)] == bare)
    prefix, suffix = (tokenizer.decode(ids) for ids in (framed[:start], framed[start + len(bare) :]))
    tokenizer.chat_template = (
        f"{{{{ {json.dumps(prefix)} }}}}"
        "{% for message in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
        "{{ message['role'] | capitalize }}: {{ message['content'] }}{% endfor %}"
        f"{{{{ {json.dumps(suffix)} }}}}"
    )
    return tokenizer


def uses_plain_template(tokenizer, conversational: bool) -> bool:
    """Whether conversations are rendered with the plain template (the tokenizer has no chat template)."""
    return conversational and not getattr(tokenizer, "chat_template", None)


def sequence_text(tokenizer, prompt, response) -> tuple[str, bool]:
    """(text, add_special_tokens) for prompt + response as a reward model reads it: the chat template for
    conversations (its special tokens are in the text), else the plain template or plain text with EOS appended when
    the tokenizer has one, tokenized with the tokenizer's own special tokens."""
    if isinstance(response, list) or isinstance(prompt, list):
        messages = list(prompt or []) + (response if isinstance(response, list) else [])
        if uses_plain_template(tokenizer, True):
            return plain_conversation(messages), True
        return tokenizer.apply_chat_template(messages, tokenize=False), False
    text = (prompt or "") + response
    eos = tokenizer.eos_token
    return (text if not eos or text.endswith(eos) else text + eos), True


def sequence_ids(tokenizer, prompt, response) -> list[int]:
    text, special = sequence_text(tokenizer, prompt, response)
    return tokenizer(text=text, add_special_tokens=special)["input_ids"]


def marked_template(tokenizer) -> str | None:
    """The chat template whose {% generation %} markers give the assistant turns' mask, as TRL's SFTTrainer trains
    with it: None for the tokenizer's own when it has them, else TRL's training copy of it (Llama 3, Qwen, Gemma,
    Phi-3, ...); a ValueError when TRL has none."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    return None if has_generation_markers(tokenizer.chat_template) else get_training_chat_template(tokenizer)


def template_refusal(error, where: str) -> str:
    """The message of a chat template's own refusal of a conversation (its `raise_exception`: Gemma's "System role
    not supported", Mistral's "Conversation roles must alternate"), `where` naming the data."""
    return (
        f"the chat template refuses {where}: '{error}'. The model's template does not take such conversations: merge "
        "a system turn into the first user turn (or drop it), make user and assistant turns alternate, or use a chat "
        "template that accepts them"
    )


def template_refusals(tokenizer, rows, source: str, file_rows: list[int]) -> list[str]:
    """The first of `rows` (a split in the standard columns, every row; `file_rows`: their numbers in the file)
    whose conversations the tokenizer's chat template refuses to render, as a problem naming the row in the file
    (`template_refusal`); [] when it renders them all or has no template. Found at the load: the trainers would
    stop with jinja's traceback. A template refuses a conversation for its turns' roles (Gemma: a system turn;
    Mistral: roles that do not alternate), so beyond the first ROWS_CHECKED rows (each rendered: a template may
    refuse for a turn's content too, Llama 3.1 two tool calls in one turn) each row is rendered whose sequence of
    roles (and numbers of tool calls) no earlier row had: every row checked, at the cost of a few renderings on a
    file of any size."""
    from jinja2.exceptions import TemplateError

    from hfgen.data.loading import ROWS_CHECKED

    if not getattr(tokenizer, "chat_template", None):
        return []
    seen = set()
    columns = [c for c in ("messages", "prompt", "completion", "chosen", "rejected") if c in rows.column_names]
    values = [rows[column] for column in columns]  # whole columns: a Dataset read row by row is slow
    for index, row in enumerate(dict(zip(columns, row)) for row in zip(*values)):
        prompt = row.get("prompt") if isinstance(row.get("prompt"), list) else []
        answers = [row[key] for key in ("completion", "chosen", "rejected") if isinstance(row.get(key), list)]
        conversations = [row["messages"]] if isinstance(row.get("messages"), list) else []
        conversations += [prompt + answer for answer in answers] or ([prompt] if prompt else [])
        for messages in conversations:
            shape = tuple((turn.get("role"), len(turn.get("tool_calls") or [])) for turn in messages)
            if shape in seen and index >= ROWS_CHECKED:
                continue
            seen.add(shape)
            try:
                rendered = tokenizer.apply_chat_template(messages, tokenize=False)
            except TemplateError as error:
                return [template_refusal(error, f"row {file_rows[index]} (counted from 1) of {source}")]
            if lost := lost_tool_text(messages, rendered):
                return [
                    f"the chat template renders no {lost} of row {file_rows[index]} (counted from 1) of {source}: "
                    "a tool call would train as an empty answer, a tool's result vanish. Use a chat template that "
                    "renders tool calls and tool turns (chat_template_path; Qwen's, Llama 3.1's), or drop such turns"
                ]
    return []


def lost_tool_text(messages: list[dict], rendered: str) -> str | None:
    """What of a conversation's tool calls and tool results its rendering lacks, in words (None when it has them
    all): a template without tool support (Phi-3's) renders an assistant turn that only calls a tool as an empty
    answer, and no `tool` turn at all."""
    for turn in messages:
        for call in turn.get("tool_calls") or []:
            name = (call.get("function") or call).get("name") if isinstance(call, dict) else None
            if name and str(name) not in rendered:
                return f"tool call ('{name}')"
        if turn.get("role") == "tool" and isinstance(turn.get("content"), str) and turn["content"].strip():
            if turn["content"].strip() not in rendered:
                return f"tool result ({turn['content'].strip()[:40]!r})"
    return None


def without_doubled_bos(rows, tokenizer, columns: tuple[str, ...] = ("text",)):
    """(rows, note): string rows of `columns` (those that open the sequence: the text, the prompt) that already
    start with the tokenizer's BOS (text rendered with a chat template: Llama 3's <|begin_of_text|>) lose that
    prefix, since the stages tokenize such text with the special tokens and the tokenizer puts its own BOS in
    front: a doubled BOS is a sequence the model never reads at inference. The note (None when no row had it)
    says so; the stages print it and record it in data.json."""
    from hfgen.models import bos_added_twice

    bos = bos_added_twice(tokenizer)
    columns = [c for c in columns if c in rows.column_names and len(rows) and isinstance(rows[0][c], str)]
    if not bos or not columns:
        return rows, None
    import functools

    import pyarrow.compute as pc

    # in arrow, not row by row in Python: a corpus of millions of documents passes here at every start
    columns_read = rows.with_format("arrow")
    flags = functools.reduce(pc.or_, [pc.starts_with(columns_read[c], bos) for c in columns])
    starting = pc.indices_nonzero(pc.fill_null(flags, False)).to_pylist()
    if not starting:
        return rows, None
    rows = rows.map(lambda row: {c: row[c].removeprefix(bos) for c in columns})
    note = (
        f"{len(starting)} of {len(rows)} rows of the {' and '.join(columns)} column{'s' if len(columns) > 1 else ''} "
        f"(row {starting[0]} first) already start with the tokenizer's BOS {bos!r} (text rendered with a chat "
        "template); the tokenizer adds its own, so the text's was removed: one BOS, as the template renders it"
    )
    return rows, note


def splits_without_doubled_bos(train_rows, eval_rows, tokenizer, records: dict, columns: tuple[str, ...] = ("text",)):
    """(train rows, eval rows) `without_doubled_bos`, its note about the training rows printed and added to the
    data records."""
    train_rows, note = without_doubled_bos(train_rows, tokenizer, columns)
    eval_rows = without_doubled_bos(eval_rows, tokenizer, columns)[0]
    if note:
        print(f"note: {note}")
        records.setdefault("notes", []).append(note)
    return train_rows, eval_rows
