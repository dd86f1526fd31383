"""Stage `reward`: a Bradley-Terry reward model that ranks held-out pairs and agrees with the embedded oracle on
fresh ones; LoRA runs save one merged classifier; SFT adapter dirs work as a start; ranks agree; bad input exits 2."""

import json

import pytest
import torch

from conftest import REPO, accelerate_launch, run_hfgen, run_hfgen_here, tensorboard_scalars
from hfgen import tracking
from hfgen.cli import main as hfgen_main
from hfgen.data.embedded import oracle_score, preference_pairs
from tiny_models import pretrained_tiny_llama, save_tiny_llama

REWARD = REPO / "recipes/tiny/reward.yaml"
SFT_LORA = REPO / "recipes/tiny/sft_lora.yaml"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return pretrained_tiny_llama(tmp_path_factory)


def on_tiny(model, output_dir, *overrides):
    return ["--model_name_or_path", model, "--output_dir", output_dir, *overrides]


@pytest.fixture(scope="module")
def reward_run(tiny_lm, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("reward")
    result = run_hfgen("train", REWARD, *on_tiny(tiny_lm, output_dir, "--max_steps", "250", "--learning_rate", "2e-3"))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def load_reward_model(path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.slow
def test_reward_model_ranks_held_out_pairs(reward_run):
    from hfgen.data.embedded import TOPIC_TWIN_SHARE, load_embedded
    from hfgen.stages.reward import pairwise_eval, tokenize_pair

    results = tracking.read_json(reward_run / "eval.json")
    # the last 15% of the held-out pairs are topic twins (the same answer about another thing), which this 110k-
    # parameter model (briefly pretrained, 250 steps here) ranks less well than the others (0.89 overall when measured)
    assert results["accuracy"] >= 0.85 and results["margin"] > 1.0, results
    model, tokenizer = load_reward_model(reward_run)
    pairs = list(load_embedded("preferences")["test"])
    before_twins = pairs[: len(pairs) - round(len(pairs) * TOPIC_TWIN_SHARE)]
    ranked = pairwise_eval(model, tokenizer, [tokenize_pair(tokenizer, row) for row in before_twins], batch_size=64)
    assert ranked["accuracy"] >= 0.9, ranked
    assert abs(results["accuracy_initial"] - 0.5) < 0.15  # a fresh head starts at chance
    assert isinstance(results["score_max"], float)  # the ceiling PPO's reward-hacking monitor reads
    assert results["held_out_pairs"] == 300


@pytest.mark.slow
def test_reward_model_agrees_with_the_oracle_on_fresh_pairs(reward_run):
    from hfgen.stages.reward import pairwise_eval, tokenize_pair

    model, tokenizer = load_reward_model(reward_run)
    assert (
        model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    )
    fresh = preference_pairs(400, seed=2024)  # generated from their own seed, never trained on
    assert all(
        oracle_score(p["prompt"][0]["content"], p["chosen"][0]["content"])
        > oracle_score(p["prompt"][0]["content"], p["rejected"][0]["content"])
        for p in fresh
    )
    agreement = pairwise_eval(model, tokenizer, [tokenize_pair(tokenizer, pair) for pair in fresh], batch_size=64)
    assert agreement["accuracy"] >= 0.85, agreement


@pytest.mark.slow
def test_lora_reward_from_an_sft_adapter_saves_one_merged_classifier(tiny_lm, tmp_path):
    sft = run_hfgen("train", SFT_LORA, *on_tiny(tiny_lm, tmp_path / "sft", "--max_steps", "5", "--num_samples", "0"))
    assert sft.returncode == 0, sft.stderr[-3000:]
    overrides = [
        "--max_steps",
        "60",
        "--learning_rate",
        "5e-3",
        "--use_peft",
        "true",
        "--lora_target_modules",
        "all-linear",
    ]
    result = run_hfgen("train", REWARD, *on_tiny(tmp_path / "sft", tmp_path / "reward", *overrides))
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / "reward"
    assert (output / "model.safetensors").is_file() and not (output / "adapter_config.json").exists()
    model, tokenizer = load_reward_model(output)  # plain transformers, no peft
    assert not any("lora_" in name for name, _ in model.named_parameters())
    results = tracking.read_json(output / "eval.json")
    assert results["accuracy"] > results["accuracy_initial"] + 0.15, results
    # the saved (merged) model scores as the run measured it
    from hfgen.data.embedded import load_embedded
    from hfgen.stages.reward import pairwise_eval, tokenize_pair

    held_out = [tokenize_pair(tokenizer, row) for row in load_embedded("preferences")["test"]]
    assert pairwise_eval(model, tokenizer, held_out, batch_size=64)["accuracy"] == pytest.approx(results["accuracy"])


def test_a_sequence_classifier_from_a_causal_lm_keeps_its_backbone(tmp_path):
    from transformers import AutoModelForCausalLM

    from hfgen.finetune import sequence_classifier_from

    causal_lm = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path))
    classifier = sequence_classifier_from(causal_lm)
    assert classifier.config.num_labels == 1 and classifier.score.weight.shape[0] == 1
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        hidden = causal_lm.model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(classifier.model(input_ids=ids).last_hidden_state, hidden)


