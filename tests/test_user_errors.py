"""Malformed recipes, data, numbers and paths: each exits 2 with one paragraph naming the recipe key, value, file or
row, and no traceback; a bug in loading keeps its traceback; a diverging run stops with exit 3."""

import json
import math
import os

import pytest
import torch
import yaml

from conftest import ASCII_LOCALE, HFGEN, REPO, run_hfgen, run_hfgen_here
from hfgen import tracking
from hfgen.cli import main as hfgen_main
from hfgen.errors import Diverged, UserError
from hfgen.guard import Divergence, configure
from hfgen.recipe import load_recipe
from test_recipe_errors import run_inprocess

PRETRAIN = REPO / "recipes/tiny/pretrain.yaml"
SFT_LORA = REPO / "recipes/tiny/sft_lora.yaml"
REWARD = REPO / "recipes/tiny/reward.yaml"
T2I = REPO / "recipes/tiny/t2i_digits.yaml"
PPO = REPO / "recipes/tiny/ppo.yaml"
DPO = REPO / "recipes/tiny/dpo.yaml"
KTO = REPO / "recipes/tiny/kto.yaml"
GRPO = REPO / "recipes/tiny/grpo_arithmetic.yaml"
GSM8K = "hfgen.data.arithmetic:gsm8k_exact_answer"  # needs the data's `answer` column by name


def recipe_with(tmp_path, **changes):
    values = {**yaml.safe_load(PRETRAIN.read_text()), **changes}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def data_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def custom_code_model(tmp_path):
    """A model dir whose config maps a model type transformers does not know to its own code (never run here)."""
    (tmp_path / "custom").mkdir()
    data_file(tmp_path / "custom", "config.json", json.dumps({"model_type": "custom_lm", "auto_map": {
        "AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomLM"}}))  # fmt: skip
    return tmp_path / "custom"


def gpt2_config_only(tmp_path):
    """A GPT-2 model dir with its config and no weights: what the recipe checks read before anything loads."""
    (tmp_path / "gpt2").mkdir()
    data_file(
        tmp_path / "gpt2", "config.json", json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2})
    )
    return tmp_path / "gpt2"


def not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# recette pr\u00e9par\u00e9e\nstage: pretrain\n".encode("latin-1"))
    return path


