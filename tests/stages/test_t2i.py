"""Stage `t2i`: a pipeline built from scratch trains and saves as a diffusers pipeline that loads and generates;
LoRA changes only adapter weights and loads with load_lora_weights; two processes end with identical UNet
weights; resume continues exactly; bad data exits 2 before training; the GPU recipes parse."""

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, accelerate_launch, run_hfgen, run_hfgen_here
from diffusion_fixtures import (
    LORA_RECIPE,
    ONE_BF16_STEP,
    SMALL_DATA,
    T2I_RECIPE,
    assert_saved_as_loaded,
    save_tiny_sdxl,
    t2i_overrides,
    validation_grid_difference,
    with_reference_lora,
)  # fmt: skip
from hfgen import tracking
from hfgen.recipe import load_recipe


@pytest.fixture(scope="module")
def scratch_run(configs, vae_dir, tmp_path_factory):
    """A from-scratch pipeline: 4 steps, checkpoints every 2 keeping 1, validation grids every 2."""
    output_dir = tmp_path_factory.mktemp("t2i")
    overrides = t2i_overrides(configs, vae_dir, output_dir) + [
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "1",
    ]
    result = run_hfgen("train", T2I_RECIPE, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def test_saved_pipeline_loads_with_from_pretrained_and_generates(scratch_run):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipeline = DiffusionPipeline.from_pretrained(scratch_run)
    assert isinstance(pipeline, StableDiffusionPipeline) and isinstance(pipeline.tokenizer, CLIPTokenizer)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a handwritten digit 4", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[
        0
    ]
    assert image.size == (16, 16)  # 8x8 latents, VAE factor 2
    assert pipeline.tokenizer.model_max_length == pipeline.text_encoder.config.max_position_embeddings == 16


def test_run_records_metrics_rotated_checkpoints_validation_grids_and_eval(scratch_run):
    assert tracking.is_complete(scratch_run)
    assert [row["step"] for row in tracking.read_metrics(scratch_run)] == [1, 2, 3, 4]
    assert [p.name for p in tracking.checkpoints(scratch_run)] == ["checkpoint-4"]  # limit 1: checkpoint-2 removed
    assert (scratch_run / "checkpoint-4" / "recipe.yaml").is_file()
    for step in (2, 4):
        grid = Image.open(scratch_run / "validation" / f"step-00000{step}.png")
        assert grid.size == (2 * 64, 2 * 64)  # 2 prompts x 2 images, cells enlarged to 64 px
    results = tracking.read_json(scratch_run / "eval.json")
    assert 0 <= results["quality/prompt_adherence"] <= 1 and results["quality/classifier_heldout_accuracy"] > 0.97
    assert results["diversity/pairwise_distance"] > 0 and results["speed/images_per_s"] > 0
    assert results["eval/num_prompts"] == 10 and results["train/steps"] == 4  # the ten digit prompts


def test_hfgen_eval_on_the_t2i_pipeline_dir(scratch_run, tmp_path):
    output = tmp_path / "eval.json"
    result = run_hfgen("eval", scratch_run, "--images_per_prompt", "1", "--num_inference_steps", "2", "--quiet",
                       "--output", output)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = tracking.read_json(output)
    assert results["eval/images_per_prompt"] == 1 and results["speed/peak_memory_mb"] > 0
    assert any(key.startswith("quality/") for key in results) and any(key.startswith("diversity/") for key in results)


def test_hfgen_eval_on_a_run_uses_its_validation_prompts_and_one_image_has_no_diversity(scratch_run, tmp_path):
    import yaml

    run = tmp_path / "run"
    shutil.copytree(scratch_run, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe |= {"dataset_name": str(tmp_path / "images"), "validation_prompts": ["a red square", "a blue circle"]}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))  # (a run on other data than the digits)
    result = run_hfgen("eval", run, "--images_per_prompt", "1", "--num_inference_steps", "2", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    results = tracking.read_json(run / "eval.json")
    assert results["eval/num_prompts"] == 2 and results["eval/images_per_prompt"] == 1
    assert results["diversity/pairwise_distance"] is None
    refused = run_hfgen_here("eval", run, "--images_per_prompt", "0")
    assert refused.returncode == 2 and "--images_per_prompt" in refused.stderr and "Traceback" not in refused.stderr


def test_hfgen_eval_on_a_run_given_one_validation_prompt_renders_that_prompt(scratch_run, tmp_path):
    """A single `--validation_prompts "..."` is recorded in recipe.yaml as a string: eval rendered one prompt per
    character of it (25 one-letter prompts)."""
    import yaml

    from hfgen.recipe import parse_overrides

    run = tmp_path / "run"
    shutil.copytree(scratch_run, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe |= {"dataset_name": str(tmp_path / "images"), **parse_overrides(["--validation_prompts", "a sks square"])}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))  # as `hfgen train` records the command line's value
    output = tmp_path / "eval.json"
    result = run_hfgen_here("eval", run, "--images_per_prompt", "1", "--num_inference_steps", "1", "--quiet",
                            "--output", output)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert tracking.read_json(output)["eval/num_prompts"] == 1