@pytest.mark.slow
def test_two_processes_end_with_identical_weights(tiny_lm, tmp_path, free_port):
    result = accelerate_launch(
        free_port, REWARD, *on_tiny(tiny_lm, tmp_path, "--max_steps", "6", "--max_eval_samples", "32")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fingerprints = [(tmp_path / f"weights-rank{rank}.sha256").read_text() for rank in (0, 1)]
    assert fingerprints[0] == fingerprints[1]
    assert tracking.read_json(tmp_path / "env.json")["world_size"] == 2 and tracking.is_complete(tmp_path)


def pairs_file(path, explicit_prompt: bool):
    rows = []
    for pair in preference_pairs(120, seed=7):
        if explicit_prompt:  # plain text with a shared prompt
            rows.append(
                {
                    "prompt": pair["prompt"][0]["content"] + "\n",
                    **{k: pair[k][0]["content"] for k in ("chosen", "rejected")},
                }
            )
        else:  # conversational, the prompt inside each conversation
            rows.append({k: pair["prompt"] + pair[k] for k in ("chosen", "rejected")})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("explicit_prompt", [True, False], ids=["plain_with_prompt", "conversational_implicit_prompt"])
def test_plain_and_implicit_prompt_pairs_train(tiny_lm, tmp_path, explicit_prompt):
    from hfgen.recipe import load_recipe
    from hfgen.train import run_recipe

    data = pairs_file(tmp_path / "pairs.jsonl", explicit_prompt)
    overrides = on_tiny(tiny_lm, tmp_path / "out", "--dataset_name", data, "--max_steps", "3")
    run_recipe(load_recipe(REWARD, [str(o) for o in overrides]))
    results = tracking.read_json(tmp_path / "out/eval.json")
    assert results["held_out_pairs"] == 6 and 0 <= results["accuracy"] <= 1 and results["train_tokens"] > 0


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"prompt": "p", "good": "a", "bad": "b"}] * 4, ["good", "chosen", "rejected"]),  # wrong column names
        ([{"prompt": "p", "chosen": "a", "rejected": None}] * 4, ["rejected", "lack a value"]),  # missing values
    ],
)
def test_bad_preference_data_exits_2_naming_the_columns(tmp_path, capsys, rows, expected):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["train", str(REWARD), "--dataset_name", str(data), "--output_dir", str(tmp_path / "out")])
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in message
    for text in expected:
        assert text in message


