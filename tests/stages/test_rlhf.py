"""Stage `rlhf`: the pipeline validates every step before running any, runs pretrain -> SFT -> reward -> PPO from
nothing with each output wired into the next, skips complete steps, reruns what changed, and summarises."""

import json

import pytest
import yaml

from conftest import REPO, accelerate_launch, run_hfgen, run_hfgen_here, shrunk
from hfgen import tracking


@pytest.fixture
def pipeline(tmp_path):
    """A pipeline recipe over shrunk copies of the tiny recipes; pretraining is its missing prerequisite."""
    (tmp_path / "tiny.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "max_position_embeddings": 256,
                "tie_word_embeddings": True,
            }
        )  # fmt: skip
    )
    pretrain = str(tmp_path / "pretrain_out")
    few = {"save_strategy": "no", "logging_steps": 1}
    recipe = {
        "stage": "rlhf",
        "output_dir": str(tmp_path / "rlhf"),
        "prerequisite": shrunk("pretrain.yaml", tmp_path, config_name=str(tmp_path / "tiny.json"), output_dir=pretrain,
                               max_steps=3, max_train_samples=64, max_eval_samples=8, **few),
        "sft": shrunk("sft_full.yaml", tmp_path, model_name_or_path=pretrain, max_steps=3, max_train_samples=64,
                      max_eval_samples=8, num_samples=2, output_dir=str(tmp_path / "sft"), **few),
        "reward": shrunk("reward.yaml", tmp_path, model_name_or_path=pretrain, max_steps=3, max_train_samples=64,
                         max_eval_samples=8, output_dir=str(tmp_path / "reward"), **few),
        "ppo": shrunk("ppo.yaml", tmp_path, total_episodes=16, per_device_train_batch_size=8, num_mini_batches=1,
                      num_ppo_epochs=1, response_length=8, max_eval_samples=4, eval_samples_per_prompt=1, save_steps=0,
                      logging_steps=1, sample_steps=0, output_dir=str(tmp_path / "ppo")),
    }  # fmt: skip
    path = tmp_path / "rlhf.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_every_step_is_validated_before_anything_runs(pipeline, tmp_path):
    result = run_hfgen_here("train", pipeline, "--ppo_overrides", '{"kl_coeff": 0.1}', "--reward", str(pipeline))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "step ppo" in result.stderr and "did you mean 'kl_coef'" in result.stderr
    assert "step reward" in result.stderr and "is stage 'rlhf', not 'reward'" in result.stderr
    assert not (tmp_path / "pretrain_out").exists() and not (tmp_path / "rlhf" / "sft").exists()


def test_a_step_writing_another_steps_dir_or_its_own_input_model_exits_2_before_anything_runs(pipeline, tmp_path):
    # ppo into the sft step's dir trained over the SFT run it had just loaded, then failed with a traceback
    result = run_hfgen_here("train", pipeline, "--ppo_overrides", json.dumps({"output_dir": str(tmp_path / "sft")}))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"step ppo: output_dir '{tmp_path / 'sft'}' is also step sft's" in result.stderr
    overrides = {"output_dir": str(tmp_path / "pretrain_out")}  # sft over the prerequisite's model, its own input
    result = run_hfgen_here("train", pipeline, "--sft_overrides", json.dumps(overrides))
    assert result.returncode == 2 and "step sft: output_dir" in result.stderr
    assert f"model_name_or_path '{tmp_path / 'pretrain_out'}' is its own output_dir" in result.stderr
    assert not (tmp_path / "pretrain_out").exists() and not (tmp_path / "sft").exists()


def test_every_steps_values_are_checked_before_anything_runs(pipeline, tmp_path):
    # reward_clip 0 was found after pretraining, SFT and reward had trained; the models earlier steps make are not
    # there yet, and are no problem
    result = run_hfgen_here("train", pipeline, "--ppo_overrides", '{"reward_clip": 0, "monitor_kl_window": 1}')
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "step ppo: monitor_kl_window must be at least 2" in result.stderr and "reward_clip must be > 0" in result.stderr
    )
    assert "does not exist" not in result.stderr and "pretrain_out" not in result.stderr
    assert not (tmp_path / "pretrain_out").exists()


