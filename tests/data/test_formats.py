"""Dataset layouts, column mapping, splits, mixtures and the bad-row policy, on small files the tests write
(data only: no model is built)."""

import csv
import gzip
import json
from collections import Counter

import pytest
from datasets import Dataset

from hfgen.data.formats import check_rows, to_standard
from hfgen.data.loading import load_raw
from hfgen.data.prepare import TextDataArguments, load_for_stage
from hfgen.errors import UserError


def jsonl(path, rows, compress=False):
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if compress:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return str(path)


def load(path, kind, **keys):
    return load_for_stage(TextDataArguments(dataset_name=str(path), **keys), kind)


def hub_readme(folder, train_files: dict) -> None:
    """A hub-style dataset card declaring one configuration per entry: its name and its train split's file."""
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        + "".join(
            f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {path}\n"
            for c, path in train_files.items()
        )
        + "---\n"
    )


def turns(*pairs, role="role", content="content"):
    return [{role: r, content: c} for r, c in pairs]


ALPACA = [
    {"instruction": f"name a colour {i}", "input": "" if i % 2 else "a warm one", "output": f"red {i}"}
    for i in range(40)
]
DOLLY = [
    {"instruction": f"sum {i}", "context": f"{i} and {i}", "response": f"{2 * i}", "category": "qa"} for i in range(40)
]
SHAREGPT = [
    {
        "conversations": turns(("human", f"hi {i}"), ("gpt", f"hello {i}"), role="from", content="value"),
        "system": "be brief",
    }
    for i in range(40)
]
ULTRACHAT = [
    {"prompt": f"q {i}", "prompt_id": f"id{i}", "messages": turns(("user", f"q {i}"), ("assistant", f"a {i}"))}
    for i in range(40)
]
HH = [
    {"chosen": f"\n\nHuman: q{i}\n\nAssistant: good {i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad {i}"}
    for i in range(40)
]
ULTRAFEEDBACK = [
    {
        "prompt": f"q{i}",
        "chosen": turns(("user", f"q{i}"), ("assistant", f"good {i}")),
        "rejected": turns(("user", f"q{i}"), ("assistant", f"bad {i}")),
        "score_chosen": 8.0,
    }
    for i in range(40)
]
TLDR = [{"prompt": f"POST: story {i}\nTL;DR:", "chosen": f" short {i}", "rejected": f" long {i}"} for i in range(40)]


@pytest.mark.parametrize(
    "rows, kind, fmt, columns, check",
    [
        (ALPACA, "sft", "alpaca", ["prompt", "completion"], lambda r: r["prompt"].startswith("name a colour")),
        (DOLLY, "sft", "dolly", ["prompt", "completion"], lambda r: "and" in r["prompt"]),
        (SHAREGPT, "sft", "sharegpt", ["messages"], lambda r: [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]),
        (ULTRACHAT, "sft", "messages", ["messages"], lambda r: r["messages"][1]["role"] == "assistant"),
        (ULTRACHAT, "prompt", "prompt", ["prompt"], lambda r: isinstance(r["prompt"], str)),
        (SHAREGPT, "prompt", "sharegpt", ["prompt"], lambda r: r["prompt"][-1]["role"] == "user"),
        ([{"messages": turns(("user", f"q{i}"))} for i in range(40)], "prompt", "messages", ["prompt"], lambda r: len(r["prompt"]) == 1),
        (HH, "preference", "preference", ["chosen", "rejected"], lambda r: r["chosen"].startswith("\n\nHuman")),
        (ULTRAFEEDBACK, "preference", "preference", ["chosen", "rejected"], lambda r: r["chosen"][0]["role"] == "user"),
        (TLDR, "preference", "preference", ["chosen", "prompt", "rejected"], lambda r: "TL;DR" in r["prompt"]),
        (TLDR, "prompt", "prompt", ["prompt"], lambda r: "TL;DR" in r["prompt"]),
        ([{"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2 == 0} for i in range(40)], "unpaired_preference", "unpaired_preference", ["completion", "label", "prompt"], lambda r: isinstance(r["label"], bool)),
        ([{"conversations": turns(("user", f"q{i}"), ("assistant", f"a{i}"))} for i in range(40)], "sft", "sharegpt", ["messages"], lambda r: [m["role"] for m in r["messages"]] == ["user", "assistant"]),
        ([{"messages": turns(("human", f"q{i}"), ("gpt", f"a{i}"), role="from", content="value")} for i in range(40)], "sft", "messages", ["messages"], lambda r: r["messages"][1] == {"role": "assistant", "content": r["messages"][1]["content"]}),
        ([{"text": f"describe the cat {i}."} for i in range(40)], "prompt", "text", ["prompt"], lambda r: r["prompt"].startswith("describe")),
        ([{**row, "text": "Below is an instruction. " + row["output"]} for row in ALPACA], "prompt", "alpaca", ["prompt"], lambda r: r["prompt"].startswith("name a colour")),
    ],
    ids=["alpaca", "dolly", "sharegpt", "ultrachat-sft", "ultrachat-prompts", "sharegpt-prompts", "messages-prompts", "hh-rlhf", "ultrafeedback", "tldr", "tldr-prompts", "unpaired", "sharegpt-role-content-turns", "messages-from-value-turns", "prompts-one-per-line", "alpaca-with-rendered-text-prompts"],
)  # fmt: skip
def test_each_layout_is_detected_and_converted(tmp_path, rows, kind, fmt, columns, check):
    train, evaluation, records = load(jsonl(tmp_path / "data.jsonl", rows), kind)
    assert records["train"]["format"] == fmt
    assert sorted(train.column_names) == sorted(columns) and len(train) + len(evaluation) == len(rows)
    assert all(check(row) for row in train)


def test_format_and_column_mapping_are_declared(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}", "extra": 1} for i in range(20)]
    path = jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(UserError, match="match no sft layout.*dataset_format"):
        load(path, "sft")
    train, _, _ = load(path, "sft", dataset_columns='{"prompt": "question", "completion": "answer"}')
    assert sorted(train.column_names) == ["completion", "prompt"]
    train, _, records = load(path, "sft", dataset_format="alpaca", dataset_columns="instruction=question,output=answer")
    assert records["train"]["format"] == "alpaca" and train[0]["completion"].startswith("a")
    with pytest.raises(UserError, match="lacks column"):
        load(path, "sft", dataset_format="dolly")


def test_ambiguous_columns_ask_for_the_format(tmp_path):
    rows = [{"text": "t", "messages": turns(("user", "q"), ("assistant", "a"))}] * 10
    with pytest.raises(UserError, match="several sft layouts"):
        load(jsonl(tmp_path / "both.jsonl", rows), "sft")
    train, _, _ = load(jsonl(tmp_path / "both.jsonl", rows), "sft", dataset_format="messages")
    assert train.column_names == ["messages"]


def test_compressed_json_lines_load(tmp_path):
    train, _, records = load(jsonl(tmp_path / "alpaca.jsonl.gz", ALPACA, compress=True), "sft")
    assert records["train"]["format"] == "alpaca" and len(train) > 30


def test_blank_lines_of_a_text_corpus_are_dropped_and_counted(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"paragraph {i} about the cat." if i % 3 == 2 else "" for i in range(90)))
    train, evaluation, records = load(path, "text")
    dropped = records["train"]["dropped"]["empty rows"] + records["eval"]["dropped"].get("empty rows", 0)
    assert dropped == 60 and len(train) + len(evaluation) == 30 and all(t.strip() for t in train["text"])


def test_a_text_corpus_stays_memory_mapped_and_its_empty_rows_are_counted(tmp_path):
    """A pretraining corpus (GBs) was converted row by row into Python dicts and a Dataset held in memory at every
    load: ~10x the file in RAM, and nothing the packing's map could cache. Its standard text is now the rows of
    datasets' cache file (memory-mapped), less the rows without text, counted under the same reasons."""
    rows = [{"text": f"doc {i} about the cat.", "source": "web"} for i in range(40)]
    rows[3], rows[9], rows[17] = {}, {"text": "  ", "source": None}, {"text": " \t", "source": "web"}
    rows[30] = {"text": "", "source": "book"}
    train, evaluation, records = load(jsonl(tmp_path / "corpus.jsonl", rows), "text")
    assert train.cache_files and evaluation.cache_files  # (an in-memory Dataset has none)
    dropped = Counter(records["train"]["dropped"]) + Counter(records["eval"]["dropped"])
    assert dropped == {"empty rows": 2, "empty text": 2} and len(train) + len(evaluation) == 36
    assert train.column_names == ["text"] and all(text.strip() for text in [*train["text"], *evaluation["text"]])
    prompts, report = to_standard(load_raw(str(tmp_path / "corpus.jsonl"), None)["train"], "prompt")
    assert prompts.column_names == ["prompt"] and len(prompts) == report.rows_kept == 36
    assert list(report.dropped.items()) == [("empty rows", 2), ("empty text", 2)]


def test_spreadsheet_csv_with_bom_and_empty_lines(tmp_path):
    path = tmp_path / "sheet.csv"
    with open(path, "w", newline="", encoding="utf-8-sig") as f:  # a BOM, as spreadsheets write
        writer = csv.writer(f, lineterminator="\r\n")
        writer.writerow(["prompt", " completion"])
        for i in range(30):
            writer.writerow([f"question {i}", f"answer {i}"])
            if i % 10 == 0:
                writer.writerow(["", ""])
    train, evaluation, records = load(path, "sft")
    assert sorted(train.column_names) == ["completion", "prompt"]
    assert len(train) + len(evaluation) == 30


def test_split_prefix_rule_is_used_and_recorded(tmp_path):
    import datasets

    rows = datasets.Dataset.from_list(TLDR)
    splits = {"train_prefs": rows, "test_prefs": rows.select(range(5)), "train_sft": rows, "test_sft": rows}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "uf")
    datasets.DatasetDict({"train_a": rows, "train_b": rows}).save_to_disk(tmp_path / "ab")
    with pytest.raises(UserError, match="several splits start with it \\(train_a, train_b\\)"):
        load(tmp_path / "ab", "preference")  # no split is named for the stage's data: the recipe must say which
    train, evaluation, records = load(tmp_path / "uf", "preference", dataset_train_split="train_prefs")
    assert len(evaluation) == 5 and any("test_prefs" in note for note in records["train"]["notes"])
    # UltraFeedback-binarized's names: a preference stage takes train_prefs / test_prefs, an SFT stage train_sft
    train, evaluation, records = load(tmp_path / "uf", "preference")
    assert len(evaluation) == 5 and any(
        "used 'train_prefs', the one for this stage" in n for n in records["train"]["notes"]
    )
    train, evaluation, records = load(tmp_path / "uf", "sft", dataset_format="prompt_completion",
                                      dataset_columns='{"completion": "chosen"}')  # fmt: skip
    assert len(evaluation) == len(TLDR) and any("used 'train_sft'" in n for n in records["train"]["notes"])


def test_tab_separated_files_load(tmp_path):
    path = tmp_path / "sheet.tsv"
    path.write_text("instruction\tinput\toutput\n" + "".join(f"say {i}, please\t\tword {i}\n" for i in range(30)))
    train, evaluation, records = load(path, "sft")
    assert records["train"]["format"] == "alpaca" and len(train) + len(evaluation) == 30
    assert all(", please" in prompt for prompt in train["prompt"])  # the comma is text, not a separator


def test_a_folder_of_images_with_caption_files_loads_as_image_and_text(tmp_path):
    from PIL import Image

    from hfgen.data.loading import load_raw

    for split, count in (("train", 6), ("test", 2)):  # kohya-style: cat.png beside cat.txt
        folder = tmp_path / "set" / split
        folder.mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(f"a red square {split} {i}\n")
    raw = load_raw(str(tmp_path / "set"))
    assert sorted(raw) == ["test", "train"] and len(raw["train"]) == 6 and len(raw["test"]) == 2
    assert raw["train"][3]["text"] == "a red square train 3" and raw["train"][3]["image"].size == (8, 8)
    # Notepad's "UTF-8" writes a byte-order mark: it was kept, a leading token no typed prompt has
    (tmp_path / "set" / "train" / "2.txt").write_bytes("\ufeffa red square with a BOM\r\n".encode())
    assert load_raw(str(tmp_path / "set"))["train"][2]["text"] == "a red square with a BOM"
    (tmp_path / "set" / "train" / "5.txt").unlink()
    with pytest.raises(UserError, match="1 has none.*5.png"):
        load_raw(str(tmp_path / "set"))


@pytest.mark.parametrize(
    "rows, kind, expected",
    [
        (ALPACA[:10] + [{"instruction": "x", "input": ""}] + ALPACA[10:], "sft", ["'output'", "rows [11]"]),
        ([{"text": "a"}] * 5 + [{"text": None, "id": 3}] + [{"text": "b"}] * 5, "text", ["'text'", "rows [6]"]),
        ([{"conversations": [{"from": "human"}]}] * 10, "sft", ["turn 1", "value"]),
        ([{"conversations": [{"from": "robot", "value": "x"}]}] * 10, "sft", ["robot"]),
        ([{"chosen": "a", "rejected": "a"}] * 5 + [{"chosen": "a", "rejected": "b"}] * 20, "preference", ["chosen equal to rejected", "10%"]),
        ([{"text": ""}] * 10, "text", ["no usable training rows", "empty"]),
        ([{"prompt": "p", "chosen": "a"}] * 10, "preference", ["no preference layout", "rejected"]),
    ],
    ids=["alpaca-missing-output", "null-text", "turn-without-content", "unknown-speaker", "identical-pairs", "all-empty", "missing-column"],
)  # fmt: skip
def test_broken_files_raise_naming_row_and_column(tmp_path, rows, kind, expected):
    with pytest.raises(UserError) as error:
        load(jsonl(tmp_path / "bad.jsonl", rows), kind)
    for text in expected:
        assert text in str(error.value)


def test_a_few_identical_pairs_are_dropped_and_counted(tmp_path):
    rows = [{"chosen": f"a{i}", "rejected": f"b{i}" if i % 25 else f"a{i}"} for i in range(100)]
    train, evaluation, records = load(jsonl(tmp_path / "pairs.jsonl", rows), "preference")
    dropped = records["train"]["dropped"].get("chosen equal to rejected", 0) + records["eval"]["dropped"].get(
        "chosen equal to rejected", 0
    )
    assert dropped == 4 and len(train) + len(evaluation) == 96


def test_mixture_draws_by_weight_and_records_rows_per_set(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"text": f"a {i}"} for i in range(400)])
    b = jsonl(tmp_path / "b.jsonl", [{"content": f"b {i}"} for i in range(400)])
    args = TextDataArguments(
        datasets=[
            json.dumps({"name": a, "weight": 0.8}),
            json.dumps({"name": b, "weight": 0.2, "columns": {"text": "content"}}),
        ]
    )
    train, evaluation, records = load_for_stage(args, "text", seed=0)
    drawn = [entry["rows_drawn"] for entry in records["mixture"]]
    assert sum(drawn) == len(train) and 3 < drawn[0] / drawn[1] < 6  # 0.8 / 0.2 = 4
    assert records["stopping_strategy"] == "first_exhausted" and len(evaluation) == 40
    with pytest.raises(UserError, match="did you mean 'weight'"):
        TextDataArguments(datasets=[json.dumps({"name": a, "weigth": 1})])


