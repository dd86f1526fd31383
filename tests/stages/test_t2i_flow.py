"""Stage `t2i_flow`: a from-scratch SD3-layout pipeline (no T5) trains with rectified flow and saves as a
StableDiffusion3Pipeline that loads and generates; LoRA on its transformer loads with load_lora_weights and changes
samples; resume continues exactly; two processes end identical; the timestep samplings draw what they name; LoRA
on a tiny Flux pipeline (guidance-distilled) takes the guidance input and loads with FluxPipeline.load_lora_weights."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, accelerate_launch, run_hfgen, run_hfgen_here
from diffusion_fixtures import (
    LORA_RECIPE,
    ONE_BF16_STEP,
    SMALL_DATA,
    assert_saved_as_loaded,
    validation_grid_difference,
    with_reference_lora,
)
from hfgen import tracking

VAE16_RECIPE = REPO / "recipes/tiny/vae_digits16.yaml"
FLOW_RECIPE = REPO / "recipes/tiny/t2i_flow_digits.yaml"
FLOW_LORA_RECIPE = REPO / "recipes/tiny/t2i_flow_digits_lora.yaml"
TINY = {
    "vae_digits16.json": {"block_out_channels": [8, 16], "norm_num_groups": 4},
    "mmdit_digits.json": {"num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2,
                          "joint_attention_dim": 32, "caption_projection_dim": 16, "pooled_projection_dim": 16},
    "clip_text_digits.json": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "projection_dim": 8},
}  # fmt: skip


def write_flow_configs(directory):
    """The tiny versions of the flow recipe's component configs, in `directory` (returned)."""
    for name, changes in TINY.items():
        (directory / name).write_text(json.dumps({**json.loads((REPO / "recipes/tiny" / name).read_text()), **changes}))
    return directory


def train_vae16(configs, output_dir):
    """A 3-step tiny 16-channel VAE run (the flow stage's `vae` input) in `output_dir` (returned)."""
    result = run_hfgen("train", VAE16_RECIPE, "--vae_config", configs / "vae_digits16.json", "--output_dir", output_dir,
                       "--max_train_steps", "3", "--checkpointing_steps", "0", *SMALL_DATA)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    return write_flow_configs(tmp_path_factory.mktemp("flow_configs"))


@pytest.fixture(scope="module")
def vae16_dir(configs, tmp_path_factory):
    return train_vae16(configs, tmp_path_factory.mktemp("vae16"))


def flow_overrides(configs, vae_dir, output_dir, steps=4) -> list[str]:
    return ["--vae_name_or_path", vae_dir, "--transformer_config", configs / "mmdit_digits.json",
            "--text_encoder_config", configs / "clip_text_digits.json", "--output_dir", output_dir,
            "--max_train_steps", str(steps), "--logging_steps", "1", "--text_encoder_pretraining_steps", "5",
            "--num_inference_steps", "2", *SMALL_DATA]  # fmt: skip


