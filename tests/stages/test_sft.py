"""Stage `sft`: LoRA trains only the adapters and learns the answer format; the loss masks cover only responses;
row packing keeps documents apart; ranks agree; QLoRA and bad input fail cleanly."""

import json
import re
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, accelerate_launch, count_calls, run_hfgen, run_hfgen_here
from hfgen import tracking
from hfgen.cli import main as hfgen_main
from hfgen.data.embedded import generate_rows
from hfgen.recipe import load_recipe
from hfgen.train import run_recipe
from tiny_models import pretrained_tiny_llama, save_tiny_causal_lm, save_tiny_gpt2_without_pad

SFT_LORA = REPO / "recipes/tiny/sft_lora.yaml"  # conversational prompt/completion, completion-only loss
SFT_FULL = REPO / "recipes/tiny/sft_full.yaml"  # conversational messages, assistant_only_loss
SMALL = ["--max_train_samples", "2000", "--max_eval_samples", "64"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return pretrained_tiny_llama(tmp_path_factory)


def on_tiny(tiny_lm, output_dir, *overrides):
    return ["--model_name_or_path", tiny_lm, "--output_dir", output_dir, *SMALL, *overrides]


def train_in_process(monkeypatch, recipe, overrides):
    """Run the stage in this process and hand back its SFTTrainer (seen through a spy on `train`, which still trains)."""
    from trl import SFTTrainer

    seen = {}
    real_train = SFTTrainer.train

    def spy(self, *args, **kwargs):
        seen["trainer"] = self
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "train", spy)
    run_recipe(load_recipe(recipe, [str(o) for o in overrides]))
    return seen["trainer"]


