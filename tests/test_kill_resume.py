"""Runs that survive a SIGKILL at any moment: killed at named points (inside a step, mid-checkpoint-write, during
evaluation, during the final save) and resumed with `--resume_from_checkpoint true`, every stage ends with the
uninterrupted run's weights, bit for bit, and its metrics.jsonl rows (no duplicates, no gaps). pretrain and ppo
are killed at every point in one run; sft (LoRA), reward, t2i and t2i_flow mid-checkpoint-write, t2i and GRPO on
2 processes inside a step, and DPO and GRPO (a sibling of each TRL family) mid-checkpoint-write and during their
held-out comparison. The full matrix of stages x points is scripts/kill_matrix.py."""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_hfgen, run_hfgen_here, tensorboard_scalars
from diffusion_fixtures import (
    T2I_RECIPE,
    VAE_RECIPE,
    list_caption_folder,
    t2i_overrides,
    vae_overrides,
    write_tiny_configs,
)  # fmt: skip
from hfgen import tracking
from hfgen.errors import UserError
from kill_harness import (
    GROUP_RL_ARGS,
    PREFERENCE_ARGS,
    VOLATILE,
    killed_then_resumed,
    stable_rows,
    train,
    weight_differences,
)
from tiny_models import pretrained_tiny_llama

PRETRAIN = REPO / "recipes/tiny/pretrain.yaml"
PRETRAIN_ARGS = ["--max_train_samples", "200", "--max_eval_samples", "20", "--logging_steps", "2",
                 "--max_steps", "8", "--save_steps", "4", "--save_total_limit", "1"]  # fmt: skip