def test_to_standard_is_a_public_api_on_in_memory_data():
    import datasets

    rows = datasets.Dataset.from_list(DOLLY)
    standard, report = to_standard(rows, "prompt", "dolly")
    assert standard.column_names == ["prompt"] and report.rows_kept == 40


def test_parquet_files_ultrachat_and_wikitext_style(tmp_path):
    import datasets

    datasets.Dataset.from_list(ULTRACHAT).to_parquet(tmp_path / "ultrachat.parquet")
    train, _, records = load(tmp_path / "ultrachat.parquet", "sft")
    assert records["train"]["format"] == "messages" and train.column_names == ["messages"]
    lines = [" = Title = ", "", " text line one . ", "", "", " more text . "] * 20  # wikitext: many empty rows
    datasets.Dataset.from_dict({"text": lines}).to_parquet(tmp_path / "wiki.parquet")
    train, evaluation, records = load(tmp_path / "wiki.parquet", "text")
    assert len(train) + len(evaluation) == 60


def test_recipe_keys_take_yaml_mappings_for_columns_and_mixtures(tmp_path):
    import yaml

    from hfgen.recipe import load_recipe

    a = jsonl(tmp_path / "a.jsonl", ALPACA)
    b = jsonl(tmp_path / "b.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(40)])
    recipe = {
        "stage": "sft", "model_name_or_path": "x", "output_dir": str(tmp_path / "out"), "use_cpu": True, "bf16": False,
        "datasets": [{"name": a, "weight": 0.5}, {"name": b, "weight": 0.5, "columns": {"prompt": "question", "completion": "answer"}}],
    }  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    data_args = load_recipe(tmp_path / "r.yaml", check_inputs=False).configs[1]
    assert [e.weight for e in data_args.mixture] == [0.5, 0.5]
    train, _, records = load_for_stage(data_args, "sft")
    assert [e["train"]["format"] for e in records["mixture"]] == ["alpaca", "prompt_completion"]
    overridden = load_recipe(tmp_path / "r.yaml", ["--dataset_columns", "prompt=question"], check_inputs=False)
    assert overridden.configs[1].dataset_columns == {"prompt": "question"}


PAIR_TEXTS = [(f"write about the cat {i}.", f"the cat {i} sleeps.", f"a dog {i}.") for i in range(40)]


@pytest.mark.parametrize(
    "rows, prompt, chosen",
    [
        # a chat prompt with text answers: the answers become assistant turns
        ([{"prompt": turns(("user", q)), "chosen": c, "rejected": r} for q, c, r in PAIR_TEXTS],
         lambda q: turns(("user", q)), lambda c: turns(("assistant", c))),
        # a text prompt with answers as assistant turns alone: the prompt becomes the user turn
        ([{"prompt": q, "chosen": turns(("assistant", c)), "rejected": turns(("assistant", r))} for q, c, r in PAIR_TEXTS],
         lambda q: turns(("user", q)), lambda c: turns(("assistant", c))),
        # whole conversations of ShareGPT turns ({from, value}): implicit prompt, {role, content} turns
        ([{"chosen": turns(("human", q), ("gpt", c), role="from", content="value"),
           "rejected": turns(("human", q), ("gpt", r), role="from", content="value")} for q, c, r in PAIR_TEXTS],
         None, lambda c: None),
        # LLaMA-Factory's preference layout: the prompt turns in `conversations`, each answer one turn
        ([{"conversations": turns(("human", q), role="from", content="value"), "chosen": {"from": "gpt", "value": c},
           "rejected": {"from": "gpt", "value": r}} for q, c, r in PAIR_TEXTS],
         lambda q: turns(("user", q)), lambda c: turns(("assistant", c))),
    ],
    ids=["chat-prompt-text-answers", "text-prompt-assistant-turns", "sharegpt-turn-pairs", "llama-factory-pairs"],
)  # fmt: skip
def test_preference_pairs_in_one_form_for_trl(tmp_path, rows, prompt, chosen):
    """TRL needs a pair's prompt and answers all text or all chat turns, turns as {role, content}."""
    train, evaluation, records = load(jsonl(tmp_path / "pairs.jsonl", rows), "preference")
    assert records["train"]["format"] == "preference" and len(train) + len(evaluation) == len(rows)
    by_chosen = {c: (q, c) for q, c, _ in PAIR_TEXTS}
    for row in train:
        text = row["chosen"][-1]["content"]
        assert row["chosen"][-1] == {"role": "assistant", "content": text}
        q, c = by_chosen[text]
        if prompt is None:  # the conversations hold the prompt (TRL extracts it)
            assert row["chosen"][0] == {"role": "user", "content": q} and "prompt" not in row
        else:
            assert row["prompt"] == prompt(q) and row["chosen"] == chosen(c)


def test_prompt_files_keep_their_other_columns_for_reward_functions(tmp_path):
    """GRPO's reward functions read a file's other columns (GSM8K's reference `answer`), under a mapped prompt."""
    rows = [{"question": f"{i}+1=?", "answer": f"#### {i + 1}", "id": i} for i in range(40)]
    path = jsonl(tmp_path / "gsm.jsonl", rows)
    keys = {"dataset_columns": {"prompt": "question"}}
    train, _, records = load_for_stage(TextDataArguments(dataset_name=path, **keys), "prompt", other_columns=True)
    assert records["train"]["format"] == "prompt" and sorted(train.column_names) == ["answer", "id", "prompt"]
    assert all(row["answer"] == f"#### {row['id'] + 1}" and row["prompt"] == f"{row['id']}+1=?" for row in train)
    plain, _, _ = load_for_stage(TextDataArguments(dataset_name=path, **keys), "prompt")  # PPO's: prompts alone
    assert plain.column_names == ["prompt"]


def test_unpaired_rows_for_a_paired_stage_name_the_kto_stage(tmp_path):
    path = jsonl(
        tmp_path / "kto.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2 == 0} for i in range(20)]
    )
    with pytest.raises(UserError, match="unpaired rows.*kto stage"):
        load(path, "preference")
    train, _, records = load(path, "unpaired_preference")  # KTO's kind takes them, and pairs too
    assert records["train"]["format"] == "unpaired_preference"
    pairs = jsonl(tmp_path / "pairs.jsonl", TLDR)
    assert load(pairs, "unpaired_preference")[2]["train"]["format"] == "preference"


def mixture(tmp_path, kind, *sets, dataset_columns=None, **keys):
    entries = []
    for i, (rows, extra) in enumerate(sets):
        entries.append({"name": jsonl(tmp_path / f"set{i}.jsonl", rows), "weight": 1.0, **extra})
    return load_for_stage(TextDataArguments(datasets=entries, dataset_columns=dataset_columns), kind, **keys)


def test_a_mixture_of_text_and_chat_layouts_trains_as_chat(tmp_path):
    """Alpaca beside ShareGPT (LLaMA-Factory users mix them): the text rows become a user and an assistant turn."""
    train, evaluation, records = mixture(tmp_path, "sft", (ALPACA, {}), (SHAREGPT, {}))
    assert [e["train"]["format"] for e in records["mixture"]] == ["alpaca", "sharegpt"]
    assert train.column_names == evaluation.column_names == ["messages"]
    roles = {tuple(m["role"] for m in row["messages"]) for row in train}
    assert roles == {("user", "assistant"), ("system", "user", "assistant")}
    prompts, _, _ = mixture(tmp_path, "prompt", (ALPACA, {}), (SHAREGPT, {}))
    assert all(isinstance(row["prompt"], list) and row["prompt"][-1]["role"] == "user" for row in prompts)
    pairs, _, _ = mixture(tmp_path, "preference", (TLDR, {}), (ULTRAFEEDBACK, {}))  # explicit text, conversations
    assert all(row["chosen"][-1]["role"] == "assistant" for row in pairs)


def test_kto_mixes_pairs_with_unpaired_rows_and_grpo_keeps_the_columns_all_sets_have(tmp_path):
    unpaired = [{"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2 == 0} for i in range(40)]
    train, _, _ = mixture(tmp_path, "unpaired_preference", (unpaired, {}), (TLDR, {}))
    assert train.column_names == ["prompt", "completion", "label"] and len(train) > 40  # pairs gave two rows each
    assert {row["completion"] for row in train} & {pair["chosen"] for pair in TLDR}
    train, _, _ = mixture(tmp_path, "unpaired_preference", (unpaired, {}), (HH, {}))  # implicit prompts: extracted
    assert {row["prompt"] for row in train} & {f"\n\nHuman: q{i}\n\nAssistant:" for i in range(40)}
    gsm = [{"question": f"{i}+1=?", "answer": f"#### {i + 1}", "source": "gsm"} for i in range(40)]
    other = [{"prompt": f"{i}+2=?", "answer": f"#### {i + 2}", "level": 1} for i in range(40)]
    train, _, _ = mixture(
        tmp_path, "prompt", (gsm, {"columns": {"prompt": "question"}}), (other, {}), other_columns=True
    )
    assert sorted(train.column_names) == ["answer", "prompt"]  # `source` and `level` are in one set only


def test_values_files_write_as_numbers_or_parts_are_read_as_text(tmp_path):
    """A CSV column of figures, a JSON answer written as 42, OpenAI content parts and tool calls: read as text
    (were a traceback, a refusal without a way out, or tool calls dropped); a value that is no text is refused
    by row and column."""
    (tmp_path / "qa.csv").write_text(
        "prompt,completion\n" + "".join(f'"what is {i} plus one",{i + 1}\n' for i in range(20))
    )
    train, _, _ = load(tmp_path / "qa.csv", "sft")
    assert all(row["completion"].isdigit() for row in train)
    mixed = [{"instruction": "add one to", "input": i, "output": i + 1 if i % 2 else f"{i + 1}"} for i in range(20)]
    train, _, _ = load(jsonl(tmp_path / "mixed.jsonl", mixed), "sft")
    assert {row["completion"] for row in train} <= {str(i + 1) for i in range(20)}
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    chats = [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": f"weather {i}?"}]},
                      {"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "name": "weather", "content": "sunny"},
                      {"role": "assistant", "content": f"sunny {i}"}]}
        for i in range(20)
    ] + [{"messages": turns(("user", f"hi {i}"), ("assistant", f"hello {i}"))} for i in range(20)]  # fmt: skip
    train, _, _ = load(jsonl(tmp_path / "tools.jsonl", chats), "sft")
    rows = [row["messages"] for row in train]
    with_tools = [m for m in rows if len(m) == 4]
    assert with_tools and with_tools[0][0]["content"].startswith("weather") and with_tools[0][1]["tool_calls"] == [call]
    assert all("tool_calls" not in turn for m in rows if len(m) == 2 for turn in m)  # no key where a turn had none
    for rows, expected in (([{"text": True}] * 20, "true/false"), ([{"text": {"a": 1}}] * 20, "row 1, column 'text'")):
        with pytest.raises(UserError, match=expected):
            load(jsonl(tmp_path / "bad.jsonl", rows), "text")


def test_files_folders_and_splits_as_people_have_them(tmp_path):
    import datasets

    pairs = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)]
    (tmp_path / "parts").mkdir()
    for k in range(3):
        jsonl(tmp_path / "parts" / f"part{k}.jsonl", pairs)
    train, evaluation, _ = load(tmp_path / "parts" / "*.jsonl", "sft")  # a glob pattern
    assert len(train) + len(evaluation) == 60
    (tmp_path / "parts" / "extra.csv").write_text("prompt,completion\na,b\n")
    with pytest.raises(UserError, match="different types"):  # was: the CSV's rows left out without a word
        load(tmp_path / "parts", "sft")
    with gzip.open(tmp_path / "empty.jsonl.gz", "wt") as f:
        f.write("")
    with pytest.raises(UserError, match="empty file"):
        load(tmp_path / "empty.jsonl.gz", "sft")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "completion": "a"}\n' * 20)
    with pytest.raises(UserError, match="UTF-8"):
        load(tmp_path / "latin1.jsonl", "sft")
    with pytest.raises(UserError, match="does not exist"):
        load("no_such_file.jsonl", "sft")
    rows = datasets.Dataset.from_list(pairs)
    datasets.DatasetDict({"train": rows, "validation": rows.select(range(3))}).save_to_disk(tmp_path / "dd")
    train, evaluation, records = load(tmp_path / "dd", "sft")
    assert len(train) == 20 and len(evaluation) == 3 and "'validation' split" in records["train"]["notes"][0]
    with pytest.raises(UserError, match="dataset_test_split 'dev' is not a split"):
        load(tmp_path / "dd", "sft", dataset_test_split="dev")  # was: a slice of train, without a word
    nested = [{"meta": {"body": f"text {i}", "id": i}} for i in range(20)]
    train, _, _ = load(jsonl(tmp_path / "nested.jsonl", nested), "text", dataset_columns={"text": "meta.body"})
    assert train[0]["text"].startswith("text ")