@pytest.fixture(scope="module")
def flow_run(configs, vae16_dir, tmp_path_factory):
    """From scratch with EMA: 4 steps, a checkpoint and a validation grid every 2 steps, a small evaluation."""
    # (the resume test below resumes this run from checkpoint-2 with the same arguments)
    output_dir = tmp_path_factory.mktemp("flow")
    result = run_hfgen("train", FLOW_RECIPE, *flow_overrides(configs, vae16_dir, output_dir), "--use_ema", "true",
                       "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--validation_steps", "2",
                       "--validation_prompts", "a handwritten digit 1", "a handwritten digit 2",
                       "--num_validation_images", "2", "--eval_images_per_prompt", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def test_saved_pipeline_is_sd3_without_t5_and_generates(flow_run):
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    # diffusers loads an SD3 dir saved without T5 when told so (as its docs show for dropping T5)
    pipeline = DiffusionPipeline.from_pretrained(flow_run, text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipeline, StableDiffusion3Pipeline) and pipeline.text_encoder_3 is None
    assert isinstance(pipeline.text_encoder_2, CLIPTextModelWithProjection)
    assert pipeline.vae.config.latent_channels == 16 and pipeline.vae.config.shift_factor is not None
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a handwritten digit 4", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert image[0].size == (16, 16)
    from hfgen.diffusion.rendering import recorded_call_arguments

    # the tiny recipe trains without zero T5 tokens, at resolution 16; hfgen generate / eval sample the same way,
    # from recipe.yaml
    assert recorded_call_arguments(flow_run) == {"max_sequence_length": 0, "height": 16, "width": 16}


def test_run_records_metrics_checkpoints_grids_and_eval(flow_run):
    assert tracking.is_complete(flow_run)
    assert [row["step"] for row in tracking.read_metrics(flow_run)] == [1, 2, 3, 4]
    assert [p.name for p in tracking.checkpoints(flow_run)] == ["checkpoint-2", "checkpoint-4"]
    for step in (2, 4):
        assert Image.open(flow_run / "validation" / f"step-00000{step}.png").size == (2 * 64, 2 * 64)
    results = tracking.read_json(flow_run / "eval.json")
    assert results["eval/sampler"] == "FlowMatchEulerDiscreteScheduler" and results["eval/num_prompts"] == 10
    assert 0 <= results["quality/prompt_adherence"] <= 1 and results["quality/frechet_distance"] > 0
    assert results["text_encoder_2/clip_loss"] < results["text_encoder_2/clip_loss_initial"]


def test_lora_loads_with_load_lora_weights_changes_samples_and_resumes_exactly(flow_run, tmp_path):
    from diffusers import DiffusionPipeline

    from hfgen.stages.t2i_flow import TRANSFORMER_LORA_MODULES

    # lora_alpha != lora_rank: the saved file must carry the scale alpha / rank (load_lora_weights' default is 1)
    common = ["--pretrained_model_name_or_path", flow_run, "--max_train_steps", "4", "--checkpointing_steps", "2",
              "--lora_rank", "4", "--lora_alpha", "16",
              "--checkpoints_total_limit", "2", "--learning_rate", "1e-2", "--eval_images_per_prompt", "0",
              "--num_validation_images", "1", "--num_inference_steps", "2", *SMALL_DATA]  # fmt: skip
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    result = run_hfgen("train", FLOW_LORA_RECIPE, *common, "--output_dir", full)
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = load_file(full / "pytorch_lora_weights.safetensors")
    assert adapter and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in adapter)
    for module in ("attn.to_q", "attn.add_k_proj", "ff.net.0.proj", "ff.net.2"):  # attention and MLP
        assert any(module in k for k in adapter), module
    midway = load_file(full / "checkpoint-2/model.safetensors")
    lora_keys = [key for key in midway if "lora_" in key]  # checkpoints keep what trains (and buffers): no base
    assert len(lora_keys) == len(adapter) and set(midway) - set(lora_keys) <= {"pos_embed.pos_embed"}

    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    result = run_hfgen("train", FLOW_LORA_RECIPE, *common, "--output_dir", resumed, "--resume_from_checkpoint", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    again = load_file(resumed / "pytorch_lora_weights.safetensors")
    for name in adapter:
        torch.testing.assert_close(adapter[name], again[name], rtol=1e-5, atol=1e-6)

    pipeline = DiffusionPipeline.from_pretrained(flow_run, text_encoder_3=None, tokenizer_3=None)
    pipeline.set_progress_bar_config(disable=True)

    def render():
        generator = torch.Generator().manual_seed(0)
        return torch.from_numpy(
            pipeline("a handwritten digit 3", num_inference_steps=2, generator=generator, output_type="np").images
        )

    before = render()
    pipeline.load_lora_weights(full)
    with_lora = render()
    assert not torch.allclose(with_lora, before)
    pipeline = DiffusionPipeline.from_pretrained(flow_run, text_encoder_3=None, tokenizer_3=None)
    pipeline.set_progress_bar_config(disable=True)
    with_reference_lora(pipeline.transformer, full, "transformer", 4, 16, TRANSFORMER_LORA_MODULES)
    torch.testing.assert_close(render(), with_lora, atol=1e-5, rtol=1e-5)

    # `hfgen merge` fuses the adapters into a plain SD3 pipeline dir (still without its T5) rendering the same
    merged = run_hfgen("merge", full, "--output_dir", tmp_path / "merged")
    assert merged.returncode == 0, merged.stderr[-3000:]
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "merged", text_encoder_3=None, tokenizer_3=None)
    pipeline.set_progress_bar_config(disable=True)
    assert not any("lora" in name for name in pipeline.transformer.state_dict())
    torch.testing.assert_close(render(), with_lora, atol=1e-4, rtol=1e-4)