FINE_TUNING_ARGS = ["--max_train_samples", "64", "--max_eval_samples", "8", "--per_device_train_batch_size", "8",
                    "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "2"]  # fmt: skip


def reference_and_killed(tmp_path_factory, recipe, overrides, kill_points, killed_code=-signal.SIGKILL):
    """(the uninterrupted run, the killed-and-resumed run, what the resumes said) for one stage."""
    reference, killed = tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("killed")
    result = train(recipe, reference, overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    notes = killed_then_resumed(recipe, killed, overrides, kill_points, killed_code)
    return reference, killed, notes


def assert_same_run(reference, killed):
    assert weight_differences(reference, killed) == []
    rows = stable_rows(reference)
    assert rows and stable_rows(killed) == rows


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory):
    # step 6 (resume from 4), writing checkpoint-8 (from 4 again), evaluating, saving the model (from 8)
    points = ["step@6", "checkpoint@8", "eval", "final_save"]
    return reference_and_killed(tmp_path_factory, PRETRAIN, PRETRAIN_ARGS, points)


@pytest.mark.slow
def test_pretrain_killed_at_every_point_ends_as_the_uninterrupted_run(pretrain_runs):
    reference, killed, notes = pretrain_runs
    assert_same_run(reference, killed)
    assert any("skipped checkpoint-8" in line for line in notes), notes  # the half-written one, named
    assert [p.name for p in tracking.checkpoints(killed)] == ["checkpoint-8"]  # save_total_limit 1


def test_resume_refuses_an_incomplete_checkpoint_by_path(pretrain_runs, tmp_path, capsys):
    shutil.copytree(pretrain_runs[0] / "checkpoint-8", tmp_path / "checkpoint-8")
    (tmp_path / "checkpoint-8" / tracking.CHECKPOINT_STATE).unlink()  # as a kill mid-write leaves it
    with pytest.raises(UserError, match="checkpoint-8' is an incomplete checkpoint"):
        tracking.resolve_resume(str(tmp_path / "checkpoint-8"), tmp_path)
    with pytest.raises(UserError, match="no-such-checkpoint' is not a directory"):
        tracking.resolve_resume(str(tmp_path / "no-such-checkpoint"), tmp_path)
    assert tracking.resolve_resume("true", tmp_path) is None  # `true` with nothing to resume: a fresh start
    assert "only incomplete ones: checkpoint-8); starting afresh" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_restarted_with_resume_true_starts_afresh(tmp_path):
    # a restart script always passing --resume_from_checkpoint true exited 2: "no complete checkpoint-N directory"
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert train(PRETRAIN, reference, PRETRAIN_ARGS).returncode == 0
    assert train(PRETRAIN, killed, PRETRAIN_ARGS, kill_at="checkpoint@4", resume=True).returncode == -signal.SIGKILL
    result = train(PRETRAIN, killed, PRETRAIN_ARGS, resume=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(only incomplete ones: checkpoint-4); starting afresh" in result.stderr, result.stderr[-3000:]
    assert_same_run(reference, killed)


@pytest.mark.slow
def test_sigterm_with_save_on_signal_saves_a_checkpoint_then_exits(pretrain_runs, tmp_path):
    overrides = [*PRETRAIN_ARGS, "--save_on_signal", "true"]
    result = train(PRETRAIN, tmp_path, overrides, kill_at="step@6:TERM")  # the notice arrives during step 6
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "SIGTERM received" in result.stderr and not tracking.is_complete(tmp_path)
    assert [p.name for p in tracking.complete_checkpoints(tmp_path)] == ["checkpoint-6"]  # not only the periodic 4
    result = train(PRETRAIN, tmp_path, overrides, resume=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(pretrain_runs[0], tmp_path)


@pytest.mark.slow
def test_a_sweep_point_killed_mid_run_continues_from_its_checkpoint(pretrain_runs, tmp_path):
    sweep = ["sweep", PRETRAIN, *PRETRAIN_ARGS, "--learning_rate", "3.0e-3,", "--output_root", tmp_path]
    killed = run_hfgen(*sweep, env={"HFGEN_KILL_AT": "checkpoint@8"})
    assert killed.returncode < 0
    point = tmp_path / "learning_rate=3.0e-3"
    assert tracking.complete_checkpoints(point) and not tracking.is_complete(point)
    result = run_hfgen(*sweep, env={"HFGEN_KILL_AT": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "continuing from its newest complete checkpoint" in result.stdout + result.stderr
    assert "skipped checkpoint-8" in result.stderr and "resuming from checkpoint-4" in result.stderr
    assert_same_run(pretrain_runs[0], point)  # as the uninterrupted run (same recipe, other output_dir)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return pretrained_tiny_llama(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft_lora", "reward", "dpo", "grpo_arithmetic"])
def test_fine_tuning_killed_mid_checkpoint_ends_as_the_uninterrupted_run(tiny_lm, tmp_path_factory, stage):
    """The stages the issue lists and a sibling of each TRL family (preference, group RL), which are also killed
    during their held-out comparison after training."""
    overrides = ["--model_name_or_path", tiny_lm]
    points = ["checkpoint@4"]
    if stage in ("sft_lora", "reward"):
        overrides += [*FINE_TUNING_ARGS, *(["--num_samples", "0"] if stage == "sft_lora" else [])]
    else:
        overrides += [*(PREFERENCE_ARGS if stage == "dpo" else GROUP_RL_ARGS), "--max_steps", "4"]
        points.append("eval")
    reference, killed, notes = reference_and_killed(
        tmp_path_factory, REPO / f"recipes/tiny/{stage}.yaml", overrides, points
    )
    assert_same_run(reference, killed)
    assert any("skipped checkpoint-4" in line for line in notes), notes
    if stage != "grpo_arithmetic":  # the mean loss of the whole run's steps, not only of those after the resume
        losses = [tracking.read_json(run / "eval.json")["train_loss"] for run in (reference, killed)]
        assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    if "eval" in points:  # the comparison done again on the same weights: the same figures
        assert held_out_figures(killed) == held_out_figures(reference)


def held_out_figures(run) -> dict:
    return {k: v for k, v in tracking.read_json(run / "eval.json").items() if not any(w in k for w in VOLATILE)}


@pytest.fixture(scope="module")
def ppo_recipe(tmp_path_factory):
    from stages.test_ppo import build_tiny_models, write_recipe

    root = tmp_path_factory.mktemp("ppo")
    sft, reward = build_tiny_models(root)
    path = write_recipe(
        root, sft, reward_model_path=str(reward), total_episodes=80, save_steps=2, kl_target=1.0, sample_steps=1
    )
    recipe = yaml.safe_load(path.read_text())
    del recipe["output_dir"]  # each run names its own
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_ppo_killed_at_every_point_ends_as_the_uninterrupted_run(ppo_recipe, tmp_path_factory):
    # 5 steps, checkpoints at 2 and 4: step 3 (resume from 2), writing checkpoint-4 (from 2), saving, evaluating
    points = ["step@3", "checkpoint@4", "final_save", "eval"]
    reference, killed, notes = reference_and_killed(tmp_path_factory, ppo_recipe, [], points)
    assert_same_run(reference, killed)
    # the sample table of each step once: a resumed run cuts samples.jsonl back to its checkpoint before writing
    sample_steps = [[json.loads(line)["step"] for line in (run / "samples.jsonl").read_text().splitlines()]
                    for run in (reference, killed)]  # fmt: skip
    assert sample_steps[0] and sample_steps[1] == sample_steps[0]
    assert any("skipped checkpoint-4" in line for line in notes), notes


@pytest.mark.slow
def test_t2i_flow_with_ema_killed_mid_checkpoint_ends_as_the_uninterrupted_run(tmp_path_factory):
    from stages.test_t2i_flow import FLOW_RECIPE, flow_overrides, train_vae16, write_flow_configs

    configs = write_flow_configs(tmp_path_factory.mktemp("flow_configs"))
    vae16 = train_vae16(configs, tmp_path_factory.mktemp("vae16"))
    overrides = [*flow_overrides(configs, vae16, "unused", steps=4), "--use_ema", "true", "--checkpointing_steps", "2",
                 "--eval_images_per_prompt", "0"]  # fmt: skip
    reference, killed, notes = reference_and_killed(tmp_path_factory, FLOW_RECIPE, overrides, ["checkpoint@4"])
    assert_same_run(reference, killed)
    assert any("skipped checkpoint-4" in line for line in notes), notes


@pytest.mark.slow
def test_t2i_killed_mid_checkpoint_ends_as_the_uninterrupted_run(tmp_path_factory):
    configs = write_tiny_configs(tmp_path_factory.mktemp("configs"))
    vae_dir = tmp_path_factory.mktemp("vae")
    assert run_hfgen("train", VAE_RECIPE, *vae_overrides(configs, vae_dir)).returncode == 0
    overrides = t2i_overrides(configs, vae_dir, "unused", steps=4)
    overrides += ["--checkpointing_steps", "2", "--eval_images_per_prompt", "0"]
    reference, killed, notes = reference_and_killed(tmp_path_factory, T2I_RECIPE, overrides, ["checkpoint@4"])
    assert_same_run(reference, killed)


@pytest.mark.slow
def test_vae_resumed_between_two_log_rows_logs_the_uninterrupted_runs_rows(tmp_path_factory):
    # the losses of the steps since the last row were not in the checkpoint: resumed from checkpoint-3, the row of
    # step 4 was the mean of step 4 alone, the uninterrupted run's the mean of steps 1-4
    configs = write_tiny_configs(tmp_path_factory.mktemp("configs"))
    overrides = vae_overrides(configs, "unused", steps=6)
    for key, value in (("--logging_steps", "4"), ("--checkpointing_steps", "3")):
        overrides[overrides.index(key) + 1] = value
    overrides = overrides[: overrides.index("--output_dir")] + overrides[overrides.index("--output_dir") + 2 :]
    reference, killed, _ = reference_and_killed(tmp_path_factory, VAE_RECIPE, overrides, ["step@5"])
    assert [row["step"] for row in tracking.read_metrics(reference) if "loss" in row] == [4, 6]
    assert_same_run(reference, killed)


@pytest.mark.slow
def test_t2i_on_two_processes_killed_mid_run_ends_as_the_uninterrupted_run(
    configs, vae_dir, tmp_path_factory, free_port, monkeypatch
):
    # Each process draws its own noise, timesteps and dropped captions (`TrainingRNG`): the checkpoint kept the main
    # process's generator alone, and after a resume process 1 drew process 0's (every later step differed)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    overrides = t2i_overrides(configs, vae_dir, "unused", steps=4) + [
        "--checkpointing_steps", "2", "--eval_images_per_prompt", "0", "--validation_prompts", "[]",
        "--num_processes", "2", "--main_process_port", str(free_port),
    ]  # fmt: skip
    # killed at step 3, after checkpoint-2
    reference, killed, _ = reference_and_killed(
        tmp_path_factory, T2I_RECIPE, overrides, ["step@3"], 128 + signal.SIGKILL
    )
    assert_same_run(reference, killed)


@pytest.mark.slow
def test_grpo_on_two_processes_killed_mid_run_ends_as_the_uninterrupted_run(
    tiny_lm, tmp_path_factory, free_port, monkeypatch
):
    # Each process keeps its own generation buffer in the checkpoint: loaded with map_location the device, which
    # under CPU DDP is `cpu:0`, every rank's resume ended in torch's "don't know how to restore data location"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    overrides = ["--model_name_or_path", tiny_lm, *GROUP_RL_ARGS, "--max_steps", "3", "--max_completion_length", "8",
                 "--per_device_train_batch_size", "4", "--num_processes", "2",
                 "--main_process_port", str(free_port)]  # fmt: skip
    recipe = REPO / "recipes/tiny/grpo_arithmetic.yaml"  # killed at step 3, after checkpoint-2
    reference, killed, _ = reference_and_killed(tmp_path_factory, recipe, overrides, ["step@3"], 128 + signal.SIGKILL)
    assert_same_run(reference, killed)


@pytest.mark.slow
def test_t2i_on_pixels_with_random_crops_flips_and_list_captions_killed_mid_run_ends_as_the_uninterrupted_run(
    tmp_path_factory,
):
    # cache_latents false: crops, flips and caption picks are drawn per step while loading, a prefetched batch ahead
    configs = write_tiny_configs(tmp_path_factory.mktemp("configs"))
    vae_dir = tmp_path_factory.mktemp("vae")
    assert run_hfgen("train", VAE_RECIPE, *vae_overrides(configs, vae_dir)).returncode == 0
    data = list_caption_folder(tmp_path_factory.mktemp("data") / "images")
    overrides = t2i_overrides(configs, vae_dir, "unused", steps=6) + [
        "--dataset_name", str(data), "--train_batch_size", "4", "--cache_latents", "false", "--center_crop", "false",
        "--random_flip", "true", "--checkpointing_steps", "3", "--eval_images_per_prompt", "0",
        "--validation_steps", "0", "--validation_prompts", "[]",
    ]  # fmt: skip
    reference, killed, _ = reference_and_killed(tmp_path_factory, T2I_RECIPE, overrides, ["step@5"])
    assert_same_run(reference, killed)


def tiny_dpo_pipeline(tiny_lm, tmp_path, **sft_values) -> Path:
    """An rlhf pipeline recipe (sft of 4 steps, checkpoint each, then dpo of 2) in tmp_path, its steps under it."""
    from conftest import shrunk

    sft = shrunk("sft_full.yaml", tmp_path, model_name_or_path=str(tiny_lm), output_dir=str(tmp_path / "sft"),
                 max_train_samples=64, max_eval_samples=8, per_device_train_batch_size=8, max_steps=4,
                 save_strategy="steps", save_steps=1, logging_steps=1, num_samples=0, **sft_values)  # fmt: skip
    dpo = shrunk("dpo.yaml", tmp_path, model_name_or_path="from the sft step", output_dir=str(tmp_path / "dpo"),
                 max_steps=2, per_device_train_batch_size=4, max_train_samples=32, max_eval_samples=8,
                 eval_num_prompts=2, eval_samples_per_prompt=1, eval_response_length=4)  # fmt: skip
    pipeline = tmp_path / "rlhf.yaml"
    pipeline.write_text(yaml.safe_dump({"stage": "rlhf", "output_dir": str(tmp_path / "rlhf"), "method": "dpo",
                                        "sft": sft, "dpo": dpo}))  # fmt: skip
    return pipeline


@pytest.mark.slow
def test_an_rlhf_step_killed_mid_run_continues_from_its_checkpoint(tiny_lm, tmp_path):
    pipeline = tiny_dpo_pipeline(tiny_lm, tmp_path)
    killed = run_hfgen("train", pipeline, env={"HFGEN_KILL_AT": "step@3"})  # inside the sft step's third step
    assert killed.returncode == -signal.SIGKILL and not tracking.is_complete(tmp_path / "sft")
    kept = tmp_path / "sft" / "checkpoint-2" / tracking.CHECKPOINT_STATE
    written = kept.stat().st_mtime_ns
    result = run_hfgen("train", pipeline)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "== sft (interrupted)" in result.stdout and "continuing from its newest complete checkpoint" in result.stdout
    assert kept.stat().st_mtime_ns == written  # continued after checkpoint-2, not trained again from step 1
    assert [row["step"] for row in tracking.read_metrics(tmp_path / "sft") if "loss" in row] == [1, 2, 3, 4]
    assert tracking.is_complete(tmp_path / "dpo") and tracking.is_complete(tmp_path / "rlhf")


@pytest.mark.slow
def test_a_pipeline_stopped_after_an_earlier_step_ran_again_reruns_the_later_steps(tiny_lm, tmp_path):
    # sft trained again (its overrides changed), then a SIGTERM during its final save (save_on_signal) stopped the
    # pipeline before dpo: the next run said "dpo: complete, skipped", a DPO model trained from the old SFT model
    pipeline = tiny_dpo_pipeline(tiny_lm, tmp_path, save_on_signal=True)
    assert run_hfgen("train", pipeline).returncode == 0
    changed = ["--sft_overrides", json.dumps({"learning_rate": 1e-3})]
    stopped = run_hfgen("train", pipeline, *changed, env={"HFGEN_KILL_AT": "final_save:TERM"})
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "== sft (recipe changed)" in stopped.stdout and "== dpo" not in stopped.stdout
    result = run_hfgen("train", pipeline, *changed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "== dpo (an earlier step was made again since it ran)" in result.stdout, result.stdout
    sft_run = tracking.read_json(tmp_path / "sft" / tracking.COMPLETE_MARKER)
    assert tracking.read_json(tmp_path / "dpo" / tracking.INPUTS_RECORD) == {"sft": sft_run}
    again = run_hfgen("train", pipeline, *changed)  # nothing changed since: every step is skipped
    assert again.returncode == 0 and again.stdout.count("is complete, skipped") == 2, again.stdout


# ---- what a resume and a fresh start may find in the output dir ------------------------------------------------


def fake_checkpoint(output_dir, recipe: dict, state: dict, step: int = 4):
    """A complete checkpoint-STEP as hfgen leaves it (its recipe and state file), for the checks made before any
    weights load."""
    path = output_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (path / tracking.CHECKPOINT_STATE).write_text(json.dumps({"step": step, "metrics_rows": 0, **state}))
    return path


def test_a_resume_with_other_training_keys_another_stage_or_another_launch_is_refused(tmp_path):
    # each resumed without a word: a learning rate recorded in recipe.yaml but never used, a batch size silently
    # changed mid-run, a ZeRO-3 checkpoint's optimizer dropped under DDP, another process count's data order
    recipe = yaml.safe_load(PRETRAIN.read_text())
    launch = tracking.launch_identity()
    checkpoint = fake_checkpoint(tmp_path, recipe, launch)

    def resume_with(**changes):
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({**recipe, **changes}))
        return tracking.resolve_resume("true", tmp_path)

    allowed = dict(
        resume_from_checkpoint=True, logging_steps=1, save_steps=2, max_steps=99, eval_steps=3, max_eval_samples=5
    )  # where it saves and logs, how it is evaluated, how long it trains
    assert resume_with(**allowed) == checkpoint
    with pytest.raises(UserError, match=r"learning_rate: 0.003 -> 0.03.*start afresh"):
        resume_with(learning_rate=0.03)
    with pytest.raises(UserError, match=r"per_device_train_batch_size"):
        resume_with(per_device_train_batch_size=3)
    with pytest.raises(UserError, match=r"validation_split_percentage: 5.0 -> 50.0"):  # it decides the training rows
        resume_with(validation_split_percentage=50)
    with pytest.raises(UserError, match="written by a pretrain run, not a sft run"):
        resume_with(stage="sft")
    (checkpoint / tracking.CHECKPOINT_STATE).write_text(json.dumps({"step": 4, **launch, "processes": 2}))
    with pytest.raises(UserError, match=r"another launch \(processes: 2 -> 1\)"):
        resume_with()
    (checkpoint / tracking.CHECKPOINT_STATE).write_text(json.dumps({"step": 4, **launch, "engine": "zero3"}))
    with pytest.raises(UserError, match=r"engine: 'zero3' -> 'ddp'"):
        resume_with()


def test_an_fsdp_checkpoint_resumed_under_the_other_state_dict_type_is_refused(tmp_path):
    # a FULL_STATE_DICT checkpoint (pytorch_model_fsdp.bin) resumed under SHARDED_STATE_DICT (recipes/accelerate/
    # fsdp.yaml's), or the reverse, died on every rank inside accelerate's load_fsdp_model (".metadata" or
    # pytorch_model_fsdp.bin not found; probe 44 E1): the launch's state-dict type is now recorded and compared, and
    # read from the files of a checkpoint that did not record it. This process's accelerate state is put on FSDP2 as
    # an FSDP launch's (tests/engines/fsdp2_launch.py) is.
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    def launch_under(state_dict_type):
        AcceleratorState._reset_state(reset_partial_state=True)
        state = Accelerator(cpu=True).state
        PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=state_dict_type)

    recipe = yaml.safe_load(PRETRAIN.read_text())
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    try:
        launch_under("FULL_STATE_DICT")
        launch = tracking.launch_identity()
        assert launch["engine"] == "fsdp2" and launch["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        checkpoint = fake_checkpoint(tmp_path, recipe, launch)
        assert tracking.resolve_resume("true", tmp_path) == checkpoint
        launch_under("SHARDED_STATE_DICT")
        with pytest.raises(UserError, match=r"fsdp_state_dict_type: 'FULL_STATE_DICT' -> 'SHARDED_STATE_DICT'.*"
                                            r"Resume with the launch config it was written with"):  # fmt: skip
            tracking.resolve_resume("true", tmp_path)
        # an older hfgen's checkpoint, without the record: its files say (a sharded one: pytorch_model_fsdp_0/)
        del launch["fsdp_state_dict_type"]
        (checkpoint / tracking.CHECKPOINT_STATE).write_text(json.dumps({"step": 4, **launch}))
        (checkpoint / "pytorch_model_fsdp_0").mkdir()
        assert tracking.resolve_resume("true", tmp_path) == checkpoint
        launch_under("FULL_STATE_DICT")
        with pytest.raises(UserError, match=r"fsdp_state_dict_type: 'SHARDED_STATE_DICT' -> 'FULL_STATE_DICT'"):
            tracking.resolve_resume("true", tmp_path)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_a_checkpoint_whose_recipe_holds_a_key_since_refused_has_its_other_training_keys_compared(tmp_path):
    # an older hfgen's recipe holding a key this one refuses (warmup_steps under a constant schedule: never read) gave
    # up the whole comparison, so a resume changed every training key without a word (probe 42 A3)
    then = {**yaml.safe_load(PRETRAIN.read_text()), "lr_scheduler_type": "constant"}  # (and its warmup_steps: 20)
    checkpoint = fake_checkpoint(tmp_path, then, tracking.launch_identity())

    def resume_with(left_out=("warmup_steps",), **changes):  # the refused key left out, as its refusal asks
        now = {key: value for key, value in then.items() if key not in left_out}
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({**now, **changes}))
        return tracking.resolve_resume("true", tmp_path)

    assert resume_with() == checkpoint
    with pytest.raises(UserError, match=r"learning_rate: 0.003 -> 0.03, seed: 42 -> 7\)"):
        resume_with(learning_rate=0.03, seed=7)
    with pytest.raises(UserError, match=r"\(weight_decay: 0.1 -> 0.0\)"):  # left out: its default
        resume_with(left_out=("warmup_steps", "weight_decay"))
    with pytest.raises(UserError, match=r"\(lr_scheduler_type: 'constant' -> 'cosine'\)"):  # (then read it)
        resume_with(left_out=(), lr_scheduler_type="cosine")


def test_a_resume_under_other_package_versions_than_its_checkpoints_says_so(tmp_path, capsys):
    # an upgrade between a kill and the resume that changed a default of a key the recipe leaves out trained the
    # resumed steps under the new value, and env.json, rewritten, kept only the new versions: nothing said (probe 42 A4)
    recipe = yaml.safe_load(PRETRAIN.read_text())
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "checkpoint-4").mkdir()
    tracking.finish_checkpoint(tmp_path, tmp_path / "checkpoint-4", 4, None)
    tracking.check_resume_target("true", tmp_path)
    assert "package versions" not in capsys.readouterr().err
    state = tmp_path / "checkpoint-4" / tracking.CHECKPOINT_STATE
    versions = tracking.read_json(state)["packages"]
    assert versions == tracking.package_versions()
    tracking.write_json(state, {**tracking.read_json(state), "packages": {**versions, "transformers": "4.40.0"}})
    tracking.check_resume_target("true", tmp_path)
    changed = (
        f"checkpoint-4 was written under other package versions (transformers 4.40.0 -> {versions['transformers']})"
    )
    assert changed in capsys.readouterr().err
    # another commit of an hfgen checkout, under the same version number (review 42 #5)
    assert tracking.read_json(state)["hfgen_commit"] == tracking.hfgen_commit()
    tracking.write_json(state, {**tracking.read_json(state), "packages": versions, "hfgen_commit": "0" * 40})
    tracking.check_resume_target("true", tmp_path)
    assert "other package versions (hfgen's commit 000000000000 -> " in capsys.readouterr().err


def test_a_trainer_run_resumed_with_a_key_written_out_at_its_default_trains_on(tmp_path):
    # the same run, but comparing the two recipes built TrainingArguments once the Trainer existed, which reset
    # accelerate's state under it: AttributeError "`AcceleratorState` object has no attribute `distributed_type`"
    # from the Trainer's first `prepare` (probe 42 A2)
    overrides = ["--max_train_samples", "32", "--max_eval_samples", "8", "--logging_steps", "1", "--save_steps", "1",
                 "--output_dir", tmp_path]  # fmt: skip
    assert run_hfgen_here("train", PRETRAIN, *overrides, "--max_steps", "1").returncode == 0
    more = ["--max_steps", "2", "--overwrite_output_dir", "true", "--resume_from_checkpoint", "true"]
    result = run_hfgen_here("train", PRETRAIN, *overrides, *more, "--max_grad_norm", "1.0")  # (its default)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["step"] for row in tracking.read_metrics(tmp_path) if "loss" in row] == [1, 2]


def test_a_bad_resume_target_is_refused_before_the_stage_loads_its_data(tmp_path, monkeypatch):
    # the stage resolved its resume only after loading its data and models (minutes on a real run) before saying so
    from hfgen.stages import pretrain

    monkeypatch.setattr(pretrain, "run", lambda *configs: pytest.fail("the stage ran before the resume was checked"))
    recipe = yaml.safe_load(PRETRAIN.read_text())
    other = fake_checkpoint(tmp_path / "other", {**recipe, "learning_rate": 0.03}, tracking.launch_identity())
    incomplete = fake_checkpoint(tmp_path / "killed", recipe, tracking.launch_identity())
    (incomplete / tracking.CHECKPOINT_STATE).unlink()
    for target, message in [
        (tmp_path / "no-such-checkpoint", "is not a directory"),
        (incomplete, "is an incomplete checkpoint"),
        (other, "learning_rate: 0.03 -> 0.003"),
    ]:
        run = ["--output_dir", tmp_path / "run", "--resume_from_checkpoint", target, "--overwrite_output_dir", "true"]
        result = run_hfgen_here("train", PRETRAIN, *run)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-3000:]