def test_a_folder_under_a_hidden_folder_or_named_with_dotdot_is_read_by_the_same_rules(tmp_path, monkeypatch):
    # every file of a folder whose own path held a dot-name (`../data`, a hub snapshot under ~/.cache) counted as
    # hidden: the folder was read with none of hfgen's rules, and a CSV beside the JSON lines was left out without a
    # word (probe 42 C5); a notebook's hidden `.ipynb_checkpoints/` below the folder is still skipped
    pairs = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)]
    folder = tmp_path / ".cache" / "parts"
    folder.mkdir(parents=True)
    jsonl(folder / "part.jsonl", pairs)
    (folder / ".ipynb_checkpoints").mkdir()
    jsonl(folder / ".ipynb_checkpoints" / "part-checkpoint.jsonl", pairs)
    train, evaluation, _ = load(folder, "sft")
    assert len(train) + len(evaluation) == 20
    (folder / "extra.csv").write_text("prompt,completion\na,b\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for path in (folder, "../.cache/parts"):
        with pytest.raises(UserError, match="different types"):
            load(path, "sft")


def test_a_mixture_of_prompt_completion_sets_keeps_the_loss_on_the_completions(tmp_path):
    """Alpaca (text) beside conversational prompt/completion: was a mixture of whole conversations, which trained
    the prompts too; now conversational prompt/completion, which TRL trains on the completions."""
    chat = [{"prompt": turns(("user", f"q {i}")), "completion": turns(("assistant", f"a {i}"))} for i in range(40)]
    train, _, _ = mixture(tmp_path, "sft", (ALPACA, {}), (chat, {}))
    assert sorted(train.column_names) == ["completion", "prompt"]
    assert all(row["prompt"][-1]["role"] == "user" and row["completion"][0]["role"] == "assistant" for row in train)


def test_kto_labels_are_read_as_written(tmp_path):
    # `bool("no")` is True: a file of text labels trained every row as desirable
    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "label": ["no", "Yes", "0", 1, "true", False][i % 6]}
            for i in range(60)]  # fmt: skip
    train, evaluation, _ = load(jsonl(tmp_path / "kto.jsonl", rows), "unpaired_preference")
    expected = {f"c{i}": [False, True, False, True, True, False][i % 6] for i in range(60)}
    assert all(row["label"] == expected[row["completion"]] for row in [*train, *evaluation])
    with pytest.raises(UserError, match="'maybe' is not a label"):
        load(jsonl(tmp_path / "bad.jsonl", [{**rows[0], "label": "maybe"}] * 20), "unpaired_preference")
    for bad in (0, 3, 19):  # named by its row in the file, not in the shuffled split (probe 40 I3)
        labelled = [{**row, "label": "maybe" if i == bad else "yes"} for i, row in enumerate(rows[:20])]
        with pytest.raises(UserError, match=rf"row {bad + 1}, column 'label': 'maybe' is not a label"):
            load(jsonl(tmp_path / "one_bad.jsonl", labelled), "unpaired_preference")


