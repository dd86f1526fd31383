"""Every recipe under recipes/ parses: keys known to its stage, values of the right type (no model built, no
input checked); every accelerate preset loads with accelerate's own config loader. An upstream rename (TRL's
max_seq_length -> max_length, transformers' warmup_ratio -> warmup_steps) breaks this test, not a user's run."""

import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from hfgen.check import launch_mixed_precision
from hfgen.errors import UserError
from hfgen.recipe import build_recipe, known_keys, load_recipe, parse_overrides, read_recipe_file, training_precision

RECIPES = sorted(
    p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.relative_to(REPO / "recipes").parts
)
ACCELERATE_PRESETS = sorted((REPO / "recipes/accelerate").glob("*.yaml"))


def name(path: Path) -> str:
    return str(path.relative_to(REPO / "recipes"))


@pytest.mark.parametrize("path", RECIPES, ids=name)
def test_recipe_parses_with_known_keys_and_types(path):
    overrides = []
    stage = read_recipe_file(path).get("stage")
    if not torch.cuda.is_available() and "use_cpu" in known_keys(stage):
        overrides = ["--use_cpu", "true"]  # GPU recipes (bf16, ...) fail TrainingArguments' device checks on a CPU
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = load_recipe(path, overrides, check_inputs=False)
    assert recipe.stage == stage and recipe.output_dir
    # a key transformers or TRL has renamed warns at every run and stops parsing when the alias goes
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
    # launched with any preset, the recipe's precision stands: a preset asking for another is refused (sd-1.5's fp16
    # recipes under the bf16 presets were)
    if (precision := training_precision(recipe.configs)) is not None:
        for preset in ACCELERATE_PRESETS:
            assert launch_mixed_precision(str(preset)) in ("no", precision[0]), (name(preset), precision)
    assert path.read_text().startswith("#"), "a recipe opens with a comment giving the command that runs it"
    assert (
        "hfgen train" in path.read_text().split("stage:")[0]
        or "accelerate launch" in path.read_text().split("stage:")[0]
    )


def test_every_stage_recipe_family_is_covered():
    assert len(RECIPES) >= 6 and {"sft", "reward"} <= {read_recipe_file(p).get("stage") for p in RECIPES}


@pytest.mark.parametrize("path", ACCELERATE_PRESETS, ids=name)
def test_accelerate_preset_loads_with_accelerates_loader(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(path))  # raises on unknown keys
    assert isinstance(config, ClusterConfig) and config.num_processes >= 1
    assert path.read_text().startswith("#"), "a preset opens with a comment saying when to use it"


def test_a_list_override_reads_as_in_the_recipe_file_or_as_separate_values():
    dpo = REPO / "recipes/tiny/dpo.yaml"
    overrides = ["--use_cpu", "true", "--output_dir", "/nonexistent/out"]
    written = load_recipe(dpo, [*overrides, "--loss_type", "[sigmoid, sft]", "--loss_weights", "[1.0, 0.5]"], False)
    spaced = load_recipe(dpo, [*overrides, "--loss_type", "sigmoid", "sft", "--loss_weights", "1.0", "0.5"], False)
    for recipe in (written, spaced):
        args = recipe.configs[-1]  # DPOConfig, after the model and data arguments
        assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.5]
    grpo = REPO / "recipes/tiny/grpo_arithmetic.yaml"  # its file lists two reward functions
    emptied = load_recipe(grpo, [*overrides, "--reward_functions", "[]", "--reward_model_path", "x"], False)
    assert emptied.configs[1].reward_functions == []


def test_a_ratio_or_a_time_on_the_command_line_stays_the_text_typed():
    """YAML 1.1 reads `4:3` as the base-60 number 243: `--aspect_ratio_buckets 4:3 3:4` was refused with advice
    to quote that the shell strips, and `--validation_prompts 12:30` trained and rendered the prompt "750"."""
    overrides = ["--output_dir", "/nonexistent/out"]
    recipe = load_recipe(REPO / "recipes/tiny/t2i_digits.yaml", [*overrides, "--aspect_ratio_buckets", "4:3", "3:4",
                         "--validation_prompts", "12:30"], False)  # fmt: skip
    data_args, args = recipe.configs[1], recipe.configs[2]
    assert data_args.aspect_ratio_buckets == ["4:3", "3:4"] and args.validation_prompts == ["12:30"]