@pytest.fixture(scope="module")
def lora_run(tiny_lm, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("sft_lora")
    result = run_hfgen("train", SFT_LORA, *on_tiny(tiny_lm, output_dir, "--max_steps", "60", "--learning_rate", "1e-2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@pytest.mark.slow
def test_lora_sft_learns_to_answer_in_format_and_stop(lora_run):
    results = tracking.read_json(lora_run / "eval.json")
    assert results["response_loss"] < 0.7 * results["response_loss_initial"], results
    assert results["eos_rate"] >= 0.9 and results["trainable_parameters"] < results["parameters"] / 3
    samples = [json.loads(line) for line in (lora_run / "samples.jsonl").read_text().splitlines()]
    in_format = [s for s in samples if re.fullmatch(r"the [a-z ,]+\.", s["response"]) and s["ended_with_eos"]]
    assert len(samples) == 16 and len(in_format) >= 12, samples
    # The output is the adapter (LoRA weights only) with the tokenizer, not a copy of the base.
    adapter = load_file(lora_run / "adapter_model.safetensors")
    assert adapter and all("lora_A" in name or "lora_B" in name for name in adapter)
    assert not (lora_run / "model.safetensors").exists() and (lora_run / "tokenizer.json").is_file()


@pytest.mark.slow
def test_generate_takes_the_adapter_dir_and_its_merge_answers_the_same(lora_run, tmp_path):
    prompt = ["--prompt", "describe the red cat.", "--temperature", "0", "--max_new_tokens", "20"]
    from_adapter = run_hfgen("generate", lora_run, *prompt)
    assert from_adapter.returncode == 0, from_adapter.stderr[-2000:]
    assert from_adapter.stdout.split("\n", 1)[1].strip().startswith("the ")
    merged = run_hfgen("merge", lora_run, "--output_dir", tmp_path / "merged")
    assert merged.returncode == 0, merged.stderr[-2000:]
    from_merged = run_hfgen("generate", tmp_path / "merged", "--chat", *prompt)
    assert from_merged.returncode == 0 and from_merged.stdout == from_adapter.stdout


def test_lora_leaves_every_base_weight_bit_identical(tiny_lm, tmp_path, monkeypatch):
    trainer = train_in_process(
        monkeypatch, SFT_LORA, on_tiny(tiny_lm, tmp_path, "--max_steps", "5", "--num_samples", "0")
    )
    model = trainer.model
    trained_base = {
        k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k
    }
    base = load_file(tiny_lm / "model.safetensors")
    assert base.keys() <= trained_base.keys()
    for name, tensor in base.items():
        assert torch.equal(tensor, trained_base[name]), name
    # ...while the adapters moved (lora_B starts at zero)
    lora_b = [v for k, v in model.state_dict().items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)


def documents(batch, row):
    """(input ids, labels) of each document packed into one batch row: split where position_ids restart."""
    ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
    if "position_ids" not in batch:
        return [(ids, labels)]
    starts = [i for i, p in enumerate(batch["position_ids"][row].tolist()) if p == 0] + [len(ids)]
    return [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:])]


@pytest.mark.parametrize(
    "recipe, data, packing, answer_ends",
    [
        (SFT_LORA, "instructions_pc", "false", "<|end|>\n"),  # completion-only: the whole completion as rendered
        (SFT_LORA, "instructions_pc", "true", "<|end|>\n"),  # the same, packed into rows
        (SFT_FULL, "instructions", "false", "<|end|>"),  # assistant_only_loss: the {% generation %} span
    ],
)
def test_only_response_tokens_carry_labels_in_a_collated_batch(
    tiny_lm, tmp_path, monkeypatch, recipe, data, packing, answer_ends
):
    trainer = train_in_process(
        monkeypatch, recipe, on_tiny(tiny_lm, tmp_path, "--max_steps", "1", "--num_samples", "0", "--packing", packing)
    )
    tokenizer = trainer.processing_class
    rows = generate_rows(data, "train")
    answers = {
        (row["completion"] if "completion" in row else row["messages"][1:])[0]["content"] + answer_ends for row in rows
    }
    batch = next(iter(trainer.get_train_dataloader()))
    assert ("position_ids" in batch) == (packing == "true") and ("attention_mask" in batch) == (packing == "false")
    checked = 0
    for row in range(len(batch["input_ids"])):
        for ids, labels in documents(batch, row):
            real = [token for token in ids if token != tokenizer.pad_token_id]
            if not real:  # row padding (each pad restarts position_ids)
                continue
            scored = [i for i, label in enumerate(labels) if label != -100]
            assert scored == list(range(scored[0], scored[-1] + 1))  # one contiguous span...
            assert tokenizer.decode(ids[scored[0] : scored[-1] + 1]) in answers  # ...which is exactly one answer
            prompt = tokenizer.decode(ids[: scored[0]])  # everything before it is context
            assert prompt.startswith("<|user|>\n") and prompt.endswith("<|end|>\n<|assistant|>\n"), prompt
            assert tokenizer.decode(real[scored[-1] + 1 :]) in ("", "\n")  # at most the template's closing newline
            checked += 1
    assert checked >= len(batch["input_ids"])


def plain_prompt_completion(path):
    rows = generate_rows("instructions_pc", "train")[:200]
    return jsonl(
        path / "pc.jsonl",
        [{"prompt": r["prompt"][0]["content"] + "\n", "completion": r["completion"][0]["content"]} for r in rows],
    )


@pytest.mark.parametrize(
    "dataset", [lambda t: "embedded:corpus", plain_prompt_completion], ids=["text", "plain_prompt_completion"]
)
def test_plain_text_and_plain_prompt_completion_data_train(tiny_lm, tmp_path, monkeypatch, dataset):
    overrides = on_tiny(
        tiny_lm, tmp_path / "out", "--dataset_name", dataset(tmp_path), "--max_steps", "2", "--num_samples", "2"
    )
    trainer = train_in_process(
        monkeypatch,
        SFT_LORA,
        [
            *overrides,
            "--max_train_samples",
            "200",
            "--max_eval_samples",
            "16",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
        ],  # fmt: skip
    )
    results = tracking.read_json(tmp_path / "out/eval.json")
    assert results["held_out_responses"] >= 10 and 0 < results["response_loss"] < 10
    samples = [json.loads(line) for line in (tmp_path / "out/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(isinstance(s["prompt"], str) for s in samples)
    assert trainer.state.num_input_tokens_seen > 0
    # hfgen generate / eval prompt it as it was trained: raw (they wrapped its prompts in the chat template)
    from hfgen.generate import wants_chat
    from hfgen.models import load_tokenizer

    tokenizer = load_tokenizer(str(tmp_path / "out"))
    assert tokenizer.chat_template and results["trained_on_chat"] is False
    assert not wants_chat(str(tmp_path / "out"), tokenizer)
    (tmp_path / "merged").mkdir()  # a merge of it (merged_from.json names the adapter run)
    tracking.write_json(tmp_path / "merged/merged_from.json", {"adapter": str(tmp_path / "out")})
    assert not wants_chat(str(tmp_path / "merged"), tokenizer)
    # its checkpoint too: the run's eval.json says (the checkpoint's own recipe.yaml has none beside it)
    assert (tmp_path / "out/checkpoint-2/adapter_config.json").is_file()
    assert not wants_chat(str(tmp_path / "out/checkpoint-2"), tokenizer)
    tracking.update_eval(tmp_path / "out", {"trained_on_chat": True})  # a run on conversations
    assert wants_chat(str(tmp_path / "out"), tokenizer) and wants_chat(str(tmp_path / "merged"), tokenizer)
    assert wants_chat(str(tmp_path / "out/checkpoint-2"), tokenizer)
    # a checkpoint of a run not finished yet (eval.json is written at the end): data.json, written when the run
    # starts, says so too (it was prompted in the chat template: probe 42 B4)
    (tmp_path / "out/eval.json").unlink()
    assert tracking.read_json(tmp_path / "out/data.json")["trained_on_chat"] is False
    assert not wants_chat(str(tmp_path / "out/checkpoint-2"), tokenizer)


def test_data_seed_decides_the_held_out_rows_whatever_the_seed(tiny_lm, tmp_path, monkeypatch):
    """The held-out carve followed `seed`: a seed sweep with `data_seed` fixed (transformers' seed of the data)
    trained and evaluated each seed on other rows (probe 41 B4)."""
    data = plain_prompt_completion(tmp_path)
    held_out = {}
    for seed in (1, 2):
        overrides = on_tiny(tiny_lm, tmp_path / f"seed{seed}", "--dataset_name", data, "--max_steps", "1",
                            "--num_samples", "0", "--seed", seed, "--data_seed", 7, "--save_strategy", "no",
                            "--validation_split_percentage", 20, "--eval_strategy", "steps", "--eval_steps", 1)  # fmt: skip
        trainer = train_in_process(monkeypatch, SFT_LORA, overrides)
        held_out[seed] = sorted(map(tuple, trainer.eval_dataset["input_ids"]))
    assert held_out[1] == held_out[2]


@pytest.mark.parametrize("packing", [False, True], ids=["rows", "packed"])
def test_data_seed_decides_shuffle_datasets_order_whatever_the_seed(tiny_lm, tmp_path, monkeypatch, packing):
    """TRL's shuffle_dataset shuffled with `seed`: a seed sweep with data_seed fixed trained each seed on another
    row order and, packed, on other rows packed together (probe 43 D1)."""

    def trained_rows(name, seed, data_seed):
        overrides = on_tiny(tiny_lm, tmp_path / name, "--max_train_samples", 64, "--max_steps", 1, "--num_samples", 0,
                            "--seed", seed, "--data_seed", data_seed, "--shuffle_dataset", "true",
                            "--packing", packing, "--save_strategy", "no")  # fmt: skip
        return list(train_in_process(monkeypatch, SFT_FULL, overrides).train_dataset["input_ids"])

    rows = trained_rows("a", seed=1, data_seed=7)
    assert trained_rows("b", seed=2, data_seed=7) == rows
    assert trained_rows("c", seed=1, data_seed=8) != rows  # still shuffled, by data_seed


def test_data_seed_decides_group_by_lengths_order_whatever_the_seed(tiny_lm, tmp_path, monkeypatch):
    """transformers' length-grouped sampler drew its order from the global RNG, which `seed` seeds: a seed sweep with
    data_seed fixed trained each seed on another order (probe 43 D3)."""
    from trl import SFTTrainer

    seen, real_step = [], SFTTrainer.training_step

    def spy(self, model, inputs, *args, **kwargs):
        seen.append(inputs["input_ids"].tolist())
        return real_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", spy)

    def trained_batches(name, seed, data_seed):
        seen.clear()
        overrides = on_tiny(tiny_lm, tmp_path / name, "--max_train_samples", 64, "--max_steps", 2, "--num_samples", 0,
                            "--per_device_train_batch_size", 8, "--seed", seed, "--data_seed", data_seed,
                            "--train_sampling_strategy", "group_by_length", "--save_strategy", "no")  # fmt: skip
        train_in_process(monkeypatch, SFT_FULL, overrides)
        return list(seen)

    batches = trained_batches("a", seed=1, data_seed=7)
    assert len(batches) == 2 and trained_batches("b", seed=2, data_seed=7) == batches
    assert trained_batches("c", seed=1, data_seed=8) != batches


@pytest.mark.parametrize("packing", ["--packing", "--eval_packing"])
def test_packing_with_several_tokenizing_processes_exits_2(tiny_lm, tmp_path, packing):
    # TRL packed each of dataset_num_proc shards apart: 2 processes trained other packed rows, other weights and
    # another held-out response loss than 1, exit 0 (probe 43 D6)
    argv = on_tiny(tiny_lm, tmp_path / "out", "--dataset_num_proc", 2, "--max_steps", 1)
    result = run_hfgen_here("check", SFT_FULL, *argv, packing, "true")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "packing with dataset_num_proc 2: TRL packs each process's share of the rows apart" in result.stderr
    assert run_hfgen_here("check", SFT_FULL, *argv).returncode == 0  # unpacked, the processes change nothing


def test_row_packing_keeps_packed_documents_apart(tiny_lm):
    from transformers import AutoConfig, AutoModelForCausalLM

    from hfgen.stages.sft import PackedRowsCollator, use_row_packing

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    first, second, third = [5, 17, 42, 99, 7], [11, 12, 13], [60, 61, 62, 63, 64, 65, 66]
    collator = PackedRowsCollator(pad_token_id=0, return_position_ids=True)
    batch = collator([{"input_ids": first + second, "seq_lengths": [5, 3]}, {"input_ids": third, "seq_lengths": [7]}])
    # use_cache=False as in training: transformers reads documents from position_ids only when there is no cache
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    for row, start, document in ((0, 0, first), (0, 5, second), (1, 0, third)):
        alone = model(input_ids=torch.tensor([document])).logits[0]
        torch.testing.assert_close(packed[row, start : start + len(document)], alone, atol=1e-5, rtol=1e-4)
    # row packing on kernels that take a dense mask; TRL's padding-free rows where varlen kernels exist
    args = type("Args", (), {"packing": True, "packing_strategy": "bfd", "padding_free": False})()
    config = AutoConfig.from_pretrained(tiny_lm)
    for kernel, expected in (("sdpa", True), ("eager", True), ("flash_attention_2", False)):
        config._attn_implementation = kernel
        assert use_row_packing(args, type("Model", (), {"config": config})()) == expected


def test_the_logged_num_tokens_of_packed_rows_counts_every_token_trained(tiny_lm, tmp_path, monkeypatch):
    # Row packing drops attention_mask (PackedRowsCollator): TRL's SFTTrainer then counted `position_ids.size(1)`,
    # one row's length per batch (127 where 4 rows of ~124 tokens trained), in num_tokens and eval_num_tokens
    output_dir = tmp_path / "out"
    overrides = on_tiny(tiny_lm, output_dir, "--max_steps", "2", "--num_samples", "0", "--packing", "true",
                        "--per_device_train_batch_size", "4", "--logging_steps", "1", "--eval_strategy", "steps",
                        "--eval_steps", "2", "--max_eval_samples", "8")  # fmt: skip
    trainer = train_in_process(monkeypatch, SFT_LORA, overrides)
    assert trainer.processing_class.pad_token_id != trainer.processing_class.eos_token_id  # pads alone not counted
    rows = tracking.read_metrics(output_dir)
    trained = [row for row in rows if "num_input_tokens_seen" in row and "num_tokens" in row]
    assert [row["step"] for row in trained] == [1, 2]
    # num_input_tokens_seen: Trainer's count of the non-pad input tokens (the packed rows' pads are the row tails)
    assert [row["num_tokens"] for row in trained] == [row["num_input_tokens_seen"] for row in trained]
    evaluated = [row for row in rows if "eval_num_tokens" in row]
    assert evaluated and evaluated[-1]["eval_num_tokens"] == trained[-1]["num_input_tokens_seen"]


@pytest.mark.parametrize("architecture, apart", [("llama", True), ("gpt2", True), ("qwen2", True), ("opt", False)])
def test_row_packing_needs_a_model_that_reads_documents_from_position_ids(architecture, apart):
    from transformers import AutoConfig, AutoModelForCausalLM

    from hfgen.stages.sft import keeps_documents_apart
    from tiny_models import ARCHITECTURES

    torch.manual_seed(0)
    config = AutoConfig.for_model(**ARCHITECTURES[architecture], vocab_size=64, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).train()
    assert keeps_documents_apart(model) == apart and model.training  # OPT builds its mask without position_ids


def test_the_run_reads_its_data_and_renders_each_row_once(tiny_lm, tmp_path, monkeypatch, capsys):
    """`hfgen train` read and converted the data twice (the recipe check's load, then the run's) and rendered every
    training row through the chat template to drop the fully masked ones before SFTTrainer tokenized them again (and
    dropped them itself). Now one load, the check's renderings only, and the same rows dropped and counted."""
    import hfgen.data.prepare
    import hfgen.stages.sft

    (tmp_path / "data").mkdir()
    rows = generate_rows("instructions", "train")[:40]
    long = {"role": "user", "content": "write about the yellow tree. " * 40}  # fills max_length=128 alone
    too_long = [{"messages": [long, row["messages"][1]]} for row in rows[:4]]
    jsonl(tmp_path / "data/train.jsonl", rows[4:30] + too_long)
    jsonl(tmp_path / "data/test.jsonl", rows[30:])
    calls = {"load_raw": 0, "trained_conversation": 0}

    count_calls(monkeypatch, calls, hfgen.data.prepare, "load_raw")
    count_calls(
        monkeypatch, calls, hfgen.stages.sft, "trained_conversation"
    )  # the check's renderings (ROWS_RENDERED at most) and any more
    overrides = on_tiny(tiny_lm, tmp_path / "out", "--dataset_name", tmp_path / "data", "--max_steps", "1")
    assert hfgen_main(["train", str(SFT_FULL), *map(str, overrides), "--num_samples", "0"]) == 0
    assert calls == {"load_raw": 1, "trained_conversation": 30}  # 2 and 60 before
    records = tracking.read_json(tmp_path / "out/data.json")
    assert records["train"]["dropped"] == {"no trained token within max_length=128": 4}
    assert records["train"]["rows_kept"] == 26 and "no trained token" in capsys.readouterr().out


@pytest.mark.slow
def test_full_sft_saves_a_plain_model_that_improved(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    result = run_hfgen(
        "train",
        SFT_FULL,
        *on_tiny(tiny_lm, tmp_path, "--max_steps", "40", "--packing", "true", "--per_device_train_batch_size", "8"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = tracking.read_json(tmp_path / "eval.json")
    assert (
        results["response_loss"] < 0.7 * results["response_loss_initial"]
        and results["trainable_parameters"] == results["parameters"]
    )
    assert results["train_tokens"] > 40 * 8 * 64  # packed rows: most of each 128-token row holds real tokens
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and model.config.pad_token_id != model.config.eos_token_id
    # `hfgen eval` on the SFT output dir: chat format (an SFT run), its perplexity on the embedded conversations
    evaluated = run_hfgen("eval", tmp_path, "--num_prompts", "4", "--num_samples", "2", "--max_new_tokens", "8",
                          "--speed_new_tokens", "4", "--speed_batch_size", "2", "--perplexity_texts", "8", "--quiet")  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    merged = tracking.read_json(tmp_path / "eval.json")
    assert merged["eval/chat"] is True and merged["eval/perplexity_dataset"] == "embedded:instructions"
    assert merged["quality/perplexity"] > 1 and merged["response_loss"] == results["response_loss"]


def share_moved(start_dir, trained_dir) -> float:
    """The share of `start_dir`'s weights that differ in `trained_dir` (compared in the trained weights' dtype)."""
    start, trained = load_file(start_dir / "model.safetensors"), load_file(trained_dir / "model.safetensors")
    moved = sum((start[k].to(trained[k].dtype) != trained[k]).sum().item() for k in trained)
    return moved / sum(trained[k].numel() for k in trained)


def test_a_model_broken_by_the_last_update_is_not_saved(tiny_lm, tmp_path):
    """The guard checks a step's loss and gradients before its update: the last one's (learning rate 1e12) left
    finite weights whose every forward gave NaN, saved, then sampling ended in a raw RuntimeError (exit 1)."""
    overrides = ["--max_steps", "1", "--learning_rate", "1e12", "--warmup_steps", "0", "--max_train_samples", "64"]
    result = run_hfgen("train", SFT_FULL, *on_tiny(tiny_lm, tmp_path, *overrides))
    assert result.returncode == 3, result.stderr[-3000:]
    assert "training ended at step 1 with a model that no longer computes: its held-out response loss" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.glob("*.safetensors"))


def test_an_unchanged_model_under_bf16_mixed_precision_has_the_same_response_loss_before_and_after(tiny_lm, tmp_path):
    # the initial loss was computed in float32 (the model not yet prepared), the final one under the bf16 autocast of
    # the prepared model: 1.417 -> 1.418 at learning rate 0
    result = run_hfgen_here("train", SFT_FULL, *on_tiny(tiny_lm, tmp_path, "--learning_rate", "0.0", "--bf16", "true",
                            "--max_steps", "1", "--num_samples", "0"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = tracking.read_json(tmp_path / "eval.json")
    assert results["response_loss"] == results["response_loss_initial"], results


def test_lora_modules_to_save_on_a_bfloat16_base_under_bf16_train_in_float32(tiny_lm, tmp_path, monkeypatch):
    # peft upcasts its adapter layers only: lora_modules_to_save (embed_tokens here; the reward stage's score head)
    # trained in bfloat16, where AdamW's steps round away, and fp16's GradScaler refuses them (probe 43 C7)
    overrides = on_tiny(tiny_lm, tmp_path, "--dtype", "bfloat16", "--bf16", "true", "--max_steps", "1",
                        "--lora_modules_to_save", "[embed_tokens]", "--num_samples", "0")  # fmt: skip
    from accelerate.state import AcceleratorState

    try:
        trainer = train_in_process(monkeypatch, SFT_LORA, overrides)
    finally:  # its Accelerator ran in bf16: the next test's would find that state, as in one process
        AcceleratorState._reset_state(reset_partial_state=True)
    trained = {name: p.dtype for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in name for name in trained) and set(trained.values()) == {torch.float32}, trained
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}  # the base stays as loaded


def test_a_bfloat16_model_trains_float32_weights_so_small_updates_land(tiny_lm, tmp_path):
    """`dtype: bfloat16` for a full fine-tune at an SFT learning rate: updated in bfloat16, most of AdamW's steps
    (about the learning rate) would round away against the weights; float32 weights under bf16 compute keep them."""
    result = run_hfgen("train", SFT_FULL, *on_tiny(tiny_lm, tmp_path, "--dtype", "bfloat16", "--learning_rate", "2e-5",
                                                   "--max_steps", "3", "--warmup_steps", "0"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert share_moved(tiny_lm, tmp_path) > 0.9  # in bfloat16: 0.15
    assert "the trained weights stay float32" in result.stdout


@pytest.mark.slow
def test_two_processes_end_with_identical_weights(tiny_lm, tmp_path, free_port):
    result = accelerate_launch(
        free_port, SFT_LORA, *on_tiny(tiny_lm, tmp_path, "--max_steps", "6", "--packing", "true", "--num_samples", "2")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fingerprints = [(tmp_path / f"weights-rank{rank}.sha256").read_text() for rank in (0, 1)]
    assert fingerprints[0] == fingerprints[1]
    assert tracking.read_json(tmp_path / "env.json")["world_size"] == 2 and tracking.is_complete(tmp_path)


@pytest.mark.slow
def test_two_processes_close_with_the_train_loss_of_one(tiny_lm, tmp_path, free_port):
    """The closing train_loss (eval.json's and the closing metrics.jsonl row's) is every process's mean, as the
    logged rows' is: the same batches at learning rate 0 on 2 processes and on one give the same figure. The steps
    after the last logged row (here all: logging_steps past max_steps) counted the main process's batches alone."""
    closing = ["--learning_rate", "0", "--max_steps", "2", "--logging_steps", "10", "--max_train_samples", "32",
               "--max_eval_samples", "8", "--num_samples", "1"]  # fmt: skip
    result = accelerate_launch(free_port, SFT_FULL, *on_tiny(tiny_lm, tmp_path / "two", *closing,
                                                             "--per_device_train_batch_size", "4"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_recipe(load_recipe(SFT_FULL, [str(o) for o in on_tiny(tiny_lm, tmp_path / "one", *closing,
                                                              "--per_device_train_batch_size", "8")]))  # fmt: skip
    losses = {}
    for run in ("two", "one"):
        closing_row = [row for row in tracking.read_metrics(tmp_path / run) if "train_loss" in row][-1]
        losses[run] = tracking.read_json(tmp_path / run / "eval.json")["train_loss"]
        assert closing_row["train_loss"] == pytest.approx(losses[run], rel=1e-6), run
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-5)


def train_exit_code(capsys, *argv):
    """`hfgen train ...` through the real CLI entry, in this process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["train", *map(str, argv)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return exit_info.value.code, captured.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine QLoRA may be runnable")
def test_qlora_without_cuda_exits_2_saying_what_it_needs(tiny_lm, tmp_path, capsys):
    code, message = train_exit_code(capsys, SFT_LORA, *on_tiny(tiny_lm, tmp_path, "--load_in_4bit", "true"))
    assert code == 2 and "load_in_4bit" in message and "needs a CUDA GPU and bitsandbytes" in message


def jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # columns of no supported layout, named in the message
        (
            lambda t: ["--dataset_name", jsonl(t / "qa.jsonl", [{"question": "q", "answer": "a"}] * 4)],
            ["question", "messages"],
        ),
        # completion-only loss asked of conversation data
        (
            lambda t: ["--dataset_name", "embedded:instructions", "--completion_only_loss", "true"],
            ["completion_only_loss", "prompt"],
        ),
        # ... of plain text: the layout it was read as is named, not the converted columns alone
        (
            lambda t: [
                "--dataset_name",
                jsonl(t / "t.jsonl", [{"text": "a b"}] * 8),
                "--completion_only_loss",
                "true",
                "--assistant_only_loss",
                "false",
            ],  # fmt: skip
            ["completion_only_loss", "is read as text", "dataset_format"],
        ),
        # a model dir that was never made
        (lambda t: ["--model_name_or_path", "outputs/tiny/never_made"], ["outputs/tiny/never_made", "does not exist"]),
    ],
)
def test_bad_input_exits_2_naming_the_problem(tmp_path, capsys, overrides, expected):
    code, message = train_exit_code(capsys, SFT_LORA, "--output_dir", tmp_path / "out", *overrides(tmp_path))
    assert code == 2
    for text in expected:
        assert text in message


def test_missing_pretrain_output_says_which_recipe_to_run_first(tmp_path, capsys, monkeypatch):
    shutil.copytree(REPO / "recipes/tiny", tmp_path / "recipes/tiny")
    monkeypatch.chdir(tmp_path)  # a checkout where the tiny pretrain run was never made
    code, message = train_exit_code(capsys, "recipes/tiny/sft_lora.yaml")
    assert code == 2 and "outputs/tiny/pretrain" in message and "hfgen train recipes/tiny/pretrain.yaml" in message


def test_an_eos_token_the_tokenizer_lacks_exits_2_before_the_model_loads(tiny_lm, tmp_path, capsys):
    """TRL's trainer constructor refused it once the model had loaded; the recipe check names it now (the check
    applies the recipe's eos_token to the tokenizer it renders with)."""
    code, message = train_exit_code(capsys, SFT_LORA, *on_tiny(tiny_lm, tmp_path, "--eos_token", "<no-such-token>"))
    assert code == 2 and "eos_token '<no-such-token>' is not a token of the tokenizer" in message
    assert not (tmp_path / "COMPLETE").exists()


LORA_FEW_STEPS = [
    "--max_steps",
    "3",
    "--learning_rate",
    "0.05",
    "--num_samples",
    "0",
    "--lora_target_modules",
    "c_attn",
]


@pytest.fixture(scope="module")
def lora_run_on_padless_gpt2(tmp_path_factory):
    """(base, LoRA run dir): a few LoRA steps on a tiny GPT-2 whose tokenizer had no pad token (its embeddings grew
    by a row, saved with the adapter)."""
    root = tmp_path_factory.mktemp("lora_chain")
    base = save_tiny_gpt2_without_pad(root / "base")
    run_recipe(load_recipe(SFT_LORA, [str(o) for o in on_tiny(base, root / "first", *LORA_FEW_STEPS)]))
    return base, root / "first"


def test_lora_on_an_earlier_lora_run_loads_as_trained(lora_run_on_padless_gpt2, tmp_path, monkeypatch):
    """LoRA trained on an earlier LoRA run (whose adapter is merged in first): the output dir loads (hfgen
    generate/eval/merge's loader) and merges into the model that was trained. Once it recorded the bare base: the
    earlier adapter went missing, and the grown embeddings did not fit the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hfgen.models import load_causal_lm

    base, first = lora_run_on_padless_gpt2
    trained = train_in_process(monkeypatch, SFT_LORA, on_tiny(first, tmp_path / "second", *LORA_FEW_STEPS)).model
    assert json.loads((tmp_path / "second/adapter_config.json").read_text())["base_model_name_or_path"] == str(first)
    # its model card names that base too: it named the first run's base, on which the adapter computes other logits
    card = yaml.safe_load((tmp_path / "second/README.md").read_text().split("---")[1])
    assert card["base_model"] == str(first) and f"base_model:adapter:{first}" in card["tags"], card
    assert hfgen_main(["merge", str(tmp_path / "second"), "--output_dir", str(tmp_path / "merged")]) == 0

    ids = torch.randint(5, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained.eval()(input_ids=ids).logits
        loaded = load_causal_lm(str(tmp_path / "second"), "float32")(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
        bare = AutoModelForCausalLM.from_pretrained(base)
        bare.resize_token_embeddings(bare.get_input_embeddings().num_embeddings + 1)  # the pad token's row
        second_alone = PeftModel.from_pretrained(bare, tmp_path / "second")(input_ids=ids).logits
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-4)
    assert (second_alone - expected).abs().max() > 1e-2  # the first run's adapter matters, so the above has teeth


def test_full_fine_tuning_from_a_lora_run_trains_every_weight(lora_run_on_padless_gpt2, tmp_path, monkeypatch):
    """Full SFT starting from a LoRA run dir trains the merged model's weights (peft had frozen them: DPO died on
    "does not require grad")."""
    from safetensors.torch import load_file

    from hfgen.models import load_causal_lm

    _, first = lora_run_on_padless_gpt2
    overrides = ["--max_steps", "2", "--learning_rate", "0.01", "--num_samples", "0"]
    train_in_process(monkeypatch, SFT_FULL, on_tiny(first, tmp_path / "full", *overrides))
    start = {k: v for k, v in load_causal_lm(str(first), "float32").merge_and_unload().state_dict().items()}
    trained = load_file(tmp_path / "full/model.safetensors")
    moved = [name for name, tensor in trained.items() if not torch.equal(tensor, start[name])]
    assert len(moved) == len(trained), sorted(set(trained) - set(moved))


def test_lora_takes_a_chat_template_from_a_tokenizer_dir(tmp_path, capsys):
    """A base without a chat template and chat_template_path naming a tokenizer dir: TRL's clone_chat_template padded
    the vocabulary with dummy tokens and trained them beside LoRA (trainable tokens on lm_head in modules_to_save),
    and the first forward pass died ("TrainableTokensLayer wraps an unknown layer type"). The template and EOS apply,
    LoRA trains; a tokenizer bringing tokens the model lacks exits 2 at the check."""
    from transformers import AutoTokenizer

    from tiny_models import save_tiny_llama

    with_template = save_tiny_llama(tmp_path / "with_template")
    base = tmp_path / "base"
    shutil.copytree(with_template, base)
    (base / "chat_template.jinja").unlink()
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert not tokenizer.chat_template
    output_dir = tmp_path / "out"
    run_recipe(load_recipe(SFT_LORA, [str(a) for a in on_tiny(base, output_dir, "--chat_template_path", with_template,
                                                               "--max_steps", "2", "--num_samples", "1")]))  # fmt: skip
    saved = AutoTokenizer.from_pretrained(output_dir)
    assert saved.chat_template == AutoTokenizer.from_pretrained(with_template).chat_template
    assert tracking.is_complete(output_dir)

    more_tokens = tmp_path / "more_tokens"
    source = AutoTokenizer.from_pretrained(with_template)
    source.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    source.save_pretrained(more_tokens)
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["check", str(SFT_LORA), *map(str, on_tiny(base, tmp_path / "refused", "--chat_template_path",
                                                              more_tokens))])  # fmt: skip
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and "brings 1 token(s) the model's tokenizer lacks (<|tool|>)" in message


def test_a_lora_run_with_eos_token_and_its_merge_stop_at_the_turn_end_as_a_full_run(tmp_path):
    """A base whose EOS is not the token its template ends turns with, trained with `eos_token` set to that one: a
    full run saves both as stop ids, but the adapter dir had no generation config and `hfgen merge` saved the
    base's (its EOS alone), so plain transformers generation on the merged model ran past the turn end."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from hfgen.models import load_tokenizer
    from tiny_models import save_tiny_llama

    base = save_tiny_llama(tmp_path / "base")
    tokenizer = load_tokenizer(str(base))
    tokenizer.eos_token = "<|system|>"  # the base's end of text, not its end of turn
    tokenizer.save_pretrained(base)
    for config in (AutoConfig.from_pretrained(base), GenerationConfig.from_pretrained(base)):
        config.eos_token_id = tokenizer.eos_token_id
        config.save_pretrained(base)
    run_recipe(load_recipe(SFT_LORA, [str(a) for a in on_tiny(base, tmp_path / "lora", "--eos_token", "<|end|>",
                                                              "--max_steps", "2", "--num_samples", "0")]))  # fmt: skip
    end, text_end = tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id
    assert GenerationConfig.from_pretrained(tmp_path / "lora").eos_token_id == [end, text_end]
    assert hfgen_main(["merge", str(tmp_path / "lora"), "--output_dir", str(tmp_path / "merged")]) == 0
    assert GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id == [end, text_end]
    assert AutoConfig.from_pretrained(tmp_path / "merged").eos_token_id == end
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").eos_token == "<|end|>"


def test_the_readmes_mixtures_example_passes_the_check_as_written(tmp_path):
    # README's Mixtures example (Alpaca beside ShareGPT) was refused for sft as written (review 40 F10): its
    # Alpaca rows become conversations, which needs assistant_only_loss (or completion_only_loss: false)
    import gzip

    from datasets import Dataset

    readme = (REPO / "README.md").read_text()
    example = readme[readme.index("**Mixtures.**") :].split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "data").mkdir()
    with gzip.open(tmp_path / "data/alpaca.jsonl.gz", "wt") as file:
        file.writelines(json.dumps({"instruction": f"name {i}", "input": "", "output": f"it is {i}"}) + "\n"
                        for i in range(12))  # fmt: skip
    dialog = [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]
    Dataset.from_list([{"dialog": dialog}] * 12).to_parquet(tmp_path / "data/chat.parquet")
    recipe = yaml.safe_load((REPO / "recipes/tiny/sft_full.yaml").read_text())
    for key in ("dataset_name", "assistant_only_loss"):  # the example's keys alone, the rest the defaults
        del recipe[key]
    recipe |= yaml.safe_load(example) | {"output_dir": str(tmp_path / "run")}
    from tiny_models import save_tiny_llama

    recipe["model_name_or_path"] = str(save_tiny_llama(tmp_path / "base"))  # its template has {% generation %}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = run_hfgen_here("check", str(tmp_path / "recipe.yaml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_alpaca_rows_mixed_with_conversations_keep_the_loss_on_the_answers_or_are_refused(tmp_path):
    # beside a `messages` set, Alpaca's rows become conversations, where TRL's completion-only loss (theirs alone)
    # no longer applies: every token trained, the instruction and the template's system prompt too, without a word
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(
        "".join(json.dumps({"instruction": f"name {i}", "output": f"it is {i}"}) + "\n" for i in range(12))
    )
    chats = tmp_path / "chats.jsonl"
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    chats.write_text("".join(json.dumps({"messages": turns}) + "\n" for _ in range(12)))
    mixture = f"[{{name: {alpaca}, weight: 1}}, {{name: {chats}, weight: 1}}]"
    common = ["check", str(REPO / "recipes/tiny/sft_full.yaml"), "--datasets", mixture, "--dataset_name", ""]
    refused = run_hfgen_here(*common, "--assistant_only_loss", "false")
    assert refused.returncode == 2, refused.stderr
    assert f"prompt/completion set(s) '{alpaca}' (alpaca) become conversations" in refused.stderr
    assert "Set assistant_only_loss: true" in refused.stderr


def test_held_out_samples_on_learned_positions_fit_each_prompt_in_them(tmp_path, capsys):
    # the samples after training asked sample_max_new_tokens of every held-out prompt: one within GPT-2's 256
    # positions but not with its answer ended the run, after the whole training, in a raw IndexError (probe 42 E10)
    from transformers import AutoModelForCausalLM

    from hfgen.models import load_tokenizer
    from hfgen.stages.sft import sample_responses
    from tiny_models import save_tiny_causal_lm

    path = save_tiny_causal_lm(tmp_path / "gpt2", "gpt2")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), load_tokenizer(str(path))
    words = "the red cat sat by the blue river and ran home".split()

    def prompt_of(tokens: int) -> str:  # a plain prompt of about `tokens` tokens
        text = ""
        for i in range(10 * tokens):
            if len(tokenizer(text)["input_ids"]) >= tokens:
                return text
            text += f" {words[i % len(words)]}"

    prompts = ["the cat", prompt_of(230), prompt_of(300)]
    samples = sample_responses(model, tokenizer, prompts, max_new_tokens=64, seed=0)
    assert [sample["prompt"] for sample in samples] == prompts[:2]  # the one that fills the positions: left out
    assert "1 of 3 held-out prompts are left out: they fill the 256 positions" in capsys.readouterr().out


@pytest.mark.parametrize("chat", [False, True])
def test_a_held_out_prompts_sample_does_not_depend_on_the_prompts_sampled_beside_it(tmp_path, chat):
    # samples.jsonl drew every prompt from one global seed in batch order: a prompt's sample changed with
    # num_samples, or with the rows before it, where `hfgen eval` seeds each prompt of its own
    from transformers import AutoModelForCausalLM

    from hfgen.models import load_tokenizer
    from hfgen.stages.sft import sample_responses
    from tiny_models import save_tiny_causal_lm

    path = save_tiny_causal_lm(tmp_path / "llama", "llama")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), load_tokenizer(str(path))
    texts = ["the cat", "a happy dog by the blue river", "the red car", "the river"]
    prompts = [[{"role": "user", "content": text}] for text in texts] if chat else texts

    def sample_of(prompt, among):
        samples = sample_responses(model, tokenizer, among, max_new_tokens=12, seed=3)
        return next(sample for sample in samples if sample["prompt"] == prompt)

    alone = sample_of(prompts[0], prompts[:1])
    assert alone["response"]
    for among in (prompts, prompts[::-1], prompts[2:] + prompts[:1]):  # more, reordered, fewer and padded
        assert sample_of(prompts[0], among) == alone
    # and the seed still decides
    assert sample_responses(model, tokenizer, prompts[:1], max_new_tokens=12, seed=4)[0] != alone


@pytest.mark.parametrize("packing", [False, True])
def test_evaluation_rows_left_with_no_trained_token_are_counted(tiny_lm, tmp_path, monkeypatch, packing):
    # the held-out loss leaves out the evaluation rows truncation leaves no response token (as SFTTrainer's evaluation
    # drops them), yet data.json said every evaluation row was kept (probe 42 E8)
    long_prompt = "describe the red cat and the blue dog by the river at night. " * 5  # > 32 tokens
    rows = [
        {"prompt": long_prompt if i % 5 < 2 else f"describe the cat {i}.", "completion": " the cat is red."}
        for i in range(40)
    ]  # 40% of the rows: a prompt that fills max_length
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    train_in_process(monkeypatch, SFT_LORA, on_tiny(
        tiny_lm, tmp_path / "out", "--dataset_name", data, "--max_length", "32", "--max_steps", "1",
        "--num_samples", "1", "--validation_split_percentage", "25", "--packing", str(packing).lower(),
    ))  # fmt: skip
    records = tracking.read_json(tmp_path / "out/data.json")["eval"]
    dropped = records["dropped"].get("no response token within max_length=32", 0)
    held_out = tracking.read_json(tmp_path / "out/eval.json")["held_out_responses"]
    assert dropped > 0 and records["rows_kept"] == held_out == records["rows_read"] - dropped, records


def test_sft_of_a_mixture_of_experts_model_completes_and_its_output_generates_padded_batches(tmp_path):
    """TRL's SFTTrainer turns a MoE config's output_router_logits on (for the load-balancing loss), and transformers'
    generate on a padded batch with it on fails at the second token: SFT crashed in its held-out samples after
    training, and `hfgen generate` on any MoE whose config.json says true (a TRL fine-tune's) crashed the same."""
    base = save_tiny_causal_lm(tmp_path / "mixtral", "mixtral")
    output_dir = tmp_path / "sft"
    result = run_hfgen("train", SFT_FULL, *on_tiny(base, output_dir, "--max_steps", "2", "--max_train_samples", "32",
                                                   "--max_eval_samples", "8"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output_dir / "samples.jsonl").read_text().strip()
    config = json.loads((output_dir / "config.json").read_text())
    assert config["output_router_logits"] is False  # as the model came, not SFTTrainer's training setting
    config["output_router_logits"] = True  # as a TRL fine-tune's config says
    (output_dir / "config.json").write_text(json.dumps(config))
    generated = run_hfgen("generate", output_dir, "--prompt", "What is 2+3?", "--prompt", "Hi", "--max_new_tokens", "4")
    assert generated.returncode == 0, generated.stderr[-3000:]