def test_a_json_file_whose_rows_are_one_field_loads_them(tmp_path):
    # SQuAD-style {"version": ..., "data": [rows]} was one row holding the whole list
    (tmp_path / "squad.json").write_text(json.dumps({"version": 2, "data": [{"text": f"t {i}"} for i in range(20)]}))
    train, evaluation, _ = load(tmp_path / "squad.json", "text")
    assert len(train) + len(evaluation) == 20 and train[0]["text"].startswith("t ")


def test_sharegpt_tool_turns_of_llama_factory(tmp_path):
    # `function_call` / `observation` speakers (glaive, LLaMA-Factory) were refused as unknown speakers
    call = json.dumps({"name": "weather", "arguments": {"city": "Oslo"}})
    rows = [{"conversations": turns(("human", f"weather {i}?"), ("function_call", call), ("observation", "sunny"),
                                    ("gpt", f"sunny {i}"), role="from", content="value")} for i in range(20)]  # fmt: skip
    train, _, _ = load(jsonl(tmp_path / "glaive.jsonl", rows), "sft")
    messages = train[0]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["tool_calls"][0]["function"]["name"] == "weather"


def test_prompts_from_pairs_whose_prompt_is_implicit(tmp_path):
    # a conversational pair file without `prompt` was "0 of N rows: no prompt column" for ppo/grpo, though the reward
    # stage trains on it: the prompt is the turns the two answers share (TRL's rule)
    pairs = [{"chosen": turns(("user", f"q{i}"), ("assistant", "good")), "rejected": turns(("user", f"q{i}"),
              ("assistant", "bad"))} for i in range(20)]  # fmt: skip
    train, _, _ = load(jsonl(tmp_path / "pairs.jsonl", pairs), "prompt")
    assert all(row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}] for row in train)
    train, _, _ = load(jsonl(tmp_path / "hh.jsonl", HH), "prompt")
    assert train[0]["prompt"].startswith("\n\nHuman: q") and train[0]["prompt"].rstrip().endswith("Assistant:")


def test_a_mixture_takes_the_top_level_columns_and_format_unless_an_entry_sets_its_own(tmp_path):
    """The top-level dataset_columns and dataset_format were ignored for a mixture: `completion` trained instead of
    the mapped `final` column, without a word."""
    rows = [{"prompt": f"q{i}", "completion": "DRAFT", "final": f"FINAL {i}"} for i in range(40)]
    train, _, records = mixture(tmp_path, "sft", (rows, {}), (rows, {}), dataset_columns="completion=final")
    assert set(train["completion"]) <= {f"FINAL {i}" for i in range(40)}
    args = TextDataArguments(
        datasets=[{"name": str(tmp_path / "set0.jsonl")}, {"name": str(tmp_path / "set1.jsonl"), "columns": {}}],
        dataset_columns="completion=final",
        dataset_format="prompt_completion",
    )
    train, _, records = load_for_stage(args, "sft")
    assert "DRAFT" in train["completion"] and any(c.startswith("FINAL") for c in train["completion"])
    assert [e["train"]["format"] for e in records["mixture"]] == ["prompt_completion"] * 2


def test_a_chat_prompt_repeated_by_the_conversations_is_trained_once(tmp_path):
    """A chat prompt beside chosen/rejected conversations that start with it rendered the user turn twice."""
    rows = [
        {"prompt": turns(("user", f"q{i}")), "chosen": r["chosen"], "rejected": r["rejected"]}
        for i, r in enumerate(ULTRAFEEDBACK)
    ]
    train, _, _ = load(jsonl(tmp_path / "pairs.jsonl", rows), "preference")
    row = train[0]
    assert len(row["prompt"]) == 1 and row["chosen"] == turns(("assistant", row["chosen"][0]["content"]))
    assert row["rejected"][0]["role"] == "assistant" and len(row["rejected"]) == 1


def test_tatsu_lab_alpaca_with_its_rendered_text_column_is_read_as_alpaca(tmp_path):
    """tatsu-lab/alpaca has instruction, input, output and their rendering in `text`: SFT read it as plain text
    (the loss on the prompt too), though a text column beside a richer layout is meant to lose."""
    rows = [
        {**row, "text": f"### Instruction:\n{row['instruction']}\n\n### Response:\n{row['output']}"} for row in ALPACA
    ]
    path = jsonl(tmp_path / "alpaca.jsonl", rows)
    for kind in ("sft", "prompt"):
        assert load(path, kind)[2]["train"]["format"] == "alpaca"
    assert load(path, "text")[2]["train"]["format"] == "text"  # pretraining reads the text


@pytest.mark.parametrize(
    "columns, layout", [("prompt=instruction,completion=output", "prompt_completion"), ("response=output", "dolly")]
)
def test_a_filled_input_column_the_layout_leaves_out_is_said(tmp_path, columns, layout):
    """Alpaca mapped as the README suggests (or read as Dolly) left its input column out of every prompt without a
    word: data.json and the console now name it."""
    from hfgen.data.prepare import summary_lines

    path = jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    _, _, records = load(path, "sft", dataset_columns=columns)
    assert records["train"]["format"] == layout
    notes = records["train"]["notes"]
    assert any("column 'input' (filled in" in n and f"left out by the {layout} layout" in n for n in notes), notes
    assert any("the alpaca layout reads it" in n for n in notes)
    assert any("column 'input'" in line for line in summary_lines(records))
    assert not load(path, "sft")[2]["train"]["notes"]  # read as alpaca: nothing left out


def test_implicit_prompt_pairs_whose_prompts_differ_are_refused_by_row(tmp_path):
    """HH-RLHF-style text pairs with different questions trained with the prompt '\\n\\nHuman:' (their shared start);
    conversations crashed DPO's check. Both are refused naming the rows; prompts alone say why a row is dropped."""
    text = HH[:10] + [{"chosen": HH[0]["chosen"], "rejected": HH[1]["rejected"]}]
    chat = [{k: r[k] for k in ("chosen", "rejected")} for r in ULTRAFEEDBACK[:10]]
    chat.append({"chosen": ULTRAFEEDBACK[0]["chosen"], "rejected": ULTRAFEEDBACK[1]["rejected"]})
    for name, rows in (("text", text), ("chat", chat)):
        path = jsonl(tmp_path / f"{name}.jsonl", rows)
        for kind in ("preference", "prompt"):
            with pytest.raises(UserError, match=r"rows \[11\].*start with different prompts"):
                load(path, kind)
    import datasets

    prompts, report = to_standard(datasets.Dataset.from_list(text), "prompt", "preference")
    assert len(prompts) == 10 and report.dropped == {"chosen and rejected start with different prompts": 1}
    assert len(load(jsonl(tmp_path / "hh.jsonl", HH), "preference")[0]) > 30  # aligned pairs still train


@pytest.mark.parametrize("kind", ["sft", "unpaired_preference"])
def test_a_chat_prompt_with_a_text_completion_becomes_turns(tmp_path, kind):
    """A chat prompt beside a text completion (or the reverse) reached TRL mixed, which fails on it: the text side
    becomes one turn, as for preference pairs."""
    label = {"label": True} if kind == "unpaired_preference" else {}
    rows = [{"prompt": turns(("user", f"q{i}")), "completion": f"a{i}", **label} for i in range(40)]
    train, _, _ = load(jsonl(tmp_path / "chat_prompt.jsonl", rows), kind)
    assert train[0]["completion"] == turns(("assistant", train[0]["completion"][0]["content"]))
    rows = [{"prompt": f"q{i}", "completion": turns(("assistant", f"a{i}")), **label} for i in range(40)]
    train, _, _ = load(jsonl(tmp_path / "chat_answer.jsonl", rows), kind)
    assert train[0]["prompt"][0]["role"] == "user" and isinstance(train[0]["completion"], list)


def test_identical_pairs_are_counted_over_the_whole_data_not_per_split(tmp_path):
    """One chosen == rejected pair in a 6-row test split refused the run (1 > 10% of 6) without naming the split."""
    (tmp_path / "pairs").mkdir()
    jsonl(tmp_path / "pairs" / "train.jsonl", TLDR)
    jsonl(tmp_path / "pairs" / "test.jsonl", [{**row, "rejected": row["chosen"] if i == 0 else row["rejected"]}
                                              for i, row in enumerate(TLDR[:6])])  # fmt: skip
    train, evaluation, records = load(tmp_path / "pairs", "preference")
    assert len(train) == 40 and len(evaluation) == 5 and records["eval"]["dropped"] == {"chosen equal to rejected": 1}
    jsonl(tmp_path / "pairs" / "test.jsonl", [{**row, "rejected": row["chosen"]} for row in TLDR[:6]])
    with pytest.raises(UserError, match=r"6 of 46 pairs .*0 of 40 in the training split, 6 of 6 in the evaluation"):
        load(tmp_path / "pairs", "preference")


def test_dataset_config_is_asked_for_by_name_refused_where_it_means_nothing_and_recorded(tmp_path):
    """A hub-style folder of several configurations said only 'Config name is missing.'; a dataset_config given for
    a plain file was ignored without a word; data.json did not say which configuration was read."""
    folder = tmp_path / "hub"
    for config in ("main", "socratic"):
        (folder / config).mkdir(parents=True)
        jsonl(folder / config / "train.jsonl", TLDR)
    hub_readme(folder, {c: f"{c}/train.jsonl" for c in ("main", "socratic")})
    with pytest.raises(UserError, match=r"several configurations; set dataset_config to one of \['main', 'socratic'\]"):
        load(folder, "preference")
    with pytest.raises(UserError, match=r"dataset_config 'nope' is not one of .*\['main', 'socratic'\]"):
        load(folder, "preference", dataset_config="nope")
    assert load(folder, "preference", dataset_config="main")[2]["dataset_config"] == "main"
    with pytest.raises(UserError, match="dataset_config 'main' is set, but dataset .* is a data file"):
        load(folder / "main" / "train.jsonl", "preference", dataset_config="main")