def test_a_text_keys_flow_list_on_the_command_line_reads_as_in_the_recipe_file():
    """Review 46 F5: `--validation_prompts '[12:30, 0x10, yes]'` trained on the prompts '750', '16', 'true' and
    `--aspect_ratio_buckets '[4:3, 3:4]'` read 243 and 184 (YAML 1.1), where the file and separate values keep the
    text; `'[a sks digit, null]'` was one prompt of the bracket text (F6): a null item is refused as in the file."""
    overrides = ["--output_dir", "/nonexistent/out", "--aspect_ratio_buckets", "[4:3, 3:4]"]
    prompts = ["--validation_prompts", "[12:30, 0x10, yes, '~', \"a: b\"]"]
    recipe = load_recipe(REPO / "recipes/tiny/t2i_digits.yaml", [*overrides, *prompts], False)
    assert recipe.value("validation_prompts") == ["12:30", "0x10", "yes", "~", "a: b"]
    assert recipe.value("aspect_ratio_buckets") == ["4:3", "3:4"]
    says = "the command line: key 'validation_prompts' item 2 is null (`null`); quote it (`\"null\"`)"
    with pytest.raises(UserError, match=re.escape(says)):
        parse_overrides(["--validation_prompts", "[a sks digit, null]"], "t2i")
    # a list inside the list (review 46b G2): its null or number read as YAML 1.1's, the prompt 'None' or '493'
    with pytest.raises(UserError, match=re.escape("key 'validation_prompts' item 2 is a list (`[~]`)")):
        parse_overrides(["--validation_prompts", "[a sks digit, [~]]"], "t2i")


def test_a_null_among_a_text_keys_command_line_values_is_refused_as_in_the_recipe_file():
    """Review 46 F6: `--validation_prompts "a sks digit" null` trained on the prompt 'None', and `""` on an empty
    one; the file refuses a null item. Quoted it is the text; `~` among several values stays the text it was."""
    t2i = REPO / "recipes/tiny/t2i_digits.yaml"
    for null, shown, quoted in (("null", "`null`", """`'"null"'`"""), ("", '`""`', """`'""'`""")):
        says = f"the command line: key 'validation_prompts' item 2 is null ({shown}); quote it ({quoted})"
        with pytest.raises(UserError, match=re.escape(says)):
            load_recipe(t2i, ["--output_dir", "/nonexistent/out", "--validation_prompts", "a sks digit", null], False)
    typed = parse_overrides(["--validation_prompts", "a sks digit", '"null"', "~"], "t2i")
    assert typed == {"validation_prompts": ["a sks digit", "null", "~"]}


def test_a_text_keys_unquoted_value_in_a_recipe_file_is_the_text_written(tmp_path):
    """YAML 1.1 made `run_name: 0755` '493', `instance_prompt: yes` 'true', `0x10` '16', `12:30` '750', and a `~`
    among validation_prompts the prompt 'None' (probe 45 I6); a number key keeps YAML's reading."""
    digits = "".join(
        line
        for line in (REPO / "recipes/tiny/t2i_digits.yaml").open()
        if not line.startswith(("validation_prompts:", "max_train_steps:"))
    )
    recipe = tmp_path / "t2i.yaml"
    recipe.write_text(
        digits + "\nvalidation_prompts: [yes, 12:30, 0x10, 2024-01-01, '~', 1_000]\nmax_train_steps: 0x10\n"
    )
    args = load_recipe(recipe, ["--output_dir", "/nonexistent/out"], False).configs[2]
    assert args.validation_prompts == ["yes", "12:30", "0x10", "2024-01-01", "~", "1_000"]
    assert args.max_train_steps == 16
    sft = tmp_path / "sft.yaml"
    sft.write_text((REPO / "recipes/tiny/sft_full.yaml").read_text() + "\nrun_name: 0755\nhub_model_id: off\n")
    assert read_recipe_file(sft)["run_name"] == "0755"
    assert load_recipe(sft, ["--output_dir", "/nonexistent/out"], False).value("hub_model_id") == "off"
    recipe.write_text(digits + "\nvalidation_prompts: [a sks digit, ~]\n")
    with pytest.raises(UserError, match=r"key 'validation_prompts' item 2 is null \(`~`\); quote it \(`\"~\"`\)"):
        read_recipe_file(recipe)


