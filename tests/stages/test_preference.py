"""Stages `dpo`, `kto`, `orpo`, `simpo`: each trains from the preference layouts (KTO also from unpaired rows) and
records held-out preference figures and the SFT-vs-tuned generation comparison; a LoRA run's reference is the
adapter-disabled policy; two processes agree; resume is exact; bad keys and broken data exit 2 before any model
loads; chosen == rejected pairs are dropped and counted, refused when too many."""

import contextlib
import importlib
import io
import json
import shutil
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, accelerate_launch, run_hfgen, run_hfgen_here, shrunk
from hfgen import tracking
from hfgen.cli import main as hfgen_main
from hfgen.data.embedded import preference_pairs
from hfgen.preference import REFERENCE_CACHE
from tiny_models import pretrained_tiny_llama, save_tiny_llama

ORACLE = "hfgen.data.embedded:oracle_scores"
FEW = {  # a few seconds on the tiny test model
    "max_train_samples": 64, "max_eval_samples": 16, "max_steps": 4, "per_device_train_batch_size": 8,
    "eval_num_prompts": 4, "eval_samples_per_prompt": 2, "eval_response_length": 8, "logging_steps": 1,
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return pretrained_tiny_llama(tmp_path_factory)


def write_recipe(directory, stage: str, model, **values) -> str:
    data = yaml.safe_load((REPO / f"recipes/tiny/{stage}.yaml").read_text())
    data |= {"model_name_or_path": str(model), "output_dir": str(directory / "run"), "disable_tqdm": True, **FEW}
    data |= values
    path = directory / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def train(recipe: str, *overrides: str):
    from hfgen.recipe import load_recipe
    from hfgen.train import run_recipe

    return run_recipe(load_recipe(recipe, list(overrides)))


@pytest.fixture(scope="module")
def dpo_run(tiny_lm, tmp_path_factory):
    directory = tmp_path_factory.mktemp("dpo")
    train(write_recipe(directory, "dpo", tiny_lm, learning_rate=2e-3))
    return directory / "run"


@pytest.mark.slow
def test_dpo_records_preference_figures_and_the_generation_comparison(dpo_run, tiny_lm):
    results = tracking.read_json(dpo_run / "eval.json")
    assert results["method"] == "dpo" and results["steps"] == 4 and results["held_out_pairs"] == 16
    assert 0 <= results["accuracy"] <= 1
    for side in ("chosen", "rejected"):  # log-probs moved, and the change is the difference of the two
        change = results[f"logps/{side}"] - results[f"logps/{side}_initial"]
        assert results[f"logps/{side}_change"] == pytest.approx(change) and change != 0
    assert results["chosen_logp_fell"] == (results["logps/chosen_change"] < 0)
    assert results["heldout/num_prompts"] == 4 and 0 <= results["win_rate/oracle"] <= 1
    assert results["kl_to_reference"] > 0  # trained policy differs from its reference
    rows = [json.loads(line) for line in (dpo_run / "policy_eval.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"sft/response", "dpo/response", "sft/oracle", "dpo/oracle", "kl"} <= rows[0].keys()
    assert (dpo_run / "model.safetensors").is_file() and tracking.is_complete(dpo_run)
    before, after = load_file(tiny_lm / "model.safetensors"), load_file(dpo_run / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)


def unpaired_file(path):
    rows = []
    for pair in preference_pairs(80, seed=3):
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def plain_pairs_file(path, explicit_prompt: bool):
    rows = []
    for pair in preference_pairs(80, seed=5):
        prompt = pair["prompt"][0]["content"] + "\n"
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected} if explicit_prompt
                    else {"chosen": prompt + chosen, "rejected": prompt + rejected})  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, data",
    [("kto", "unpaired"), ("kto", "paired"), ("orpo", "plain_implicit_prompt"), ("simpo", "plain_with_prompt")],
)
def test_kto_orpo_simpo_train_on_their_layouts(tiny_lm, tmp_path, stage, data):
    values = {"eval_samples_per_prompt": 1, "eval_num_prompts": 2, "learning_rate": 2e-3}
    if data == "unpaired":
        values["dataset_name"] = unpaired_file(tmp_path / "unpaired.jsonl")
    elif data.startswith("plain"):
        values["dataset_name"] = plain_pairs_file(tmp_path / "pairs.jsonl", data == "plain_with_prompt")
        values["eval_prompts_dataset"] = None
        values["oracle_function"] = None
    train(write_recipe(tmp_path, stage, tiny_lm, **values))
    results = tracking.read_json(tmp_path / "run/eval.json")
    assert results["method"] == stage and results["steps"] == 4
    assert results["logps/chosen_change"] != 0 and results["logps/rejected_change"] != 0
    assert ("accuracy" in results) == (data != "unpaired")  # unpaired rows are not pairs
    assert results["heldout/num_prompts"] == 2 and results["kl_to_reference"] > 0
    # how its rows prompted the model, for generate / eval (plain rows: raw; they defaulted to chat)
    assert results["trained_on_chat"] is not data.startswith("plain")
    # data.json says so from the start, for a checkpoint of the run before its eval.json (probe 42 B4)
    assert tracking.read_json(tmp_path / "run/data.json")["trained_on_chat"] is results["trained_on_chat"]
    if stage in ("orpo", "simpo"):  # reference-free: the implicit reward is the mean log-prob, before and after
        assert 0 <= results["accuracy_initial"] <= 1


