"""`hfgen sweep`: a grid of recipe overrides, validated up front, one run dir per point, one report."""

import os
import re
import resource

import pytest

from conftest import REPO, run_hfgen, run_hfgen_here
from hfgen import tracking
from hfgen.cli import main as hfgen
from hfgen.errors import UserError
from hfgen.recipe import load_recipe
from hfgen.sweep import grid_points, split_grid

PRETRAIN = REPO / "recipes/tiny/pretrain.yaml"
SHORT = ["--max_steps", "3", "--max_train_samples", "100", "--max_eval_samples", "8", "--logging_steps", "1"]

# Tiny models gain nothing from a second torch thread, and on a CPU shared with other processes two threads
# wait on each other (several times slower): the subprocesses run on one.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def test_comma_values_form_the_grid_and_other_overrides_stay_fixed():
    axes, fixed = split_grid(
        ["--learning_rate", "1e-4,3e-4", "--lora_r=8,16", "--max_steps", "3", "--modules", "q", "v", "--x", "[1,2]",
         "--dataset_columns", "prompt=instruction,completion=output"]  # (README's k=v form of a mapping: one value)
    )  # fmt: skip
    assert axes == {"learning_rate": ["1e-4", "3e-4"], "lora_r": ["8", "16"]}
    assert fixed == ["--max_steps", "3", "--modules", "q", "v", "--x", "[1,2]",
                     "--dataset_columns", "prompt=instruction,completion=output"]  # fmt: skip
    points = grid_points(axes)
    assert [name for name, _ in points] == [
        "learning_rate=1e-4_lora_r=8", "learning_rate=1e-4_lora_r=16",
        "learning_rate=3e-4_lora_r=8", "learning_rate=3e-4_lora_r=16",
    ]  # fmt: skip
    assert points[1][1] == ["--learning_rate", "1e-4", "--lora_r", "16"]
    with pytest.raises(UserError, match="repeats a value"):
        split_grid(["--lora_r", "8,8"])
    # values that map to one directory name were merged into one point
    with pytest.raises(UserError, match="the points --run_name a/b and --run_name a:b would share the directory"):
        grid_points(split_grid(["--run_name", "a/b,a:b,a b"])[0])


def test_a_value_that_is_one_setting_holding_commas_stays_fixed(tmp_path):
    # `--optim_args momentum=0.9,dampening=0.1` (transformers splits it into the optimizer's arguments) was an axis:
    # each of twice the points trained with one of the arguments, exit 0 (review 46 F1); a prompt holding a comma
    # stays one value when quoted whole, as the recipe file quotes text
    from hfgen.sweep import point_recipe

    tokens = ["--optim", "sgd", "--optim_args", "momentum=0.9,dampening=0.1", "--learning_rate", "1e-4,3e-4",
              "--run_name", "'a dog, in snow'"]  # fmt: skip
    axes, fixed = split_grid(tokens)
    assert axes == {"learning_rate": ["1e-4", "3e-4"]} and fixed == [*tokens[:4], *tokens[6:]]
    args = point_recipe(str(PRETRAIN), [*fixed, *grid_points(axes)[0][1]], tmp_path / "p").configs[-1]
    assert (args.optim_args, args.run_name) == ("momentum=0.9,dampening=0.1", "a dog, in snow")
    assert split_grid(["--optim_args", "momentum=0.9,momentum=0.5"])[0] == {}  # (pairs: one setting, as before)