def test_a_margin_column_goes_into_the_loss_and_a_bad_one_exits_2(tmp_path, capsys):
    # The margin column was dropped with the other columns outside the layout: RewardTrainer, which subtracts it from
    # the reward difference in its loss, never saw it
    from hfgen.recipe import load_recipe
    from hfgen.train import run_recipe

    model = save_tiny_llama(tmp_path / "model")
    pairs = [{k: pair[k][0]["content"] for k in ("chosen", "rejected")} for pair in preference_pairs(40, seed=7)]
    losses = []
    for margin in (0.0, 5.0):
        data = tmp_path / f"margin{margin}.jsonl"
        data.write_text("".join(json.dumps({**pair, "margin": margin}) + "\n" for pair in pairs))
        output_dir = tmp_path / f"out{margin}"
        run_recipe(load_recipe(REWARD, [str(o) for o in on_tiny(model, output_dir, "--dataset_name", data,
                                                                "--max_steps", "1")]))  # fmt: skip
        losses.append(tracking.read_json(output_dir / "eval.json")["train_loss"])
        assert "margin" in tracking.read_json(output_dir / "data.json")
    assert losses[1] > losses[0] + 3  # -log sigmoid(d - 5) against -log sigmoid(d), d about 0 at the start

    data = tmp_path / "bad.jsonl"
    data.write_text(
        "".join(json.dumps({**pair, "margin": "high" if i == 2 else 1}) + "\n" for i, pair in enumerate(pairs))
    )
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["check", str(REWARD), "--dataset_name", str(data), "--output_dir", str(tmp_path / "bad")])
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and "row 3, column 'margin'" in message and "'high'" in message


def test_chat_template_path_is_what_the_pairs_are_rendered_with(tmp_path):
    # The pairs were tokenized with the model's own template, RewardTrainer then applied chat_template_path, and the
    # run saved that template: the saved model scored held-out pairs differently from what eval.json reports
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hfgen.data.prepare import load_for_stage
    from hfgen.recipe import load_recipe
    from hfgen.stages.reward import pairwise_eval, tokenized_pairs
    from hfgen.train import run_recipe

    model = save_tiny_llama(tmp_path / "model")
    template = tmp_path / "other.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] | upper }} >> {{ m['content'] }}\n{% endfor %}")
    data = pairs_file(tmp_path / "pairs.jsonl", explicit_prompt=False)
    output_dir = tmp_path / "out"
    overrides = on_tiny(model, output_dir, "--dataset_name", data, "--max_steps", "2", "--chat_template_path", template)
    run_recipe(load_recipe(REWARD, [str(o) for o in overrides]))

    recipe = load_recipe(output_dir / "recipe.yaml", check_inputs=False)
    _, evaluation, _ = load_for_stage(recipe.configs[1], "preference", seed=recipe.configs[2].seed)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert tokenizer.chat_template == template.read_text()
    pairs = tokenized_pairs(evaluation, tokenizer, None, {}, "eval")
    saved = pairwise_eval(AutoModelForSequenceClassification.from_pretrained(output_dir), tokenizer,
                          list(zip(pairs["chosen_ids"], pairs["rejected_ids"])), 8)  # fmt: skip
    assert saved["margin"] == pytest.approx(tracking.read_json(output_dir / "eval.json")["margin"], abs=1e-5)


def test_an_unchanged_model_under_bf16_mixed_precision_scores_the_same_before_and_after(tiny_lm, tmp_path):
    # the initial scores were computed in float32 (the model not yet prepared), the final ones under the bf16 autocast
    # of the prepared model: margin -0.005600 -> -0.005646 at learning rate 0
    overrides = on_tiny(tiny_lm, tmp_path / "out", "--max_steps", "1", "--learning_rate", "0.0", "--bf16", "true",
                        "--max_train_samples", "16", "--max_eval_samples", "32")  # fmt: skip
    result = run_hfgen_here("train", REWARD, *overrides)  # (a fresh accelerate state after it, bf16 not kept)
    assert result.returncode == 0, result.stderr[-3000:]
    results = tracking.read_json(tmp_path / "out/eval.json")
    assert results["margin"] == results["margin_initial"] and results["accuracy"] == results["accuracy_initial"]