def test_yaml_boolean_words_keep_their_meaning_for_the_text_keys_that_take_a_boolean(tmp_path):
    """Review 46 F3/F4: with a text key's value read as written, `resume_from_checkpoint: no` was a checkpoint path
    ("'no' is not a directory") and `save_strategy: off`, `eval_strategy: No`, vae/t2i `mixed_precision: off` were
    refused, where YAML 1.1 had read them as the booleans that mean 'no'. yes/no/on/off in any case keep that meaning
    for resume_from_checkpoint and a choice key offering 'no', in the file and on the command line; other text keys
    keep the word."""
    from hfgen import tracking

    kept = "".join(
        line for line in (REPO / "recipes/tiny/sft_full.yaml").open() if not line.startswith(("eval_", "save_"))
    )
    sft = tmp_path / "sft.yaml"
    words = "resume_from_checkpoint: no\nsave_strategy: off\neval_strategy: No\nlogging_strategy: NO\nrun_name: off\n"
    sft.write_text(kept + words)
    recipe = load_recipe(sft, ["--output_dir", "/nonexistent/out"], False)
    assert read_recipe_file(sft)["resume_from_checkpoint"] is False
    assert not tracking.resume_requested(recipe.value("resume_from_checkpoint"))
    strategies = ("save_strategy", "eval_strategy", "logging_strategy")
    assert [recipe.value(key) for key in strategies] == ["no"] * 3 and recipe.value("run_name") == "off"
    typed = ["--resume_from_checkpoint", "On", "--save_strategy", "OFF", "--run_name", "yes"]
    assert parse_overrides(typed, "sft") == {"resume_from_checkpoint": True, "save_strategy": "no", "run_name": "yes"}
    # a choice key's word is the choice's text, as a run's recipe.yaml has always held it: read as false, the shipped
    # pretraining recipe's `eval_strategy: no` made every run of it before "a complete run of a different recipe"
    # (review 46b G1), and `--eval_strategy on` was refused as 'true', a value never typed
    assert read_recipe_file(REPO / "recipes/tiny/pretrain.yaml")["eval_strategy"] == "no"
    with pytest.raises(UserError, match="'yes' is not one of"):
        load_recipe(sft, ["--eval_strategy", "on", "--output_dir", "/nonexistent/out"], False)
    assert (
        load_recipe(sft, ["--save_strategy", "OFF", "--output_dir", "/nonexistent/out"], False).value("save_strategy")
        == "no"
    )
    digits = load_recipe(
        REPO / "recipes/tiny/t2i_digits.yaml", ["--mixed_precision", "off", "--output_dir", "/x"], False
    )
    assert digits.value("mixed_precision") == "no"