@pytest.mark.slow
def test_lora_reference_is_the_adapter_disabled_policy(tiny_lm, tmp_path):
    lora = {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_target_modules": ["q_proj", "v_proj"]}
    train(write_recipe(tmp_path, "dpo", tiny_lm, learning_rate=1e-2, **lora))
    run = tmp_path / "run"
    assert (run / "adapter_config.json").is_file() and not (run / "model.safetensors").exists()
    results = tracking.read_json(run / "eval.json")
    assert results["peft"] and results["trainable_parameters"] < results["parameters"] / 5
    assert results["kl_to_reference"] > 0 and results["logps/chosen_change"] != 0


def test_a_policy_broken_by_the_last_update_is_not_saved(tiny_lm, tmp_path):
    """The guard checks a step's loss and gradients before its update: the last one's (learning rate 1e12) left a
    policy whose log-probabilities were NaN, saved, then the comparison's figures ended in a raw TypeError."""
    from hfgen.errors import Diverged

    with pytest.raises(Diverged, match="training ended at step 1 with a model that no longer computes: its held-out"):
        train(write_recipe(tmp_path, "dpo", tiny_lm, learning_rate=1e12, warmup_steps=0, max_steps=1))
    assert not (tmp_path / "run/model.safetensors").exists() and not tracking.is_complete(tmp_path / "run")


def test_an_unchanged_policy_under_bf16_mixed_precision_has_the_same_figures_before_and_after(tiny_lm, tmp_path):
    # the "before" pass ran on the model not yet prepared (float32 compute), the "after" under the bf16 autocast the
    # prepared model runs in: at learning rate 0 the chosen log-probs "fell" (-0.002) with its warning, accuracy 0.375
    recipe = write_recipe(
        tmp_path, "dpo", tiny_lm, learning_rate=0.0, max_steps=1, bf16=True, eval_samples_per_prompt=0
    )
    result = run_hfgen_here("train", recipe)  # (a fresh accelerate state after it: bf16 would stay for the next test)
    assert result.returncode == 0, result.stderr[-3000:]
    results = tracking.read_json(tmp_path / "run/eval.json")
    assert results["logps/chosen_change"] == 0 and results["logps/rejected_change"] == 0, results
    assert results["accuracy"] == 0 and not results["chosen_logp_fell"]


@pytest.mark.parametrize("stage", ["dpo", "orpo"])
def test_a_bfloat16_policy_at_learning_rate_zero_matches_its_reference(tiny_lm, tmp_path, stage):
    # dtype: bfloat16 trained in full: the policy trains float32 weights under bf16 autocast, the reference (DPO's
    # loss's, ORPO's comparison baseline) stayed bfloat16: DPO's implicit rewards and eval.json's kl_to_reference were
    # not 0 at learning rate 0 (probe 43 C1)
    recipe = write_recipe(tmp_path, stage, tiny_lm, dtype="bfloat16", learning_rate=0.0, max_steps=1,
                          eval_num_prompts=2, eval_samples_per_prompt=1)  # fmt: skip
    result = run_hfgen_here("train", recipe)  # (a fresh accelerate state after it: bf16 would stay for the next test)
    assert result.returncode == 0, result.stderr[-3000:]
    if stage == "dpo":
        (row,) = [row for row in tracking.read_metrics(tmp_path / "run") if "rewards/chosen" in row]
        assert row["rewards/chosen"] == row["rewards/rejected"] == 0, row
    assert abs(tracking.read_json(tmp_path / "run/eval.json")["kl_to_reference"]) < 1e-6


@pytest.mark.slow
def test_sync_ref_model_compares_against_the_starting_model(tiny_lm, tmp_path):
    # mixup alpha 1 at every step: TRL's reference becomes the policy itself; the comparison's baseline must not
    sync = {"sync_ref_model": True, "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 1.0, "max_steps": 2}
    train(write_recipe(tmp_path, "dpo", tiny_lm, learning_rate=1e-2, eval_samples_per_prompt=1, **sync))
    results = tracking.read_json(tmp_path / "run/eval.json")
    assert results["kl_to_reference"] > 0.01, results["kl_to_reference"]


def test_precomputed_reference_log_probs_keep_no_reference_in_memory(monkeypatch):
    from trl import DPOConfig, KTOConfig, ModelConfig

    from hfgen.preference import starting_model_while_training

    full, lora = ModelConfig(), ModelConfig(use_peft=True)
    precompute = DPOConfig(output_dir="unused", precompute_ref_log_probs=True, use_cpu=True)
    assert not starting_model_while_training(full, precompute, needs_reference=True)  # TRL computes them first
    assert starting_model_while_training(full, DPOConfig(output_dir="unused", use_cpu=True), needs_reference=True)
    assert starting_model_while_training(full, KTOConfig(output_dir="unused", use_cpu=True), needs_reference=True)
    assert not starting_model_while_training(lora, precompute, needs_reference=True)  # the adapter-disabled policy
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # TRL would load one itself for the precompute
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert starting_model_while_training(full, precompute, needs_reference=True)


@pytest.mark.slow
def test_precomputed_reference_run_compares_against_the_starting_model(tiny_lm, tmp_path):
    train(write_recipe(tmp_path, "dpo", tiny_lm, learning_rate=1e-2, eval_samples_per_prompt=1, max_steps=2,
                       precompute_ref_log_probs=True))  # fmt: skip
    results = tracking.read_json(tmp_path / "run/eval.json")
    assert results["steps"] == 2 and results["kl_to_reference"] > 0.01 and results["logps/chosen_change"] != 0


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tiny_lm, tmp_path):
    common = {"save_strategy": "steps", "save_steps": 2, "eval_samples_per_prompt": 0, "learning_rate": 2e-3}
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full_dir.mkdir(), resumed_dir.mkdir()
    train(write_recipe(full_dir, "dpo", tiny_lm, **common))
    # The interrupted run: all that survives of it is its first checkpoint.
    (resumed_dir / "run").mkdir()
    shutil.copytree(full_dir / "run" / "checkpoint-2", resumed_dir / "run" / "checkpoint-2")
    train(write_recipe(resumed_dir, "dpo", tiny_lm, **common), "--resume_from_checkpoint", "true")
    full, resumed = tracking.read_metrics(full_dir / "run"), tracking.read_metrics(resumed_dir / "run")
    steps = [row["step"] for row in resumed if "loss" in row]
    assert steps == [3, 4], steps  # a run that ignored the checkpoint would log steps 1-4
    for key in ("loss", "rewards/margins"):
        expected = [row[key] for row in full if "loss" in row and row["step"] > 2]
        assert [row[key] for row in resumed if "loss" in row] == pytest.approx(expected, rel=1e-5), key
    a, b = load_file(full_dir / "run/model.safetensors"), load_file(resumed_dir / "run/model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_processes_end_with_identical_weights(tiny_lm, tmp_path, free_port):
    recipe = write_recipe(tmp_path, "dpo", tiny_lm, max_steps=3, eval_samples_per_prompt=1)
    result = accelerate_launch(free_port, recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    fingerprints = [(run / f"weights-rank{rank}.sha256").read_text() for rank in (0, 1)]
    assert fingerprints[0] == fingerprints[1]
    assert tracking.read_json(run / "env.json")["world_size"] == 2
    assert tracking.read_json(run / "eval.json")["heldout/num_prompts"] == 4  # gathered from both ranks


@pytest.mark.slow
def test_precomputed_reference_log_probs_on_two_processes(tiny_lm, tmp_path, free_port):
    """DPO and KTO with `precompute_ref_log_probs` in one 2-process launch: TRL wrote the log-probs into the main
    process's temporary datasets dir and the other process looked for them in its own (FileNotFoundError)."""
    from engines.launch import engine_command

    recipes = []
    for stage in ("dpo", "kto"):
        (tmp_path / stage).mkdir()
        recipes.append(write_recipe(tmp_path / stage, stage, tiny_lm, max_steps=2, eval_samples_per_prompt=1,
                                    precompute_ref_log_probs=True))  # fmt: skip
    command, environment = engine_command("ddp", free_port, {"HFGEN_WEIGHTS_FINGERPRINT": "1"})
    result = subprocess.run([*command, recipes[0], "--then", recipes[1]], cwd=REPO, capture_output=True, text=True,
                            timeout=900, env=environment)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("dpo", "kto"):
        run = tmp_path / stage / "run"
        assert tracking.is_complete(run) and tracking.read_json(run / "env.json")["world_size"] == 2
        assert (run / "weights-rank0.sha256").read_text() == (run / "weights-rank1.sha256").read_text()
        assert tracking.read_json(run / "eval.json")["steps"] == 2
        assert not (run / REFERENCE_CACHE).exists()  # the shared rows are gone with the run's end


PAIR = {"prompt": "describe the cat.", "chosen": "the cat is kind.", "rejected": "the cat is rude."}
SAME = {"prompt": "describe the dog.", "chosen": "the dog is calm.", "rejected": "the dog is calm."}
CONVERSATION_PAIR = {
    "chosen": [{"role": "user", "content": "describe the cat."}, {"role": "assistant", "content": "kind."}],
    "rejected": [{"role": "user", "content": "describe the cat."}, {"role": "assistant", "content": "rude."}],
}


@pytest.mark.parametrize(
    "stage, rows, expected",
    [
        ("dpo", [{"prompt": "p", "good": "a", "bad": "b"}] * 8, ["good", "chosen", "rejected"]),  # wrong columns
        ("dpo", [PAIR] * 6 + [{**PAIR, "rejected": None}] * 2, ["rejected", "lack a value", "rows [7, 8]"]),
        ("kto", [{"prompt": "p", "completion": "a"}] * 8, ["label", "completion"]),  # unpaired without labels
        ("orpo", [PAIR] * 30 + [SAME] * 10, ["chosen equal to rejected", "more than 10%"]),  # too many useless pairs
        (
            "dpo",
            [CONVERSATION_PAIR] * 6
            + [
                {
                    **CONVERSATION_PAIR,
                    "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}],
                }
            ],
            ["rows [7]", "start with different prompts"],
        ),  # implicit prompt: a traceback in the check  # fmt: skip
    ],
    ids=["missing_column", "missing_values", "kto_unlabelled", "identical_pairs", "different_prompts"],
)
def test_broken_preference_data_exits_2_naming_rows_or_columns(tmp_path, capsys, stage, rows, expected):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = REPO / f"recipes/tiny/{stage}.yaml"
    model = tmp_path / "no_model_needed"  # the data problems are reported with the missing model, before loading
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["train", str(recipe), "--dataset_name", str(data), "--model_name_or_path", str(model),
                    "--validation_split_percentage", "50", "--output_dir", str(tmp_path / "out")])  # fmt: skip
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in message
    for text in expected:
        assert text in message, message


@pytest.mark.parametrize(
    "stage, overrides, expected",
    [
        ("dpo", ["--betta", "0.2"], "did you mean 'beta'"),
        ("dpo", ["--loss_type", "sigmoid", "nope"], "loss_type ['nope'] unknown"),
        ("simpo", ["--loss_type", "sigmoid"], "'sigmoid' is not one of ['simpo', 'alphapo']"),
        ("kto", ["--eval_samples_per_prompt", "-1"], "'eval_samples_per_prompt' must be at least 0"),
        ("dpo", ["--eval_temperature", "0"], "'eval_temperature' must be above 0"),
        ("simpo", ["--loss_type", "alphapo"], "loss_type alphapo with alpha 0 is plain SimPO"),
        ("dpo", ["--ld_alpha", "1.5"], "ld_alpha (LD-DPO's weight of the verbose tokens) must be in [0, 1]"),
        ("dpo", ["--label_smoothing", "0.1"], "label_smoothing 0.1 has no effect with loss_type ['sigmoid', 'sft']"),
        ("dpo", ["--loss_type", "sigmoid", "aot", "--use_weighting", "true"], "use_weighting (WPO's per-pair weights)"),
        ("dpo", ["--use_peft", "true", "--sync_ref_model", "true"], "sync_ref_model needs a reference model"),
        ("kto", ["--use_peft", "true", "--sync_ref_model", "true"], "sync_ref_model needs a reference model"),
        ("kto", ["--per_device_train_batch_size", "1"], "per_device_train_batch_size must be at least 2 for KTO"),
        ("simpo", ["--eval_temperature", "nan"], "'eval_temperature' must be a finite number"),
        ("orpo", ["--eval_num_prompts", "-2"], "'eval_num_prompts' must be at least 0"),
        ("orpo", ["--max_completion_length", "4"], "max_completion_length 4 has no effect in ORPO and SimPO"),
        ("simpo", ["--max_completion_length", "4"], "max_completion_length 4 has no effect in ORPO and SimPO"),
    ],
)
def test_bad_keys_exit_2_naming_them(tmp_path, capsys, stage, overrides, expected):
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["train", str(REPO / f"recipes/tiny/{stage}.yaml"), *overrides, "--output_dir", str(tmp_path)])
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in message and expected in message, message


@pytest.mark.parametrize("stage", ["dpo", "kto", "orpo", "simpo"])
def test_a_causal_lm_as_reward_model_exits_2(tmp_path, capsys, stage):
    # judged with a new, random score head, the held-out win rates would be noise
    causal_lm = save_tiny_llama(tmp_path / "sft")
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["train", str(REPO / f"recipes/tiny/{stage}.yaml"), "--model_name_or_path", str(causal_lm),
                    "--reward_model_path", str(causal_lm), "--output_dir", str(tmp_path / "out")])  # fmt: skip
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in message
    assert "reward_model_path" in message and "is not a reward model" in message, message