def test_a_resume_whose_base_data_or_chat_template_changed_in_place_is_refused(tmp_path, monkeypatch):
    # each resumed without a word on other inputs under the same paths (probe 39 C1, C2, C9): a LoRA run continued on
    # a base retrained in place (and its COMPLETE named the new base as the one it trained on), a data file
    # rewritten under its name trained other rows, an edited chat template the last steps
    short = ["--max_train_samples", "16", "--max_eval_samples", "4", "--logging_steps", "1", "--max_steps", "2",
             "--save_steps", "1", "--per_device_train_batch_size", "4", "--block_size", "8"]  # fmt: skip
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": f"the red cat number {i} is warm."}) + "\n" for i in range(40)))
    base, run = tmp_path / "base", tmp_path / "run"
    result = run_hfgen_here("train", PRETRAIN, *short, "--output_dir", base, "--dataset_name", data)
    assert result.returncode == 0, result.stderr[-3000:]
    on_base = ["--model_name_or_path", base, "--config_name", "null", "--tokenizer_name", "null", "--output_dir", run]
    result = run_hfgen_here("train", PRETRAIN, *short, *on_base, "--dataset_name", data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (run / tracking.INPUTS_RECORD).exists()  # a pipeline step's record (the runs it consumed) only
    resume = [*short, *on_base, "--resume_from_checkpoint", run / "checkpoint-1", "--overwrite_output_dir", "true"]

    def resumed(*extra):
        return run_hfgen_here("train", PRETRAIN, *resume, "--dataset_name", data, *extra)

    from hfgen.stages import pretrain

    monkeypatch.setattr(pretrain, "run", lambda *configs: None)  # past the check: the resume would train
    assert resumed().returncode == 0
    original = data.read_text()
    data.write_text(original.replace("red", "tan"))  # the same size and row count
    result = resumed()
    assert result.returncode == 2 and f"dataset_name '{data}' changed since" in result.stderr, result.stderr[-3000:]
    assert "restore those inputs, or start afresh" in result.stderr
    data.write_text(original)
    template = base / "chat_template.jinja"
    template.write_text("please: " + template.read_text())
    result = resumed()
    assert result.returncode == 2 and "its files chat_template.jinja" in result.stderr, result.stderr[-3000:]
    monkeypatch.undo()
    result = run_hfgen_here("train", PRETRAIN, *short, "--output_dir", base, "--dataset_name", data,
                            "--overwrite_output_dir", "true", "--seed", "7")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    result = resumed()
    assert result.returncode == 2 and f"model_name_or_path '{base}' now holds another run" in result.stderr


def test_a_resume_on_a_hub_id_whose_cached_snapshot_moved_is_refused(tmp_path, monkeypatch, hub_cache):
    # a run on `tinyorg/tiny-llama` from the local Hugging Face cache recorded nothing of it (hfgen_inputs.json {}):
    # after `hf download` fetched a new commit (refs/main moved), the resume trained its last steps on the other
    # weights, exit 0, COMPLETE, no word (probe 43 A1). The id is recorded as the snapshot commit it resolves to
    from tiny_models import save_tiny_llama

    first, second = "a" * 39 + "1", "b" * 39 + "2"
    hub_cache("tinyorg/tiny-llama", save_tiny_llama(tmp_path / "llama_b", seed=1), second)
    hub_cache("tinyorg/tiny-llama", save_tiny_llama(tmp_path / "llama_a"), first)  # refs/main: the first
    run = tmp_path / "run"
    short = ["--max_train_samples", "16", "--max_eval_samples", "4", "--logging_steps", "1", "--max_steps", "2",
             "--save_steps", "1", "--per_device_train_batch_size", "4", "--block_size", "8", "--config_name", "null",
             "--tokenizer_name", "null", "--model_name_or_path", "tinyorg/tiny-llama", "--output_dir", run]  # fmt: skip
    result = run_hfgen_here("train", PRETRAIN, *short)
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = tracking.read_json(run / tracking.RUN_INPUTS, {})["model_name_or_path"]
    assert recorded["hub"] == "tinyorg/tiny-llama" and recorded["commit"] == first
    from hfgen.stages import pretrain

    monkeypatch.setattr(pretrain, "run", lambda *configs: None)  # past the check: the resume would train
    resume = [*short, "--resume_from_checkpoint", run / "checkpoint-1", "--overwrite_output_dir", "true"]
    assert run_hfgen_here("train", PRETRAIN, *resume).returncode == 0  # the same snapshot: resumed
    refs = tmp_path / "hub" / "models--tinyorg--tiny-llama" / "refs" / "main"
    refs.write_text(second)  # a download of the repo's new commit
    result = run_hfgen_here("train", PRETRAIN, *resume)
    said = (
        f"model_name_or_path 'tinyorg/tiny-llama' changed since (the Hugging Face cache resolved it to the snapshot "
        f"{first}, now to {second}"
    )
    assert result.returncode == 2 and said in result.stderr, result.stderr[-3000:]
    assert "restore those inputs, or start afresh" in result.stderr


def test_a_resume_whose_local_input_is_gone_is_refused_even_where_its_name_is_now_a_hub_id(
    tmp_path, monkeypatch, hub_cache
):
    # a checkpoint recorded the folder ./tinyorg/tiny-llama; moved away, the same value named the cached hub model,
    # and the resume trained its last steps on it, exit 0, no word (probe 43 A6): an input recorded then that the
    # value no longer names was "nothing to compare"
    from hfgen import fingerprint
    from tiny_models import save_tiny_llama

    monkeypatch.chdir(tmp_path)
    save_tiny_llama(tmp_path / "tinyorg" / "tiny-llama", seed=1)
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a"}\n')
    values = {"model_name_or_path": "tinyorg/tiny-llama", "dataset_name": str(data)}
    checkpoint = fake_checkpoint(tmp_path / "run", {"stage": "sft"}, {"inputs": fingerprint.recipe_inputs(values)})
    tracking.check_same_inputs(checkpoint, fingerprint.recipe_inputs(values))
    (tmp_path / "tinyorg").rename(tmp_path / "moved")
    hub_cache("tinyorg/tiny-llama", save_tiny_llama(tmp_path / "llama_a"), "a" * 40)
    data.unlink()
    with pytest.raises(UserError) as refused:
        tracking.check_same_inputs(checkpoint, fingerprint.recipe_inputs(values))
    folder = tmp_path / "tinyorg" / "tiny-llama"
    assert f"dataset_name '{data}' is gone: its value no longer names that file or folder" in str(refused.value)
    said = f"model_name_or_path '{folder}' is gone: 'tinyorg/tiny-llama' now names the hub model in the Hugging Face"
    assert said in str(refused.value)


def test_a_resume_on_a_hub_dataset_of_which_datasets_cache_now_holds_a_newer_version_is_refused(
    tmp_path, datasets_hub_cache
):
    # offline, datasets reads a hub dataset from its own cache, the newest version an online load prepared there: after
    # a later online load (any project on the machine) added a newer one, the resume trained its last steps on the
    # other rows, exit 0, no word; nothing recorded which version the first steps read (probe 43 A7)
    from hfgen import fingerprint
    from hfgen.data.loading import load_raw

    rows = [{"prompt": f"what is {i}A?", "completion": f"it is {i} A."} for i in range(4)]
    datasets_hub_cache("tinyorg/qa", {"train": rows}, "1" * 40)
    values = {"dataset_name": "tinyorg/qa", "dataset_config": None}
    assert load_raw("tinyorg/qa", None)["train"][0]["completion"] == "it is 0 A."  # what the first steps trained on
    then = fingerprint.recipe_inputs(values)
    assert then["dataset_name"]["version"] == f"default/0.0.0/{'1' * 40}"
    checkpoint = fake_checkpoint(tmp_path / "run", {"stage": "sft"}, {"inputs": then})
    tracking.check_same_inputs(checkpoint, fingerprint.recipe_inputs(values))
    datasets_hub_cache("tinyorg/qa", {"train": [{**row, "completion": "B"} for row in rows]}, "2" * 40)
    assert load_raw("tinyorg/qa", None)["train"][0]["completion"] == "B"  # what the resume would train on
    with pytest.raises(UserError) as refused:
        tracking.check_same_inputs(checkpoint, fingerprint.recipe_inputs(values))
    said = f"dataset_name 'tinyorg/qa' changed since (datasets' cache held the version default/0.0.0/{'1' * 40} then"
    assert said in str(refused.value)


def test_a_reward_functions_module_edited_between_a_kill_and_the_resume_is_refused(tmp_path, monkeypatch):
    # `reward_functions: [myrewards:score]` edited between a kill and the resume: the resumed PPO steps trained on the
    # other reward, exit 0, COMPLETE, no word (probe 42 A5). hfgen's own functions change with hfgen, as its code does
    from hfgen import fingerprint

    monkeypatch.syspath_prepend(tmp_path)
    rewards, judge = tmp_path / "myrewards.py", tmp_path / "judge.py"
    for module in (rewards, judge):
        module.write_text("def score(prompts, responses):\n    return [len(r) / 10 for r in responses]\n")
    values = {"reward_functions": ["myrewards:score", "hfgen.data.embedded:hackable_reward_scores"],
              "oracle_function": f"{judge}:score"}  # fmt: skip
    then = fingerprint.recipe_inputs(values, tracking.shapes_training)
    checkpoint = fake_checkpoint(tmp_path / "run", {"stage": "ppo"}, {"inputs": then})
    tracking.check_same_inputs(checkpoint, fingerprint.recipe_inputs(values, tracking.shapes_training))
    for module in (rewards, judge):
        module.write_text(module.read_text().replace("len(r)", "-len(r)"))
    with pytest.raises(UserError) as refused:
        tracking.check_same_inputs(checkpoint, fingerprint.recipe_inputs(values, tracking.shapes_training))
    changed = f"oracle_function '{judge}' changed since (its content); reward_functions '{rewards}' changed since"
    assert changed in str(refused.value)


def test_a_model_config_file_edited_between_a_kill_and_the_resume_is_refused(tmp_path):
    # vae/t2i/t2i_flow's vae_config, unet_config, ... (and deepspeed) were not fingerprinted: a vae_config edited
    # between a kill and the resume (act_fn silu -> gelu) trained the resumed steps on another model, exit 0,
    # COMPLETE, its config.json saying the new one (probe 42 I1). An inline mapping or None names no file
    from hfgen import fingerprint

    vae, deepspeed = tmp_path / "vae.json", tmp_path / "ds.json"
    vae.write_text(json.dumps({"act_fn": "silu", "latent_channels": 4}))
    deepspeed.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    values = {"stage": "vae", "vae_config": str(vae), "unet_config": {"sample_size": 8, "act_fn": "silu"},
              "scheduler_config": None, "deepspeed": str(deepspeed)}  # fmt: skip
    then = fingerprint.recipe_inputs(values, tracking.shapes_training)
    assert set(then) == {"vae_config", "deepspeed"}
    checkpoint = fake_checkpoint(tmp_path / "run", {"stage": "vae"}, {"inputs": then})
    tracking.check_same_inputs(checkpoint, fingerprint.recipe_inputs(values, tracking.shapes_training))
    vae.write_text(json.dumps({"act_fn": "gelu", "latent_channels": 4}))
    deepspeed.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(UserError) as refused:
        tracking.check_same_inputs(checkpoint, fingerprint.recipe_inputs(values, tracking.shapes_training))
    assert f"deepspeed '{deepspeed}' changed since (its content); vae_config '{vae}' changed since" in str(
        refused.value
    )


def test_an_input_folder_is_read_whole_up_to_its_budget_then_known_by_its_files_status(tmp_path, monkeypatch):
    # a folder of a million images was read through at every run's start
    import os

    from hfgen import fingerprint

    monkeypatch.setattr(fingerprint, "FOLDER_HASH_BYTES", 10)
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("123456")
    before = fingerprint.path_fingerprint(str(tmp_path))
    assert not before["files"]["a.txt"].startswith("stat:") and before["files"]["b.txt"].startswith("stat:")
    stat = (tmp_path / "a.txt").stat()
    (tmp_path / "a.txt").write_text("654321")  # the same size and time: its content tells
    os.utime(tmp_path / "a.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint.changes({"k": before}, {"k": fingerprint.path_fingerprint(str(tmp_path))}) == [
        f"k '{tmp_path}' changed since (its files a.txt)"
    ]


def test_a_linked_sub_folder_is_part_of_its_input_folder_and_a_removed_file_is_named(tmp_path):
    # a data folder whose train/ links to a shared disk was fingerprinted without train/'s files, so rewriting them
    # went unnoticed; a link back up must not walk forever; a file removed between the listing and its reading (a
    # folder being written to as a run starts) ended the start in a raw FileNotFoundError
    from hfgen import fingerprint

    shared, data = tmp_path / "shared", tmp_path / "data"
    shared.mkdir()
    data.mkdir()
    (shared / "rows.jsonl").write_text('{"text": "a"}\n')
    (data / "train").symlink_to(shared, target_is_directory=True)
    (shared / "up").symlink_to(data, target_is_directory=True)
    before = fingerprint.path_fingerprint(str(data))
    assert sorted(before["files"]) == ["train/rows.jsonl"]
    (shared / "rows.jsonl").write_text('{"text": "b"}\n')
    assert fingerprint.changes({"k": before}, {"k": fingerprint.path_fingerprint(str(data))}) == [
        f"k '{data}' changed since (its files train/rows.jsonl)"
    ]
    listed = fingerprint.folder_files(data, run=False)
    (shared / "rows.jsonl").unlink()
    assert fingerprint.files_fingerprints(listed, data) == {"train/rows.jsonl": "missing"}


def test_what_hfgen_writes_into_an_input_folder_is_no_part_of_it(tmp_path):
    # `hfgen eval` of a downloaded base (eval.json, eval_samples.jsonl) or `hfgen generate` into it (generated/...)
    # made every run on that base refuse its resume, and sweep, compare and rlhf retrain it (review 39 F1)
    from hfgen import fingerprint

    base = tmp_path / "base"
    base.mkdir()
    for name, text in (("config.json", "{}"), ("model.safetensors", "weights"), ("tokenizer.json", "{}")):
        (base / name).write_text(text)
    before = fingerprint.path_fingerprint(str(base))
    assert sorted(before["files"]) == ["config.json", "model.safetensors", "tokenizer.json"]
    (base / "eval.json").write_text("{}")
    (base / "eval_samples.jsonl").write_text("{}\n")
    (base / "README.md").write_text("notes")
    (base / "generated").mkdir()
    (base / "generated" / "00-a-cat-0.png").write_bytes(b"png")
    (base / "generated" / "hfgen_images.json").write_text('{"images": ["00-a-cat-0.png"]}')
    (base / "merged").mkdir()
    (base / "merged" / "merged_from.json").write_text("{}")
    (base / "merged" / "model.safetensors").write_text("other weights")
    assert fingerprint.path_fingerprint(str(base)) == before
    (base / "model.safetensors").write_text("WEIGHTS")  # the model itself still counts
    assert fingerprint.changes({"k": before}, {"k": fingerprint.path_fingerprint(str(base))}) == [
        f"k '{base}' changed since (its files model.safetensors)"
    ]


def test_a_large_input_is_known_by_its_size_and_time_and_a_moved_project_is_the_same(tmp_path, monkeypatch):
    # a large file was known by its inode and ctime too: a copy moved back, a chmod or a staged copy on node-local
    # scratch refused every resume; and a project moved (relative paths) was 'changed' by its resolved path
    # (review 39 F2)
    import os
    import shutil

    from hfgen import fingerprint

    monkeypatch.setattr(fingerprint, "FULL_HASH_BYTES", 4)
    big = tmp_path / "big.bin"
    big.write_bytes(b"0123456789")
    before = fingerprint.path_fingerprint(str(big))
    shutil.copy2(big, tmp_path / "big.tmp")  # the same bytes and time, another inode
    os.replace(tmp_path / "big.tmp", big)
    big.chmod(0o600)
    assert fingerprint.path_fingerprint(str(big)) == before
    moved = dict(before, path=str(tmp_path / "elsewhere" / "big.bin"))
    assert fingerprint.changes({"k": before}, {"k": moved}) == []
    assert fingerprint.changes({"k": [before]}, {"k": [moved]}) == []


def test_a_runs_own_output_dir_inside_an_input_folder_is_no_part_of_it(tmp_path):
    # a run saved inside its base's folder (output_dir BASE/ft) counted its own records as the base's changes, and
    # never resumed; class images generated inside the instance images' folder the same (review 39 F3)
    from hfgen import fingerprint

    base, images = tmp_path / "base", tmp_path / "dog"
    (base / "ft").mkdir(parents=True)
    (images / "class_imgs").mkdir(parents=True)
    (base / "config.json").write_text("{}")
    (images / "a.png").write_bytes(b"dog")
    values = {"model_name_or_path": str(base), "output_dir": str(base / "ft"), "instance_data_dir": str(images),
              "class_data_dir": str(images / "class_imgs")}  # fmt: skip
    before = fingerprint.recipe_inputs(values)
    (base / "ft" / "config.json").write_text('{"trained": 1}')
    (base / "ft" / "adapter_model.safetensors").write_text("adapter")
    (images / "class_imgs" / "00000-a-dog.png").write_bytes(b"a dog")
    assert fingerprint.changes(before, fingerprint.recipe_inputs(values)) == []


def test_a_save_only_model_checkpoint_is_not_resumed(tmp_path):
    # its checkpoints hold no optimizer, scheduler or RNG state: resumed silently with fresh ones, exit 0, other weights
    short = ["--max_train_samples", "32", "--max_eval_samples", "8", "--logging_steps", "1", "--save_steps", "1",
             "--save_only_model", "true", "--output_dir", tmp_path]  # fmt: skip
    assert run_hfgen_here("train", PRETRAIN, *short, "--max_steps", "1").returncode == 0
    rows = tracking.read_metrics(tmp_path)
    more = ["--max_steps", "2", "--overwrite_output_dir", "true", "--resume_from_checkpoint", "true"]
    result = run_hfgen_here("train", PRETRAIN, *short, *more)  # a complete run given one step more
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"checkpoint '{tmp_path / 'checkpoint-1'}' was written with save_only_model: true" in result.stderr
    assert tracking.read_metrics(tmp_path) == rows


def test_a_resume_from_an_earlier_hfgens_checkpoint_between_two_rows_says_its_first_row_is_short(tmp_path):
    # checkpoints of an hfgen before the loss since the last row travelled with them (92a0009) hold none: resumed
    # between two logged rows, the first row averaged only the steps since the checkpoint, nothing said (probe 40 D4)
    short = ["--max_train_samples", "32", "--max_eval_samples", "8", "--logging_steps", "2", "--max_steps", "4",
             "--save_steps", "3"]  # fmt: skip
    assert run_hfgen_here("train", PRETRAIN, *short, "--output_dir", tmp_path / "full").returncode == 0
    note = "keeps no loss of steps 3-3: the first logged row after the resume (step 4) averages only steps 4-4"
    for earlier in (False, True):
        run = tmp_path / f"earlier{earlier}"
        shutil.copytree(tmp_path / "full" / "checkpoint-3", run / "checkpoint-3")
        state = tracking.read_json(run / "checkpoint-3" / tracking.CHECKPOINT_STATE)
        if earlier:
            del state[tracking.LOSS_WINDOW]
        (run / "checkpoint-3" / tracking.CHECKPOINT_STATE).write_text(json.dumps(state))
        result = run_hfgen_here("train", PRETRAIN, *short, "--output_dir", run, "--resume_from_checkpoint", "true")
        assert result.returncode == 0, result.stderr[-3000:]
        assert (note in result.stderr) == earlier, result.stderr[-3000:]


def test_runs_resumed_one_after_another_from_the_same_checkpoint_path_take_each_its_own_loss_window(tmp_path):
    # the loss window a checkpoint keeps was read once per process and cached by its path: a later run resumed
    # from a new checkpoint at the same path (a notebook's second run into the dir) logged its first row and
    # train_loss with the first checkpoint's losses (probe 43 B2)
    short = ["--max_train_samples", "32", "--max_eval_samples", "8", "--logging_steps", "2", "--max_steps", "4",
             "--save_steps", "3"]  # fmt: skip
    run = tmp_path / "run"
    for learning_rate in ("1e-3", "3e-3"):
        full = tmp_path / f"full-{learning_rate}"
        first = run_hfgen_here("train", PRETRAIN, *short, "--learning_rate", learning_rate, "--output_dir", full)
        assert first.returncode == 0, first.stderr[-3000:]
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(full / "checkpoint-3", run / "checkpoint-3")
        result = run_hfgen_here("train", PRETRAIN, *short, "--learning_rate", learning_rate, "--output_dir", run,
                                "--resume_from_checkpoint", "true")  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        row = next(row for row in tracking.read_metrics(run) if row.get("step") == 4 and "loss" in row)
        expected = next(row for row in tracking.read_metrics(full) if row.get("step") == 4 and "loss" in row)
        assert row["loss"] == expected["loss"], learning_rate
        assert closing_train_loss(run) == closing_train_loss(full), learning_rate


@pytest.mark.parametrize(
    ("stage", "figures"),
    [("sft_full", ("loss", "entropy", "mean_token_accuracy", "num_tokens")),
     ("orpo", ("loss", "nll_loss", "rewards/margins", "logps/chosen"))],
)  # fmt: skip
def test_a_run_resumed_between_two_rows_logs_trls_figures_as_the_uninterrupted_run(tiny_lm, tmp_path, stage, figures):
    # TRL's figures beside the loss (averaged over the steps since the last row) and SFT's token count were not in
    # the checkpoint: resumed from checkpoint-4 (rows every 3 steps), the step-6 row averaged steps 5-6 only and
    # num_tokens stayed short by step 4's tokens for the rest of the run (probe 43 B4); ORPO and SimPO keep theirs
    # elsewhere (_stored_metrics: probe 43 I2)
    short = ["--model_name_or_path", str(tiny_lm), "--max_train_samples", "48", "--max_eval_samples", "8",
             "--per_device_train_batch_size", "8", "--max_steps", "6", "--save_strategy", "steps", "--save_steps",
             "4", "--logging_steps", "3"]  # fmt: skip
    short += ["--num_samples", "0"] if stage == "sft_full" else ["--eval_samples_per_prompt", "0"]
    recipe = REPO / f"recipes/tiny/{stage}.yaml"
    full = run_hfgen_here("train", recipe, *short, "--output_dir", tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    shutil.copytree(tmp_path / "full" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    resumed = run_hfgen_here("train", recipe, *short, "--output_dir", tmp_path / "resumed", "--resume_from_checkpoint",
                             "true")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def step_6(run):
        row = next(row for row in tracking.read_metrics(tmp_path / run) if row.get("step") == 6 and "loss" in row)
        return {key: row[key] for key in figures}

    assert step_6("resumed") == pytest.approx(step_6("full"), rel=1e-6)


SHORT_PRETRAIN = ["--max_train_samples", "32", "--max_eval_samples", "8", "--logging_steps", "2", "--max_steps", "4",
                  "--save_steps", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def short_pretrain(tmp_path_factory):
    reference = tmp_path_factory.mktemp("short_pretrain")
    result = train(PRETRAIN, reference, SHORT_PRETRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    return reference


def closing_train_loss(run_dir) -> float:
    return next(row["train_loss"] for row in tracking.read_metrics(run_dir) if "train_loss" in row)


@pytest.mark.slow
def test_a_signal_checkpoint_between_logged_steps_resumes_to_the_uninterrupted_runs_rows(short_pretrain, tmp_path):
    # the signal picks the step (3, logging_steps 2): the resumed run's step-4 row averaged step 4 alone, and the
    # closing row's train_loss (after any resume) covered only the steps since the resume; then it left step 3 out
    # once checkpoint-3 was rotated away (save_total_limit 1) before the run ended
    overrides = [*SHORT_PRETRAIN, "--save_on_signal", "true", "--save_total_limit", "1"]
    result = train(PRETRAIN, tmp_path, overrides, kill_at="step@3:INT")
    assert result.returncode == 128 + signal.SIGINT, result.stderr[-3000:]
    assert [p.name for p in tracking.complete_checkpoints(tmp_path)] == ["checkpoint-3"]
    result = train(PRETRAIN, tmp_path, overrides, resume=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(short_pretrain, tmp_path)  # the loss rows included
    assert closing_train_loss(tmp_path) == pytest.approx(closing_train_loss(short_pretrain), rel=1e-6)


@pytest.mark.slow
def test_a_resume_from_another_dirs_checkpoint_starts_with_that_runs_rows(short_pretrain, tmp_path):
    # the new dir's metrics.jsonl held only the rows after the checkpoint
    resume = ["--resume_from_checkpoint", short_pretrain / "checkpoint-2", "--output_dir", tmp_path]
    result = run_hfgen_here("train", PRETRAIN, *SHORT_PRETRAIN, *resume)
    assert result.returncode == 0, result.stderr[-3000:]
    assert stable_rows(tmp_path) == stable_rows(short_pretrain)
    assert closing_train_loss(tmp_path) == pytest.approx(closing_train_loss(short_pretrain), rel=1e-6)


GROUPED_BY_LENGTH = ["--max_train_samples", "60", "--max_eval_samples", "8", "--max_steps", "6", "--save_steps", "2",
                     "--logging_steps", "1", "--warmup_steps", "0", "--train_sampling_strategy", "group_by_length"]  # fmt: skip


def test_group_by_length_resumed_inside_a_later_epoch_trains_the_uninterrupted_runs_order(tmp_path):
    # transformers' LengthGroupedSampler drew each epoch's order from the global RNG as the epoch began: resumed from
    # checkpoint-4 (3 steps an epoch: one step into the second), the run drew that epoch's order right after its
    # start and skipped the first batch of another order; other weights and losses, exit 0 (probe 43 D2)
    overrides = [*GROUPED_BY_LENGTH, "--per_device_train_batch_size", "8"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert run_hfgen_here("train", PRETRAIN, *overrides, "--output_dir", reference).returncode == 0
    assert [row["epoch"] for row in tracking.read_metrics(reference) if "loss" in row][3] == pytest.approx(4 / 3)
    resume = ["--resume_from_checkpoint", reference / "checkpoint-4", "--output_dir", resumed]
    result = run_hfgen_here("train", PRETRAIN, *overrides, *resume)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(reference, resumed)


@pytest.mark.slow
def test_group_by_length_on_two_processes_resumed_inside_a_later_epoch_trains_the_uninterrupted_runs_order(
    tmp_path, free_port, monkeypatch
):
    # the resumed epoch's skipping loader on several processes does not pass the Trainer's set_epoch on to the
    # sampler: without the epoch set from the checkpoint it drew epoch 0's order again (steps 5, 6 differed)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    overrides = [*GROUPED_BY_LENGTH, "--per_device_train_batch_size", "4", "--num_processes", "2",
                 "--main_process_port", str(free_port)]  # fmt: skip
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert train(PRETRAIN, reference, overrides).returncode == 0
    resume = [*overrides, "--resume_from_checkpoint", reference / "checkpoint-4"]
    result = train(PRETRAIN, resumed, resume)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(reference, resumed)


@pytest.mark.slow
def test_a_resumed_runs_tracker_gets_the_run_wide_closing_train_loss(short_pretrain, tmp_path):
    # metrics.jsonl's closing train_loss was made run-wide after the report_to callbacks had run: TensorBoard's
    # train/train_loss was the mean over the steps since the resume (5.1678 against the run's 6.0110)
    resume = ["--resume_from_checkpoint", short_pretrain / "checkpoint-2", "--output_dir", tmp_path]
    result = run_hfgen_here("train", PRETRAIN, *SHORT_PRETRAIN, *resume, "--report_to", "tensorboard")
    assert result.returncode == 0, result.stderr[-3000:]
    [(step, figure)] = tensorboard_scalars(tmp_path / "runs")["train/train_loss"]
    assert step == 4 and figure == pytest.approx(closing_train_loss(short_pretrain), rel=1e-6)


@pytest.mark.slow
def test_a_resumed_run_with_eval_on_start_does_not_evaluate_again_at_the_resumed_step(tmp_path):
    # transformers evaluates at the start of each train() call: the resumed run had an eval_loss row at step 2
    overrides = [*SHORT_PRETRAIN, "--eval_on_start", "true", "--eval_strategy", "steps", "--eval_steps", "3"]
    result = train(PRETRAIN, tmp_path / "reference", overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    resume = ["--resume_from_checkpoint", tmp_path / "reference/checkpoint-2", "--output_dir", tmp_path / "resumed"]
    result = run_hfgen_here("train", PRETRAIN, *overrides, *resume)
    assert result.returncode == 0, result.stderr[-3000:]
    assert stable_rows(tmp_path / "resumed") == stable_rows(tmp_path / "reference")


def test_a_run_dir_given_as_the_checkpoint_is_named_a_run_dir(tmp_path):
    # it was called "an incomplete checkpoint (no hfgen_state.json: the run stopped while writing it ...)"
    run = tmp_path / "run"
    fake_checkpoint(run, yaml.safe_load(PRETRAIN.read_text()), tracking.launch_identity())
    (run / "recipe.yaml").write_text(PRETRAIN.read_text())
    with pytest.raises(UserError, match=r"'.*/run' is a run dir, not a checkpoint.*\(it holds: checkpoint-4\)"):
        tracking.resolve_resume(str(run), tmp_path / "new")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device whose writes find the disk full")
def test_a_full_disk_while_a_checkpoint_copies_the_recipe_names_the_copy_not_the_recipe(tmp_path):
    # shutil.copyfile's error names its source first: the message named the run's recipe.yaml, which was only read
    from hfgen.errors import disk_full_exits_2

    (tmp_path / "recipe.yaml").write_text(PRETRAIN.read_text())
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "recipe.yaml.tmp").symlink_to("/dev/full")  # its write finds the disk full
    with pytest.raises(UserError, match=r"the disk is full: writing under '.*checkpoint-4/recipe.yaml' failed"):
        with disk_full_exits_2(tmp_path):
            tracking.finish_checkpoint(tmp_path, tmp_path / "checkpoint-4", 4, None)
    assert not tracking.complete_checkpoints(tmp_path) and not (tmp_path / "checkpoint-4" / "recipe.yaml").exists()


DIES_DELETING = """
import os, signal, sys
from pathlib import Path
from hfgen import tracking

unlink, deleted = os.unlink, []
def dying_unlink(*args, **kwargs):  # a preemption half way through deleting a dir
    unlink(*args, **kwargs)
    deleted.append(args[0])
    if len(deleted) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
os.unlink = dying_unlink
output_dir = Path(sys.argv[1])
if sys.argv[2] == "rotate":
    tracking.finish_checkpoint(output_dir, output_dir / "checkpoint-8", 8, 1)
else:
    tracking.clear_previous_run(output_dir)
"""


def test_a_kill_while_old_checkpoints_or_an_old_run_are_deleted_leaves_nothing_that_looks_complete(tmp_path):
    # rotation's rmtree, killed half way, left a checkpoint-4 with its state files but no optimizer, scheduler or
    # RNG state, from which a resume continued silently (other weights, learning rate 0)
    import subprocess
    import sys

    recipe = yaml.safe_load(PRETRAIN.read_text())
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    for step in (4, 8):
        checkpoint = fake_checkpoint(tmp_path, recipe, tracking.launch_identity(), step=step)
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "model.safetensors"):
            (checkpoint / name).write_text("x")
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 12}))
    (tmp_path / "checkpoint-8" / tracking.CHECKPOINT_STATE).unlink()  # being written: finish_checkpoint marks it

    def killed_deleting(what):
        run = subprocess.run([sys.executable, "-c", DIES_DELETING, str(tmp_path), what], capture_output=True, text=True)
        assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]

    killed_deleting("rotate")
    assert [p.name for p in tracking.checkpoints(tmp_path)] == ["checkpoint-8"]
    assert tracking.resolve_resume("true", tmp_path) == tmp_path / "checkpoint-8"
    tracking.write_run_records(tmp_path, yaml.safe_dump(recipe), resuming=True)  # a resume removes the leftover
    tracking.unlock_output_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".deleting")) == []
    tracking.mark_complete(tmp_path)
    killed_deleting("clear")  # a fresh start over the complete run, killed while clearing it
    assert not tracking.is_complete(tmp_path) and not tracking.complete_checkpoints(tmp_path)


