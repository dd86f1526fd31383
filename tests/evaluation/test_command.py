"""`hfgen eval`: prints quality, diversity and speed for a text model and merges them into eval.json."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_hfgen, run_hfgen_here
from hfgen import tracking
from hfgen.cli import main as hfgen

FAST = [
    "--num_prompts", "4", "--num_samples", "2", "--max_new_tokens", "8", "--speed_new_tokens", "8",
    "--speed_batch_size", "2", "--perplexity_texts", "8", "--quiet",
]  # fmt: skip

# Tiny models gain nothing from a second torch thread, and on a CPU shared with other processes two threads
# wait on each other (several times slower): the subprocesses run on one.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tokenizer():
    from hfgen.models import build_embedded_tokenizer

    return build_embedded_tokenizer()


def llama_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved like a training run's output (weights, config, tokenizer)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(llama_config(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tokenizer):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny_reward")
    config = llama_config(tokenizer)
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_eval_prints_the_three_criteria_and_merges_eval_json(model_dir):
    tracking.write_json(model_dir / "eval.json", {"perplexity": 5.0})  # a stage's own figure, to be kept
    result = run_hfgen("eval", model_dir, *FAST, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    for word in ("quality", "diversity", "speed", "perplexity", "oracle_score", "distinct_2", "self_bleu",
                 "tokens_per_s_batch1", "tokens_per_s_batched", "peak_memory_mb"):  # fmt: skip
        assert word in result.stdout, word
    results = tracking.read_json(model_dir / "eval.json")
    assert results["perplexity"] == 5.0
    # a random model of a 512-token vocabulary: perplexity near 512, and very varied samples
    assert 100 < results["quality/perplexity"] < 2000
    assert 0 < results["diversity/distinct_1"] <= 1 and 0 <= results["diversity/self_bleu"] < 0.5
    assert results["speed/tokens_per_s_batched"] > 0 and results["speed/peak_memory_mb"] > 0
    assert results["eval/num_prompts"] == 4 and results["eval/chat"] is False
    rows = [json.loads(line) for line in (model_dir / "eval_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(row["responses"]) == 2 and len(row["oracle"]) == 2 for row in rows)


def test_chat_model_reward_score_and_win_rate_against_itself_is_one_half(
    model_dir, reward_dir, tmp_path, capsys, monkeypatch
):
    from hfgen.evaluation import command

    loads = []  # the reward model is loaded once, for the model and the baseline (twice, two copies resident, before)
    load = command.load_reward_model
    monkeypatch.setattr(command, "load_reward_model", lambda *a: loads.append(1) or load(*a))
    output = tmp_path / "eval.json"
    args = ["eval", str(model_dir), *FAST, "--chat", "--reward_model", str(reward_dir), "--baseline", str(model_dir)]
    assert hfgen([*args, "--output", str(output)]) == 0
    assert len(loads) == 1
    results = tracking.read_json(output)
    assert isinstance(results["quality/reward_score"], float)
    # same model, same seed: identical responses, every comparison a tie
    assert results["quality/win_rate_vs_baseline_by_reward"] == 0.5
    assert results["quality/win_rate_vs_baseline_by_oracle"] == 0.5
    assert results["quality/baseline_reward_score"] == results["quality/reward_score"]
    # the oracle, which cannot be gamed, is the headline judge when there is one
    assert results["quality/win_rate_vs_baseline"] == 0.5 and results["eval/win_rate_judge"] == "oracle"
    # chat models are measured on conversations formatted with their chat template
    assert results["eval/chat"] is True and results["eval/perplexity_dataset"] == "embedded:instructions"
    # the judges and counts the figures came from (another oracle or reward model gave figures that looked alike)
    assert results["eval/reward_model"] == str(reward_dir.resolve())
    assert results["eval/oracle"] == "hfgen.data.embedded:oracle_scores" and results["eval/seed"] == 0
    assert results["eval/perplexity_texts"] > 0
    assert "win_rate_vs_baseline" in capsys.readouterr().out
    assert (tmp_path / "eval_samples.jsonl").is_file()  # beside --output


def test_paths_under_home_written_with_a_tilde_are_read_and_written_there(model_dir, reward_dir, tmp_path, monkeypatch):
    # `--output=~/e.json` (the shell leaves a `~` after `=` as written) wrote into a folder named '~' in the working
    # directory, and a model or reward model '~/m' was taken for a hub id
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir(), home.mkdir()
    (home / "m").symlink_to(model_dir)
    (home / "rm").symlink_to(reward_dir)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    fast = ["--num_prompts", "2", "--num_samples", "1", "--max_new_tokens", "4", "--perplexity_dataset", "none"]
    assert hfgen(["eval", "~/m", "--output=~/e.json", "--reward_model", "~/rm", *fast, "--quiet"]) == 0
    assert "quality/reward_score" in tracking.read_json(home / "e.json") and (home / "e_samples.jsonl").is_file()
    assert not (work / "~").exists()


def test_lora_adapter_dir_is_evaluated_on_its_base_in_chat_format(model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter_dir = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter_dir)
    assert hfgen(["eval", str(adapter_dir), *FAST]) == 0
    results = tracking.read_json(adapter_dir / "eval.json")
    assert results["eval/chat"] is True and results["eval/perplexity_of"] == "responses"
    assert all(
        isinstance(results[k], float)
        for k in ("quality/perplexity", "diversity/distinct_1", "speed/tokens_per_s_batch1")
    )


def test_perplexity_can_be_skipped(model_dir, tmp_path):
    output = tmp_path / "policy_a.json"
    assert hfgen(["eval", str(model_dir), *FAST, "--perplexity_dataset", "none", "--output", str(output)]) == 0
    results = tracking.read_json(output)
    assert "quality/perplexity" not in results and "quality/oracle_score" in results
    # the samples are named after --output (were eval_samples.jsonl, which the next model evaluated there replaced)
    assert (tmp_path / "policy_a_samples.jsonl").is_file() and not (tmp_path / "eval_samples.jsonl").exists()


def test_a_prompts_samples_and_the_figures_do_not_depend_on_batch_size_or_num_prompts(model_dir, tmp_path):
    """Every prompt's samples were drawn from one global generator in batch order: the same model and --seed gave
    other samples, and another oracle score and diversity, at another --batch_size or --num_prompts."""

    def evaluate(name, *options):
        output = tmp_path / f"{name}.json"
        arguments = [*FAST, "--perplexity_dataset", "none", "--output", str(output), *options]
        assert hfgen(["eval", str(model_dir), *arguments]) == 0
        rows = [json.loads(line) for line in (tmp_path / f"{name}_samples.jsonl").read_text().splitlines()]
        figures = {k: v for k, v in tracking.read_json(output).items() if k.startswith(("quality/", "diversity/"))}
        return rows, figures

    rows, figures = evaluate("batched", "--batch_size", "64")
    one_prompt_a_batch = evaluate("one_a_batch", "--batch_size", "2")  # 2 samples: one prompt a batch
    assert one_prompt_a_batch == (rows, figures) and len(rows) == 4
    assert evaluate("fewer", "--num_prompts", "2")[0] == rows[:2]
    assert evaluate("other_seed", "--seed", "1")[0] != rows


def test_the_baseline_samples_with_the_evaluated_models_seeds_whatever_format_it_is_prompted_in(tokenizer, tmp_path):
    """The baseline draws with the evaluated model's per-prompt seeds (common random numbers), seeded by the prompts
    as read, not as each model is prompted: a chat model against a raw-text baseline, seeded from its own prompts or
    from the global generator, drew other random numbers. A model whose next token does not depend on its input
    (every token embedded alike) then answers every prompt alike in either format: with the same numbers the two
    models' responses, and so their figures, are the same."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(tokenizer))
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight[:1].clone())  # every token's row alike
    raw, chat = tmp_path / "raw", tmp_path / "chat"
    for path in (raw, chat):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    tracking.write_json(chat / "merged_from.json", {"trained_on_chat": True})  # prompted in its chat template
    oracle = tmp_path / "length_oracle.py"  # scores each response by its length, writing down what it was given
    oracle.write_text(
        "import json, pathlib\n"
        "def length(prompts, responses):\n"
        "    with open(pathlib.Path(__file__).with_suffix('.jsonl'), 'a') as seen:\n"
        "        seen.write(json.dumps(responses) + '\\n')\n"
        "    return [float(len(response)) for response in responses]\n"
    )
    output = tmp_path / "eval.json"
    arguments = [*FAST, "--perplexity_dataset", "none", "--oracle", f"{oracle}:length", "--output", str(output)]
    assert hfgen(["eval", str(chat), "--baseline", str(raw), *arguments]) == 0
    results = tracking.read_json(output)
    assert results["eval/chat"] is True
    responses, baseline_responses = map(json.loads, oracle.with_suffix(".jsonl").read_text().splitlines())
    assert responses == baseline_responses and len(set(responses)) > 1  # sampled, and each with the same numbers
    assert results["quality/baseline_oracle_score"] == results["quality/oracle_score"]
    assert results["quality/win_rate_vs_baseline_by_oracle"] == 0.5