def test_a_few_identical_pairs_are_dropped_and_counted(tmp_path):
    from hfgen.preference import PreferenceDataArguments, load_preference_splits

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in [PAIR] * 19 + [SAME]))
    args = PreferenceDataArguments(dataset_name=str(data), validation_split_percentage=50)
    train_rows, eval_rows, records = load_preference_splits(args, seed=0)
    kept = list(train_rows["chosen"]) + list(eval_rows["chosen"])
    assert len(kept) == 19 and SAME["chosen"] not in kept
    # counted in data.json (and on the console), as in every text stage
    assert sum(records[split]["dropped"].get("chosen equal to rejected", 0) for split in ("train", "eval")) == 1


def test_ultrafeedback_binarized_splits_and_rows_reach_trl_as_conversations(tmp_path):
    # UltraFeedback-binarized: train_prefs / train_sft / train_gen splits, a text prompt beside whole conversations
    # (TRL reads a pair as conversational only if its prompt is: DPO added EOS to a list) and a `messages` column.
    import datasets

    from hfgen.preference import PreferenceDataArguments, load_preference_splits

    def talk(i, answer):
        return [{"role": "user", "content": f"describe the cat {i}."}, {"role": "assistant", "content": answer}]

    rows = datasets.Dataset.from_list(
        [{"prompt": f"describe the cat {i}.", "chosen": talk(i, "the cat is calm."), "rejected": talk(i, "a rock."),
          "messages": talk(i, "the cat is calm."), "score_chosen": 8.0} for i in range(12)]
    )  # fmt: skip
    splits = {f"{side}_{use}": rows for side in ("train", "test") for use in ("prefs", "sft", "gen")}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "uf")
    train_rows, eval_rows, _ = load_preference_splits(
        PreferenceDataArguments(dataset_name=str(tmp_path / "uf")), seed=0
    )
    assert len(train_rows) == len(eval_rows) == 12
    assert sorted(train_rows.column_names) == ["chosen", "prompt", "rejected"]  # ORPO/CPO stopped on `messages`
    assert train_rows[0]["prompt"] == [{"role": "user", "content": "describe the cat 0."}]
    assert train_rows[0]["chosen"] == [{"role": "assistant", "content": "the cat is calm."}]


def test_pipeline_runs_offline_methods_without_a_reward_step_unless_asked():
    from hfgen.errors import UserError
    from hfgen.preference import PreferenceDataArguments
    from hfgen.recipe import build_recipe
    from hfgen.stages.rlhf import pipeline_steps, step_recipe

    # the pretraining the SFT step starts from is the pipeline's prerequisite: a fresh clone has no outputs/tiny
    base = {"stage": "rlhf", "output_dir": "outputs/x", "sft": "recipes/tiny/sft_full.yaml",
            "prerequisite": "recipes/tiny/pretrain.yaml"}  # fmt: skip
    (args,) = build_recipe({**base, "method": "dpo", "dpo": "recipes/tiny/dpo.yaml"}, check_inputs=True).configs
    assert pipeline_steps(args) == ("sft", "dpo")
    judged = {**base, "method": "kto", "kto": "recipes/tiny/kto.yaml", "reward": "recipes/tiny/reward.yaml"}
    (args,) = build_recipe(judged, check_inputs=True).configs
    assert pipeline_steps(args) == ("sft", "reward", "kto")
    kto = step_recipe(args, "kto", check_inputs=False)
    assert kto.get(PreferenceDataArguments).reward_model_path == "outputs/tiny/reward"  # the judge
    with pytest.raises(UserError, match="method 'dpo2' is not one of"):
        build_recipe({**base, "method": "dpo2"}, check_inputs=True)
    with pytest.raises(UserError, match="orpo is not set"):
        build_recipe({**base, "method": "orpo"}, check_inputs=True)