def test_the_steps_the_divergence_guard_skipped_travel_with_the_checkpoint(tmp_path):
    # nan_tolerance counted afresh after every resume: a run killed after a skipped step could skip it again
    from hfgen import guard

    guard.configure(nan_tolerance=2)
    guard.skipped_steps.add(3)
    (tmp_path / "checkpoint-4").mkdir()
    tracking.finish_checkpoint(tmp_path, tmp_path / "checkpoint-4", 4, None)
    guard.configure(nan_tolerance=2)  # the resumed process starts with none
    assert tracking.resolve_resume("true", tmp_path) == tmp_path / "checkpoint-4"
    assert guard.skipped_steps == {3}
    guard.configure()


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler for the test (KeyboardInterrupt): a background job, as `make test` starts one of
    its two processes, starts with SIGINT ignored, and a process started from it inherits that."""
    original = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, original)


def test_a_run_without_save_on_signal_after_one_with_it_stops_on_the_signal_at_once(python_sigint):
    """An rlhf pipeline (or a sweep) whose earlier step had save_on_signal kept hfgen's handler for the later steps
    without it: their Ctrl-C was held until a periodic checkpoint, or ignored to the end of the step (probe 41 C1)."""
    from hfgen import guard

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    guard.configure(save_on_signal=True)
    assert signal.getsignal(signal.SIGINT) is guard._note_signal
    guard.configure(save_on_signal=True)  # twice in a row: what it replaced first is still what comes back
    guard.configure()  # the next step, without it
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)  # the default handler again: the run stops here
    assert guard.received_signal() is None


def test_ctrl_c_ends_a_command_with_one_line_and_130_as_sigterm_ends_it_quietly(tmp_path, python_sigint):
    """Ctrl-C in `hfgen eval` (generate, merge, train without save_on_signal) printed a raw KeyboardInterrupt
    traceback of whatever line it landed on, while SIGTERM ended the same commands quietly with 143 (probe 42 D9).
    The SIGINT lands here in the user's oracle file, which eval loads at its check."""
    import subprocess
    import sys
    import time

    from tiny_models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "model")
    ready = tmp_path / "ready"
    oracle = tmp_path / "slow_oracle.py"
    oracle.write_text(
        f"import pathlib, time\npathlib.Path({str(ready)!r}).write_text('')\ntime.sleep(120)\n\n\n"
        "def score(prompts, responses):\n    return [0.0] * len(responses)\n"
    )
    command = [
        sys.executable,
        "-m",
        "hfgen.cli",
        "eval",
        model,
        "--oracle",
        f"{oracle}:score",
        "--output",
        tmp_path / "e.json",
    ]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.1)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "hfgen: interrupted" and "Traceback" not in stderr, stderr[-3000:]
    assert stdout == "" and not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL", "SIGINT"])