def test_a_lora_run_with_override_shift_renders_its_validation_grid_in_generate_eval_and_merge(flow_run, tmp_path):
    """A LoRA run that sets its base's shift records it in lora_base.json; hfgen's loader (generate, eval, merge)
    applies it, so the run's validation grid renders again exactly."""
    from diffusers import DiffusionPipeline

    from hfgen.diffusion.rendering import recorded_call_arguments
    from hfgen.evaluation.images import recipe_of

    run = tmp_path / "run"
    result = run_hfgen("train", FLOW_LORA_RECIPE, "--pretrained_model_name_or_path", flow_run, "--output_dir", run,
                       "--override_shift", "true", "--shift", "1.0", "--max_train_steps", "2",
                       "--checkpointing_steps", "0", "--eval_images_per_prompt", "0", "--num_validation_images", "1",
                       "--num_inference_steps", "3", *SMALL_DATA)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    changes = json.loads((run / "lora_base.json").read_text())["pipeline_changes"]
    assert changes == {"scheduler": {"shift": 1.0, "use_dynamic_shifting": False}}
    # `shift` without override_shift would be ignored on a pretrained pipeline: refused
    refused = run_hfgen_here("check", FLOW_LORA_RECIPE, "--pretrained_model_name_or_path", flow_run, "--shift", "2.0")
    assert refused.returncode == 2 and "shift 2.0 is not applied" in refused.stderr, refused.stderr
    assert validation_grid_difference(run) == 0
    merged = tmp_path / "merged"
    assert run_hfgen("merge", run, "--output_dir", merged).returncode == 0
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None}
    assert DiffusionPipeline.from_pretrained(merged, **no_t5).scheduler.config.shift == 1.0
    # the merged dir samples as the run did (its max_sequence_length 0 and resolution come along), and `hfgen eval`
    # finds the run's digits evaluation there
    assert recorded_call_arguments(merged) == recorded_call_arguments(run) == {"max_sequence_length": 0, "height": 16,
                                                                             "width": 16}  # fmt: skip
    assert validation_grid_difference(run, merged) <= 1  # fused weights: float rounding at most
    assert recipe_of(merged)["dataset_name"] == "embedded:digits"


def test_a_lora_run_on_a_base_whose_vae_has_no_shift_factor_records_the_factors_it_set(flow_run, tmp_path):
    """A base assembled with a VAE of hfgen's `vae` stage has no shift_factor: the run sets the latent factors in
    memory, so its LoRA output must say them (the final evaluation, generate and merge reload the base), where the
    final evaluation ended in SD3's raw TypeError and a half-written output (probe 41 E6)."""
    base = tmp_path / "base"
    shutil.copytree(flow_run, base, ignore=shutil.ignore_patterns("checkpoint-*", "validation", "ema"))
    vae_config = json.loads((base / "vae/config.json").read_text())
    (base / "vae/config.json").write_text(json.dumps({**vae_config, "shift_factor": None, "scaling_factor": 1.0}))
    refused = run_hfgen_here("generate", base, "--prompt", "a handwritten digit 3", "--output_dir", tmp_path / "g")
    assert refused.returncode == 2 and "no shift_factor" in refused.stderr, refused.stderr[-2000:]

    run = tmp_path / "run"
    result = run_hfgen("train", FLOW_LORA_RECIPE, "--pretrained_model_name_or_path", base, "--output_dir", run,
                       "--max_train_steps", "2", "--checkpointing_steps", "0", "--eval_images_per_prompt", "1",
                       "--num_validation_images", "1", "--num_inference_steps", "2", *SMALL_DATA)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "COMPLETE").is_file()
    factors = json.loads((run / "lora_base.json").read_text())["pipeline_changes"]["vae"]
    assert set(factors) == {"scaling_factor", "shift_factor"} and factors["shift_factor"] is not None
    assert validation_grid_difference(run) == 0  # hfgen's loader renders the run's grid again


def test_a_transformer_config_of_another_class_or_channels_exits_2_at_the_check(configs, tmp_path):
    """A UNet config as transformer_config, or a transformer whose channels differ from the VAE's latents: refused
    by `hfgen check` (they crashed after the text encoders' pretraining). The VAEs are configs alone: enough there."""
    for channels in (4, 16):
        (tmp_path / f"vae{channels}").mkdir()
        (tmp_path / f"vae{channels}/config.json").write_text(json.dumps(
            {"_class_name": "AutoencoderKL", "latent_channels": channels, "block_out_channels": [8, 16]}
        ))  # fmt: skip
    cases = [
        (["--vae_name_or_path", tmp_path / "vae4"], ["in_channels 16, out_channels 16", "latent_channels is 4"]),
        (["--transformer_config", REPO / "recipes/tiny/unet_digits.json"], ["transformer_config", "UNet2DConditionModel"]),
        # (and a density's parameters given with a weighting_scheme that does not read them)
        (["--weighting_scheme", "uniform", "--logit_mean", "1.0"], ["logit_mean", "weighting_scheme uniform"]),
    ]  # fmt: skip
    for change, expected in cases:
        result = run_hfgen_here(
            "check", FLOW_RECIPE, *flow_overrides(configs, tmp_path / "vae16", tmp_path / "out"), *change
        )
        assert result.returncode == 2 and all(part in result.stderr for part in expected), (change, result.stderr)