def test_hfgen_eval_of_a_run_defaults_to_the_seed_of_its_own_evaluation_and_records_it(scratch_run, tmp_path):
    """`hfgen eval RUN` sampled under seed 0 while the run's own evaluation used its recipe's seed (42), recording
    no eval/seed: merged into the run's eval.json, its figures replaced the run's with others, unsaid."""
    output = tmp_path / "eval.json"
    result = run_hfgen_here("eval", scratch_run, "--quiet", "--output", output)  # the run's own settings
    assert result.returncode == 0, result.stderr[-3000:]
    again, own = tracking.read_json(output), tracking.read_json(scratch_run / "eval.json")
    figures = [key for key in own if key.startswith(("quality/", "diversity/"))]
    assert figures and {key: again[key] for key in figures} == {key: own[key] for key in figures}
    assert again["eval/seed"] == own["eval/seed"] == 42


def test_generate_command_renders_pngs_and_a_grid(scratch_run, tmp_path):
    result = run_hfgen("generate", scratch_run, "--prompt", "a handwritten digit 3", "--prompt", "digit five",
                       "--num_samples", "3", "--num_inference_steps", "2", "--output_dir", tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(tmp_path.glob("0*-*.png"))) == 6
    assert Image.open(tmp_path / "grid.png").size == (3 * 64, 2 * 64)
    assert str(tmp_path / "grid.png") in result.stdout
    # a second render into the same dir, with fewer prompts and samples: only its own images are there
    (tmp_path / "notes.png").write_bytes(b"not ours")
    result = run_hfgen("generate", scratch_run, "--prompt", "digit seven", "--num_samples", "1",
                       "--num_inference_steps", "2", "--output_dir", tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00-digit-seven-0.png", "grid.png", "notes.png"]


def test_generate_renders_the_validation_grid_with_the_run_s_sampling_settings(scratch_run, tmp_path):
    """Unset, --num_inference_steps and --guidance_scale are the run's (as in `hfgen eval`): generate took 25 / 3.0,
    and the validation prompts at the run's seed rendered another grid than the run's validation grid."""
    import numpy as np

    from hfgen.evaluation.images import recipe_of

    recipe = recipe_of(scratch_run)
    prompts = [argument for prompt in recipe["validation_prompts"] for argument in ("--prompt", prompt)]
    result = run_hfgen_here("generate", scratch_run, *prompts, "--num_samples", recipe["num_validation_images"],
                            "--seed", recipe["seed"], "--output_dir", tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    grid = sorted((scratch_run / "validation").glob("step-*.png"))[-1]
    rendered, validation = (np.asarray(Image.open(path).convert("RGB"), int) for path in (tmp_path / "grid.png", grid))
    assert np.abs(rendered - validation).max() == 0


def test_lora_changes_only_adapters_and_loads_with_load_lora_weights(scratch_run, tmp_path):
    from diffusers import DiffusionPipeline

    from hfgen.stages.t2i import UNET_LORA_MODULES

    # lora_alpha != lora_rank: the saved file must carry the scale alpha / rank (load_lora_weights' default is 1)
    result = run_hfgen("train", LORA_RECIPE, "--pretrained_model_name_or_path", scratch_run, "--output_dir", tmp_path,
                       "--lora_rank", "4", "--lora_alpha", "16", "--max_train_steps", "3", "--checkpointing_steps", "3", "--learning_rate", "1e-2",
                       "--eval_images_per_prompt", "0", "--num_validation_images", "1", "--num_inference_steps", "2",
                       *SMALL_DATA)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert adapter and all(".lora.down." in k or ".lora.up." in k for k in adapter)  # diffusers' LoRA naming
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if ".lora.up." in k)  # up (B) starts at zero: it trained
    assert not (tmp_path / "unet").exists() and json.loads((tmp_path / "lora_base.json").read_text())[
        "pretrained_model_name_or_path"
    ] == str(scratch_run)
    unet_file = scratch_run / "unet" / "diffusion_pytorch_model.safetensors"
    assert (tmp_path / "pytorch_lora_weights.safetensors").stat().st_size < 0.25 * unet_file.stat().st_size

    # Checkpoints keep every parameter that requires grad (and drop frozen ones): only adapter weights trained.
    trained = load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    assert trained and all("lora_" in key for key in trained) and len(trained) == len(adapter)

    # The adapter loads on the base pipeline and changes its images; switched off, the base comes back exactly.
    pipeline = DiffusionPipeline.from_pretrained(scratch_run)
    pipeline.set_progress_bar_config(disable=True)

    def render():
        generator = torch.Generator().manual_seed(0)
        return pipeline("a handwritten digit 3", num_inference_steps=2, generator=generator, output_type="np").images

    before = render()
    pipeline.load_lora_weights(tmp_path)
    with_lora = render()
    pipeline.disable_lora()
    assert not torch.allclose(torch.from_numpy(with_lora), torch.from_numpy(before))
    assert torch.equal(torch.from_numpy(render()), torch.from_numpy(before))
    reference = DiffusionPipeline.from_pretrained(scratch_run)
    reference.set_progress_bar_config(disable=True)
    with_reference_lora(reference.unet, tmp_path, "unet", 4, 16, UNET_LORA_MODULES)
    generator = torch.Generator().manual_seed(0)
    at_alpha = reference("a handwritten digit 3", num_inference_steps=2, generator=generator, output_type="np").images
    torch.testing.assert_close(torch.from_numpy(with_lora), torch.from_numpy(at_alpha), atol=1e-5, rtol=1e-5)

    # `hfgen merge` fuses the adapters into a plain pipeline dir that renders what base + adapters render; the LoRA
    # run itself is refused as a starting pipeline (its adapters would be lost), pointing at the merge.
    merged = run_hfgen("merge", tmp_path, "--output_dir", tmp_path.parent / f"{tmp_path.name}_merged")
    assert merged.returncode == 0, merged.stderr[-3000:]
    pipeline = DiffusionPipeline.from_pretrained(tmp_path.parent / f"{tmp_path.name}_merged")
    pipeline.set_progress_bar_config(disable=True)
    assert not any("lora" in name for name in pipeline.unet.state_dict())
    torch.testing.assert_close(torch.from_numpy(render()), torch.from_numpy(with_lora), atol=1e-4, rtol=1e-4)
    refused = run_hfgen_here("check", LORA_RECIPE, "--pretrained_model_name_or_path", tmp_path)
    assert refused.returncode == 2 and "is a LoRA run" in refused.stderr and "hfgen merge" in refused.stderr


def test_a_diffusers_lora_is_told_to_name_its_base_in_lora_base_json_and_then_loads(scratch_run, tmp_path):
    """A LoRA as diffusers' LoRA scripts save it (save_lora_weights: no lora_base.json) was "a directory without a
    config.json or adapter_config.json" to generate, eval and a t2i recipe, and "not a LoRA adapter dir" to merge
    (probe 44 B6): told it needs its base named in lora_base.json, in the format README gives, it then merges into
    a pipeline that renders what base + LoRA render."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    pipeline = DiffusionPipeline.from_pretrained(scratch_run)
    pipeline.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_k", "to_v"]))
    lora = tmp_path / "diffusers_lora"
    StableDiffusionPipeline.save_lora_weights(
        lora, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipeline.unet))
    )
    told = run_hfgen_here("generate", lora, "--prompt", "a handwritten digit 3")
    assert told.returncode == 2 and "is a diffusers LoRA" in told.stderr, told.stderr[-2000:]
    assert f'write {{"pretrained_model_name_or_path": "BASE"}} into \'{lora / "lora_base.json"}\'' in told.stderr
    (lora / "lora_base.json").write_text("[]")  # a file that names no base: refused, naming it
    refused = run_hfgen_here("merge", lora, "--output_dir", tmp_path / "merged")
    assert refused.returncode == 2 and f"'{lora / 'lora_base.json'}' names no base pipeline" in refused.stderr
    (lora / "lora_base.json").write_text(json.dumps({"pretrained_model_name_or_path": str(scratch_run)}))
    merged = run_hfgen("merge", lora, "--output_dir", tmp_path / "merged")
    assert merged.returncode == 0, merged.stderr[-3000:]

    def render(pipeline):
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        images = pipeline("a handwritten digit 3", num_inference_steps=2, generator=generator, output_type="np")
        return torch.from_numpy(images.images)

    base = DiffusionPipeline.from_pretrained(scratch_run)
    base.load_lora_weights(lora)
    with_lora = render(base)
    base.disable_lora()
    assert not torch.allclose(with_lora, render(base))  # the LoRA changes the images: the check below has teeth
    torch.testing.assert_close(render(DiffusionPipeline.from_pretrained(tmp_path / "merged")), with_lora)


def cached_pipeline(scratch_run, tmp_path, hub_cache):
    """scratch_run's pipeline put into the hub cache as tinyorg/tiny-sd (model_index.json on top, its components'
    configs in subfolders): its snapshot dir."""
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (shutil.copytree if (scratch_run / part).is_dir() else shutil.copy)(scratch_run / part, pipeline / part)
    return hub_cache("tinyorg/tiny-sd", pipeline, "7" * 40)


def test_a_pipeline_named_by_hub_id_from_the_cache_passes_the_check(scratch_run, tmp_path, hub_cache):
    # a cached diffusers pipeline was refused offline by the t2i check as "neither a local path nor in the Hugging
    # Face cache": the check asked the cache for a config.json on top, which a pipeline repo has in its subfolders
    # (probe 43 A11)
    cached_pipeline(scratch_run, tmp_path, hub_cache)
    result = run_hfgen_here("check", LORA_RECIPE, "--pretrained_model_name_or_path", "tinyorg/tiny-sd",
                            "--output_dir", tmp_path / "run", *SMALL_DATA)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def test_generate_and_eval_of_a_pipeline_named_by_hub_id_ask_for_its_dir(scratch_run, tmp_path, hub_cache):
    # generate and eval tell a pipeline by its dir: given a cached pipeline's id, they called it "a text model" or
    # failed on its tokenizer, transformers blaming the connection (probe 43 A12)
    snapshot = cached_pipeline(scratch_run, tmp_path, hub_cache)
    said = "'tinyorg/tiny-sd' is a diffusers pipeline on the hub, which hfgen loads from a dir: give its cached "
    said += f"snapshot dir '{snapshot}'"
    for command in (["generate", "tinyorg/tiny-sd", "--prompt", "3"], ["eval", "tinyorg/tiny-sd", "--quiet"]):
        result = run_hfgen_here(*command)
        assert result.returncode == 2 and said in result.stderr and "text model" not in result.stderr, result.stderr


def test_a_lora_run_s_pipeline_changes_are_recorded_and_applied_by_generate_and_merge(scratch_run, vae_dir, tmp_path):
    """A LoRA run with its own prediction_type and VAE trains and validates on the changed base: lora_base.json
    records the changes, and hfgen's loader (generate, eval, merge) renders the run's validation grid exactly."""
    from diffusers import DiffusionPipeline

    run = tmp_path / "run"
    result = run_hfgen("train", LORA_RECIPE, "--pretrained_model_name_or_path", scratch_run, "--output_dir", run,
                       "--prediction_type", "v_prediction", "--vae_name_or_path", vae_dir, "--max_train_steps", "2",
                       "--checkpointing_steps", "0", "--eval_images_per_prompt", "0", "--num_validation_images", "1",
                       "--num_inference_steps", "2", *SMALL_DATA)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    changes = json.loads((run / "lora_base.json").read_text())["pipeline_changes"]
    assert changes["scheduler"] == {"prediction_type": "v_prediction"}
    assert changes["vae"]["name_or_path"] == str(vae_dir.resolve())
    assert validation_grid_difference(run) == 0
    merged = tmp_path / "merged"
    assert run_hfgen("merge", run, "--output_dir", merged).returncode == 0
    assert DiffusionPipeline.from_pretrained(merged).scheduler.config.prediction_type == "v_prediction"
    assert validation_grid_difference(run, merged) <= 1  # fused weights: float rounding at most


@pytest.mark.parametrize("use_lora", ["false", "true"])
def test_a_run_at_another_resolution_than_its_base_renders_at_its_own(scratch_run, tmp_path, use_lora):
    """The base renders 16 px (sample_size 8); a run at resolution 32 samples (eval, hfgen generate) at 32, and its
    saved UNet config says so (a LoRA run's base keeps its own: the size comes from the run's recipe.yaml; its
    merge's UNet config says the trained size)."""
    from diffusers import DiffusionPipeline

    run = tmp_path / "run"
    result = run_hfgen("train", LORA_RECIPE, "--pretrained_model_name_or_path", scratch_run, "--output_dir", run,
                       "--use_lora", use_lora, *(["--lora_alpha", "null"] if use_lora == "false" else []),
                       "--resolution", "32", "--max_train_steps", "1",
                       "--checkpointing_steps", "0", "--eval_images_per_prompt", "1", "--num_validation_images", "1",
                       "--num_inference_steps", "2", *SMALL_DATA)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert {Image.open(path).size for path in (run / "samples").glob("0*.png")} == {(32, 32)}
    result = run_hfgen("generate", run, "--prompt", "a handwritten digit 3", "--num_inference_steps", "2",
                       "--output_dir", tmp_path / "generated")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(next((tmp_path / "generated").glob("00-*.png"))).size == (32, 32)
    if use_lora == "true":  # its merge is a plain pipeline that says the trained size too (probe 41 E8)
        merged = tmp_path / "merged"
        assert run_hfgen("merge", run, "--output_dir", merged).returncode == 0
        run = merged
    pipeline = DiffusionPipeline.from_pretrained(run)
    assert pipeline.unet.config.sample_size == 16
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline("a handwritten digit 3", num_inference_steps=2).images[0].size == (32, 32)


@pytest.mark.parametrize("base", ["built", "pretrained"])
def test_mixed_precision_saves_the_frozen_vae_and_text_encoder_as_loaded(scratch_run, configs, vae_dir, tmp_path, base):
    """Under mixed_precision the frozen VAE and text encoder compute in bf16; cast back to float32 for the save, the
    pipeline held every weight rounded to bf16, in float32 where nothing shows it (probe 43 C2). Saved as loaded:
    read again from the base pipeline and vae_name_or_path, or (a text encoder built from its config and
    pretrained here) kept as it was before the cast, which the float32 scratch run saved with the same seed."""
    run = tmp_path / "run"
    if base == "built":
        result = run_hfgen_here("train", T2I_RECIPE, *t2i_overrides(configs, vae_dir, run), *ONE_BF16_STEP)
        expected = {"vae": vae_dir / "diffusion_pytorch_model.safetensors",
                    "text_encoder": scratch_run / "text_encoder/model.safetensors"}  # fmt: skip
    else:
        result = run_hfgen_here("train", LORA_RECIPE, "--pretrained_model_name_or_path", scratch_run, "--output_dir",
                                run, "--use_lora", "false", "--lora_alpha", "null", *ONE_BF16_STEP, *SMALL_DATA)  # fmt: skip
        expected = {"vae": scratch_run / "vae/diffusion_pytorch_model.safetensors",
                    "text_encoder": scratch_run / "text_encoder/model.safetensors"}  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert_saved_as_loaded(run, expected)


@pytest.mark.slow
def test_two_processes_end_with_identical_unet_weights(configs, vae_dir, tmp_path, free_port):
    overrides = t2i_overrides(configs, vae_dir, tmp_path, steps=3) + ["--eval_images_per_prompt", "0"]
    result = accelerate_launch(free_port, T2I_RECIPE, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    fingerprints = [(tmp_path / f"weights-rank{r}.sha256").read_text() for r in (0, 1)]
    assert fingerprints[0] == fingerprints[1]
    assert tracking.read_json(tmp_path / "env.json")["world_size"] == 2
    assert (tmp_path / "model_index.json").is_file()


def test_resume_from_checkpoint_matches_the_uninterrupted_run(configs, vae_dir, tmp_path):
    common = t2i_overrides(configs, vae_dir, tmp_path, steps=4) + ["--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
                                                                   "--eval_images_per_prompt", "0"]  # fmt: skip
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    result = run_hfgen("train", T2I_RECIPE, *common, "--output_dir", full)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")  # all that survives of an interrupted run
    result = run_hfgen("train", T2I_RECIPE, *common, "--output_dir", resumed, "--resume_from_checkpoint", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b, midway = (
        load_file(full / weights),
        load_file(resumed / weights),
        load_file(full / "checkpoint-2/model.safetensors"),
    )
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a[n], midway[n]) for n in a)  # the last two steps changed the weights
    assert_resumed_records(full, resumed)


def test_a_checkpoint_state_that_would_run_code_is_refused_before_it_is_unpickled(
    scratch_run, configs, vae_dir, tmp_path
):
    """accelerate unpickles the registered objects' states (custom_checkpoint_N.pkl: schedule, RNG, EMA) with
    weights_only=False: a crafted one given to resume from ran what its pickle named (probe 40 D5). hfgen loads each
    with weights_only=True first and refuses the file; its own states load so (the resume tests)."""
    marker = tmp_path / "marker"

    class RunsCode:
        def __reduce__(self):
            return open, (str(marker), "w")

    (checkpoint,) = scratch_run.glob("checkpoint-*")
    crafted = tmp_path / "run" / checkpoint.name
    shutil.copytree(checkpoint, crafted)
    torch.save({"state": RunsCode()}, crafted / "custom_checkpoint_0.pkl")
    overrides = t2i_overrides(configs, vae_dir, tmp_path / "run") + ["--checkpointing_steps", "2",
                                                                      "--checkpoints_total_limit", "1"]  # fmt: skip
    result = run_hfgen_here("train", T2I_RECIPE, *overrides, "--resume_from_checkpoint", crafted)
    assert result.returncode == 2 and "custom_checkpoint_0.pkl' is no state hfgen wrote" in result.stderr, result.stderr
    assert "(it names io.open)" in result.stderr and "weights_only` set to `False`" not in result.stderr
    assert not marker.exists()


def assert_resumed_records(full, resumed):
    """A run that ignored the checkpoint and redid every step from the same seed would end with the same weights;
    the resumed one logs only the steps after the checkpoint, with the uninterrupted run's learning rates."""
    logged, full_logged = tracking.read_metrics(resumed), tracking.read_metrics(full)
    assert [row["step"] for row in logged] == [3, 4]
    assert [row["lr"] for row in logged] == pytest.approx([row["lr"] for row in full_logged[2:]], rel=1e-6)
    assert [row["loss"] for row in logged] == pytest.approx([row["loss"] for row in full_logged[2:]], rel=1e-4)


def test_lora_checkpoints_hold_only_the_adapters_and_resume_exactly(scratch_run, tmp_path):
    common = ["--pretrained_model_name_or_path", scratch_run, "--max_train_steps", "4", "--checkpointing_steps", "2",
              "--checkpoints_total_limit", "2", "--logging_steps", "1",
              "--learning_rate", "1e-2", "--eval_images_per_prompt", "0", "--num_validation_images", "1",
              "--num_inference_steps", "2", *SMALL_DATA]  # fmt: skip
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    result = run_hfgen("train", LORA_RECIPE, *common, "--output_dir", full)
    assert result.returncode == 0, result.stderr[-3000:]
    midway = load_file(full / "checkpoint-2/model.safetensors")
    assert midway and all("lora_" in key for key in midway)  # the frozen UNet is not copied into checkpoints
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    result = run_hfgen("train", LORA_RECIPE, *common, "--output_dir", resumed, "--resume_from_checkpoint", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_file(full / "pytorch_lora_weights.safetensors"), load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert_resumed_records(full, resumed)


@pytest.mark.parametrize(
    "change, expected",
    [
        (["--num_validation_images", "0"], ["num_validation_images", "validation_prompts: []"]),
        (["--checkpoints_total_limit", "0"], ["checkpoints_total_limit", "at least 1"]),  # (0 kept every one)
    ],
)
def test_zero_counts_exit_2_at_the_check(scratch_run, change, expected):
    result = run_hfgen_here("check", LORA_RECIPE, "--pretrained_model_name_or_path", scratch_run, *change)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert all(part in result.stderr for part in expected), result.stderr


def test_text_encoder_lora_with_a_peft_transformers_cannot_use_exits_2_at_the_check(scratch_run):
    from importlib.metadata import version

    from packaging.version import Version
    from transformers.integrations.peft import MIN_PEFT_VERSION

    if Version(version("peft")) >= Version(MIN_PEFT_VERSION):
        pytest.skip(f"peft {version('peft')} is new enough for transformers' text-encoder adapters")
    result = run_hfgen_here("check", LORA_RECIPE, "--pretrained_model_name_or_path", scratch_run,
                       "--train_text_encoder", "true")  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train_text_encoder" in result.stderr and MIN_PEFT_VERSION in result.stderr


def test_generate_with_more_steps_than_the_scheduler_has_exits_2(scratch_run, tmp_path):
    result = run_hfgen_here("generate", scratch_run, "--prompt", "a handwritten digit 3", "--num_inference_steps", "2000",
                       "--output_dir", tmp_path)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--num_inference_steps 2000" in result.stderr and "1000" in result.stderr


def test_with_gradient_accumulation_a_step_logs_the_mean_of_its_micro_batches(scratch_run, tmp_path):
    """At learning rate 0 the adapters stay put, so two accumulated micro-batches of 8 see what two steps of 8 see
    (same batches, same noise and timesteps): the accumulated step logs their mean (was the last micro-batch's)."""
    losses = {}
    for accumulation, steps in ((2, 2), (1, 4)):
        output_dir = tmp_path / f"accumulation{accumulation}"
        result = run_hfgen("train", LORA_RECIPE, "--pretrained_model_name_or_path", scratch_run, "--output_dir",
                           output_dir, "--learning_rate", "0", "--gradient_accumulation_steps", str(accumulation),
                           "--max_train_steps", str(steps), "--logging_steps", "1", "--checkpointing_steps", "0",
                           "--eval_images_per_prompt", "0", "--validation_prompts", "[]", *SMALL_DATA,
                           "--train_batch_size", "8")  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        losses[accumulation] = [row["loss"] for row in tracking.read_metrics(output_dir)]
    single = losses[1]
    assert losses[2] == pytest.approx([(single[0] + single[1]) / 2, (single[2] + single[3]) / 2], rel=1e-5)


def test_component_configs_that_fail_mid_training_exit_2_at_the_check(configs, vae_dir, scratch_run, tmp_path):
    """A scheduler whose prediction_type the loss does not train (a file's, or a pretrained pipeline's), a UNet
    config of another class, with SDXL's added conditions or with other channels than the VAE's latents: refused by
    `hfgen check` (they trained wrongly, or crashed after the text encoder's pretraining)."""
    unet = json.loads(open(configs["unet_config"]).read())
    files = {
        "sample.json": {"num_train_timesteps": 1000, "prediction_type": "sample"},
        "sdxl.json": {**unet, "addition_embed_type": "text_time"},
        "unet16.json": {**unet, "in_channels": 16, "out_channels": 16},
        "mmdit.json": {**unet, "_class_name": "SD3Transformer2DModel"},
        "vae16/config.json": {"_class_name": "AutoencoderKL", "latent_channels": 16, "block_out_channels": [8, 16]},
    }
    for name, config in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(json.dumps(config))
    shutil.copytree(scratch_run, tmp_path / "sample_base", ignore=shutil.ignore_patterns("checkpoint-*"))
    scheduler = tmp_path / "sample_base/scheduler/scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "sample"}))
    scratch = t2i_overrides(configs, vae_dir, tmp_path / "out")
    cases = [
        (
            ["--scheduler_config", tmp_path / "sample.json", "--prediction_type", "null"],
            "scheduler_config",
            "prediction_type 'sample'",
        ),
        (["--unet_config", tmp_path / "sdxl.json"], "unet_config", "addition_embed_type 'text_time'"),
        (["--unet_config", tmp_path / "unet16.json"], "in_channels 16, out_channels 16", "latent_channels is 4"),
        (["--unet_config", tmp_path / "mmdit.json"], "unet_config", "SD3Transformer2DModel"),
        (["--vae_name_or_path", tmp_path / "vae16"], "in_channels 4, out_channels 4", "latent_channels is 16"),
    ]
    for change, *expected in cases:
        result = run_hfgen_here("check", T2I_RECIPE, *scratch, *change)
        assert result.returncode == 2 and all(part in result.stderr for part in expected), (change, result.stderr)
    result = run_hfgen_here("check", LORA_RECIPE, "--pretrained_model_name_or_path", tmp_path / "sample_base")
    assert result.returncode == 2 and "prediction_type 'sample'" in result.stderr, result.stderr
    # a pretrained pipeline's scheduler is the one trained with: a scheduler_config beside it is refused
    result = run_hfgen_here("check", LORA_RECIPE, "--pretrained_model_name_or_path", scratch_run, "--scheduler_config",
                       tmp_path / "sample.json")  # fmt: skip
    assert result.returncode == 2 and "scheduler_config build a pipeline from scratch" in result.stderr


def test_an_sdxl_unet_found_only_when_loaded_exits_2_before_any_data(tmp_path):
    """A hub SDXL pipeline not yet downloaded passes `hfgen check` (its UNet config is not at hand); the loaded UNet
    is checked again by the loader, before the data are encoded or DreamBooth's class images generated (it died in
    diffusers at the first step)."""
    from hfgen.diffusion.components import PipelineArguments, load_components
    from hfgen.errors import UserError

    sdxl = save_tiny_sdxl(tmp_path / "sdxl")
    with pytest.raises(UserError, match="addition_embed_type 'text_time'"):
        load_components(PipelineArguments(pretrained_model_name_or_path=str(sdxl)), [])


def test_lora_target_modules_the_unet_lacks_exit_2_naming_its_layers(scratch_run, tmp_path):
    result = run_hfgen_here("train", LORA_RECIPE, "--pretrained_model_name_or_path", scratch_run, "--output_dir", tmp_path,
                       "--lora_target_modules", "[q_proj, k_proj]", *SMALL_DATA)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert all(part in result.stderr for part in ("lora_target_modules", "k_proj, q_proj", "to_out.0", "to_q"))
    assert "all-linear" not in result.stderr  # peft takes it for transformers models only
    assert not (tmp_path / "COMPLETE").exists()


@pytest.mark.parametrize(
    "change, expected",
    [
        (["--caption_column", "caption"], ["'caption'", "caption_column"]),
        (["--dataset_name", "MISSING_FILE"], ["3.png", "does not exist"]),
    ],
)
def test_bad_data_exits_2_before_training(configs, vae_dir, tmp_path, change, expected):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16)).save(folder / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "text": f"square {i}"} for i in range(4)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    change = [str(folder) if c == "MISSING_FILE" else c for c in change]
    result = run_hfgen_here("train", T2I_RECIPE, *t2i_overrides(configs, vae_dir, tmp_path / "out"), *change)
    assert result.returncode == 2, result.stderr[-3000:]
    for text in expected:
        assert text in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "metrics.jsonl").exists()