def test_a_hub_dataset_read_offline_given_no_or_a_wrong_config_or_not_cached_is_told_so(datasets_hub_cache):
    """A hub dataset of several configurations in datasets' cache, read offline, said datasets' first line ("There
    are multiple 'ORG/NAME' configurations in the cache: de, en", "Couldn't find cache for ... for config 'fr'") with
    neither the key nor the choices, and one not cached "Couldn't reach ... on the Hub" (probe 43 A8)."""
    rows = [{"text": f"row {i}"} for i in range(4)]
    for config in ("en", "de"):
        datasets_hub_cache("tinyorg/multi", {"train": rows}, "3" * 40, config)
    with pytest.raises(UserError, match=r"several configurations; set dataset_config to one of \['de', 'en'\]"):
        load_raw("tinyorg/multi")
    with pytest.raises(UserError, match=r"dataset_config 'fr' is not one of .*\['de', 'en'\]"):
        load_raw("tinyorg/multi", "fr")
    assert load_raw("tinyorg/multi", "de")["train"][0]["text"] == "row 0"
    with pytest.raises(UserError, match=r"'nosuch/data' is neither a local path .*nor in datasets' cache .*HF_HUB_OFF"):
        load_raw("nosuch/data")


def test_a_hub_style_parquet_folder_given_no_or_a_wrong_config_names_its_configs(tmp_path):
    """A parquet folder (as `huggingface-cli download` leaves gsm8k) given a wrong or no dataset_config was said to be
    'UTF-16 or UTF-32 text': every parquet file holds NUL bytes in its first 64 (probe 41 D2)."""
    folder = tmp_path / "hub"
    for config in ("main", "socratic"):
        (folder / config).mkdir(parents=True)
        Dataset.from_list(TLDR).to_parquet(folder / config / "train-00000-of-00001.parquet")
    hub_readme(folder, {c: f"{c}/train-00000-of-00001.parquet" for c in ("main", "socratic")})
    with pytest.raises(UserError, match=r"several configurations; set dataset_config to one of \['main', 'socratic'\]"):
        load(folder, "preference")
    with pytest.raises(UserError, match=r"dataset_config 'Main' is not one of .*\['main', 'socratic'\]"):
        load(folder, "preference", dataset_config="Main")


def test_an_empty_split_file_is_named_as_such(tmp_path):
    # datasets said only 'Instruction "test" corresponds to no data!'
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(6)))
    (folder / "test.jsonl").write_text("")
    with pytest.raises(UserError, match="its 'test' split has no rows \\(an empty file\\?\\)"):
        load(folder, "text")


def test_a_double_star_pattern_reads_every_folder_level(tmp_path):
    """`data/**/*.jsonl` read one folder level only (10 of 30 rows), without a word."""
    for folder, word in (("", "top"), ("x", "one"), ("x/y", "two")):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        jsonl(tmp_path / folder / f"{word}.jsonl", [{"text": f"{word} row {i}"} for i in range(10)])
    train, evaluation, _ = load(tmp_path / "**" / "*.jsonl", "text")
    assert {t.split()[0] for t in list(train["text"]) + list(evaluation["text"])} == {"top", "one", "two"}
    assert len(train) + len(evaluation) == 30


@pytest.mark.parametrize("mixture", [False, True])
def test_dataset_config_on_an_embedded_dataset_is_refused(mixture):
    """dataset_config on `embedded:corpus` changed nothing, and data.json recorded it as the configuration read."""
    keys = {"datasets": [{"name": "embedded:corpus", "config": "wikitext-2-raw-v1"}]} if mixture else {
        "dataset_name": "embedded:corpus", "dataset_config": "wikitext-2-raw-v1"}  # fmt: skip
    with pytest.raises(UserError, match="dataset_config 'wikitext-2-raw-v1' is set, but .* an embedded dataset"):
        load_for_stage(TextDataArguments(**keys), "text")


def test_an_infinite_or_overflowing_mixture_weight_is_not_a_numpy_traceback(tmp_path):
    """weight .inf passed the positive-number check and crashed in numpy ('Probabilities contain NaN'); two weights
    of 1e308 overflowed their sum ('Probabilities do not sum to 1')."""
    a = jsonl(tmp_path / "a.jsonl", [{"text": f"a {i}"} for i in range(40)])
    b = jsonl(tmp_path / "b.jsonl", [{"text": f"b {i}"} for i in range(40)])
    for weight in (float("inf"), float("nan")):
        with pytest.raises(UserError, match="entry 1 .* weight must be a positive number"):
            TextDataArguments(datasets=[{"name": a, "weight": weight}, {"name": b}])
    train, _, records = load_for_stage(TextDataArguments(datasets=[{"name": a, "weight": 1e308},
                                                                   {"name": b, "weight": 1e308}]), "text")  # fmt: skip
    assert all(entry["rows_drawn"] > 5 for entry in records["mixture"])


def test_a_truncated_or_damaged_compressed_file_is_refused_naming_it(tmp_path):
    """An interrupted download of a .jsonl.gz / .json.bz2 / .jsonl.xz was a raw EOFError traceback (exit 1), a
    corrupt .xz a raw LZMAError."""
    import bz2
    import lzma

    text = "".join(json.dumps({"text": f"row {i} " + "cat dog red " * (i % 7)}) + "\n" for i in range(3000)).encode()
    damaged = lzma.compress(text)
    damaged = damaged[:60] + b"\0" * 20 + damaged[80:]
    for name, data in (("cut.jsonl.gz", gzip.compress(text)[:5000]), ("cut.json.bz2", bz2.compress(text)[:100]),
                       ("cut.jsonl.xz", lzma.compress(text)[:200]), ("damaged.jsonl.xz", damaged)):  # fmt: skip
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=f"dataset_name '.*{name}' could not be loaded"):
            load(tmp_path / name, "text")


@pytest.mark.parametrize("folder", [False, True])
def test_csv_cells_holding_na_words_are_text_and_a_bom_is_not(tmp_path, folder):
    """pandas read the CSV words None, NA, null, nan, N/A as missing: rows of them were dropped as "empty" and a
    file of answers "None" refused as lacking a value; a `.txt` file's BOM was trained as the first row's text."""
    words = ["None", "NA", "null", "nan", "N/A", "#N/A", "NULL"]
    (tmp_path / "na").mkdir()
    (tmp_path / "na" / "answers.csv").write_text(
        "prompt,completion\n" + "".join(f"which word is number {i}?,{words[i % 7]}\n" for i in range(21)) + ",\n"
    )
    (tmp_path / "bom").mkdir()
    (tmp_path / "bom" / "lines.txt").write_text("".join(f"line {i} of the cat\n" for i in range(20)), "utf-8-sig")
    train, evaluation, records = load(tmp_path / "na" / ("" if folder else "answers.csv"), "sft")
    completions = list(train["completion"]) + list(evaluation["completion"])
    assert sorted(completions) == sorted(words[i % 7] for i in range(21))
    assert sum(r["dropped"].get("empty rows", 0) for r in records.values()) == 1  # the empty cells are missing
    train, evaluation, _ = load(tmp_path / "bom" / ("" if folder else "lines.txt"), "text")
    assert all(text.startswith("line") for text in list(train["text"]) + list(evaluation["text"]))


def test_max_samples_cap_a_mixture_not_each_of_its_sets(tmp_path):
    """max_train_samples 20 gave a mixture of two sets 39 training rows (20 + 19) and max_eval_samples 3 gave 6
    evaluation rows; the cap also cut the 1000-row set before mixing, so the weights no longer said what was drawn."""
    small = jsonl(tmp_path / "a.jsonl", [{"text": f"a {i}"} for i in range(100)])
    large = jsonl(tmp_path / "b.jsonl", [{"text": f"b {i}"} for i in range(1000)])
    args = TextDataArguments(datasets=[{"name": small}, {"name": large}], max_train_samples=20, max_eval_samples=3)
    train, evaluation, records = load_for_stage(args, "text")
    assert len(train) == 20 and len(evaluation) == 3
    assert sum(entry["rows_drawn"] for entry in records["mixture"]) == records["train_rows"] == 20
    with pytest.raises(UserError, match="max_eval_samples must be at least 1"):
        load_for_stage(TextDataArguments(datasets=[{"name": small}, {"name": large}], max_eval_samples=0), "text")


def test_a_folder_whose_files_datasets_would_leave_out_is_refused_naming_them(tmp_path):
    """Beside train.jsonl / test.jsonl the folder's other files were not read; `.text` files beside a `.txt` and
    `b.JSONL` beside `a.jsonl` were left out too (hfgen took them for one type, `datasets` read only its own
    suffixes): all without a word."""
    for folder, files in (("splits", ["train.jsonl", "test.jsonl", "more_rows.jsonl"]),
                          ("suffixes", ["a.txt", "b.text"]), ("case", ["a.jsonl", "b.JSONL"])):  # fmt: skip
        (tmp_path / folder).mkdir()
        for file in files:
            rows = [f"{file} row {i}" for i in range(10)]
            if file.endswith(".txt") or file.endswith(".text"):
                (tmp_path / folder / file).write_text("\n".join(rows) + "\n")
            else:
                jsonl(tmp_path / folder / file, [{"text": row} for row in rows])
        with pytest.raises(UserError, match=f"leave out 1 \\('{files[-1]}'\\)"):
            load(tmp_path / folder, "text")
    train, evaluation, _ = load(tmp_path / "case" / "*", "text")  # a pattern of them reads them all
    assert len(train) + len(evaluation) == 20
    (tmp_path / "splits" / "more_rows.jsonl").rename(tmp_path / "splits" / "train-more_rows.jsonl")
    train, evaluation, _ = load(tmp_path / "splits", "text")
    assert len(train) == 20 and len(evaluation) == 10