def test_a_reevaluation_replaces_the_earlier_evaluations_figures_and_keeps_the_stages(model_dir, tmp_path, capsys):
    # the earlier evaluation's figures stayed beside the new settings: a baseline win rate the new one did not measure
    from hfgen.evaluation.policy import Sampling, summarise

    output = tmp_path / "eval.json"
    # a stage's own figures: a loss and a PPO/DPO/GRPO held-out comparison, whose settings were eval/... keys that
    # `hfgen eval` deleted or overwrote (its win rate then read as measured on --num_prompts at --temperature)
    rows = [{"prompt": f"p{i // 2}", "kl": 0.1, "sft/response": "a", "ppo/response": "b", "sft/oracle": 0.0,
             "ppo/oracle": 1.0} for i in range(6)]  # fmt: skip
    stage = {"train_loss": 3.5, **summarise(rows, "ppo", Sampling(samples_per_prompt=2, temperature=0.7))}
    assert stage["heldout/num_prompts"] == 3 and stage["heldout/temperature"] == 0.7
    tracking.write_json(output, stage)
    assert hfgen(["eval", str(model_dir), *FAST, "--baseline", str(model_dir), "--output", str(output)]) == 0
    assert "quality/win_rate_vs_baseline" in tracking.read_json(output)
    assert hfgen(["eval", str(model_dir), *FAST, "--perplexity_dataset", "none", "--output", str(output)]) == 0
    results = tracking.read_json(output)
    assert {key: results.get(key) for key in stage} == stage and "quality/oracle_score" in results
    assert results["eval/num_prompts"] == 4 and results["eval/temperature"] == 0.8  # hfgen eval's own settings
    assert not any(key.startswith(("quality/win_rate", "quality/baseline", "eval/baseline")) for key in results)
    assert "quality/perplexity" not in results and "eval/perplexity_dataset" not in results
    # an --output that is not a JSON object was a TypeError after the whole evaluation
    output.write_text("[1]")
    with pytest.raises(SystemExit) as exit_info:
        hfgen(["eval", str(model_dir), *FAST, "--output", str(output)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "holds JSON list, not an object" in error and "Traceback" not in error


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device whose writes find the disk full")
def test_an_eval_that_finds_the_disk_full_changes_neither_file_and_exits_2(model_dir, tmp_path, capsys):
    # eval.json was replaced before the samples were written: a full disk then left the new figures beside the
    # earlier evaluation's samples (which `hfgen report` shows with them), after an OSError traceback (exit 1)
    output = tmp_path / "eval.json"
    assert hfgen(["eval", str(model_dir), *FAST, "--output", str(output)]) == 0
    before = {name: (tmp_path / name).read_text() for name in ("eval.json", "eval_samples.jsonl")}
    (tmp_path / "eval_samples.jsonl.tmp").symlink_to("/dev/full")  # where the samples are written first
    with pytest.raises(SystemExit) as exit_info:
        hfgen(["eval", str(model_dir), *FAST, "--num_samples", "3", "--output", str(output)])
    assert exit_info.value.code == 2
    assert f"the disk is full: writing '{tmp_path / 'eval_samples.jsonl'}' failed" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_text() for name in before} == before  # neither changed
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # no tmp left


def test_an_eval_whose_prompts_find_datasets_cache_full_names_the_cache(
    model_dir, tmp_path, capsys, full_datasets_cache
):
    # datasets' full cache was named (probe 41 C3) in `hfgen train` and `hfgen check` only: eval (sweep's
    # evaluation child too) said "writing 'its output' failed", which has room
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me about the cat {i}."}) + "\n" for i in range(8)))
    cache, made = full_datasets_cache
    output = tmp_path / "eval.json"
    with pytest.raises(SystemExit) as exit_info:
        hfgen(["eval", str(model_dir), *FAST, "--eval_dataset", str(prompts), "--output", str(output)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and made, err
    assert f"datasets could not write its cache under '{cache}' (HF_DATASETS_CACHE; No space left" in err
    assert not output.exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["missing_dir"], "does not exist"),
        (["{model}", "--baseline", "{model}", "--oracle", "none"], "--baseline needs a judge"),
        (["{model}", "--oracle", "no_such_module:f"], "cannot import module 'no_such_module'"),
        (["{model}", "--oracle", "no_colon"], "is not of the form package.module:function"),
        (["{model}", "--prompt_column", "question"], "has no column 'question'"),
        (["{model}", "--num_samples", "0"], "--num_samples must be at least 1"),
        (["{model}", "--num_samples", "2", "--temperature", "0"], "--temperature 0 decodes greedily"),
        (["{model}", "--top_p", "1.5"], "--top_p must lie in (0, 1]"),
        (["{model}", "--temperature", "nan"], "--temperature must be a finite number (0 is greedy decoding), got nan"),
        (["{model}", "--temperature", "inf"], "--temperature must be a finite number (0 is greedy decoding), got inf"),
        (["{model}", "--seed", str(2**64)], "--seed must be a 64-bit integer"),
        (["{model}", "--device", "nonsense"], "is not a device name"),
        (["{model}", "--reward_model", "{model}"], "is not a reward model"),
        (["{model}", "--reward_model", "{vae}"], "is a diffusers AutoencoderKL, not a reward model"),  # (was loaded)
        (["{model}", "--output", "{model}"], "is a directory; give the file to write"),
        (["{model}", "--perplexity_texts", "0"], "--perplexity_texts must be at least 1"),
        (["{model}", "--perplexity_dataset", "{model}/missing.jsonl"], "missing.jsonl"),
        (["{model}", "--perplexity_dataset", "embedded:prompts"], "needs texts (a 'text' column), conversations"),
        (["{model}", "--images_per_prompt", "2"], "--images_per_prompt does not apply to TARGET"),
    ],
)
def test_bad_input_is_a_one_paragraph_error_with_exit_code_2(model_dir, tmp_path, capsys, arguments, message):
    (tmp_path / "vae").mkdir()  # a vae run's config (diffusers': _class_name, no architectures)
    (tmp_path / "vae/config.json").write_text('{"_class_name": "AutoencoderKL"}')
    arguments = [a.format(model=model_dir, vae=tmp_path / "vae") for a in arguments]
    with pytest.raises(SystemExit) as exit_info:
        hfgen(["eval", *arguments, "--quiet"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_a_gpu_index_the_machine_lacks_is_a_one_paragraph_error(model_dir, monkeypatch, capsys):
    """(GPU simulated: torch sees one.) --device cuda:7 passed the check and failed with torch's "CUDA error: invalid
    device ordinal" once the model had loaded (probe 43 C5)."""
    from hfgen.evaluation.command import device_problems

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_problems("cuda") == device_problems("cuda:0") == []
    with pytest.raises(SystemExit) as exit_info:
        hfgen(["eval", str(model_dir), "--device", "cuda:7", "--quiet"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error, error
    assert "--device 'cuda:7': torch sees 1 GPU(s) here, cuda:0 to cuda:0" in error


def test_image_eval_refuses_the_text_options_the_user_gave(tmp_path, capsys):
    # a diffusers pipeline's evaluation ignored them silently (--num_prompts 3 evaluated the run's own prompts)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        hfgen(["eval", str(tmp_path), "--num_prompts", "3", "--temperature", "0.5", "--chat", "--seed", "1"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error, error
    assert "--num_prompts, --temperature, --chat do not apply to TARGET" in error, error
    assert "--eval_dataset" not in error and "--seed" not in error  # defaults, and an option images use


def test_image_eval_refuses_a_seed_past_64_bits(tmp_path, capsys):
    # torch.manual_seed's "ValueError: Overflow when unpacking long long", after loading the pipeline
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        hfgen(["eval", str(tmp_path), "--seed", str(2**64), "--quiet"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--seed must be a 64-bit integer" in error and "Traceback" not in error


@pytest.mark.parametrize("scale", ["inf", "nan"])
def test_image_eval_refuses_a_guidance_scale_that_is_not_finite(tmp_path, capsys, scale):
    # inf scored all-black images (NaN pixels cast to 0) as a model's, nan scored unguided ones: both exit 0
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        hfgen(["eval", str(tmp_path), "--guidance_scale", scale, "--output", str(tmp_path / "e.json"), "--quiet"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error, error
    assert f"--guidance_scale must be a finite number, got {scale}" in error and not (tmp_path / "e.json").exists()


def test_eval_and_generate_refuse_a_reward_model_or_an_autoencoder_naming_what_it_is(reward_dir, tmp_path, capsys):
    # loaded as causal LMs they would generate from a random head and print figures that mean nothing
    from diffusers import AutoencoderKL
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    vae = tmp_path / "vae"
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=2).save_pretrained(vae)
    # a reward model's LoRA adapter, as PPO's value_model/ is (it generated text from its base, the head dropped)
    adapter = tmp_path / "value_model"
    lora = LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["q_proj", "v_proj"])
    get_peft_model(AutoModelForSequenceClassification.from_pretrained(reward_dir), lora).save_pretrained(adapter)
    for target, message in ((reward_dir, "is a reward model (LlamaForSequenceClassification)"),
                            (vae, "is a diffusers AutoencoderKL"),
                            (adapter, "is a LoRA adapter of a sequence classifier (task_type SEQ_CLS")):  # fmt: skip
        for command in (["eval", str(target), "--quiet"], ["generate", str(target), "--prompt", "the cat"]):
            with pytest.raises(SystemExit) as exit_info:
                hfgen(command)
            error = capsys.readouterr().err
            assert exit_info.value.code == 2 and message in error and "Traceback" not in error, command
        assert not (Path(target) / "eval_samples.jsonl").exists()
    # a reward run's figures are named only where they are: PPO's full value_model/ has no eval.json
    from hfgen.models import not_a_generator

    for name, figures in (("value_full", False), ("reward_run", True)):
        (tmp_path / name).mkdir()
        shutil.copy(Path(reward_dir) / "config.json", tmp_path / name)
        if figures:
            (tmp_path / name / "eval.json").write_text("{}")
        (problem,) = not_a_generator(tmp_path / name, "model")
        assert ("held-out accuracy is in its own eval.json" in problem) == figures, problem


@pytest.mark.slow
def test_eval_on_a_tiny_pretrain_run(tmp_path):
    """The acceptance path: a (short) tiny pretrain run, then `hfgen eval` on its output dir."""
    run = tmp_path / "pretrain"
    trained = run_hfgen(
        "train", REPO / "recipes/tiny/pretrain.yaml", "--output_dir", run, "--max_steps", "30",
        "--max_train_samples", "400", "--max_eval_samples", "20", "--logging_steps", "10", env=ONE_THREAD,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = run_hfgen("eval", run, *FAST, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    results = tracking.read_json(run / "eval.json")
    assert results["perplexity"] > 0  # the stage's figure is kept beside ours
    assert results["quality/perplexity"] < 200  # 30 steps already beat a uniform guess over 512 tokens
    assert results["eval/perplexity_dataset"] == "embedded:corpus"
    for criterion in ("quality/oracle_score", "diversity/distinct_3", "speed/tokens_per_s_batch1"):
        assert isinstance(results[criterion], float), criterion


def test_eval_and_generate_take_a_complete_checkpoint_and_refuse_an_incomplete_one(tmp_path, capsys):
    # a checkpoint carries a copy of its run's recipe.yaml and no COMPLETE marker: every checkpoint was refused as
    # "an unfinished hfgen run"
    run = tmp_path / "pretrain"
    trained = run_hfgen(
        "train", REPO / "recipes/tiny/pretrain.yaml", "--output_dir", run, "--max_steps", "2", "--save_steps", "2",
        "--max_train_samples", "64", "--max_eval_samples", "8", "--logging_steps", "1", env=ONE_THREAD,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoint = run / "checkpoint-2"
    assert (checkpoint / "recipe.yaml").is_file() and tracking.is_complete_checkpoint(checkpoint)
    output = tmp_path / "checkpoint_eval.json"
    assert hfgen(["eval", str(checkpoint), *FAST, "--perplexity_dataset", "none", "--output", str(output)]) == 0
    assert tracking.read_json(output)["eval/num_prompts"] == 4
    assert hfgen(["generate", str(checkpoint), "--prompt", "the cat", "--max_new_tokens", "4"]) == 0
    capsys.readouterr()
    (checkpoint / tracking.CHECKPOINT_STATE).unlink()  # as a save killed half way leaves it
    for command in (["generate", str(checkpoint), "--prompt", "hi"], ["eval", str(checkpoint), "--quiet"]):
        with pytest.raises(SystemExit) as exit_info:
            hfgen(command)
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and "is an incomplete training checkpoint" in error, error


def test_a_hub_reward_model_is_recorded_by_its_id_and_snapshot(reward_dir, tokenizer, hub_cache, monkeypatch, tmp_path):
    # `--reward_model tinyorg/tiny-rm` (served from the Hugging Face cache) was recorded in eval.json as the working
    # directory joined with the id, a dir that does not exist (probe 43 A10)
    import argparse

    from hfgen.evaluation.command import load_judges

    hub_cache("tinyorg/tiny-rm", reward_dir, "c" * 40)
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(reward_model="tinyorg/tiny-rm", oracle="none", eval_dataset="x", batch_size=4)
    assert load_judges(args, "cpu", tokenizer)[1] == {"reward": "tinyorg/tiny-rm@" + "c" * 40}


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
def test_eval_scores_with_ppos_scorer_rendering(reward_dir, tokenizer, chat):
    """`hfgen eval` reads what PPO's reward read: the policy's own ids (shared tokenizer), EOS only where the
    response finished, the template's end-of-turn tokens after it; plain-text prompts too (they used to be joined
    with a newline and no EOS)."""
    import argparse

    from transformers import AutoModelForSequenceClassification

    from hfgen.evaluation.command import load_judges
    from hfgen.generate import Completion
    from hfgen.rl.rollout import sequence_scores, turn_close_ids

    args = argparse.Namespace(reward_model=str(reward_dir), oracle="none", eval_dataset="x", batch_size=4)
    judges, judged_by = load_judges(args, "cpu", tokenizer)
    judge = judges["reward"]
    assert judged_by == {"reward": str(reward_dir.resolve())}  # what eval.json records as eval/reward_model
    prompt = [{"role": "user", "content": "describe the cat."}] if chat else "the cat"
    if chat:
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
    said = tokenizer(" is kind.", add_special_tokens=False)["input_ids"]
    finished = Completion(" is kind.", prompt_ids, said + [tokenizer.eos_token_id], True)
    cut_off = Completion(" is kind.", prompt_ids, said, False)
    scores = judge([prompt], [[finished, cut_off]])[0]
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1)
    close = turn_close_ids(tokenizer) if chat else [tokenizer.eos_token_id]
    expected = sequence_scores(
        reward_model, [prompt_ids + said + close, prompt_ids + said], tokenizer.pad_token_id, 4
    ).tolist()
    assert scores == pytest.approx(expected, abs=1e-5) and scores[0] != pytest.approx(scores[1])


def test_string_prompts_of_a_chat_model_are_scored_as_its_conversations(model_dir, reward_dir, tokenizer, tmp_path):
    """A chat model's string prompts (a .txt, a string `prompt` column) are rendered as user turns, and the reward
    model must read them so too: they reached PPO's scorer as strings, which it took for raw text, leaving out the
    template's end-of-turn after a finished answer (the probe: -0.087 instead of 1.154 on the tiny SFT model)."""
    from transformers import AutoModelForCausalLM

    # a model that ends every answer at once (EOS): every response is finished, so the end-of-turn matters
    answers_eos = tmp_path / "answers_eos"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():  # the residual stream is the token's embedding, whose first coordinate votes for EOS
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 10.0
    model.save_pretrained(answers_eos)
    tokenizer.save_pretrained(answers_eos)
    prompts = ["describe the cat.", "tell me about the owl."]
    as_strings, as_messages = tmp_path / "strings.jsonl", tmp_path / "messages.jsonl"
    as_strings.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    as_messages.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in prompts))
    scores = []
    for dataset in (as_strings, as_messages):
        output = tmp_path / f"{dataset.stem}.json"
        arguments = ["--eval_dataset", dataset, "--reward_model", reward_dir, "--oracle", "none", "--chat"]
        arguments += ["--perplexity_dataset", "none", "--output", output]
        assert hfgen(["eval", str(answers_eos), *FAST, *map(str, arguments)]) == 0
        rows = [json.loads(line) for line in output.with_name(f"{dataset.stem}_samples.jsonl").read_text().splitlines()]
        assert all(response == "" for row in rows for response in row["responses"])  # finished at once
        scores.append(tracking.read_json(output)["quality/reward_score"])
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)


def test_auto_judges_and_perplexity_of_the_arithmetic_prompts_are_the_arithmetic_tasks(tokenizer):
    # the description world's oracle scored correct sums -1, and perplexity was measured on its descriptions
    from hfgen.data.arithmetic import correct_steps
    from hfgen.evaluation.command import perplexity_texts, resolve_oracle

    prompts = "embedded:arithmetic_prompts"
    assert resolve_oracle("auto", prompts).__wrapped__ is correct_steps
    assert resolve_oracle("auto", prompts)(["2+2+9=?"], ["2+2=4. 4+9=13. answer: 13"]) == [1.0]
    dataset, texts, prefixes, _ = perplexity_texts("auto", prompts, tokenizer, True, 2)
    assert dataset == "embedded:arithmetic_instructions" and len(texts) == 2  # its prompt/completion conversations
    assert texts[0].startswith(prefixes[0]) and "answer:" in texts[0].removeprefix(prefixes[0])
    dataset, texts, prefixes, _ = perplexity_texts("auto", prompts, tokenizer, False, 2)
    assert dataset == "embedded:arithmetic_corpus" and prefixes is None and "=" in texts[0]
    assert perplexity_texts("auto", "embedded:prompts", tokenizer, True, 1)[0] == "embedded:instructions"


def test_a_chat_models_perplexity_scores_the_response_up_to_its_eos_as_sft_trains_it(tokenizer):
    # the whole rendered conversation was scored: the template's newline after the turn's EOS, a token SFT never
    # trains, cost ~12 nats a text and multiplied a tiny SFT model's perplexity by 2.6
    from hfgen.data.loading import load_raw
    from hfgen.evaluation.command import perplexity_texts
    from hfgen.stages.sft import tokenize_response

    _, texts, prefixes, _ = perplexity_texts("embedded:instructions", "embedded:prompts", tokenizer, True, 3)
    conversations = load_raw("embedded:instructions")["test"]["messages"][:3]
    for text, prefix, messages in zip(texts, prefixes, conversations):
        ids, start = tokenize_response(tokenizer, messages[:-1], messages[-1:], None)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids and ids[-1] == tokenizer.eos_token_id
        assert len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) == start


def test_perplexity_reads_conversations_and_instructions_as_the_sft_stage_does(tokenizer, tmp_path):
    # content parts, {from, value} turns in `messages` and a conversation ending with a user's turn were raw
    # TypeError / ValueError tracebacks (probe 40 C6); Alpaca rows were refused
    from hfgen.evaluation.command import perplexity_texts

    expected_prefix = tokenizer.apply_chat_template(
        [{"role": "user", "content": "name a cat"}], tokenize=False, add_generation_prompt=True
    )
    layouts = {
        "parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": "name a cat"}]},
                               {"role": "assistant", "content": [{"type": "text", "text": "tom"}]}]},
        "from_value": {"messages": [{"from": "human", "value": "name a cat"}, {"from": "gpt", "value": "tom"}]},
        "dangling": {"messages": [{"role": "user", "content": "name a cat"}, {"role": "assistant", "content": "tom"},
                                  {"role": "user", "content": "another?"}]},
    }  # fmt: skip
    for name, row in layouts.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text((json.dumps(row) + "\n") * 3)
        _, texts, prefixes, _ = perplexity_texts(str(path), "embedded:prompts", tokenizer, True, 3)
        assert prefixes == [expected_prefix] * 3, name
        assert texts[0].removeprefix(expected_prefix) == "tom" + tokenizer.eos_token, name
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": "name a cat", "input": "", "output": "tom"}) + "\n")
    _, texts, prefixes, _ = perplexity_texts(str(alpaca), "embedded:prompts", tokenizer, False, 3)
    assert prefixes == ["name a cat\n\n"] and texts == ["name a cat\n\ntom" + tokenizer.eos_token]
    # a `text` column beside prompt/completion (the formatted text with its parts) is read, as before (review 40 F14)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"text": "a cat: tom", "prompt": "name a cat", "completion": "tom", "id": 1}) + "\n")
    assert perplexity_texts(str(mixed), "embedded:prompts", tokenizer, False, 3)[1:] == (
        ["a cat: tom" + tokenizer.eos_token],
        None,
        True,
    )


