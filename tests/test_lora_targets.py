"""`lora_target_modules` on architectures other than Llama (hfgen.finetune.lora_config, which every text stage's
LoRA goes through): a one-module list adapts that module, names none of which are the model's exit 2 listing the
model's linear layers (some of them: a warning), and a model peft has no default for asks for the key instead of
failing inside peft."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from trl import ModelConfig

from hfgen.errors import UserError
from hfgen.finetune import lora_config
from tiny_models import ARCHITECTURES


def tiny(architecture: str):
    config = AutoConfig.for_model(**ARCHITECTURES[architecture], vocab_size=64, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def adapted_modules(model, targets) -> set[str]:
    """The module names (last part) that get LoRA layers under `lora_target_modules: targets`."""
    from peft import get_peft_model

    args = ModelConfig(model_name_or_path="tiny", use_peft=True, lora_r=2, lora_target_modules=targets)
    wrapped = get_peft_model(model, lora_config(args, model))
    return {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in wrapped.named_parameters() if ".lora_A" in name}


@pytest.mark.parametrize(
    "architecture, targets, adapted",
    [
        ("gpt2", ["c_attn"], {"c_attn"}),  # TRL makes a one-item list a string, which peft reads as a regex
        ("llama", ["q_proj"], {"q_proj"}),
        ("gpt2", ["c_attn", "c_fc"], {"c_attn", "c_fc"}),
        ("gpt2", ["all-linear"], {"c_attn", "c_fc", "c_proj"}),
        ("gpt2", [r".*\.mlp\.c_fc"], {"c_fc"}),  # a real expression stays one
        ("llama", None, {"q_proj", "v_proj"}),  # peft's default for the model type
    ],
)
def test_target_modules_adapt_the_named_layers(architecture, targets, adapted):
    assert adapted_modules(tiny(architecture), targets) == adapted


@pytest.mark.parametrize(
    "architecture, targets, expected",
    [
        ("gpt2", ["q_proj", "v_proj"], ["no module named q_proj, v_proj", "c_attn, c_fc, c_proj", "[all-linear]"]),
        ("gpt2", [".*q_proj"], ["'.*q_proj'", "matches no module", "c_attn"]),
        ("phi3", None, ["lora_target_modules is not set", "(phi3)", "qkv_proj"]),  # peft knows no default for phi3
        # matched, but not layers peft adapts: TRL's trainer refused them once the data had loaded
        (
            "llama",
            ["q_proj", "input_layernorm"],
            ["not model 'tiny' (llama)'s input_layernorm (LlamaRMSNorm)", "q_proj"],
        ),
        ("gpt2", [r".*\.ln_1"], ["ln_1 (LayerNorm)", "c_attn"]),
        ("gpt2", [".*(c_attn"], ["'.*(c_attn' is read as a regular expression", "not one (missing )", "c_attn, c_fc"]),
    ],
)
def test_target_modules_the_model_lacks_are_a_user_error(architecture, targets, expected):
    args = ModelConfig(model_name_or_path="tiny", use_peft=True, lora_target_modules=targets)
    with pytest.raises(UserError) as error:
        lora_config(args, tiny(architecture))
    assert all(part in str(error.value) for part in expected), str(error.value)


def test_names_of_other_architectures_beside_the_models_own_are_named_in_a_warning(capsys):
    # one list may serve several families (peft skips what a model lacks), but a typo would adapt fewer layers
    assert adapted_modules(tiny("gpt2"), ["c_attn", "q_proj"]) == {"c_attn"}
    assert "warning: lora_target_modules: model 'tiny' (gpt2) has no module named q_proj" in capsys.readouterr().out


def test_no_lora_without_use_peft():
    assert lora_config(ModelConfig(model_name_or_path="tiny", lora_target_modules=["nothing"]), tiny("gpt2")) is None


@pytest.mark.parametrize("recipe", ["sft_lora", "dpo", "kto", "grpo_arithmetic"])
def test_lm_head_among_the_targets_of_a_trl_trainer_that_refuses_it_exits_2_at_the_check(tmp_path, recipe):
    # SFT/DPO/KTO/GRPO/RLOO's TRL trainers refuse an adapter on lm_head only once the model and data loaded (their
    # ValueError, exit 2 late); hfgen check passed it (probe 41 E3). PPO (hfgen's own loop) trains it.
    from conftest import REPO, run_hfgen_here
    from tiny_models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "model")
    result = run_hfgen_here(
        "check", REPO / f"recipes/tiny/{recipe}.yaml", "--model_name_or_path", model, "--output_dir", tmp_path / "o",
        "--use_peft", "true", "--lora_target_modules", "q_proj", "lm_head",
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "does not train a LoRA adapter on lm_head" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize(
    "recipe, saved, refused",
    [("sft_lora", "embed_tokens", True), ("dpo", "lm_head", True), ("ppo", "embed_tokens", False)],
)
def test_a_tied_embedding_in_modules_to_save_under_fsdp2_exits_2_at_the_check(tmp_path, monkeypatch, recipe, saved,
                                                                               refused):  # fmt: skip
    # peft's trainable copy hid the tie from accelerate's FSDP2 prepare of a Trainer's model: the shared weight in
    # two FSDP groups, torch's ValueError at the first step (probe 44 A4). PPO's own loop trains it (not refused).
    from conftest import REPO, run_hfgen_here
    from tiny_models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "model")  # tied input and output embeddings
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as `accelerate launch --config_file fsdp.yaml` sets it
    monkeypatch.setenv("FSDP_VERSION", "2")
    result = run_hfgen_here(
        "check", REPO / f"recipes/tiny/{recipe}.yaml", "--model_name_or_path", model, "--output_dir", tmp_path / "o",
        "--use_peft", "true", "--lora_target_modules", "q_proj", "v_proj", "--lora_modules_to_save", saved,
    )  # fmt: skip
    if not refused:
        assert result.returncode == 0, result.stderr[-2000:]
        return
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for words in (f"lora_modules_to_save: {saved} under FSDP2", "model.embed_tokens and lm_head", "ZeRO-2/3"):
        assert words in result.stderr, result.stderr[-2000:]
    monkeypatch.setenv("FSDP_VERSION", "1")  # not FSDP2: not this refusal
    result = run_hfgen_here(
        "check", REPO / f"recipes/tiny/{recipe}.yaml", "--model_name_or_path", model, "--output_dir", tmp_path / "o",
        "--use_peft", "true", "--lora_target_modules", "q_proj", "v_proj", "--lora_modules_to_save", saved,
    )  # fmt: skip
    assert "under FSDP2" not in result.stderr, result.stderr[-2000:]


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    from tiny_models import save_tiny_causal_lm

    return save_tiny_causal_lm(tmp_path_factory.mktemp("mixtral"), "mixtral")


@pytest.mark.parametrize("recipe", ["sft_lora", "reward", "ppo", "dpo", "grpo_arithmetic"])
def test_all_linear_on_a_mixture_of_experts_model_with_lora_dropout_exits_2_at_the_check(tiny_mixtral, tmp_path,
                                                                                       recipe):  # fmt: skip
    # peft's all-linear on a transformers-5 MoE adapts the fused expert weights too (target_parameters), which take no
    # dropout: PPO crashed with peft's raw ValueError, the others said only "lora.ParamWrapper does not work with
    # lora_dropout != 0" (probe 45 A3). TRL's default lora_dropout is 0.05.
    from conftest import REPO, run_hfgen_here

    result = run_hfgen_here(
        "check", REPO / f"recipes/tiny/{recipe}.yaml", "--model_name_or_path", tiny_mixtral, "--output_dir",
        tmp_path / "o", "--use_peft", "true", "--lora_target_modules", "all-linear", "--lora_dropout", "0.05",
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for words in ("lora_target_modules: all-linear", "(mixtral), a Mixture-of-Experts model", "gate_up_proj",
                  "lora_dropout is 0.05: set lora_dropout: 0"):  # fmt: skip
        assert words in result.stderr, result.stderr[-2000:]


def test_all_linear_on_a_mixture_of_experts_model_with_lora_dropout_0_adapts_its_experts():
    from peft import get_peft_model

    args = ModelConfig(model_name_or_path="tiny", use_peft=True, lora_r=2, lora_target_modules="all-linear",
                       lora_dropout=0.0)  # fmt: skip
    wrapped = get_peft_model(tiny("mixtral"), lora_config(args, tiny("mixtral")))
    adapted = {name for name, _ in wrapped.named_parameters() if ".lora_" in name}
    assert any("experts" in name for name in adapted) and any("q_proj" in name for name in adapted)