# ---- hfgen compare ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comparison(tiny_lm, tmp_path_factory):
    """`hfgen compare` of PPO and DPO, one seed, a few steps, on the tiny test model as the SFT model's start."""
    directory = tmp_path_factory.mktemp("compare")
    few = {"save_strategy": "no", "logging_steps": 1, "max_eval_samples": 8, "disable_tqdm": True}
    pipeline = {
        "stage": "rlhf",
        "output_dir": str(directory / "pipeline"),
        "sft": shrunk("sft_full.yaml", directory, model_name_or_path=str(tiny_lm), max_steps=3, max_train_samples=64,
                      num_samples=2, output_dir=str(directory / "sft"), **few),
        "reward": shrunk("reward.yaml", directory, model_name_or_path=str(tiny_lm), max_steps=3, max_train_samples=64,
                         output_dir=str(directory / "reward"), **few),
        "ppo": shrunk("ppo.yaml", directory, per_device_train_batch_size=8, num_mini_batches=1, num_ppo_epochs=1,
                      response_length=8, logging_steps=1, sample_steps=0, output_dir=str(directory / "ppo")),
        "dpo": shrunk("dpo.yaml", directory, per_device_train_batch_size=8, logging_steps=1, max_eval_samples=8,
                      output_dir=str(directory / "dpo")),
    }  # fmt: skip
    path = directory / "compare.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    command = ["compare", path, "--methods", "ppo,dpo", "--seeds", "1", "--prompts", "16", "--num_prompts", "3",
               "--samples_per_prompt", "2", "--response_length", "8", "--output_root", directory / "root", "--quiet"]  # fmt: skip
    outputs = []
    for _ in range(2):  # the second time resumes: nothing left to train or evaluate
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            assert hfgen_main([str(token) for token in command]) == 0
        outputs.append(printed.getvalue())
    return directory / "root", *outputs


def test_compares_cached_evaluation_is_keyed_on_the_prompts_content_not_their_files_name(tmp_path):
    # a --eval_dataset file rewritten under its name reused the evaluation on the old prompts (probe 39 C8)
    import argparse

    from hfgen.compare import evaluation_settings

    prompts = tmp_path / "ev.jsonl"
    prompts.write_text('{"prompt": "describe the cat."}\n')
    args = argparse.Namespace(eval_dataset=str(prompts), num_prompts=2, samples_per_prompt=1, response_length=4,
                              temperature=1.0, oracle="none")  # fmt: skip
    before = evaluation_settings(args)
    assert evaluation_settings(args) == before  # the same file: the cache holds
    prompts.write_text('{"prompt": "where is the cat?"}\n')
    assert evaluation_settings(args) != before
    assert evaluation_settings(argparse.Namespace(**{**vars(args), "eval_dataset": "embedded:prompts"}))


def test_compares_cached_evaluation_is_keyed_on_the_oracles_source(tmp_path):
    # an --oracle file fixed in place (same MODULE:FUNC) reused the evaluations its old code judged (note 39's Left)
    import argparse

    from hfgen.compare import evaluation_settings

    judge = tmp_path / "judge.py"
    judge.write_text("def oracle(prompts, completions, **kwargs):\n    return [1.0 for _ in completions]\n")
    args = argparse.Namespace(eval_dataset="embedded:prompts", num_prompts=2, samples_per_prompt=1,
                              response_length=4, temperature=1.0, oracle=f"{judge}:oracle")  # fmt: skip
    before = evaluation_settings(args)
    assert evaluation_settings(args) == before
    judge.write_text("def oracle(prompts, completions, **kwargs):\n    return [0.0 for _ in completions]\n")
    assert evaluation_settings(args) != before


def evaluation_arguments(tmp_path, name: str, oracle_scores: str):
    """`hfgen compare`'s evaluation options, tiny, judged by the oracle NAME.py returning `oracle_scores` (a Python
    expression of `completions`)."""
    import argparse

    judge = tmp_path / f"{name}.py"
    judge.write_text(f"def oracle(prompts, completions, **kwargs):\n    return {oracle_scores}\n")
    return argparse.Namespace(eval_dataset="embedded:prompts", num_prompts=3, samples_per_prompt=2,
                              response_length=4, temperature=1.0, oracle=f"{judge}:oracle")  # fmt: skip


def test_compares_cached_evaluation_without_its_rows_is_redone(tmp_path):
    # compare_eval.json without compare_eval.jsonl (removed by hand) was a raw FileNotFoundError in the report
    # (probe 45 C8)
    from hfgen.compare import ROWS_FILE, evaluate_point, run_figures

    policy, sft = save_tiny_llama(tmp_path / "policy", seed=1), save_tiny_llama(tmp_path / "sft")
    args = evaluation_arguments(tmp_path, "length", "[float(len(c)) for c in completions]")
    evaluate_point(policy, "dpo", sft, None, args)
    rows = (policy / ROWS_FILE).read_text()
    (policy / ROWS_FILE).unlink()
    evaluate_point(policy, "dpo", sft, None, args)
    assert (policy / ROWS_FILE).read_text() == rows  # evaluated again (the same random numbers)
    assert run_figures(policy)["ci/oracle"]


def test_compares_intervals_leave_out_the_answers_its_oracle_did_not_score(tmp_path):
    # an --oracle returning None for some answers (README: not scored) ended the report in a TypeError, after all
    # the training and evaluation; one scoring none, with nothing to show (probe 45 C3)
    from hfgen.compare import evaluate_point, run_figures, with_interval
    from hfgen.evaluation.policy import bootstrap_interval
    from hfgen.evaluation.text import win_rate

    policy, sft = save_tiny_llama(tmp_path / "policy", seed=1), save_tiny_llama(tmp_path / "sft")
    args = evaluation_arguments(
        tmp_path, "some", "[None if i % 2 else float(len(c)) for i, c in enumerate(completions)]"
    )
    results = evaluate_point(policy, "dpo", sft, None, args)["results"]
    assert results["heldout/pairs_left_out/oracle"] == 3  # (of 3 prompts x 2 answers)
    figures = run_figures(policy)
    pairs = [row for row in tracking.read_jsonl(policy / "compare_eval.jsonl") if row["policy/oracle"] is not None]
    assert len(pairs) == 3 and figures["win_rate/oracle"] == win_rate(
        [r["policy/oracle"] for r in pairs], [r["sft/oracle"] for r in pairs]
    )
    assert figures["ci/oracle"] == bootstrap_interval(
        pairs, lambda rows: win_rate([r["policy/oracle"] for r in rows], [r["sft/oracle"] for r in rows])
    )
    args = evaluation_arguments(tmp_path, "none", "[None for c in completions]")
    assert evaluate_point(policy, "dpo", sft, None, args)["results"]["win_rate/oracle"] is None
    figures = run_figures(policy)
    assert "ci/oracle" not in figures and with_interval(figures, "oracle") == "–"


@pytest.mark.slow
def test_compare_trains_each_method_at_a_matched_budget_and_resumes(comparison):
    root, first, second = comparison
    ppo, dpo = (tracking.read_json(root / method / "seed=0/eval.json") for method in ("ppo", "dpo"))
    assert ppo["episodes"] == 16 and dpo["steps"] == 2  # 16 prompts: 16 episodes, or 2 steps of 8 pairs
    for method in ("ppo", "dpo"):
        record = tracking.read_json(root / method / "seed=0/compare_eval.json")
        assert record["results"]["heldout/num_prompts"] == 3 and "win_rate/oracle" in record["results"]
        assert "win_rate/reward_model" in record["results"]  # the reward model judges every method
        assert tracking.read_json(root / method / "seed=0/peak_memory.json")["peak_memory_mb"] > 0
    rows = {m: (root / m / "seed=0/compare_eval.jsonl").read_text().splitlines() for m in ("ppo", "dpo")}
    sft_answers = [[json.loads(line)["sft/response"] for line in rows[m]] for m in rows]
    assert sft_answers[0] == sft_answers[1]  # the same SFT answers (same prompts, same random numbers) for all
    assert "training" in first and first.count("already complete, skipped") == 0
    assert second.count("already complete, skipped") == 2 and "training ->" not in second


@pytest.mark.slow
def test_compare_report_opens_in_headless_chromium_with_intervals(comparison):
    root = comparison[0]
    page = (root / "report.html").read_text()
    assert page.count("<span class='ci'>[") == 4  # oracle and reward-model intervals for both runs
    assert "16 training prompts" in page and "data:image/png;base64," in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("chromium is not installed (`make test` installs it)")
    import subprocess

    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", (root / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "oracle win rate [95% CI]" in result.stdout and "Mean over seeds" in result.stdout