def test_a_long_value_makes_a_point_name_a_file_system_takes(tmp_path):
    # two 320-character validation prompts made names of 680 bytes: the first point failed after every point was
    # checked ("File name too long"), the second with an OSError traceback (probe 45 B4)
    prompts = [f"a handwritten digit {word * 60}" for word in ("seven", "eight")] + ["a handwritten digit é" * 20]
    axes = {"validation_prompts": prompts, "learning_rate": ["1e-3", "3e-3"]}
    points = grid_points(axes)
    assert points == grid_points(axes) and len({name for name, _ in points}) == 6  # the same names on a rerun
    for name, tokens in points:
        assert len(name.encode()) <= 255 and tokens[1] in prompts  # (the point trains on the whole value)
        (tmp_path / name).mkdir()
    assert points[0][0].startswith("validation_prompts=a-handwritten-digit-sevenseven")
    assert grid_points({"run_name": ["a", "b"]})[0][0] == "run_name=a"  # a short value is the name as before
    # and so is a long one in a name a file system takes: an existing sweep's points keep their dirs (review 45 #3)
    assert grid_points({"run_name": ["r" * 87, "b"]})[0][0] == "run_name=" + "r" * 87
    with pytest.raises(UserError, match="over the 255 a file name may have"):  # many axes: said before any run
        grid_points({f"axis_{i}": [f"{'x' * 80}{i}", "y"] for i in range(4)})


def test_an_axis_value_is_the_text_typed(tmp_path):
    # `--validation_prompts "a digit #1,a digit #2"`: both points trained on "a digit", the text before YAML's
    # comment (probe 45 B1); a point's values are its key's type's reading, as `hfgen train` reads them
    from hfgen.sweep import point_recipe

    axes, fixed = split_grid(["--run_name", "exp #1,exp: 2", "--max_steps", "3"])
    for (name, tokens), typed in zip(grid_points(axes), ["exp #1", "exp: 2"], strict=True):
        args = point_recipe(str(PRETRAIN), [*fixed, *tokens], tmp_path / name).configs[-1]
        assert (args.run_name, args.max_steps) == (typed, 3)


def test_axis_values_may_hold_an_equals_sign(tmp_path, capsys):
    # the point dirs of an earlier sweep (`.../learning_rate=1e-3_seed=1`) were read as the k=v,k=v form of a
    # mapping: "no grid given", or one value of both paths beside another axis (probe 45 C6)
    first, second = tmp_path / "sw1/learning_rate=1e-3_seed=1", "learning_rate=3e-3_seed=1"  # (a relative one too)
    axes, fixed = split_grid(["--model_name_or_path", f"{first},{second}", "--seed", "1,2", "--x=a=b"])
    assert axes == {"model_name_or_path": [str(first), second], "seed": ["1", "2"]} and fixed == ["--x", "a=b"]
    with pytest.raises(SystemExit) as exit_info:  # the k=v,k=v form of the mapping key that takes it stays fixed
        hfgen(["sweep", str(PRETRAIN), "--dataset_columns", "prompt=instruction,completion=output"])
    assert exit_info.value.code == 2
    said = "no grid given (--dataset_columns prompt=instruction,completion=output is one mapping, k=v,k=v, not an axis)"
    assert said in capsys.readouterr().err


def test_an_invalid_point_stops_the_sweep_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        hfgen(["sweep", str(PRETRAIN), "--learning_rate", "1e-3,fast", "--output_root", str(tmp_path), *SHORT])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "1 of 2 points are invalid" in error and "learning_rate=fast" in error and "Traceback" not in error
    assert not any(tmp_path.iterdir())


def test_output_dir_and_missing_grid_are_user_errors(tmp_path, capsys):
    for arguments, message in (
        (["--learning_rate", "1e-3,3e-3", "--output_dir", str(tmp_path)], "do not set output_dir"),
        (["--learning_rate", "1e-3"], "no grid given"),
        (["--learning_rate", "1e-3,3e-3", "--learning_rate", "1e-2"], "--learning_rate is given twice"),
    ):
        with pytest.raises(SystemExit):
            hfgen(["sweep", str(PRETRAIN), *arguments])
        assert message in capsys.readouterr().err


def test_eval_under_a_launch_of_several_processes_is_refused_before_anything_trains(tmp_path, capsys, monkeypatch):
    # under `accelerate launch --num_processes 2` every point trained, then each process's `hfgen eval` refused the
    # launch: "2 of 2 points failed (the others ran)", exit 1 (probe 45 C5)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as the launcher sets it for each process
    with pytest.raises(SystemExit) as exit_info:
        hfgen(["sweep", str(PRETRAIN), "--seed", "1,2", "--eval", "--output_root", str(tmp_path / "sw"), *SHORT])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error, error
    assert "`hfgen eval` runs on one process, but 2 were launched" in error and "--eval` directly" in error
    assert not (tmp_path / "sw").exists()