def test_recipes_for_real_pipelines_parse_with_their_features():
    lora = load_recipe(REPO / "recipes/sd-1.5/t2i_lora.yaml", check_inputs=False)
    full = load_recipe(REPO / "recipes/sd-1.5/t2i_full.yaml", check_inputs=False)
    for recipe in (lora, full):
        model_args, data_args, args = recipe.configs
        assert model_args.pretrained_model_name_or_path == "stable-diffusion-v1-5/stable-diffusion-v1-5"
        assert data_args.dataset_name == "lambdalabs/naruto-blip-captions" and data_args.resolution == 512
        assert args.snr_gamma == 5.0 and args.mixed_precision == "fp16" and args.validation_prompts
    assert lora.configs[2].use_lora and not lora.configs[2].use_ema
    assert full.configs[2].use_ema and full.configs[2].gradient_checkpointing and not full.configs[2].use_lora
    tiny = load_recipe(T2I_RECIPE, check_inputs=False)
    assert tiny.configs[2].condition_dropout > 0 and tiny.configs[2].guidance_scale > 1


@pytest.mark.parametrize("use_ema", ["false", "true"])
def test_a_unet_broken_by_the_last_update_is_not_saved(configs, vae_dir, tmp_path, use_ema):
    """The guard checks a step's loss and gradients before its update: the last one's (learning rate 1e12) left a
    UNet whose every output was NaN, saved with exit 0 and COMPLETE, its evaluation scoring images cast from NaN.
    With EMA the saved weights are the average's, which was not looked at: at step 1 of its warm-up it is the
    trained weights, as broken."""
    overrides = t2i_overrides(configs, vae_dir, tmp_path, steps=1) + [
        "--learning_rate", "1e12", "--lr_warmup_steps", "0", "--validation_steps", "0", "--eval_images_per_prompt", "0",
        "--use_ema", use_ema,
    ]  # fmt: skip
    result = run_hfgen_here("train", T2I_RECIPE, *overrides)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "training ended at step 1 with a model that no longer computes: its noise prediction" in result.stderr
    assert not tracking.is_complete(tmp_path) and not (tmp_path / "unet").exists()