def test_a_text_key_inside_a_steps_overrides_or_under_the_command_lines_stage_is_the_text_written(tmp_path):
    """Review 46 F7: the rule that keeps `run_name: 0755` that text looked only at the top level of a recipe naming
    its own stage: rlhf's `sft_overrides: {run_name: 0755, dataset_text_field: no}` trained the SFT step as run
    '493' on the column 'false', and a file without `stage:` given `--stage sft` read 493. A column YAML reads as a
    boolean (`dataset_columns: {prompt: yes}`) is refused saying to quote it."""
    from hfgen.recipe import recipe_values
    from hfgen.stages import rlhf

    pipeline = tmp_path / "rlhf.yaml"
    steps = (REPO / "recipes/tiny/rlhf.yaml").read_text().replace("recipes/tiny/", f"{REPO}/recipes/tiny/")
    pipeline.write_text(steps + "sft_overrides: {run_name: 0755, dataset_text_field: no, save_strategy: off}\n")
    sft = rlhf.step_recipe(load_recipe(pipeline, [], False).configs[0], "sft", False)
    assert (sft.value("run_name"), sft.value("dataset_text_field"), sft.value("save_strategy")) == ("0755", "no", "no")
    typed = parse_overrides(["--sft_overrides", "{run_name: 0755}"], "rlhf")
    assert typed == {"sft_overrides": {"run_name": "0755"}}
    no_stage = tmp_path / "no_stage.yaml"
    no_stage.write_text("run_name: 0755\n")
    assert recipe_values(no_stage, ["--stage", "sft"]) == {"run_name": "0755", "stage": "sft"}
    says = "got {'prompt': True}; 'prompt' is bool True (YAML 1.1's reading of an unquoted word): quote the column"
    with pytest.raises(UserError, match=re.escape(says)):
        load_recipe(REPO / "recipes/tiny/sft_full.yaml", ["--dataset_columns", "{prompt: yes}"], False)


def test_on_and_off_read_as_booleans_on_the_command_line_as_in_the_recipe_file(tmp_path):
    """`use_peft: off` in the file was false, `--use_peft off` was refused: "invalid string_to_bool value 'off'"
    (probe 38 A7); `--save_strategy no` stays the choice's text."""
    # (without the recipe's LoRA keys, which a run without use_peft refuses: nothing would read them)
    lora = "".join(line for line in (REPO / "recipes/tiny/sft_lora.yaml").open() if not line.startswith("lora_"))
    sft, in_file = tmp_path / "on.yaml", tmp_path / "off.yaml"
    sft.write_text(lora)
    in_file.write_text(lora.replace("use_peft: true", "use_peft: off"))
    typed = load_recipe(sft, ["--use_peft", "off", "--packing", "On", "--save_strategy", "no"], False)
    assert typed.value("use_peft") is load_recipe(in_file, [], False).value("use_peft") is False
    assert typed.value("packing") is True and typed.value("save_strategy") == "no"
    assert typed.values["use_peft"] is False  # recipe.yaml records the boolean, as the file's would be


def test_mapping_and_mixture_overrides_read_as_in_the_recipe_file():
    """`--dataset_columns "{prompt: question}"`, `--datasets "[{name: a, weight: 0.7}, ...]"`: YAML as in the file."""
    overrides = ["--use_cpu", "true", "--output_dir", "/nonexistent/out", "--dataset_name", ""]
    mixture = "[{name: a.jsonl, weight: 0.7}, {name: b.csv, weight: 0.3, columns: {prompt: question}}]"
    for stage in ("dpo", "grpo_arithmetic", "sft_full"):  # a TRL preference stage, GRPO, a Trainer stage
        recipe = load_recipe(REPO / f"recipes/tiny/{stage}.yaml", [*overrides, "--datasets", mixture,
                             "--dataset_columns", "{prompt: question}"], False)  # fmt: skip
        data_args = recipe.configs[1]
        assert [(e.name, e.weight) for e in data_args.mixture] == [("a.jsonl", 0.7), ("b.csv", 0.3)], stage
        assert data_args.mixture[1].columns == {"prompt": "question"} and data_args.dataset_columns == {
            "prompt": "question"
        }


def test_train_help_lists_every_stage(capsys):
    from hfgen.cli import main as hfgen_main
    from hfgen.stages import STAGES

    with pytest.raises(SystemExit):
        hfgen_main(["train", "--help"])
    listed = [
        line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ") and line.split()
    ]
    assert set(STAGES) <= set(listed), set(STAGES) - set(listed)  # grpo, rloo and t2i_flow were missing


