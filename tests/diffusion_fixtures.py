"""Tiny component configs for the diffusion stage tests: the digits recipes with a few-thousand-parameter VAE, UNet
and text encoder, few steps and few images, so each run takes seconds on a CPU. Loaded as a pytest plugin by
tests/conftest.py, so its fixtures (`configs`, `vae_dir`) are there for every test module without an import."""

import json

import pytest

from conftest import REPO, run_hfgen

VAE_RECIPE = REPO / "recipes/tiny/vae_digits.yaml"
T2I_RECIPE = REPO / "recipes/tiny/t2i_digits.yaml"
LORA_RECIPE = REPO / "recipes/tiny/t2i_digits_lora.yaml"

TINY_VAE = {"block_out_channels": [8, 16], "norm_num_groups": 4}
TINY_UNET = {"block_out_channels": [16, 32], "norm_num_groups": 8, "cross_attention_dim": 16, "attention_head_dim": 4}
TINY_TEXT_ENCODER = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
SMALL_DATA = ["--max_train_samples", "64", "--max_eval_samples", "32", "--train_batch_size", "16"]


def write_tiny_configs(directory) -> dict[str, str]:
    """Tiny versions of the recipes' JSON configs in `directory`; returns the override flags that use them."""
    files = {
        "vae_config": ("vae_digits.json", TINY_VAE),
        "unet_config": ("unet_digits.json", TINY_UNET),
        "text_encoder_config": ("clip_text_digits.json", TINY_TEXT_ENCODER),
    }
    paths = {}
    for key, (name, changes) in files.items():
        config = {**json.loads((REPO / "recipes/tiny" / name).read_text()), **changes}
        path = directory / name
        path.write_text(json.dumps(config))
        paths[key] = str(path)
    return paths


def vae_overrides(configs, output_dir, steps=3) -> list[str]:
    return ["--vae_config", configs["vae_config"], "--output_dir", str(output_dir), "--max_train_steps", str(steps),
            "--checkpointing_steps", "0", "--logging_steps", "1", *SMALL_DATA]  # fmt: skip


def t2i_overrides(configs, vae_dir, output_dir, steps=4) -> list[str]:
    return ["--vae_name_or_path", str(vae_dir), "--unet_config", configs["unet_config"],
            "--text_encoder_config", configs["text_encoder_config"], "--output_dir", str(output_dir),
            "--max_train_steps", str(steps), "--logging_steps", "1", "--validation_steps", "2",
            "--validation_prompts", "a handwritten digit 1", "a handwritten digit 2", "--num_validation_images", "2",
            "--num_inference_steps", "2", "--eval_images_per_prompt", "2", "--text_encoder_pretraining_steps", "5", *SMALL_DATA]  # fmt: skip


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """The tiny component configs, written once per test module."""
    return write_tiny_configs(tmp_path_factory.mktemp("configs"))


@pytest.fixture(scope="module")
def vae_dir(configs, tmp_path_factory):
    """A 3-step tiny VAE run (the t2i stages' `vae` input), once per test module."""
    output_dir = tmp_path_factory.mktemp("vae")
    result = run_hfgen("train", VAE_RECIPE, *vae_overrides(configs, output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def with_reference_lora(denoiser, run_dir, prefix: str, rank: int, alpha: int, target_modules: list[str]):
    """`denoiser` with the run's adapter weights put in by peft at the recipe's rank and alpha (scale alpha / rank):
    what `load_lora_weights` must reproduce from the saved file alone."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(run_dir / "pytorch_lora_weights.safetensors")
    state = {key.removeprefix(f"{prefix}."): value for key, value in saved.items() if key.startswith(f"{prefix}.")}
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules))
    result = set_peft_model_state_dict(denoiser, convert_unet_state_dict_to_peft(state))
    assert state and not result.unexpected_keys
    return denoiser


def list_caption_folder(directory, images: int = 24):
    """An imagefolder of `images` 24x16 noise images, each captioned by a list of two alternatives (one is drawn
    per step): random crops at resolution 16 have room to move, and caption picks show."""
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    rows = []
    for i in range(images):
        pixels = generator.integers(0, 256, (16, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": [f"a handwritten digit {i % 10}", f"noise number {i}"]})
    (directory / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return directory


def validation_grid_difference(run_dir, pipeline_dir=None) -> int:
    """The largest pixel difference between a run's last validation grid and the same prompts rendered (as in
    validation: the recipe's steps, guidance, seed) from `pipeline_dir` (default: the run) by hfgen's loader."""
    import numpy as np
    from PIL import Image

    from hfgen.diffusion.components import load_pipeline
    from hfgen.diffusion.image_stage import ImageStageArguments
    from hfgen.diffusion.rendering import generate_images, make_grid, recorded_call_arguments
    from hfgen.evaluation.images import recipe_of

    recipe, pipeline_dir = recipe_of(run_dir), pipeline_dir or run_dir
    setting = lambda key: recipe.get(key, getattr(ImageStageArguments, key))  # noqa: E731
    rows = generate_images(
        load_pipeline(pipeline_dir, "cpu"), recipe["validation_prompts"], setting("num_validation_images"),
        setting("num_inference_steps"), setting("guidance_scale"), setting("seed"),
        **recorded_call_arguments(pipeline_dir),
    )  # fmt: skip
    grid = sorted((run_dir / "validation").glob("step-*.png"))[-1]
    return int(np.abs(np.asarray(make_grid(rows), int) - np.asarray(Image.open(grid).convert("RGB"), int)).max())


def save_tiny_sdxl(directory):
    """A few-thousand-parameter StableDiffusionXLPipeline (a UNet with SDXL's added time/text conditions), saved
    into `directory`, which the t2i stage must refuse."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from hfgen.diffusion.components import build_caption_tokenizer

    tokenizer = build_caption_tokenizer(["a handwritten digit 3"], 16)
    text = CLIPTextConfig(**TINY_TEXT_ENCODER, vocab_size=len(tokenizer), max_position_embeddings=16, projection_dim=16)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1, sample_size=8, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,
    )  # fmt: skip
    vae = AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)  # fmt: skip
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(text), text_encoder_2=CLIPTextModelWithProjection(text),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(),
    )  # fmt: skip
    pipeline.save_pretrained(directory)
    return directory


# one bf16 step, nothing sampled or kept: enough for a save of the frozen components (probe 43 C2's tests)
ONE_BF16_STEP = ["--max_train_steps", "1", "--mixed_precision", "bf16", "--validation_steps", "0",
                 "--eval_images_per_prompt", "0", "--checkpointing_steps", "0"]  # fmt: skip


def assert_saved_as_loaded(run_dir, expected: dict) -> None:
    """Each component of `run_dir` (`expected`: name -> the safetensors file it was loaded from) saved in float32,
    every tensor equal to the file's."""
    import torch
    from safetensors.torch import load_file

    for component, path in expected.items():
        loaded, saved = load_file(path), load_file(next((run_dir / component).glob("*.safetensors")))
        assert saved.keys() == loaded.keys() and {t.dtype for t in saved.values()} == {torch.float32}
        assert all(torch.equal(saved[name], loaded[name]) for name in loaded), component