def test_the_logged_held_out_accuracy_is_named_as_the_batch_mean_it_is(tiny_lm, tmp_path):
    """metrics.jsonl's eval_accuracy was TRL's mean of batch means (0.8125 against eval.json's 0.7 per pair): it is
    logged as eval_batch_mean_accuracy, so that it is not mistaken for the per-pair figure. The trackers get the same
    name: TensorBoard logged eval/accuracy, the report_to callbacks running before the rename."""
    from hfgen.recipe import load_recipe
    from hfgen.train import run_recipe

    data = pairs_file(tmp_path / "pairs.jsonl", True)
    overrides = on_tiny(tiny_lm, tmp_path / "out", "--dataset_name", data, "--max_steps", "2", "--eval_strategy",
                        "steps", "--eval_steps", "1", "--per_device_eval_batch_size", "4", "--report_to", "tensorboard")  # fmt: skip
    run_recipe(load_recipe(REWARD, [str(o) for o in overrides]))
    rows = tracking.read_jsonl(tmp_path / "out/metrics.jsonl")
    evaluated = [row for row in rows if "eval_loss" in row]
    assert evaluated and all("eval_batch_mean_accuracy" in row and "eval_accuracy" not in row for row in evaluated)
    tags = tensorboard_scalars(tmp_path / "out/runs")
    assert "eval/batch_mean_accuracy" in tags and "eval/accuracy" not in tags


def test_a_metric_for_best_model_the_evaluation_does_not_log_exits_2_naming_the_logged_ones(tiny_lm, tmp_path):
    # TRL's name 'accuracy' (logged here as batch_mean_accuracy) was a KeyError traceback from transformers, exit 1,
    # at the first evaluation
    data = pairs_file(tmp_path / "pairs.jsonl", True)
    best = ["--load_best_model_at_end", "true", "--metric_for_best_model", "accuracy"]
    result = run_hfgen_here("train", REWARD, *on_tiny(tiny_lm, tmp_path / "out", "--dataset_name", data, "--max_steps",
                            "2", "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "steps", "--save_steps", "1", *best))  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "metric_for_best_model: 'accuracy'" in result.stderr and "batch_mean_accuracy" in result.stderr
    assert not tracking.is_complete(tmp_path / "out")


def test_a_base_whose_pad_is_its_eos_trains_a_reward_model_that_reads_the_eos(tmp_path, capsys):
    # The classifier reads the last token that is not the pad: with the pad the EOS (Qwen2 base's, many Llama
    # fine-tunes'), the one before the closing EOS, so a finished answer and the same answer cut off scored alike in
    # PPO, GRPO and hfgen eval (probe 39 F2: -0.20358343 and -0.20358346)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hfgen.evaluation.command import load_reward_model as load_judge
    from hfgen.recipe import load_recipe
    from hfgen.rl.rollout import RewardScorer
    from hfgen.train import run_recipe

    base = save_tiny_llama(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"pad_token_id": tokenizer.eos_token_id}))
    refused = run_hfgen_here("check", REWARD, *on_tiny(base, tmp_path / "refused", "--pad_token", tokenizer.eos_token))
    assert refused.returncode == 2 and "pad_token '<|end|>' is the EOS" in refused.stderr, refused.stderr[-3000:]

    output_dir = tmp_path / "out"
    small = ["--max_steps", "1", "--max_train_samples", "32", "--max_eval_samples", "8"]
    run_recipe(load_recipe(REWARD, [str(o) for o in on_tiny(base, output_dir, *small)]))
    judge_tokenizer, judge = load_judge(str(output_dir), "cpu")
    assert judge.config.pad_token_id == judge_tokenizer.pad_token_id != judge_tokenizer.eos_token_id
    capsys.readouterr()
    scored, _ = RewardScorer(judge, judge_tokenizer, {}, [1.0], 2)(["the cat"] * 2, [" is kind."] * 2, [True, False],
                                                                   "cpu")  # fmt: skip
    assert scored[0] != scored[1]  # shown finished (EOS) and cut off
    assert "pad token is its EOS" not in capsys.readouterr().out

    # a reward model trained so before: said at loading, since it cannot tell the two apart
    older = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    scored, _ = RewardScorer(older, tokenizer, {}, [1.0], 2)(["the cat"] * 2, [" is kind."] * 2, [True, False], "cpu")
    assert scored[0] == scored[1] and "pad token is its EOS" in capsys.readouterr().out