def test_reading_a_save_to_disk_folder_writes_nothing_into_it(tmp_path):
    """Reading a save_to_disk folder left five cache-*.arrow files in it (the held-out split's, select's...), after
    which a glob of the folder's .arrow files failed ("Couldn't cast")."""
    import datasets

    datasets.Dataset.from_dict({"text": [f"doc {i}" for i in range(40)]}).save_to_disk(tmp_path / "saved", num_shards=2)
    before = sorted(p.name for p in (tmp_path / "saved").iterdir())
    train, evaluation, _ = load(tmp_path / "saved", "text", max_train_samples=30)
    assert len(train) == 30 and len(evaluation) == 2
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == before
    train, evaluation, _ = load(tmp_path / "saved" / "*.arrow", "text")
    assert len(train) + len(evaluation) == 40


def test_a_reward_mixture_keeps_the_margins_of_the_sets_that_have_them(tmp_path):
    """A reward mixture of pairs with a `margin` and pairs without dropped the margins without a word (GRPO's rule:
    only the columns every set has), so every pair trained with margin 0."""
    from hfgen.data.formats import REWARD_COLUMNS

    pairs = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(30)]
    with_margin = [{**pair, "prompt": f"m{i}", "margin": 1.5} for i, pair in enumerate(pairs)]
    train, evaluation, records = mixture(tmp_path, "preference", (pairs, {}), (with_margin, {}),
                                         other_columns=REWARD_COLUMNS)  # fmt: skip
    assert {row["margin"] for row in train if row["prompt"].startswith("m")} == {1.5}
    assert {row["margin"] for row in train if not row["prompt"].startswith("m")} == {0.0}
    assert "margin" in evaluation.column_names and "have margin 0" in records["notes"][0]
    gsm = [{"prompt": f"{i}+1=?", "answer": f"{i + 1}", "source": "gsm"} for i in range(40)]
    _, _, records = mixture(tmp_path, "prompt", (gsm, {}), ([{"prompt": "x", "answer": "y"}] * 40, {}),
                            other_columns=True)  # fmt: skip
    assert records["notes"] == [
        "column 'source' is in 1:" + str(tmp_path / "set0.jsonl") + " only: left out, as every set must have it"
    ]


def test_a_file_replaced_by_another_with_the_same_time_is_read_anew(tmp_path):
    """`datasets` keys its cache of a local file on path and modification time: a file replaced by another with the
    same time (tar, unzip, cp -p) trained the old rows."""
    import os

    path = tmp_path / "d.jsonl"
    for rows in (["OLD one", "OLD two", "OLD three"], ["NEW rows that are longer", "second", "third", "fourth"]):
        jsonl(path, [{"text": row} for row in rows])
        os.utime(path, (1767225600, 1767225600))
        train, evaluation, _ = load(path, "text", validation_split_percentage=25)
        assert sorted(list(train["text"]) + list(evaluation["text"])) == sorted(rows)


def test_a_large_file_edited_in_the_middle_with_its_size_and_time_kept_is_read_anew(tmp_path):
    """The cache key hashed the size and the first and last 64 KiB only: an edit in the middle of a larger file
    that kept its length and modification time (a fixed-width field corrected, then cp -p or rsync -t) trained the
    old rows (probe 39 C4)."""
    import os

    path = tmp_path / "d.jsonl"
    rows = [f"the red cat number {i:05d} is warm" for i in range(6000)]  # 240 KB
    for edited in (rows, [row.replace("red", "tan") if 2000 <= i < 3000 else row for i, row in enumerate(rows)]):
        jsonl(path, [{"text": row} for row in edited])
        os.utime(path, (1767225600, 1767225600))
        train, evaluation, _ = load(path, "text", validation_split_percentage=25)
        assert sorted(list(train["text"]) + list(evaluation["text"])) == sorted(edited)


def test_a_dataset_of_many_files_is_read_whole_up_to_the_folder_budget(tmp_path, monkeypatch):
    """The cache key read every data file up to 64 MiB whole at every load, with no total budget: a dataset of many
    shards was read through by every process at every start to name its cache (review 39 F5). Past the folder
    budget a file is known by its size and modification time."""
    import os

    from hfgen import fingerprint
    from hfgen.data.loading import content_cache_dir

    monkeypatch.setattr(fingerprint, "FOLDER_HASH_BYTES", 10)
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path in (first, second):
        path.write_text("123456")
    key = content_cache_dir([first, second])
    for path in (second, first):
        stat = path.stat()
        path.write_text("654321")  # the same size and time
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert (content_cache_dir([first, second]) == key) == (path == second)  # only the first is read


def test_csv_figures_train_as_the_file_writes_them(tmp_path):
    """pandas read a CSV column of figures as numbers, so `0010.50` trained as `10.5`, `26.0` as `26` and `0026` as
    `26`; a reward stage's margin column in a CSV is still a number."""
    from hfgen.data.formats import REWARD_COLUMNS

    answers = [f"00{i}.50" for i in range(10, 20)] + ["26.0", "0026", "3.10"] * 3 + ["12345678901234567890123"]
    (tmp_path / "codes.csv").write_text(
        "prompt,completion\n" + "".join(f"code of item {i}?,{answer}\n" for i, answer in enumerate(answers))
    )
    train, evaluation, _ = load(tmp_path / "codes.csv", "sft")
    assert sorted(list(train["completion"]) + list(evaluation["completion"])) == sorted(answers)
    (tmp_path / "pairs.csv").write_text(
        "prompt,chosen,rejected,margin\n" + "".join(f"p{i},good {i},bad {i},{i % 3}.5\n" for i in range(20))
    )
    train, _, _ = load_for_stage(TextDataArguments(dataset_name=str(tmp_path / "pairs.csv")), "preference",
                                 other_columns=REWARD_COLUMNS)  # fmt: skip
    assert set(train["margin"]) <= {0.5, 1.5, 2.5} and train.features["margin"].dtype == "float64"


def test_chat_prompts_are_read_as_turns_like_every_layout_reads_them(tmp_path):
    """GRPO/RLOO/PPO prompts in the `prompt` layout skipped the turn reader: {from, value} turns and turns without
    content were blamed on the chat template (row counted from 0), a list of strings was a raw TypeError."""
    rows = [{"prompt": [{"from": "human", "value": f"tell me about cat {i}"}]} for i in range(20)]
    train, _, _ = load(jsonl(tmp_path / "fromvalue.jsonl", rows), "prompt")
    assert train[0]["prompt"][0]["role"] == "user" and train[0]["prompt"][0]["content"].startswith("tell me")
    for name, prompt in (("strings", ["what is", "the cat"]), ("nocontent", [{"role": "user"}])):
        rows = [{"prompt": [{"role": "user", "content": f"q {i}"}]} for i in range(20)] + [{"prompt": prompt}] * 2
        with pytest.raises(UserError, match="row 21, column 'prompt': turn 1 lacks"):
            load(jsonl(tmp_path / f"{name}.jsonl", rows), "prompt")
    rows = [{"prompt": [{"from": "human", "value": f"q {i}"}], "completion": f"a {i}"} for i in range(20)]
    train, _, _ = load(jsonl(tmp_path / "pc.jsonl", rows), "prompt")
    assert train[0]["prompt"][0]["role"] == "user"


def test_column_names_that_meet_once_stripped_or_a_column_mapped_twice_are_refused_by_name(tmp_path):
    """A CSV header `prompt,completion, prompt` was a raw ValueError ('New column names must all be different');
    dataset_columns {prompt: prompt, completion: prompt} said the file 'has columns ['completion'], which match no
    sft layout'."""
    (tmp_path / "twins.csv").write_text("prompt,completion, prompt\n" + "q,a,b\n" * 20)
    with pytest.raises(UserError, match="columns 'prompt' and ' prompt' have the same name once spaces"):
        load(tmp_path / "twins.csv", "sft")
    rows = [{"prompt": f"q {i}", "completion": f"a {i}"} for i in range(20)]
    with pytest.raises(UserError, match="maps prompt and completion to the same column 'prompt'"):
        load(jsonl(tmp_path / "pc.jsonl", rows), "sft", dataset_columns={"prompt": "prompt", "completion": "prompt"})