def test_eval_prompts_dataset_is_read_in_any_prompt_layout(tmp_path):
    from hfgen.preference import load_eval_prompts

    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(
        json.dumps([{"instruction": f"describe the cat {i}.", "input": "", "output": "x"} for i in range(5)])
    )
    lines = tmp_path / "prompts.txt"
    lines.write_text("".join(f"describe the dog {i}.\n" for i in range(5)))
    assert load_eval_prompts(str(alpaca))[0].startswith("describe the cat 0.")  # (a KeyError 'prompt' before)
    assert load_eval_prompts(str(lines)) == [f"describe the dog {i}." for i in range(5)]


def test_plain_held_out_prompts_are_a_user_turn_when_the_pairs_are_conversations(tmp_path):
    import datasets

    from hfgen.preference import PreferenceDataArguments, held_out_prompts

    lines = tmp_path / "prompts.txt"
    lines.write_text("describe the dog.\ndescribe the cat.\n")
    args = PreferenceDataArguments(eval_prompts_dataset=str(lines), eval_num_prompts=8)
    talk = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}], "chosen": [], "rejected": []}])
    # trained on conversations: sent raw, the text was not what the policy learnt to answer
    assert held_out_prompts(args, talk) == [[{"role": "user", "content": "describe the dog."}],
                                            [{"role": "user", "content": "describe the cat."}]]  # fmt: skip
    plain = datasets.Dataset.from_list([{"prompt": "hi", "chosen": "a", "rejected": "b"}])
    assert held_out_prompts(args, plain) == ["describe the dog.", "describe the cat."]


@pytest.mark.parametrize(
    "recipe, methods, message",
    [("pretrain.yaml", "ppo,dpo", "is a pretrain recipe; compare takes a pipeline recipe"),
     ("rlhf.yaml", "ppo,kto", "--methods ['kto']: each must be a method whose step recipe the pipeline"),
     # it ran once but was listed twice in the report (probe 45 C7)
     ("compare.yaml", "dpo,ppo,dpo", "--methods dpo,ppo,dpo names dpo twice; give each method once")],
)  # fmt: skip
def test_compare_refuses_a_stage_recipe_and_methods_the_pipeline_lacks(capsys, recipe, methods, message):
    # a stage recipe was a ValueError traceback (`(base,) = configs`); the list of methods offered all of them
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["compare", str(REPO / "recipes/tiny" / recipe), "--methods", methods, "--seeds", "1"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and "Traceback" not in error, error


def test_compare_checks_its_evaluation_options_before_anything_trains(capsys, tmp_path):
    # --temperature -1 sampled garbage and exited 0; a bad --oracle, --num_prompts 0 and --samples_per_prompt 0 failed
    # only after all the training
    root = tmp_path / "compare"
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["compare", str(REPO / "recipes/tiny/compare.yaml"), "--methods", "dpo", "--seeds", "1",
                    "--output_root", str(root), "--temperature", "-1", "--oracle", "no_such_module:fn",
                    "--num_prompts", "0", "--samples_per_prompt", "0"])  # fmt: skip
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error, error
    for message in ("--temperature must be >= 0", "--oracle 'no_such_module:fn'", "--num_prompts must be at least 1",
                    "--samples_per_prompt must be at least 1"):  # fmt: skip
        assert message in error, error
    assert not root.exists()


def test_compare_into_a_read_only_root_is_refused_before_anything_trains(capsys, read_only_disk):
    """--output_root on a read-only disk: the shared SFT step trained first, then the first run stopped on the
    read-only root (probe 41 I13)."""
    disk = read_only_disk
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["compare", str(REPO / "recipes/tiny/compare.yaml"), "--methods", "dpo", "--seeds", "1",
                    "--output_root", str(disk / "compare")])  # fmt: skip
    error = capsys.readouterr()
    assert exit_info.value.code == 2 and "Traceback" not in error.err, error.err
    assert f"nothing was run: --output_root '{disk / 'compare'}': '{disk}' cannot be written to" in error.err
    assert "== sft" not in error.out  # (no step ran)


def test_compare_refuses_a_run_dir_holding_an_unfinished_run_of_another_recipe(capsys, tmp_path):
    """Its complete checkpoints were deleted and the run trained over them, exit 0, saying "its inputs changed since
    it ran: config_name ... is gone" (probe 45 C1), where `hfgen train` refuses the dir."""
    run = tmp_path / "compare" / "dpo" / "seed=0"
    assert hfgen_main(["train", str(REPO / "recipes/tiny/pretrain.yaml"), "--max_steps", "1", "--max_train_samples",
                       "8", "--max_eval_samples", "4", "--block_size", "8", "--save_strategy", "steps",
                       "--save_steps", "1", "--output_dir", str(run)]) == 0  # fmt: skip
    (run / tracking.COMPLETE_MARKER).unlink()  # as a kill after its last checkpoint leaves it
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["compare", str(REPO / "recipes/tiny/compare.yaml"), "--methods", "dpo", "--seeds", "1",
                    "--output_root", str(tmp_path / "compare")])  # fmt: skip
    error = capsys.readouterr()
    assert exit_info.value.code == 2 and "Traceback" not in error.err, error.err
    assert f"output_dir '{run}' holds an unfinished run of a different recipe (differing keys: " in error.err
    assert "== sft" not in error.out and tracking.complete_checkpoints(run)  # (no step ran, nothing deleted)


@pytest.mark.slow
def test_compare_retrains_and_reevaluates_after_the_sft_model_or_the_recipe_changes(tiny_lm, tmp_path, capsys):
    # A retrained SFT model left every run "already complete, skipped", and a retrained run kept its old
    # compare_eval.json (the evaluation was cached by its settings only).
    few = {"save_strategy": "no", "max_eval_samples": 8, "disable_tqdm": True, "output_dir": str(tmp_path / "sft")}
    sft = shrunk("sft_full.yaml", tmp_path, model_name_or_path=str(tiny_lm), max_steps=2, max_train_samples=32, **few)
    dpo = shrunk("dpo.yaml", tmp_path, per_device_train_batch_size=8, max_eval_samples=8)

    def compare(sft_overrides: dict, *extra: str) -> str:
        pipeline = {"stage": "rlhf", "method": "dpo", "output_dir": str(tmp_path / "pipeline"), "sft": sft, "dpo": dpo,
                    "sft_overrides": sft_overrides}  # fmt: skip
        (tmp_path / "compare.yaml").write_text(yaml.safe_dump(pipeline))
        command = ["compare", str(tmp_path / "compare.yaml"), "--methods", "dpo", "--seeds", "1", "--prompts", "8",
                   "--num_prompts", "2", "--samples_per_prompt", "1", "--response_length", "4",
                   "--output_root", str(tmp_path / "root"), "--quiet", *extra]  # fmt: skip
        assert hfgen_main(command) == 0
        return capsys.readouterr().out

    run = tmp_path / "root/dpo/seed=0"
    compare({})
    first = (run / "compare_eval.json").read_text()
    assert "already complete, skipped" in compare({})  # nothing changed: nothing redone
    assert (run / "compare_eval.json").read_text() == first
    printed = compare(
        {"learning_rate": 1e-2, "overwrite_output_dir": True}
    )  # the SFT model is trained again: the DPO run is stale
    # (the run's recorded input fingerprints say so first: its model_name_or_path holds another run now)
    assert "== sft" in printed and "training (its inputs changed since it ran: model_name_or_path" in printed, printed
    assert "now holds another run" in printed, printed
    second = (run / "compare_eval.json").read_text()
    assert second != first
    # and once retrained, reused: its record of the SFT model it was trained from was deleted by the fresh start over
    # its old run, and every later compare trained it again (probe 45 C2)
    assert "already complete, skipped" in compare({"learning_rate": 1e-2, "overwrite_output_dir": True})
    # another recipe for the run: refused before anything trains, naming the key and what to pass
    with pytest.raises(SystemExit) as exit_info:
        compare({"learning_rate": 1e-2, "overwrite_output_dir": True}, "--learning_rate", "0.05")
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "differing keys: learning_rate" in captured.err
    assert "--overwrite_output_dir true" in captured.err and "== sft" not in captured.out
    compare(
        {"learning_rate": 1e-2, "overwrite_output_dir": True},
        "--learning_rate",
        "0.05",
        "--overwrite_output_dir",
        "true",
    )
    assert (run / "compare_eval.json").read_text() != second  # retrained, so evaluated again