@pytest.mark.parametrize(
    "make_argv, expected",
    [
        (lambda t: [not_utf8(t)], ["latin1.yaml", "not UTF-8"]),
        (lambda t: [t], ["is a directory"]),
        (lambda t: [recipe_with(t, stage=["pretrain", "sft"])], ["'stage'", "list"]),
        (lambda t: [recipe_with(t, stage={"name": "pretrain"})], ["'stage'", "dict"]),
        (lambda t: [recipe_with(t, stage=3)], ["'stage'", "int"]),
        (lambda t: [PRETRAIN, "--max_steps", "-5", "--num_train_epochs", "0"], ["max_steps", "-5"]),
        (lambda t: [PRETRAIN, "--max_steps", "0", "--num_train_epochs", "0"], ["max_steps", "1 or more", "got 0"]),
        (lambda t: [SFT_LORA, "--lora_r", "0"], ["'lora_r'", "got 0"]),
        (lambda t: [PRETRAIN, "--per_device_train_batch_size", "0"], ["per_device_train_batch_size"]),
        (lambda t: [REWARD, "--per_device_train_batch_size", "-2"], ["per_device_train_batch_size", "-2"]),
        (lambda t: [T2I, "--train_batch_size", "0"], ["train_batch_size"]),
        (lambda t: [PPO, "--total_episodes", "0"], ["total_episodes"]),
        (lambda t: [PRETRAIN, "--learning_rate", "-0.001"], ["learning_rate", "-0.001"]),
        (lambda t: [PRETRAIN, "--gradient_accumulation_steps", "0"], ["gradient_accumulation_steps"]),
        (lambda t: [PRETRAIN, "--nan_tolerance", "-1"], ["nan_tolerance"]),
        (lambda t: [PRETRAIN, "--learning_rate"], ["'learning_rate' was given no value"]),
        (lambda t: [PRETRAIN, "--seed", "-1"], ["'seed'", "-1"]),
        # past numpy's seeds: transformers' and accelerate's set_seed raised once the run had started
        (lambda t: [PRETRAIN, "--seed", 2**32], ["key 'seed' must be between 0 and 4294967295, got 4294967296"]),
        (lambda t: [PRETRAIN, "--data_seed", 2**40], ["key 'data_seed' must be between 0 and 4294967295"]),
        (lambda t: [T2I, "--seed", 2**40], ["key 'seed' must be between 0 and 4294967295, got 1099511627776"]),
        (lambda t: [PPO, "--temperature", "0"], ["'temperature'", "above 0"]),
        (lambda t: [SFT_LORA, "--lora_dropout", "1.5"], ["'lora_dropout'", "between 0 and 1"]),
        (lambda t: [T2I, "--resolution", "0"], ["'resolution'"]),
        (lambda t: [PRETRAIN, "--dataset_name", data_file(t, "one.jsonl", '{"text": "the cat."}\n')],
         ["1 row(s)", "validation_split_percentage"]),
        (lambda t: [PRETRAIN, "--dataset_name", data_file(t, "empty.jsonl", "")], ["empty.jsonl"]),
        (lambda t: [PRETRAIN, "--dataset_name", data_file(t, "empty.csv", "")], ["empty.csv"]),
        (lambda t: [PRETRAIN, "--dataset_name", data_file(t, "flags.jsonl", '{"text": true}\n{"text": false}\n' * 20)],
         ["column 'text' holds true/false"]),
        (lambda t: [PRETRAIN, "--learning_rate", "inf"], ["'learning_rate'", "finite", "inf"]),
        (lambda t: [PPO, "--kl_coef", "nan"], ["'kl_coef'", "finite", "nan"]),
        (lambda t: [PRETRAIN, "--config_name", data_file(t, "unknown.json", '{"model_type": "llamma"}')],
         ["config_name", "unknown.json", "'llamma'", "model_type"]),
        (lambda t: [PRETRAIN, "--config_name", data_file(t, "untyped.json", '{"hidden_size": 8}')],
         ["config_name", "untyped.json", "model_type None"]),
        (lambda t: [PRETRAIN, "--config_name", data_file(t, "list.json", "[1, 2]")], ["list.json", "JSON object"]),
        (lambda t: [PRETRAIN, "--report_to", "wandbb"], ["'report_to'", "'wandbb' is not a tracker", "'wandb'"]),
        (lambda t: [PPO, "--report_to", "mlfow"], ["'report_to'", "'mlfow' is not a tracker"]),
        (lambda t: [SFT_LORA, "--max_length", "0"], ["'max_length'", "at least 1"]),
        (lambda t: [DPO, "--beta", "-1"], ["'beta'", "at least 0"]),
        (lambda t: [PPO, "--reward_functions", GSM8K], [GSM8K, "['answer']", "grpo and rloo pass"]),
        (lambda t: [DPO, "--oracle_function", GSM8K], ["oracle_function", GSM8K, "['answer']"]),
        (lambda t: [GRPO, "--reward_functions", GSM8K, "--reward_weights", "1.0", "--dataset_name",
                    data_file(t, "prompts.txt", "".join(f"{i}+1=?\n" for i in range(20)))],
         [GSM8K, "['answer']", "none besides the prompt"]),
        (lambda t: [DPO, "--dataset_name", data_file(t, "kto.jsonl", "".join(
            json.dumps({"prompt": f"p{i}", "completion": f"c{i}", "label": True}) + "\n" for i in range(20)))],
         ["kto.jsonl", "unpaired rows", "kto stage"]),
        (lambda t: [DPO, "--eval_prompts_dataset", t / "missing.jsonl"], ["eval_prompts_dataset", "missing.jsonl"]),
        (lambda t: [DPO, "--eval_prompts_dataset", data_file(t, "qa.jsonl", '{"question": "q", "answer": "a"}\n' * 4)],
         ["eval_prompts_dataset", "qa.jsonl", "match no prompt layout"]),
        # every prompt empty or blank: a raw "ValueError: Column 'prompt' doesn't exist."
        (lambda t: [KTO, "--eval_prompts_dataset", data_file(t, "blank.jsonl", '{"prompt": ""}\n{"prompt": "  "}\n')],
         ["eval_prompts_dataset '", "blank.jsonl' holds no non-empty prompt", "2 row(s)", "(2 empty rows)"]),
        (lambda t: [SFT_LORA, "--model_name_or_path", custom_code_model(t)],
         ["model_name_or_path", "'custom_lm'", "modeling_custom.CustomLM", "trust_remote_code: true"]),
        (lambda t: [PPO, "--reward_model_path", custom_code_model(t)], ["reward_model_path", "trust_remote_code: true"]),
        (lambda t: [SFT_LORA, "--model_name_or_path", gpt2_config_only(t), "--lora_target_modules", "[q_proj, v_proj]"],
         ["lora_target_modules", "(gpt2) has no module named q_proj, v_proj", "c_attn, c_fc, c_proj"]),
        (lambda t: [SFT_LORA, "--model_name_or_path", gpt2_config_only(t), "--lora_target_modules", ".*(c_attn"],
         ["lora_target_modules '.*(c_attn'", "not one (missing )", "c_attn, c_fc, c_proj"]),
        # peft's task type: a name it lacks failed inside peft, another stage's trained an adapter no loader takes
        (lambda t: [SFT_LORA, "--model_name_or_path", gpt2_config_only(t), "--lora_task_type", "FOO"],
         ["lora_task_type 'FOO'", "set lora_task_type: CAUSAL_LM"]),
        (lambda t: [SFT_LORA, "--model_name_or_path", gpt2_config_only(t), "--lora_task_type", "SEQ_CLS"],
         ["lora_task_type 'SEQ_CLS'", "task type CAUSAL_LM"]),
        (lambda t: [DPO, "--model_name_or_path", gpt2_config_only(t), "--use_peft", "true", "--lora_task_type",
                    "SEQ_CLS"], ["lora_task_type 'SEQ_CLS'", "task type CAUSAL_LM"]),
        (lambda t: [REWARD, "--use_peft", "true", "--lora_task_type", "FOO"], ["lora_task_type 'FOO'", "SEQ_CLS"]),
        # learning-rate schedules transformers could not build: a TypeError/ValueError once the model had loaded
        (lambda t: [PRETRAIN, "--lr_scheduler_type", "cosine_with_restarts", "--lr_scheduler_kwargs", "{num_cycle: 3}"],
         ["lr_scheduler_type cosine_with_restarts", "'num_cycle'", "its arguments are num_cycles"]),
        (lambda t: [PRETRAIN, "--lr_scheduler_type", "warmup_stable_decay"], ["'num_decay_steps'", "lr_scheduler_kwargs"]),
        # not a mapping at all: `**kwargs` was a TypeError once the data had loaded
        (lambda t: [PRETRAIN, "--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", "min_lr=1e-3"],
         ["key 'lr_scheduler_kwargs' takes a mapping", "str 'min_lr=1e-3'", '--lr_scheduler_kwargs "{name: value}"']),
        (lambda t: [PRETRAIN, "--lr_scheduler_kwargs", "5"], ["key 'lr_scheduler_kwargs' takes a mapping", "int 5"]),
        (lambda t: [PRETRAIN, "--lr_scheduler_type", "cosine_with_min_lr"], ["min_lr or min_lr_rate"]),
        (lambda t: [PRETRAIN, "--lr_scheduler_type", "polynomial", "--learning_rate", "1e-8"],
         ["lr_end 1e-07", "lr_scheduler_kwargs"]),
        (lambda t: [T2I, "--lr_scheduler", "polynomial", "--learning_rate", "1e-8"],
         ["lr_scheduler polynomial", "raise learning_rate"]),
        # values the schedule's function refuses as it runs (probe 41 B11): a traceback once the model had loaded
        (lambda t: [PRETRAIN, "--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs",
                    "{min_lr: 1e-5, min_lr_rate: 0.1}"],
         ["lr_scheduler_type cosine_with_min_lr cannot be built", "Only one of min_lr or min_lr_rate"]),
        (lambda t: [PRETRAIN, "--lr_scheduler_type", "warmup_stable_decay", "--lr_scheduler_kwargs",
                    "{num_decay_steps: 2, decay_type: cubic}"], ["'decay_type': 'cubic'", "Unknown decay type: cubic"]),
        (lambda t: [PRETRAIN, "--lr_scheduler_type", "reduce_lr_on_plateau", "--eval_strategy", "steps",
                    "--eval_steps", "1", "--lr_scheduler_kwargs", "{patiance: 2}"],
         ["lr_scheduler_type reduce_lr_on_plateau", "unexpected keyword argument 'patiance'"]),
    ],
    ids=[
        "recipe-not-utf8", "recipe-is-a-directory", "stage-list", "stage-dict", "stage-number", "negative-max-steps",
        "zero-steps-zero-epochs", "lora-r-zero", "batch-zero", "reward-batch-negative", "t2i-batch-zero",
        "ppo-no-episodes", "negative-learning-rate", "accumulation-zero", "negative-nan-tolerance",
        "override-without-value", "negative-seed", "seed-past-numpy", "data-seed-past-numpy",
        "loop-seed-past-numpy", "zero-temperature", "dropout-above-1", "zero-resolution",
        "one-row-dataset", "empty-jsonl", "empty-csv", "true-false-text-column", "infinite-learning-rate", "nan-kl-coef",
        "config-unknown-model-type", "config-without-model-type", "config-not-an-object", "unknown-tracker",
        "ppo-unknown-tracker", "zero-max-length", "negative-dpo-beta", "ppo-reward-needing-a-column",
        "dpo-oracle-needing-a-column", "grpo-reward-needing-a-missing-column", "dpo-on-unpaired-rows",
        "dpo-eval-prompts-missing", "dpo-eval-prompts-without-prompts", "kto-eval-prompts-all-blank", "sft-custom-code", "ppo-custom-code-reward",
        "sft-lora-targets-of-another-family", "sft-lora-targets-bad-regex", "sft-lora-task-type-unknown",
        "sft-lora-task-type-of-a-classifier", "dpo-lora-task-type-of-a-classifier", "reward-lora-task-type-unknown", "schedule-kwargs-misspelt", "wsd-without-decay-steps", "schedule-kwargs-as-k-equals-v", "schedule-kwargs-a-number",
        "min-lr-schedule-without-floor", "polynomial-below-its-end", "loop-polynomial-below-its-end",
        "min-lr-schedule-with-both-floors", "wsd-unknown-decay-type", "plateau-kwargs-misspelt",
    ],
)  # fmt: skip
def test_bad_input_exits_2_naming_the_problem(tmp_path, capsys, make_argv, expected):
    code, err = run_inprocess(capsys, *make_argv(tmp_path), "--output_dir", tmp_path / "out")
    assert code == 2, err
    for fragment in expected:
        assert fragment in err, err
    assert "hfgen: error:" in err and "`r`" not in err


