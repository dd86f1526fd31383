"""Stages `grpo` and `rloo` (TRL's trainers, hfgen's records): bad recipes exit 2 naming the key, plain-string prompts
are templated as SFT trained them (or refused), a run leaves its records and the held-out comparison, a resumed run
reproduces the uninterrupted one exactly, and two processes end with identical weights."""

import json
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, accelerate_launch, run_hfgen, run_hfgen_here
from hfgen import tracking
from tiny_models import save_tiny_causal_lm, save_tiny_llama

# exact_answer is 0 on a random model's garbage; a reward for short responses (written below, importable by the runs)
# varies within every group, so the policy moves
REWARDS = ["hfgen.data.arithmetic:exact_answer", "grpo_test_rewards:brevity"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two random tiny Llamas with the arithmetic tokenizer (the policy's start, and another one), and a reward
    module on the runs' PYTHONPATH."""
    root = tmp_path_factory.mktemp("grpo_models")
    (root / "grpo_test_rewards.py").write_text(
        "def brevity(prompts, responses):\n    return [-len(response) / 10 for response in responses]\n"
        "\n"
        "# a component that rises by 10 each scoring while another falls by 5: the monitor's dominance signal\n"
        "# (a resumed run says how many scorings came before it)\n"
        "import os\n"
        "CALLS = dict.fromkeys(('rising', 'falling'), int(os.environ.get('GRPO_TEST_CALLS', 0)))\n"
        "def rising(prompts, responses):\n    CALLS['rising'] += 1\n    return [10.0 * CALLS['rising']] * len(responses)\n"
        "def falling(prompts, responses):\n    CALLS['falling'] += 1\n    return [-5.0 * CALLS['falling']] * len(responses)\n"
        "# 1.0 or, for every fourth response, None (not scored)\n"
        "def partial(prompts, responses):\n    return [None if i % 4 == 0 else 1.0 for i in range(len(responses))]\n"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
        yield tuple(
            save_tiny_llama(root / f"start{seed}", seed=seed, tokenizer_name="embedded:arithmetic-bpe")
            for seed in (0, 1)
        )


def write_recipe(directory, model, stage="grpo", **values):
    recipe = {
        "stage": stage, "model_name_or_path": str(model), "dataset_name": "embedded:arithmetic_prompts",
        "max_train_samples": 64, "max_eval_samples": 4, "eval_samples_per_prompt": 2, "eval_generation_batch_size": 8,
        "reward_functions": REWARDS, "reward_weights": [1.0, 0.5], "oracle_function": "hfgen.data.arithmetic:correct_steps",
        "num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 12, "learning_rate": 1e-3,
        "max_steps": 4, "logging_steps": 1, "save_strategy": "steps", "save_steps": 1, "seed": 7,
        "output_dir": str(directory / "run"), "report_to": "none", "use_cpu": True, "bf16": False,
        "activation_checkpointing": False, "dataloader_num_workers": 0,
        # a generation batch spans 2 optimizer steps: TRL alone would resume from checkpoint-1 on new completions
        "steps_per_generation": 2,
    } | values  # fmt: skip
    path = directory / "recipe.yaml"
    path.write_text("# test\n" + yaml.safe_dump(recipe))
    return path


def train(recipe, *overrides):
    result = run_hfgen("train", recipe, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def full_run(models, tmp_path_factory):
    """4 steps over 4 prompts: 2 epochs of one generation batch (4 prompts x 4 completions) each."""
    directory = tmp_path_factory.mktemp("grpo_full")
    train(write_recipe(directory, models[0], max_train_samples=4))
    return directory / "run"


@pytest.mark.slow
def test_bad_recipes_exit_2_naming_the_key(tmp_path, models):
    result = run_hfgen_here("train", write_recipe(tmp_path, models[0], num_generation=4))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "num_generation" in result.stderr and "num_generations" in result.stderr
    result = run_hfgen_here(
        "train", write_recipe(tmp_path, models[0], reward_weights=[1.0], oracle_function="hfgen.data.arithmetic:nope")
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "reward_weights has 1 values for 2 reward(s)" in result.stderr and "no attribute 'nope'" in result.stderr
    # values TRL checks only at the first loss, after the models loaded and generated
    bad = {"importance_sampling_level": "sentence", "multi_objective_aggregation": "mean",
           "vllm_importance_sampling_mode": "clip", "eval_strategy": "steps"}  # fmt: skip
    result = run_hfgen_here("train", write_recipe(tmp_path, models[0], **bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for key, value in list(bad.items())[:3]:
        assert f"{key} must be one of" in result.stderr and f"got '{value}'" in result.stderr, result.stderr[-2000:]
    assert "eval_strategy 'steps'" in result.stderr and "set eval_strategy: no" in result.stderr


def test_a_combination_trl_does_not_implement_exits_2_naming_it(tmp_path, models):
    # TRL's constructor raises NotImplementedError for sync_ref_model with LoRA: the recipe's, not a bug of hfgen's
    lora = {"use_peft": True, "lora_r": 4, "lora_target_modules": ["q_proj"], "sync_ref_model": True, "beta": 0.1}
    result = run_hfgen_here("train", write_recipe(tmp_path, models[0], **lora))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "GRPOTrainer rejected the recipe" in result.stderr and "sync_ref_model" in result.stderr


def test_a_null_in_a_column_a_reward_function_reads_exits_2_naming_file_row_and_column(tmp_path, models):
    """GSM8K-style rows missing their answer passed the check and the reward function raised mid-run."""
    data = tmp_path / "questions.jsonl"
    rows = [{"question": f"What is {i} plus 1?", **({"answer": f"#### {i + 1}"} if i % 3 else {})} for i in range(30)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = write_recipe(tmp_path, models[0], dataset_name=str(data), prompt_column="question",
                          reward_functions=["hfgen.data.arithmetic:gsm8k_exact_answer"], reward_weights=None)  # fmt: skip
    result = run_hfgen_here("check", recipe)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    expected = f"dataset '{data}' (split 'train'): 10 row(s) lack a value in column 'answer'"
    assert expected in result.stderr and "rows [1, 4, 7, 10, 13]" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_plain_string_prompts_are_templated_as_sft_trained_them_or_refused(tmp_path, models):
    from datasets import Dataset
    from trl.data_utils import maybe_apply_chat_template

    from hfgen.group_rl import GroupRLArguments, prepare_prompts
    from hfgen.models import load_tokenizer
    from hfgen.stages.sft import tokenize_response

    tokenizer = load_tokenizer(str(models[0]))
    strings = Dataset.from_list([{"prompt": "3+8+5=?"}])  # (the data layer maps `prompt_column` to `prompt`)
    prompted = prepare_prompts(strings, GroupRLArguments(), tokenizer)
    rendered = maybe_apply_chat_template(prompted[0], tokenizer)["prompt"]  # what GRPOTrainer generates from
    # SFT on the same question as a conversation: its response starts right after this prompt
    conversation = ([{"role": "user", "content": "3+8+5=?"}], [{"role": "assistant", "content": "answer: 16"}])
    ids, start = tokenize_response(tokenizer, *conversation, max_length=None)
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == ids[:start]
    kept = prepare_prompts(strings, GroupRLArguments(chat_prompts="never"), tokenizer)
    assert kept[0]["prompt"] == "3+8+5=?"

    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+1+2=?"}) + "\n" for a in range(8)))
    recipe = write_recipe(tmp_path, models[0], dataset_name=str(data), prompt_column="question", chat_prompts="refuse")
    result = run_hfgen_here("train", recipe)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "plain strings" in result.stderr and "chat template" in result.stderr and "chat_prompts" in result.stderr


@pytest.mark.slow
def test_a_model_whose_run_prompted_it_raw_gets_raw_prompts_and_its_run_records_them(tmp_path, models):
    # GRPO/RLOO/PPO from an SFT model trained on plain text (its eval.json: trained_on_chat false) wrapped the
    # prompts in the chat template (`chat_prompts: auto`), and `hfgen generate` / `eval` of the later run's dir
    # defaulted to chat, a format neither run had trained on
    from datasets import Dataset

    from hfgen.generate import wants_chat
    from hfgen.group_rl import GroupRLArguments, prepare_prompts
    from hfgen.models import load_tokenizer
    from hfgen.recipe import load_recipe
    from hfgen.train import run_recipe

    sft = tmp_path / "sft"  # the records of a plain-text SFT run (test_sft.py makes them by training)
    shutil.copytree(models[0], sft)
    (sft / "recipe.yaml").write_text(yaml.safe_dump({"stage": "sft", "output_dir": str(sft)}))
    tracking.write_json(sft / "env.json", {})
    tracking.write_json(sft / "eval.json", {"trained_on_chat": False})
    tracking.mark_complete(sft)
    tokenizer = load_tokenizer(str(sft))
    strings = Dataset.from_list([{"prompt": "3+8+5=?"}])
    assert (
        tokenizer.chat_template
        and prepare_prompts(strings, GroupRLArguments(), tokenizer, {}, str(sft))[0]["prompt"] == "3+8+5=?"
    )
    data = tmp_path / "questions.jsonl"  # plain-string prompts
    data.write_text("".join(json.dumps({"prompt": f"{a}+1+2=?", "answer": str(a + 3)}) + "\n" for a in range(10)))
    recipe = write_recipe(tmp_path, sft, dataset_name=str(data), max_steps=2, eval_samples_per_prompt=1,
                          reward_functions=REWARDS[:1], reward_weights=[1.0])  # fmt: skip
    run = run_recipe(load_recipe(recipe))
    assert tracking.read_json(run / "eval.json")["trained_on_chat"] is False
    assert not wants_chat(str(run), tokenizer)
    # data.json says so from the start, for a checkpoint of the run before its eval.json (probe 42 B4)
    assert tracking.read_json(run / "data.json")["trained_on_chat"] is False
    tracking.write_json(sft / "eval.json", {"trained_on_chat": True})  # an SFT run on conversations: one user turn
    assert prepare_prompts(strings, GroupRLArguments(), tokenizer, model_path=str(sft))[0]["prompt"] == [
        {"role": "user", "content": "3+8+5=?"}
    ]
    # an older hfgen's run on prompt/completion rows records neither: sent as a user turn, said (probe 40 I4)
    tracking.write_json(sft / "eval.json", {})
    tracking.write_json(sft / "data.json", {"train": {"format": "prompt_completion"}})
    records = {}
    assert prepare_prompts(strings, GroupRLArguments(), tokenizer, records, str(sft))[0]["prompt"][0]["role"] == "user"
    assert "does not record whether it prompted its model in the chat template" in records["notes"][0]


@pytest.mark.slow
def test_a_run_records_rewards_signal_time_split_samples_and_the_held_out_comparison(full_run):
    metrics = [row for row in tracking.read_metrics(full_run) if "loss" in row]
    assert [row["step"] for row in metrics] == [1, 2, 3, 4]
    for key in ("rewards/exact_answer/mean", "rewards/brevity/std", "rewards/exact_answer/no_signal_share",
                "groups/no_signal_share", "completions/clipped_ratio", "completions/mean_length", "entropy",
                "oracle/mean", "time/generation_share", "time/scoring_share", "time/training_share",
                "speed/episodes_per_s"):  # fmt: skip
        assert key in metrics[0], key
    # an untrained random model writes garbage, mostly truncated: every reward is 0, so no group has any signal
    assert metrics[0]["rewards/exact_answer/no_signal_share"] == 1.0  # all 0
    assert metrics[0]["rewards/brevity/no_signal_share"] < 1.0 and metrics[0]["groups/no_signal_share"] < 1.0
    assert metrics[0]["completions/clipped_ratio"] > 0.5
    shares = [metrics[0][f"time/{part}_share"] for part in ("generation", "scoring", "training")]
    assert sum(shares) == pytest.approx(1.0) and min(shares) >= 0
    evaluation = tracking.read_json(full_run / "eval.json")
    for key in ("sft/exact_answer", "grpo/exact_answer", "sft/brevity", "grpo/oracle", "win_rate/reward",
                "sft/exact_match", "grpo/exact_match", "kl_to_reference", "episodes_per_s", "monitor/alerts",
                "stopped_early"):  # fmt: skip
        assert key in evaluation, key
    assert evaluation["heldout/num_prompts"] == 4 and abs(evaluation["kl_to_reference"]) > 1e-3  # the policy moved
    # 4 steps of 8 completions: one generation batch of 16 serves 2 steps (steps_per_generation)
    assert evaluation["episodes"] == 32 and evaluation["episodes_per_s"] > 0
    samples = [json.loads(line) for line in (full_run / "samples.jsonl").read_text().splitlines()]
    assert {row["step"] for row in samples} == {1, 2, 3, 4} and {"prompt", "response", "brevity"} <= set(samples[0])
    assert tracking.is_complete(full_run) and (full_run / "model.safetensors").is_file()


def test_data_seed_decides_the_prompt_order_whatever_the_seed(tmp_path, models):
    # TRL's RepeatSampler draws the order from `seed`: data_seed 1 and 2 trained bit-identically, and a seed sweep
    # with data_seed fixed trained each seed on other prompts
    def first_prompts(name, seed, data_seed):
        (tmp_path / name).mkdir()
        recipe = write_recipe(tmp_path / name, models[0], max_steps=1, save_strategy="no", num_generations=2,
                              seed=seed, data_seed=data_seed)  # fmt: skip
        train(recipe)
        rows = (tmp_path / name / "run" / "samples.jsonl").read_text().splitlines()
        return [json.loads(line)["prompt"] for line in rows]

    order = first_prompts("a", seed=7, data_seed=1)
    assert first_prompts("b", seed=7, data_seed=2) != order
    assert first_prompts("c", seed=8, data_seed=1) == order


@pytest.mark.parametrize("steps_per_generation, num_iterations, generated", [(1, 1, 40), (2, 1, 48), (1, 2, 24)])
def test_episodes_count_the_completions_generated(tmp_path, steps_per_generation, num_iterations, generated):
    from trl import GRPOConfig

    from hfgen.group_rl import generated_completions

    config = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, use_cpu=True,
                        steps_per_generation=steps_per_generation, num_iterations=num_iterations)  # fmt: skip
    # 5 optimizer steps; a generation batch of 8 x steps_per_generation serves steps_per_generation x num_iterations
    # steps (the last one started is counted whole)
    assert generated_completions(5, config) == generated


def test_freeze_modules_keeps_the_named_modules_unchanged(tmp_path, models):
    frozen = ("model.embed_tokens.", "lm_head.", "model.layers.0.")
    train(write_recipe(tmp_path, models[0], max_steps=1, save_strategy="no", eval_samples_per_prompt=0,
                       freeze_modules=[name.rstrip(".") for name in frozen]))  # fmt: skip
    start, trained = load_file(models[0] / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    moved = {key for key in start if not torch.equal(start[key], trained[key])}
    assert moved and not {key for key in moved if key.startswith(frozen)}, moved


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_a_policy_broken_by_the_last_update_is_not_saved(tmp_path, models, stage):
    """The guard checks each step's loss and gradients before its update: the last one's (learning rate 1e12) left
    a policy whose every log-probability was NaN, saved with COMPLETE. Its log-probabilities of held-out prompts,
    measured before the save, stop the run as diverged."""
    recipe = write_recipe(tmp_path, models[0], stage, max_steps=1, save_strategy="no", learning_rate=1e12)
    result = run_hfgen_here("train", recipe)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "training ended at step 1 with a model that no longer computes: its held-out prompts' log-probability " \
           "is nan" in result.stderr  # fmt: skip
    assert not tracking.is_complete(tmp_path / "run") and not (tmp_path / "run/model.safetensors").exists()


def test_stop_on_hacking_keeps_the_average_of_the_policies_before_the_onset(tmp_path, models):
    """One reward component brings all the gain while another falls (dominance, alerting from the first step after
    a 2-step baseline): the run stops at step 3, normally, and its output is the average of the policies of steps 1
    and 2 (the start model and checkpoint-1's weights), not a policy trained further. Killed after checkpoint-2 (or
    while saving its output: the stop's step writes no checkpoint) and resumed, the run keeps the same average: the
    policies it sampled before the kill travel with the checkpoint."""
    # rising and falling give every response of a step the same score: weighed in (the monitor weighs components
    # as the reward does), they move no group-relative advantage, so training is that of REWARDS alone
    rewards = [*REWARDS, "grpo_test_rewards:rising", "grpo_test_rewards:falling"]
    recipe = dict(max_steps=6, steps_per_generation=1, eval_samples_per_prompt=0, reward_functions=rewards,
                  reward_weights=[1.0, 0.5, 1.0, 1.0], stop_on_hacking=True, monitor_baseline_steps=2,
                  monitor_patience=1)  # fmt: skip
    train(write_recipe(tmp_path, models[0], **recipe))
    run = tmp_path / "run"
    summary = tracking.read_json(run / "eval.json")
    assert summary["stopped_at_step"] == 3 and summary["stop_signal"] == "dominance" and tracking.is_complete(run)
    assert summary["kept_policy_of_steps"] == [1, 2]
    # no checkpoint of the stop's step: resumed from it, the run trained on past the stop (its alert raised already)
    assert not (run / "checkpoint-3").exists()
    start, first, second, output = (
        load_file(path / "model.safetensors") for path in (models[0], run / "checkpoint-1", run / "checkpoint-2", run)
    )
    for name in output:
        torch.testing.assert_close(output[name], (start[name] + first[name]) / 2)
    assert any(not torch.allclose(output[name], second[name]) for name in output)

    resumed = tmp_path / "resumed"
    (resumed / "run").mkdir(parents=True)
    shutil.copytree(run / "checkpoint-2", resumed / "run" / "checkpoint-2")
    rising = [row["rewards/rising/mean"] for row in tracking.read_metrics(run) if "rewards/rising/mean" in row]
    assert rising[:2] == [10.0, 20.0]  # one scoring a step
    result = run_hfgen("train", write_recipe(resumed, models[0], **recipe), "--resume_from_checkpoint", "true",
                       env={"GRPO_TEST_CALLS": "2"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = tracking.read_json(resumed / "run" / "eval.json")
    assert summary["stopped_at_step"] == 3 and summary["kept_policy_of_steps"] == [1, 2]
    again = load_file(resumed / "run" / "model.safetensors")
    for name in output:
        torch.testing.assert_close(again[name], output[name])


@pytest.mark.slow
def test_resume_mid_generation_batch_or_epoch_reproduces_the_uninterrupted_run(full_run, models, tmp_path):
    """Killed after checkpoint-1 (half-way through a generation batch) or checkpoint-2 (the end of epoch 1 of 2),
    resumed: the same later metrics and final weights. A resume that were ignored would log step 1 again (a resume
    that changed the starting model is refused: `tracking.check_same_run`); TRL's prompt sampler, new in the resumed
    run, gave epoch 2 epoch 1's prompt order (its generator is seeded once, when it is made)."""
    full = [row for row in tracking.read_metrics(full_run) if "loss" in row]
    full_summary = tracking.read_json(full_run / "eval.json")
    full_weights = load_file(full_run / "model.safetensors")
    full_samples = tracking.read_jsonl(full_run / "samples.jsonl")
    for checkpoint in (1, 2):
        directory = tmp_path / f"from{checkpoint}"
        (directory / "run").mkdir(parents=True)
        shutil.copytree(full_run / f"checkpoint-{checkpoint}", directory / "run" / f"checkpoint-{checkpoint}")
        # the sample tables a run killed after its last step had written: those after the checkpoint are written again
        shutil.copy(full_run / "samples.jsonl", directory / "run" / "samples.jsonl")
        if checkpoint == 1:
            result = run_hfgen_here("train", write_recipe(directory, models[1], max_train_samples=4),
                                    "--resume_from_checkpoint", "true")  # fmt: skip
            assert result.returncode == 2 and "model_name_or_path" in result.stderr, result.stderr[-2000:]
        train(write_recipe(directory, models[0], max_train_samples=4), "--resume_from_checkpoint", "true")
        resumed = [row for row in tracking.read_metrics(directory / "run") if "loss" in row]
        assert [row["step"] for row in resumed] == list(range(checkpoint + 1, 5))
        # generation metrics appear on generation steps only (1 and 3): a resume that regenerated at step 2 would
        # show them
        for key in ("loss", "grad_norm", "entropy", "reward", "rewards/brevity/std", "completions/mean_length"):
            assert [key in row for row in resumed] == [key in row for row in full[checkpoint:]], (checkpoint, key)
            values = [(row[key], original[key]) for row, original in zip(resumed, full[checkpoint:]) if key in row]
            expected = pytest.approx([b for _, b in values], rel=1e-5, abs=1e-7)
            assert [a for a, _ in values] == expected, (checkpoint, key)
        # the reward-hacking monitor's history travels with the checkpoint: a fresh monitor would have seen step 3 only
        resumed_summary = tracking.read_json(directory / "run" / "eval.json")
        assert resumed_summary["monitor/observed_steps"] == full_summary["monitor/observed_steps"] == 2
        # samples.jsonl as the uninterrupted run's: from checkpoint-1 step 2 writes the buffered batch's table (it
        # wrote none: the table travels with the buffer), and the rows past the checkpoint are not written twice
        samples = tracking.read_jsonl(directory / "run" / "samples.jsonl")
        assert [row["step"] for row in full_samples] == [step for step in range(1, 5) for _ in range(4)]
        texts = ("step", "prompt", "response")
        assert [[row[key] for key in texts] for row in samples] == [[row[key] for key in texts] for row in full_samples]
        for row, original in zip(samples, full_samples):
            scores = {key: value for key, value in original.items() if key not in texts}
            assert {key: row[key] for key in scores} == pytest.approx(scores, rel=1e-5, abs=1e-7), checkpoint
        weights = load_file(directory / "run" / "model.safetensors")
        for name in full_weights:
            torch.testing.assert_close(weights[name], full_weights[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_rloo_two_processes_end_with_identical_weights(tmp_path, models, free_port):
    recipe = write_recipe(tmp_path, models[0], stage="rloo", max_steps=2, save_strategy="no", eval_samples_per_prompt=0)
    result = accelerate_launch(free_port, recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    fingerprints = [(run / f"weights-rank{rank}.sha256").read_text() for rank in (0, 1)]
    assert fingerprints[0] == fingerprints[1]
    assert load_file(run / "model.safetensors").keys() == load_file(models[0] / "model.safetensors").keys()
    assert [row["step"] for row in tracking.read_metrics(run) if "loss" in row] == [1, 2]


def test_rlhf_pipeline_runs_grpo_in_ppos_place_with_or_without_a_reward_model(tmp_path):
    from hfgen.recipe import load_recipe
    from hfgen.stages.rlhf import pipeline_steps, step_recipe

    (args,) = load_recipe("recipes/tiny/rlhf_grpo.yaml").configs  # check(): every step parses, stages match
    assert pipeline_steps(args) == ("sft", "grpo")  # rule rewards only: no reward step
    grpo = step_recipe(args, "grpo", check_inputs=False)
    model_args, data_args, _ = grpo.configs
    assert model_args.model_name_or_path == "outputs/tiny/arithmetic_sft" and data_args.reward_model_path is None
    args.reward = "recipes/tiny/reward.yaml"
    assert pipeline_steps(args) == ("sft", "reward", "grpo")
    _, data_args, config = step_recipe(args, "grpo", check_inputs=False).configs
    assert data_args.reward_model_path == "outputs/tiny/reward" and len(data_args.reward_functions) == 2
    args.method = "ppo"
    assert pipeline_steps(args) == ("sft", "reward", "ppo")

    bad = tmp_path / "bad.yaml"
    bad.write_text("# bad\nstage: rlhf\nmethod: grpoo\noutput_dir: x\nsft: a\n")
    result = run_hfgen_here("train", bad)
    assert result.returncode == 2 and "method 'grpoo' is not one of ppo, grpo, rloo" in result.stderr


def test_a_reward_model_alone_scores_training_and_the_held_out_comparison(tmp_path, models):
    # `reward_functions: []` in the recipe, a reward model instead, without a chat template (as an encoder has none):
    # training renders the conversations with the plain template, and the held-out comparison scores with it too
    # (it once imported a scorer that no longer existed, after training had finished)
    from transformers import AutoModelForSequenceClassification

    judge = tmp_path / "judge"
    AutoModelForSequenceClassification.from_pretrained(models[1], num_labels=1).save_pretrained(judge)
    shutil.copy(models[1] / "tokenizer.json", judge)
    shutil.copy(models[1] / "tokenizer_config.json", judge)
    recipe = write_recipe(tmp_path, models[0], reward_functions=[], reward_weights=None, reward_model_path=str(judge),
                          max_steps=1, save_strategy="no", steps_per_generation=1)  # fmt: skip
    result = run_hfgen("train", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert figures["heldout/num_prompts"] == 4 and "win_rate/reward" in figures
    for side in ("sft", "grpo"):  # the reward model alone: the total is its score
        assert (
            isinstance(figures[f"{side}/reward"], float)
            and figures[f"{side}/reward_model"] == figures[f"{side}/reward"]
        )


def test_spawning_checks_the_global_batch_at_the_launched_world_size(models, tmp_path, monkeypatch):
    # `hfgen train --num_processes 2` validated as one process: a generation batch of 2 per process x 2 processes
    # (divisible by num_generations 4 only on 2) was refused before anything was spawned
    from hfgen.errors import UserError
    from hfgen.train import validate_for_processes

    monkeypatch.syspath_prepend(str(models[0].parent))  # the reward module, in this process
    recipe = write_recipe(tmp_path, models[0], per_device_train_batch_size=2, steps_per_generation=1)
    validate_for_processes(recipe, [], 2)
    with pytest.raises(UserError, match=r"generation_batch_size \(2\) must be divisible by num_generations \(4\)"):
        validate_for_processes(recipe, [], 1)
    # wrong on 2 processes too: the figures are the 2 processes' (2 x 2), not the one-process ones
    with pytest.raises(UserError, match=r"on 2 processes .*generation_batch_size \(4\) must be divisible by "
                       r"num_generations \(3\)"):  # fmt: skip
        validate_for_processes(recipe, ["--num_generations", "3"], 2)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the spawned processes are CPU processes")
def test_spawned_on_two_processes_with_its_own_port(models, tmp_path):
    recipe = write_recipe(tmp_path, models[0], per_device_train_batch_size=2, steps_per_generation=1, max_steps=1)
    launch = ["--num_processes", "2", "--launch_config", REPO / "recipes/accelerate/cpu_2proc.yaml"]
    result = run_hfgen("train", recipe, *launch, "--main_process_port", "29741", env={"ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert tracking.is_complete(tmp_path / "run")


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_trained_log_probs_of_a_left_padded_batch_equal_the_unpadded_ones(tmp_path, stage):
    # GPT-2 learns absolute positions and its attention ignores the mask there: TRL's scoring pass, given no
    # position_ids, read a left-padded row shifted by its padding (log-probs unlike those it sampled with)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from hfgen.group_rl import recorded
    from hfgen.models import load_tokenizer
    from tiny_models import save_tiny_causal_lm

    trainer_class, config_class = {"grpo": (GRPOTrainer, GRPOConfig), "rloo": (RLOOTrainer, RLOOConfig)}[stage]
    path = save_tiny_causal_lm(tmp_path / "gpt2", "gpt2")
    tokenizer = load_tokenizer(str(path))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    config = config_class(output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, report_to="none",
                          per_device_train_batch_size=2, num_generations=2, max_completion_length=4)  # fmt: skip
    trainer = recorded(trainer_class)(
        model=model, reward_funcs=[lambda prompts, completions, **_: [0.0] * len(prompts)], args=config,
        train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}), processing_class=tokenizer,
    )  # fmt: skip
    rows, scored = [[5, 6, 7, 8, 9, 10], [11, 12, 13]], 2  # prompt + completion; the last 2 tokens are scored
    width = max(map(len, rows))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, scored)
        for row, row_logps in zip(rows, logps):
            logits = model(input_ids=torch.tensor([row])).logits[0, -scored - 1 : -1].float()
            alone = logits.log_softmax(-1).gather(-1, torch.tensor(row[-scored:])[:, None])[:, 0]
            torch.testing.assert_close(row_logps, alone, atol=1e-5, rtol=0)


def test_a_reward_functions_unscored_responses_are_left_out_of_the_held_out_means_and_win_rates(tmp_path, models):
    # None is a reward function's "not scored" (README): eval.json once held NaN means and totals (no JSON) and
    # counted every pair with an unscored side as a loss (0.375 here, where every pair scored on both sides ties).
    # RLOO's comparison is the same function.
    # The oracle leaves the same responses unscored: its logged oracle/mean was null (a plain mean over a batch
    # with one NaN), and samples.jsonl held NaN for each unscored response.
    recipe = write_recipe(tmp_path, models[0], reward_functions=["grpo_test_rewards:brevity", "grpo_test_rewards:partial"],
                          oracle_function="grpo_test_rewards:partial", max_steps=1, save_strategy="no",
                          steps_per_generation=1)  # fmt: skip
    train(recipe)

    def refuse(constant):
        raise ValueError(f"{constant} in a record")

    for name in ("metrics.jsonl", "samples.jsonl"):
        rows = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "run" / name).read_text().splitlines()]
        assert rows, name
    assert [row["oracle/mean"] for row in tracking.read_metrics(tmp_path / "run") if "oracle/mean" in row] == [1.0]
    assert rows[0]["partial"] is None and {row["partial"] for row in rows[1:]} == {1.0}  # the first of four unscored
    figures = json.loads((tmp_path / "run" / "eval.json").read_text(), parse_constant=refuse)
    # 4 prompts x 2 samples: responses 0 and 4 unscored on both sides, the 6 other pairs tie
    assert figures["sft/partial"] == figures["grpo/partial"] == 1.0
    assert figures["win_rate/partial"] == 0.5 and figures["heldout/pairs_left_out/partial"] == 2
    # the weighted total skips the unscored component, as training's does: every response has one
    assert "heldout/pairs_left_out/reward" not in figures and isinstance(figures["grpo/reward"], float)


def test_a_completion_no_reward_function_scored_is_out_of_the_group_signal_and_the_held_out_reward(tmp_path, models):
    # TRL 1.16 leaves a completion every function left unscored (None) out of its group's baseline (advantage 0) and
    # its logged reward; hfgen counted it 0: groups/no_signal_share said every group [-, 1, 1, 1] taught while the step
    # had no signal at all, and eval.json's reward (0.75) was not the one function's mean (1.0)
    recipe = write_recipe(tmp_path, models[0], reward_functions=["grpo_test_rewards:partial"], reward_weights=[1.0],
                          max_steps=1, save_strategy="no", steps_per_generation=1)  # fmt: skip
    train(recipe)
    (metrics,) = [row for row in tracking.read_metrics(tmp_path / "run") if "groups/no_signal_share" in row]
    assert metrics["groups/no_signal_share"] == metrics["rewards/partial/no_signal_share"] == 1.0
    assert metrics["reward"] == 1.0 and metrics["loss"] == 0.0  # TRL's own: no signal
    figures = tracking.read_json(tmp_path / "run" / "eval.json")
    # 4 prompts x 2 samples: responses 0 and 4 unscored on both sides
    assert figures["sft/reward"] == figures["grpo/reward"] == figures["grpo/partial"] == 1.0
    assert figures["heldout/pairs_left_out/reward"] == 2 and figures["win_rate/reward"] == 0.5


def test_the_held_out_comparison_stops_at_every_eos_id_training_stops_at(tmp_path, models):
    # a generation_config listing several eos ids: TRL stops at each in training; the evaluation once stopped at the
    # tokenizer's EOS alone (eos_rate and lengths of responses training never sees). Here every token but the pad
    # ends a response, so each one is a single token, ended.
    from transformers import GenerationConfig

    start = tmp_path / "start"
    shutil.copytree(models[0], start)
    generation = GenerationConfig.from_pretrained(start)
    pad = generation.pad_token_id
    vocabulary = json.loads((start / "config.json").read_text())["vocab_size"]
    generation.eos_token_id = [i for i in range(vocabulary) if i != pad]
    generation.save_pretrained(start)
    train(write_recipe(tmp_path, start, max_steps=1, save_strategy="no", steps_per_generation=1))
    figures = json.loads((tmp_path / "run" / "eval.json").read_text())
    for side in ("sft", "grpo"):
        assert figures[f"{side}/eos_rate"] == 1.0 and figures[f"{side}/response_length"] == 1.0, figures


def test_the_held_out_comparison_counts_the_closing_eos_of_a_model_whose_pad_is_its_eos(tmp_path, models):
    # GRPO keeps the model's pad = EOS; the comparison took every token equal to the pad for padding, so an answer's
    # closing EOS was left out of response_length and kl_to_reference (probe 39 F3: 22.25 against 22.375 tokens)
    from transformers import AutoModelForCausalLM

    from hfgen.models import load_tokenizer

    start = tmp_path / "start"
    tokenizer = load_tokenizer(str(models[0]))
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(models[0])
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    # Every response is its EOS alone: with attention and MLP outputs zeroed, the hidden state after the generation
    # prompt is its last token's embedding, and the (tied) EOS row is made to point along it
    last = tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+2="}], add_generation_prompt=True, return_dict=False
    )[-1]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.get_input_embeddings().weight
        direction = model.model.norm.weight * embeddings[last]
        embeddings[tokenizer.eos_token_id] = 50 * direction / direction.norm()
    model.save_pretrained(start)
    tokenizer.save_pretrained(start)
    train(write_recipe(tmp_path, start, max_steps=1, save_strategy="no", steps_per_generation=1))
    figures = json.loads((tmp_path / "run" / "eval.json").read_text())
    for side in ("sft", "grpo"):
        assert figures[f"{side}/eos_rate"] == 1.0 and figures[f"{side}/response_length"] == 1.0, figures


def test_a_reward_model_scores_a_truncated_completion_unfinished_in_training_as_in_the_evaluation(tmp_path, models):
    # TRL rendered every completion as a closed assistant turn for a reward model, so one cut off at
    # max_completion_length scored as a finished answer in training, and unfinished in eval.json (RewardScorer)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import GRPOConfig, GRPOTrainer, ModelConfig

    from hfgen.group_rl import load_reward_model, recorded, reward_model_function
    from hfgen.models import load_tokenizer
    from hfgen.rl.models import stop_token_ids
    from hfgen.rl.rollout import RewardScorer

    judge = tmp_path / "judge"
    AutoModelForSequenceClassification.from_pretrained(models[1], num_labels=1).save_pretrained(judge)
    load_tokenizer(str(models[1])).save_pretrained(judge)
    config = GRPOConfig(output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, report_to="none",
                        per_device_train_batch_size=2, num_generations=2, max_completion_length=4)  # fmt: skip
    reward_model, reward_tokenizer = load_reward_model(str(judge), ModelConfig(dtype="float32"), config)
    tokenizer = load_tokenizer(str(models[0]))
    policy = AutoModelForCausalLM.from_pretrained(models[0])
    reward = reward_model_function(reward_model, reward_tokenizer, stop_token_ids(tokenizer, policy), 8)
    prompt = [{"role": "user", "content": "1+2="}]
    trainer = recorded(GRPOTrainer)(
        model=policy, reward_funcs=[reward], args=config, processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": [prompt, prompt]}),
    )  # fmt: skip
    answer = tokenizer("3", add_special_tokens=False)["input_ids"]
    completion_ids = [answer + [tokenizer.eos_token_id], answer]  # finished; cut off at the length limit
    text = tokenizer.decode(answer, skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": text}]] * 2
    trained = trainer._calculate_rewards([{"prompt": prompt}] * 2, [prompt] * 2, completions, completion_ids)[:, 0]
    evaluated, _ = RewardScorer(reward_model, reward_tokenizer, {}, [1.0], 8)(
        [prompt] * 2, [text] * 2, [True, False], "cpu"
    )
    torch.testing.assert_close(trained, evaluated)
    assert trained[0] != trained[1]  # the same text, shown open when it was cut off


def test_training_and_the_evaluation_never_sample_the_added_pad_token(tmp_path):
    # the pad token hfgen adds to a tokenizer without one is an untrained row, which TRL's and the evaluation's
    # sampling drew about once in V tokens
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from hfgen.group_rl import recorded, sampling_config, suppress_pad
    from hfgen.models import fit_embeddings, load_tokenizer
    from hfgen.rl.functional import response_mask
    from hfgen.rl.models import stop_token_ids
    from hfgen.rl.rollout import left_pad, sample_responses
    from tiny_models import save_tiny_gpt2_without_pad

    path = save_tiny_gpt2_without_pad(tmp_path / "gpt2")
    tokenizer = load_tokenizer(str(path))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path)
    fit_embeddings(model, tokenizer)
    with torch.no_grad():  # logits all 0: every token, the pad among them, drawn with probability 1/V
        model.get_output_embeddings().weight.zero_()
    pad = tokenizer.pad_token_id
    config = GRPOConfig(output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, report_to="none",
                        per_device_train_batch_size=2, num_generations=2, max_completion_length=24)  # fmt: skip
    suppress_pad(config, tokenizer, model)
    trainer = recorded(GRPOTrainer)(
        model=model, reward_funcs=[lambda prompts, completions, **_: [0.0] * len(prompts)], args=config,
        train_dataset=Dataset.from_dict({"prompt": ["the cat"] * 2}), processing_class=tokenizer,
    )  # fmt: skip
    torch.manual_seed(0)  # 128 x 24 draws: about 8 pads expected without suppression
    completion_ids = trainer._generate(["the cat"] * 128)[1]
    assert not any(pad in ids for ids in completion_ids)
    query_ids, query_mask = left_pad([tokenizer("the cat")["input_ids"]] * 128, pad, "cpu")
    generation_config = sampling_config(tokenizer, config, stop_token_ids(tokenizer, model))
    sampled = sample_responses(model.eval(), query_ids, query_mask, generation_config, 128, pad)
    responses = sampled.response_ids[response_mask(sampled.response_ids, generation_config.eos_token_id)]
    assert not (responses == pad).any()  # (pad fills a row after its EOS)


def test_a_models_generation_config_sampling_keys_leak_into_neither_training_nor_the_comparison(tmp_path):
    # TRL passes min_p None and no no_repeat_ngram_size etc.: transformers filled them from the model's
    # generation_config.json, so training and the held-out comparison sampled under rules the recipe never named
    # (no_repeat_ngram_size 1: never a repeated token) while the loss scored the plain softmax (probe 41 E9)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from hfgen.group_rl import pin_model_sampling, recorded, sampling_config, suppress_pad
    from hfgen.models import load_tokenizer
    from hfgen.rl.functional import response_mask
    from hfgen.rl.models import stop_token_ids
    from hfgen.rl.rollout import left_pad, sample_responses

    path = save_tiny_llama(tmp_path / "llama")
    tokenizer = load_tokenizer(str(path))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path)
    model.generation_config.no_repeat_ngram_size = 1
    with torch.no_grad():  # logits all 0: 24 draws from ~500 tokens repeat one in about 4 responses of 10
        model.get_output_embeddings().weight.zero_()
    config = GRPOConfig(output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, report_to="none",
                        per_device_train_batch_size=2, num_generations=2, max_completion_length=24)  # fmt: skip
    suppress_pad(config, tokenizer, model)
    pin_model_sampling(config, [model])
    trainer = recorded(GRPOTrainer)(
        model=model, reward_funcs=[lambda prompts, completions, **_: [0.0] * len(prompts)], args=config,
        train_dataset=Dataset.from_dict({"prompt": ["the cat"] * 2}), processing_class=tokenizer,
    )  # fmt: skip
    torch.manual_seed(0)
    completion_ids = trainer._generate(["the cat"] * 32)[1]
    assert any(len(set(ids)) < len(ids) for ids in completion_ids)
    query_ids, query_mask = left_pad([tokenizer("the cat")["input_ids"]] * 32, tokenizer.pad_token_id, "cpu")
    generation_config = sampling_config(tokenizer, config, stop_token_ids(tokenizer, model))
    sampled = sample_responses(model.eval(), query_ids, query_mask, generation_config, 32, tokenizer.pad_token_id)
    kept = response_mask(sampled.response_ids, generation_config.eos_token_id)
    responses = [ids[mask].tolist() for ids, mask in zip(sampled.response_ids, kept)]
    assert any(len(set(ids)) < len(ids) for ids in responses)


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_dropout_is_off_by_default_as_in_ppo_and_can_be_turned_on(tmp_path, models, stage):
    # TRL's disable_dropout defaults to false: GPT-2's dropout made KL 0.004 at step 1 instead of 0
    from hfgen.recipe import load_recipe

    recipe = write_recipe(tmp_path, models[0], stage=stage)
    assert load_recipe(recipe, check_inputs=False).value("disable_dropout") is True
    assert load_recipe(recipe, ["--disable_dropout", "false"], check_inputs=False).value("disable_dropout") is False


def test_string_prompts_already_rendered_with_the_chat_template_are_not_wrapped_in_it_again():
    # chat_prompts: auto wrapped "<|user|>\n3+8+5=?<|end|>\n<|assistant|>\n" in the template a second time, silently:
    # the policy generated after a user turn holding a whole rendered conversation (exact_answer 0.000 vs 0.250)
    from datasets import Dataset

    from hfgen.errors import UserError
    from hfgen.group_rl import GroupRLArguments, prepare_prompts
    from hfgen.models import build_embedded_tokenizer

    tokenizer = build_embedded_tokenizer()
    questions = [[{"role": "user", "content": f"{a}+1+2=?"}] for a in range(3)]
    rendered = [tokenizer.apply_chat_template(q, tokenize=False, add_generation_prompt=True) for q in questions]
    records = {}
    strings = Dataset.from_list([{"prompt": p} for p in rendered[:2]] + [{"prompt": "2+1+2=?"}])
    # read back as the user turn they render: the same tokens for the policy, the question for reward functions
    assert prepare_prompts(strings, GroupRLArguments(), tokenizer, records)["prompt"] == questions
    assert "2 of 3 string prompts (row 0 first) are already rendered" in records["notes"][0]
    # a rendered conversation of more than one turn is kept as it is
    talk = questions[0] + [{"role": "assistant", "content": "answer: 3"}, {"role": "user", "content": "and 2+2?"}]
    multi = tokenizer.apply_chat_template(talk, tokenize=False, add_generation_prompt=True)
    assert prepare_prompts(Dataset.from_list([{"prompt": multi}]), GroupRLArguments(), tokenizer)["prompt"] == [multi]
    mixed = Dataset.from_list([{"prompt": multi}, {"prompt": "1+1+2=?"}])
    with pytest.raises(UserError, match=r"more than one user turn \(row 0\) and questions .* \(row 1\)"):
        prepare_prompts(mixed, GroupRLArguments(), tokenizer)


def test_string_prompts_already_rendered_with_the_chat_template_are_recorded_as_trained_on_chat():
    # a policy trained on a conversation rendered to a string (kept as it is by chat_prompts: auto, untouched by
    # never) recorded trained_on_chat: false, so `hfgen generate` / `eval` and later stages prompted it raw, in a
    # format it never saw (review 39 F4)
    from datasets import Dataset

    from hfgen.generate import prompts_are_chat
    from hfgen.group_rl import GroupRLArguments, prepare_prompts
    from hfgen.models import build_embedded_tokenizer

    tokenizer = build_embedded_tokenizer()
    talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "name a cat"}]  # fmt: skip
    multi = Dataset.from_list([{"prompt": tokenizer.apply_chat_template(talk, tokenize=False,
                                                                        add_generation_prompt=True)}])  # fmt: skip
    for chat_prompts in ("auto", "never"):
        rows = prepare_prompts(multi, GroupRLArguments(chat_prompts=chat_prompts), tokenizer)
        assert isinstance(rows[0]["prompt"], str) and prompts_are_chat(rows, tokenizer) is True
    assert prompts_are_chat(Dataset.from_list([{"prompt": "name a cat"}]), tokenizer) is False


def test_the_reference_hfgen_hands_over_is_upcast_with_a_policy_that_trains_float32(tmp_path):
    # dtype: bfloat16 trained in full: the policy is upcast to float32 before the trainer is built and computes under
    # bf16 autocast; the reference stayed bfloat16, whose log-probs differ from the policy's start under the same
    # autocast (probe 43 C1: GRPO's kl 7e-05 and kl_to_reference 0.023 at learning rate 0). GRPO and RLOO take
    # hfgen's starting model as `reference` (group_rl.recorded), KTO and DPO as `ref_model`.
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer, RLOOConfig, RLOOTrainer

    from hfgen.finetune import build_trainer
    from hfgen.group_rl import recorded
    from hfgen.models import load_tokenizer

    path = save_tiny_llama(tmp_path / "model")
    tokenizer = load_tokenizer(str(path))
    prompts = Dataset.from_dict({"prompt": ["1+1=", "2+2="] * 2})
    common = {"output_dir": str(tmp_path / "out"), "use_cpu": True, "bf16": False, "report_to": "none",
              "per_device_train_batch_size": 2, "max_steps": 1}  # fmt: skip
    group = {"num_generations": 2, "max_completion_length": 4, "beta": 0.1}

    def brevity(completions, **kwargs):
        return [-len(completion) / 10 for completion in completions]

    def bfloat16_model():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)

    try:
        for trainer_class, config, extra in [
            (recorded(GRPOTrainer), GRPOConfig(**common, **group),
             {"reward_funcs": [brevity], "train_dataset": prompts, "reference": bfloat16_model()}),
            (recorded(RLOOTrainer), RLOOConfig(**common, **group),
             {"reward_funcs": [brevity], "train_dataset": prompts, "reference": bfloat16_model()}),
            (KTOTrainer, KTOConfig(**common), {"ref_model": bfloat16_model(), "train_dataset": Dataset.from_dict(
                {"prompt": ["a", "b"], "completion": [" c", " d"], "label": [True, False]})}),
        ]:  # fmt: skip
            trainer = build_trainer(trainer_class, tmp_path / "out", model=bfloat16_model(), args=config,
                                    processing_class=tokenizer, **extra)  # fmt: skip
            assert next(trainer.model.parameters()).dtype == torch.float32 and trainer.args.bf16
            policy, reference = dict(trainer.model.named_parameters()), dict(trainer.ref_model.named_parameters())
            assert reference.keys() == policy.keys()
            for name, weight in reference.items():  # the same float32 tensors (the values alone were equal before)
                assert weight.dtype == torch.float32 and torch.equal(policy[name], weight), trainer_class.__name__
    finally:  # the trainers' Accelerator ran in bf16: the next test's would find that state, as in one process
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_the_kl_reference_of_a_full_run_from_an_adapter_dir_is_the_merged_starting_model(tmp_path, models, stage):
    # TRL loads the reference from the policy's config._name_or_path, which for a model merged from a LoRA adapter
    # dir is the adapter's base: the KL anchored to the bare base (kl 0.53 at step 1 with learning rate 0, where the
    # policy is the starting model)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)  # an adapter with random A and B: the merged model is far from its base
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(models[0]), config).save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(models[0]).save_pretrained(tmp_path / "adapter")
    train(write_recipe(tmp_path, tmp_path / "adapter", stage=stage, beta=0.1, learning_rate=0.0, max_steps=1,
                       save_strategy="no", steps_per_generation=1, eval_samples_per_prompt=0))  # fmt: skip
    (first,) = [row for row in tracking.read_metrics(tmp_path / "run") if "loss" in row]
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_the_held_out_comparison_samples_the_start_from_trls_reference_without_loading_it_again(
    tmp_path, models, monkeypatch, stage
):
    """With beta != 0 the starting model was loaded three times (policy, TRL's KL reference, and again for the final
    comparison), a third full model resident; the comparison now samples TRL's frozen reference."""
    import hfgen.group_rl

    loads = []
    load_model = hfgen.group_rl.load_model
    monkeypatch.setattr(hfgen.group_rl, "load_model", lambda *a, **k: loads.append(1) or load_model(*a, **k))
    recipe = write_recipe(tmp_path, models[0], stage=stage, beta=0.1, learning_rate=0.0, max_steps=1,
                          save_strategy="no", steps_per_generation=1, eval_samples_per_prompt=1)  # fmt: skip
    result = run_hfgen_here("train", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(loads) == 2  # the policy and the reference (3 before)
    results = tracking.read_json(tmp_path / "run/eval.json")  # learning rate 0: the policy is the starting model
    assert results["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)
    assert results[f"{stage}/reward"] == pytest.approx(results["sft/reward"])


@pytest.mark.parametrize("stage, beta", [("grpo", 0.1), ("rloo", 0.0)])
def test_a_bfloat16_policy_at_learning_rate_zero_has_kl_zero_to_its_start(tmp_path, models, stage, beta):
    # dtype: bfloat16 trained in full: the policy trains float32 weights under bf16 autocast, the reference (and with
    # beta 0 the start the comparison loads) stayed bfloat16, computed without autocast in the comparison, and the
    # policy's log-probs there came from generate's KV-cached passes: at learning rate 0 TRL's kl 7e-05 and
    # eval.json's kl_to_reference 0.023 (probe 43 C1)
    recipe = write_recipe(tmp_path, models[0], stage=stage, dtype="bfloat16", beta=beta, learning_rate=0.0,
                          max_steps=1, save_strategy="no", steps_per_generation=1, eval_samples_per_prompt=1)  # fmt: skip
    result = run_hfgen_here("train", recipe)  # (a fresh accelerate state after it: bf16 would stay for the next test)
    assert result.returncode == 0, result.stderr[-3000:]
    if beta:
        assert all(row["kl"] == 0 for row in tracking.read_metrics(tmp_path / "run") if "kl" in row)
    assert abs(tracking.read_json(tmp_path / "run/eval.json")["kl_to_reference"]) < 1e-6


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_the_held_out_comparison_samples_with_top_k_min_p_and_the_generation_kwargs_trained_with(models, stage):
    # with top_p 1 (TRL's default) the held-out sampling took a shortcut that dropped top_k and min_p, and it never
    # read generation_kwargs, which TRL's generate trains with: eval.json measured another sampling rule
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, RLOOConfig

    from hfgen.group_rl import sampling_config
    from hfgen.models import load_tokenizer
    from hfgen.rl.models import stop_token_ids
    from hfgen.rl.rollout import left_pad, sample_responses

    tokenizer = load_tokenizer(str(models[0]))
    model = AutoModelForCausalLM.from_pretrained(models[0]).eval()
    query_ids, query_mask = left_pad([tokenizer("3+8+5=?")["input_ids"]] * 16, tokenizer.pad_token_id, "cpu")

    def distinct_responses(seeds=None, **keys) -> int:
        config = (GRPOConfig if stage == "grpo" else RLOOConfig)(
            output_dir="unused", use_cpu=True, bf16=False, max_completion_length=8, **keys
        )
        generation_config = sampling_config(tokenizer, config, stop_token_ids(tokenizer, model))
        torch.manual_seed(0)
        sampled = sample_responses(model, query_ids, query_mask, generation_config, 16, tokenizer.pad_token_id, seeds)
        return len({tuple(ids) for ids in sampled.response_ids.tolist()})

    for seeds in (None, list(range(16))):  # generate's own draw, and the per-row seeded one (the comparison's)
        assert distinct_responses(seeds) > 8  # a random model: temperature sampling seldom repeats a response
        assert distinct_responses(seeds, top_k=1) == 1  # greedy
        assert distinct_responses(seeds, min_p=1.0) == 1  # only the most likely token
        assert distinct_responses(seeds, generation_kwargs={"top_k": 1}) == 1


def test_the_held_out_comparison_does_not_depend_on_eval_generation_batch_size(tmp_path, models, stage="grpo"):
    # one seed for the whole comparison: each chunk drew its numbers after the previous chunk's, so the starting
    # model's own figures changed with this memory knob (probe 45 I2); top_k and min_p narrow the sampling, as
    # TRL's training does with them (RLOO's comparison is the same function)
    figures = []
    for chunk in (2, 8):
        directory = tmp_path / f"chunk{chunk}"
        directory.mkdir()
        recipe = write_recipe(directory, models[0], stage=stage, max_steps=1, save_strategy="no",
                              steps_per_generation=1, top_k=20, min_p=0.01, eval_generation_batch_size=chunk)  # fmt: skip
        train(recipe)
        results = tracking.read_json(directory / "run/eval.json")
        figures.append({key: value for key, value in results.items() if key.startswith("sft/")})
    assert figures[0] and figures[0] == figures[1], figures


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_a_reward_model_of_two_labels_exits_2_naming_it(tmp_path, models, stage):
    # transformers refused the 2-row score head as 1 label: a raw size-mismatch RuntimeError (probe 41 E4)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    two = tmp_path / "two_labels"
    AutoModelForSequenceClassification.from_pretrained(models[0], num_labels=2).save_pretrained(two)
    AutoTokenizer.from_pretrained(models[0]).save_pretrained(two)
    recipe = write_recipe(tmp_path, models[0], stage=stage, reward_model_path=str(two), reward_weights=[1.0, 1.0, 0.5])
    for command in ("check", "train"):
        result = run_hfgen_here(command, recipe)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert f"reward_model_path '{two}' is a LlamaForSequenceClassification of 2 labels" in result.stderr


def test_generation_kwargs_the_held_out_comparison_cannot_sample_with_exit_2_naming_them(tmp_path, models):
    kwargs = {"num_beams": 2, "temperature": 0.5, "no_repeat_ngram_size": 2}
    result = run_hfgen_here("check", write_recipe(tmp_path, models[0], generation_kwargs=kwargs))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "generation_kwargs: 'num_beams'" in result.stderr and "generation_kwargs: temperature" in result.stderr
    assert "no_repeat_ngram_size'" not in result.stderr  # one it samples with
    recipe = write_recipe(tmp_path, models[0], generation_kwargs=kwargs, eval_samples_per_prompt=0)
    assert run_hfgen_here("check", recipe).returncode == 0  # no comparison: TRL's business alone


def test_generation_kwargs_harmless_for_the_held_out_comparison_pass_the_check(tmp_path, models):
    # no-op values (do_sample: true, num_beams: 1), output flags and, under use_vllm, vLLM's SamplingParams keys
    # (stop, seed, ...) were refused although training and the comparison sample alike (review 40 F11)
    from trl import GRPOConfig

    kwargs = {"do_sample": True, "num_beams": 1, "num_return_sequences": 1, "output_scores": False, "top_k": 5}
    assert run_hfgen_here("check", write_recipe(tmp_path, models[0], generation_kwargs=kwargs)).returncode == 0
    from hfgen.group_rl import GroupRLArguments, comparison_kwargs, generation_kwargs_problems

    data_args = GroupRLArguments(dataset_name="unused", eval_samples_per_prompt=4)
    vllm_kwargs = {"stop": ["</answer>"], "seed": 1, "skip_special_tokens": False, "top_k": -1}
    vllm = GRPOConfig(output_dir="unused", use_cpu=True, bf16=False, use_vllm=True, generation_kwargs=vllm_kwargs)
    assert generation_kwargs_problems(vllm, data_args) == [] and comparison_kwargs(vllm) == {}  # left out (README)
    plain = GRPOConfig(output_dir="unused", use_cpu=True, bf16=False, generation_kwargs={**kwargs, "do_sample": False})
    assert comparison_kwargs(plain) == {"do_sample": False, "top_k": 5}
    assert [p.split("'")[1] for p in generation_kwargs_problems(plain, data_args)] == ["do_sample"]


def test_string_prompts_rendered_with_a_template_that_writes_the_bos_reach_the_policy_with_one():
    # a prompt rendered with a Llama 3 template starts with <|begin_of_text|>, which the tokenizer adds again: under
    # chat_prompts: never TRL's GRPO and RLOO sampled after '<BOS><BOS>...', unflagged (probe 41 A1)
    from datasets import Dataset

    from hfgen.group_rl import GroupRLArguments, prepare_prompts
    from tiny_models import bos_adding_tokenizer, rendered_with_bos

    tokenizer = bos_adding_tokenizer()
    questions = [[{"role": "user", "content": f"describe the {thing}."}] for thing in ("cat", "dog")]
    rendered = Dataset.from_list(
        [{"prompt": rendered_with_bos(tokenizer, q, generation_prompt=True)} for q in questions]
    )
    records = {}
    rows = prepare_prompts(rendered, GroupRLArguments(chat_prompts="never"), tokenizer, records)
    for ids in tokenizer(list(rows["prompt"]))["input_ids"]:  # as TRL tokenizes string prompts: with the special tokens
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert (
        "2 of 2 rows of the prompt column (row 0 first) already start with the tokenizer's BOS" in records["notes"][0]
    )


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_a_chat_template_whose_turn_end_generation_does_not_stop_at_is_warned_of(tmp_path, stage):
    # from a Qwen2.5 base (turns end <|im_end|>, EOS <|endoftext|>) the policy's responses ran on past the turn's
    # end into a next turn, scored by the rewards and counted unfinished, with no word from the check; the SFT check
    # refuses the same layout (probe 41 A3)
    from hfgen.data.arithmetic import problem_text
    from tiny_models import save_tiny_llama_ending_turns_apart

    model = save_tiny_llama_ending_turns_apart(tmp_path / "base")
    recipe = write_recipe(tmp_path, model, stage, reward_functions=["hfgen.data.arithmetic:exact_answer"],
                          reward_weights=[1.0])  # fmt: skip
    result = run_hfgen_here("check", recipe)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ends assistant turns with '<|end|>', which is not a token generation stops at" in result.stdout
    ending_with_eos = save_tiny_llama(tmp_path / "eos", tokenizer_name="embedded:arithmetic-bpe")
    assert (
        "warning: the chat template"
        not in run_hfgen_here("check", recipe, "--model_name_or_path", ending_with_eos).stdout
    )
    # decided by what reaches the policy, not by chat_prompts: prompts already rendered with the template warn under
    # never too, plain ones under never do not (review 41 F10)
    from hfgen.models import load_tokenizer

    tokenizer = load_tokenizer(str(model))
    prompts = [problem_text((a, a + 1)) for a in range(1, 41)]
    rendered = tmp_path / "rendered.jsonl"
    rendered.write_text("".join(json.dumps({"prompt": tokenizer.apply_chat_template(
        [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)}) + "\n" for p in prompts))  # fmt: skip
    never = ["--chat_prompts", "never"]
    assert (
        "ends assistant turns with '<|end|>'"
        in run_hfgen_here("check", recipe, *never, "--dataset_name", rendered).stdout
    )
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    assert "warning: the chat template" not in run_hfgen_here("check", recipe, *never, "--dataset_name", plain).stdout


def prompts_file(path, tiny_gpt2, short: int, long: int):
    """`short` short prompts and `long` ones of ~220 tokens as the policy reads them (in its chat template): within
    GPT-2's 256 learned positions, but with no room there for a max_completion_length of 64."""
    from hfgen.models import load_tokenizer
    from hfgen.rl.models import prompt_ids

    words = "the red cat sat by the blue river and the dog ran to the house".split()
    text = " ".join(words[i % len(words)] for i in range(600))
    tokenizer = load_tokenizer(str(tiny_gpt2))
    cut = next(n for n in range(50, 600, 5) if len(prompt_ids(tokenizer, [" ".join(text.split()[:n])])[0]) > 215)
    long_prompt = " ".join(text.split()[:cut])
    assert 200 < len(prompt_ids(tokenizer, [long_prompt])[0]) < 256
    rows = [{"prompt": f"what is {i}+{i}?"} for i in range(short)] + [
        {"prompt": f"{i} {long_prompt}"} for i in range(long)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def gpt2_recipe(directory, tiny_gpt2, data, stage="grpo"):
    return write_recipe(
        directory, tiny_gpt2, stage, dataset_name=str(data), reward_functions=["hfgen.data.arithmetic:answer_format"],
        reward_weights=[1.0], eval_samples_per_prompt=0, num_generations=2, per_device_train_batch_size=4,
        max_completion_length=64, max_steps=1, save_strategy="no", steps_per_generation=1,
    )  # fmt: skip


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_prompts_leaving_no_room_to_answer_in_learned_positions_exit_2_at_the_check(tmp_path, stage):
    # GRPO/RLOO checked only max_completion_length against a model's learned positions (GPT-2's 256): a prompt of
    # 220 tokens + 64 completion tokens passed the check (its sample lowered max_new_tokens to fit) and ended
    # `train` in a raw IndexError at the first generation
    tiny_gpt2 = save_tiny_causal_lm(tmp_path / "gpt2", "gpt2")
    recipe = gpt2_recipe(tmp_path, tiny_gpt2, prompts_file(tmp_path / "long.jsonl", tiny_gpt2, 4, 16), stage)
    for command in ("check", "train"):
        result = run_hfgen_here(command, recipe)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "prompts are longer than 192 tokens, the room max_completion_length=64 leaves in the 256 positions" \
            in result.stderr and "lower max_completion_length" in result.stderr  # fmt: skip


@pytest.mark.slow
def test_prompts_leaving_no_room_to_answer_in_learned_positions_are_dropped_and_counted(tmp_path):
    # as PPO drops its prompts over max_prompt_length: the run trains on the others (a long one crashed it)
    tiny_gpt2 = save_tiny_causal_lm(tmp_path / "gpt2", "gpt2")
    recipe = gpt2_recipe(tmp_path, tiny_gpt2, prompts_file(tmp_path / "mixed.jsonl", tiny_gpt2, 30, 6))
    check = run_hfgen_here("check", recipe)
    assert check.returncode == 0, check.stderr[-2000:]
    reason = "longer than 192 tokens, the room max_completion_length=64 leaves in the 256 positions gpt2 models learn"
    assert reason in check.stdout
    train(recipe)
    records = json.loads((tmp_path / "run" / "data.json").read_text())
    dropped = sum(records[split]["dropped"].get(reason, 0) for split in ("train", "eval"))
    assert dropped == 6 and (tmp_path / "run" / "COMPLETE").is_file()