@pytest.mark.slow
def test_two_by_two_pretrain_sweep_makes_four_runs_and_one_report(tmp_path):
    arguments = [
        "sweep", PRETRAIN, "--learning_rate", "1e-3,3e-3", "--warmup_steps", "0,2",
        "--output_root", tmp_path, "--quiet", *SHORT,
    ]  # fmt: skip
    result = run_hfgen(*arguments, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    names = [
        "learning_rate=1e-3_warmup_steps=0", "learning_rate=1e-3_warmup_steps=2",
        "learning_rate=3e-3_warmup_steps=0", "learning_rate=3e-3_warmup_steps=2",
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == names
    for name in names:
        run = tmp_path / name
        assert tracking.is_complete(run) and (run / "model.safetensors").is_file()
        recipe = (run / "recipe.yaml").read_text()
        assert f"output_dir: {run}" in recipe and "max_steps: 3" in recipe
    # each point trained with its own values: the logged learning rate peaks at the point's learning_rate,
    # and starts there without warmup, at 0 with it
    rates = [
        [row["learning_rate"] for row in tracking.read_metrics(tmp_path / n) if "learning_rate" in row] for n in names
    ]
    assert [max(r) for r in rates] == pytest.approx([1e-3, 1e-3, 3e-3, 3e-3])
    assert [r[0] for r in rates] == pytest.approx([1e-3, 0.0, 3e-3, 0.0])
    assert "it/s" not in result.stderr  # --quiet: no training progress bar
    page = (tmp_path / "report.html").read_text()
    assert all(name in page for name in names)
    assert len(re.findall(r"data:image/png;base64,", page)) >= 1
    # run again: every point is complete with the same recipe, so nothing is retrained
    again = run_hfgen(*arguments, env=ONE_THREAD)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already complete, skipped") == 4
    # the same grid with another fixed key: the complete runs of the first recipe are refused, not trained over
    other = run_hfgen(*[a if a != "3" else "4" for a in arguments], env=ONE_THREAD)
    assert other.returncode == 2 and "holds a complete run of a different recipe" in other.stderr


@pytest.mark.slow
def test_a_point_that_diverges_does_not_stop_the_others(tmp_path):
    # was: the sweep ended at the diverged point, the later points never ran and no report was written
    arguments = ["sweep", PRETRAIN, "--learning_rate", "1e30,1e-3", "--nan_tolerance", "0", "--output_root", tmp_path,
                 "--quiet", *SHORT]  # fmt: skip
    result = run_hfgen(*arguments, env=ONE_THREAD)
    assert result.returncode == 3 and "1 of 2 points failed" in result.stderr and "learning_rate=1e30" in result.stderr
    assert tracking.is_complete(tmp_path / "learning_rate=1e-3") and (tmp_path / "report.html").is_file()


def test_points_of_a_loop_stage_under_other_mixed_precisions_train_in_one_process(tmp_path, configs):
    # a sweep runs its points in one process: the second point's Accelerator met the first's process-wide state and
    # ended the sweep in accelerate's "AcceleratorState has already been initialized and cannot be changed" (probe
    # 43 B1; a notebook calling hfgen.cli.main twice too)
    from diffusion_fixtures import SMALL_DATA, VAE_RECIPE

    arguments = ["sweep", VAE_RECIPE, "--vae_config", configs["vae_config"], "--max_train_steps", "2",
                 "--checkpointing_steps", "0", *SMALL_DATA, "--mixed_precision", "bf16,no", "--output_root", tmp_path,
                 "--quiet"]  # fmt: skip
    result = run_hfgen_here(*arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    assert tracking.is_complete(tmp_path / "mixed_precision=bf16") and tracking.is_complete(
        tmp_path / "mixed_precision=no"
    )


def test_a_run_leaves_the_process_as_it_found_it(tmp_path, monkeypatch):
    # transformers' full_determinism made the whole process deterministic-only with CUDA_LAUNCH_BLOCKING=1 for every
    # later run in it (a sweep's next point, a notebook's next cell, the processes they start), and --quiet left
    # the progress bars off (probe 43 B6)
    import torch
    import transformers

    monkeypatch.delenv("CUDA_LAUNCH_BLOCKING", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    result = run_hfgen_here("train", PRETRAIN, *SHORT, "--full_determinism", "true", "--output_dir", tmp_path / "a")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not torch.are_deterministic_algorithms_enabled() and "CUDA_LAUNCH_BLOCKING" not in os.environ
    assert transformers.utils.logging.is_progress_bar_enabled()
    result = run_hfgen_here("eval", tmp_path / "a", "--quiet", "--num_prompts", "2", "--num_samples", "1",
                            "--max_new_tokens", "4", "--perplexity_dataset", "none")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert transformers.utils.logging.is_progress_bar_enabled()


def test_each_point_trains_with_the_tf32_setting_its_recipe_asks(tmp_path, monkeypatch):
    # transformers sets TF32 process-wide when a recipe is parsed, and a sweep parses every point first: every point
    # trained with the last one's (--tf32 true,false: the tf32=true point in IEEE float32) (probe 43 I3). TF32 exists
    # on GPUs only: transformers is told here that it is available, as on an A100; the training is real
    import torch
    import transformers
    import transformers.training_args

    monkeypatch.setattr(transformers.training_args, "is_torch_tf32_available", lambda: True)
    seen = []
    train = transformers.Trainer.train

    def observed(trainer, *args, **kwargs):  # the precision each point's training ran with
        seen.append((trainer.args.tf32, torch.backends.fp32_precision))
        return train(trainer, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "train", observed)
    before = torch.backends.fp32_precision
    arguments = ["sweep", PRETRAIN, *SHORT, "--tf32", "true,false", "--output_root", tmp_path, "--quiet"]
    result = run_hfgen_here(*arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    assert seen == [(True, "tf32"), (False, "ieee")]
    assert torch.backends.fp32_precision == before


def test_pipeline_points_train_their_steps_in_their_own_dirs(tmp_path):
    """An rlhf pipeline's steps wrote into their step recipes' output_dirs, shared by every point: point 2 retrained
    point 1's reward and DPO models in place, and a rerun found both points complete."""
    from hfgen.stages import rlhf
    from hfgen.sweep import point_recipe

    compare = REPO / "recipes/tiny/compare.yaml"
    axes, fixed = split_grid(["--sft", f"{REPO}/recipes/tiny/sft_full.yaml,{REPO}/recipes/tiny/sft_lora.yaml",
                              "--method", "dpo", "--sft_overrides", '{"learning_rate": 0.01}'])  # fmt: skip
    step_dirs = []
    for name, tokens in grid_points(axes):
        (pipeline,) = point_recipe(str(compare), [*fixed, *tokens], tmp_path / name).configs
        for step in ("sft", "reward", "dpo"):
            step_dirs.append(rlhf.step_recipe(pipeline, step, check_inputs=False).output_dir)
            assert step_dirs[-1] == tmp_path / name / step
        assert rlhf.step_recipe(pipeline, "sft", check_inputs=False).values["learning_rate"] == 0.01  # the user's
        # the method step trains from this point's SFT model and is judged by its reward model
        wired = rlhf.step_recipe(pipeline, "dpo", check_inputs=False).values
        assert wired["model_name_or_path"] == str(tmp_path / name / "sft")
        assert wired["reward_model_path"] == str(tmp_path / name / "reward")
    assert len(set(step_dirs)) == 6


@pytest.mark.slow
def test_a_sweep_resumes_with_its_root_spelled_another_way(tmp_path):
    # `./x` then `/abs/x`: the complete points were refused ("differing keys: output_dir") and an interrupted point
    # retrained from step 1, since the recipes were compared as text
    arguments = ["sweep", PRETRAIN, "--seed", "1,2", "--quiet", "--save_steps", "1", *SHORT[:2], *SHORT[4:]]
    relative = os.path.relpath(tmp_path / "sw", REPO)  # the sweep runs in the repo (the recipe's paths)
    first = run_hfgen(*arguments, "--max_train_samples", "64", "--output_root", relative, env=ONE_THREAD)
    assert first.returncode == 0, first.stderr[-3000:]
    point = tmp_path / "sw" / "seed=2"
    again = run_hfgen(*arguments, "--max_train_samples", "64", "--output_root", tmp_path / "sw", env=ONE_THREAD)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already complete, skipped") == 2, again.stdout
    (point / tracking.COMPLETE_MARKER).unlink()  # as a kill after the last checkpoint leaves it
    resumed = run_hfgen(*arguments, "--max_train_samples", "64", "--output_root", f"{relative}/../sw", env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "was interrupted: continuing from its newest complete checkpoint" in resumed.stdout, resumed.stdout
    assert tracking.is_complete(point)


def test_a_point_holding_an_unfinished_run_of_another_recipe_is_refused_before_anything_runs(tmp_path, capsys):
    # its complete checkpoints were deleted and the point trained over them, exit 0, where `hfgen train` refuses the
    # dir (probe 45 C1): an interrupted sweep rerun with one fixed key changed
    point = tmp_path / "sw" / "seed=1"
    tiny = ["--max_steps", "2", "--max_train_samples", "8", "--max_eval_samples", "4", "--block_size", "8",
            "--save_strategy", "steps", "--save_steps", "1", "--quiet"]  # fmt: skip
    assert hfgen(["train", str(PRETRAIN), "--seed", "1", "--output_dir", str(point), *tiny[:-1]]) == 0
    (point / tracking.COMPLETE_MARKER).unlink()  # as a kill after its last checkpoint leaves it
    with pytest.raises(SystemExit) as exit_info:
        hfgen(["sweep", str(PRETRAIN), "--seed", "1,2", "--warmup_steps", "1", "--output_root", str(tmp_path / "sw"),
               *tiny])  # fmt: skip
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error, error
    assert f"output_dir '{point}' holds an unfinished run of a different recipe (differing keys: warmup_steps)" in error
    assert [p.name for p in tracking.complete_checkpoints(point)] == ["checkpoint-1", "checkpoint-2"]
    assert not (tmp_path / "sw" / "seed=2").exists()  # nothing ran


def test_an_interrupted_sweep_rerun_with_resume_from_checkpoint_continues_its_points(tmp_path, capfd):
    # exit 2 before anything ran: the points' dirs held "an unfinished run ... continue it with
    # --resume_from_checkpoint true", which the rerun had passed (review 46 F2); and a complete point is skipped
    root = tmp_path / "sw"
    sweep = ["sweep", str(PRETRAIN), "--seed", "1,2", "--output_root", str(root), "--max_steps", "2",
             "--max_train_samples", "8", "--max_eval_samples", "4", "--block_size", "8", "--save_strategy", "steps",
             "--save_steps", "1", "--quiet"]  # fmt: skip
    assert hfgen(sweep) == 0
    (root / "seed=1" / tracking.COMPLETE_MARKER).unlink()  # as a kill after its last checkpoint leaves it
    capfd.readouterr()
    assert hfgen([*sweep, "--resume_from_checkpoint", "true"]) == 0
    said = "".join(capfd.readouterr())
    assert "seed=1: training" in said and "checkpoint-2 is the last step's; finishing the run from it" in said, said
    assert "seed=2: already complete, skipped" in said and tracking.is_complete(root / "seed=1")
    assert hfgen(sweep) == 0  # the plain rerun: both points the same recipe as before
    assert "".join(capfd.readouterr()).count("already complete, skipped") == 2


def test_a_complete_point_whose_data_changed_in_place_is_trained_again(tmp_path):
    # both points were "already complete, skipped", their stale report rewritten, after the data file was rewritten
    # under its name (and so after a base model retrained in place: probe 39 C3)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(f'{{"text": "the red cat number {i} is warm."}}\n' for i in range(40)))
    arguments = ["sweep", PRETRAIN, "--seed", "1,2", "--quiet", "--max_steps", "1", "--max_train_samples", "8",
                 "--max_eval_samples", "4", "--block_size", "8", "--dataset_name", data, "--output_root", tmp_path / "sw"]  # fmt: skip
    first = run_hfgen_here(*arguments)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_hfgen_here(*arguments)
    assert again.returncode == 0 and again.stdout.count("already complete, skipped") == 2, again.stdout
    data.write_text(data.read_text().replace("red", "tan"))
    changed = run_hfgen_here(*arguments)
    assert changed.returncode == 0, changed.stderr[-3000:]
    said = f"training again: its inputs changed since it ran (dataset_name '{data}' changed since"
    assert changed.stdout.count(said) == 2, changed.stdout
    point = tmp_path / "sw" / "seed=1"  # it records the new content now
    assert tracking.inputs_changed(point, load_recipe(point / "recipe.yaml", check_inputs=False)) == []


def test_a_complete_point_on_a_hub_id_whose_cached_snapshot_moved_is_trained_again(tmp_path, hub_cache):
    # points trained on `tinyorg/tiny-llama` from the local Hugging Face cache were "already complete, skipped" after
    # `hf download` fetched a new commit (refs/main moved): trained on the old snapshot, reported as of these inputs
    # (probe 43 A3; a pipeline step is judged by the same record, `tracking.inputs_changed`)
    from tiny_models import save_tiny_llama

    first, second = "a" * 39 + "1", "b" * 39 + "2"
    hub_cache("tinyorg/tiny-llama", save_tiny_llama(tmp_path / "llama_b", seed=1), second)
    hub_cache("tinyorg/tiny-llama", save_tiny_llama(tmp_path / "llama_a"), first)  # refs/main: the first
    arguments = ["sweep", PRETRAIN, "--seed", "1,2", "--quiet", "--max_steps", "1", "--max_train_samples", "8",
                 "--max_eval_samples", "4", "--block_size", "8", "--model_name_or_path", "tinyorg/tiny-llama",
                 "--config_name", "null", "--tokenizer_name", "null", "--output_root", tmp_path / "sw"]  # fmt: skip
    first_sweep = run_hfgen_here(*arguments)
    assert first_sweep.returncode == 0, first_sweep.stderr[-3000:]
    (tmp_path / "hub" / "models--tinyorg--tiny-llama" / "refs" / "main").write_text(second)  # a new download
    moved = run_hfgen_here(*arguments)
    assert moved.returncode == 0, moved.stderr[-3000:]
    said = "training again: its inputs changed since it ran (model_name_or_path 'tinyorg/tiny-llama' changed since"
    assert moved.stdout.count(said) == 2 and second in moved.stdout, moved.stdout
    again = run_hfgen_here(*arguments)  # they record the new snapshot now
    assert again.returncode == 0 and again.stdout.count("already complete, skipped") == 2, again.stdout


def test_a_points_evaluation_measures_its_own_peak_memory(tmp_path):
    # on a CPU `sweep --eval` recorded the sweep process's peak RSS (all points' training) as each point's
    from transformers import LlamaConfig, LlamaForCausalLM

    from hfgen.models import build_embedded_tokenizer
    from hfgen.sweep import evaluate

    tokenizer = build_embedded_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ballast = b"\x01" * 2**30  # this process's peak RSS: 1 GiB more than an evaluation of a tiny model needs
    evaluate(tmp_path, quiet=True)
    del ballast
    peak = tracking.read_json(tmp_path / "eval.json")["speed/peak_memory_mb"]
    assert peak < resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10 - 512
