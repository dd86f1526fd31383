"""Aspect-ratio buckets and DreamBooth in both text-to-image stages, end to end on tiny models: the UNet path trains
on the three-ratio digits in buckets (buckets.json, per-bucket adherence in eval.json) and resumes exactly mid-epoch;
the flow path trains in buckets and then learns a DreamBooth subject with prior preservation on it (class images: the
base's samples as it was trained), and the DreamBooth script runs its short case there; the UNet DreamBooth
script's short case generates class images once (cycling the class prompts), reuses them, adds only missing ones."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_t2i_flow import FLOW_LORA_RECIPE, FLOW_RECIPE, TINY, VAE16_RECIPE, flow_overrides

from conftest import REPO, run_hfgen, run_hfgen_here
from diffusion_fixtures import T2I_RECIPE, t2i_overrides
from hfgen import tracking
from hfgen.diffusion.components import load_pipeline
from hfgen.diffusion.rendering import generate_images
from hfgen.errors import UserError
from hfgen.recipe import load_recipe

DIGITS_ASPECT = ["--dataset_name", "embedded:digits-aspect"]
# StableDiffusionPipeline samples sizes divisible by 8 only: at 16x16 pixels ratios would all round to 16x16
UNET_BUCKETS = [*DIGITS_ASPECT, "--aspect_ratio_buckets", "16x16", "24x16", "16x24"]
# the flow path's tiny VAE halves once and its transformer's patches are 2 wide: sides are multiples of 4, so 3:2 at
# about 16x16 pixels is 20x12
FLOW_BUCKETS = [*DIGITS_ASPECT, "--aspect_ratio_buckets", '"1:1"', '"3:2"', '"2:3"']
UNET_SIZES, FLOW_SIZES = ["16x16", "24x16", "16x24"], ["16x16", "20x12", "12x20"]
PRIOR_PRESERVATION_IN_BUCKETS = ["--instance_data_dir", "EMPTY", "--instance_prompt", "a sks digit",
                                 "--with_prior_preservation", "true", "--class_prompt", "a digit",
                                 "--aspect_ratio_buckets", "16x16"]  # fmt: skip
SCRIPT_SHORT_CASE = ["--max_train_steps", "2", "--num_class_images", "4", "--num_inference_steps", "2",
                     "--train_batch_size", "2", "--num_validation_images", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def bucket_runs(configs, vae_dir, tmp_path_factory):
    """4 steps in buckets (3 batches an epoch: step 2's checkpoint is mid-epoch), then the same resumed from it."""
    root = tmp_path_factory.mktemp("buckets")
    common = (
        t2i_overrides(configs, vae_dir, root / "full")
        + UNET_BUCKETS
        + ["--checkpointing_steps", "2", "--checkpoints_total_limit", "2"]
    )
    result = run_hfgen("train", T2I_RECIPE, *common, "--eval_images_per_prompt", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    (root / "resumed").mkdir()
    shutil.copytree(root / "full" / "checkpoint-2", root / "resumed" / "checkpoint-2")
    result = run_hfgen("train", T2I_RECIPE, *common, "--eval_images_per_prompt", "0", "--output_dir", root / "resumed",
                       "--resume_from_checkpoint", "true")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "full", root / "resumed"


@pytest.mark.slow
def test_unet_trains_in_buckets_and_measures_every_bucket(bucket_runs):
    full, _ = bucket_runs
    buckets = tracking.read_json(full / "buckets.json")
    assert list(buckets) == UNET_SIZES and sum(b["images"] for b in buckets.values()) == 64
    assert all(b["batches_per_epoch"] == 1 for b in buckets.values())  # 16 per batch: one full batch per bucket
    results = tracking.read_json(full / "eval.json")
    for size in UNET_SIZES:  # the measure (ink centred and padded to a square) and the earlier centred crop
        for suffix in ("", "_centre_crop"):
            assert 0 <= results[f"quality/prompt_adherence_bucket_{size}{suffix}"] <= 1
            assert results[f"quality/prompt_adherence_bucket_{size}{suffix}_real_images"] > 0.9  # a fair measure
    lowest = min(results[f"quality/prompt_adherence_bucket_{size}"] for size in UNET_SIZES)
    assert results["quality/prompt_adherence_bucket_min"] == lowest
    assert "padded to a black square" in results["eval/bucket_measure"]


@pytest.mark.slow
def test_the_bucket_evaluation_loads_the_saved_pipeline_once(bucket_runs, configs, vae_dir, tmp_path, monkeypatch):
    """The final evaluation loaded the saved pipeline twice (its figures, then the per-bucket adherence): once now,
    with the figures of the two loads."""
    import hfgen.diffusion.components
    from hfgen.diffusion import image_stage
    from hfgen.evaluation.images import bucket_adherence, evaluate_pipeline

    run = tmp_path / "run"
    shutil.copytree(bucket_runs[0], run)
    _, data_args, args = load_recipe(T2I_RECIPE, t2i_overrides(configs, vae_dir, run) + UNET_BUCKETS).configs
    args.eval_images_per_prompt = 1
    loads = []
    monkeypatch.setattr(
        hfgen.diffusion.components, "load_pipeline", lambda *a, **k: loads.append(1) or load_pipeline(*a, **k)
    )
    results = image_stage.evaluate(run, data_args, args, "cpu")
    assert len(loads) == 1  # 2 before
    apart = evaluate_pipeline(str(run), images_per_prompt=1, num_inference_steps=args.num_inference_steps,
                              guidance_scale=args.guidance_scale, seed=args.seed, device="cpu", digits=True)  # fmt: skip
    apart |= bucket_adherence(str(run), [(16, 16), (24, 16), (16, 24)], 1, args.num_inference_steps,
                              args.guidance_scale, args.seed, "cpu")  # fmt: skip
    assert len(loads) == 3 and {k: v for k, v in results.items() if not k.startswith("speed/")} == {
        k: v for k, v in apart.items() if not k.startswith("speed/")
    }


@pytest.mark.slow
def test_unet_bucket_run_resumed_mid_epoch_ends_as_the_uninterrupted_one(bucket_runs):
    full, resumed = bucket_runs
    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(full / weights), load_file(resumed / weights)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    full_losses = [row["loss"] for row in tracking.read_metrics(full)]
    assert [row["loss"] for row in tracking.read_metrics(resumed)] == pytest.approx(full_losses[2:], rel=1e-4)


@pytest.mark.slow
def test_flow_trains_in_buckets_then_learns_a_dreambooth_subject_with_prior_preservation(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    for name, changes in TINY.items():
        (root / name).write_text(json.dumps({**json.loads((REPO / "recipes/tiny" / name).read_text()), **changes}))
    result = run_hfgen("train", VAE16_RECIPE, "--vae_config", root / "vae_digits16.json", "--output_dir", root / "vae",
                       "--max_train_steps", "2", "--checkpointing_steps", "0", "--max_train_samples", "64",
                       "--train_batch_size", "16")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_hfgen("train", FLOW_RECIPE, *flow_overrides(root, root / "vae", root / "base", steps=3), *FLOW_BUCKETS,
                       "--eval_images_per_prompt", "1", "--checkpointing_steps", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tracking.read_json(root / "base" / "buckets.json")) == FLOW_SIZES
    results = tracking.read_json(root / "base" / "eval.json")  # the SD3 pipeline samples every bucket's size
    assert all(0 <= results[f"quality/prompt_adherence_bucket_{size}"] <= 1 for size in FLOW_SIZES)

    instance = root / "instance"
    instance.mkdir()
    sys.path.insert(0, str(REPO / "scripts"))
    from dreambooth_digits import write_instance_images

    write_instance_images(instance, count=3)
    result = run_hfgen("train", FLOW_LORA_RECIPE, "--pretrained_model_name_or_path", root / "base",
                       "--dataset_name", "", "--instance_data_dir", instance, "--instance_prompt", "a sks digit 3",
                       "--with_prior_preservation", "true", "--class_prompt", "a handwritten digit 1",
                       "a handwritten digit 2", "--num_class_images", "3", "--num_inference_steps", "2",
                       "--output_dir", root / "dreambooth", "--max_train_steps", "2", "--train_batch_size", "2",
                       "--checkpointing_steps", "0", "--eval_images_per_prompt", "0",
                       "--num_validation_images", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    class_images = root / "dreambooth" / "class_images"
    rows = [json.loads(line) for line in (class_images / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["a handwritten digit 1", "a handwritten digit 1", "a handwritten digit 2"]
    assert len(list(class_images.glob("*.png"))) == 3
    # They are the base's samples drawn as it was trained: no zero T5 tokens (the recipe's max_sequence_length 0)
    base = load_pipeline(root / "base", device="cpu")
    first = generate_images(base, ["a handwritten digit 1"], 2, 2, 2.0, 42, height=16, width=16, max_sequence_length=0)
    assert np.array_equal(np.asarray(first[0][0]), np.asarray(Image.open(class_images / rows[0]["file_name"])))
    adapter = load_file(root / "dreambooth" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)

    # The DreamBooth script's short case on this path (recipes/tiny/t2i_flow_digits_dreambooth.yaml on this base)
    result = subprocess.run(
        [sys.executable, REPO / "scripts/dreambooth_digits.py", "--path", "flow", "--base", root / "base",
         "--output_dir", root / "script", "--images_per_prompt", "1", "--threads", "1", *SCRIPT_SHORT_CASE],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((root / "script" / "figures.json").read_text())
    assert figures["path"] == "flow" and len(list((root / "script" / "class_images").glob("*.png"))) == 4
    for name in ("base", "with_prior_preservation", "without_prior_preservation"):
        assert 0 <= figures[name]["class_adherence"] <= 1 and 0 <= figures[name]["subject_style"] <= 1


@pytest.fixture(scope="module")
def base_pipeline(configs, vae_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("base")
    result = run_hfgen("train", T2I_RECIPE, *t2i_overrides(configs, vae_dir, output_dir, steps=2),
                       "--eval_images_per_prompt", "0", "--checkpointing_steps", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@pytest.mark.slow
def test_dreambooth_script_short_case_generates_class_images_once_and_adds_missing_ones(base_pipeline, tmp_path):
    short = SCRIPT_SHORT_CASE
    result = subprocess.run(
        [sys.executable, REPO / "scripts/dreambooth_digits.py", "--base", base_pipeline, "--output_dir", tmp_path,
         "--images_per_prompt", "1", "--threads", "1", *short],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("generating 4 class images") == 1  # the run without prior preservation reuses none
    figures = json.loads((tmp_path / "figures.json").read_text())
    for name in ("base", "with_prior_preservation", "without_prior_preservation"):
        assert 0 <= figures[name]["class_adherence"] <= 1 and 0 <= figures[name]["subject_style"] <= 1
    class_images = tmp_path / "class_images"
    first = {p.name: p.stat().st_mtime_ns for p in class_images.glob("*.png")}
    assert len(first) == 4 and "00003-a-handwritten-digit-3.png" in first  # class prompts cycle 0, 1, 2, 3

    # A later run wanting 6 generates the 2 missing ones only, with the next class prompts.
    result = run_hfgen("train", REPO / "recipes/tiny/t2i_digits_dreambooth.yaml", "--pretrained_model_name_or_path",
                       base_pipeline, "--instance_data_dir", tmp_path / "instance", "--class_data_dir", class_images,
                       "--output_dir", tmp_path / "more", *short, "--num_class_images", "6")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    now = {p.name: p.stat().st_mtime_ns for p in class_images.glob("*.png")}
    assert len(now) == 6 and all(now[name] == first[name] for name in first)
    assert "00005-a-handwritten-digit-5.png" in now


def test_class_image_generation_killed_midway_ends_with_the_uninterrupted_images(base_pipeline, tmp_path):
    """Killed after class image 2 of 5 (two class prompts, so 1 is still missing then): the next run generates
    exactly the missing numbers, each from its own seed, and trains on the images an uninterrupted run has."""
    sys.path.insert(0, str(REPO / "scripts"))
    from dreambooth_digits import write_instance_images

    write_instance_images(tmp_path / "instance", count=2)
    common = ["train", REPO / "recipes/tiny/t2i_digits_dreambooth.yaml", "--pretrained_model_name_or_path",
              base_pipeline, "--instance_data_dir", tmp_path / "instance", "--class_prompt", "a handwritten digit 1",
              "a handwritten digit 2", "--num_class_images", "5", "--num_inference_steps", "2", "--max_train_steps",
              "1", "--train_batch_size", "2", "--num_validation_images", "1"]  # fmt: skip
    whole = run_hfgen(*common, "--output_dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run_hfgen(*common, "--output_dir", tmp_path / "killed", env={"HFGEN_KILL_AT": "class_image@2"})
    assert killed.returncode == -9
    done = sorted(p.name for p in (tmp_path / "killed/class_images").iterdir())
    assert done == ["00000-a-handwritten-digit-1.png", "00002-a-handwritten-digit-1.png", "metadata.jsonl"]
    resumed = run_hfgen(*common, "--output_dir", tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "generating 3 class images" in resumed.stdout
    images = {run: sorted((tmp_path / run / "class_images").glob("*.png")) for run in ("whole", "killed")}
    assert [p.name for p in images["whole"]] == [p.name for p in images["killed"]] and len(images["whole"]) == 5
    for ours, theirs in zip(images["killed"], images["whole"]):  # batched differently: float noise at most
        difference = np.abs(np.asarray(Image.open(ours), int) - np.asarray(Image.open(theirs), int))
        assert difference.max() <= 2, ours.name
    rows = (tmp_path / "killed/class_images/metadata.jsonl").read_text().splitlines()
    assert sorted(json.loads(row)["file_name"] for row in rows) == [p.name for p in images["whole"]]


def test_class_images_of_another_base_pipeline_are_named_at_check(base_pipeline, configs, vae_dir, tmp_path):
    """A rerun after the base was retrained in place trained prior preservation on the old base's class images
    without a word (probe 39 C6): they record what generated them (the base's fingerprint, steps, guidance)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from dreambooth_digits import write_instance_images

    write_instance_images(tmp_path / "instance", count=2)
    base = tmp_path / "base"
    shutil.copytree(base_pipeline, base)  # the same run at another path: the same pipeline
    common = ["train", REPO / "recipes/tiny/t2i_digits_dreambooth.yaml", "--pretrained_model_name_or_path", base,
              "--instance_data_dir", tmp_path / "instance", "--num_class_images", "2", "--num_inference_steps", "2",
              "--max_train_steps", "1", "--train_batch_size", "2", "--num_validation_images", "1",
              "--validation_prompts", "[]", "--eval_images_per_prompt", "0", "--output_dir", tmp_path / "run",
              "--overwrite_output_dir", "true"]  # fmt: skip
    first = run_hfgen_here(*common)
    assert first.returncode == 0 and "generating 2 class images" in first.stdout, first.stderr[-3000:]
    stale = "holds 2 class image(s) (e.g. '00000-"
    other_sampling = run_hfgen_here(*common, "--guidance_scale", "5.0")
    assert other_sampling.returncode == 2 and stale in other_sampling.stderr, other_sampling.stderr[-3000:]
    retrained = run_hfgen_here("train", T2I_RECIPE, *t2i_overrides(configs, vae_dir, base, steps=2),
                               "--eval_images_per_prompt", "0", "--checkpointing_steps", "0",
                               "--overwrite_output_dir", "true", "--seed", "3")  # fmt: skip
    assert retrained.returncode == 0, retrained.stderr[-3000:]
    again = run_hfgen_here(*common)
    assert again.returncode == 2 and stale in again.stderr and "another base pipeline" in again.stderr


def test_class_images_come_from_the_base_as_it_samples_not_with_the_recipe_s_prediction_type(base_pipeline, tmp_path):
    """The base's UNet predicts noise: class images sampled with the run's v_prediction sampler would be noise
    read as velocity. They come from the base's own sampler, so they are the ones a run without the change makes."""
    sys.path.insert(0, str(REPO / "scripts"))
    from dreambooth_digits import write_instance_images

    write_instance_images(tmp_path / "instance", count=2)
    common = ["train", REPO / "recipes/tiny/t2i_digits_dreambooth.yaml", "--pretrained_model_name_or_path",
              base_pipeline, "--instance_data_dir", tmp_path / "instance", "--num_class_images", "2",
              "--num_inference_steps", "2", "--max_train_steps", "1", "--train_batch_size", "2",
              "--num_validation_images", "1", "--validation_prompts", "[]", "--eval_images_per_prompt", "0"]  # fmt: skip
    for name, change in (("base", []), ("v", ["--prediction_type", "v_prediction"])):
        result = run_hfgen(*common, *change, "--output_dir", tmp_path / name)
        assert result.returncode == 0, result.stderr[-3000:]
    images = {run: sorted((tmp_path / run / "class_images").glob("*.png")) for run in ("base", "v")}
    assert len(images["v"]) == 2
    for ours, theirs in zip(images["v"], images["base"]):
        assert np.array_equal(np.asarray(Image.open(ours)), np.asarray(Image.open(theirs))), ours.name


@pytest.mark.parametrize(
    "change, expected",
    [
        (["--instance_data_dir", "MISSING"], "is not a directory"),
        (["--instance_data_dir", "EMPTY", "--instance_prompt", "a sks digit"], "holds no images"),
        (["--instance_data_dir", "EMPTY"], "needs instance_prompt"),
        (["--with_prior_preservation", "true"], "need(s) instance_data_dir"),
        (["--aspect_ratio_buckets", "wide"], "neither ratios"),
        # a ratio unquoted in a list is the ratio (YAML 1.1 read 4:3 as the base-60 243, which was refused as a
        # number): only the number is named
        (["--aspect_ratio_buckets", "[4:3, 243]"], r"\['243'\] are neither ratios"),
        (PRIOR_PRESERVATION_IN_BUCKETS, "aspect_ratio_buckets with with_prior_preservation is not supported"),
    ],
)
def test_bad_dreambooth_and_bucket_keys_are_named_before_training(tmp_path, change, expected):
    (tmp_path / "empty").mkdir()
    paths = {"MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty")}
    change = [paths.get(c, c) for c in change]
    dataset = [] if "--instance_data_dir" not in change else ["--dataset_name", ""]
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(T2I_RECIPE, overrides=[*dataset, *change, "--output_dir", str(tmp_path / "out")])


def test_dreambooth_gpu_recipe_parses_with_its_features():
    model_args, data_args, args = load_recipe(
        REPO / "recipes/sd-3.5-medium/lora_dreambooth.yaml", check_inputs=False
    ).configs
    assert model_args.pretrained_model_name_or_path == "stabilityai/stable-diffusion-3.5-medium" and model_args.drop_t5
    assert args.use_lora and args.with_prior_preservation and "sks" in args.instance_prompt and args.class_prompt
    assert args.mixed_precision == "bf16" and args.gradient_checkpointing and data_args.resolution == 1024


def test_flux_sides_off_its_packing_are_named_at_check(tmp_path):
    """A Flux pipeline's sides must be multiples of its VAE's downsampling x its 2x2 latent packing (16 for
    FLUX.1's 8x VAE): found from the configs alone (empty weights files here), before anything loads."""
    configs = {"model_index.json": {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]},
               "transformer/config.json": {"_class_name": "FluxTransformer2DModel", "patch_size": 1},
               "vae/config.json": {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512]}}  # fmt: skip
    for name, config in configs.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(json.dumps(config))
    for component in ("transformer", "vae"):  # (a component without a weights file is refused at the check itself)
        save_file({}, tmp_path / component / "diffusion_pytorch_model.safetensors")
    flux = ["--pretrained_model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    load_recipe(FLOW_LORA_RECIPE, overrides=[*flux, "--resolution", "32", *DIGITS_ASPECT, "--aspect_ratio_buckets",
                                             "32x32", "48x32", '"3:2"'])  # fmt: skip
    with pytest.raises(UserError, match=r"aspect_ratio_buckets: sizes \['40x32'\] are not multiples of 16.*Flux"):
        load_recipe(FLOW_LORA_RECIPE, overrides=[*flux, "--resolution", "32", "--aspect_ratio_buckets", "40x32"])
    result = run_hfgen_here("check", FLOW_LORA_RECIPE, *flux, "--resolution", "24")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "resolution 24 is not a multiple of 16" in result.stderr and "Flux's 2x2 latent packing" in result.stderr


def test_class_images_of_another_class_prompt_or_resolution_are_named_at_check(tmp_path):
    """A second run into the same class_data_dir with another class_prompt and resolution counted the first run's
    class images as present and trained prior preservation on them ('a red square' at 16x16) without a word."""
    (tmp_path / "instance").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "instance" / "0.png")
    class_dir = tmp_path / "class_images"
    class_dir.mkdir()
    for number in range(2):
        name = f"{number:05d}-a-red-square.png"
        Image.new("RGB", (16, 16), (255, 0, 0)).save(class_dir / name)
        with (class_dir / "metadata.jsonl").open("a") as metadata:
            metadata.write(json.dumps({"file_name": name, "text": "a red square"}) + "\n")
    common = ["--dataset_name", "", "--instance_data_dir", str(tmp_path / "instance"), "--instance_prompt", "a sks",
              "--with_prior_preservation", "true", "--num_class_images", "2", "--class_data_dir", str(class_dir),
              "--output_dir", str(tmp_path / "out")]  # fmt: skip
    same = [*common, "--class_prompt", "a red square", "--resolution", "16"]
    for change in (["--class_prompt", "a blue circle", "--resolution", "16"], ["--class_prompt", "a red square",
                   "--resolution", "24"]):  # fmt: skip
        with pytest.raises(UserError, match="class_data_dir .* holds 2 class image.* generated for another"):
            load_recipe(T2I_RECIPE, overrides=[*common, *change])
    try:
        load_recipe(T2I_RECIPE, overrides=same)
    except UserError as error:  # (other keys of this bare recipe may be refused, not the class images)
        assert "class_data_dir" not in str(error), error


def test_class_images_sampled_with_another_t5_length_are_named_at_check(tmp_path):
    """t2i_flow's class images are sampled with the recipe's max_sequence_length (the T5 prompt length), which their
    source did not record: a run with 77 reused the images sampled with 0, other conditioning, without a word
    (probe 43 I5); and the refusal named the base as 'the base'."""
    from hfgen.diffusion.dreambooth import class_image_source

    base = tmp_path / "base"
    base.mkdir()
    (base / "model_index.json").write_text("{}")
    (tmp_path / "instance").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "instance" / "0.png")
    class_dir = tmp_path / "class_images"
    class_dir.mkdir()
    source = class_image_source(str(base), 2, 2.0, max_sequence_length=0)
    for number in range(2):
        name = f"{number:05d}-a-digit.png"
        Image.new("RGB", (16, 16)).save(class_dir / name)
        with (class_dir / "metadata.jsonl").open("a") as metadata:
            metadata.write(json.dumps({"file_name": name, "text": "a digit", "source": source}) + "\n")
    common = ["--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(tmp_path / "instance"),
              "--class_prompt", "a digit", "--num_class_images", "2", "--class_data_dir", str(class_dir),
              "--num_inference_steps", "2", "--guidance_scale", "2.0", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    recipe = REPO / "recipes/tiny/t2i_flow_digits_dreambooth.yaml"
    with pytest.raises(UserError, match="generated by another base pipeline or sampling") as refused:
        load_recipe(recipe, overrides=[*common, "--max_sequence_length", "77"])
    assert f"pretrained_model_name_or_path '{base}'" in str(refused.value)
    try:
        load_recipe(recipe, overrides=[*common, "--max_sequence_length", "0"])
    except UserError as error:  # (the bare base is refused for what it lacks, not the class images)
        assert "class_data_dir" not in str(error), error


def test_a_class_data_dir_short_of_images_on_a_read_only_disk_is_refused_at_the_check(tmp_path, read_only_disk):
    """A class_data_dir on a read-only disk, short of num_class_images: `hfgen check` passed, train loaded the
    pipeline and then failed writing the first class image, with advice about an output path (probe 41 I6). Refused
    by the check naming class_data_dir; a complete folder is only read, and passes."""
    from hfgen.diffusion.dreambooth import DreamBoothArguments, class_image_problems

    disk = read_only_disk
    complete = tmp_path / "complete"
    complete.mkdir()
    for number in range(2):  # (a user's own images count towards num_class_images)
        Image.new("RGB", (8, 8)).save(complete / f"mine-{number}.png")
    args = DreamBoothArguments(instance_data_dir="inst", instance_prompt="a sks dog", with_prior_preservation=True,
                               class_prompt=["a dog"], num_class_images=2)  # fmt: skip
    (problem,) = class_image_problems(args, disk / "cls", 8)
    assert f"class_data_dir '{disk / 'cls'}' holds 0 of the 2 class images" in problem
    assert f"cannot be written to '{disk}'" in problem and "lower num_class_images" in problem
    assert class_image_problems(args, complete, 8) == []