def test_a_command_line_value_is_read_by_its_keys_type_not_as_yaml_1_1_numbers():
    """YAML 1.1 reads `010` as octal 8, `0x1F` as 31 and `1e3` as text: `--output_dir 010` trained into ./8."""
    sft = REPO / "recipes/tiny/sft_lora.yaml"
    overrides = ["--use_cpu", "true", "--output_dir", "010", "--run_name", "1.50", "--dataset_text_field", "0x1F"]
    recipe = load_recipe(sft, [*overrides, "--seed", "017", "--max_steps", "1e1", "--learning_rate", "3e-3"], False)
    args = recipe.configs[-1]
    assert (args.output_dir, args.run_name, args.dataset_text_field) == ("010", "1.50", "0x1F")
    assert (args.seed, args.max_steps, args.learning_rate) == (17, 10, 0.003)
    assert load_recipe(sft, ["--output_dir", "8", "--max_steps", "5"], False).configs[-1].max_steps == 5


def test_a_text_value_on_the_command_line_is_the_text_typed():
    """Each value was read as YAML: `--output_dir 'out/run #2'` wrote to out/run, `'out/run: v2'` to a folder named
    '{"out/run": "v2"}', `--instance_prompt 'a sks #7 digit'` trained on "a sks", `&x` was null (probe 45 B1). A
    key typed text keeps what was typed, in recipe.yaml too; a typed key keeps YAML's reading, and refuses what is
    not one, naming it."""
    dreambooth = REPO / "recipes/tiny/t2i_digits_dreambooth.yaml"
    typed = {
        "output_dir": "out/run: v2 #2",
        "instance_prompt": "&sks a photo #7 of: digit",
        "class_data_dir": " classes ",
        "validation_prompts": ["a digit #3", "- b: c", "! seven", "~", "True", "3"],
    }
    tokens = [
        token for key, value in typed.items() for token in (f"--{key}", *([value] if isinstance(value, str) else value))
    ]
    recipe = load_recipe(dreambooth, [*tokens, "--with_prior_preservation", "true", "--max_train_steps", "3"], False)
    args = recipe.configs[-1]
    assert {key: getattr(args, key) for key in typed} == typed
    assert {key: yaml.safe_load(recipe.to_yaml())[key] for key in typed} == typed
    assert (args.with_prior_preservation, args.max_train_steps) == (True, 3)
    # flow lists and mappings, and null, as in the recipe file
    flow = load_recipe(dreambooth, ["--validation_prompts", "[a, b]", "--class_data_dir", "null"], False).configs[-1]
    assert flow.validation_prompts == ["a", "b"] and flow.class_data_dir is None
    sft = REPO / "recipes/tiny/sft_lora.yaml"
    for given, says in [
        (["--max_steps", "5 #x"], "key 'max_steps': invalid int value '5 #x'"),
        (["--max_length", "#3"], "key 'max_length': invalid int value '#3'"),  # (was None: no truncation)
        (["--use_peft", "true #x"], "key 'use_peft': invalid string_to_bool value 'true #x'"),
        (["--output_dir", "{a: b}"], "key 'output_dir' takes a path, got dict {'a': 'b'}"),
    ]:
        with pytest.raises(UserError, match=re.escape(says)):
            load_recipe(sft, ["--use_cpu", "true", *given], False)