def interruptible_compare(tmp_path, tiny_lm, sft_saves: bool) -> list[str]:
    """A one-run DPO comparison whose DPO run (and, `sft_saves`, SFT step) writes a checkpoint each of its 2 steps."""
    saves = {"save_strategy": "steps", "save_steps": 1}
    few = {"max_eval_samples": 8, "disable_tqdm": True, "output_dir": str(tmp_path / "sft"),
           **(saves if sft_saves else {"save_strategy": "no"})}  # fmt: skip
    sft = shrunk("sft_full.yaml", tmp_path, model_name_or_path=str(tiny_lm), max_steps=2, max_train_samples=32, **few)
    dpo = shrunk("dpo.yaml", tmp_path, per_device_train_batch_size=8, max_eval_samples=8, **saves)  # 16 prompts: 2
    pipeline = {"stage": "rlhf", "method": "dpo", "output_dir": str(tmp_path / "pipeline"), "sft": sft, "dpo": dpo}
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(pipeline))
    return ["compare", str(tmp_path / "compare.yaml"), "--methods", "dpo", "--seeds", "1", "--prompts", "16",
            "--num_prompts", "2", "--samples_per_prompt", "1", "--response_length", "4",
            "--output_root", str(tmp_path / "root"), "--quiet"]  # fmt: skip


@pytest.mark.slow
def test_an_interrupted_compare_run_continues_from_its_checkpoint(tiny_lm, tmp_path, capfd, monkeypatch):
    # compare trained its runs as fresh starts: an interrupted one was refused (its dir held complete checkpoints)
    command = interruptible_compare(tmp_path, tiny_lm, sft_saves=False)
    monkeypatch.setenv("HFGEN_KILL_AT", "checkpoint@2")  # the DPO run's child, writing its second checkpoint
    with pytest.raises(SystemExit):
        hfgen_main(command)
    run = tmp_path / "root/dpo/seed=0"
    assert tracking.complete_checkpoints(run) and not tracking.is_complete(run)
    monkeypatch.delenv("HFGEN_KILL_AT")
    capfd.readouterr()
    assert hfgen_main(command) == 0
    assert "continuing from its newest complete checkpoint" in capfd.readouterr().out
    assert tracking.is_complete(run)


@pytest.mark.slow
def test_an_interrupted_shared_sft_step_of_compare_continues_from_its_checkpoint(tiny_lm, tmp_path):
    # the same, for the SFT step the runs share (trained in compare's own process)
    command = interruptible_compare(tmp_path, tiny_lm, sft_saves=True)
    killed = run_hfgen(*command, env={"HFGEN_KILL_AT": "checkpoint@2"})
    assert killed.returncode < 0 and tracking.complete_checkpoints(tmp_path / "sft")
    result = run_hfgen(*command, env={"HFGEN_KILL_AT": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "continuing from its newest complete checkpoint" in result.stdout
    assert tracking.is_complete(tmp_path / "sft") and tracking.is_complete(tmp_path / "root/dpo/seed=0")


@pytest.mark.parametrize("stage", ["dpo", "simpo"])
def test_pairs_equal_within_max_length_are_dropped_and_counted_refused_when_many(tmp_path, capsys, stage):
    """Answers that differ only after max_length tokens trained as one sequence (margins 0) with data.json saying
    every pair was kept: they count as chosen == rejected pairs, dropped under 10%, refused (exit 2) above."""
    from trl import DPOConfig

    from hfgen.models import load_tokenizer
    from hfgen.preference import PreferenceDataArguments, load_preference_splits

    model = save_tiny_llama(tmp_path / "lm")
    shared = " ".join(["the cat sat on the mat"] * 20)
    late = [{"prompt": f"q{i}", "chosen": f"{shared} good", "rejected": f"{shared} bad"} for i in range(8)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in [PAIR] * 30 + late))
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["check", str(REPO / f"recipes/tiny/{stage}.yaml"), "--dataset_name", str(data),
                    "--model_name_or_path", str(model), "--max_length", "32", "--output_dir", str(tmp_path / "out")])  # fmt: skip
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in message
    assert "8 of 38 pairs" in message and "max_length=32" in message, message

    data.write_text("".join(json.dumps(row) + "\n" for row in [PAIR] * 30 + late[:2]))
    args = PreferenceDataArguments(dataset_name=str(data), validation_split_percentage=25)
    config = DPOConfig(output_dir=str(tmp_path / "out"), max_length=32, use_cpu=True, bf16=False)
    train_rows, eval_rows, records = load_preference_splits(args, 0, False, load_tokenizer(str(model)), config)
    assert len(train_rows) + len(eval_rows) == 30
    dropped = [records[s]["dropped"].get("chosen equal to rejected within max_length=32", 0) for s in ("train", "eval")]
    assert sum(dropped) == 2
    # (kept whole, the pairs differ: nothing dropped)
    config = DPOConfig(output_dir=str(tmp_path / "out"), max_length=256, use_cpu=True, bf16=False)
    train_rows, eval_rows, _ = load_preference_splits(args, 0, False, load_tokenizer(str(model)), config)
    assert len(train_rows) + len(eval_rows) == 32


@pytest.mark.parametrize("keep_end", [False, True])
def test_the_untokenized_judgement_of_pairs_that_differ_within_max_length_is_never_wrong(tmp_path, keep_end):
    """differ_before spares tokenizing each pair (minutes on 61k pairs) where its byte count proves the answers
    part inside the kept tokens: wherever it says so, the tokenized pairs must differ, and it must say so for
    answers that part at once."""
    import random
    import types

    from hfgen.models import load_tokenizer
    from hfgen.preference import differ_before, trained_sequence

    tokenizer = load_tokenizer(str(save_tiny_llama(tmp_path / "lm")))
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "héllo", "dog", ",", "ran"]
    said = 0
    for case in range(120):
        shared = " ".join(rng.choices(words, k=rng.randrange(0, 40)))
        ends = [" ".join(rng.choices(words, k=rng.randrange(1, 6))) for _ in range(2)]
        ends[1] = ends[1] if ends[1] != ends[0] else ends[1] + " dog"
        chosen, rejected = (shared + " " + end if not keep_end else end + " " + shared for end in ends)
        prompt = " ".join(rng.choices(words, k=rng.randrange(1, 20)))
        chat = case % 2 == 0
        row = (
            {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
             "rejected": [{"role": "assistant", "content": rejected}]}
            if chat else {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        )  # fmt: skip
        limit = rng.choice([16, 32, 64, 128])
        args = types.SimpleNamespace(max_length=limit, truncation_mode="keep_end" if keep_end else "keep_start")
        if differ_before(tokenizer, row, limit, keep_end, {}):
            said += 1
            sequences = [trained_sequence(tokenizer, row["prompt"], row[side], args) for side in ("chosen", "rejected")]
            assert sequences[0] != sequences[1], row
    assert said > 20
    early = {"prompt": "q", "chosen": "good " + "x " * 50, "rejected": "bad " + "x " * 50}
    assert differ_before(tokenizer, early, 64, False, {}) and not differ_before(tokenizer, early, 64, True, {})
    assert not differ_before(tokenizer, {**early, "rejected": early["chosen"]}, 64, False, {})


def test_held_out_log_probs_score_each_answer_up_to_its_eos(tmp_path):
    """eval.json's held-out logps/*_change, accuracy and chosen_logp_fell score the answer the policy generates, up to
    and including its EOS: the chat template's newline after the EOS (never generated; learnt in DPO's first steps
    through its sft term) made +10.6 of a reported +11.4 nats "chosen rose" while the answers barely moved."""
    import datasets
    from transformers import AutoModelForCausalLM

    from hfgen.models import load_tokenizer
    from hfgen.preference import completion_logprobs, held_out_examples

    model_dir = save_tiny_llama(tmp_path / "lm")
    tokenizer = load_tokenizer(str(model_dir))
    prompt = [{"role": "user", "content": "describe the cat."}]
    rows = datasets.Dataset.from_list([
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "the cat is kind."}],
         "rejected": [{"role": "assistant", "content": "the cat is rude."}]},
    ])  # fmt: skip
    examples = held_out_examples(tokenizer, rows)
    for side, answer in (("chosen", "the cat is kind."), ("rejected", "the cat is rude.")):
        ((ids, start),) = examples[side]
        assert tokenizer.decode(ids[start:]) == answer + tokenizer.eos_token  # (not "...<|end|>\n")
        ((_, scored),) = completion_logprobs(
            AutoModelForCausalLM.from_pretrained(model_dir), examples[side], tokenizer.pad_token_id, 4
        )
        assert scored == len(ids) - start
    # plain-text pairs end with the EOS the trainers append, as before
    plain = held_out_examples(tokenizer, datasets.Dataset.from_list([PAIR]))
    ((ids, start),) = plain["chosen"]
    assert tokenizer.decode(ids[start:]) == PAIR["chosen"] + tokenizer.eos_token