def test_a_steps_bf16_without_a_gpu_is_named_with_its_own_step(pipeline, tmp_path):
    # the sft step's `bf16: true` on a CPU stopped every step at transformers' "Your setup doesn't support bf16/gpu",
    # the ppo step's too, naming the SFT recipe (it reads the sft step's output_dir) (probe 38 A3)
    from transformers.utils import is_torch_bf16_gpu_available

    if is_torch_bf16_gpu_available():
        pytest.skip("this machine trains in bf16")
    bf16 = json.dumps({"use_cpu": False, "bf16": True})
    result = run_hfgen_here("check", pipeline, "--sft_overrides", bf16, "--ppo_overrides", '{"reward_clip": 0}')
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "has 2 problems" in result.stderr and "doesn't support bf16" not in result.stderr
    assert "step sft: bf16: true trains in bfloat16" in result.stderr and "step ppo: reward_clip" in result.stderr
    assert not (tmp_path / "pretrain_out").exists()


def test_the_pipelines_save_on_signal_and_nan_tolerance_reach_every_step_that_sets_none(pipeline, tmp_path):
    # `save_on_signal: true` on the pipeline recipe was accepted, and each step (a run of its own recipe) ran without
    # it: a SIGINT mid-step was a KeyboardInterrupt traceback, no checkpoint (probe 41 C4); nan_tolerance the same
    import dataclasses

    from hfgen.recipe import load_recipe
    from hfgen.stages import rlhf

    own = ["--sft_overrides", '{"save_on_signal": false}', "--save_on_signal", "true", "--nan_tolerance", "2"]
    (args,) = load_recipe(pipeline, own).configs
    steps = {step: rlhf.step_recipe(args, step, check_inputs=False).run for step in ("sft", "reward", "ppo")}
    assert [(run.save_on_signal, run.nan_tolerance) for run in steps.values()] == [(False, 2), (True, 2), (True, 2)]
    prerequisite = rlhf.prerequisite_recipe(args, check_inputs=False).run
    assert (prerequisite.save_on_signal, prerequisite.nan_tolerance) == (True, 2)
    method = dataclasses.replace(args, method="ppo")  # as `hfgen compare` makes each method's arguments
    assert rlhf.step_recipe(method, "ppo", check_inputs=False).values["save_on_signal"] is True
    (unset,) = load_recipe(pipeline).configs  # a pipeline that sets neither leaves the steps' recipes as they were
    assert "save_on_signal" not in rlhf.step_recipe(unset, "ppo", check_inputs=False).values
    result = run_hfgen_here("check", pipeline, "--passed_to_steps", "{}")  # filled by hfgen, not a recipe key
    assert result.returncode == 2 and "unknown key 'passed_to_steps'" in result.stderr
    # a step completed without it is the same run once the pipeline passes it on: reused, not trained again
    from hfgen import tracking

    without = rlhf.step_recipe(unset, "ppo", check_inputs=False)
    (tmp_path / "recipe.yaml").write_text(without.to_yaml())
    (signalled,) = load_recipe(pipeline, ["--save_on_signal", "true"]).configs
    assert tracking.holds_recipe(tmp_path, rlhf.step_recipe(signalled, "ppo", check_inputs=False).to_yaml())
    assert not tracking.holds_recipe(tmp_path, rlhf.step_recipe(method, "ppo", check_inputs=False).to_yaml())  # (2)


def test_shipped_pipeline_recipe_names_the_tiny_steps():
    from hfgen.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes/tiny/rlhf.yaml")  # check(): every step recipe parses, stages match
    (args,) = recipe.configs
    assert (args.prerequisite, args.sft, args.reward, args.ppo) == (
        "recipes/tiny/pretrain.yaml", "recipes/tiny/sft_full.yaml", "recipes/tiny/reward.yaml", "recipes/tiny/ppo.yaml",
    )  # fmt: skip


