"""`hfgen merge`: the merged model computes what base+adapter computes, saved as a plain model with its tokenizer."""

import json
import shutil

import pytest
import torch

from conftest import REPO, run_hfgen, run_hfgen_here
from hfgen.cli import main as hfgen_main
from tiny_models import save_tiny_llama


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """A tiny random base and a LoRA adapter on every linear layer, with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("merge")
    base = save_tiny_llama(root / "base")
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    model.save_pretrained(root / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(root / "adapter")
    return base, root / "adapter"


def merge(capsys, *argv):
    """`hfgen merge ...` through the real CLI entry, in this process: (exit code, stderr)."""
    try:
        code = hfgen_main(["merge", *map(str, argv)])
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err


def test_merged_logits_equal_base_plus_adapter_logits(base_and_adapter, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = base_and_adapter
    assert merge(capsys, adapter, "--output_dir", tmp_path / "merged")[0] == 0
    merged_dir = tmp_path / "merged"
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    assert json.loads((merged_dir / "merged_from.json").read_text())["base"] == str(base)

    ids = torch.randint(5, 400, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)(
            input_ids=ids
        ).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(input_ids=ids).logits
        base_only = AutoModelForCausalLM.from_pretrained(base)(input_ids=ids).logits
    torch.testing.assert_close(merged, with_adapter, atol=1e-5, rtol=1e-4)
    assert (merged - base_only).abs().max() > 1e-2  # the adapter mattered, so the equality above has teeth
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.chat_template and tokenizer.pad_token != tokenizer.eos_token


def test_bad_merges_exit_2(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    code, message = merge(capsys, base, "--output_dir", tmp_path / "out")
    assert code == 2 and "not a LoRA adapter dir" in message
    code, message = merge(capsys, adapter, "--output_dir", adapter)
    assert code == 2 and "--output_dir" in message
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    code, message = merge(capsys, orphan, "--output_dir", tmp_path / "out")
    assert code == 2 and "does not exist" in message
    # the base moved with its project (adapters record it as an absolute path): how to point the adapter at it
    assert "if the base was moved (with its project, say), edit base_model_name_or_path in adapter_config" in message


def test_a_merge_killed_half_way_leaves_no_model_dir_and_a_rerun_completes(base_and_adapter, tmp_path, capsys):
    _, adapter = base_and_adapter
    output_dir = tmp_path / "merged"
    killed = run_hfgen("merge", adapter, "--output_dir", output_dir, env={"HFGEN_KILL_AT": "merge_save"})
    assert killed.returncode == -9  # SIGKILL after the weights, before the tokenizer
    assert not output_dir.exists()  # the weights went to merged.partial, never into place
    assert merge(capsys, adapter, "--output_dir", output_dir)[0] == 0
    assert (output_dir / "merged_from.json").is_file() and (output_dir / "tokenizer.json").is_file()
    assert not (tmp_path / "merged.partial").exists()
    assert merge(capsys, adapter, "--output_dir", output_dir)[0] == 0  # an earlier merge's dir is replaced
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/todo.txt").write_text("mine")
    code, message = merge(capsys, adapter, "--output_dir", tmp_path / "notes")
    assert code == 2 and "holds other files" in message and (tmp_path / "notes/todo.txt").is_file()


def test_a_merges_stdout_is_the_merged_dir_alone(base_and_adapter, tmp_path):
    """`MERGED=$(hfgen merge ...)`: deepspeed's 'Setting accelerator to CPU' warning, logged when the save imports it
    on a machine without a GPU, came on stdout before the path (probe 42 D7); it goes to stderr."""
    _, adapter = base_and_adapter
    result = run_hfgen("merge", adapter, "--output_dir", tmp_path / "merged", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [str(tmp_path / "merged")], result.stdout


DIES_DELETING = """
import os, signal, sys
from hfgen.cli import main

unlink, deleted = os.unlink, []
def dying_unlink(*args, **kwargs):  # a kill half way through deleting the earlier merge
    unlink(*args, **kwargs)
    deleted.append(args[0])
    if len(deleted) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