def experimental_trainer(stage: str):
    """TRL's experimental (config, trainer) classes of the orpo or simpo stage."""
    module = importlib.import_module("trl.experimental.orpo" if stage == "orpo" else "trl.experimental.cpo")
    name = "ORPO" if stage == "orpo" else "CPO"
    return getattr(module, f"{name}Config"), getattr(module, f"{name}Trainer")


@pytest.mark.parametrize("stage", ["orpo", "simpo"])
def test_orpo_and_simpo_train_each_answer_ended_by_one_eos_as_the_held_out_figures_score_it(
    tmp_path, monkeypatch, stage
):
    """TRL's experimental ORPO/CPO trainers rendered a conversation whole and appended an EOS to the template's
    newline after the answer's: `answer<|end|>\\n<|end|>` was trained (most of ORPO's NLL and SimPO's per-token
    reward), and hfgen's held-out figures scored other sequences. Every sequence they tokenize is now an answer
    ending at its one EOS, the very ids and completion start of hfgen's held-out examples."""
    from hfgen.models import load_tokenizer
    from hfgen.preference import completion_example

    _, trainer_class = experimental_trainer(stage)
    tokenized = []
    original = trainer_class.tokenize_row

    def recording(self, feature, model=None):  # the trainer's own tokenization, only recorded
        tokenized.append(original(self, feature, model))
        return tokenized[-1]

    monkeypatch.setattr(trainer_class, "tokenize_row", recording)
    pairs = preference_pairs(24, seed=3)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in pairs))
    model = save_tiny_llama(tmp_path / "lm")
    few = {"dataset_name": str(data), "max_train_samples": 16, "max_eval_samples": 8, "max_steps": 1,
           "eval_samples_per_prompt": 0, "eval_prompts_dataset": None, "oracle_function": None}  # fmt: skip
    train(write_recipe(tmp_path, stage, model, **few))
    tokenizer = load_tokenizer(str(model))
    ours = {
        (tuple(ids), start)
        for row in pairs
        for ids, start in (completion_example(tokenizer, row["prompt"], row[side]) for side in ("chosen", "rejected"))
    }
    assert len(tokenized) >= 16  # (every training pair)
    for batch in tokenized:
        for side in ("chosen", "rejected"):
            answer = [t for t in batch[f"{side}_labels"] if t != -100]
            assert answer[-1] == tokenizer.eos_token_id and answer.count(tokenizer.eos_token_id) == 1, answer
            assert (tuple(batch[f"{side}_input_ids"]), batch[f"{side}_labels"].count(-100)) in ours


@pytest.mark.parametrize("stage", ["orpo", "simpo"])
def test_trained_sequence_cuts_as_orpo_and_cpo_cut_at_max_length(tmp_path, stage):
    """trained_sequence (what drop_truncated_identical_pairs compares) modelled DPO's cut for every stage; ORPO and
    CPO keep the whole prompt and cut only the answer, so a prompt past max_length trains whole, with no answer."""
    import datasets
    from transformers import AutoModelForCausalLM

    from hfgen.models import load_tokenizer
    from hfgen.preference import answers_cut_at_eos, trained_sequence

    Config, Trainer = experimental_trainer(stage)
    model_dir = save_tiny_llama(tmp_path / "lm")
    tokenizer = load_tokenizer(str(model_dir))

    def pair(prompt, chosen, rejected):
        return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}  # fmt: skip

    rows = datasets.Dataset.from_list([
        pair("describe the cat.", "the cat is kind and calm.", "the cat is rude."),
        pair("describe the cat. " * 8, "the cat is kind.", "the cat is rude."),  # a prompt longer than max_length
        pair("describe the cat.", "the cat is kind and calm and the dog is kind too.", "no."),
    ])  # fmt: skip
    args = Config(output_dir=str(tmp_path / "out"), max_length=16, use_cpu=True, bf16=False, report_to="none")
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
        train_dataset=answers_cut_at_eos(tokenizer, rows), processing_class=tokenizer,
    )  # fmt: skip
    for row, tokenized in zip(rows, trainer.train_dataset):
        for side in ("chosen", "rejected"):
            mask = tuple(int(label != -100) for label in tokenized[f"{side}_labels"])
            expected = (tuple(tokenized[f"{side}_input_ids"]), mask)
            assert trained_sequence(tokenizer, row["prompt"], row[side], args) == expected, (row, side)


def test_rows_whose_prompt_fills_max_length_are_dropped_and_counted(tmp_path):
    """A few rows whose prompt alone fills max_length keep no answer token: ORPO and SimPO averaged the log-prob of
    zero tokens (NaN) and stopped as "diverged ... lower learning_rate"; DPO and KTO dropped them inside TRL while
    data.json and eval.json counted them as trained. They are dropped and counted (most such rows: exit 2)."""
    from trl import KTOConfig

    from hfgen.models import load_tokenizer
    from hfgen.preference import PreferenceDataArguments, load_preference_splits

    pairs = preference_pairs(20, seed=3)
    for pair in pairs[::5]:  # 4 of 20 prompts far past max_length 48
        pair["prompt"][0]["content"] = " ".join(["describe the cat"] * 40)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in pairs))
    model = save_tiny_llama(tmp_path / "lm")
    few = {"dataset_name": str(data), "validation_split_percentage": 20, "max_length": 48, "max_steps": 2,
           "max_train_samples": None, "max_eval_samples": None, "eval_samples_per_prompt": 0,
           "eval_prompts_dataset": None, "oracle_function": None}  # fmt: skip
    train(write_recipe(tmp_path, "orpo", model, **few))  # (stopped as diverged: exit 3)
    records = tracking.read_json(tmp_path / "run/data.json")
    reason = "prompt fills max_length=48"
    assert sum(records[split]["dropped"].get(reason, 0) for split in ("train", "eval")) == 4
    assert tracking.read_json(tmp_path / "run/eval.json")["train_rows"] == records["train"]["rows_kept"]

    # KTO's unpaired rows too
    unpaired = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
                for p in pairs for side in ("chosen", "rejected")]  # fmt: skip
    data.write_text("".join(json.dumps(row) + "\n" for row in unpaired))
    config = KTOConfig(output_dir=str(tmp_path / "kto"), max_length=48, use_cpu=True, bf16=False)
    args = PreferenceDataArguments(dataset_name=str(data), validation_split_percentage=20)
    train_rows, eval_rows, records = load_preference_splits(args, 0, True, load_tokenizer(str(model)), config)
    assert len(train_rows) + len(eval_rows) == 32
    assert sum(records[split]["dropped"].get(reason, 0) for split in ("train", "eval")) == 8