def test_a_chat_set_with_tool_calls_mixes_with_a_plain_chat_set(tmp_path):
    """Both are `messages`, but the set with tool calls holds its turns as JSON: the mixture was refused as 'different
    columns ... give them the same layout (e.g. all chat messages)'."""
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    tools = [{"messages": [{"role": "user", "content": f"weather {i}?"},
                           {"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "name": "weather", "content": "sunny"},
                           {"role": "assistant", "content": f"sunny {i}"}]} for i in range(40)]  # fmt: skip
    plain = [{"messages": turns(("user", f"hi {i}"), ("assistant", f"hello {i}"))} for i in range(40)]
    train, evaluation, records = mixture(tmp_path, "sft", (plain, {}), (tools, {}))
    assert all(entry["rows_drawn"] > 5 for entry in records["mixture"]) and len(evaluation) == 4
    conversations = list(train["messages"])
    assert any(len(m) == 4 and m[1]["tool_calls"] == [call] for m in conversations)
    assert all("tool_calls" not in turn for m in conversations if len(m) == 2 for turn in m)


def test_the_held_out_slice_is_carved_from_the_rows_with_text(tmp_path):
    """A corpus with blank lines between paragraphs: the slice was carved before blank rows were dropped, so
    whether any usable evaluation row was left depended on the seed ('no usable evaluation rows' for seeds 2-4)."""
    path = tmp_path / "paras.txt"
    path.write_text("\n\n".join(f"paragraph {i} about the cat and the river." for i in range(12)) + "\n")
    for seed in range(6):
        train, evaluation, records = load_for_stage(TextDataArguments(dataset_name=str(path)), "text", seed=seed)
        assert len(evaluation) == 1 and len(train) == 11 and records["train"]["dropped"]["empty rows"] == 11


def test_chat_turns_written_as_json_text_in_a_csv_are_read_as_turns(tmp_path):
    """A CSV can hold conversations only as JSON text: pairs trained on the JSON syntax as plain text, and a
    `messages` column was read character by character ("turn 1 lacks 'role' or 'content' ('[')")."""

    def cell(*pairs):
        return '"' + json.dumps(turns(*pairs)).replace('"', '""') + '"'

    (tmp_path / "pairs.csv").write_text("chosen,rejected\n" + "".join(
        f"{cell(('user', f'q {i}'), ('assistant', f'good {i}'))},{cell(('user', f'q {i}'), ('assistant', f'bad {i}'))}\n"
        for i in range(20)))  # fmt: skip
    train, _, _ = load(tmp_path / "pairs.csv", "preference")
    assert isinstance(train[0]["chosen"], list) and train[0]["chosen"][-1]["content"].startswith("good")
    (tmp_path / "chats.csv").write_text("messages\n" + "".join(
        f"{cell(('user', f'hi {i}'), ('assistant', f'hello {i}'))}\n" for i in range(20)))  # fmt: skip
    train, _, _ = load(tmp_path / "chats.csv", "sft")
    assert train[0]["messages"][1] == {"role": "assistant", "content": train[0]["messages"][1]["content"]}
    (tmp_path / "text.csv").write_text("messages\n" + "".join(f"hello {i}\n" for i in range(20)))
    with pytest.raises(UserError, match="column 'messages': text \\('hello [0-9]+'\\) where a list of chat turns"):
        load(tmp_path / "text.csv", "sft", dataset_format="messages")


def test_files_that_differ_in_columns_type_or_encoding_are_refused_saying_how(tmp_path):
    """Shards whose columns differ said only "Couldn't cast." / "An error occurred while generating the dataset";
    .csv beside .tsv passed as one type (the .tsv read with commas); a UTF-16 file said "JSON parse error: Invalid
    value. in row 0"."""
    (tmp_path / "cols").mkdir()
    jsonl(tmp_path / "cols" / "part-0.jsonl", [{"text": f"a {i}"} for i in range(10)])
    jsonl(tmp_path / "cols" / "part-1.jsonl", [{"text": f"b {i}", "source": "web"} for i in range(10)])
    with pytest.raises(UserError, match=r"rows with columns \['text', 'source'\] .* differ in their columns"):
        load(tmp_path / "cols", "text")
    (tmp_path / "sheets").mkdir()
    (tmp_path / "sheets" / "a.csv").write_text("prompt,completion\n" + "q,a\n" * 10)
    (tmp_path / "sheets" / "b.tsv").write_text("prompt\tcompletion\n" + "q\ta\n" * 10)
    for name in (tmp_path / "sheets", tmp_path / "sheets" / "*"):
        with pytest.raises(UserError, match=r"files of different types \(csv, tsv\)"):
            load(name, "sft")
    (tmp_path / "u16.jsonl").write_bytes("".join(f'{{"text": "the cat {i}"}}\n' for i in range(40)).encode("utf-16"))
    with pytest.raises(UserError, match="'.*u16.jsonl' is UTF-16 or UTF-32 text .*save it as UTF-8"):
        load(tmp_path / "u16.jsonl", "text")


def test_bad_rows_of_a_json_lines_file_with_blank_lines_are_named_by_their_lines(tmp_path):
    """`datasets` skips blank lines of a JSON-lines file, so the rows the messages counted were not its lines: the
    broken rows on lines 26 and 28 were named as rows 21 and 23, both valid."""
    lines = []
    for i in range(30):
        if i % 6 == 5:
            lines.append("   ")
        row = {"prompt": f"q {i}", "completion": f"a {i}"}
        lines.append(json.dumps({"prompt": row["prompt"]} if len(lines) in (25, 27) else row))
    (tmp_path / "blank.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"lack a value in required column 'completion' \(lines \[26, 28\]"):
        load(tmp_path / "blank.jsonl", "sft")


def test_a_hub_style_folder_of_csv_configurations_with_other_columns_loads(tmp_path):
    """The CSV columns are read as text with the header of the folder's first file: a hub-style folder whose
    configurations have other columns must not get that file's columns."""
    folder = tmp_path / "hub"
    for config, header, row in (("a_pairs", "prompt,completion", "q {},0{}.50"), ("b_text", "text", "0{}.5{}")):
        (folder / config).mkdir(parents=True)
        (folder / config / "train.csv").write_text(header + "\n" + "".join(row.format(i, i) + "\n" for i in range(20)))
    hub_readme(folder, {c: f"{c}/train.csv" for c in ("a_pairs", "b_text")})
    train, evaluation, _ = load(folder, "sft", dataset_config="a_pairs")
    assert sorted(list(train["completion"]) + list(evaluation["completion"])) == sorted(f"0{i}.50" for i in range(20))
    train, evaluation, _ = load(folder, "text", dataset_config="b_text")
    assert len(train) + len(evaluation) == 20


def test_csv_files_whose_headers_differ_keep_every_column(tmp_path):
    """Reading every CSV column as text took the features from one file's header: a train.csv with a margin column
    beside a test.csv without one lost its margins without a word (test.csv sorts first)."""
    from hfgen.data.loading import load_raw

    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "train.csv").write_text("prompt,chosen,rejected,margin\np,a,b,1\nq,c,d,2\n")
    (folder / "test.csv").write_text("prompt,chosen,rejected\nr,e,f\n")
    raw = load_raw(str(folder))
    assert raw["train"]["margin"] == [1, 2] and raw["test"].num_rows == 1


def test_chat_answers_whose_turns_are_all_empty_are_dropped_as_empty_text(tmp_path):
    # An empty assistant turn as the completion (or a pair's answer) would teach an empty answer; the same rows
    # with text answers or as messages are dropped, so these are too.
    rows = [
        {
            "prompt": turns(("user", f"tell me about the cat {i}")),
            "completion": turns(("assistant", "" if i % 4 == 0 else f"a cat {i}")),
        }
        for i in range(40)
    ]
    train, evaluation, records = load(jsonl(tmp_path / "pc.jsonl", rows), "sft")
    dropped = records["train"]["dropped"].get("empty text", 0) + records["eval"]["dropped"].get("empty text", 0)
    assert dropped == 10 and len(train) + len(evaluation) == 30
    pairs = [
        {
            "prompt": turns(("user", f"q{i}")),
            "chosen": turns(("assistant", "" if i % 4 == 0 else f"yes {i}")),
            "rejected": turns(("assistant", f"no {i}")),
        }
        for i in range(40)
    ]
    train, evaluation, records = load(jsonl(tmp_path / "pairs.jsonl", pairs), "preference")
    dropped = records["train"]["dropped"].get("empty text", 0) + records["eval"]["dropped"].get("empty text", 0)
    assert dropped == 10 and len(train) + len(evaluation) == 30


def test_a_folder_with_a_dataset_loading_script_is_refused_naming_it(tmp_path):
    # datasets refuses to run it (raw RuntimeError 'Dataset scripts are no longer supported', exit 1; probe 40 D7)
    folder = tmp_path / "squad_like"
    folder.mkdir()
    (folder / "squad_like.py").write_text("raise SystemExit('a loading script ran')\n")
    jsonl(folder / "train.jsonl", [{"text": f"row {i}"} for i in range(10)])
    with pytest.raises(UserError, match=r"holds a dataset loading script \(squad_like.py\), which datasets no longer"):
        load(folder, "text")
    train, evaluation, _ = load(folder / "*.jsonl", "text")  # its data files, named, load
    assert len(train) + len(evaluation) == 10


def test_an_empty_assistant_turn_among_others_is_dropped_as_empty_text(tmp_path):
    # a multi-turn conversation with an empty assistant turn in the middle trained it (the model learnt to end its
    # answer at once); only a lone empty answer was dropped (probe 40 C3). A turn that only calls a tool is not empty
    rows = [
        {
            "messages": turns(
                ("user", f"q{i}"),
                ("assistant", "" if i % 4 == 0 else f"a{i}"),
                ("user", f"r{i}"),
                ("assistant", f"b{i}"),
            )
        }  # fmt: skip
        for i in range(40)
    ]
    rows[1]["messages"][1] = {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]}  # fmt: skip
    train, evaluation, records = load(jsonl(tmp_path / "m.jsonl", rows), "sft")
    dropped = records["train"]["dropped"].get("empty text", 0) + records["eval"]["dropped"].get("empty text", 0)
    assert dropped == 10 and len(train) + len(evaluation) == 30
    pairs = [
        {
            "prompt": turns(("user", f"q{i}")),
            "chosen": turns(("assistant", "" if i % 4 == 0 else f"yes {i}"), ("user", "more"), ("assistant", "ok")),
            "rejected": turns(("assistant", f"no {i}")),
        }  # fmt: skip
        for i in range(40)
    ]
    train, evaluation, records = load(jsonl(tmp_path / "pairs.jsonl", pairs), "preference")
    dropped = records["train"]["dropped"].get("empty text", 0) + records["eval"]["dropped"].get("empty text", 0)
    assert dropped == 10 and len(train) + len(evaluation) == 30


def test_sharegpt_speaker_names_under_role_are_read_and_unknown_roles_refused(tmp_path):
    # {"role": "human"} reached the chat template as an unknown role (Qwen2.5's drops the turn: the model trained to
    # answer a question it never saw), {"role": "gpt"} dropped the row as having no assistant turn (probe 40 C2)
    rows = [{"messages": turns(("human", f"q{i}"), ("gpt", f"a{i}"))} for i in range(20)]
    train, _, _ = load(jsonl(tmp_path / "roles.jsonl", rows), "sft")
    assert [m["role"] for m in train[0]["messages"]] == ["user", "assistant"]
    rows[3] = {"messages": turns(("user", "q"), ("bot", "a"))}
    with pytest.raises(UserError, match=r"row 4, column 'messages': turn 2 has the unknown role 'bot'; known: "):
        load(jsonl(tmp_path / "bot.jsonl", rows), "sft")


def test_a_broken_value_is_named_by_its_row_in_the_file_not_in_the_shuffled_split(tmp_path):
    # the turns and text values were checked only once the held-out slice was carved (train_test_split shuffles):
    # the 4th row of a 20-row file was named row 6, the 1st row 10
    for bad in (0, 3, 19):
        rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
        rows[bad]["output"] = {"x": 1}
        with pytest.raises(UserError, match=rf"row {bad + 1}, column 'output': dict value"):
            load(jsonl(tmp_path / "alpaca.jsonl", rows), "sft")
        rows = [{"messages": turns(("user", f"q{i}"), ("assistant", f"a{i}"))} for i in range(20)]
        rows[bad]["messages"][1] = {"role": "assistant"}
        with pytest.raises(UserError, match=rf"row {bad + 1}, column 'messages': turn 2 lacks"):
            load(jsonl(tmp_path / "messages.jsonl", rows), "sft")


@pytest.mark.parametrize("flag", [{"weight": 0}, {"train": False}])
def test_a_turn_marked_not_to_be_trained_is_refused_by_row(tmp_path, flag):
    # axolotl's per-turn `weight: 0` (or `train: false`) was dropped without a word and the turn trained (probe 40
    # C4); a conversation whose turns are all marked trained is read as it is
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}", "weight": 1}]}
            for i in range(20)]  # fmt: skip
    train, _, _ = load(jsonl(tmp_path / "ok.jsonl", rows), "sft")
    assert len(train) > 0
    rows[5]["messages"][1] = {"role": "assistant", "content": "bad answer", **flag}
    with pytest.raises(UserError, match=r"row 6, column 'messages': turn 2 is marked not to be trained"):
        load(jsonl(tmp_path / "flags.jsonl", rows), "sft")