def test_a_pipeline_of_another_family_or_flux_with_drop_t5_exits_2_at_the_check(tmp_path):
    """A pipeline class the stage does not train (model_index.json's _class_name) is refused by `hfgen check`,
    naming the stage that trains it: t2i refused SD3 and Flux only at load ("no file named config.json"), t2i_flow
    SDXL after loading everything; drop_t5 on Flux exited 2 only after loading. model_index.json alone is enough."""
    classes = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
               "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}  # fmt: skip
    for name, class_name in classes.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    output = ["--output_dir", tmp_path / "out"]
    cases = [
        (LORA_RECIPE, "sd3", [], ["StableDiffusion3Pipeline", "the t2i stage", "`stage: t2i_flow`"]),
        (LORA_RECIPE, "flux", [], ["FluxPipeline", "`stage: t2i_flow`"]),
        (LORA_RECIPE, "sdxl", [], ["StableDiffusionXLPipeline", "SDXL is not supported"]),
        (FLOW_LORA_RECIPE, "sdxl", [], ["StableDiffusionXLPipeline", "the t2i_flow stage", "SDXL is not supported"]),
        (FLOW_LORA_RECIPE, "sd", [], ["StableDiffusionPipeline", "`stage: t2i`"]),
        (FLOW_LORA_RECIPE, "flux", ["--drop_t5", "true"], ["drop_t5", "FluxPipeline"]),
    ]
    for recipe, name, change, expected in cases:
        result = run_hfgen_here("check", recipe, "--pretrained_model_name_or_path", tmp_path / name, *output, *change)
        assert result.returncode == 2 and all(part in result.stderr for part in expected), (name, result.stderr)
    for recipe, name, change in ((LORA_RECIPE, "sd", []), (FLOW_LORA_RECIPE, "sd3", ["--drop_t5", "true"])):
        result = run_hfgen_here("check", recipe, "--pretrained_model_name_or_path", tmp_path / name, *output, *change)
        assert result.returncode == 0, (name, result.stderr)


def test_a_dir_that_is_no_pipeline_exits_2_at_the_check_naming_what_it_is(tmp_path):
    """A text model, a text LoRA run or a vae run (no model_index.json) as pretrained_model_name_or_path passed the
    check; training then failed in diffusers' "no file named model.safetensors" (a file the dir holds: the message
    names the root for text_encoder/'s) or "no file named model_index.json" (probe 44 I3)."""
    dirs = {
        "lm": (
            {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
            "sft",
            "a LlamaForCausalLM (an sft run)",
        ),
        "vae": ({"_class_name": "AutoencoderKL"}, "vae", "a diffusers AutoencoderKL (a vae run): give it as vae_name"),
    }
    for name, (config, stage, _) in dirs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        (tmp_path / name / "recipe.yaml").write_text(f"stage: {stage}\n")
        (tmp_path / name / "COMPLETE").write_text(json.dumps({"run": "0", "stage": stage}))
    (tmp_path / "lora").mkdir()  # (a text LoRA run's adapter, outside an hfgen run)
    (tmp_path / "lora/adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM", "peft_type": "LORA"}))
    expected = {**{name: what for name, (_, _, what) in dirs.items()}, "lora": "a LoRA adapter of task CAUSAL_LM"}
    for recipe in (LORA_RECIPE, FLOW_LORA_RECIPE):
        for name, what in expected.items():
            result = run_hfgen_here("check", recipe, "--pretrained_model_name_or_path", tmp_path / name,
                                    "--output_dir", tmp_path / "out")  # fmt: skip
            assert result.returncode == 2, (recipe, name, result.stderr)
            assert (
                f"'{tmp_path / name}' is not a diffusers pipeline (no model_index.json): it is {what}" in result.stderr
            )
    # an image LoRA run (its adapter file and lora_base.json): told to merge it or start from its base, by t2i_flow
    # too, which called it a directory without a config.json (review 44 #3)
    (tmp_path / "image_lora").mkdir()
    (tmp_path / "image_lora/pytorch_lora_weights.safetensors").write_bytes(b"")
    (tmp_path / "image_lora/lora_base.json").write_text(json.dumps({"pretrained_model_name_or_path": "/base"}))
    for recipe in (LORA_RECIPE, FLOW_LORA_RECIPE):
        result = run_hfgen_here("check", recipe, "--pretrained_model_name_or_path", tmp_path / "image_lora",
                                "--output_dir", tmp_path / "out")  # fmt: skip
        assert result.returncode == 2 and "is a LoRA run (adapters for the pipeline '/base')" in result.stderr, (
            recipe, result.stderr,
        )  # fmt: skip