def test_a_child_run_hears_its_parents_signal_and_never_outlives_it(tmp_path, stop, python_sigint):
    """compare's training runs and sweep's evaluations ran under subprocess.run: a SIGTERM to `hfgen compare` left
    the training running as an orphan (holding its GPU and its dir's lock), and a Ctrl-C SIGKILLed it before its
    save_on_signal checkpoint (probe 41 C7). The signal is passed on and waited for; a killed parent's child gets
    SIGTERM."""
    import subprocess
    import sys
    import time

    child = tmp_path / "child.py"
    child.write_text(
        "import signal, sys, time, pathlib\n"
        f"folder = pathlib.Path({str(tmp_path)!r})\n"
        "def stop(signum, frame):\n"
        "    (folder / 'hearing').write_text(str(signum))\n"
        "    (folder / 'hearing').rename(folder / 'heard')  # whole when seen (a test read it empty once)\n"
        "    sys.exit(128 + signum)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "(folder / 'ready').write_text('')\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys; from hfgen import guard; sys.exit(guard.run_child([sys.executable, {str(child)!r}]))",
        ]
    )
    deadline = time.time() + 60
    while not (tmp_path / "ready").exists() and time.time() < deadline:
        time.sleep(0.1)
    parent.send_signal(getattr(signal, stop))
    code = parent.wait(timeout=60)
    if stop == "SIGINT":  # a child that dies of it (an `hfgen eval`): the caller is told, and stops (review 41 F2)
        assert code == 128 + signal.SIGINT
        ignoring = subprocess.run(  # ... unless this process ignores SIGINT (a background job): then so does the child
            [sys.executable, "-c", "import os, signal, sys; from hfgen import guard; signal.signal(signal.SIGINT, "
             "signal.SIG_IGN); sys.exit(guard.run_child([sys.executable, '-c', 'import os, signal, time; "
             "os.kill(os.getppid(), signal.SIGINT); time.sleep(1)']))"]
        )  # fmt: skip
        assert ignoring.returncode == 0
        return
    while not (tmp_path / "heard").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "heard").read_text() == str(int(signal.SIGTERM))
    if stop == "SIGTERM":
        assert code == 128 + signal.SIGTERM  # the child's own exit, passed on