def test_orpos_nll_term_covers_the_prompt_as_the_docs_say(tmp_path):
    """README and orpo.py say ORPO's NLL term is taken over prompt and answer tokens alike (they said "SFT on the
    chosen answers"; TRL has no key to mask the prompt): pinned here, so a TRL that changes it is noticed."""
    import datasets
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from hfgen.models import load_tokenizer
    from hfgen.preference import answers_cut_at_eos

    Config, Trainer = experimental_trainer("orpo")
    model_dir = save_tiny_llama(tmp_path / "lm")
    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = datasets.Dataset.from_list(preference_pairs(2, seed=3))
    args = Config(output_dir=str(tmp_path / "out"), max_length=64, use_cpu=True, bf16=False, report_to="none")
    trainer = Trainer(
        model=model, args=args, train_dataset=answers_cut_at_eos(tokenizer, rows), processing_class=tokenizer
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        nll = trainer.concatenated_forward(model, batch)[4]
        logits = model(input_ids=batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]).logits

    def cross_entropy(targets):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(), ignore_index=-100)

    every_token = batch["chosen_input_ids"].masked_fill(batch["chosen_attention_mask"] == 0, -100)
    assert torch.allclose(nll, cross_entropy(every_token), atol=1e-5)
    assert not torch.allclose(nll, cross_entropy(batch["chosen_labels"]), atol=1e-3)  # (the answers alone)


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_prompts_rendered_with_a_template_that_writes_the_bos_reach_the_trainer_with_one(tmp_path, stage):
    # a prompt rendered with a Llama 3 template starts with <|begin_of_text|>, which the tokenizer adds again when
    # TRL's DPO, KTO, ORPO and SimPO trainers tokenize the plain prompt: they trained '<BOS><BOS>...' (probe 41 A1)
    from hfgen.preference import PreferenceDataArguments, load_preference_splits
    from tiny_models import bos_adding_tokenizer, rendered_with_bos

    tokenizer = bos_adding_tokenizer()
    rows = []
    for i in range(12):
        prompt = rendered_with_bos(tokenizer, [{"role": "user", "content": f"describe cat {i}."}], True)
        answers = {"chosen": f"the cat {i} is red.<|end|>", "rejected": f"no {i}.<|end|>"}
        rows += [{"prompt": prompt, **answers}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    train_rows, eval_rows, records = load_preference_splits(
        PreferenceDataArguments(dataset_name=str(data)), 0, unpaired_ok=stage == "kto", tokenizer=tokenizer
    )
    for prompt in [*train_rows["prompt"], *eval_rows["prompt"]]:  # as TRL tokenizes a plain prompt
        ids = tokenizer(prompt)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert any("rows of the prompt column (row 0 first) already start with the tokenizer's BOS" in note
               for note in records["notes"])  # fmt: skip


def test_hfgen_check_of_a_preference_recipe_reports_its_data(tmp_path, tiny_lm):
    # its data report imported a helper 1eac24b had renamed: every dpo/kto/orpo/simpo check ended in an ImportError
    # (review 43 #1)
    from conftest import run_hfgen_here

    result = run_hfgen_here("check", write_recipe(tmp_path, "dpo", tiny_lm))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "data: train" in result.stdout


@pytest.mark.parametrize("stage", ["dpo", "orpo"])
def test_the_check_judges_prompts_at_the_learned_positions_training_lowers_max_length_to(tmp_path, stage):
    # on GPT-2 (256 learned positions) the check judged the pairs at max_length 1024 (TRL's default) while the run
    # lowers it to 256 once the model loads: the check passed, then the run dropped or refused the rows after the
    # models had loaded, saying to raise max_length, which changes nothing (probe 42 E6, the preference stages)
    from conftest import run_hfgen_here
    from tiny_models import save_tiny_causal_lm

    gpt2 = save_tiny_causal_lm(tmp_path / "gpt2", "gpt2")
    pairs = preference_pairs(12, seed=3)
    for pair in pairs[:8]:  # ~290 tokens: within 1024, past 256
        pair["prompt"][0]["content"] = " ".join(["describe the red cat by the river"] * 40)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in pairs))
    recipe = write_recipe(tmp_path, stage, gpt2, dataset_name=str(data), max_length=1024, eval_samples_per_prompt=0,
                          eval_prompts_dataset=None)  # fmt: skip
    result = run_hfgen_here("check", recipe)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "have a prompt of max_length=256 tokens or more" in result.stderr
    assert "max_length is the 256 positions gpt2 models learn" in result.stderr
    assert "raise max_length" not in result.stderr


def test_held_out_prompts_past_learned_positions_exit_2_before_training_and_others_have_no_hidden_limit(tmp_path):
    # the held-out comparison took a hidden 256-token prompt limit (Sampling's default, no recipe key): longer
    # prompts were dropped uncounted; on GPT-2 (256 learned positions) the prompts it kept + eval_response_length
    # ran past them and the run ended after the training in a raw IndexError (probe 42 E9)
    from types import SimpleNamespace

    from transformers import AutoConfig

    from conftest import run_hfgen_here
    from tiny_models import ARCHITECTURES, save_tiny_causal_lm

    gpt2 = save_tiny_causal_lm(tmp_path / "gpt2", "gpt2")
    prompts = tmp_path / "long_prompts.jsonl"
    long_prompt = " ".join(["the red cat sat by the blue river"] * 40)  # ~240 tokens of 256
    prompts.write_text("".join(json.dumps({"prompt": f"{i} {long_prompt}"}) + "\n" for i in range(4)))
    recipe = write_recipe(tmp_path, "dpo", gpt2, eval_prompts_dataset=str(prompts), eval_response_length=24,
                          max_length=64)  # fmt: skip
    for command in ("check", "train"):
        result = run_hfgen_here(command, recipe)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "4 of 4 held-out prompts are longer than 232 tokens, the room eval_response_length=24" in result.stderr
        assert not (tmp_path / "run" / "model.safetensors").exists()

    from hfgen.preference import held_out_prompt_room

    settings = SimpleNamespace(eval_response_length=24)
    assert held_out_prompt_room(AutoConfig.for_model(**ARCHITECTURES["llama"]), settings) is None  # every prompt
    assert held_out_prompt_room(AutoConfig.for_model(**ARCHITECTURES["gpt2"]), settings) == 232


@pytest.mark.parametrize("stage", ["orpo", "simpo"])
def test_orpo_and_simpo_train_a_mixture_of_experts_load_balancing_loss_as_dpo_does(tmp_path, monkeypatch, stage):
    """TRL's ORPO and CPO trainers add router_aux_loss_coef x the router's load-balancing loss only when the config
    says output_router_logits: true, which MoE configs leave false: ORPO and SimPO trained a Mixtral's routers
    without it where DPO, KTO and SFT train it (probe 45 A4). The saved config keeps the model's own setting."""
    from tiny_models import save_tiny_causal_lm

    _, trainer_class = experimental_trainer(stage)
    seen = {}
    original = trainer_class.train

    def spy(self, *args, **kwargs):
        seen["aux_loss"] = self.aux_loss_enabled, self.aux_loss_coef
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "train", spy)
    model = save_tiny_causal_lm(tmp_path / "mixtral", "mixtral")
    train(write_recipe(tmp_path, stage, model, max_steps=1, max_train_samples=16, max_eval_samples=8))
    assert seen["aux_loss"] == (True, 0.001)  # Mixtral's default coefficient
    assert json.loads((tmp_path / "run/config.json").read_text())["output_router_logits"] is False