def test_full_resume_with_ema_matches_the_uninterrupted_run(configs, vae16_dir, flow_run, tmp_path):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(flow_run / "checkpoint-2", resumed / "checkpoint-2")  # all that survives of an interrupted run
    result = run_hfgen("train", FLOW_RECIPE, *flow_overrides(configs, vae16_dir, resumed), "--use_ema", "true",
                       "--checkpointing_steps", "2", "--validation_steps", "2", "--validation_prompts",
                       "a handwritten digit 1", "a handwritten digit 2", "--num_validation_images", "2",
                       "--eval_images_per_prompt", "0", "--resume_from_checkpoint", "true")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    weights = "transformer/diffusion_pytorch_model.safetensors"  # the EMA weights: the EMA state resumed too
    a, b = load_file(flow_run / weights), load_file(resumed / weights)
    midway = load_file(flow_run / "checkpoint-2/model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a[n], midway[n]) for n in a)
    assert [row["step"] for row in tracking.read_metrics(resumed)] == [3, 4]


@pytest.mark.parametrize("base", ["built", "pretrained"])
def test_mixed_precision_saves_the_frozen_vae_and_text_encoders_as_loaded(flow_run, configs, vae16_dir, tmp_path, base):
    """Under mixed_precision the frozen VAE and text encoders compute in bf16; cast back to float32 for the save, the
    pipeline held every weight rounded to bf16, in float32 where nothing shows it (probe 43 C2). Saved as loaded:
    read again from the base pipeline and vae_name_or_path, or (text encoders built from their config and
    pretrained here) kept as they were before the cast, which the float32 run flow_run saved with the same seed."""
    run = tmp_path / "run"
    if base == "built":
        result = run_hfgen_here("train", FLOW_RECIPE, *flow_overrides(configs, vae16_dir, run), *ONE_BF16_STEP)
        vae = vae16_dir / "diffusion_pytorch_model.safetensors"
    else:
        result = run_hfgen_here("train", FLOW_LORA_RECIPE, "--pretrained_model_name_or_path", flow_run, "--output_dir",
                                run, "--use_lora", "false", "--lora_alpha", "null", *ONE_BF16_STEP, *SMALL_DATA)  # fmt: skip
        vae = flow_run / "vae/diffusion_pytorch_model.safetensors"
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {"vae": vae, **{n: flow_run / n / "model.safetensors" for n in ("text_encoder", "text_encoder_2")}}
    assert_saved_as_loaded(run, expected)


@pytest.mark.slow
def test_two_processes_end_with_identical_transformer_weights(configs, vae16_dir, tmp_path, free_port):
    result = accelerate_launch(free_port, FLOW_RECIPE, *flow_overrides(configs, vae16_dir, tmp_path, steps=3),
                               "--eval_images_per_prompt", "0", "--checkpointing_steps", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    fingerprints = [(tmp_path / f"weights-rank{r}.sha256").read_text() for r in (0, 1)]
    assert fingerprints[0] == fingerprints[1]
    assert tracking.read_json(tmp_path / "env.json")["world_size"] == 2


@pytest.mark.slow
def test_lora_on_two_processes_ends_with_identical_adapters(flow_run, tmp_path, free_port):
    result = accelerate_launch(free_port, FLOW_LORA_RECIPE, "--pretrained_model_name_or_path", flow_run,
                               "--output_dir", tmp_path, "--max_train_steps", "3", "--checkpointing_steps", "0",
                               "--learning_rate", "1e-2", "--eval_images_per_prompt", "0", "--num_validation_images",
                               "1", "--num_inference_steps", "2", *SMALL_DATA)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    fingerprints = [(tmp_path / f"weights-rank{r}.sha256").read_text() for r in (0, 1)]
    assert fingerprints[0] == fingerprints[1]
    adapter = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in adapter.items())  # trained (B starts at zero)
    assert tracking.read_json(tmp_path / "env.json")["world_size"] == 2


@pytest.mark.parametrize("use_ema", ["false", "true"])
def test_a_transformer_broken_by_the_last_update_is_not_saved(configs, vae16_dir, tmp_path, use_ema):
    """The guard checks a step's loss and gradients before its update: the last one's (learning rate 1e12) left a
    transformer whose every output was NaN, saved with exit 0 and COMPLETE. Its prediction on the last batch (the
    EMA average's, the weights saved, with EMA), measured before the save, stops the run as diverged."""
    result = run_hfgen_here("train", FLOW_RECIPE, *flow_overrides(configs, vae16_dir, tmp_path, steps=1),
                            "--learning_rate", "1e12", "--lr_warmup_steps", "0", "--validation_steps", "0",
                            "--eval_images_per_prompt", "0", "--use_ema", use_ema)  # fmt: skip
    assert result.returncode == 3, result.stderr[-3000:]
    assert "training ended at step 1 with a model that no longer computes: its velocity prediction" in result.stderr
    assert not tracking.is_complete(tmp_path) and not (tmp_path / "transformer").exists()


def test_the_vae_scaling_factor_scales_the_latents_the_transformer_learns(configs, vae16_dir, tmp_path):
    """Training took the VAE's latents unscaled: the loop's gradient-accumulation factor (1.0) overwrote the VAE's
    scaling factor in the same variable, while sampling divides by it, so the model learnt latents of another size
    than those it generates. The first step's loss (before any update) now moves with the factor."""
    losses = []
    for factor in (1.0, 4.0):
        vae = shutil.copytree(vae16_dir, tmp_path / f"vae{factor}", ignore=shutil.ignore_patterns("checkpoint-*"))
        config = json.loads((vae / "config.json").read_text())
        (vae / "config.json").write_text(json.dumps({**config, "scaling_factor": factor, "shift_factor": 0.0}))
        output_dir = tmp_path / f"flow{factor}"
        result = run_hfgen_here("train", FLOW_RECIPE, *flow_overrides(configs, vae, output_dir, steps=1),
                                "--validation_steps", "0", "--eval_images_per_prompt", "0")  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        losses.append(tracking.read_metrics(output_dir)[0]["loss"])
    # the velocity target is noise - latents: latents 4x larger give a larger loss at the same initial weights
    assert losses[1] > 1.5 * losses[0], losses


def test_timestep_samplings_draw_what_they_name():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from hfgen.diffusion.flow import flow_loss, noisy_latents, sample_sigmas

    def sigmas(scheme, shift=1.0, **kwargs):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        settings = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, **kwargs}
        return sample_sigmas(scheduler, 20000, scheme, generator=torch.Generator().manual_seed(0), device="cpu",
                             **settings)[1]  # fmt: skip

    uniform, logit_normal = sigmas("uniform"), sigmas("logit_normal")
    assert abs(uniform.std().item() - (1 / 12) ** 0.5) < 0.01  # uniform on [0, 1]
    assert logit_normal.std() < 0.8 * uniform.std()  # mass in the middle of the schedule
    # as in diffusers' SD3 scripts, u indexes the schedule from the noisy end: a larger logit_mean trains less noisy
    assert sigmas("logit_normal", logit_mean=1.0).mean() < logit_normal.mean() - 0.1
    assert sigmas("mode", mode_scale=1.29).std() != pytest.approx(uniform.std().item(), abs=0.005)
    assert sigmas("uniform", shift=3.0).mean() > uniform.mean() + 0.1  # the shift moves training to more noise

    latents, noise = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    assert torch.equal(noisy_latents(latents, noise, torch.tensor([0.0, 1.0]))[:, 0, 0, 0], torch.tensor([0.0, 1.0]))
    velocity = noise - latents
    assert flow_loss(velocity, latents, noise, torch.tensor([0.3, 0.6]), "logit_normal") == 0


