"""What the offline preference stages (`dpo`, `kto`, `orpo`, `simpo`) share: their data keys and checks, loading
the pairs, the held-out preference figures, and the run itself around a TRL trainer.

Each stage module names its TRL trainer and config; the run is the same for all four:

1. data: read as every text stage reads it (hfgen.data.prepare: `dataset_format`, `dataset_columns`, mixtures,
   one policy for bad rows): the `reward` stage's preference layouts (`prompt`/`chosen`/`rejected`, or
   `chosen`/`rejected` sharing a prompt prefix; plain or conversational), and for KTO also unpaired
   `prompt`/`completion`/`label` rows. Broken files exit 2 before any model loads, naming the file, column and
   row; pairs whose chosen and rejected responses are equal teach nothing and are dropped and counted (data.json),
   and refused when they are more than a tenth of the file (a broken export, not noise).
2. model: TRL's `ModelConfig` (LoRA: the reference is the same model with its adapter disabled, no second copy);
   for full fine-tuning the reference (the starting model) is loaded once and passed to the trainer (with
   `precompute_ref_log_probs` it is not: TRL computes its log-probs with the policy before training, and the
   starting model is loaded after training for the comparison).
3. records (eval.json): on held-out pairs, the log-probability of chosen and rejected responses (up to and
   including their EOS, as the policy generates them) before and after training (a falling chosen log-prob is a
   known failure of DPO-like losses: it is logged and said), and the preference accuracy of the implicit reward;
   then the held-out generation comparison with the SFT model (`hfgen.evaluation.policy`: reward-model and oracle
   scores, win rates, KL, length, diversity).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from hfgen import guard, loop, tracking
from hfgen.data.formats import TOOLS_COLUMN, tools_problems, unpaired_rows
from hfgen.data.prepare import (
    TextDataArguments,
    check_text_data,
    checking_template,
    data_seed,
    data_source,
    load_for_stage,
    record,
)
from hfgen.data.rendering import splits_without_doubled_bos
from hfgen.errors import UserError
from hfgen.finetune import build_trainer, check_model_config, run_first_hint
from hfgen.generate import prompts_are_chat
from hfgen.models import (
    answer_room,
    check_model_source,
    not_a_reward_model,
    raise_length_advice,
    read_config,
    within_learned_positions,
)


@dataclass
class PreferenceDataArguments(TextDataArguments):
    """Data keys, and the held-out generation comparison with the starting (SFT) model."""

    eval_prompts_dataset: str | None = field(
        default=None,
        metadata={"help": "Prompts for the held-out generation comparison (its 'test' split, column 'prompt'); "
                  "default: the prompts of the held-out preference rows."},
    )  # fmt: skip
    eval_num_prompts: int = field(default=64, metadata={"help": "Held-out prompts answered by both policies."})
    eval_samples_per_prompt: int = field(
        default=4, metadata={"help": "Responses per held-out prompt and policy; 0 skips the generation comparison."}
    )
    eval_response_length: int = field(default=24, metadata={"help": "Maximum new tokens of each held-out answer."})
    eval_temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the held-out answers."})
    reward_model_path: str | None = field(
        default=None, metadata={"help": "A reward model that judges the held-out answers (never trained on)."}
    )
    oracle_function: str | None = field(
        default=None, metadata={"help": "A judge 'module:function(prompts, responses) -> scores' of held-out answers."}
    )


# ---- data ---------------------------------------------------------------------------------------------


def data_kind(unpaired_ok: bool) -> str:
    """The kind of data a stage reads (hfgen.data.formats): preference pairs, or for KTO also unpaired rows."""
    return "unpaired_preference" if unpaired_ok else "preference"


def check_preference_data(
    data_args: PreferenceDataArguments, unpaired_ok: bool = False, model: str | None = None,
    trust_remote_code: bool = False, training_args=None, stage: str = "dpo",
) -> list[str]:  # fmt: skip
    """Problems with the dataset (its layout, missing columns and values, too many chosen == rejected pairs, no
    usable row; conversations that `model`'s tokenizer has no chat template for) and with the evaluation keys, found
    before any model is loaded."""
    from trl.data_utils import is_conversational

    from hfgen.rl.rollout import WHY_NO_COLUMNS, load_function, unmet_arguments

    template = checking_template(model, trust_remote_code)  # renders every row (a refusal named by its row)
    loaded, problems = check_text_data(
        data_args, data_kind(unpaired_ok), seed=data_seed(training_args) if training_args is not None else 0,
        template=template,
    )  # fmt: skip
    tokenizer = template if loaded and len(loaded[0]) else None
    if loaded:
        problems += tools_problems(loaded[0], stage, data_source(data_args))
    if tokenizer is not None and is_conversational(loaded[0][0]):
        if tokenizer.chat_template is None:
            problems.append(
                f"the data's rows are conversations, but model '{model}' has no chat template to render them with "
                "(a base model): start from one that has (an sft run keeps the template it trained with, e.g. from "
                "chat_template_path), or give text rows"
            )
    if tokenizer is not None and not problems and training_args is not None:
        training_args = within_learned_positions(model, training_args)  # the length the run cuts at
        problems += prompt_length_problems(tokenizer, loaded[0], training_args)
        from hfgen.data.loading import ROWS_CHECKED

        sample = [rows.select(range(min(ROWS_CHECKED, len(rows)))) for rows in loaded[:2]]
        try:
            drop_truncated_identical_pairs(tokenizer, sample, {}, training_args)
        except UserError as error:
            problems.append(str(error))
    if data_args.eval_prompts_dataset:
        try:
            load_eval_prompts(data_args.eval_prompts_dataset)
        except UserError as error:
            problems.append(str(error))
    if tokenizer is not None and not problems and data_args.eval_samples_per_prompt and data_args.eval_num_prompts:
        try:  # the comparison's prompts within a model's learned positions, as the run keeps them
            room = held_out_prompt_room(read_config(model, trust_remote_code), data_args)
            prompts = held_out_prompts(data_args, with_explicit_prompt(loaded[1]))  # (as the run reads them)
            fitting_held_out_prompts(tokenizer, prompts, room, data_args, {})
        except UserError as error:
            problems.append(str(error))
    if data_args.reward_model_path:
        path = data_args.reward_model_path
        # a causal LM (the SFT run given by mistake) would judge with a new, random score head
        problems += check_model_source("reward_model_path", path, hint=run_first_hint(path)) or not_a_reward_model(
            path, "reward_model_path"
        )
    if data_args.oracle_function:
        try:
            unmet = unmet_arguments(load_function(data_args.oracle_function))
        except ValueError as error:
            problems.append(f"oracle_function {error}")
        else:
            if unmet:
                problems.append(f"oracle_function '{data_args.oracle_function}' needs argument(s) {unmet} after "
                                f"(prompts, responses); {WHY_NO_COLUMNS}")  # fmt: skip
    # (eval_num_prompts, eval_samples_per_prompt, eval_response_length, eval_temperature: recipe.BOUNDS)
    return problems


PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected", "completion", "label")
MAX_FULL_PROMPTS = 0.5  # a larger share of rows whose prompt fills max_length: the limit is wrong for the data


def prompt_length_problems(tokenizer, rows, training_args) -> list[str]:
    """Rows whose prompt alone fills `max_length` keep no answer token under keep_start truncation (prompt_fills):
    dropped and counted at the run (drop_full_prompts); refused when most of the checked rows are such (all of them
    dropped, nothing would train)."""
    from trl.data_utils import maybe_extract_prompt

    from hfgen.data.loading import ROWS_CHECKED

    limit = getattr(training_args, "max_length", None)
    if not limit or getattr(training_args, "truncation_mode", "keep_start") == "keep_end":
        return []
    sample = rows.select(range(min(ROWS_CHECKED, len(rows))))
    overheads: dict = {}
    filled = [
        prompt_fills(
            tokenizer, maybe_extract_prompt(dict(row)) if "prompt" not in row else row, training_args, overheads
        )
        for row in sample
    ]
    full = sum(filled)
    if full <= MAX_FULL_PROMPTS * len(filled):
        return []
    return [
        f"{full} of {len(filled)} rows checked have a prompt of max_length={limit} tokens or more, which leaves no "
        f"answer token to train on: {raise_length_advice(training_args, shorten='the prompts')}; or set "
        "truncation_mode: keep_end"
    ]


def trained_sequence(tokenizer, prompt, completion, training_args) -> tuple[tuple, tuple]:
    """(token ids, completion mask) of prompt + completion as the trainer feeds them: tokenized as TRL's preference
    trainers do (completion_example: DPO and KTO with the template's text after the EOS, ORPO and CPO with each
    answer cut after it, as run_stage hands them their rows: answers_cut_at_eos), then cut to `max_length` as they
    cut it: DPO's and KTO's collators keep the first tokens (DPO's keep_end: the last); ORPO and CPO keep the whole
    prompt and cut the answer (a prompt of max_length or more leaves none)."""
    text_trainer = experimental_pair_trainer(training_args)
    ids, start = completion_example(tokenizer, prompt, completion, template_tail=not text_trainer)
    mask = [0] * start + [1] * (len(ids) - start)
    limit = getattr(training_args, "max_length", None)
    if limit and text_trainer:
        ids, mask = ids[: max(limit, start)], mask[: max(limit, start)]
    elif limit:
        keep_end = getattr(training_args, "truncation_mode", "keep_start") == "keep_end"
        ids, mask = (ids[-limit:], mask[-limit:]) if keep_end else (ids[:limit], mask[:limit])
    return tuple(ids), tuple(mask)


def experimental_pair_trainer(training_args) -> bool:
    """Whether the stage trains with TRL's experimental ORPOTrainer or CPOTrainer (orpo, simpo: their configs), which
    take text, tokenize it themselves and truncate otherwise than DPO and KTO do. Told by the config's class
    without importing trl.experimental (which warns on import) in the other stages."""
    return any(
        cls.__module__.startswith("trl.experimental.") and cls.__name__ in ("ORPOConfig", "CPOConfig")
        for cls in type(training_args).__mro__
    )


def answers_cut_at_eos(tokenizer, rows):
    """Conversational pairs rendered to text for TRL's experimental ORPO and CPO trainers as they render them
    (maybe_apply_chat_template), each answer cut after the assistant's EOS (evaluation.command.up_to_eos). Rendered
    whole, an answer kept the template's text after its EOS (ChatML's newline), and the trainers appended an EOS to
    the text that no longer ended in one: every answer trained as `answer<|end|>\n<|end|>`, two tokens the policy
    never generates that made most of ORPO's NLL term and of SimPO's per-token reward and margin. Cut, each answer
    ends at its one EOS, the sequence hfgen's held-out figures score (completion_example). Plain-text pairs are
    left as they are: the trainers end them with an EOS."""
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    from hfgen.evaluation.command import up_to_eos

    if not len(rows) or not is_conversational(rows[0]):
        return rows

    def render(row):
        text = maybe_apply_chat_template(row, tokenizer)
        return {**text, **{side: up_to_eos(text[side], 0, tokenizer.eos_token) for side in ("chosen", "rejected")}}

    return rows.map(render)


def turn_texts(value) -> str | None:
    """A prompt's or answer's text (a conversation's contents joined), for byte counts; None for other contents."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(turn.get("content"), str) for turn in value):
        return "\x00".join(turn["content"] for turn in value)
    return None


def template_tokens(tokenizer, row, overheads: dict) -> int:
    """At most how many tokens a row's prompt and answer take beyond their texts' bytes: the chat template's own
    tokens around the turns (rendered once per role sequence, cached in `overheads`), or BOS and EOS."""
    answer = row["chosen"] if "chosen" in row else row["completion"]
    if not isinstance(answer, list):
        return 8  # BOS, EOS, a SentencePiece word start
    roles = tuple(turn["role"] for turn in [*row["prompt"], *answer])
    if roles not in overheads:
        empty = [{"role": role, "content": ""} for role in roles]
        overheads[roles] = len(tokenizer.apply_chat_template(empty, tokenize=True, return_dict=True)["input_ids"])
    return overheads[roles] + 4 * len(roles)  # (a token may straddle a content's edge)


def differ_before(tokenizer, row, limit: int, keep_end: bool, overheads: dict) -> bool:
    """Whether a pair's chosen and rejected surely differ inside the `limit` tokens the trainer keeps, judged
    without tokenizing it (rendering two chat templates a pair costs ~10 ms: minutes on UltraFeedback's 61k pairs).
    A token holds at least one byte of text (byte-level BPE; SentencePiece's byte fallback), so the answers part
    within `limit` tokens when the template's own tokens, the prompt's bytes and the bytes the answers share at
    the kept end (their common start, or with keep_end their common end) come to fewer than `limit`. False means
    "tokenize to know"."""
    import os

    prompt, chosen, rejected = (turn_texts(row[key]) for key in ("prompt", "chosen", "rejected"))
    if prompt is None or chosen is None or rejected is None or chosen == rejected:
        return False
    overhead = template_tokens(tokenizer, row, overheads)
    if keep_end:  # the cut drops the start: what matters is how much of the end the two answers share
        shared = os.path.commonprefix([chosen[::-1], rejected[::-1]])
        return overhead + len(shared.encode()) < limit
    shared = prompt + os.path.commonprefix([chosen, rejected])
    return overhead + len(shared.encode()) < limit


def prompt_fills(tokenizer, row, training_args, overheads: dict) -> bool:
    """Whether truncation to max_length leaves a row (a pair, or KTO's unpaired row) no answer token: its prompt
    alone fills max_length under keep_start (ORPO and CPO keep the whole prompt). TRL's DPO and KTO drop such rows
    themselves, uncounted; ORPO and SimPO averaged the log-prob of zero answer tokens (NaN) and stopped as
    diverged. Told from the prompt's bytes where they and the template's tokens come to fewer than max_length
    (differ_before's bound), else from the tokens the trainer keeps (trained_sequence)."""
    limit = training_args.max_length
    prompt = turn_texts(row["prompt"])
    if prompt is not None and template_tokens(tokenizer, row, overheads) + len(prompt.encode()) < limit:
        return False
    answer = row["chosen"] if "chosen" in row else row["completion"]
    return not any(trained_sequence(tokenizer, row["prompt"], answer, training_args)[1])


def drop_full_prompts(tokenizer, splits, records: dict, training_args):
    """Rows that truncation leaves no answer token (prompt_fills) are dropped and counted, as SFT's fully masked
    rows are; prompt_length_problems refuses the data when most rows are such (max_length is wrong for it)."""
    from hfgen.data.prepare import drop_and_count

    limit = getattr(training_args, "max_length", None)
    if not limit or getattr(training_args, "truncation_mode", "keep_start") == "keep_end":
        return splits  # (keep_end keeps the answer's end)
    overheads: dict = {}
    return [
        drop_and_count(rows, [not prompt_fills(tokenizer, row, training_args, overheads) for row in rows], records,
                       f"prompt fills max_length={limit}", split)
        for rows, split in zip(splits, ("train", "eval"))
    ]  # fmt: skip


def drop_truncated_identical_pairs(tokenizer, splits, records: dict, training_args):
    """Pairs whose chosen and rejected differ only past `max_length` train as the same sequence (log-probs and
    margin equal, nothing learnt): dropped and counted as chosen == rejected pairs are, and refused, as those are,
    when the two kinds together exceed MAX_IDENTICAL_PAIRS of the pairs."""
    from trl.data_utils import maybe_extract_prompt

    from hfgen.data.formats import IDENTICAL, MAX_IDENTICAL_PAIRS
    from hfgen.data.prepare import drop_and_count

    limit = getattr(training_args, "max_length", None)
    if not limit or "chosen" not in splits[0].column_names:
        return splits
    reason = f"{IDENTICAL} within max_length={limit}"
    keep_end = getattr(training_args, "truncation_mode", "keep_start") == "keep_end"
    overheads: dict = {}
    kept = []
    for rows, split in zip(splits, ("train", "eval")):
        keep = []
        for row in rows:
            row = maybe_extract_prompt(dict(row)) if "prompt" not in row else row
            if differ_before(tokenizer, row, limit, keep_end, overheads):
                keep.append(True)  # the answers part well inside the kept tokens: no need to tokenize the pair
                continue
            chosen, rejected = (
                trained_sequence(tokenizer, row["prompt"], row[side], training_args) for side in ("chosen", "rejected")
            )
            # (a prompt that fills max_length leaves no answer token on either side: drop_full_prompts' rows)
            keep.append(chosen != rejected or not any(chosen[1]))
        kept.append(drop_and_count(rows, keep, records, reason, split))
    reports = [records[split] for split in ("train", "eval") if split in records]
    reports += [entry[split] for entry in records.get("mixture", []) for split in ("train", "eval")]
    read = sum(report["rows_read"] for report in reports) or sum(len(rows) for rows in splits)
    truncated = sum(len(rows) - len(k) for rows, k in zip(splits, kept))
    identical = truncated + sum(report["dropped"].get(IDENTICAL, 0) for report in reports)
    if truncated and identical > MAX_IDENTICAL_PAIRS * read:
        raise UserError(
            f"{truncated} of {read} pairs have chosen and rejected that differ only after max_length={limit} tokens "
            f"(with {identical - truncated} equal pairs, more than {MAX_IDENTICAL_PAIRS:.0%}): truncated, they train as "
            "the same sequence and teach nothing; "
            + raise_length_advice(training_args, shorten="the shared start of the answers")
        )
    return kept


def with_explicit_prompt(rows):
    """Pairs whose prompt is implicit (the conversations' shared prefix; a text prompt beside conversations that hold
    it was dropped by the converter) with it as a `prompt` column, as TRL extracts it."""
    from trl.data_utils import maybe_extract_prompt

    if "chosen" in rows.column_names and "prompt" not in rows.column_names:
        return rows.map(maybe_extract_prompt)
    return rows


def load_preference_splits(
    data_args: PreferenceDataArguments, seed: int, unpaired_ok: bool = False, tokenizer=None, training_args=None
):
    """(train, eval, data records): rows in the stage's layout (hfgen.data.formats: pairs, or for KTO also unpaired
    rows; chosen == rejected pairs dropped and counted, also those equal once cut to max_length when `tokenizer` and
    `training_args` are given) with an explicit prompt (extracted from the shared prefix when implicit)."""
    train, evaluation, records = load_for_stage(data_args, data_kind(unpaired_ok), seed=seed)
    splits = []
    for rows in (train, evaluation):
        # only the pair's columns: TRL reads a `messages` column beside them (UltraFeedback-binarized has one) as
        # another layout, and ORPO's and CPO's trainers stop on it
        rows = rows.select_columns([c for c in (*PREFERENCE_COLUMNS, TOOLS_COLUMN) if c in rows.column_names])
        splits.append(with_explicit_prompt(rows))
    if tokenizer is not None:  # the prompt, plain text, is tokenized with the special tokens (TRL's trainers)
        splits = list(splits_without_doubled_bos(*splits, tokenizer, records, ("prompt",)))
    if tokenizer is not None and training_args is not None:
        splits = drop_full_prompts(tokenizer, splits, records, training_args)
        splits = drop_truncated_identical_pairs(tokenizer, splits, records, training_args)
    if "label" in splits[0].column_names and len(set(splits[0]["label"])) == 1:
        kind = "desirable" if splits[0][0]["label"] else "undesirable"
        note = f"every training row is labelled {kind}: KTO learns from both kinds (check the label column)"
        print(f"warning: {note}")
        records.setdefault("notes", []).append(note)
    return (*splits, records)


def load_eval_prompts(name: str) -> list:
    """The prompts of `eval_prompts_dataset` (its test split, else its first), in any prompt layout
    (hfgen.data.formats: a `prompt` column, a .txt of one prompt a line, Alpaca's instructions, conversations)."""
    from hfgen.data.formats import standard_prompts
    from hfgen.data.loading import load_raw_as

    raw = load_raw_as("eval_prompts_dataset", name)  # (its problems name the key)
    split = "test" if "test" in raw else next(iter(raw))
    return standard_prompts(raw[split], "eval_prompts_dataset", name, split)


def held_out_prompt_room(model_config, data_args) -> int | None:
    """The longest held-out prompt the comparison can answer eval_response_length tokens after: within the positions
    of a model with learned position embeddings (GPT-2, OPT: `position_limit`), past which generation fails with an
    IndexError after the training; None (every prompt, as `hfgen eval` samples them) for any other."""
    return answer_room(model_config, "eval_response_length", data_args.eval_response_length, "a held-out prompt")


def fitting_held_out_prompts(tokenizer, prompts: list, room: int | None, data_args, records: dict) -> list:
    """`prompts` less those longer than `room` tokens (`held_out_prompt_room`), counted in `records` (data.json's
    `heldout_dropped`); refused, as the README's bad-rows policy refuses rows over a length limit, when none or fewer
    than half remain."""
    from hfgen.data.prepare import count_dropped
    from hfgen.rl.models import prompt_ids

    if room is None or not prompts:
        return prompts
    keep = [len(ids) <= room for ids in prompt_ids(tokenizer, prompts)]
    dropped = len(keep) - sum(keep)
    reason = (
        f"longer than {room} tokens, the room eval_response_length={data_args.eval_response_length} leaves in the "
        "model's learned positions"
    )
    count_dropped(records, reason, dropped, "heldout")
    if dropped:
        print(f"held-out comparison: dropped {dropped} of {len(keep)} prompts {reason}")
    if sum(keep) < len(keep) / 2 or not sum(keep):
        raise UserError(
            f"{dropped} of {len(keep)} held-out prompts are {reason}: lower eval_response_length, or give shorter "
            "held-out prompts (eval_prompts_dataset), or set eval_samples_per_prompt: 0"
        )
    return [prompt for prompt, kept in zip(prompts, keep) if kept]


def held_out_prompts(data_args: PreferenceDataArguments, eval_rows) -> list:
    """Distinct prompts for the generation comparison, in order. When the preference rows are conversations, a
    plain-string prompt of `eval_prompts_dataset` (a .txt) is sent as one user turn, as grpo/rloo/ppo send theirs
    (`chat_prompts: auto`): raw text is not what the policy was trained to answer."""
    from hfgen.evaluation.policy import distinct_prompts

    if data_args.eval_prompts_dataset:
        prompts = load_eval_prompts(data_args.eval_prompts_dataset)
        if len(eval_rows) and not isinstance(eval_rows[0]["prompt"], str):
            prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    else:
        prompts = eval_rows["prompt"]
    return distinct_prompts(prompts)[: data_args.eval_num_prompts]


# ---- held-out log-probabilities ---------------------------------------------------------------------------


def completion_example(tokenizer, prompt, completion, template_tail: bool = False) -> tuple[list[int], int]:
    """(token ids of prompt + completion, index where the completion starts), tokenized as TRL's preference
    trainers do: chat template for conversations, EOS after plain text, the completion starting where the tokenized
    prompt and prompt+completion diverge. A conversation's completion ends at the assistant's EOS, where the policy's
    answer ends (sft.tokenize_response's cut, as SFT's held-out loss and `hfgen eval`'s perplexity score it): the
    template's text after it (ChatML's newline) is never generated, and its log-prob, learnt in the first steps, made
    most of the held-out chosen "rise". `template_tail` keeps that text, as TRL's DPO and KTO train it."""
    from hfgen.stages.sft import tokenize_response

    return tokenize_response(tokenizer, prompt, completion, None, template_tail)


def completion_logprobs(model, examples: list[tuple[list[int], int]], pad_token_id: int, batch_size: int):
    """[(sum of the completion tokens' log-probs, number of completion tokens)] per example."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    results = []
    with torch.inference_mode():
        for begin in range(0, len(examples), batch_size):
            chunk = examples[begin : begin + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            scored = torch.zeros_like(input_ids, dtype=torch.bool)
            for row, (ids, start) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                scored[row, start : len(ids)] = True
            attention_mask = (torch.arange(width)[None] < torch.tensor([len(i) for i, _ in chunk])[:, None]).long()
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float()
            logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None].to(device))[..., 0]
            mask = scored[:, 1:].to(device)
            results += list(zip((logps * mask).sum(1).tolist(), mask.sum(1).tolist()))
    return results


def held_out_examples(tokenizer, eval_rows) -> dict[str, list]:
    """{"chosen": [...], "rejected": [...]} tokenized completions of the held-out rows (unpaired rows: desirable
    ones as chosen, undesirable ones as rejected; they are then not pairs)."""
    if "chosen" in eval_rows.column_names:
        return {
            side: [completion_example(tokenizer, row["prompt"], row[side]) for row in eval_rows]
            for side in ("chosen", "rejected")
        }
    return {
        side: [completion_example(tokenizer, row["prompt"], row["completion"]) for row in eval_rows
               if bool(row["label"]) == (side == "chosen")]
        for side in ("chosen", "rejected")
    }  # fmt: skip


def preference_figures(before: dict, after: dict, paired: bool, reference_free: bool) -> dict:
    """Log-prob change of chosen and rejected completions, and the implicit reward's held-out accuracy: the
    log-ratio to the starting model (DPO, KTO), or the mean log-prob per token (ORPO, SimPO: reference-free)."""

    def mean(values):
        return sum(values) / len(values) if values else None

    figures = {}
    for side in ("chosen", "rejected"):
        change = [a - b for (a, _), (b, _) in zip(after[side], before[side])]
        figures[f"logps/{side}_initial"] = mean([b for b, _ in before[side]])
        figures[f"logps/{side}"] = mean([a for a, _ in after[side]])
        figures[f"logps/{side}_change"] = mean(change)
    if paired and after["chosen"]:
        if reference_free:
            reward = {side: [s / max(n, 1) for s, n in after[side]] for side in after}
            initial = {side: [s / max(n, 1) for s, n in before[side]] for side in before}
            figures["accuracy_initial"] = mean([float(c > r) for c, r in zip(initial["chosen"], initial["rejected"])])
        else:
            reward = {side: [a - b for (a, _), (b, _) in zip(after[side], before[side])] for side in after}
        figures["accuracy"] = mean([float(c > r) for c, r in zip(reward["chosen"], reward["rejected"])])
        figures["held_out_pairs"] = len(after["chosen"])
    figures["chosen_logp_fell"] = bool(
        figures["logps/chosen_change"] is not None and figures["logps/chosen_change"] < 0
    )
    return figures


CHOSEN_FELL = (
    "warning: the held-out chosen responses' log-probability fell during training ({change:+.2f} nats on average). "
    "The loss only needs chosen to rise *relative to* rejected, and both falling is a known failure of DPO-like "
    "losses (probability mass moves to responses in neither set). Lower learning_rate or beta's pull, train fewer "
    "steps, or add an SFT term (DPO: loss_type [sigmoid, sft]; ORPO/CPO keep one)."
)


# ---- the run ----------------------------------------------------------------------------------------------


def check_stage(
    stage: str, model_args, data_args: PreferenceDataArguments, training_args, unpaired_ok: bool = False
) -> list[str]:
    # DPO's and KTO's trainers refuse an adapter on lm_head (ORPO's and CPO's experimental ones do not say)
    trainer = None if experimental_pair_trainer(training_args) else f"{stage.upper()}Trainer"
    problems = check_model_config(model_args, training_args.trust_remote_code, trl_trainer=trainer)
    if getattr(training_args, "sync_ref_model", False) and model_args.use_peft:  # TRL's NotImplementedError
        problems.append(
            "sync_ref_model needs a reference model of its own to update, and with use_peft the reference is the "
            "adapter-disabled policy: set sync_ref_model: false, or train without use_peft"
        )
    if experimental_pair_trainer(training_args) and training_args.max_completion_length is not None:
        # TRL's ORPO and CPO cut the answer by it for encoder-decoder models only; hfgen trains causal LMs
        problems.append(
            f"max_completion_length {training_args.max_completion_length} has no effect in ORPO and SimPO with a "
            "decoder-only model (TRL reads it for encoder-decoder models only), and answers would train uncut: "
            "leave it unset; max_length cuts the answer (the prompt is kept whole)"
        )
    model = None if problems else model_args.model_name_or_path  # its tokenizer renders conversations
    return problems + check_preference_data(
        data_args, unpaired_ok, model, training_args.trust_remote_code, training_args, stage
    )


def starting_model_while_training(model_args, training_args, needs_reference: bool) -> bool:
    """Whether the starting model is loaded before training (full fine-tuning: the loss's reference, and ORPO's
    and SimPO's baseline). With `precompute_ref_log_probs` TRL computes the reference's log-probs with the policy
    before its first step and keeps no reference in memory, so none is passed and the comparison's baseline is
    loaded after training; not under FSDP, where TRL would load a reference of its own for the precompute."""
    if model_args.use_peft:
        return False
    precomputed = getattr(training_args, "precompute_ref_log_probs", False)
    return not (needs_reference and precomputed and not loop.launched_engine().startswith("fsdp"))


# where the rows TRL precomputes the reference's log-probs for live during a run of several processes (inside its
# output_dir, which every process shares), removed at the run's end
REFERENCE_CACHE = "reference_logps_cache"


def on_shared_files(datasets: list, directory: Path, training_args) -> list:
    """`datasets` (in memory) as files in `directory` read by every process, when TRL precomputes the reference's
    log-probs (`precompute_ref_log_probs`) in a run of several processes; else as they are. TRL writes the log-probs
    on the main process beside the dataset's cache files and every process then reads that path: for an in-memory
    dataset it is under `datasets`' temporary dir, another on each process, where the others found no file."""
    if not getattr(training_args, "precompute_ref_log_probs", False) or training_args.world_size == 1:
        return datasets
    from datasets import Dataset

    shared = []
    with training_args.main_process_first(local=False, desc="the rows of the reference's log-probs"):
        if training_args.process_index == 0:
            shutil.rmtree(directory, ignore_errors=True)  # an earlier run's files (its tokenized rows, log-probs)
            directory.mkdir(parents=True)
        for name, rows in zip(("train", "eval"), datasets, strict=True):
            path = str(directory / f"{name}.arrow")
            if rows is not None and training_args.process_index == 0:
                rows.flatten_indices(cache_file_name=path)
            shared.append(None if rows is None else Dataset.from_file(path))
    return shared


def run_stage(
    method: str, trainer_class, model_args, data_args: PreferenceDataArguments, training_args,
    needs_reference: bool, unpaired: bool = False,
) -> Path:  # fmt: skip
    """Train `trainer_class` (a TRL preference trainer) and record the held-out figures. `needs_reference`: the
    loss uses a frozen reference model (DPO, KTO), loaded here for full fine-tuning. `unpaired` (KTO): paired
    training rows become a desirable and an undesirable row each, shuffled (`formats.unpaired_rows` says why)."""
    from accelerate.utils import is_peft_model
    from transformers import set_seed

    from hfgen.evaluation.policy import Sampling, compare_to_reference, format_comparison, load_judges
    from hfgen.finetune import load_model, lora_config, restore_router_logits, router_logits_for_training, upcast_like
    from hfgen.models import count_parameters, load_tokenizer

    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    tokenizer = load_tokenizer(model_args.model_name_or_path, training_args.trust_remote_code)
    model = load_model(model_args, training_args, tokenizer)
    # The starting model, frozen: the loss's reference (DPO, KTO) and the evaluation's baseline. With LoRA it is
    # the policy with its adapter disabled; when TRL needs none during training, it is loaded after training.
    reference = (
        load_model(model_args, training_args, tokenizer).eval()
        if starting_model_while_training(model_args, training_args, needs_reference)
        else None
    )
    if reference is not None:
        reference.requires_grad_(False)

    train_rows, eval_rows, data_records = load_preference_splits(
        data_args, data_seed(training_args), unpaired, tokenizer, training_args
    )
    # how its prompts are rendered (eval.json says at the end): for a checkpoint of a run not finished yet
    data_records["trained_on_chat"] = prompts_are_chat(train_rows, tokenizer)
    # the comparison's prompts, within the model's positions (before the training: a prompt past them failed after)
    compared = bool(data_args.eval_samples_per_prompt and data_args.eval_num_prompts)
    prompt_room = held_out_prompt_room(model.config, data_args)
    comparison_prompts = (
        fitting_held_out_prompts(
            tokenizer, held_out_prompts(data_args, eval_rows), prompt_room, data_args, data_records
        )  # fmt: skip
        if compared
        else []
    )
    record(output_dir, data_records)
    if unpaired and "chosen" in train_rows.column_names:
        train_rows = unpaired_rows(train_rows, data_seed(training_args))
    extra = {"ref_model": reference} if needs_reference and reference is not None else {}
    if experimental_pair_trainer(training_args):
        trainer_rows = [answers_cut_at_eos(tokenizer, rows) for rows in (train_rows, eval_rows)]
    else:
        trainer_rows = [train_rows, eval_rows]
    trainer_rows = on_shared_files(trainer_rows, output_dir / REFERENCE_CACHE, training_args)
    # a Mixture-of-Experts model trains the load-balancing loss in ORPO and SimPO too, as in DPO and KTO
    loaded_router_logits = router_logits_for_training(model, switch_on=experimental_pair_trainer(training_args))
    trainer = build_trainer(
        trainer_class,
        output_dir,
        model=model,
        args=training_args,
        train_dataset=trainer_rows[0],
        eval_dataset=trainer_rows[1],
        processing_class=tokenizer,
        peft_config=lora_config(model_args, model),
        **extra,
    )

    is_main = trainer.is_world_process_zero()
    eval_batch = training_args.per_device_eval_batch_size
    examples = held_out_examples(tokenizer, eval_rows)
    # measured outside the Trainer, before DDP wraps it; whole weights under ZeRO-3 (partitioned at load); in the
    # precision the prepared model computes `after` in
    with (
        loop.gathered(trainer.accelerator, trainer.model) as (policy_model,),
        loop.computing_as_prepared(trainer.accelerator, policy_model),
    ):
        before = {
            s: completion_logprobs(policy_model, e, tokenizer.pad_token_id, eval_batch) for s, e in examples.items()
        }

    resume = tracking.trainer_resume(trainer, output_dir)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    # The trained policy's held-out log-probabilities before the save: a model the last update broke (the guard saw
    # only that step's loss and gradients) is not saved
    with loop.gathered(trainer.accelerator, trainer.model_wrapped) as (policy,):
        after = {s: completion_logprobs(policy, e, tokenizer.pad_token_id, eval_batch) for s, e in examples.items()}
    guard.check_final_model(
        output_dir,
        trainer.state.global_step,
        {f"held-out {side} log-probability": sum(logp for logp, _ in pairs) for side, pairs in after.items()},
    )
    restore_router_logits(trainer.model, loaded_router_logits)
    trainer.save_model(str(output_dir))
    guard.kill_point("final_save")
    loop.maybe_write_fingerprint(trainer.accelerator, trainer.model, output_dir)  # tests only

    # The trained policy's figures and the held-out generation against the starting model (same prompts and random
    # numbers), with whole weights as in PPO's rollout: gathered under ZeRO-3, unsharded under FSDP2. Gathered are
    # the engine (`model_wrapped`: with `model` DeepSpeed's fetch hooks stay on and each pass re-partitions) and the
    # starting model: TRL's prepared reference (DPO, KTO), or the one loaded for the comparison (ORPO, SimPO).
    frozen = (getattr(trainer, "ref_model", None) or reference) if reference is not None else None
    if not model_args.use_peft and (frozen is None or getattr(training_args, "sync_ref_model", False)):
        # not loaded (precompute_ref_log_probs), or DPO's sync_ref_model mixed the policy into TRL's reference during
        # training: no longer the starting model the comparison and kl_to_reference are against. Loaded now.
        frozen = load_model(model_args, training_args, tokenizer).eval().requires_grad_(False)
    # the starting model as the policy was at its start (ORPO and SimPO's and a reference loaded now are in the
    # dtype asked; TRL's was upcast with the policy), computing as the policy does (`loop.computing_as_prepared`)
    upcast_like(frozen, trainer.model)
    # The judges; the learned one (reward_model_path) placed for the engine and gathered with the policy, as PPO's
    # and GRPO's reward models are: under ZeRO-3 it loads partitioned (`zero.Init`), every weight empty until gathered.
    device = trainer.accelerator.device
    scorer, oracle = (
        load_judges(data_args.reward_model_path, data_args.oracle_function, eval_batch, device)
        if compared
        else (None, None)
    )
    judge = loop.prepare_frozen(trainer.accelerator, scorer.reward_model) if scorer is not None else None
    with (
        loop.gathered(trainer.accelerator, trainer.model_wrapped, frozen, judge) as (policy, reference, judge),
        loop.computing_as_prepared(trainer.accelerator, reference),
    ):
        guard.kill_point("eval")
        parameters = count_parameters(policy), count_parameters(policy, trainable_only=True)  # whole, not a shard
        comparison, rows = {}, []
        if compared:
            if scorer is not None:
                scorer.reward_model = judge  # its whole weights (the engine's own forward gathers them each pass)
            sampling = Sampling(
                samples_per_prompt=data_args.eval_samples_per_prompt, response_length=data_args.eval_response_length,
                temperature=data_args.eval_temperature, seed=training_args.seed, chunk_size=max(eval_batch, 16),
                max_prompt_length=prompt_room,
            )  # fmt: skip
            if reference is not None:
                reference.to(device)
            comparison, rows = compare_to_reference(
                trainer.accelerator, policy, reference if not is_peft_model(policy) else None, tokenizer,
                comparison_prompts, sampling, scorer, oracle, name=method,
            )  # fmt: skip
    figures = preference_figures(before, after, "chosen" in eval_rows.column_names, not needs_reference)
    if figures["chosen_logp_fell"] and is_main:
        print(CHOSEN_FELL.format(change=figures["logps/chosen_change"]))

    if is_main:
        shutil.rmtree(output_dir / REFERENCE_CACHE, ignore_errors=True)  # training has read it
        tracking.write_jsonl(output_dir / "policy_eval.jsonl", rows)
        tracking.update_eval(
            output_dir,
            {
                **tracking.best_model_record(trainer),
                **figures,
                **comparison,
                "method": method,
                "train_rows": len(train_rows),
                "train_loss": tracking.run_train_loss(trainer, result.training_loss, resume),
                "train_runtime_s": result.metrics["train_runtime"],
                "train_samples_per_s": result.metrics["train_samples_per_second"],
                "steps": trainer.state.global_step,
                "parameters": parameters[0],
                "trainable_parameters": parameters[1],
                "peft": model_args.use_peft,
                # how its prompts were rendered, for `hfgen generate` / `eval` to prompt it the same way
                "trained_on_chat": prompts_are_chat(train_rows, tokenizer),
            },
        )
        if comparison:
            print(format_comparison(comparison, method))
    return output_dir
