"""The text stages on an architecture other than Llama: GPT-2 (fused Conv1D projections named `c_attn`, learned
position embeddings, a `transformer.` backbone), the short CI case of scripts/architecture_matrix.py, which runs
every text stage on ten architectures. LoRA through one module name, as GPT-2 users write it: `[c_attn]`."""

import pytest
from safetensors.torch import load_file

from conftest import REPO, run_hfgen, run_hfgen_here
from stages.test_ppo import ORACLE, write_recipe
from tiny_models import save_tiny_causal_lm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("gpt2"), "gpt2", pretrain_steps=100)


def adapted(run_dir) -> set[str]:
    return {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in load_file(run_dir / "adapter_model.safetensors")}


def test_sft_lora_on_one_named_gpt2_module(tiny_gpt2, tmp_path):
    result = run_hfgen(
        "train", REPO / "recipes/tiny/sft_lora.yaml", "--model_name_or_path", tiny_gpt2, "--output_dir", tmp_path,
        "--lora_target_modules", "[c_attn]", "--max_steps", "2", "--max_train_samples", "64", "--max_eval_samples", "8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert adapted(tmp_path) == {"c_attn"}


def test_ppo_with_lora_policy_and_critic_on_gpt2(tiny_gpt2, tmp_path):
    recipe = write_recipe(tmp_path, tiny_gpt2, total_episodes=16, gradient_accumulation_steps=1, use_peft=True,
                          lora_r=4, lora_target_modules=["c_attn"], reward_functions=[ORACLE])  # fmt: skip
    result = run_hfgen("train", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert (run_dir / "COMPLETE").is_file() and adapted(run_dir) == {"c_attn"}


def test_a_llama_module_list_on_gpt2_exits_2_naming_its_layers(tiny_gpt2, tmp_path):
    recipe = write_recipe(tmp_path, tiny_gpt2, use_peft=True, lora_target_modules=["q_proj", "v_proj"],
                          reward_functions=[ORACLE])  # fmt: skip
    result = run_hfgen_here("train", recipe)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "lora_target_modules" in result.stderr and "c_attn, c_fc, c_proj" in result.stderr


@pytest.mark.parametrize(
    "recipe, overrides, expected",
    [
        ("pretrain.yaml", ["--block_size", "512"], "block_size 512 is more than the 256 positions"),
        ("ppo.yaml", ["--response_length", "300", "--reward_functions", f"[{ORACLE}]", "--reward_model_path", "null"],
         "response_length 300 leaves no room for a prompt in the 256 positions"),
        ("grpo_arithmetic.yaml", ["--max_completion_length", "256", "--freeze_modules", "[]"],
         "max_completion_length 256 leaves no room"),
    ],
)  # fmt: skip
def test_lengths_past_gpt2s_learned_positions_exit_2_before_training(tiny_gpt2, tmp_path, recipe, overrides, expected):
    model = (
        ["--config_name", tiny_gpt2 / "config.json"]
        if recipe == "pretrain.yaml"
        else ["--model_name_or_path", tiny_gpt2]
    )
    result = run_hfgen_here("train", REPO / "recipes/tiny" / recipe, *model, "--output_dir", tmp_path, *overrides)
    assert result.returncode == 2 and "Traceback" not in result.stderr and expected in result.stderr, result.stderr[
        -2000:
    ]


def test_packing_on_a_model_that_would_mix_packed_documents_exits_2(tmp_path):
    opt = save_tiny_causal_lm(tmp_path / "opt", "opt")
    result = run_hfgen_here("train", REPO / "recipes/tiny/sft_full.yaml", "--model_name_or_path", opt, "--packing", "true",
                       "--max_steps", "1", "--max_train_samples", "64", "--output_dir", tmp_path / "run")  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "packing: true, but opt models do not keep the documents of a packed row apart" in result.stderr