os.unlink = dying_unlink
main(sys.argv[1:])
"""


def test_a_merge_killed_while_deleting_the_earlier_merge_leaves_no_half_of_it(base_and_adapter, tmp_path, capsys):
    # rmtree, killed half way, left the earlier merge's dir missing files, its merged_from.json presenting it as a model
    import subprocess
    import sys

    _, adapter = base_and_adapter
    output_dir = tmp_path / "merged"
    assert merge(capsys, adapter, "--output_dir", output_dir)[0] == 0
    command = [sys.executable, "-c", DIES_DELETING, "merge", str(adapter), "--output_dir", str(output_dir)]
    killed = subprocess.run(command, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not output_dir.exists()  # renamed away at once, then deleted
    assert [path.name for path in tmp_path.glob(".deleting-merged-*")]  # what the kill left, renamed
    assert merge(capsys, adapter, "--output_dir", output_dir)[0] == 0
    assert (output_dir / "merged_from.json").is_file() and (output_dir / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".deleting-*"))  # the rerun cleared it: a merge's leftover held a model's space


def test_a_merge_that_finds_the_disk_full_exits_2_and_leaves_nothing_half_written(
    base_and_adapter, tmp_path, capsys, monkeypatch
):
    import errno

    from transformers import PreTrainedModel

    save_pretrained = PreTrainedModel.save_pretrained

    def fills_the_disk(self, directory, *args, **kwargs):  # the weights get written, then the disk is full
        save_pretrained(self, directory, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fills_the_disk)
    _, adapter = base_and_adapter
    code, message = merge(capsys, adapter, "--output_dir", tmp_path / "merged")
    assert code == 2 and "No space left" in message
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # no merged/, no merged.partial/ holding the space


def test_a_full_model_loads_from_inside_an_adapter_dir(base_and_adapter, monkeypatch):
    # the adapter-chain probe must not read the working directory's adapter_config.json for a full model
    from hfgen.models import load_causal_lm

    base, adapter = base_and_adapter
    monkeypatch.chdir(adapter)
    assert type(load_causal_lm(str(base), "float32")).__name__ == "LlamaForCausalLM"


def test_merges_that_would_be_wrong_exit_2(base_and_adapter, tmp_path, capsys):
    # An unfinished run (no COMPLETE: killed at its final save) gave a complete-looking merged dir; a LoRA on
    # embed_tokens of a tied model merged into the shared weight (logits 0.17 off base+adapter's)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = base_and_adapter
    unfinished = tmp_path / "unfinished"
    shutil.copytree(adapter, unfinished)
    (unfinished / "recipe.yaml").write_text("stage: sft\n")
    code, message = merge(capsys, unfinished, "--output_dir", tmp_path / "out")
    assert code == 2 and "unfinished hfgen run" in message and not (tmp_path / "out").exists()

    model = AutoModelForCausalLM.from_pretrained(base)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tied, as SmolLM2's
    config = LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(tmp_path / "embeddings")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "embeddings")
    code, message = merge(capsys, tmp_path / "embeddings", "--output_dir", tmp_path / "out")
    assert code == 2 and "'model.embed_tokens'" in message and "tie_word_embeddings" in message


def test_a_merge_on_a_base_without_a_pad_token_names_the_added_pad_as_a_full_run_does(tmp_path, capsys):
    # hfgen gives a pad-less tokenizer (GPT-2's) a pad token and grows the embeddings for it; a full run saves its id
    # in config.json and generation_config.json, the merge saved the base's (null, absent): plain generate then
    # padded with EOS, and the model's config disagreed with the tokenizer beside it
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from hfgen.models import fit_embeddings, load_causal_lm, load_tokenizer
    from tiny_models import save_tiny_gpt2_without_pad

    base = save_tiny_gpt2_without_pad(tmp_path / "base")
    tokenizer = load_tokenizer(str(base))
    model = load_causal_lm(str(base), "float32")
    fit_embeddings(model, tokenizer)  # as a LoRA run on it has it (peft saves the grown embeddings)
    config = LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    assert merge(capsys, tmp_path / "adapter", "--output_dir", tmp_path / "merged")[0] == 0
    pad = AutoTokenizer.from_pretrained(tmp_path / "merged").pad_token_id
    assert pad == 400 and AutoConfig.from_pretrained(tmp_path / "merged").vocab_size == 401
    assert AutoConfig.from_pretrained(tmp_path / "merged").pad_token_id == pad
    assert GenerationConfig.from_pretrained(tmp_path / "merged").pad_token_id == pad


def test_an_adapter_whose_base_was_trained_again_in_place_is_refused(tmp_path, capsys):
    # merge and generate loaded an adapter onto whatever its base dir held: retrained there since (a new COMPLETE
    # run id), base + adapter was not the pair that trained, and nothing said so. The run's checkpoint-N (no COMPLETE
    # marker of its own: its state records the base's run) was still loaded on the new base (probe 42 B3)
    from hfgen import tracking
    from hfgen.recipe import load_recipe
    from hfgen.train import run_recipe

    base = save_tiny_llama(tmp_path / "base")
    tracking.mark_complete(base)  # the base is an hfgen run (a pretrain run's COMPLETE marker)
    adapter = tmp_path / "adapter"
    overrides = ["--model_name_or_path", base, "--output_dir", adapter, "--max_steps", "1", "--max_train_samples", "8"]
    overrides += ["--max_eval_samples", "4", "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", "1"]
    run_recipe(load_recipe(REPO / "recipes/tiny/sft_lora.yaml", list(map(str, overrides))))
    trained_on = json.loads((adapter / tracking.COMPLETE_MARKER).read_text())[tracking.INPUT_RUNS]
    assert trained_on == {"model_name_or_path": tracking.run_id(base)}
    checkpoint = adapter / "checkpoint-1"
    assert merge(capsys, adapter, "--output_dir", tmp_path / "merged")[0] == 0  # on its own base: merged
    assert merge(capsys, checkpoint, "--output_dir", tmp_path / "merged_checkpoint")[0] == 0
    tracking.mark_complete(base)  # trained again in place: another run
    for trained in (adapter, checkpoint):
        code, message = merge(capsys, trained, "--output_dir", tmp_path / "merged_again")
        assert code == 2 and f"was trained on the run {trained_on['model_name_or_path']} in '{base}'" in message
        assert not (tmp_path / "merged_again").exists()
        result = run_hfgen_here("generate", trained, "--prompt", "the cat", "--max_new_tokens", "2")
        assert result.returncode == 2 and "train the adapter again on the new base" in result.stderr


def test_a_t2i_lora_run_whose_base_is_gone_is_told_so_and_how_to_point_it_at_the_base_s_new_place(tmp_path, capsys):
    # a t2i / t2i_flow LoRA run whose recorded base no longer exists (the project moved: lora_base.json holds the
    # absolute path) was told "the base was trained again in place since"; nothing was trained (probe 44 B2)
    from hfgen import tracking

    run, gone = tmp_path / "t2i_lora", tmp_path / "old_place" / "t2i"
    run.mkdir()
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"")
    tracking.write_json(run / "lora_base.json", {"pretrained_model_name_or_path": str(gone), "pipeline_changes": {}})
    (run / "recipe.yaml").write_text("stage: t2i\n")
    tracking.mark_complete(run, input_runs={"pretrained_model_name_or_path": "0123abcd"})  # its base's run
    expected = (f"the adapter's pretrained_model_name_or_path '{gone}' does not exist (from {run / 'lora_base.json'}); "
                "if the base was moved (with its project, say), edit pretrained_model_name_or_path in lora_base.json "
                "to its new path")  # fmt: skip
    code, message = merge(capsys, run, "--output_dir", tmp_path / "merged")
    assert code == 2 and expected in message and "trained again" not in message, message
    result = run_hfgen_here("generate", run, "--prompt", "a digit", "--output_dir", tmp_path / "images")
    assert result.returncode == 2 and expected in result.stderr and "trained again" not in result.stderr


def test_an_adapter_trained_on_a_checkpoint_whose_run_was_trained_again_in_place_is_refused(tmp_path, capsys):
    # a LoRA run on RUN/checkpoint-2 recorded no base run (a checkpoint has no run id): after that run was trained
    # again in place, the adapter was merged and sampled on the new checkpoint-2's weights with no word (probe 42 B5)
    from hfgen import tracking
    from hfgen.recipe import load_recipe
    from hfgen.train import run_recipe

    checkpoint = save_tiny_llama(tmp_path / "base" / "checkpoint-2")
    (tmp_path / "base" / "recipe.yaml").write_text("stage: pretrain\n")  # a complete checkpoint of an hfgen run
    (checkpoint / tracking.CHECKPOINT_STATE).write_text(json.dumps({"step": 2, "metrics_rows": 0}))
    adapter = tmp_path / "adapter"
    overrides = ["--model_name_or_path", checkpoint, "--output_dir", adapter, "--max_steps", "1"]
    overrides += [
        "--max_train_samples",
        "8",
        "--max_eval_samples",
        "4",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
    ]
    run_recipe(load_recipe(REPO / "recipes/tiny/sft_lora.yaml", list(map(str, overrides))))
    assert merge(capsys, adapter, "--output_dir", tmp_path / "merged")[0] == 0  # on its own base: merged
    save_tiny_llama(checkpoint, seed=1)  # the run trained again in place: other weights in its checkpoint-2
    code, message = merge(capsys, adapter, "--output_dir", tmp_path / "merged_again")
    assert code == 2 and f"was trained on the checkpoint '{checkpoint}', which changed since" in message, message
    assert "model.safetensors" in message and not (tmp_path / "merged_again").exists()
    result = run_hfgen_here("generate", adapter, "--prompt", "the cat", "--max_new_tokens", "2")
    assert result.returncode == 2 and "train the adapter again on the new base" in result.stderr


def test_an_adapter_trained_on_a_hub_id_whose_cached_snapshot_moved_is_refused(tmp_path, capsys, hub_cache):
    # an adapter trained on `tinyorg/tiny-llama` from the local Hugging Face cache was merged (and sampled) on
    # whatever snapshot the cache's refs/main named: after `hf download` fetched a new commit, exit 0 with other
    # weights, and merged_from.json named no snapshot (probe 43 A2)
    from hfgen.recipe import load_recipe
    from hfgen.train import run_recipe

    first, second = "a" * 39 + "1", "b" * 39 + "2"
    hub_cache("tinyorg/tiny-llama", save_tiny_llama(tmp_path / "llama_b", seed=1), second)
    hub_cache("tinyorg/tiny-llama", save_tiny_llama(tmp_path / "llama_a"), first)  # refs/main: the first
    adapter = tmp_path / "adapter"
    overrides = ["--model_name_or_path", "tinyorg/tiny-llama", "--output_dir", adapter, "--max_steps", "1"]
    overrides += ["--max_train_samples", "8", "--max_eval_samples", "4", "--eval_strategy", "no"]
    overrides += ["--save_strategy", "steps", "--save_steps", "1", "--num_samples", "0"]
    run_recipe(load_recipe(REPO / "recipes/tiny/sft_lora.yaml", list(map(str, overrides))))
    assert merge(capsys, adapter, "--output_dir", tmp_path / "merged")[0] == 0  # on its own snapshot: merged
    assert json.loads((tmp_path / "merged" / "merged_from.json").read_text())["base_commit"] == first
    (tmp_path / "hub" / "models--tinyorg--tiny-llama" / "refs" / "main").write_text(second)  # a new download
    for trained in (adapter, adapter / "checkpoint-1"):
        code, message = merge(capsys, trained, "--output_dir", tmp_path / "merged_again")
        said = f"was trained on the snapshot {first} of 'tinyorg/tiny-llama', which the Hugging Face cache now resolves"
        assert code == 2 and said in message and second in message, message
        assert not (tmp_path / "merged_again").exists()
        result = run_hfgen_here("generate", trained, "--prompt", "the cat", "--max_new_tokens", "2")
        assert result.returncode == 2 and "train the adapter again on the new snapshot" in result.stderr


def test_a_lora_adapter_named_by_hub_id_is_told_to_be_given_as_its_snapshot_dir(
    base_and_adapter, tmp_path, capsys, hub_cache
):
    # `hf download ORG/some-lora` leaves an adapter in the cache: given by its id, check/generate/eval said
    # transformers' "We couldn't connect to 'https://huggingface.co'" (the files were cached) and merge "not a LoRA
    # adapter dir (no adapter_config.json)" (it has one) (probe 43 A9). Its snapshot dir loads
    _, adapter = base_and_adapter
    snapshot = hub_cache("tinyorg/tiny-lora", adapter, "4" * 40)
    said = "'tinyorg/tiny-lora' is a LoRA adapter on the hub, which hfgen loads from a dir: give its cached snapshot "
    said += f"dir '{snapshot}'"
    code, message = merge(capsys, "tinyorg/tiny-lora", "--output_dir", tmp_path / "merged")
    assert code == 2 and said in message, message
    for command in (["generate", "tinyorg/tiny-lora", "--prompt", "hi"], ["eval", "tinyorg/tiny-lora", "--quiet"]):
        result = run_hfgen_here(*command)
        assert result.returncode == 2 and said in result.stderr and "huggingface.co" not in result.stderr, result.stderr
    result = run_hfgen_here("check", REPO / "recipes/tiny/sft_lora.yaml", "--model_name_or_path", "tinyorg/tiny-lora",
                            "--output_dir", tmp_path / "out")  # fmt: skip
    assert result.returncode == 2 and f"model_name_or_path {said}" in result.stderr, result.stderr
    assert merge(capsys, snapshot, "--output_dir", tmp_path / "merged")[0] == 0  # as the message says


def test_a_merge_of_a_run_trained_on_raw_prompts_is_prompted_raw_once_the_run_dir_moved(tmp_path, capsys):
    # generate/eval read how the adapter's run prompted its model from that run's records, through merged_from.json's
    # path: once the run dir was moved or deleted (the usual reason to merge) the merge was prompted in the chat
    # template, with no note (probe 42 I5). hfgen merge keeps the run's trained_on_chat in merged_from.json
    from hfgen import tracking
    from hfgen.generate import wants_chat
    from hfgen.models import load_tokenizer
    from hfgen.recipe import load_recipe
    from hfgen.train import run_recipe

    base = save_tiny_llama(tmp_path / "base")
    rows = tmp_path / "rows.jsonl"  # plain prompt/completion strings: trained raw
    rows.write_text("".join(json.dumps({"prompt": f"Describe the {c} fox. Answer: ", "completion": f"the {c} fox."})
                            + "\n" for c in ("red", "blue", "green", "gray") * 4))  # fmt: skip
    adapter = tmp_path / "adapter"
    overrides = ["--model_name_or_path", base, "--output_dir", adapter, "--dataset_name", rows, "--max_steps", "1"]
    overrides += ["--max_eval_samples", "4", "--eval_strategy", "no", "--save_strategy", "no", "--num_samples", "0"]
    run_recipe(load_recipe(REPO / "recipes/tiny/sft_lora.yaml", list(map(str, overrides))))
    assert tracking.read_json(adapter / "eval.json")["trained_on_chat"] is False
    assert merge(capsys, adapter, "--output_dir", tmp_path / "merged")[0] == 0
    tokenizer = load_tokenizer(str(tmp_path / "merged"))
    assert tokenizer.chat_template and not wants_chat(str(tmp_path / "merged"), tokenizer)
    adapter.rename(tmp_path / "moved")
    assert not wants_chat(str(tmp_path / "merged"), tokenizer)  # still raw, from merged_from.json
    # an older merge, which kept no word: prompted in the template, said
    record = json.loads((tmp_path / "merged/merged_from.json").read_text())
    del record["trained_on_chat"]
    (tmp_path / "merged/merged_from.json").write_text(json.dumps(record))
    assert wants_chat(str(tmp_path / "merged"), tokenizer)
    assert (
        "does not record whether its adapter's run prompted its model in the chat template" in capsys.readouterr().err
    )