def test_numbers_that_are_not_finite_exit_2_at_the_check_naming_each_key(tmp_path):
    # nan and inf passed every key outside the range-checked ones: a NaN loss at the first step
    # (label_smoothing_factor, a loss weight), black or silently unguided validation images (guidance_scale)
    flow = yaml.safe_load((REPO / "recipes/tiny/t2i_flow_digits_dreambooth.yaml").read_text())
    recipe = tmp_path / "flow.yaml"
    recipe.write_text(yaml.safe_dump({**flow, "guidance_scale": math.inf, "logit_std": -math.inf}))  # YAML's (-).inf
    cases = [
        ([recipe, "--training_guidance_scale", "nan", "--prior_loss_weight", "nan"],
         {"guidance_scale": "inf", "training_guidance_scale": "nan", "logit_std": "-inf", "prior_loss_weight": "nan"}),
        ([T2I, "--guidance_scale", "nan", "--snr_gamma", "inf"], {"guidance_scale": "nan", "snr_gamma": "inf"}),
        ([PRETRAIN, "--label_smoothing_factor", "nan"], {"label_smoothing_factor": "nan"}),
        ([DPO, "--loss_weights", "1.0", "inf"], {"loss_weights": "[1.0, inf]"}),
    ]  # fmt: skip
    for argv, refused in cases:
        result = run_hfgen_here("check", *argv, "--output_dir", tmp_path / "out")
        assert result.returncode == 2, result.stderr
        for key, value in refused.items():
            assert f"key '{key}' must be a finite number, got {value}" in result.stderr, result.stderr
    # the one key whose inf means something: wait for the vLLM server forever (nan is refused there too)
    assert load_recipe(GRPO, ["--vllm_server_timeout", "inf"], check_inputs=False).configs
    with pytest.raises(UserError, match="key 'vllm_server_timeout' must be a finite number, got nan"):
        load_recipe(GRPO, ["--vllm_server_timeout", "nan"], check_inputs=False)