def test_gpu_recipe_parses_with_its_features():
    from hfgen.recipe import load_recipe

    model_args, data_args, args = load_recipe(REPO / "recipes/sd-3.5-medium/lora.yaml", check_inputs=False).configs
    assert model_args.pretrained_model_name_or_path == "stabilityai/stable-diffusion-3.5-medium" and model_args.drop_t5
    assert args.use_lora and args.mixed_precision == "bf16" and args.gradient_checkpointing
    assert args.weighting_scheme == "logit_normal" and data_args.resolution == 512
    model_args, data_args, args = load_recipe(REPO / "recipes/flux.1-dev/lora.yaml", check_inputs=False).configs
    assert model_args.pretrained_model_name_or_path == "black-forest-labs/FLUX.1-dev"
    assert model_args.max_sequence_length == 512 and model_args.training_guidance_scale == 1.0
    assert args.use_lora and args.mixed_precision == "bf16" and args.gradient_checkpointing


def tiny_flux_pipeline(sd3_dir, output_dir, guidance_embeds=True):
    """A FluxPipeline built from configs (CLIP pooled + T5 sequence, a guidance-distilled FluxTransformer2DModel)
    on the SD3 run's caption tokenizer (for both encoders) and 16-channel VAE: Flux.1-dev's layout, tiny. Without
    `sd3_dir`: a caption tokenizer and an untrained VAE; `guidance_embeds` false: Flux.1-schnell's layout."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from hfgen.diffusion.components import build_caption_tokenizer

    if sd3_dir:
        tokenizer, vae = (
            CLIPTokenizer.from_pretrained(sd3_dir / "tokenizer"),
            AutoencoderKL.from_pretrained(sd3_dir / "vae"),
        )
    else:
        tokenizer = build_caption_tokenizer(["a handwritten digit 3"], 16)
        vae = AutoencoderKL(latent_channels=16, block_out_channels=(8, 16), norm_num_groups=4, shift_factor=0.0,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)  # fmt: skip
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    torch.manual_seed(0)
    FluxPipeline(
        text_encoder=CLIPTextModel(
            CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, **ids)
        ),
        text_encoder_2=T5EncoderModel(
            T5Config(vocab_size=len(tokenizer), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2)
        ),
        transformer=FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=guidance_embeds,
            axes_dims_rope=(2, 2, 4),
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=16),
        vae=vae, tokenizer=tokenizer, tokenizer_2=tokenizer,
    ).save_pretrained(output_dir)  # fmt: skip
    return output_dir


def test_a_flux_pipeline_without_guidance_embeds_claims_no_guidance_scale(tmp_path):
    """Flux.1-schnell-like (no guidance_embeds) ignores guidance: an explicit training_guidance_scale is refused by
    `hfgen check`, and eval records no guidance_scale (two scales gave identical figures, each recorded as applied);
    a guidance-distilled one records it."""
    from hfgen.evaluation.images import evaluate_pipeline

    runs = {}
    for name, embeds in (("schnell", False), ("dev", True)):
        runs[name] = tiny_flux_pipeline(None, tmp_path / name, guidance_embeds=embeds)
    check = ["check", FLOW_LORA_RECIPE, "--output_dir", tmp_path / "out", "--training_guidance_scale", "1.0"]
    result = run_hfgen_here(*check, "--pretrained_model_name_or_path", runs["schnell"])
    assert result.returncode == 2 and "training_guidance_scale 1.0" in result.stderr, result.stderr
    assert "not guidance-distilled" in result.stderr
    assert run_hfgen_here(*check, "--pretrained_model_name_or_path", runs["dev"]).returncode == 0
    recorded = {}
    for name, run in runs.items():  # (the sampling settings a run's recipe.yaml gives: 16x16, 8 T5 tokens)
        (run / "recipe.yaml").write_text("stage: t2i_flow\nresolution: 16\nmax_sequence_length: 8\n")
        results = evaluate_pipeline(str(run), ["a handwritten digit 3"], 1, 1, guidance_scale=9.0, device="cpu")
        recorded[name] = results["eval/guidance_scale"]
    assert recorded == {"schnell": None, "dev": 9.0}


def test_an_sd3_transformer_claims_no_training_guidance_scale():
    """SD3's transformer has no guidance input: training_guidance_scale 7.0 on an SD3 pipeline trained a bit-identical
    LoRA, exit 0, while only a Flux one without guidance_embeds was refused (probe 41 I12). Refused for SD3 alike,
    from a pipeline's transformer config or from scratch (transformer_config); a guidance-distilled Flux keeps it."""
    from hfgen.diffusion.flow_components import (
        FlowPipelineArguments,
        training_guidance_problems,
        transformer_config_problems,
    )

    sd3 = json.loads((REPO / "recipes/tiny/mmdit_digits.json").read_text())
    args = FlowPipelineArguments(pretrained_model_name_or_path="sd3-run", training_guidance_scale=7.0)
    (problem,) = training_guidance_problems(args, {**sd3, "_class_name": "SD3Transformer2DModel"})
    assert "training_guidance_scale 7.0: the transformer of 'sd3-run' is an SD3 one" in problem
    assert training_guidance_problems(args, {"_class_name": "FluxTransformer2DModel", "guidance_embeds": True}) == []
    assert training_guidance_problems(FlowPipelineArguments(), sd3) == []  # (left at its default: not said)
    scratch_args = FlowPipelineArguments(transformer_config=str(REPO / "recipes/tiny/mmdit_digits.json"),
                                         training_guidance_scale=7.0)  # fmt: skip
    assert "is an SD3 one, which has no guidance input" in transformer_config_problems(scratch_args)[0]