def test_a_reward_model_broken_by_the_last_update_is_not_saved(tiny_lm, tmp_path):
    """The guard checks a step's loss and gradients before its update: the last one's (learning rate 1e12) left a
    model whose every score was NaN, saved with exit 0 and COMPLETE (eval.json margin NaN) for PPO to train on. Its
    held-out scores, measured before the save, stop the run as diverged."""
    data = pairs_file(tmp_path / "pairs.jsonl", True)
    result = run_hfgen_here("train", REWARD, *on_tiny(tiny_lm, tmp_path / "out", "--dataset_name", data, "--max_steps",
                            "1", "--learning_rate", "1e12", "--warmup_steps", "0"))  # fmt: skip
    assert result.returncode == 3, result.stderr[-3000:]
    assert "training ended at step 1 with a model that no longer computes: its held-out score margin is nan" in (
        result.stderr
    )
    assert not tracking.is_complete(tmp_path / "out") and not (tmp_path / "out/model.safetensors").exists()


def test_pairs_rendered_with_a_template_that_writes_the_bos_are_scored_with_one(tmp_path):
    # a prompt rendered with a Llama 3 template starts with <|begin_of_text|>, which the tokenizer adds again: the
    # reward model trained on '<BOS><BOS>...', unflagged, and PPO, GRPO and `hfgen eval` score it with one (probe 41 A1)
    from hfgen.recipe import load_recipe
    from hfgen.train import run_recipe
    from tiny_models import rendered_with_bos, save_tiny_llama_adding_bos

    base = save_tiny_llama_adding_bos(tmp_path / "base")
    from hfgen.models import load_tokenizer

    tokenizer = load_tokenizer(str(base))
    rows = []
    for pair in preference_pairs(40, seed=7):
        prompt = rendered_with_bos(tokenizer, pair["prompt"], generation_prompt=True)
        rows.append({"prompt": prompt, **{k: pair[k][0]["content"] + "<|end|>" for k in ("chosen", "rejected")}})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run_recipe(
        load_recipe(
            REWARD, [str(o) for o in on_tiny(base, tmp_path / "out", "--dataset_name", data, "--max_steps", "1")]
        )
    )
    notes = tracking.read_json(tmp_path / "out/data.json")["notes"]
    assert any("rows of the prompt column (row 0 first) already start with the tokenizer's BOS" in n for n in notes)


def test_lora_with_a_chat_template_path_that_brings_new_tokens_exits_2_as_sft_does(tmp_path):
    # the template's tokens (ChatML's <|im_start|>/<|im_end|> on a base without them) were added to the tokenizer
    # before RewardTrainer looked for new tokens to train, so under LoRA their embedding rows stayed random in every
    # pair the reward model trained on, exit 0 (probe 41 A2); SFT refuses the combination at the check
    from transformers import AutoTokenizer

    base = save_tiny_llama(tmp_path / "base")
    more_tokens = tmp_path / "more_tokens"
    source = AutoTokenizer.from_pretrained(base)
    source.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    source.save_pretrained(more_tokens)
    lora = on_tiny(base, tmp_path / "out", "--use_peft", "true", "--chat_template_path", more_tokens)
    result = run_hfgen_here("check", REWARD, *lora)
    assert result.returncode == 2, result.stdout[-2000:]
    assert "chat_template_path" in result.stderr and "brings 1 token(s) the model's tokenizer lacks (<|tool|>)" in (
        result.stderr
    )
    full = run_hfgen_here("check", REWARD, *on_tiny(base, tmp_path / "full", "--chat_template_path", more_tokens))
    assert full.returncode == 0, full.stderr[-2000:]