def test_turns_other_than_the_assistants_marked_not_to_be_trained_load(tmp_path):
    # SlimOrca-style ShareGPT marks system/user turns `weight: 0` (never trained anyway) and axolotl exports write
    # `train: false` on them: the whole file was refused (review 40 F1); a float such as a logged `loss: 0.0` is no flag
    rows = [{"conversations": [{"from": "system", "value": "be brief", "weight": None},
                               {"from": "human", "value": f"q{i}", "weight": 0.0, "train": False},
                               {"from": "gpt", "value": f"a{i}", "weight": 1.0, "loss": 0.0}]}
            for i in range(20)]  # fmt: skip
    train, _, _ = load(jsonl(tmp_path / "slimorca.jsonl", rows), "sft")
    assert [t["role"] for t in train[0]["messages"]] == ["system", "user", "assistant"]
    rows[3]["conversations"][2]["train"] = "no"
    with pytest.raises(UserError, match=r"row 4, column 'conversations': turn 3 is marked not to be trained"):
        load(jsonl(tmp_path / "flags.jsonl", rows), "sft")


def test_columns_outside_the_layout_are_not_checked_as_text(tmp_path):
    # a metadata `context` dict beside messages, a GRPO reference `output` list: columns the layout does not convert
    # were refused as "not text" although they are dropped or carried as they are (review 40 F2)
    chat = [{"messages": turns(("user", f"q{i}"), ("assistant", f"a{i}")), "context": {"src": "a"}} for i in range(20)]
    train, _, _ = load(jsonl(tmp_path / "chat.jsonl", chat), "sft")
    assert len(train) > 0 and "context" not in train.column_names
    rows = Dataset.from_list([{"prompt": f"{i}+1?", "output": [i + 1, i + 2]} for i in range(20)])
    check_rows(rows, "prompt", source="refs", other_columns=True)
    kept, _ = to_standard(rows, "prompt", source="refs", other_columns=True)
    assert kept[0]["output"] == [1, 2]  # travels to the reward functions as it is


WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "paris"}}}


def test_a_tools_column_travels_with_the_conversations_as_trl_reads_it(tmp_path):
    # OpenAI's / TRL's function-calling layout: `tools` beside `messages` (a list, or its JSON text, LLaMA-Factory's)
    # was dropped by the conversion, and the model trained to call functions its prompt never declared
    call = [
        {"role": "user", "content": "weather in paris?"},
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "name": "get_weather", "content": "sunny"},
        {"role": "assistant", "content": "it is sunny."},
    ]
    listed = jsonl(tmp_path / "listed.jsonl", [{"messages": call, "tools": WEATHER_TOOLS}] * 10)
    as_text = jsonl(tmp_path / "as_text.jsonl", [{"messages": call, "tools": json.dumps(WEATHER_TOOLS)}] * 10)
    for path in (listed, as_text):
        train, evaluation, _ = load(path, "sft")
        assert [json.loads(tools) for tools in [*train["tools"], *evaluation["tools"]]] == [WEATHER_TOOLS] * 10
    pairs = [
        {
            "prompt": call[:1],
            "chosen": call[3:],
            "rejected": [{"role": "assistant", "content": "no."}],
            "tools": WEATHER_TOOLS,
        }
    ] * 10
    train, _, _ = load(jsonl(tmp_path / "pairs.jsonl", pairs), "preference")
    assert json.loads(train["tools"][0]) == WEATHER_TOOLS
    # in a mixture, the rows of a set without function definitions have none
    plain = jsonl(tmp_path / "plain.jsonl", [{"messages": [call[0], call[3]]}] * 10)
    mixture = [json.dumps({"name": str(p), "weight": 1}) for p in (listed, plain)]
    train, _, _ = load_for_stage(TextDataArguments(datasets=mixture), "sft")
    assert {
        (len(m), t and json.loads(t)[0]["function"]["name"]) for m, t in zip(train["messages"], train["tools"])
    } == {
        (4, "get_weather"),
        (2, None),
    }
    broken = jsonl(tmp_path / "broken.jsonl", [{"messages": call, "tools": WEATHER_TOOLS}] * 3 + [
        {"messages": call, "tools": "get_weather(city)"}
    ])  # fmt: skip
    with pytest.raises(UserError, match="row 4, column 'tools': not JSON"):
        load(broken, "sft")


def test_an_answer_that_only_calls_a_tool_is_an_answer_in_every_layout(tmp_path):
    # `{"role": "assistant", "content": null, "tool_calls": [...]}` answering a question was dropped as "empty text"
    # (prompt/completion, preference pairs) or "no assistant turn" (messages): its content is empty, its call is not
    user = [{"role": "user", "content": "weather in paris?"}]
    call = [{"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}]
    london = [{"role": "assistant", "content": None, "tool_calls": [dict(TOOL_CALL, function={"name": "get_weather",
                                                                                 "arguments": {"city": "london"}})]}]  # fmt: skip
    for name, row, kind in (
        ("pc", {"prompt": user, "completion": call}, "sft"),
        ("messages", {"messages": user + call}, "sft"),
        ("pairs", {"prompt": user, "chosen": call, "rejected": london}, "preference"),
    ):
        train, evaluation, records = load(jsonl(tmp_path / f"{name}.jsonl", [row] * 10), kind)
        assert len(train) + len(evaluation) == 10 and not records["train"]["dropped"], (name, records)
        answer = train[0].get("completion") or train[0].get("chosen") or train[0]["messages"][1:]
        assert answer[0]["tool_calls"][0]["function"]["arguments"] in ({"city": "paris"}, '{"city": "paris"}')


@pytest.mark.parametrize("content", ["", None])
def test_openai_legacy_function_calls_are_read_as_tool_calls(tmp_path, content):
    # an assistant `function_call` and a `function` turn (OpenAI's legacy layout): the call was dropped (an empty
    # answer trained) and the result kept under a role Qwen's template does not render (it vanished); with content
    # null, as OpenAI wrote it, the turn was refused as lacking its content (review 40 F6)
    legacy = [
        {"role": "user", "content": "weather in paris?"},
        {
            "role": "assistant",
            "content": content,
            "function_call": {"name": "get_weather", "arguments": '{"city": "paris"}'},
        },
        {"role": "function", "name": "get_weather", "content": "sunny"},
        {"role": "assistant", "content": "it is sunny."},
    ]
    train, _, records = load(jsonl(tmp_path / "legacy.jsonl", [{"messages": legacy}] * 10), "sft")
    assert not records["train"]["dropped"]
    user, call, result, answer = train[0]["messages"]
    assert call["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "paris"}}}
    ]
    assert (result["role"], result["name"], result["content"]) == ("tool", "get_weather", "sunny")


def test_a_chat_prompt_ending_with_an_assistant_turn_is_refused_by_row(tmp_path):
    # a prefill ([user, {assistant: "The answer is"}]) was closed and followed by a second assistant header
    user = [{"role": "user", "content": "what is 2+2?"}]
    rows = [{"prompt": user}] * 5 + [{"prompt": [*user, {"role": "assistant", "content": "The answer is"}]}]
    with pytest.raises(UserError, match=r"row 6, column 'prompt': the prompt ends with an assistant turn"):
        load(jsonl(tmp_path / "prefill.jsonl", rows), "prompt")


@pytest.mark.parametrize("odd_first", [False, True])
def test_files_that_give_a_column_different_types_are_named_with_the_row(tmp_path, odd_first):
    """KTO shards with `label` true/false in one and "maybe" in another ended in pyarrow's bare `Failed to parse
    value: "maybe"`, naming no file, row or column (probe 40 I5). With the odd file first `datasets` reads the column
    as mixed values and the row check names the row."""
    rows = [{"prompt": f"say {i}.", "completion": f"{i}.", "label": i % 2 == 0} for i in range(6)]
    odd = [dict(row) for row in rows]
    odd[2]["label"] = "maybe"
    good_name, odd_name = ("b.jsonl", "a.jsonl") if odd_first else ("a.jsonl", "b.jsonl")
    for name, data in ((good_name, rows), (odd_name, odd)):
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in data))
    named = (
        r"row 3, column 'label': 'maybe' is not a label"
        if odd_first
        else rf"column 'label' different types: .*{good_name}' reads it as bool, row 3 of '.*{odd_name}' holds 'maybe'"
    )
    for source in (tmp_path, tmp_path / "*.jsonl"):
        with pytest.raises(UserError, match=named):
            load(source, "unpaired_preference")


def test_a_stages_check_leaves_datasets_progress_bars_off_when_a_quiet_command_turned_them_off():
    # `hfgen sweep --quiet` turned datasets' bars off, and each point's check turned them on again: every point
    # printed its packing and flattening bars (probe 42 D3)
    import datasets

    from hfgen.data.loading import load_splits_for_check

    datasets.disable_progress_bars()
    try:
        assert load_splits_for_check(lambda args: (args, args), "rows") == (("rows", "rows"), [])
        assert not datasets.is_progress_bar_enabled()
    finally:
        datasets.enable_progress_bars()
    assert load_splits_for_check(lambda args: (args, args), "rows")[1] == []
    assert datasets.is_progress_bar_enabled()  # and on, for a command that shows them
