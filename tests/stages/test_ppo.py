"""Stage `ppo` end to end on tiny models: bad input exits 2, a zero learning rate changes nothing (KL 0), the oracle
reward rises, the LoRA reference is the adapter-disabled policy, two processes agree, resume is exact, and a minibatch
split otherwise (per-device batch x accumulation x processes) takes the same update."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import accelerate_launch, run_hfgen, run_hfgen_here
from hfgen import tracking

ORACLE = "hfgen.data.embedded:oracle_scores"
SFT_STEPS = 100  # enough for the tiny policy to answer in the embedded format and end with EOS
EVAL_FAST = ["--num_prompts", "4", "--num_samples", "2", "--max_new_tokens", "8", "--speed_new_tokens", "4",
             "--speed_batch_size", "2", "--perplexity_texts", "8", "--quiet"]  # fmt: skip
LORA = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
# stop_on_hacking's run (8 steps of 8 episodes): a reward ceiling below every score makes the above-ceiling signal
# hold from step 4, the first after a 3-step baseline; with patience 2 the monitor alerts at step 5, and the run
# stops there keeping the average of the two policies of steps 1-5 it judges best on 64 held-out answers each (the
# tests below, scripts/kill_matrix.py)
STOPS_AT_STEP_5 = dict(
    reward_functions=["hfgen.data.embedded:hackable_reward_scores"], total_episodes=64, gradient_accumulation_steps=1,
    stop_on_hacking=True, reward_ceiling=-100.0, monitor_baseline_steps=3, monitor_keep_samples=64,
)  # fmt: skip


def build_tiny_models(root):
    """A tiny Llama briefly fine-tuned on the embedded conversations (a stand-in for an SFT run: it answers
    'the red cat is kind and sad.' and stops), and a random one-label reward model with the same tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from hfgen.data.embedded import generate_rows
    from hfgen.models import build_embedded_tokenizer

    tokenizer = build_embedded_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    texts = [
        tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in generate_rows("instructions", "train")
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    tokenizer.padding_side = "right"
    for _ in range(SFT_STEPS):
        rows = torch.randint(len(texts), (32,), generator=generator).tolist()
        batch = tokenizer([texts[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tokenizer.padding_side = "left"
    model.save_pretrained(root / "sft")
    tokenizer.save_pretrained(root / "sft")
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    return root / "sft", root / "reward"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


def write_recipe(path, sft, **values):
    recipe = {
        "stage": "ppo", "model_name_or_path": str(sft), "dataset_name": "embedded:prompts",
        "oracle_function": ORACLE, "output_dir": str(path / "run"), "total_episodes": 48,
        "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "num_mini_batches": 1,
        "num_ppo_epochs": 2, "response_length": 16, "learning_rate": 1e-3, "max_eval_samples": 4,
        "eval_samples_per_prompt": 2, "sample_steps": 0, "use_cpu": True, "seed": 7,
    }  # fmt: skip
    recipe.update(values)
    (path / "ppo.yaml").write_text(yaml.safe_dump(recipe))
    return path / "ppo.yaml"


def train(recipe, *overrides):
    result = run_hfgen("train", recipe, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def save_two_label_classifier(reward, directory):
    """`reward` re-saved as a classifier of two labels (a sentiment classifier given as the judge)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(reward)
    config.num_labels = 2
    model = AutoModelForSequenceClassification.from_pretrained(reward, config=config, ignore_mismatched_sizes=True)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(reward).save_pretrained(directory)
    return directory


def test_a_reward_model_of_two_labels_exits_2_naming_it_before_loading(tmp_path, tiny_models):
    # transformers refused the 2-row score head as 1 label: a raw size-mismatch RuntimeError in check, train and
    # hfgen eval (probe 41 E4)
    sft, reward = tiny_models
    two = save_two_label_classifier(reward, tmp_path / "two_labels")
    recipe = write_recipe(tmp_path, sft, reward_model_path=str(two))
    for command in ("check", "train"):
        result = run_hfgen_here(command, recipe)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert f"reward_model_path '{two}' is a LlamaForSequenceClassification of 2 labels" in result.stderr
    result = run_hfgen_here("eval", sft, "--reward_model", two, "--output", tmp_path / "eval.json", *EVAL_FAST)
    assert result.returncode == 2 and f"--reward_model '{two}' is a" in result.stderr, result.stderr[-2000:]
    # a value model of several labels too
    result = run_hfgen_here(
        "check", write_recipe(tmp_path, sft, reward_model_path=str(reward), value_model_path=str(two))
    )
    assert result.returncode == 2 and f"value_model_path '{two}' is a" in result.stderr, result.stderr[-2000:]


def test_bad_recipes_exit_2_naming_every_problem(tmp_path, tiny_models):
    sft, _ = tiny_models
    recipe = write_recipe(tmp_path, sft, reward_functions=["hfgen.data.embedded:no_such_function"], num_ppo_epochs=0)
    result = run_hfgen_here("train", recipe, "--reward_model_path", tmp_path / "missing", "--kl_estimator", "k2")
    assert result.returncode == 2
    assert "'k2' is not one of" in result.stderr and "Traceback" not in result.stderr
    result = run_hfgen_here("train", recipe, "--reward_model_path", tmp_path / "missing")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for fragment in ("no_such_function", "num_ppo_epochs must be at least 1", "reward_model_path", "does not exist"):
        assert fragment in result.stderr, fragment
    result = run_hfgen_here("train", write_recipe(tmp_path, sft))  # no reward model and no reward function
    assert result.returncode == 2 and "no reward" in result.stderr
    # options of a loss whose weight is 0 were silently unused (the reverse, a weight without its data, was refused)
    recipe = write_recipe(tmp_path, sft, reward_functions=[ORACLE], ptx_dataset_name="embedded:corpus")
    result = run_hfgen_here("train", recipe, "--kl_loss_estimator", "k2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "ptx_dataset_name 'embedded:corpus' needs ptx_coef > 0" in result.stderr
    assert "kl_loss_estimator 'k2' needs kl_loss_coef > 0" in result.stderr
    # missing ptx data: found after every model had loaded, named as the prompt data's dataset_name
    recipe = write_recipe(tmp_path, sft, reward_functions=[ORACLE], ptx_coef=1.0,
                          ptx_dataset_name=str(tmp_path / "missing.jsonl"))  # fmt: skip
    result = run_hfgen_here("train", recipe)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "PPO:" not in result.stdout
    assert f"ptx_dataset_name '{tmp_path / 'missing.jsonl'}' does not exist" in result.stderr
    # ptx data whose every text is blank: passed the check, and stopped once every model had loaded
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n{"text": "  "}\n')
    result = run_hfgen_here("train", write_recipe(tmp_path, sft, reward_functions=[ORACLE], ptx_coef=1.0,
                                                  ptx_dataset_name=str(blank)))  # fmt: skip
    assert result.returncode == 2 and "PPO:" not in result.stdout
    assert f"ptx_dataset_name '{blank}' holds no non-empty text to learn from: its train split's 2 row(s)" in (
        result.stderr
    )


def test_a_kl_target_whose_update_cannot_keep_kl_coef_positive_exits_2(tmp_path, tiny_models):
    # the adaptive update multiplies kl_coef by 1 +- 0.2 x episodes / kl_horizon: with 16 episodes a step and a
    # horizon of 3 a KL under target made it negative (a KL bonus), and from kl_coef 0 it stayed 0; both trained
    sft, _ = tiny_models
    recipe = write_recipe(tmp_path, sft, reward_functions=[ORACLE], kl_target=1.0, kl_horizon=3, kl_coef=0.0)
    result = run_hfgen_here("check", recipe)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "from kl_coef 0.0 it stays there" in result.stderr
    assert "kl_horizon 3 is at most 1/5 of a step's 16 episodes" in result.stderr, result.stderr[-2000:]
    assert run_hfgen_here("check", recipe, "--kl_horizon", "20", "--kl_coef", "0.05").returncode == 0


def save_reward_lora(sft, directory):
    """A reward LoRA adapter on `sft` as a reward run's checkpoint-N is saved: SEQ_CLS, its new score head trained in
    full (modules_to_save), the tokenizer beside it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    get_peft_model(model, lora).save_pretrained(directory)
    AutoTokenizer.from_pretrained(sft).save_pretrained(directory)
    return directory


def test_a_reward_lora_adapter_serves_as_reward_and_value_model(tmp_path, tiny_models):
    # its loader passed model_args.trust_remote_code, which TRL's ModelConfig has not: a raw AttributeError in check
    # (the reward scorer) and train (the value model) (probe 42 I4)
    sft, _ = tiny_models
    adapter = save_reward_lora(sft, tmp_path / "reward_lora")
    recipe = write_recipe(tmp_path, sft, reward_model_path=str(adapter), total_episodes=8,
                          gradient_accumulation_steps=1, num_ppo_epochs=1, eval_samples_per_prompt=1)  # fmt: skip
    result = run_hfgen_here("check", recipe)
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_hfgen_here("train", recipe)  # the value model starts from the reward model
    assert result.returncode == 0, result.stderr[-2000:]
    # and trains: peft loaded the adapter frozen, and the critic stayed the reward model (probe 43 C6)
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification

    start = AutoPeftModelForSequenceClassification.from_pretrained(adapter, num_labels=1).merge_and_unload()
    trained = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "value_model", num_labels=1)
    start, trained = start.state_dict(), trained.state_dict()
    moved = [name for name in trained if name in start and not torch.equal(trained[name], start[name])]
    assert "score.weight" in moved and len(moved) > len(trained) / 2, moved


def test_a_value_model_of_another_vocabulary_or_without_a_per_token_head_exits_2_naming_the_key(tmp_path, tiny_models):
    # value_model_path of another vocabulary was accepted silently (the check ran only for the reward model), and a
    # BERT classifier was said to be "no AutoModelForSequenceClassification" though it is one
    from transformers import BertConfig, BertForSequenceClassification

    from hfgen.models import build_embedded_tokenizer
    from tiny_models import save_tiny_llama

    sft, _ = tiny_models
    recipe = write_recipe(tmp_path, sft, reward_functions=[ORACLE], total_episodes=16, gradient_accumulation_steps=1)
    other = save_tiny_llama(tmp_path / "other", tokenizer_name="embedded:arithmetic-bpe")
    result = run_hfgen_here("check", recipe, "--value_model_path", other)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"value_model_path '{other}' has another vocabulary" in result.stderr, result.stderr[-2000:]
    tokenizer = build_embedded_tokenizer()
    bert = tmp_path / "bert"
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128, num_labels=1)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    result = run_hfgen_here("train", recipe, "--value_model_path", bert)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for fragment in (f"value_model_path '{bert}' is a BertForSequenceClassification", "must be a decoder"):
        assert fragment in result.stderr, result.stderr[-2000:]


def test_zero_learning_rate_leaves_the_policy_unchanged_and_kl_zero(tmp_path, tiny_models):
    sft, reward = tiny_models
    recipe = write_recipe(
        tmp_path, sft, reward_model_path=str(reward), learning_rate=0.0, total_episodes=32,
        eval_functions=["hfgen.data.embedded:on_topic_scores"],
    )  # fmt: skip
    train(recipe)
    run = tmp_path / "run"
    before, after = load_file(sft / "model.safetensors"), load_file(run / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    metrics = tracking.read_metrics(run)
    assert len(metrics) == 2
    for row in metrics:
        assert abs(row["objective/kl"]) < 1e-4 and row["policy/clipfrac_avg"] == 0.0
        assert row["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    results = tracking.read_json(run / "eval.json")
    assert abs(results["kl_to_reference"]) < 1e-4
    assert results["win_rate/reward_model"] == results["win_rate/oracle"] == 0.5  # same samples: all ties
    assert results["monitor/alerts"] == [] and results["stopped_early"] is False  # the monitor is on, and quiet
    assert results["trained_on_chat"] is True  # its string prompts, as one user turn: generate / eval prompt so
    assert 0 <= results["ppo/on_topic_scores"] == results["sft/on_topic_scores"] <= 1  # an eval_functions judge
    for name in ("COMPLETE", "recipe.yaml", "tokenizer_config.json", "value_model/model.safetensors"):
        assert (run / name).exists(), name
    # `hfgen eval` on the PPO output dir: the unchanged policy ties its SFT baseline, PPO's own figures are kept
    evaluated = run_hfgen("eval", run, "--reward_model", reward, "--baseline", sft, "--chat", *EVAL_FAST)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    merged = tracking.read_json(run / "eval.json")
    assert merged["quality/win_rate_vs_baseline_by_reward"] == 0.5 and merged["eval/chat"] is True
    assert merged["kl_to_reference"] == results["kl_to_reference"]
    # and so are the settings of PPO's held-out comparison (were eval/... keys, which hfgen eval replaced)
    assert {key: merged.get(key) for key in results if key.startswith("heldout/")} == {
        key: results[key] for key in results if key.startswith("heldout/")
    } and "heldout/temperature" in results


def test_the_held_out_comparison_answers_a_repeated_prompt_once_as_dpos_does(tmp_path, tiny_models):
    # embedded:prompts' test split repeats 4 prompts: PPO's comparison answered each copy, so a repeated prompt
    # weighed twice and its self-BLEU group pooled both copies' samples (DPO's comparison de-duplicates)
    sft, _ = tiny_models
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    lines = [
        {"prompt": [{"role": "user", "content": f"write about the {thing}."}]} for thing in ("star", "moon", "star")
    ]
    (prompts / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in lines * 6))
    (prompts / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in lines))
    recipe = write_recipe(tmp_path, sft, dataset_name=str(prompts), max_eval_samples=None, total_episodes=16,
                          reward_functions=[ORACLE])  # fmt: skip
    train(recipe)
    results = tracking.read_json(tmp_path / "run" / "eval.json")
    rows = [json.loads(line) for line in (tmp_path / "run" / "policy_eval.jsonl").read_text().splitlines()]
    assert results["heldout/num_prompts"] == 2 and len(rows) == 4


def test_a_policy_broken_by_the_last_update_is_not_saved(tmp_path, tiny_models):
    """The guard checks each optimizer step's loss and gradients before its update: the last one's (learning rate
    1e12, one minibatch, one epoch) left a policy and value model computing NaN, saved, then the final comparison
    ended in a raw TypeError (exit 1) with the models on disk. The policy's log-probabilities and the values on the
    last rollout, measured before the save, stop the run as diverged."""
    sft, reward = tiny_models
    recipe = write_recipe(tmp_path, sft, reward_model_path=str(reward), learning_rate=1e12, total_episodes=8,
                          gradient_accumulation_steps=1, num_ppo_epochs=1)  # fmt: skip
    result = run_hfgen_here("train", recipe)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "training ended at step 1 with a model that no longer computes: its log-probability of the last " in (
        result.stderr
    )
    assert "its value on the last rollout's responses is nan" in result.stderr
    assert not tracking.is_complete(tmp_path / "run") and not (tmp_path / "run/model.safetensors").exists()


def test_a_checkpoint_whose_weights_went_to_inf_is_not_kept_as_complete(tmp_path, tiny_models):
    """Learning rate 1e39: step 1's update made every trained weight inf, and checkpoint-1 was marked complete, to
    be offered to `resume_from_checkpoint: true` (step 2 then sampled from it). The trained weights are checked
    before a checkpoint is written: the run stops at step 1 as diverged, no checkpoint kept."""
    sft, reward = tiny_models
    recipe = write_recipe(tmp_path, sft, reward_model_path=str(reward), learning_rate=1e39, total_episodes=16,
                          gradient_accumulation_steps=1, num_ppo_epochs=1, save_steps=1)  # fmt: skip
    result = run_hfgen_here("train", recipe)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "training stopped at step 1: its update left trained weights that are inf or NaN" in result.stderr
    assert "checkpoint-1 was not kept" in result.stderr and "no complete checkpoint was written" in result.stderr
    assert not tracking.checkpoints(tmp_path / "run") and not tracking.is_complete(tmp_path / "run")


@pytest.mark.slow
def test_oracle_reward_rises(tmp_path, tiny_models):
    sft, _ = tiny_models
    recipe = write_recipe(
        tmp_path, sft, reward_functions=[ORACLE], total_episodes=320, per_device_train_batch_size=16,
        gradient_accumulation_steps=1, num_mini_batches=2, num_ppo_epochs=4, kl_coef=0.01, sample_steps=5,
        max_eval_samples=16, eval_samples_per_prompt=4,
    )  # fmt: skip
    train(recipe)
    run = tmp_path / "run"
    oracle = [row["oracle/score"] for row in tracking.read_metrics(run)]
    assert len(oracle) == 10
    assert sum(oracle[-3:]) / 3 > sum(oracle[:3]) / 3 + 0.5, oracle
    results = tracking.read_json(run / "eval.json")
    assert results["ppo/oracle"] > results["sft/oracle"] and results["win_rate/oracle"] > 0.55, results
    assert 0 < results["kl_to_reference"] < 20
    samples = [yaml.safe_load(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {row["step"] for row in samples} == {1, 5, 10} and all("oracle" in row for row in samples)


def test_a_bfloat16_policy_trains_float32_weights_so_ppo_updates_land(tmp_path, tiny_models):
    """`dtype: bfloat16` at a PPO learning rate (1e-6): updated in bfloat16, the policy would barely move (its
    AdamW steps round away against the weights); the policy and critic keep float32 weights under bf16 compute."""
    from stages.test_sft import share_moved

    sft, _ = tiny_models
    recipe = write_recipe(tmp_path, sft, dtype="bfloat16", learning_rate=1e-6, reward_functions=[ORACLE],
                          total_episodes=16, eval_samples_per_prompt=0)  # fmt: skip
    result = train(recipe)
    assert share_moved(sft, tmp_path / "run") > 0.5  # 0.7 (unused tokens' embeddings stay); in bfloat16: 0.003
    assert "the trained weights stay float32" in result.stdout


@pytest.mark.parametrize("precision", [{"dtype": "bfloat16"}, {"dtype": "float32", "bf16": True}],
                         ids=["dtype_bfloat16", "float32_bf16"])  # fmt: skip
def test_a_policy_under_bf16_at_learning_rate_zero_has_kl_zero_to_its_reference_and_ratio_one(
    tmp_path, tiny_models, precision
):
    """`dtype: bfloat16` trained in full: the policy trains float32 weights under bf16 autocast, the reference stayed
    bfloat16 (rounding what the float32 copy keeps); and under bf16 (the shipped recipes' float32 + `bf16: true`
    too) the rollout's log-probs came from generate's KV-cached passes, which round differently from the full passes
    of the reference and the update: at learning rate 0 objective/kl -0.0023 and 0.0058 (-0.015 with float32 +
    bf16), the first ratio 1.0018, eval.json's kl_to_reference 0.005 (probe 43 C1)."""
    sft, _ = tiny_models
    recipe = write_recipe(tmp_path, sft, learning_rate=0.0, reward_functions=[ORACLE], total_episodes=32,
                          **precision)  # fmt: skip
    result = run_hfgen_here("train", recipe)  # (a fresh accelerate state after it: bf16 would stay for the next test)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = tracking.read_metrics(tmp_path / "run")
    assert len(metrics) == 2
    for row in metrics:
        assert abs(row["objective/kl"]) < 1e-6 and row["val/ratio"] == pytest.approx(1.0, abs=1e-6), row
    assert abs(tracking.read_json(tmp_path / "run/eval.json")["kl_to_reference"]) < 1e-6


def test_a_lora_run_on_a_bfloat16_base_under_bf16_trains_the_value_head_in_float32(tmp_path, tiny_models):
    # peft upcasts its adapter layers only: the value model's `score` head (modules_to_save) trained in bfloat16, 81%
    # of its first updates rounded away at 1e-5 and saved bfloat16 (probe 43 C7)
    sft, _ = tiny_models
    recipe = write_recipe(tmp_path, sft, dtype="bfloat16", bf16=True, learning_rate=1e-5, reward_functions=[ORACLE],
                          total_episodes=16, eval_samples_per_prompt=0, **LORA)  # fmt: skip
    result = run_hfgen_here("train", recipe)  # (a fresh accelerate state after it: bf16 would stay for the next test)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = load_file(tmp_path / "run/value_model/adapter_model.safetensors")
    heads = {name: weight for name, weight in saved.items() if "score" in name}
    assert heads and all(weight.dtype == torch.float32 for weight in heads.values()), heads


def test_lora_policy_has_no_reference_copy_and_starts_at_kl_zero(tmp_path, tiny_models):
    from peft import PeftModel
    from trl import ModelConfig

    from hfgen.stages.ppo import PPOConfig, load_policy_and_reference

    sft, _ = tiny_models
    model_args = ModelConfig(
        model_name_or_path=str(sft), use_peft=True, lora_r=4, lora_target_modules=["q_proj", "v_proj"]
    )
    _, policy, reference = load_policy_and_reference(model_args, PPOConfig(output_dir=str(tmp_path)))
    assert reference is None and isinstance(policy, PeftModel)
    base_parameters = sum(t.numel() for t in load_file(sft / "model.safetensors").values())
    lora_parameters = sum(p.numel() for name, p in policy.named_parameters() if "lora_" in name)
    assert 0 < lora_parameters == sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert sum(p.numel() for p in policy.parameters()) == base_parameters + lora_parameters  # one copy of the base

    # Dropout off in the adapters too (peft brings its own lora_dropout, 0.05 by default): else the update, run in
    # train mode, sees other log-probs than the rollout did and the ratio drifts from 1.
    assert model_args.lora_dropout > 0
    assert all(m.p == 0 for m in policy.modules() if isinstance(m, torch.nn.Dropout))
    assert any("lora_dropout" in name for name, m in policy.named_modules() if isinstance(m, torch.nn.Dropout))

    recipe = write_recipe(tmp_path, sft, reward_functions=[ORACLE], learning_rate=1e-2, total_episodes=32, **LORA)
    train(recipe)
    run = tmp_path / "run"
    metrics = tracking.read_metrics(run)
    assert abs(metrics[0]["objective/kl"]) < 1e-4  # adapter initialised to zero: policy == reference
    assert metrics[1]["objective/kl"] != 0.0
    assert (run / "adapter_config.json").is_file() and not (run / "model.safetensors").exists()
    # with use_peft the critic is LoRA-trained too: its adapters and new head are saved, not a full copy
    value = load_file(run / "value_model" / "adapter_model.safetensors")
    assert any("lora_" in key for key in value) and any("score" in key for key in value)
    assert not any("embed_tokens" in key for key in value)


def test_lora_modules_to_save_train_in_full_in_the_policy_and_the_value_model(tmp_path):
    # the value model's LoRA config replaced the recipe's lora_modules_to_save with its score head: with
    # `[embed_tokens]` the critic's embeddings stayed frozen while the policy's trained
    from hfgen.recipe import load_recipe
    from hfgen.rl.models import load_policy_and_reference, load_value_model
    from tiny_models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "model")
    recipe = write_recipe(tmp_path, model, use_peft=True, lora_target_modules=["q_proj", "v_proj"],
                          lora_modules_to_save=["lm_head", "embed_tokens"])  # fmt: skip
    model_args, _, config = load_recipe(recipe, check_inputs=False).configs
    tokenizer, policy, _ = load_policy_and_reference(model_args, config)
    value_model = load_value_model(model_args, config, tokenizer)

    def trained_in_full(peft_model):
        names = {name.split(".modules_to_save")[0] for name, p in peft_model.named_parameters() if p.requires_grad}
        return {name.rsplit(".", 1)[-1] for name in names if "lora_" not in name}

    assert trained_in_full(policy) == {"lm_head", "embed_tokens"}
    assert trained_in_full(value_model) == {"embed_tokens", "score"}  # what it has of the list, and its new head


def test_lm_head_among_the_lora_targets_adapts_the_policy_without_a_warning_about_the_value_model(tmp_path, capsys):
    # the value model (a sequence classifier: `score`, no lm_head) warned "model '<the policy>' has no module named
    # lm_head; the adapters go on the others", while the policy's adapter did train lm_head (probe 41 E3)
    from hfgen.recipe import load_recipe
    from hfgen.rl.models import load_policy_and_reference, load_value_model
    from tiny_models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "model")
    recipe = write_recipe(tmp_path, model, use_peft=True, lora_target_modules=["q_proj", "lm_head"])
    model_args, _, config = load_recipe(recipe, check_inputs=False).configs
    tokenizer, policy, _ = load_policy_and_reference(model_args, config)
    value_model = load_value_model(model_args, config, tokenizer)
    assert any("lm_head.lora_A" in name for name, _ in policy.named_parameters())
    assert set(value_model.peft_config["default"].target_modules) == {"q_proj"}
    assert "lm_head" not in capsys.readouterr().out


def test_a_lora_run_over_a_full_run_with_overwrite_leaves_none_of_its_outputs(tmp_path, tiny_models):
    """overwrite_output_dir trains over a complete run of another recipe: its full model.safetensors (which
    from_pretrained loads in place of the new adapter), ema/ and samples.jsonl were left beside the new outputs."""
    sft, _ = tiny_models
    common = dict(reward_functions=[ORACLE], total_episodes=16)
    train(write_recipe(tmp_path, sft, **common, ema_decay=0.5, sample_steps=1))
    run = tmp_path / "run"
    assert all((run / name).exists() for name in ("model.safetensors", "ema", "samples.jsonl"))
    train(write_recipe(tmp_path, sft, **common, **LORA), "--overwrite_output_dir", "true")
    assert (run / "adapter_model.safetensors").is_file() and (run / "COMPLETE").is_file()
    assert not any((run / name).exists() for name in ("model.safetensors", "ema", "samples.jsonl"))
    assert (run / "value_model" / "adapter_model.safetensors").is_file()
    assert not (run / "value_model" / "model.safetensors").exists()


@pytest.mark.slow
def test_two_processes_end_with_identical_policy_weights(tmp_path, tiny_models, free_port):
    sft, reward = tiny_models
    recipe = write_recipe(tmp_path, sft, reward_model_path=str(reward), reward_functions=[ORACLE], total_episodes=64)
    result = accelerate_launch(free_port, recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    fingerprints = [(run / f"weights-rank{rank}.sha256").read_text() for rank in (0, 1)]
    assert fingerprints[0] == fingerprints[1]
    metrics = tracking.read_metrics(run)
    assert [row["episode"] for row in metrics] == [32, 64]  # 2 processes x 16 episodes per step
    assert load_file(run / "model.safetensors").keys() == load_file(sft / "model.safetensors").keys()


@pytest.mark.slow
def test_two_processes_stop_on_hacking_judge_alike_and_keep_the_same_policy(tmp_path, tiny_models, free_port):
    """stop_on_hacking under 2 processes: every rank judges the policies of steps 1-5 (the main process's figures
    decide), both keep the same two and end with identical weights."""
    sft, _ = tiny_models
    recipe = write_recipe(tmp_path, sft, **STOPS_AT_STEP_5 | {"total_episodes": 128})  # 16 episodes a step
    result = accelerate_launch(free_port, recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    results = tracking.read_json(run / "eval.json")
    judged = {int(step): score for step, score in results["judged_policies"].items()}
    assert results["stopped_at_step"] == 5 and sorted(judged) == [1, 2, 3, 4, 5]
    assert results["kept_policy_of_steps"] == sorted(sorted(judged, key=judged.get)[-2:])
    fingerprints = [(run / f"weights-rank{rank}.sha256").read_text() for rank in (0, 1)]
    assert fingerprints[0] == fingerprints[1]


@pytest.mark.slow
@pytest.mark.parametrize("settings", [{}, LORA], ids=["full", "lora"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_models, settings):
    sft, reward = tiny_models
    common = dict(reward_model_path=str(reward), total_episodes=64, save_steps=2, kl_target=1.0, kl_horizon=100)
    common |= settings
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full_dir.mkdir(), resumed_dir.mkdir()
    train(write_recipe(full_dir, sft, **common))
    # The interrupted run: all that survives of it is its first checkpoint (and its metrics up to there).
    (resumed_dir / "run").mkdir()
    shutil.copytree(full_dir / "run" / "checkpoint-2", resumed_dir / "run" / "checkpoint-2")
    train(write_recipe(resumed_dir, sft, **common), "--resume_from_checkpoint", "true")
    full, resumed = tracking.read_metrics(full_dir / "run"), tracking.read_metrics(resumed_dir / "run")
    assert [row["step"] for row in full] == [1, 2, 3, 4] and [row["step"] for row in resumed] == [3, 4]
    for key in ("objective/scores", "objective/kl", "objective/kl_coef", "loss/policy_avg", "loss/value_avg", "lr"):
        assert [row[key] for row in resumed] == pytest.approx([row[key] for row in full[2:]], rel=1e-5, abs=1e-7), key
    weights = "adapter_model.safetensors" if settings else "model.safetensors"
    a, b = load_file(full_dir / "run" / weights), load_file(resumed_dir / "run" / weights)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert full[2]["objective/kl_coef"] != 0.05  # the adaptive coefficient moved, and was restored
    # The checkpoint holds what trains: with LoRA, the adapter and the value model but none of the frozen base.
    saved = load_file(full_dir / "run" / "checkpoint-2" / "model.safetensors").keys()
    policy_keys = {key for key in saved if key.startswith("policy.")}
    if settings:
        assert policy_keys and all(".lora_" in key for key in policy_keys)
    else:
        assert {key.removeprefix("policy.") for key in policy_keys} >= load_file(sft / "model.safetensors").keys()
    assert any(key.startswith("value_model.") for key in saved)
    if not settings:  # a checkpoint written with other settings is refused, naming them
        other = tmp_path / "other"
        other.mkdir()
        checkpoint = full_dir / "run" / "checkpoint-2"
        result = run_hfgen_here(
            "train", write_recipe(other, sft, **common, **LORA), "--resume_from_checkpoint", checkpoint
        )
        assert result.returncode == 2 and "use_peft: False -> True" in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr


def test_sampling_ignores_the_models_own_generation_defaults_and_stops_at_every_eos(tiny_models):
    """The policy's generation_config.json may set min_p, top_k, a repetition penalty, suppressed tokens...: none
    reaches PPO's sampling, whose scores must be softmax(logits / temperature) exactly (transformers 5 fills every
    None of our config from the model's); all EOS ids of the model stop a response."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfgen.rl.rollout import left_pad
    from hfgen.stages.ppo import make_generation_config, stop_token_ids

    sft, _ = tiny_models
    tokenizer, policy = AutoTokenizer.from_pretrained(sft), AutoModelForCausalLM.from_pretrained(sft).eval()
    end_of_turn = tokenizer.convert_tokens_to_ids("<|user|>")
    policy.generation_config.update(
        min_p=0.5, top_k=3, top_p=0.5, repetition_penalty=3.0, suppress_tokens=[7], typical_p=0.5, epsilon_cutoff=0.1,
        eta_cutoff=0.1, min_length=5, eos_token_id=[tokenizer.eos_token_id, end_of_turn],
    )  # fmt: skip
    stop_ids = stop_token_ids(tokenizer, policy)
    assert stop_ids == [tokenizer.eos_token_id, end_of_turn]
    query_ids, query_mask = left_pad([tokenizer("describe the cat.")["input_ids"]] * 4, tokenizer.pad_token_id, "cpu")
    # models=None pins every knob off; models=[policy] pins off those the policy's own config sets (all here)
    for config in (make_generation_config(tokenizer, 6, 0.7, 1.0, stop_ids),
                   make_generation_config(tokenizer, 6, 0.7, 1.0, stop_ids, models=[policy])):  # fmt: skip
        config.output_scores = True
        torch.manual_seed(0)
        output = policy.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=config)
        pad = tokenizer.pad_token_id  # never sampled (hfgen may have added it: an untrained row)
        for logits, scores in zip(output.logits, output.scores):
            assert scores[:, pad].eq(-torch.inf).all()
            keep = torch.arange(scores.shape[1]) != pad
            torch.testing.assert_close(scores[:, keep], logits[:, keep] / 0.7)


def test_weight_decay_skips_biases_and_norms_and_the_critic_has_its_own_learning_rate():
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from hfgen.rl.rollout import PolicyAndValue
    from hfgen.stages.ppo import PPOConfig, parameter_groups

    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, attention_bias=True, num_labels=1)  # fmt: skip
    trainable = PolicyAndValue(LlamaForCausalLM(config), LlamaForSequenceClassification(config))
    settings = PPOConfig(weight_decay=0.1, learning_rate=1e-5, critic_learning_rate=1e-4)
    groups = parameter_groups(trainable, settings)
    names = {id(p): name for name, p in trainable.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | plain == set(names.values()) and not decayed & plain
    assert "policy.model.layers.0.self_attn.q_proj.weight" in decayed
    assert all(("bias" in n or "norm" in n) for n in plain) and any("bias" in n for n in plain)
    assert {g["lr"] for g in groups if g["part"] == "value_model"} == {1e-4}
    assert all("lr" not in g for g in groups if g["part"] == "policy")  # the optimiser's learning_rate
    # critic_learning_rate 0 freezes the critic; it was taken for unset and the critic trained at learning_rate
    groups = parameter_groups(trainable, PPOConfig(learning_rate=1e-5, critic_learning_rate=0.0))
    assert {g["lr"] for g in groups if g["part"] == "value_model"} == {0.0}


def test_scores_lie_within_reward_clip_with_the_missing_eos_penalty():
    # the penalty was subtracted after the clip: -0.8 clipped to [-1, 1], then -1 -> -1.8
    from hfgen.rl.functional import RewardNormalizer
    from hfgen.stages.ppo import PPOConfig, shape_scores

    config = PPOConfig(reward_clip=1.0, missing_eos_penalty=1.0)
    scores = shape_scores(torch.tensor([-0.8, 0.5, 3.0]), torch.tensor([False, False, True]), config,
                          RewardNormalizer("none", config.reward_clip))  # fmt: skip
    torch.testing.assert_close(scores, torch.tensor([-1.0, -0.5, 1.0]))


def test_options_critic_warmup_ema_sft_reward_normalisation_and_ptx(tmp_path, tiny_models):
    from hfgen.generate import wants_chat
    from hfgen.models import load_tokenizer

    sft, reward = tiny_models
    recipe = write_recipe(
        tmp_path, sft, reward_model_path=str(reward), total_episodes=48, per_device_train_batch_size=16,
        gradient_accumulation_steps=1, learning_rate=1e-2, critic_warmup_steps=1, ema_decay=0.5,
        reward_normalization="sft", missing_eos_penalty=None, critic_learning_rate=1e-3, ptx_coef=1.0,
        ptx_dataset_name="embedded:corpus", ptx_max_length=32,
    )  # fmt: skip
    train(recipe)
    run = tmp_path / "run"
    metrics = tracking.read_metrics(run)
    assert [row["episode"] for row in metrics] == [16, 32, 48]  # rollout = per_device x accumulation x minibatches
    # each row's lr is the rate the policy's update used (was the next step's): none in the critic warm-up, then the
    # linear schedule from 1e-2 over the 2 steps it trains (one schedule for both spent the policy's on the warm-up)
    assert [row["lr"] for row in metrics] == pytest.approx([0.0, 1e-2, 1e-2 / 2])
    # the SFT policy's responses, normalised with their own statistics: mean 0
    assert abs(metrics[0]["objective/scores"]) < 1e-5 and metrics[1]["objective/scores"] != 0
    # step 1 trained the value model only: the policy sampling step 2 is still the reference
    assert abs(metrics[1]["objective/kl"]) < 1e-4 and abs(metrics[2]["objective/kl"]) > 1e-3
    policy, ema, start = (load_file(p) for p in (run / "model.safetensors", run / "ema" / "model.safetensors",
                                                   sft / "model.safetensors"))  # fmt: skip
    assert ema.keys() == policy.keys()
    assert any(not torch.equal(ema[k], policy[k]) for k in policy)  # the average lags the policy
    assert any(not torch.equal(ema[k], start[k]) for k in policy)  # and moved from the start
    assert (run / "ema" / "tokenizer_config.json").is_file()  # ema/ is a model generate and eval can load
    # in the run's format: chat (ema/ has no recipe.yaml of its own, and was evaluated and sampled as raw text)
    tokenizer = load_tokenizer(str(run / "ema"))
    assert wants_chat(str(run / "ema"), tokenizer) and wants_chat(str(run), tokenizer)
    # PPO-ptx: the LM loss on the pretraining texts falls once the policy trains (step 1 was the critic's only)
    assert metrics[2]["loss/ptx_avg"] < metrics[0]["loss/ptx_avg"] - 0.1
    value_before = load_file(reward / "model.safetensors")["score.weight"]
    assert not torch.equal(load_file(run / "value_model" / "model.safetensors")["score.weight"], value_before)


def test_ptx_data_of_sft_layouts_carries_the_loss_on_the_answers(tmp_path):
    """PPO-ptx data: conversations and prompt/completion pairs are rendered as SFT renders them and labelled on the
    answer (its EOS included) only; plain texts (ptx_column) everywhere, as is a conversation whose chat template does
    not mark the assistant's turns; examples with no answer token within ptx_max_length are dropped."""
    from types import SimpleNamespace

    from hfgen.errors import UserError
    from hfgen.models import build_embedded_tokenizer
    from hfgen.rl.ptx import IGNORE, ptx_examples

    tokenizer = build_embedded_tokenizer()
    files = {
        "chat.jsonl": {"messages": [{"role": "user", "content": "describe the red cat."},
                                    {"role": "assistant", "content": "the red cat is kind."}]},
        "pairs.jsonl": {"prompt": "describe the dog. answer:", "completion": " the dog is calm."},
        "plain.jsonl": {"body": "the owl sleeps."},
    }  # fmt: skip
    for name, row in files.items():
        (tmp_path / name).write_text(json.dumps(row) + "\n")

    def labelled(name, column="text", max_length=128):
        settings = SimpleNamespace(ptx_dataset_name=str(tmp_path / name), ptx_column=column, ptx_max_length=max_length)
        [(ids, labels)] = ptx_examples(tokenizer, settings)
        assert len(ids) == len(labels) <= max_length
        assert all(label in (token, IGNORE) for token, label in zip(ids, labels))
        return tokenizer.decode(ids), tokenizer.decode([label for label in labels if label != IGNORE])

    text, answer = labelled("chat.jsonl")
    assert text == tokenizer.apply_chat_template(files["chat.jsonl"]["messages"], tokenize=False)
    assert answer == "the red cat is kind.<|end|>"
    assert labelled("pairs.jsonl")[1].strip() == "the dog is calm.<|end|>"
    assert labelled("plain.jsonl", column="body") == ("the owl sleeps.<|end|>", "the owl sleeps.<|end|>")
    with pytest.raises(UserError, match="ptx_max_length"):  # the user turn alone fills 6 tokens
        labelled("chat.jsonl", max_length=6)
    # a layout of neither kind: the message named dataset_format and dataset_columns, the prompt data's keys
    with pytest.raises(UserError, match=r"ptx_dataset_name .*'body'.* set ptx_column to its text column") as error:
        labelled("plain.jsonl")
    assert "dataset_format" not in str(error.value) and "dataset_columns" not in str(error.value)
    tokenizer.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    text, answer = labelled("chat.jsonl")
    assert answer == text and "describe the red cat." in text
    # a real model's template without the markers (Qwen2.5's, as shipped): the assistant turns only, by TRL's marked
    # copy of it, as the sft stage's assistant_only_loss trains them (every token trained, the system prompt too)
    import trl

    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates/qwen2_5.jinja").read_text()
    text, answer = labelled("chat.jsonl")
    assert text.startswith("<|im_start|>system") and "describe the red cat." in text
    assert answer.strip().startswith("the red cat is kind.") and "describe" not in answer and "system" not in answer


def test_ptx_examples_whose_prompt_fills_ptx_max_length_are_counted_and_refused_when_most(tmp_path, tiny_models):
    """ptx_examples skipped the examples left with no token to learn within ptx_max_length without a word (probe
    42 E4): 18 of 20 ptx rows gone, the ptx loss training on 2 repeated, nothing on the console, in hfgen check or in
    data.json. Counted there now, and refused (at the check too) when more than half are dropped, as the README's
    bad-rows policy says of every stage's rows."""
    from types import SimpleNamespace

    from hfgen.models import build_embedded_tokenizer
    from hfgen.rl.ptx import ptx_examples

    long_prompt = "describe the red cat and the blue dog by the river. " * 6  # more than 32 tokens

    def ptx_file(long: int):
        rows = [{"prompt": long_prompt if i < long else "describe the dog.", "completion": " the dog is calm."}
                for i in range(10)]  # fmt: skip
        (tmp_path / "ptx.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        return tmp_path / "ptx.jsonl"

    reason = "no token to learn within ptx_max_length=32"
    settings = SimpleNamespace(ptx_dataset_name=str(ptx_file(3)), ptx_column="text", ptx_max_length=32)
    records = {}
    assert len(ptx_examples(build_embedded_tokenizer(), settings, records)) == 7
    assert records["ptx"]["rows_kept"] == 7 and records["ptx"]["dropped"] == {reason: 3}
    sft, _ = tiny_models
    recipe = write_recipe(tmp_path, sft, reward_functions=[ORACLE], ptx_coef=1.0, ptx_dataset_name=str(ptx_file(3)),
                          ptx_max_length=32)  # fmt: skip
    result = run_hfgen_here("check", recipe)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"data: ptx 7 of 10 rows (prompt_completion); dropped 3 {reason}" in result.stdout
    ptx_file(8)
    for command in ("check", "train"):  # refused before any model loads
        result = run_hfgen_here(command, recipe)
        assert result.returncode == 2 and "PPO:" not in result.stdout, result.stderr[-2000:]
        assert f"8 of 10 examples of ptx_dataset_name '{tmp_path / 'ptx.jsonl'}' have {reason}" in result.stderr
        assert "raise ptx_max_length" in result.stderr


def test_ptx_texts_and_pairs_are_tokenized_as_sft_tokenizes_them(tmp_path, capsys):
    """PPO-ptx tokenized its plain rows unlike the SFT they stand for (probe 41 I2): a prompt ending in a space lost
    the completion's first token (' the', merged with the space) from the loss, a text got no EOS (ptx texts never
    learned to end), a text rendered with a chat template got a second BOS. Now as `sft.tokenize_response` and
    `sft.without_doubled_bos` make SFT's rows."""
    from types import SimpleNamespace

    from tokenizers import processors

    from hfgen.models import build_embedded_tokenizer
    from hfgen.rl.ptx import IGNORE, ptx_examples
    from hfgen.stages.sft import tokenize_response

    tokenizer = build_embedded_tokenizer()  # with a BOS put in front of every text, as Llama 3's tokenizer does
    tokenizer.add_special_tokens({"bos_token": "<|bos|>"})
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tokenizer.bos_token_id)]
    )
    pair = {"prompt": "describe the dog. answer: ", "completion": "the dog is calm."}
    files = {"pairs.jsonl": pair, "texts.jsonl": {"text": "<|bos|>the owl sleeps."}}
    for name, row in files.items():
        (tmp_path / name).write_text(json.dumps(row) + "\n")

    def example(name):
        settings = SimpleNamespace(ptx_dataset_name=str(tmp_path / name), ptx_column="text", ptx_max_length=128)
        [(ids, labels)] = ptx_examples(tokenizer, settings)
        return ids, labels

    ids, labels = example("pairs.jsonl")
    sft_ids, start = tokenize_response(tokenizer, pair["prompt"], pair["completion"], None)
    assert ids == sft_ids and labels == [IGNORE] * start + sft_ids[start:]
    assert tokenizer.decode([label for label in labels if label != IGNORE]) == " the dog is calm.<|end|>"
    ids, labels = example("texts.jsonl")
    assert tokenizer.convert_ids_to_tokens(ids)[:2] == ["<|bos|>", "the"] and ids == labels
    assert tokenizer.decode(ids) == "<|bos|>the owl sleeps.<|end|>"
    assert "ptx: 1 of 1 rows of the text column (row 0 first) already start with the tokenizer's BOS" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize("option", ["entropy_coef", "kl_loss_coef"])
def test_entropy_bonus_raises_entropy_and_kl_loss_pulls_toward_the_reference(option):
    """ppo_update on a rollout with zero advantages and values at their targets: the clipped losses give no
    gradient to the policy, so only the option moves it."""
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from hfgen.rl import functional as F
    from hfgen.rl.rollout import PolicyAndValue
    from hfgen.rl.types import Rollout
    from hfgen.stages.ppo import PPOConfig, parameter_groups, ppo_update

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0)  # fmt: skip
    trainable = PolicyAndValue(LlamaForCausalLM(config), LlamaForSequenceClassification(config))
    with torch.no_grad():
        trainable.policy.lm_head.weight.mul_(30)  # peaked: entropy well below its maximum, log 16
    settings = PPOConfig(num_ppo_epochs=10, per_device_train_batch_size=8, learning_rate=2e-3, temperature=1.0,
                         **{option: 1.0})  # fmt: skip
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(parameter_groups(trainable, settings), lr=settings.learning_rate)
    input_ids = torch.randint(1, 16, (8, 10))
    mask, context = torch.ones(8, 6, dtype=torch.bool), 4

    def measure():
        with torch.no_grad():
            logits, values = trainable(input_ids, torch.ones_like(input_ids), context)
        logprobs = F.token_logprobs(logits, input_ids[:, context:])
        return logprobs, values, F.masked_mean(F.entropy_from_logits(logits), mask)

    logprobs, values, entropy_before = measure()
    ref_logprobs = logprobs - 0.5 * torch.rand_like(logprobs)  # a reference some distance away
    rollout = Rollout(input_ids, torch.ones_like(input_ids), context, mask, logprobs, ref_logprobs, values,
                      torch.zeros(8), torch.zeros(8, 6), values)  # fmt: skip
    kl_before = F.kl_loss(logprobs, ref_logprobs, mask, "k3")
    ppo_update(accelerator, trainable, optimizer, rollout, settings)
    logprobs_after, _, entropy_after = measure()
    if option == "entropy_coef":
        assert entropy_after > entropy_before + 0.01
    else:
        assert F.kl_loss(logprobs_after, ref_logprobs, mask, "k3") < 0.7 * kl_before


def test_the_update_does_not_depend_on_how_the_minibatch_is_split_into_micro_batches():
    """The same rollout of responses of different lengths, one minibatch of 4 as 4x1, 2x2 and 1x4 (per-device batch x
    accumulation), every loss term on (entropy, KL loss, ptx): the same update. Each micro-batch's token means were
    weighted alike, so a short response's tokens counted for more in a small micro-batch (2.9% and 38% off)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from ppo_split import split_update

    updated = {}
    for batch, accumulation in ((4, 1), (2, 2), (1, 4)):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
        updated[batch, accumulation] = split_update(accelerator, batch, accumulation)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    reference = updated[4, 1]
    assert reference.abs().max() > 1e-3
    for split in ((2, 2), (1, 4)):
        assert torch.allclose(updated[split], reference, atol=1e-6, rtol=1e-5), (
            split,
            (updated[split] - reference).abs().max(),
        )


@pytest.mark.slow
def test_the_update_split_over_two_processes_equals_the_one_process_update(tmp_path, free_port):
    """The rollout's 4 responses, 2 on each of 2 processes as 2x1 and 1x2, take the step one process takes with the
    4 as 4x1 (the gradient averaged over processes weighted each process's tokens alike: 0.1 off)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from conftest import REPO
    from ppo_split import split_update

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    reference = split_update(Accelerator(cpu=True), 4, 1, ptx=False)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    for batch, accumulation in ((2, 1), (1, 2)):
        out = tmp_path / f"{batch}x{accumulation}.pt"
        result = subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file", REPO / "recipes/accelerate/cpu_2proc.yaml",
             "--main_process_port", str(free_port), REPO / "tests/ppo_split.py", str(batch), str(accumulation), out],
            capture_output=True, text=True, timeout=600, env={**os.environ, "ACCELERATE_USE_CPU": "true"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert torch.allclose(torch.load(out), reference, atol=1e-6, rtol=1e-5), (batch, accumulation)


def policy_weight_of_step(run, sft, step: int, name: str) -> torch.Tensor:
    """The weight `name` of the policy that sampled `step` of a PPO run saved every step: checkpoint-(step - 1)'s, the
    SFT model's for step 1."""
    if step == 1:
        return load_file(sft / "model.safetensors")[name]
    return load_file(run / f"checkpoint-{step - 1}" / "model.safetensors")["policy." + name]


def test_stop_on_hacking_ends_normally_keeping_the_policies_the_monitor_judges_best(tmp_path, tiny_models):
    """A ceiling below every score makes the monitor's above-ceiling signal hold from the first step after its
    3-step baseline (step 4; `monitor_baseline_steps` 3, the default 4 would alert a step later): with patience 2 it
    alerts at step 5, the run stops there and exits 0 with COMPLETE. It judges the policies of steps 1-5 (the
    kl_window of 4 steps before the onset, and those since) on held-out answers and keeps the average of the two it
    judges best; each judgement is `judge_policy`'s of that step's policy, as a user would compute it from the
    checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfgen.evaluation.policy import Sampling, distinct_prompts, judge_policy
    from hfgen.rl.rollout import RewardScorer, load_function

    sft, _ = tiny_models
    result = train(write_recipe(tmp_path, sft, **STOPS_AT_STEP_5, save_steps=1))
    run = tmp_path / "run"
    assert "reward-hacking alert at step 5 (above_ceiling, since step 4)" in result.stdout
    assert (run / "COMPLETE").is_file() and (run / "model.safetensors").is_file()
    metrics = tracking.read_metrics(run)
    assert [row["step"] for row in metrics] == [1, 2, 3, 4, 5] and metrics[4]["monitor/alert/above_ceiling"] == 4
    results = tracking.read_json(run / "eval.json")
    assert results["stopped_early"] is True and results["stopped_at_step"] == 5 and results["steps"] == 5
    assert "above the ceiling" in results["stop_reason"] and results["monitor/first_alert_step"] == 5
    judged = {int(step): score for step, score in results["judged_policies"].items()}
    assert sorted(judged) == [1, 2, 3, 4, 5] and len(set(judged.values())) == 5
    best = sorted(sorted(judged, key=judged.get)[-2:])
    assert results["stop_signal"] == "above_ceiling" and results["kept_policy_of_steps"] == best
    assert f"the output is the average of the policies of steps {best[0]}, {best[1]}" in result.stdout
    name = "model.layers.0.self_attn.q_proj.weight"
    kept = load_file(run / "model.safetensors")[name]
    expected = (policy_weight_of_step(run, sft, best[0], name) + policy_weight_of_step(run, sft, best[1], name)) / 2
    torch.testing.assert_close(kept, expected)
    # the judgement of step 3's policy, again from its checkpoint: 16 answers to each of the 4 held-out prompts
    tokenizer = AutoTokenizer.from_pretrained(sft)
    policy = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32)
    weights = load_file(run / "checkpoint-2" / "model.safetensors")
    trained = {k.removeprefix("policy."): v for k, v in weights.items() if k.startswith("policy.")}
    assert set(policy.load_state_dict(trained, strict=False).missing_keys) <= {"lm_head.weight"}  # (tied)
    rows = tracking.read_jsonl(run / "policy_eval.jsonl")
    prompts = distinct_prompts([row["prompt"] for row in rows])
    scorer = RewardScorer(None, None, {"hackable": load_function(STOPS_AT_STEP_5["reward_functions"][0])}, [1.0], 64)
    sampling = Sampling(16, 16, 0.7, 1.0, 7, 64, None)
    assert judge_policy(policy, tokenizer, prompts, sampling, scorer, 2.0) == pytest.approx(judged[3], abs=1e-5)


def test_stop_on_hacking_without_a_judgement_keeps_the_policies_before_the_onset(tmp_path, tiny_models):
    """`monitor_keep_samples` 0: no policy is judged, the run keeps the average of the policies of the 2 steps before
    the alert's onset (step 4): steps 2 and 3."""
    sft, _ = tiny_models
    result = train(write_recipe(tmp_path, sft, **STOPS_AT_STEP_5 | {"monitor_keep_samples": 0, "save_steps": 1}))
    run = tmp_path / "run"
    results = tracking.read_json(run / "eval.json")
    assert results["stopped_at_step"] == 5 and results["kept_policy_of_steps"] == [2, 3]
    assert results["judged_policies"] == {} and "policies judged" not in result.stdout
    name = "model.layers.0.self_attn.q_proj.weight"
    kept = load_file(run / "model.safetensors")[name]
    torch.testing.assert_close(
        kept, (policy_weight_of_step(run, sft, 2, name) + policy_weight_of_step(run, sft, 3, name)) / 2
    )
    assert not any(torch.allclose(kept, policy_weight_of_step(run, sft, step, name)) for step in (1, 2, 3, 5))


def test_a_stop_on_hacking_run_killed_before_its_alert_keeps_what_the_uninterrupted_run_keeps(tmp_path, tiny_models):
    """The run of the test above, killed after checkpoint-2 or checkpoint-4 and resumed: it stops at step 5, judges
    the policies of steps 1-5 as the run that was not killed judged them (the copies of those it sampled before the
    kill travel with the checkpoints) and keeps the same two: the same output."""
    sft, _ = tiny_models
    common = STOPS_AT_STEP_5 | {"save_steps": 1}
    (tmp_path / "full").mkdir()
    train(write_recipe(tmp_path / "full", sft, **common))
    full = tmp_path / "full" / "run"
    assert (full / "checkpoint-4" / "policy_snapshots" / "process-0.safetensors").is_file()
    expected = tracking.read_json(full / "eval.json")
    assert sorted(map(int, expected["judged_policies"])) == [1, 2, 3, 4, 5]
    for killed_after in (2, 4):
        resumed = tmp_path / f"killed_after_{killed_after}"
        (resumed / "run").mkdir(parents=True)
        checkpoint = f"checkpoint-{killed_after}"
        shutil.copytree(full / checkpoint, resumed / "run" / checkpoint)
        result = train(write_recipe(resumed, sft, **common), "--resume_from_checkpoint", "true")
        assert f"resumed from {resumed / 'run' / checkpoint}" in result.stdout
        results = tracking.read_json(resumed / "run" / "eval.json")
        assert results["stopped_at_step"] == 5, killed_after
        assert results["judged_policies"] == expected["judged_policies"], killed_after
        assert results["kept_policy_of_steps"] == expected["kept_policy_of_steps"], killed_after
        a, b = load_file(full / "model.safetensors"), load_file(resumed / "run" / "model.safetensors")
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_stopped_run_killed_in_its_final_save_or_resumed_when_complete_does_not_train_past_its_stop(
    tmp_path, tiny_models
):
    """The stop's step writes a checkpoint (save_steps 1) before the stop: a run killed while saving its output, then
    resumed from that checkpoint, stops there again (the restored monitor has its alert, which it raises once) and
    keeps the same averaged policy; so does a complete stopped run resumed. It trained steps 6-8 and kept another."""
    from kill_harness import killed_then_resumed, weight_differences

    sft, _ = tiny_models
    common = STOPS_AT_STEP_5 | {"save_steps": 1, "ema_decay": 0.5}
    recipe = write_recipe(tmp_path, sft, **common)
    train(recipe)
    killed = tmp_path / "killed"
    killed_then_resumed(recipe, killed, [], ["final_save"])
    full = tmp_path / "run"
    volatile = ("runtime", "per_s")
    results = [{k: v for k, v in tracking.read_json(run / "eval.json").items() if not any(w in k for w in volatile)}
               for run in (full, killed)]  # fmt: skip
    assert results[0]["stopped_at_step"] == 5 and results[0]["episodes"] == 40
    assert results[0]["ema_through_step"] == 5  # ema/ is not rolled back with the policy: eval.json says so
    assert results[1] == results[0]
    assert weight_differences(full, killed) == []
    assert [row["step"] for row in tracking.read_metrics(killed)] == [1, 2, 3, 4, 5]
    # a complete stopped run resumed: the same output again, no step trained
    train(recipe, "--output_dir", killed, "--resume_from_checkpoint", "true")
    assert weight_differences(full, killed) == [] and not (killed / "checkpoint-6").exists()
    assert tracking.read_json(killed / "eval.json")["steps"] == 5


def test_values_from_the_first_training_pass_equal_a_rollout_pass_of_their_own():
    """With one micro-batch per update, V_old comes from the update's first forward pass (shuffled rows, train
    mode, with grad): it must equal the no-grad rollout pass row for row."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from hfgen.rl.rollout import PolicyAndValue, rollout_values
    from hfgen.rl.types import Rollout
    from hfgen.stages.ppo import first_training_pass

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0)  # fmt: skip
    trainable = PolicyAndValue(LlamaForCausalLM(config), LlamaForSequenceClassification(config))
    input_ids, attention_mask = torch.randint(1, 16, (8, 10)), torch.ones(8, 10, dtype=torch.long)
    attention_mask[:3, :2] = 0  # left padding
    mask = torch.ones(8, 6, dtype=torch.bool)
    mask[2, 4:] = False  # a response that ended early
    expected = rollout_values(trainable.value_model.eval(), input_ids, attention_mask, 4, chunk_size=3) * mask
    zeros = torch.zeros(8, 6)
    rollout = Rollout(input_ids, attention_mask, 4, mask, zeros, zeros, None, torch.zeros(8))
    rollout, first_pass = first_training_pass(trainable, rollout)
    torch.testing.assert_close(rollout.values, expected)
    assert sorted(first_pass.rows.tolist()) == list(range(8)) and first_pass.rows.tolist() != list(range(8))
    assert first_pass.outputs[1].requires_grad  # the update takes its loss from this very pass


def load_seeds_script():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("hacking_monitor_seeds", REPO / "scripts/hacking_monitor_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hacking_monitor_seeds_judge():
    """The script's judge on hand-made held-out scores: the peak is the best screened step, initial, best and kept
    are judged on the independent sample, the timing allows 10% of the run's steps after the last step at the peak
    level (a plateau's argmax is a lottery among equals), the kept policy must reach initial + 0.95 x (best -
    initial)."""
    judge_hackable = load_seeds_script().judge_hackable
    screen = [0.0, 1.0, 2.0, 3.0, 3.1, 3.0, 2.96, 2.0, 0.0, -1.0] + [-2.0] * 10  # 20 steps: 2 of grace
    judged = {1: 0.1, 5: 3.1, 6: 3.0, 7: 2.8, 21: -2.0}  # another sample: other random numbers, other noise

    def judge(steps):
        return {step: judged[step] for step in steps}

    run = {"steps": 20, "alert": 9, "signal": "kl_growth", "onset": 7, "kept": [6], "keep_average": 1}
    verdict = judge_hackable(run, screen, judge)
    assert (verdict["oracle_peak_step"], verdict["peak_end_step"]) == (5, 7)  # 2.96 >= 0.1 + 0.95 x 3.0 = 2.95
    assert verdict["alert_in_time"] and not verdict["alert_in_time_of_argmax"]  # 9 <= 7 + 2, but > 5 + 2
    assert verdict["alert_after_peak_end"] == 2  # in steps, whatever the run's length
    assert verdict["kept_oracle"] == 3.0 and verdict["kept_needed"] == 2.95 and verdict["kept_good"]
    # with perfect timing the one-step keep would have been step 7, the end of the peak: 2.8 < 2.95
    assert verdict["kept_if_timed_steps"] == "7" and not verdict["kept_if_timed_good"]
    late = judge_hackable(run | {"alert": 10, "kept": [7]}, screen, judge)
    assert not late["alert_in_time"] and not late["kept_good"]  # 2.8 < 2.95 (screened 2.96: the judge decides)
    # several kept steps: the judge scores the average of their policies, not any one of them
    judged[(6, 7)] = 2.97
    averaged = judge_hackable(run | {"alert": 10, "kept": [6, 7], "keep_average": 2}, screen, judge)
    assert averaged["kept_steps"] == "6+7" and averaged["kept_oracle"] == 2.97 and averaged["kept_good"]
    assert averaged["kept_if_timed_steps"] == "6+7" and averaged["kept_if_timed_good"]
    silent = judge_hackable(run | {"alert": None, "onset": None, "kept": []}, screen, judge)
    assert silent["alert_due"] and not silent["alert_in_time"] and silent["kept_steps"] == "21"  # the run's output
    assert silent["alert_after_peak_end"] is None
    assert not silent["kept_good"]
    # an oracle still at its peak 2 steps (10%) before the end: nothing to catch, silence is right
    rising = [0.0] * 10 + [1.0] * 7 + [3.0, 3.1, 3.0]
    judged |= {18: 3.0, 19: 3.1, 20: 3.0, 21: 3.05}
    silent = judge_hackable(run | {"alert": None, "onset": None, "kept": []}, rising, judge)
    assert (silent["peak_end_step"], silent["alert_due"]) == (20, False)
    assert silent["alert_in_time"] and silent["kept_good"]


def test_hacking_monitor_seeds_monitor_settings_are_the_recipes_thresholds_typed_as_the_monitors():
    monitor_settings = load_seeds_script().monitor_settings
    settings = monitor_settings(["min_kl_slope=2", "keep_average=1", "kl_window=3"])
    assert settings == {"monitor_min_kl_slope": 2.0, "monitor_keep_average": 1, "monitor_kl_window": 3}
    assert isinstance(settings["monitor_min_kl_slope"], float) and isinstance(settings["monitor_kl_window"], int)
    for bad, named in (
        ("slope=2", "NAME one of"),
        ("min_kl_slope", "NAME=VALUE"),
        ("kl_window=2.5", "takes an integer"),
    ):
        with pytest.raises(ValueError, match=named):
            monitor_settings([bad])


@pytest.mark.slow
def test_hacking_monitor_seeds_runs_one_seed_of_each(tmp_path, tiny_models):
    """CI's run of scripts/hacking_monitor_seeds.py: one short seed of each kind on the tiny models, the hackable
    run on the hackable reward without the KL anchor, the demo run on the shipped recipe as it is."""
    from conftest import REPO

    sft, reward = tiny_models
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/hacking_monitor_seeds.py"), "--seeds", "1", "--total_episodes", "128",
         "--model_name_or_path", str(sft), "--reward_model_path", str(reward), "--output", str(tmp_path),
         "--screen_samples", "2", "--judge_samples", "2"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    hackable, demo = summary["runs"]
    assert hackable["kind"] == "hackable" and demo == {
        "kind": "demo", "seed": 1, "false_alarm": False, "alert_step": None, "signal": None
    }  # fmt: skip
    assert set(summary["totals"]) == {
        "hackable_alert_in_time", "hackable_kept_good", "hackable_kept_good_if_timed", "demo_false_alarms"
    }  # fmt: skip
    shipped = yaml.safe_load((REPO / "recipes/tiny/ppo.yaml").read_text())
    # every step's policy kept for the held-out judge (step 1's is the SFT model, step 3's the run's output), the
    # checkpoints gone
    policies = sorted(p.name for p in (tmp_path / "hackable-1" / "policies").iterdir())
    assert policies == ["step-2.safetensors", "step-3.safetensors"]
    assert not list((tmp_path / "hackable-1").glob("checkpoint-*"))
    assert set(json.loads((tmp_path / "hackable-1" / "heldout.json").read_text())) == {"2x0", "2x1"}
    verdict_keys = {"oracle_peak_step", "peak_end_step", "kept_needed", "alert_in_time", "kept_if_timed_good"}
    assert verdict_keys <= hackable.keys()
    # the hackable runs: the hackable reward, no KL anchor, no PPO-ptx, a checkpoint every step
    hackable_keys = {"reward_functions", "kl_coef", "value_model_path", "save_steps"} | {
        key for key in shipped if key.startswith("ptx_")
    }
    for kind, changed in (("hackable", hackable_keys), ("demo", set())):
        recipe = yaml.safe_load((tmp_path / f"{kind}-1" / "ppo.yaml").read_text())
        paths = {"model_name_or_path", "reward_model_path", "output_dir", "seed", "total_episodes"}
        records = {"eval_samples_per_prompt", "sample_steps", "logging_steps"}  # the script's, for speed
        differ = {key for key in shipped.keys() | recipe.keys() if shipped.get(key) != recipe.get(key)}
        assert differ - paths - records == changed, kind
        assert len(tracking.read_metrics(tmp_path / f"{kind}-1")) == 2  # 128 episodes, 64 a step
    assert recipe["kl_coef"] == shipped["kl_coef"]


def test_prompts_over_max_prompt_length_are_counted_and_refused_when_most(tmp_path, tiny_models):
    """PPO dropped prompts over max_prompt_length with a console line only: data.json and hfgen check said every
    prompt was kept, and a run that lost most of its prompts trained on the rest."""
    sft, _ = tiny_models
    data = tmp_path / "prompts.jsonl"

    def write(long_prompts):
        rows = [
            {"prompt": f"q{i} " + ("the red cat is kind " * 20 if i < long_prompts else "the cat")} for i in range(30)
        ]
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    recipe = write_recipe(tmp_path, sft, reward_functions=[ORACLE], dataset_name=str(data), max_prompt_length=40,
                          total_episodes=8, gradient_accumulation_steps=1)  # fmt: skip
    write(20)
    result = run_hfgen_here("check", recipe)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "prompts are longer than max_prompt_length=40 tokens" in result.stderr, result.stderr[-2000:]
    write(4)
    result = run_hfgen("check", recipe)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "longer than max_prompt_length=40" in result.stdout, result.stdout
    train(recipe)
    records = tracking.read_json(tmp_path / "run" / "data.json")
    dropped = sum(records[s]["dropped"].get("longer than max_prompt_length=40", 0) for s in ("train", "eval"))
    assert dropped == 4


def test_an_oracle_that_leaves_responses_unscored_is_averaged_over_those_it_scored(tmp_path, tiny_models):
    # None is a reward function's "not scored" (README), an oracle's too: one unscored response made the step's
    # oracle/score and the monitor's oracle gain and gap NaN (metrics.jsonl and eval.json no JSON), samples.jsonl
    # a raw TypeError, and policy_eval.jsonl held NaN for each unscored held-out response.
    sft, _ = tiny_models
    oracle = tmp_path / "partial_oracle.py"
    # a reward function that scores none of a step's responses made reward/NAME NaN the same way
    oracle.write_text(
        "def partial(prompts, responses):\n    return [None if i % 2 == 0 else 1.0 for i in range(len(responses))]\n"
        "def never(prompts, responses):\n    return [None] * len(responses)\n"
    )
    recipe = write_recipe(
        tmp_path, sft, reward_functions=["hfgen.data.embedded:on_topic_scores", f"{oracle}:never"],
        oracle_function=f"{oracle}:partial", total_episodes=32, sample_steps=1,
    )  # fmt: skip
    train(recipe)
    run = tmp_path / "run"

    def refuse(constant):
        raise ValueError(f"{constant} in a record")

    records = {
        name: [json.loads(line, parse_constant=refuse) for line in (run / name).read_text().splitlines()]
        for name in ("metrics.jsonl", "samples.jsonl", "policy_eval.jsonl")
    }
    results = json.loads((run / "eval.json").read_text(), parse_constant=refuse)
    metrics = records["metrics.jsonl"]
    assert len(metrics) == 2 and all(row["oracle/score"] == 1.0 for row in metrics)  # every other response: 1.0
    assert all(row["reward/never"] is None and row["reward/on_topic_scores"] is not None for row in metrics)
    assert (
        metrics[-1]["monitor/oracle_gain"] == 0.0 and results["monitor/oracle_gap"] == metrics[-1]["monitor/oracle_gap"]
    )
    # each sample row is scored alone, as the oracle's first (unscored) response
    assert records["samples.jsonl"] and all(row["oracle"] is None for row in records["samples.jsonl"])
    rows = records["policy_eval.jsonl"]
    assert [row["ppo/oracle"] for row in rows] == [None, 1.0] * (len(rows) // 2)
    assert results["ppo/oracle"] == results["sft/oracle"] == 1.0


def test_a_chat_template_whose_turn_end_generation_does_not_stop_at_is_warned_of(tmp_path):
    # from a Qwen2.5 base (turns end <|im_end|>, EOS <|endoftext|>) the rollouts ran on past the turn's end, scored
    # and counted unfinished, with no word from the check; the SFT check refuses the same layout (probe 41 A3)
    from tiny_models import save_tiny_llama_ending_turns_apart

    model = save_tiny_llama_ending_turns_apart(tmp_path / "base")
    result = run_hfgen_here("check", write_recipe(tmp_path, model, reward_functions=[ORACLE]))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ends assistant turns with '<|end|>', which is not a token generation stops at" in result.stdout


def test_the_ptx_check_reads_its_data_once_at_the_length_the_run_trains_with(tmp_path, monkeypatch):
    # the check judged the ptx examples at the recipe's ptx_max_length (512) while the run lowers it to GPT-2's 256
    # positions: examples whose prompt fills 256 tokens passed the check and data report, then the run dropped them;
    # and the ptx data was read and converted three times a command (review 42 #6)
    from hfgen.rl import ptx
    from tiny_models import save_tiny_causal_lm

    gpt2 = save_tiny_causal_lm(tmp_path / "gpt2", "gpt2")
    long_prompt = " ".join(["the red cat sat by the river"] * 40)  # ~280 tokens: within 512, past 256
    rows = [
        {"prompt": long_prompt if i < 3 else "describe the dog.", "completion": " the dog is calm."} for i in range(10)
    ]
    (tmp_path / "ptx.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    reads = []
    read_ptx_rows = ptx._read_ptx_rows
    monkeypatch.setattr(ptx, "_read_ptx_rows", lambda config: reads.append(1) or read_ptx_rows(config))
    recipe = write_recipe(tmp_path, gpt2, reward_functions=[ORACLE], ptx_coef=1.0, ptx_max_length=512,
                          ptx_dataset_name=str(tmp_path / "ptx.jsonl"))  # fmt: skip
    result = run_hfgen_here("check", recipe)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "data: ptx 7 of 10 rows (prompt_completion); dropped 3 no token to learn within ptx_max_length=256" in (
        result.stdout
    )
    assert len(reads) == 1


def test_the_check_keeps_prompts_within_the_room_response_length_leaves_in_learned_positions(tmp_path):
    # on GPT-2 (256 learned positions) the check judged the prompts against max_prompt_length (256) while the run
    # lowers it to 256 - response_length: the check passed, then the run refused after loading the models, saying to
    # raise max_prompt_length, which changes nothing (probe 42 E6, PPO)
    from tiny_models import save_tiny_causal_lm

    gpt2 = save_tiny_causal_lm(tmp_path / "gpt2", "gpt2")
    prompt = " ".join(["the red cat sat by the river"] * 30)  # ~210 tokens: over 256 - 64, within 256
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i} {prompt}"}) + "\n" for i in range(12)))
    recipe = write_recipe(tmp_path, gpt2, reward_functions=[ORACLE], dataset_name=str(prompts), response_length=64,
                          max_prompt_length=256)  # fmt: skip
    result = run_hfgen_here("check", recipe)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "prompts are longer than 192 tokens, the room response_length=64 leaves in the 256 positions" in (
        result.stderr
    )
    assert "lower response_length" in result.stderr and "raise max_prompt_length" not in result.stderr


@pytest.mark.parametrize("stage, ptx, refused", [("3", True, True), ("3", False, False), ("2", True, False)])
def test_ptx_on_a_mixture_of_experts_policy_under_zero3_exits_2_at_the_check(tmp_path, monkeypatch, stage, ptx,
                                                                             refused):  # fmt: skip
    # the PPO and ptx forwards of a MoE policy in one backward: ZeRO-3's bare AssertionError at the first update on
    # both ranks (probe 45 A2); without ptx, or under ZeRO-2, it trains
    from tiny_models import save_tiny_causal_lm

    policy = save_tiny_causal_lm(tmp_path / "mixtral", "mixtral")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # as `accelerate launch --use_deepspeed` sets them
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", stage)
    ptx_keys = {"ptx_coef": 1.0, "ptx_dataset_name": "embedded:instructions"} if ptx else {}
    result = run_hfgen_here("check", write_recipe(tmp_path, policy, reward_functions=[ORACLE], **ptx_keys))
    said = "under DeepSpeed ZeRO-3 with a Mixture-of-Experts policy" in result.stderr
    assert "Traceback" not in result.stderr and said == refused, result.stderr[-2000:]
    if refused:
        assert result.returncode == 2 and "ptx_coef: 0" in result.stderr and "ZeRO-2 or FSDP2" in result.stderr