def test_a_reward_lora_checkpoint_whose_base_was_trained_again_in_place_is_refused_as_a_reward_model(tmp_path):
    # a reward run's checkpoint-N (a SEQ_CLS adapter) given as a reward model (hfgen eval --reward_model, PPO's and
    # GRPO/RLOO's reward_model_path) was scored on whatever its base dir held: after the base was retrained in place
    # the scores changed with no word, as policies' adapters are refused (probe 42 I3)
    import yaml

    from hfgen.recipe import load_recipe
    from hfgen.train import run_recipe

    base = save_tiny_llama(tmp_path / "base")
    tracking.mark_complete(base)  # the base is an hfgen run (a pretrain run's COMPLETE marker)
    overrides = ["--use_peft", "true", "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "1"]
    overrides += ["--max_train_samples", "16", "--save_strategy", "steps", "--save_steps", "1"]
    run_recipe(load_recipe(REWARD, list(map(str, on_tiny(base, tmp_path / "reward", *overrides)))))
    checkpoint = tmp_path / "reward" / "checkpoint-1"
    assert (checkpoint / "adapter_config.json").is_file()
    evaluate = ["eval", base, "--reward_model", checkpoint, "--num_prompts", "2", "--num_samples", "1"]
    evaluate += ["--max_new_tokens", "4", "--perplexity_dataset", "none", "--oracle", "none", "--quiet"]
    evaluate += ["--output", tmp_path / "eval.json"]
    result = run_hfgen_here(*evaluate)
    assert result.returncode == 0, result.stderr[-2000:]  # on its own base: scored
    tracking.mark_complete(base)  # trained again in place: another run
    changed = f"'{checkpoint}': the adapter '{checkpoint}' was trained on the run"
    result = run_hfgen_here(*evaluate)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"--reward_model {changed}" in result.stderr
    ppo = yaml.safe_load((REPO / "recipes/tiny/ppo.yaml").read_text()) | {
        "model_name_or_path": str(base), "reward_model_path": str(checkpoint), "output_dir": str(tmp_path / "ppo"),
    }  # fmt: skip
    grpo = {
        "stage": "grpo", "model_name_or_path": str(base), "dataset_name": "embedded:prompts",
        "reward_model_path": str(checkpoint), "num_generations": 2, "per_device_train_batch_size": 4,
        "max_completion_length": 4, "output_dir": str(tmp_path / "grpo"), "use_cpu": True, "bf16": False,
    }  # fmt: skip
    for stage, recipe in (("ppo", ppo), ("grpo", grpo)):
        (tmp_path / f"{stage}.yaml").write_text(yaml.safe_dump(recipe))
        result = run_hfgen_here("check", tmp_path / f"{stage}.yaml")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert f"reward_model_path {changed}" in result.stderr, result.stderr[-2000:]


def test_the_check_measures_pairs_at_the_learned_positions_training_lowers_max_length_to(tmp_path):
    # on GPT-2 (256 learned positions) the check measured the pairs at the recipe's max_length (1024: none too long)
    # while training lowers it to 256 first, then refused the run once the model had loaded (probe 42 E6, reward)
    from tiny_models import save_tiny_causal_lm

    gpt2 = save_tiny_causal_lm(tmp_path / "gpt2", "gpt2")
    prompt = " ".join(["the red cat sat by the river"] * 45)  # ~300 tokens
    pairs = [{"prompt": f"{i} {prompt}", "chosen": " the cat is red.", "rejected": " the dog is blue."}
             for i in range(12)]  # fmt: skip
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    result = run_hfgen_here("check", REWARD, "--model_name_or_path", gpt2, "--dataset_name", data,
                            "--max_length", "1024", "--output_dir", tmp_path / "out")  # fmt: skip
    assert result.returncode == 2 and "pairs are longer than max_length=256 tokens" in result.stderr, result.stderr