def test_an_oracle_is_read_as_a_reward_function_none_skipped_a_wrong_count_exit_2(
    model_dir, tmp_path, monkeypatch, capsys
):
    # None was a raw TypeError; too few scores were silently regrouped (a prompt got 1 score for 2 responses); the
    # score was a mean of per-prompt means, weighing a prompt's one scored response as much as another's two
    (tmp_path / "eval_oracles.py").write_text(
        "def some_none(prompts, responses):\n    return [None if i % 4 == 1 else float(i) for i in range(len(responses))]\n"
        "def short(prompts, responses):\n    return [1.0] * (len(responses) - 1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    output = tmp_path / "eval.json"
    common = ["eval", str(model_dir), *FAST, "--perplexity_dataset", "none", "--output", str(output)]
    assert hfgen([*common, "--oracle", "eval_oracles:some_none", "--baseline", str(model_dir)]) == 0
    results = tracking.read_json(output)
    rows = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert [row["oracle"] for row in rows] == [[0.0, None], [2.0, 3.0], [4.0, None], [6.0, 7.0]]
    # the mean over the 6 scored responses (the mean of per-prompt means would be 3.25)
    assert results["quality/oracle_score"] == results["quality/baseline_oracle_score"] == pytest.approx(22 / 6)
    assert results["quality/win_rate_vs_baseline_by_oracle"] == 0.5
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        hfgen([*common, "--oracle", "eval_oracles:short"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error
    assert "--oracle 'eval_oracles:short'" in error and "returned 7 scores for 8 responses" in error, error


def test_the_oracle_is_named_as_a_recipes_oracle_function_a_file_or_a_module_of_the_working_directory(
    model_dir, tmp_path
):
    # --oracle took only a MODULE:FUNC importable from PYTHONPATH: the path/to/file.py:function form and the
    # working directory that a recipe's oracle_function is read from were refused
    oracle = tmp_path / "cwd_oracle.py"
    oracle.write_text("def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    output = tmp_path / "eval.json"
    for spec, recorded in ((f"{oracle}:length", f"{oracle.resolve()}:length"), ("cwd_oracle:length", None)):
        result = run_hfgen_here("eval", model_dir, *FAST, "--perplexity_dataset", "none", "--oracle", spec,
                                "--output", output, cwd=tmp_path)  # fmt: skip
        assert result.returncode == 0, result.stderr
        results = tracking.read_json(output)
        assert results["eval/oracle"] == (recorded or spec) and results["quality/oracle_score"] is not None


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 of 256 learned positions: it reads no sequence longer than that."""
    from tiny_models import save_tiny_causal_lm

    return save_tiny_causal_lm(tmp_path_factory.mktemp("gpt2") / "gpt2", "gpt2")


def test_perplexity_texts_longer_than_the_learned_positions_are_cut_to_them(gpt2_dir, tmp_path, capsys):
    # an IndexError in the position lookup, after the speed runs and the sampling
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"text": " ".join(["the cat sits by the river."] * 100)}) + "\n")
    output = tmp_path / "eval.json"
    arguments = ["--perplexity_dataset", str(long), "--oracle", "none", "--no-chat", "--output", str(output)]
    assert hfgen(["eval", str(gpt2_dir), *FAST, *arguments]) == 0
    assert "1 of 1 texts are longer than the 256 positions gpt2 models learn" in capsys.readouterr().out
    assert 100 < tracking.read_json(output)["quality/perplexity"] < 2000  # a random model of 493 tokens


def test_speed_counts_the_tokens_generated_when_the_learned_positions_lower_them(gpt2_dir, tmp_path, capsys):
    # tokens/s counted --speed_new_tokens per sequence although generation stopped at the 256th position (1000
    # asked, ~250 generated: 3.5x too many tokens a second), and eval.json did not say how many were generated
    from transformers import AutoTokenizer

    from hfgen.evaluation.command import load_prompts

    output = tmp_path / "eval.json"
    arguments = ["--speed_new_tokens", "1000", "--perplexity_dataset", "none", "--no-chat", "--output", str(output)]
    assert hfgen(["eval", str(gpt2_dir), *FAST, *arguments]) == 0
    assert "max_new_tokens 1000 lowered to" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    prompts = [p[-1]["content"] for p in load_prompts("embedded:prompts", "test", "prompt", 2)]  # speed batch of 2
    assert tracking.read_json(output)["speed/new_tokens"] == 256 - max(len(tokenizer(p)["input_ids"]) for p in prompts)


def test_eval_prompts_are_read_in_any_prompt_layout_from_a_one_split_file(tmp_path):
    from hfgen.errors import UserError
    from hfgen.evaluation.command import load_prompts

    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"describe the cat {i}.", "output": "x"} for i in range(5)]))
    lines = tmp_path / "prompts.txt"
    lines.write_text("".join(f"describe the dog {i}.\n" for i in range(5)))
    questions = tmp_path / "qa.jsonl"
    questions.write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(5)))
    # --eval_split test (the default) on a file: its one split
    assert load_prompts(str(alpaca), "test", "prompt", 2)[1].startswith("describe the cat 1.")
    assert load_prompts(str(lines), "test", "prompt", 3) == [f"describe the dog {i}." for i in range(3)]
    assert load_prompts(str(questions), "test", "question", 2) == ["q0", "q1"]
    with pytest.raises(UserError, match="match no prompt layout.*--prompt_column"):
        load_prompts(str(questions), "test", "prompt", 2)
    # --num_prompts counts the prompts left once the empty ones are dropped (it counted rows: fewer were evaluated)
    gaps = tmp_path / "gaps.jsonl"
    gaps.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["a", "", " ", "b", "", "c", "d"]))
    assert load_prompts(str(gaps), "test", "prompt", 3) == ["a", "b", "c"]
    # none left (was a raw "ValueError: Column 'prompt' doesn't exist."), an empty or missing file: named by the option
    blank, empty = tmp_path / "blank.jsonl", tmp_path / "empty.jsonl"
    blank.write_text('{"prompt": ""}\n{"prompt": "  "}\n')
    empty.write_text("")
    for path, message in (
        (blank, "holds no non-empty prompt to sample from: its train split's 2 row(s) (prompt layout) were all dropped "
                "(2 empty rows)"),
        (empty, "is an empty file: it holds no rows"),
        (tmp_path / "missing.jsonl", "does not exist"),
    ):  # fmt: skip
        with pytest.raises(UserError) as error:
            load_prompts(str(path), "test", "prompt", 2)
        assert str(error.value).startswith(f"--eval_dataset '{path}'") and message in str(error.value), error.value


def test_generate_fits_learned_positions_and_refuses_what_it_cannot_do(tmp_path, capsys):
    """A GPT-2 of 256 positions asked for 400 new tokens (was an IndexError), greedy decoding asked for 3 samples
    (transformers' ValueError), --chat on a tokenizer without a chat template, an empty raw prompt (a reshape error)."""
    from transformers import AutoTokenizer

    from tiny_models import save_tiny_gpt2_without_pad

    model = save_tiny_gpt2_without_pad(tmp_path / "gpt2")
    assert hfgen(["generate", str(model), "--prompt", "the cat", "--max_new_tokens", "400", "--no-chat"]) == 0
    assert "max_new_tokens 400 lowered to" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = None
    (model / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(model)
    for arguments, message in (
        (["--num_samples", "3", "--temperature", "0"], "--temperature 0 decodes greedily"),
        (["--chat"], "has no chat template"),
        (["--prompt", "", "--no-chat"], "is empty"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            hfgen(["generate", str(model), "--prompt", "the cat", *arguments])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in error and "Traceback" not in error, arguments


def test_generate_and_eval_say_what_a_dir_without_a_model_is(tmp_path, capsys):
    # were "could not load a tokenizer ... You need to have sentencepiece" or "Repo id must be in the form"
    pipeline, killed, checkpoint = tmp_path / "rlhf", tmp_path / "killed", tmp_path / "run" / "checkpoint-2"
    tracking.write_run_records(pipeline, "stage: rlhf\n")
    tracking.write_json(pipeline / "eval.json", {"output_dir/sft": "s", "output_dir/ppo": str(tmp_path / "ppo")})
    tracking.write_run_records(killed, "stage: sft\n")
    (killed / "checkpoint-3").mkdir()
    checkpoint.mkdir(parents=True)
    (checkpoint / "hfgen_state.json").write_text("{}")
    # a Trainer's save under ZeRO-3 without zero3_save_16bit_model: config.json and DeepSpeed's shards, no weights
    # (a run, and its checkpoint); "no file named model.safetensors" said nothing of ZeRO-3 (probe 42 B1)
    zero3 = tmp_path / "zero3"
    tracking.write_run_records(zero3, "stage: pretrain\n")
    tracking.mark_complete(zero3)
    for shards in (zero3, zero3 / "checkpoint-2"):
        (shards / "global_step2").mkdir(parents=True)
        (shards / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (zero3 / "checkpoint-2" / "hfgen_state.json").write_text("{}")
    # an adapter whose base is gone (a checkpoint rotated away, a run moved): transformers took the missing path for
    # a hub id, "Repo id must be in the form ...", and hfgen check passed it (probe 42 B6)
    orphan, gone = tmp_path / "orphan", tmp_path / "base" / "checkpoint-2"
    orphan.mkdir()
    (orphan / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(gone)}))
    orphaned = f"the adapter's base_model_name_or_path '{gone}' does not exist (from {orphan / 'adapter_config.json'})"
    cases = [(pipeline, f"its final policy is '{tmp_path / 'ppo'}'"), (killed, "newest checkpoint is"),
             (checkpoint, "is a training checkpoint"), (tmp_path / "none" / "x", "does not exist"),
             (zero3, f"{zero3 / 'zero_to_fp32.py'} {zero3} OUTPUT_DIR"),
             (zero3 / "checkpoint-2", "holds DeepSpeed ZeRO-3 shards (global_step*/) and no model weights"),
             (orphan, orphaned)]  # fmt: skip
    for target, message in cases:
        commands = [["generate", str(target), "--prompt", "hi"]]
        commands += [["eval", str(target), "--quiet"]] if target != pipeline else []  # eval follows a pipeline dir
        for command in commands:
            with pytest.raises(SystemExit) as exit_info:
                hfgen(command)
            error = capsys.readouterr().err
            assert exit_info.value.code == 2 and message in error and "Traceback" not in error, (command, error)
    for model, message in ((zero3, "zero_to_fp32.py"), (orphan, orphaned)):
        result = run_hfgen_here("check", REPO / "recipes/tiny/sft_full.yaml", "--model_name_or_path", model)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


def test_perplexity_texts_rendered_with_a_template_that_writes_the_bos_are_scored_with_one(tmp_path, capsys):
    # text rendered with a Llama 3 template starts with <|begin_of_text|>, which the tokenizer adds again: the
    # perplexity was of '<BOS><BOS>...', a sequence the model never reads (probe 41 A1)
    from hfgen.evaluation.command import perplexity_texts
    from tiny_models import bos_adding_tokenizer, rendered_with_bos

    tokenizer = bos_adding_tokenizer()
    turns = [{"role": "user", "content": "describe the cat."}, {"role": "assistant", "content": "the cat is red."}]
    data = tmp_path / "rendered.jsonl"
    data.write_text(json.dumps({"text": rendered_with_bos(tokenizer, turns)}) + "\n")
    _, texts, prefixes, special_tokens = perplexity_texts(str(data), "embedded:prompts", tokenizer, False, 1)
    (ids,) = tokenizer(texts, add_special_tokens=special_tokens)["input_ids"]  # as evaluate_text_model scores them
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert (
        "1 of 1 rows of the text column (row 0 first) already start with the tokenizer's BOS" in capsys.readouterr().out
    )


def test_the_perplexity_of_prompt_completion_rows_scores_the_tokens_sft_trains(tmp_path):
    # plain prompt/completion rows were scored without the BOS a Llama 3 tokenizer puts in front of every text (SFT
    # trains them with it), without the EOS SFT appends, and with the answer's first token dropped when it merges with
    # the prompt's trailing space ("Answer: " + "the": ' the'): another perplexity than the SFT run's held-out loss of
    # the same rows (probe 41 A4)
    import math

    from hfgen.evaluation import text
    from hfgen.evaluation.command import perplexity_texts
    from hfgen.models import load_causal_lm, load_tokenizer
    from hfgen.stages.sft import response_loss, tokenize_response
    from tiny_models import save_tiny_llama_adding_bos

    base = save_tiny_llama_adding_bos(tmp_path / "base")
    tokenizer, model = load_tokenizer(str(base)), load_causal_lm(str(base))
    rows = [{"prompt": f"Question: describe the {thing}. Answer: ", "completion": f"the {thing} is happy."}
            for thing in ("cat", "dog")]  # fmt: skip
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    _, texts, prefixes, special_tokens = perplexity_texts(str(data), "embedded:prompts", tokenizer, False, 2)
    measured = text.perplexity(model, tokenizer, texts, prefixes, add_special_tokens=special_tokens)
    examples = [tokenize_response(tokenizer, row["prompt"], row["completion"], None) for row in rows]
    assert examples[0][0][0] == tokenizer.bos_token_id and examples[0][0][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(examples[0][0][examples[0][1]]).startswith(" the")  # the answer's first word is scored
    sft_loss = response_loss(model, examples, tokenizer.pad_token_id, batch_size=8)
    assert measured == pytest.approx(math.exp(sft_loss), rel=1e-4)
    # text rows end with the EOS sft and pretrain put after each text (review 41 F3)
    (tmp_path / "texts.jsonl").write_text(
        "".join(json.dumps({"text": r["prompt"] + r["completion"]}) + "\n" for r in rows)
    )
    _, texts, _, _ = perplexity_texts(str(tmp_path / "texts.jsonl"), "embedded:prompts", tokenizer, False, 2)
    assert texts == [r["prompt"] + r["completion"] + tokenizer.eos_token for r in rows]