def test_the_ema_comes_back_from_a_checkpoint_on_the_device_it_was_moved_to(tmp_path):
    """accelerate loads a registered object's state on the CPU and diffusers' EMAModel replaced its shadow weights
    with those tensors: a GPU resume left the EMA on the CPU, the UNet on the GPU, and its first `step` raised (probe
    39 H1). 'meta' stands in for the GPU: the one device other than the CPU that every machine has."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from diffusers import UNet2DModel

    from hfgen.diffusion import image_stage

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(cpu=True)
        unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4,), layers_per_block=1,
                           down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=2)  # fmt: skip
        ema = image_stage.make_ema(unet, UNet2DModel, SimpleNamespace(use_ema=True, ema_decay=0.9), accelerator)
        ema.step(unet.parameters())
        accelerator.save_state(tmp_path / "checkpoint")
        unet.to("meta")  # as the stage moves the denoiser, then the EMA, to its device before resuming
        ema.to("meta")
        accelerator.load_state(tmp_path / "checkpoint")
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert ema.optimization_step == 1  # the checkpoint's state was loaded
    assert {p.device.type for p in ema.shadow_params} == {"meta"}
    ema.step(unet.parameters())  # the resumed run's next step: every tensor on one device


def test_a_variant_applies_to_the_pipelines_vae_as_to_its_other_components(scratch_run, tmp_path):
    """A pipeline whose weights are fp16 variant files only (a hub repo's fp16 variant): the UNet and text encoder
    loaded with `variant`, the VAE without it, and the run exited 2 saying the VAE could not be loaded (probe 41
    E1)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from hfgen.diffusion.components import PipelineArguments, load_components

    base = tmp_path / "fp16"
    shutil.copytree(scratch_run, base, ignore=shutil.ignore_patterns("checkpoint-*", "validation", "ema"))
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        model = cls.from_pretrained(base / sub)
        for weights in (base / sub).glob("*.safetensors"):
            weights.unlink()
        model.to(torch.float16).save_pretrained(base / sub, variant="fp16")
    parts = load_components(PipelineArguments(pretrained_model_name_or_path=str(base), variant="fp16"), [])
    saved = load_file(base / "vae/diffusion_pytorch_model.fp16.safetensors")
    for name, tensor in parts["vae"].state_dict().items():  # the variant's weights
        torch.testing.assert_close(tensor, saved[name].to(tensor.dtype))


@pytest.mark.parametrize("damage", ["absent", "config_only"])
def test_a_pipeline_missing_a_component_exits_2_at_the_check_naming_it(scratch_run, tmp_path, damage):
    """model_index.json names text_encoder but its folder is absent (or holds only config.json): hfgen check passed,
    and train / generate said 'pipeline could not be loaded: no file named model.safetensors ... in <root>'
    (probe 41 E5)."""
    base = tmp_path / "pipe"
    shutil.copytree(scratch_run, base, ignore=shutil.ignore_patterns("checkpoint-*", "validation", "ema"))
    if damage == "absent":
        shutil.rmtree(base / "text_encoder")
    else:
        for weights in (base / "text_encoder").glob("*.safetensors"):
            weights.unlink()
    result = run_hfgen_here("check", LORA_RECIPE, "--pretrained_model_name_or_path", base)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "text_encoder/" in result.stderr and "pretrained_model_name_or_path" in result.stderr
    result = run_hfgen_here("generate", base, "--prompt", "a handwritten digit 3", "--output_dir", tmp_path / "g")
    assert result.returncode == 2 and "text_encoder/" in result.stderr, result.stderr[-2000:]