def test_a_negative_number_argparse_would_take_for_an_option_is_read_as_the_keys_value(tmp_path):
    # logit_mean: -1.0e-5 (passed as '-1e-05') and -.inf: "argument --logit_mean: expected one argument", exit 2
    flow = yaml.safe_load((REPO / "recipes/tiny/t2i_flow_digits.yaml").read_text())
    recipe = tmp_path / "flow.yaml"
    recipe.write_text(yaml.safe_dump({**flow, "logit_mean": -1.0e-5}))
    assert load_recipe(recipe, check_inputs=False).configs[-1].logit_mean == -1.0e-5
    assert load_recipe(recipe, ["--logit_mean", "-1e-05"], check_inputs=False).configs[-1].logit_mean == -1.0e-5


def test_broken_json_lines_exit_2_in_the_real_cli(tmp_path):
    # (in-process, `datasets` logs this error through a handler pytest has closed, which prints a traceback)
    broken = data_file(tmp_path, "bad.jsonl", '{"text": "a"}\n{"text": \n')
    result = run_hfgen("train", PRETRAIN, "--dataset_name", broken, "--output_dir", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bad.jsonl" in result.stderr and "JSON parse error" in result.stderr


def test_output_dir_that_is_a_file_or_cannot_be_created_exits_2(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    code, err = run_inprocess(capsys, PRETRAIN, "--output_dir", taken)
    assert code == 2 and "is a file" in err and str(taken) in err
    code, err = run_inprocess(capsys, PRETRAIN, "--output_dir", taken / "run")
    assert code == 2 and "output_dir" in err and "cannot be created" in err
    assert taken.read_text() == "not a directory"


@pytest.mark.parametrize("output_dir", [None, "", "  "])
def test_a_recipe_without_output_dir_exits_2_instead_of_writing_to_trainer_output(
    tmp_path, capsys, monkeypatch, output_dir
):
    monkeypatch.chdir(tmp_path)  # transformers' default output_dir is ./trainer_output: nothing may land here
    recipe = recipe_with(tmp_path, output_dir=output_dir)
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["train", str(recipe), *(["--output_dir", output_dir] if output_dir is not None else [])])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no output_dir" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_a_tracker_that_is_not_installed_exits_2(capsys):
    from transformers.integrations import get_available_reporting_integrations

    missing = next(
        n for n in ("wandb", "comet_ml", "mlflow", "clearml") if n not in get_available_reporting_integrations()
    )
    code, err = run_inprocess(capsys, PRETRAIN, "--report_to", missing, "--output_dir", "/nonexistent/out")
    assert code == 2 and f"tracker '{missing}' is not installed" in err and "report_to: none" in err


def test_a_complete_run_of_another_recipe_is_kept_unless_overwrite_output_dir(tmp_path):
    first = yaml.safe_dump({"stage": "pretrain", "learning_rate": 0.001})
    tracking.write_run_records(tmp_path, first)
    tracking.mark_complete(tmp_path)
    tracking.check_output_dir(tmp_path, first)  # the same recipe again: repeated, as before
    resumed = yaml.safe_dump({"stage": "pretrain", "learning_rate": 0.001, "resume_from_checkpoint": True})
    tracking.check_output_dir(tmp_path, resumed)  # and continued
    other = yaml.safe_dump({"stage": "pretrain", "learning_rate": 0.01})
    with pytest.raises(UserError, match="learning_rate.*overwrite_output_dir"):
        tracking.check_output_dir(tmp_path, other)
    tracking.check_output_dir(tmp_path, other, overwrite=True)
    # the same dir spelled another way is the same recipe (was refused: "differing keys: output_dir")
    tracking.write_run_records(tmp_path, yaml.safe_dump({"stage": "pretrain", "output_dir": str(tmp_path)}), True)
    tracking.mark_complete(tmp_path)
    spelled = yaml.safe_dump({"stage": "pretrain", "output_dir": os.path.relpath(tmp_path / ".." / tmp_path.name)})
    tracking.check_output_dir(tmp_path, spelled)
    assert tracking.holds_recipe(tmp_path, spelled)
    (tmp_path / tracking.COMPLETE_MARKER).unlink()
    tracking.check_output_dir(tmp_path, other)  # an unfinished run is no one's output yet


def test_a_complete_run_copied_to_another_dir_is_the_same_recipe_there(tmp_path):
    # `cp -r out/sft out/sft_copy`, then a rerun or resume into the copy: "holds a complete run of a different recipe
    # (differing keys: output_dir) ... or set overwrite_output_dir: true" (probe 38 A7), advice that deletes the copy
    import shutil

    original, copy = tmp_path / "sft", tmp_path / "sft_copy"
    tracking.write_run_records(original, yaml.safe_dump({"stage": "pretrain", "output_dir": str(original)}))
    tracking.mark_complete(original)
    tracking.unlock_output_dir(original)
    shutil.copytree(original, copy)
    into_copy = {"stage": "pretrain", "output_dir": str(copy)}
    tracking.check_output_dir(copy, yaml.safe_dump({**into_copy, "resume_from_checkpoint": True}))
    assert tracking.holds_recipe(copy, yaml.safe_dump(into_copy))  # a pipeline's step moved there is skipped
    with pytest.raises(UserError, match=r"differing keys: learning_rate\)"):  # another recipe still is one
        tracking.check_output_dir(copy, yaml.safe_dump({**into_copy, "learning_rate": 0.1}))


def test_a_fresh_start_over_a_run_clears_what_it_wrote_but_not_a_dir_that_held_no_run_nor_runs_inside(tmp_path):
    recipe = yaml.safe_dump({"stage": "pretrain", "learning_rate": 0.001})
    (tmp_path / "notes.txt").write_text("the user's, before any run")
    tracking.write_run_records(tmp_path, recipe)
    assert (tmp_path / "notes.txt").is_file()  # no run had written here
    # the first run's outputs, and a run dir of its own under it (a pipeline step kept there)
    # (and DreamBooth's class images in their default dir, which later runs reuse)
    for name in ("model.safetensors", "ema/model.safetensors", "samples.jsonl", "nested/recipe.yaml",
                 "sweep/point/recipe.yaml", "class_images/0000.png"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    tracking.mark_complete(tmp_path)
    tracking.write_run_records(tmp_path, recipe, overwrite=True)
    kept = [".hfgen.lock", "class_images", "env.json", "nested", "recipe.yaml", "sweep"]
    assert sorted(p.name for p in tmp_path.iterdir()) == kept
    (tmp_path / "model.safetensors").write_text("x")
    tracking.write_run_records(tmp_path, recipe, resuming=True)  # a resume keeps everything
    assert (tmp_path / "model.safetensors").is_file()


def test_a_users_recipe_or_another_tools_checkpoints_in_output_dir_are_refused_not_deleted(tmp_path):
    # a recipe.yaml of the user's own (`output_dir: .` beside it) took the dir for an earlier run: a fresh start
    # deleted every file and folder in it and replaced the recipe; another tool's checkpoint-N/ likewise
    recipe = yaml.safe_dump({"stage": "pretrain", "learning_rate": 0.001})
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src/code.py").write_text("x")
    (project / "recipe.yaml").write_text("# mine\n" + recipe)
    with pytest.raises(UserError, match="recipe.yaml that no hfgen run wrote"):
        tracking.write_run_records(project, recipe, overwrite=True)
    assert (project / "src/code.py").is_file() and (project / "recipe.yaml").read_text().startswith("# mine")
    other = tmp_path / "other"
    (other / "checkpoint-500").mkdir(parents=True)
    (other / "checkpoint-500/model.safetensors").write_text("w")
    (other / "notes.txt").write_text("important")
    with pytest.raises(UserError, match="checkpoint dirs that no hfgen run wrote .checkpoint-500"):
        tracking.write_run_records(other, recipe)
    assert (other / "checkpoint-500/model.safetensors").is_file() and (other / "notes.txt").is_file()
    # an hfgen run's dir is one from its first records on
    tracking.write_run_records(tmp_path / "run", recipe)
    assert tracking.is_run_dir(tmp_path / "run")


def test_an_output_dir_that_a_fresh_start_would_clear_the_runs_own_input_from_is_refused(tmp_path):
    # `--model_name_or_path BASE --output_dir BASE --overwrite_output_dir true` deleted the model before loading it
    base = gpt2_config_only(tmp_path)
    values = {"model_name_or_path": str(base), "output_dir": str(base), "overwrite_output_dir": True}
    with pytest.raises(UserError, match=f"key 'model_name_or_path' .'{base}'. is the run's output_dir or inside it"):
        load_recipe(recipe_with(tmp_path, **values))
    # a model inside the output_dir's own run folder (kept on a fresh start) is read as before
    (tmp_path / "out/base").mkdir(parents=True)
    (tmp_path / "out/base/recipe.yaml").write_text("stage: pretrain\n")
    assert not tracking.deleted_by_fresh_start(tmp_path / "out/base", tmp_path / "out")
    assert tracking.deleted_by_fresh_start(tmp_path / "out/data.jsonl", tmp_path / "out")


def test_an_output_dir_under_home_written_with_a_tilde_is_the_folder_whose_inputs_a_fresh_start_would_clear(
    tmp_path, monkeypatch, capsys
):
    # `output_dir: ~/...` is the folder under home (recipe_output_dir, as the stages write there), not a folder named
    # '~' in the working directory: a model or data file in it, which the fresh start deletes, is refused at the check
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    gpt2_config_only(home)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    recipe = recipe_with(tmp_path, model_name_or_path="~/gpt2", output_dir="~/gpt2", overwrite_output_dir=True)
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["check", str(recipe)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error
    assert "key 'model_name_or_path' ('~/gpt2') is the run's output_dir or inside it" in error
    (home / "out").mkdir()
    data_file(home / "out", "rows.jsonl", '{"text": "the cat."}\n')
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["check", str(recipe), "--output_dir", "~/out", "--dataset_name", "~/out/rows.jsonl"])
    assert "key 'dataset_name' ('~/out/rows.jsonl') is the run's output_dir" in capsys.readouterr().err
    assert not (work / "~").exists()


def test_a_bug_while_loading_data_keeps_its_traceback(tmp_path, monkeypatch):
    import datasets

    from hfgen.data.loading import load_raw

    def broken(*args, **kwargs):
        raise AttributeError("a bug, not bad data")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(AttributeError):  # not turned into a UserError (exit 2, no traceback)
        load_raw(str(data_file(tmp_path, "rows.jsonl", '{"text": "the cat."}\n')))


def test_divergence_guard_skips_within_tolerance_then_stops():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    configure(nan_tolerance=1)  # a run's start: no step skipped yet
    guard = Divergence(output_dir="/nonexistent")
    (weight * 2).sum().backward()
    assert guard.check_step(1, torch.tensor(1.5), optimizer) and weight.grad is not None
    optimizer.step()
    optimizer.zero_grad()
    before = weight.detach().clone()
    (weight * math.nan).sum().backward()
    assert not guard.check_step(2, torch.tensor(math.nan), optimizer)  # skipped: the gradients are dropped
    optimizer.step()
    assert torch.equal(weight.detach(), before)
    (weight * math.nan).sum().backward()  # another optimizer step of step 2 (PPO's minibatches): the same step
    assert not guard.check_step(2, torch.tensor(math.nan), optimizer)
    (weight * math.inf).sum().backward()
    with pytest.raises(Diverged, match=r"step 3.*last finite loss 1.5 at step 1.*nan_tolerance"):
        guard.check_step(3, torch.tensor(1.0), optimizer)


@pytest.fixture
def fp16_scaled_accelerator():
    """A CPU Accelerator with fp16's GradScaler installed before `prepare`, as accelerate installs it on a GPU only
    (GPU behaviour simulated: the same torch GradScaler, on the CPU). The factory takes the scaler's initial scale."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def make(init_scale: float):
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(cpu=True)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        accelerator.native_amp, accelerator.state._mixed_precision = True, "fp16"
        return accelerator

    yield make
    AcceleratorState._reset_state(reset_partial_state=True)  # the singleton's fp16 would reach later tests
    GradientState._reset_state()
    configure()


def test_gradients_fp16s_loss_scaler_skips_are_left_to_it_not_counted_as_divergence(fp16_scaled_accelerator):
    """Gradients that overflow float16 at the scaler's first scale (2**16) are inf/nan once clipping unscales them;
    the scaler's step skips them and halves its scale until they fit, the start of every fp16 run. The guard counted
    each as divergence: exit 3 at step 1 with the default nan_tolerance 0 (probe 43 C3). A non-finite loss still
    counts, and so do overflowing gradients once the scale has fallen below 1."""
    from hfgen import loop

    configure(nan_tolerance=0)
    accelerator = fp16_scaled_accelerator(2.0**16)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    inputs, guard = torch.randn(32, 64), Divergence(output_dir="/nonexistent")

    def loss(factor=400.0):  # gradients of about 1: times 2**16, past float16's 65504
        with torch.autocast("cpu", dtype=torch.float16):
            return (model(inputs).float() ** 2).mean() * factor

    scales, updated = [], []
    for step in range(1, 7):
        before = model.weight.detach().clone()
        loop.backward_and_step(accelerator, model, optimizer, loss(), 1.0, step, guard)
        scales.append(accelerator.scaler.get_scale())
        updated.append(not torch.equal(before, model.weight))
    assert scales[:4] == [2.0**15, 2.0**14, 2.0**13, 2.0**13] and updated == [False] * 3 + [True] * 3
    with pytest.raises(Diverged, match="step 7: the loss is nan"):
        loop.backward_and_step(accelerator, model, optimizer, loss(math.nan), 1.0, 7, guard)

    accelerator = fp16_scaled_accelerator(0.5)  # a scale the scaler lowered step after step
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    with pytest.raises(Diverged, match="step 8: the gradient norm at float16 loss scale 0.5 is (inf|nan)"):
        loop.backward_and_step(accelerator, model, optimizer, loss(1e9), 1.0, 8, guard)


def test_a_step_skipped_within_nan_tolerance_under_fp16s_loss_scaler_without_clipping(fp16_scaled_accelerator):
    """With max_grad_norm 0 nothing unscaled the gradients the guard dropped, and the scaler's step then raised
    torch's AssertionError "No inf checks were recorded for this optimizer": the skip is now the scaler's too."""
    from hfgen import loop

    configure(nan_tolerance=1)
    accelerator = fp16_scaled_accelerator(2.0**8)
    model = torch.nn.Linear(8, 8)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    inputs, guard = torch.randn(4, 8), Divergence(output_dir="/nonexistent")
    weights = []
    for step, factor in enumerate((1.0, math.nan, 1.0), 1):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = (model(inputs).float() ** 2).mean() * factor
        loop.backward_and_step(accelerator, model, optimizer, loss, 0.0, step, guard)
        weights.append(model.weight.detach().clone())
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    assert all(w.isfinite().all() for w in weights)


class SquaredLoss(torch.nn.Module):
    """A model whose loss is non-finite exactly for the rows holding a NaN: a step the guard skips, on cue."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return {"loss": ((self.weight * x) ** 2).sum()}


def test_a_step_skipped_within_nan_tolerance_is_logged_as_null_not_as_a_perfect_loss(tmp_path):
    # transformers' logging_nan_inf_filter put the window's mean so far (0 right after a row) in place of the skipped
    # step's loss: the Trainer stages logged "loss": 0.0 where training broke and averaged it into train_loss. Then
    # NaN, which no JSON reader but Python's takes (JavaScript's JSON.parse refused metrics.jsonl and eval.json:
    # probe 45 B3): null, as a reward function's unscored response is
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    configure(nan_tolerance=2)
    rows = [{"x": [math.nan, 1.0] if i == 1 else [1.0, 2.0]} for i in range(4)]
    args = TrainingArguments(tmp_path, per_device_train_batch_size=1, max_steps=4, logging_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)  # fmt: skip
    callbacks = tracking.trainer_callbacks(tmp_path)
    trainer = Trainer(model=SquaredLoss(), args=args, train_dataset=Dataset.from_list(rows), callbacks=callbacks)
    tracking.trainer_resume(trainer, tmp_path)
    try:
        trainer.train()
        # eval.json's train_loss, as the Trainer stages record it
        tracking.update_eval(tmp_path, {"train_loss": tracking.run_train_loss(trainer, 1.0, None)})
    finally:
        configure()  # no skipped step left for the next test's run
    logged = [strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["loss"] for row in logged if "loss" in row}
    skipped = [step for step, loss in losses.items() if loss is None]
    assert len(skipped) == 1 and all(loss > 4 for step, loss in losses.items() if step not in skipped), losses
    assert logged[-1]["train_loss"] is None  # the run's mean is not known, not the finite steps' sum over 4
    assert strict_json((tmp_path / "eval.json").read_text())["train_loss"] is None


def strict_json(text: str):
    """JSON as JavaScript's JSON.parse reads it: NaN and Infinity are no JSON."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text!r} is not JSON"))


def test_a_sample_tables_score_that_is_not_finite_is_written_to_samples_jsonl_as_null(tmp_path, capsys):
    # PPO's sample table (records.write_samples, GRPO's appends the same way) wrote json.dumps' NaN and Infinity,
    # which JavaScript's JSON.parse refuses (probe 45 B3); the oracle's unscored response was null already
    from hfgen.rl.records import write_samples

    def oracle(prompts, responses):
        return [None if response == "b" else 2.0 for response in responses]

    scores = torch.tensor([math.nan, math.inf, -math.inf, 0.5])
    write_samples(tmp_path, 3, ["p1", "p2", "p3", "p4"], ["a", "b", "c", "d"], scores, oracle)
    rows = [strict_json(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [row["score"] for row in rows] == [None, None, None, 0.5]
    assert [row["oracle"] for row in rows] == [2.0, None, 2.0, 2.0] and {row["step"] for row in rows} == {3}
    assert "score +0.50, oracle +2.00" in capsys.readouterr().out


def test_a_checkpoints_state_keeps_a_nan_that_a_record_writes_as_null(tmp_path):
    # hfgen_state.json is read back by hfgen alone, to resume as the run was: a process's loss sum since the last
    # logged row, NaN after a skipped step, comes back NaN (as null it would be a sum that is not a number)
    state = {tracking.LOSS_WINDOW: {"since_step": 2, "sums": [math.nan, 1.5, math.inf]}}
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    tracking.finish_checkpoint(tmp_path, checkpoint, 3, None, state=state)
    tracking.forget_resumed_loss_windows()
    window = tracking.resumed_loss_window(checkpoint)
    assert math.isnan(window["sums"][0]) and window["sums"][1:] == [1.5, math.inf] and window["since_step"] == 2
    # the same state written as a record (eval.json, metrics.jsonl) is strict JSON: null there
    assert strict_json(tracking.json_text(state))[tracking.LOSS_WINDOW]["sums"] == [None, 1.5, None]


@pytest.mark.slow
def test_a_diverging_run_stops_with_exit_3_keeping_its_checkpoint(tmp_path):
    result = run_hfgen("train", PRETRAIN, "--output_dir", tmp_path, "--learning_rate", "1e4", "--max_steps", "40",
                       "--save_steps", "2", "--save_total_limit", "1", "--logging_steps", "1",
                       "--max_train_samples", "200", "--max_eval_samples", "20")  # fmt: skip
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "training stopped at step" in result.stderr
    assert "last finite loss" in result.stderr and "checkpoint-" in result.stderr
    assert not tracking.is_complete(tmp_path) and not (tmp_path / "model.safetensors").exists()
    assert tracking.complete_checkpoints(tmp_path)


class BadImageRows(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        raise UserError(f"dataset 'd' image '{index}.png' cannot be decoded: image file is truncated")


def test_a_user_error_in_a_dataloader_worker_prints_its_message_not_the_worker_traceback(capsys):
    """torch re-raises a worker's exception with "Caught UserError in DataLoader worker process 0. Original
    Traceback ..." as its message: a bad image met mid-training with dataloader_num_workers 2 printed 20 lines of
    traceback inside "hfgen: error:", where 0 workers print the one line."""
    from hfgen.errors import exit_on_user_error

    loader = torch.utils.data.DataLoader(BadImageRows(), batch_size=2, num_workers=1)
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        next(iter(loader))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == "hfgen: error: dataset 'd' image '0.png' cannot be decoded: image file is truncated\n", err


def test_a_glob_or_mixture_input_inside_output_dir_is_refused_as_a_path_is(tmp_path):
    from hfgen.recipe import inputs_in_output_dir

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("text\nx\n")
    inside = [{"dataset_name": str(tmp_path / "data" / "*.csv")},
              {"datasets": [{"name": str(tmp_path / "data" / "a.csv"), "weight": 1.0}]}]  # fmt: skip
    for values in inside:  # both passed: a rerun's fresh start then deleted data/
        assert "is the run's output_dir or inside it" in " ".join(inputs_in_output_dir(values, tmp_path)), values
    assert inputs_in_output_dir({"dataset_name": str(tmp_path / "data" / "*.csv")}, tmp_path / "out") == []


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_sharded_model_with_a_shard_missing_or_cut_short_exits_2_naming_it(tmp_path, damage):
    # an interrupted download or copy: the check passed, then train ended in a raw FileNotFoundError or safetensors'
    # "incomplete metadata" SafetensorError (exit 1), and hfgen generate in the latter (probe 41 E7)
    from transformers import AutoModelForCausalLM

    from hfgen.finetune import load_model
    from hfgen.recipe import load_recipe
    from tiny_models import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    (model_dir / "model.safetensors").unlink()
    model.save_pretrained(model_dir, max_shard_size="100KB")
    shards = sorted(model_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (model_dir / "model.safetensors").exists()
    if damage == "missing":
        shards[1].unlink()
    else:
        shards[1].write_bytes(shards[1].read_bytes()[:20000])
    recipe = tmp_path / "sft.yaml"
    values = yaml.safe_load((REPO / "recipes/tiny/sft_full.yaml").read_text())
    recipe.write_text(
        yaml.safe_dump(values | {"model_name_or_path": str(model_dir), "output_dir": str(tmp_path / "o")})
    )
    result = run_hfgen_here("check", recipe)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"model_name_or_path '{model_dir}'" in result.stderr and shards[1].name in result.stderr
    result = run_hfgen_here("generate", model_dir, "--prompt", "hi", "--max_new_tokens", "2")
    assert result.returncode == 2 and shards[1].name in result.stderr, result.stderr[-2000:]
    # past the check (a dir damaged after it), the stage's own loader names it too
    model_args, _, training_args = load_recipe(recipe, check_inputs=False).configs
    with pytest.raises(UserError, match=shards[1].name):
        load_model(model_args, training_args, None)


def test_a_cached_hub_snapshot_with_a_shard_missing_exits_2_at_the_check_naming_it(tmp_path, hub_cache):
    # an interrupted `hf download` of a sharded model: hfgen check passed (the local dir's check looked at local dirs
    # only), then train exited 2 after loading its data, pointing at the hub's web page (probe 43 A5)
    from transformers import AutoModelForCausalLM

    from tiny_models import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    (model_dir / "model.safetensors").unlink()
    model.save_pretrained(model_dir, max_shard_size="100KB")
    snapshot = hub_cache("tinyorg/missshard", model_dir, "e" * 40)
    shard = sorted(snapshot.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    result = run_hfgen_here("check", REPO / "recipes/tiny/sft_full.yaml", "--model_name_or_path", "tinyorg/missshard",
                            "--output_dir", tmp_path / "o")  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    said = f"model_name_or_path 'tinyorg/missshard': {shard.name}, named by model.safetensors.index.json, is missing"
    assert said in result.stderr and "hf download tinyorg/missshard" in result.stderr, result.stderr[-2000:]
    result = run_hfgen_here("generate", "tinyorg/missshard", "--prompt", "hi", "--max_new_tokens", "2")
    assert result.returncode == 2 and shard.name in result.stderr and "huggingface.co" not in result.stderr


def test_a_runs_weights_get_the_umasks_mode_as_its_other_outputs_do(tmp_path):
    # safetensors writes a tempfile (0600) and renames it: under umask 002 (a group-shared output dir) the run's
    # config, records and optimizer were group-readable but model.safetensors, final and in checkpoints, was not
    # (probe 42 C4)
    old = os.umask(0o002)
    try:
        run_hfgen_here("train", PRETRAIN, "--output_dir", tmp_path, "--max_steps", "2", "--save_steps", "1",
                       "--max_train_samples", "64", "--max_eval_samples", "8")  # fmt: skip
    finally:
        os.umask(old)
    weights = [tmp_path / "model.safetensors", *tmp_path.glob("checkpoint-*/model.safetensors")]
    assert tracking.is_complete(tmp_path) and len(weights) >= 2
    modes = {file.name: oct(file.stat().st_mode & 0o777) for file in [tmp_path / "config.json", *weights]}
    assert set(modes.values()) == {oct(0o664)}, modes


def test_non_ascii_command_line_text_under_an_ascii_locale_exits_2_naming_the_locale(tmp_path):
    # LC_ALL=C with Python's UTF-8 mode off gives a non-ASCII argument as lone surrogates: a prompt ended in
    # tokenizers' TypeError traceback, a data path in "surrogates not allowed" (probe 42 C7). Said first, naming the
    # text as the user typed it and the locale
    result = run_hfgen("generate", tmp_path / "model", "--prompt", "Décris le café 🐱", env=ASCII_LOCALE)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "non-ASCII text ('D\\xe9cris le caf\\xe9 \\U0001f431')" in result.stderr, result.stderr
    assert "LC_ALL=C.UTF-8" in result.stderr
    # a file name of bytes that are not UTF-8, under a UTF-8 locale, is a path the file system reads as given
    from hfgen.cli import unreadable_argument

    assert unreadable_argument(["--dataset_name", os.fsdecode(b"/data/caf\xe9.jsonl"), "Décris"]) is None


def test_a_command_run_from_a_deleted_working_directory_exits_2_naming_it(tmp_path):
    # a shell left in a folder another job removed: every command that loads torch died with MKL's "Cannot load
    # libtorch_cpu.so" (exit 2), which reads as a broken torch install, the folder unnamed (probe 42 C6)
    import subprocess

    gone = tmp_path / "gone"
    gone.mkdir()
    result = subprocess.run(
        ["bash", "-c", 'cd "$0" && rmdir "$0" && exec "$@"', gone, *HFGEN, "check", PRETRAIN],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"the working directory '{gone}' no longer exists" in result.stderr, result.stderr
    assert "oneMKL" not in result.stderr