def test_a_launched_process_stops_when_its_launcher_is_killed(tmp_path, monkeypatch):
    """`hfgen train --num_processes 2` SIGKILLed: torch elastic starts each rank in a session of its own, and both
    ranks trained on to the end as orphans, COMPLETE, holding the dir's lock (probe 41 I1). A launched process asks
    for SIGTERM when its launcher dies (guard.stop_with_launcher, called by hfgen.train's entry)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from hfgen import guard, train

    rank = tmp_path / "rank.py"
    rank.write_text(
        "import signal, sys, time, pathlib\n"
        "from hfgen import guard\n"
        f"folder = pathlib.Path({str(tmp_path)!r})\n"
        "def stop(signum, frame):\n"
        "    (folder / 'hearing').write_text(str(signum))\n"
        "    (folder / 'hearing').rename(folder / 'heard')  # whole when seen (a test read it empty once)\n"
        "    sys.exit(128 + signum)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "guard.stop_with_launcher()\n"
        "(folder / 'ready').write_text('')\n"
        "time.sleep(60)\n"
    )
    launcher = subprocess.Popen(  # as torch elastic starts a rank: a session of its own
        [sys.executable, "-c", f"import subprocess, sys, time; subprocess.Popen([sys.executable, {str(rank)!r}], "
         "start_new_session=True); time.sleep(60)"]
    )  # fmt: skip
    deadline = time.time() + 60
    while not (tmp_path / "ready").exists() and time.time() < deadline:
        time.sleep(0.1)
    launcher.kill()
    launcher.wait()
    while not (tmp_path / "heard").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "heard").read_text() == str(int(signal.SIGTERM))
    # the launcher hfgen names (`hfgen train --num_processes`) already gone: stopped at once; a launcher that is the
    # process's parent, pid 1 included (a container's entrypoint), is alive: it runs on (review 41 F1)
    check = "import os, signal; from hfgen import guard; guard.stop_with_launcher(); print('running')"
    for launcher, runs in ((f"{socket.gethostname()}:{os.getpid() + 10**6}", False), (guard.launcher_identity(), True)):
        started = subprocess.run([sys.executable, "-c", check], env={**os.environ, guard.LAUNCHER_PID: launcher},
                                 capture_output=True, text=True)  # fmt: skip
        assert (started.returncode, "running" in started.stdout) == ((0, True) if runs else (-signal.SIGTERM, False))
    in_a_container = subprocess.run(["unshare", "-pf", "--mount-proc", "sh", "-c", f"{sys.executable} -c \"{check}\""],
                                    env={**os.environ, "LOCAL_RANK": "0"}, capture_output=True, text=True)  # fmt: skip
    if "Operation not permitted" not in in_a_container.stderr and in_a_container.returncode != 127:
        assert "running" in in_a_container.stdout, in_a_container.stderr  # (its parent, sh, is pid 1 there)
    asked = []
    monkeypatch.setattr(guard, "stop_with_launcher", lambda: asked.append(True))
    monkeypatch.setenv("LOCAL_RANK", "0")
    train.cli([str(PRETRAIN), "--list-keys"])  # hfgen.train's entry in a launched process asks for it
    assert asked == [True]


def test_a_second_run_into_a_dir_in_use_exits_2(tmp_path):
    # two runs into one dir interleaved their metrics rows, checkpoints and weights, both ending "COMPLETE"
    import subprocess
    import sys

    tracking.lock_output_dir(tmp_path)
    other = subprocess.run(
        [sys.executable, "-c", "import sys; from hfgen import tracking; from pathlib import Path; "
                               "tracking.lock_output_dir(Path(sys.argv[1]))", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert other.returncode != 0 and "is in use by another running hfgen process (pid" in other.stderr


def test_a_run_refused_while_writing_its_records_leaves_the_dir_unlocked(tmp_path):
    # refused for an unfinished run's checkpoints after taking the lock, the dir stayed locked by the caller's
    # process (a notebook): the remedy, --resume_from_checkpoint true from a shell, was refused "in use by another
    # running hfgen process" while nothing ran (probe 43 B5)
    import subprocess
    import sys

    (tmp_path / "recipe.yaml").write_text(PRETRAIN.read_text())
    tracking.write_json(tmp_path / "env.json", {})
    (tmp_path / "checkpoint-4").mkdir()
    tracking.finish_checkpoint(tmp_path, tmp_path / "checkpoint-4", 4, None)
    with pytest.raises(UserError, match="holds an unfinished run with complete checkpoints"):
        tracking.write_run_records(tmp_path, PRETRAIN.read_text())
    other = subprocess.run(
        [sys.executable, "-c", "import sys; from hfgen import tracking; from pathlib import Path; "
                               "tracking.lock_output_dir(Path(sys.argv[1]))", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert other.returncode == 0, other.stderr


def test_an_output_dir_on_a_disk_without_file_locks_is_not_blamed_on_another_run(tmp_path, monkeypatch):
    """flock() on a mount without lock support (Lustre without -o flock, some NFS/FUSE/SMB) fails with ENOSYS or
    EOPNOTSUPP: it was refused as 'in use by another running hfgen process (pid unknown); wait for it to end', which
    never ends (probe 41 I9). The simulated mount's failure, as such a file system returns it."""
    import errno
    import fcntl

    def unsupported(handle, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", unsupported)
    with pytest.raises(UserError) as error:
        tracking.lock_output_dir(tmp_path)
    assert "does not support file locks (flock: Function not implemented" in str(error.value)
    assert "in use by another" not in str(error.value)


@pytest.mark.slow
def test_a_fresh_start_over_an_unfinished_run_is_refused_and_overwrite_clears_its_checkpoints(pretrain_runs, tmp_path):
    # the new run's rotation deleted its own checkpoints and kept the old run's newer one, which a resume then
    # continued: a run of two recipes
    shutil.copytree(pretrain_runs[0] / "checkpoint-8", tmp_path / "checkpoint-12")
    (tmp_path / "checkpoint-12" / tracking.CHECKPOINT_STATE).write_text(json.dumps({"step": 12}))
    shutil.copy(pretrain_runs[0] / "recipe.yaml", tmp_path / "recipe.yaml")
    refused = train(PRETRAIN, tmp_path, PRETRAIN_ARGS)
    assert refused.returncode == 2 and "holds an unfinished run with complete checkpoints (checkpoint-12)" in (
        refused.stderr
    )
    result = train(PRETRAIN, tmp_path, [*PRETRAIN_ARGS, "--overwrite_output_dir", "true"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in tracking.checkpoints(tmp_path)] == ["checkpoint-8"]
    assert_same_run(pretrain_runs[0], tmp_path)


@pytest.mark.slow
def test_a_complete_trainer_run_given_more_steps_continues_from_its_last_checkpoint(pretrain_runs, tmp_path):
    # it printed "checkpoint-8 is the last step's; starting again" and trained every step again
    shutil.copytree(pretrain_runs[0], tmp_path, dirs_exist_ok=True)
    more = [*PRETRAIN_ARGS, "--max_steps", "10", "--overwrite_output_dir", "true"]
    result = train(PRETRAIN, tmp_path, more, kill_at="step@3", resume=True)  # a run trained again dies at step 3
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting again" not in result.stderr
    steps = [row["step"] for row in tracking.read_metrics(tmp_path) if "loss" in row]
    assert steps == [2, 4, 6, 8, 10]


def test_a_complete_run_of_part_of_an_epoch_given_more_epochs_trains_them(tmp_path):
    # 0.5 -> 1 epoch (4 steps an epoch): trainer_state.json keeps transformers' ceil(num_train_epochs), 1, which read
    # as 'trained to the end' of 1 epoch: the run 'finished' from checkpoint-2, COMPLETE with half the epoch trained
    overrides = ["--max_train_samples", "200", "--max_eval_samples", "8", "--max_steps", "-1", "--warmup_steps", "0",
                 "--logging_steps", "1", "--save_steps", "1", "--save_total_limit", "1"]  # fmt: skip
    assert train(PRETRAIN, tmp_path, [*overrides, "--num_train_epochs", "0.5"]).returncode == 0
    longer = [*overrides, "--num_train_epochs", "1", "--overwrite_output_dir", "true"]
    result = train(PRETRAIN, tmp_path, longer, resume=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finishing the run from it" not in result.stderr
    assert [row["step"] for row in tracking.read_metrics(tmp_path) if "loss" in row] == [1, 2, 3, 4]


def test_a_resume_that_would_end_the_run_before_its_checkpoints_step_is_refused(tmp_path):
    # "checkpoint-3 is the last step's; finishing the run from it": exit 0, COMPLETE, recipe.yaml saying 2 steps
    # over a model trained 3 under the longer run's schedule (probe 42 A1). max_steps is refused at the start, before
    # the run's records are rewritten (the complete run stays as it was: review 42 #7); a count of epochs once the
    # data says how many steps it is
    overrides = ["--max_train_samples", "200", "--max_eval_samples", "8", "--warmup_steps", "0", "--logging_steps",
                 "1", "--save_steps", "3", "--output_dir", tmp_path]  # fmt: skip
    assert run_hfgen_here("train", PRETRAIN, *overrides, "--max_steps", "3").returncode == 0
    recipe = (tmp_path / "recipe.yaml").read_text(encoding="utf-8")
    again = ["--overwrite_output_dir", "true", "--resume_from_checkpoint", "true"]
    for shorter, budget in [
        (["--max_steps", "2"], "max_steps: 2"),
        (["--max_steps", "-1", "--num_train_epochs", "0.5"], "num_train_epochs: 0.5 (2 steps)"),  # 4 steps an epoch
    ]:
        result = run_hfgen_here("train", PRETRAIN, *overrides, *again, *shorter)
        assert result.returncode == 2, result.stderr[-3000:]
        assert f"checkpoint '{tmp_path / 'checkpoint-3'}' is at step 3, past this run's {budget}" in result.stderr
        assert "overwrite_output_dir: true without resume_from_checkpoint" in result.stderr
        if budget == "max_steps: 2":
            assert tracking.is_complete(tmp_path) and (tmp_path / "recipe.yaml").read_text(encoding="utf-8") == recipe
        else:  # refused once the steps are counted, after the records: not complete, as recipe.yaml no longer is
            assert not tracking.is_complete(tmp_path)


@pytest.mark.slow
def test_a_run_stopped_after_its_last_checkpoint_finishes_from_it_without_training_again(tmp_path):
    # "checkpoint-8 is the last step's; starting again": every step trained again, and with save_total_limit 1 the
    # rotation deleted each new checkpoint as soon as it was written, keeping the stale checkpoint-8
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert train(PRETRAIN, reference, PRETRAIN_ARGS).returncode == 0
    stopped = train(PRETRAIN, killed, PRETRAIN_ARGS, kill_at="final_save")  # checkpoint-8 written, no COMPLETE
    assert stopped.returncode == -signal.SIGKILL
    last = killed / "checkpoint-8" / tracking.CHECKPOINT_STATE
    written = last.stat().st_mtime_ns
    result = train(PRETRAIN, killed, PRETRAIN_ARGS, kill_at="step@1", resume=True)  # (dies if it trains a step)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint-8 is the last step's; finishing the run from it" in result.stderr
    assert last.stat().st_mtime_ns == written and [p.name for p in tracking.checkpoints(killed)] == ["checkpoint-8"]
    assert_same_run(reference, killed)
    assert (killed / "samples.jsonl").read_text() == (reference / "samples.jsonl").read_text()  # the RNG came back


@pytest.mark.slow
def test_a_signal_during_the_last_steps_evaluation_lets_the_resumed_run_complete_as_the_uninterrupted_one(tmp_path):
    # with save_on_signal the run saved checkpoint-8 and stopped; the resume trained every step again from 0
    overrides = [*PRETRAIN_ARGS, "--save_on_signal", "true", "--eval_strategy", "steps", "--eval_steps", "4"]
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    assert train(PRETRAIN, reference, overrides).returncode == 0
    result = train(PRETRAIN, stopped, overrides, kill_at="eval@8:TERM")  # the last step's evaluation, in training
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    result = train(PRETRAIN, stopped, overrides, kill_at="step@1", resume=True)  # (dies if it trains a step)
    assert result.returncode == 0 and "finishing the run from it" in result.stderr, result.stderr[-3000:]
    assert_same_run(reference, stopped)


def test_rotation_deletes_the_checkpoints_of_a_line_of_training_the_run_left_not_its_own(tmp_path):
    recipe = yaml.safe_load(PRETRAIN.read_text())
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    fake_checkpoint(tmp_path, recipe, {}, step=9)  # of the run before it resumed from an earlier checkpoint
    (tmp_path / "checkpoint-3").mkdir()
    tracking.finish_checkpoint(tmp_path, tmp_path / "checkpoint-3", 3, 1)
    assert [p.name for p in tracking.checkpoints(tmp_path)] == ["checkpoint-3"]


@pytest.mark.slow
def test_a_signal_after_the_last_step_completes_the_run_then_stops_a_pipeline(pretrain_runs, tmp_path):
    # with save_on_signal the signal was noted, then forgotten: a pipeline ran its next steps to the end
    overrides = [*PRETRAIN_ARGS, "--save_on_signal", "true", "--eval_strategy", "no"]
    result = train(PRETRAIN, tmp_path, overrides, kill_at="eval@8:INT")  # during the final evaluation
    assert result.returncode == 128 + signal.SIGINT, result.stderr[-3000:]
    assert tracking.is_complete(tmp_path) and "stopping here, as the signal asked" in result.stderr


@pytest.mark.slow
def test_a_pipeline_step_whose_inputs_were_made_again_starts_over(pretrain_runs, tmp_path):
    # the rlhf pipeline retrained sft, then continued ppo's interrupted run, trained against the old sft model
    from hfgen.recipe import load_recipe
    from hfgen.train import run_step

    recipe = load_recipe(PRETRAIN, [*PRETRAIN_ARGS, "--output_dir", str(tmp_path)])
    (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())  # the same step, interrupted after checkpoint-4
    shutil.copytree(pretrain_runs[0] / "checkpoint-8", tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-4" / tracking.CHECKPOINT_STATE).write_text(json.dumps({"step": 4, "metrics_rows": 0}))
    run_step(recipe, fresh=True)
    assert [row["step"] for row in tracking.read_metrics(tmp_path) if "loss" in row] == [2, 4, 6, 8]  # from step 1
    assert_same_run(pretrain_runs[0], tmp_path)


def test_hub_inputs_are_recorded_offline_only_and_a_mixtures_hub_entries_not_at_all(tmp_path, monkeypatch, hub_cache):
    # online the run's own load resolves the hub's commit after the record and may move refs/main: a resume would be
    # refused for the commit it trained on; a mixture entry's dataset version was another config's (review 43 #3, #4)
    from huggingface_hub import constants

    from hfgen import fingerprint
    from hfgen.models import damaged_weights

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors.index.json").write_text('{"weight_map": {"w": "model-1.safetensors"}}')
    hub_cache("tinyorg/partial", tmp_path / "model", "a" * 40)
    assert fingerprint.hub_fingerprint("tinyorg/partial")["commit"] == "a" * 40  # (the tests run offline)
    assert "model-1.safetensors" in damaged_weights("tinyorg/partial")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert fingerprint.hub_fingerprint("tinyorg/partial") is None
    assert damaged_weights("tinyorg/partial") is None  # (online, the load fetches the missing shard)
    assert fingerprint.key_hub_fingerprint("datasets", "org/name", {}) is None