def test_compare_retrains_its_sft_step_after_the_prerequisite_was_retrained_in_place(pipeline, tmp_path, capsys):
    # `hfgen compare` reused its SFT step (and then skipped its runs), and the pipeline after it, though the
    # pretrained model it was made from had been trained again in place (probe 39 C7)
    from hfgen.compare import run_shared_steps
    from hfgen.recipe import load_recipe

    shared = load_recipe(pipeline).configs[0]
    run_shared_steps(shared, needs_reward=False)
    assert "== sft: ->" in capsys.readouterr().out
    run_shared_steps(shared, needs_reward=False)
    assert "is complete, reused" in capsys.readouterr().out
    again = run_hfgen_here("train", shared.prerequisite, "--overwrite_output_dir", "true", "--seed", "5")
    assert again.returncode == 0, again.stderr[-3000:]
    run_shared_steps(shared, needs_reward=False)
    assert "== sft: ->" in capsys.readouterr().out  # trained again, from the new pretrained run
    trained_on = tracking.read_json(tmp_path / "sft" / tracking.COMPLETE_MARKER)[tracking.INPUT_RUNS]
    assert trained_on["model_name_or_path"] == tracking.run_id(tmp_path / "pretrain_out")


@pytest.mark.slow
def test_pipeline_from_nothing_then_skips_and_reruns_what_changed(pipeline, tmp_path):
    result = run_hfgen("train", pipeline)
    assert result.returncode == 0, result.stderr[-3000:]
    root = tmp_path  # each step writes its own recipe's output_dir
    assert tracking.is_complete(tmp_path / "pretrain_out")
    for step in ("sft", "reward", "ppo"):
        assert tracking.is_complete(root / step), step
    ppo_recipe = yaml.safe_load((root / "ppo" / "recipe.yaml").read_text())
    assert ppo_recipe["model_name_or_path"] == str(root / "sft")  # SFT -> policy and reference
    assert ppo_recipe["reward_model_path"] == str(root / "reward")  # reward model -> reward and value init
    summary = tracking.read_json(tmp_path / "rlhf" / "eval.json")
    for key in ("sft/held_out_response_loss", "reward/accuracy", "ppo/oracle", "sft/oracle", "win_rate/oracle",
                "ppo/reward_model", "win_rate/reward_model", "kl_to_reference", "wall_time_s/ppo",
                "wall_time_s/prerequisite"):  # fmt: skip
        assert key in summary, key
    assert "RLHF pipeline summary" in result.stdout and "oracle win rate of PPO over SFT" in result.stdout
    # `hfgen eval` on the pipeline dir evaluates its PPO policy against its SFT model, by its reward model
    evaluated = run_hfgen("eval", tmp_path / "rlhf", "--num_prompts", "4", "--num_samples", "2", "--max_new_tokens",
                          "8", "--speed_new_tokens", "4", "--speed_batch_size", "2", "--perplexity_texts", "8", "--quiet")  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    merged = tracking.read_json(tmp_path / "rlhf" / "eval.json")
    assert merged["eval/baseline"] == str(root / "sft") and "quality/baseline_reward_score" in merged
    assert merged["reward/accuracy"] == summary["reward/accuracy"]  # the pipeline's summary is kept

    finished = {step: (root / step / "COMPLETE").read_text() for step in ("sft", "reward", "ppo")}
    result = run_hfgen("train", pipeline, "--ppo_overrides", '{"kl_coef": 0.1}')
    assert result.returncode == 0, result.stderr[-3000:]
    assert "== sft: " in result.stdout and "skipped" in result.stdout and "== ppo (recipe changed)" in result.stdout
    assert (root / "sft" / "COMPLETE").read_text() == finished["sft"]  # not redone
    assert (root / "ppo" / "COMPLETE").read_text() != finished["ppo"]

    result = run_hfgen("train", pipeline, "--ppo_overrides", '{"kl_coef": 0.1}', "--force")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "== sft (forced)" in result.stdout and "== reward (forced)" in result.stdout
    assert (root / "sft" / "COMPLETE").read_text() != finished["sft"]


@pytest.mark.slow
def test_two_processes_run_the_whole_pipeline(pipeline, tmp_path, free_port):
    # Every rank checks the previous step's COMPLETE marker, which the main rank writes: the ranks must wait for it.
    result = accelerate_launch(free_port, pipeline)
    assert result.returncode == 0, result.stderr[-3000:]
    for step in ("pretrain_out", "sft", "reward", "ppo"):
        assert tracking.is_complete(tmp_path / step), step
        assert tracking.read_json(tmp_path / step / "env.json")["world_size"] == 2, step
    assert (tmp_path / "ppo" / "weights-rank0.sha256").read_text() == (
        tmp_path / "ppo" / "weights-rank1.sha256"
    ).read_text()
    assert "RLHF pipeline summary" in result.stdout