@pytest.mark.slow
def test_override_shift_on_flux_is_a_static_shift(flow_run, tmp_path):
    """Flux's scheduler shifts dynamically (by image size), ignoring `shift`: override_shift turns that off, so the
    shift applies at training and sampling, and hfgen's loader samples the run as its validation did."""
    base = tiny_flux_pipeline(flow_run, tmp_path / "flux")
    run = tmp_path / "run"
    result = run_hfgen("train", FLOW_LORA_RECIPE, "--pretrained_model_name_or_path", base, "--max_sequence_length",
                       "8", "--override_shift", "true", "--shift", "2.0", "--max_train_steps", "1",
                       "--checkpointing_steps", "0", "--eval_images_per_prompt", "0", "--num_validation_images", "1",
                       "--num_inference_steps", "2", "--output_dir", run, *SMALL_DATA)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    changes = json.loads((run / "lora_base.json").read_text())["pipeline_changes"]
    assert changes == {"scheduler": {"shift": 2.0, "use_dynamic_shifting": False}}
    assert validation_grid_difference(run) == 0


@pytest.mark.slow
def test_flux_lora_feeds_guidance_and_loads_with_load_lora_weights(flow_run, tmp_path):
    from diffusers import DiffusionPipeline, FluxPipeline

    base = tiny_flux_pipeline(flow_run, tmp_path / "flux")
    common = ["--pretrained_model_name_or_path", base, "--max_sequence_length", "8", "--max_train_steps", "2",
              "--learning_rate", "1e-2", "--checkpointing_steps", "0", "--eval_images_per_prompt", "0",
              "--num_validation_images", "1", "--num_inference_steps", "2", *SMALL_DATA]  # fmt: skip
    adapters = {}
    for scale in ("1.0", "4.0"):  # the guidance input of a guidance-distilled transformer reaches it in training
        result = run_hfgen("train", FLOW_LORA_RECIPE, *common, "--training_guidance_scale", scale,
                           "--output_dir", tmp_path / scale)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        adapters[scale] = load_file(tmp_path / scale / "pytorch_lora_weights.safetensors")
    assert any("single_transformer_blocks" in key for key in adapters["1.0"])  # Flux's single-stream blocks too
    assert any(not torch.equal(adapters["1.0"][k], adapters["4.0"][k]) for k in adapters["1.0"])
    assert Image.open(tmp_path / "1.0/validation/step-000002.png").size == (64, 2 * 64)  # at the training size
    # aspect-ratio buckets on the Flux layout: sides count its 2x2 latent packing (with the tiny VAE's one halving,
    # multiples of 4: 3:2 about 16x16 pixels is 20x12)
    result = run_hfgen("train", FLOW_LORA_RECIPE, *common, "--dataset_name", "embedded:digits-aspect",
                       "--aspect_ratio_buckets", '"1:1"', '"3:2"', '"2:3"', "--output_dir", tmp_path / "buckets")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tracking.read_json(tmp_path / "buckets" / "buckets.json")) == ["16x16", "20x12", "12x20"]

    pipeline = DiffusionPipeline.from_pretrained(base)
    assert isinstance(pipeline, FluxPipeline)
    pipeline.set_progress_bar_config(disable=True)

    def render():
        return pipeline("a handwritten digit 3", num_inference_steps=2, height=16, width=16, max_sequence_length=8,
                        generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip

    before = render()
    pipeline.load_lora_weights(tmp_path / "1.0")
    assert not np.allclose(render(), before)