def test_command_line_values_the_text_typing_kept_as_they_were_read():
    """Review 45: with text keys typed as given, `--resume_from_checkpoint TRUE` was taken for a directory and
    `FALSE` did not start afresh, a mapping key given `"dtype: float32"` (no braces) was refused, and `--eos_token ~`
    set the token '~': each is read as the recipe file's YAML reads it, as before."""
    sft = REPO / "recipes/tiny/sft_lora.yaml"
    for given, expected in [("TRUE", True), ("False", False), ("outputs/x/checkpoint-4", "outputs/x/checkpoint-4")]:
        assert parse_overrides(["--resume_from_checkpoint", given], "sft") == {"resume_from_checkpoint": expected}
    assert parse_overrides(["--model_init_kwargs", "dtype: float32"], "sft") == {
        "model_init_kwargs": {"dtype": "float32"}
    }
    assert parse_overrides(["--eos_token", "~"], "sft") == {"eos_token": None}
    # quoted as the recipe file quotes text: the text inside (a ratio YAML would read as a base-60 number)
    assert parse_overrides(["--run_name", '"3:2"', "'a #1'", '"a" and "b"'], "sft") == {
        "run_name": ["3:2", "a #1", '"a" and "b"']
    }
    recipe = load_recipe(sft, ["--use_cpu", "true", "--model_init_kwargs", "dtype: float32"], False)
    assert recipe.configs[-1].model_init_kwargs["dtype"] == "float32"


def test_a_double_quoted_command_line_value_is_the_text_inside_with_its_backslashes():
    """Review 46 F9: `--output_dir '"C:\\new\\table"'` went through YAML's escapes (a newline and a tab in the
    path) and `'"C:\\Users\\me"'`, an escape YAML refuses, kept its quotes."""
    typed = parse_overrides(["--output_dir", r'"C:\new\table"', "--run_name", r'"C:\Users\me"'], "sft")
    assert typed == {"output_dir": r"C:\new\table", "run_name": r"C:\Users\me"}
    # a double quote inside, escaped as YAML escapes it, is still read by YAML (review 46b G3: kept its quotes)
    assert parse_overrides(["--run_name", r'"a\"b"'], "sft") == {"run_name": 'a"b'}


def test_report_to_null_means_no_tracker():
    recipe = load_recipe(REPO / "recipes/tiny/sft_lora.yaml", ["--use_cpu", "true", "--report_to", "null"], False)
    assert recipe.configs[-1].report_to == []  # transformers kept [None] and failed on it as a tracker's name


def test_the_command_line_refuses_what_it_would_silently_drop(tmp_path):
    """A second --config, max_steps 0 (transformers trains
    one step), launch options given to check, and --list-keys on a recipe without a valid stage."""
    from conftest import run_hfgen_here

    sft = REPO / "recipes/tiny/sft_lora.yaml"
    unknown = tmp_path / "unknown_stage.yaml"
    unknown.write_text("stage: ppox\noutput_dir: x\n")
    for args, says in [
        (("train", "--config", sft, "--config", unknown), "two recipes given"),
        (("check", sft, "--max_steps", "0"), "key 'max_steps' must be a number of steps (1 or more)"),
        (("check", sft, "--num_processes", "2"), "option of `hfgen train`"),
        (("train", unknown, "--list-keys"), "unknown stage 'ppox' (did you mean 'ppo'?)"),
    ]:
        result = run_hfgen_here(*args)
        assert result.returncode == 2 and says in result.stderr, (args, result.stderr[-600:])
        assert "Traceback" not in result.stderr
    listed = run_hfgen_here("train", sft, "--stage", "vae", "--list_keys")
    keys = [line.split(":")[0] for line in listed.stdout.splitlines()]  # (`key: default  # help` lines)
    assert listed.returncode == 0 and "vae_config" in keys, listed.stderr[-400:]
    # the default shown is the value a recipe leaving the key out runs with (TRL's bf16 and activation_checkpointing
    # fields say null and parse to another value), and the help reads as text (argparse's %% was shown)
    listed = run_hfgen_here("train", sft, "--list-keys")
    shown = dict(line.partition("  # ")[0].split(": ", 1) for line in listed.stdout.splitlines())
    parsed = build_recipe({"stage": "sft"}, None, check_inputs=False).configs
    for key in ("bf16", "activation_checkpointing", "learning_rate", "max_length"):
        value = next(getattr(config, key) for config in parsed if hasattr(config, key))
        assert yaml.safe_load(shown[key]) == value, (key, shown[key], value)
    assert "%%" not in listed.stdout
