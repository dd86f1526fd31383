"""Render images from a text-to-image pipeline: PNGs per prompt and a grid (one row per prompt).

    hfgen generate outputs/tiny/t2i --prompt "a handwritten digit 3" --num_samples 8 --guidance_scale 3

Used by `hfgen generate`, by the t2i stage's validation grids and by the image evaluation.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

GRID_CELL_MIN = 64  # pixels: small images (e.g. 16x16 digits) are enlarged in the grid so a person can see them


def generator_device(pipeline):
    """Where a pipeline's seeded generators live: its device (CPU while it reads as meta, e.g. parts offloaded)."""
    return pipeline.device if pipeline.device.type != "meta" else "cpu"


def generate_images(
    pipeline, prompts: list[str], num_images: int, num_inference_steps: int, guidance_scale: float, seed: int,
    batch_size: int = 64, **call_arguments,
) -> list[list]:  # fmt: skip
    """`num_images` PIL images for each prompt. Seeded per prompt: a prompt's images do not depend on the others.
    `call_arguments` go to every pipeline call (see `recorded_call_arguments`)."""
    import torch

    images = []
    device = generator_device(pipeline)
    for index, prompt in enumerate(prompts):
        generator = torch.Generator(device=device).manual_seed(seed + index)
        row = []
        for start in range(0, num_images, batch_size):
            count = min(batch_size, num_images - start)
            row += pipeline(
                prompt, num_images_per_prompt=count, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, generator=generator, **call_arguments,
            ).images  # fmt: skip
        images.append(row)
    return images


def guidance_applies(pipeline) -> bool:
    """Whether `guidance_scale` changes a pipeline's samples: not for a Flux pipeline whose transformer is not
    guidance-distilled (Flux.1-schnell-like: no `guidance_embeds`), which FluxPipeline ignores it for (its
    true_cfg_scale is another argument). A scale that had no effect is then not recorded as if applied."""
    config = getattr(getattr(pipeline, "transformer", None), "config", None)
    return not (config is not None and config.get("_class_name") == "FluxTransformer2DModel"
                and not config.get("guidance_embeds"))  # fmt: skip


def guidance_note(pipeline_dir) -> str:
    return (
        f"note: '{pipeline_dir}' is a Flux pipeline whose transformer is not guidance-distilled (no "
        "guidance_embeds): guidance_scale has no effect on its samples and is not recorded"
    )


def check_inference_steps(pipeline, num_inference_steps: int) -> None:
    """A UserError when `num_inference_steps` exceeds the timesteps the pipeline's scheduler was trained with
    (its set_timesteps raises a raw ValueError there)."""
    from hfgen.errors import UserError

    limit = pipeline.scheduler.config.get("num_train_timesteps")
    if limit is not None and num_inference_steps > limit:
        raise UserError(f"--num_inference_steps {num_inference_steps} is more than the {limit} timesteps the "
                        f"pipeline's scheduler ({type(pipeline.scheduler).__name__}) was trained with")  # fmt: skip


def recorded_call_arguments(pipeline_dir: str | Path) -> dict:
    """Pipeline-call arguments a run trained with and its samples need too, from the run's recipe.yaml: a t2i_flow
    run's `max_sequence_length` (the zero T5 tokens of a pipeline without T5), and a text-to-image run's
    `resolution` as height and width (a LoRA run's base renders at its own size otherwise)."""
    from hfgen.diffusion.data import ImageDataArguments
    from hfgen.evaluation.images import recipe_of

    recipe = recipe_of(pipeline_dir)
    length = recipe.get("max_sequence_length")
    arguments = {} if length is None else {"max_sequence_length": length}
    if recipe.get("stage") in ("t2i", "t2i_flow"):
        side = recipe.get("resolution", ImageDataArguments.resolution)
        arguments |= {"height": side, "width": side}
    return arguments


DEFAULT_INFERENCE_STEPS, DEFAULT_GUIDANCE_SCALE = 25, 3.0  # for a pipeline whose recipe does not say


def recorded_sampling(pipeline_dir: str | Path, num_inference_steps: int | None, guidance_scale: float | None):
    """(num_inference_steps, guidance_scale): the ones given, else the run's recipe.yaml's (those its validation
    grids were rendered with), else 25 / 3.0. `hfgen generate` and `hfgen eval` both take them so. A guidance scale
    that is not finite is refused: inf rendered all-black images (NaN pixels cast to 0), which eval scored as a
    model's; nan rendered unguided (classifier-free guidance applies where scale > 1), both with exit 0."""
    from hfgen.errors import UserError
    from hfgen.evaluation.images import recipe_of

    recipe = recipe_of(pipeline_dir)
    if num_inference_steps is None:
        num_inference_steps = recipe.get("num_inference_steps") or DEFAULT_INFERENCE_STEPS
    given = guidance_scale is not None
    if not given:
        guidance_scale = recipe.get("guidance_scale", DEFAULT_GUIDANCE_SCALE)
    if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale)):
        problem = "" if given else f"the recipe of '{pipeline_dir}' has guidance_scale {guidance_scale}; "
        raise UserError(f"{problem}--guidance_scale must be a finite number, got {guidance_scale}.")
    return num_inference_steps, guidance_scale


def make_grid(rows: list[list], cell: int | None = None):
    """One PIL image: row i holds rows[i]'s images side by side, each `cell` pixels square (nearest-neighbour)."""
    from PIL import Image

    width, height = rows[0][0].size
    cell_w = cell or max(width, GRID_CELL_MIN)
    cell_h = round(height * cell_w / width)
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (columns * cell_w, len(rows) * cell_h), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((cell_w, cell_h), Image.NEAREST), (c * cell_w, r * cell_h))
    return grid


def to_images(pixels) -> list:
    """PIL images of a batch of pixel tensors in [-1, 1] (N, C, H, W), one or three channels."""
    import torch
    from PIL import Image

    arrays = ((pixels.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in arrays]


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "prompt"


# the names `save_images` writes: NN-prompt-slug-K.png and grid.png
SAVED_IMAGE = re.compile(r"(\d{2,}-[a-z0-9-]*-\d+|grid)\.png")


def save_images(rows: list[list], prompts: list[str], output_dir: str | Path) -> list[Path]:
    """PNGs named NN-prompt-slug-K.png, then grid.png (last in the returned list). An earlier call's images in
    `output_dir` are deleted first: a second render with fewer prompts or samples would otherwise leave the first's
    extra images beside its own, as if rendered now (other files are left alone)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for old in output_dir.glob("*.png"):
        if SAVED_IMAGE.fullmatch(old.name):
            old.unlink()
    paths = []
    for index, (prompt, row) in enumerate(zip(prompts, rows)):
        for k, image in enumerate(row):
            path = output_dir / f"{index:02d}-{slug(prompt)}-{k}.png"
            image.save(path)
            paths.append(path)
    grid = output_dir / "grid.png"
    make_grid(rows).save(grid)
    return paths + [grid]


def render_images(
    pipeline_dir: str, prompts: list[str], num_images: int = 1, num_inference_steps: int | None = None,
    guidance_scale: float | None = None, seed: int = 0, output_dir: str | None = None,
) -> list[Path]:  # fmt: skip
    """Load the pipeline at `pipeline_dir` (a pipeline dir, or a t2i LoRA run), render `num_images` images per
    prompt, save them as PNGs plus grid.png in `output_dir` (default PIPELINE_DIR/generated); return the paths,
    grid.png last. Unset sampling settings are the run's (`recorded_sampling`), as its validation grids'."""
    from hfgen.diffusion.components import load_pipeline
    from hfgen.errors import UserError

    given_guidance = guidance_scale
    num_inference_steps, guidance_scale = recorded_sampling(pipeline_dir, num_inference_steps, guidance_scale)
    if num_images < 1 or num_inference_steps < 1:
        raise UserError("the number of images and of inference steps must be at least 1.")
    if not prompts:
        raise UserError("give at least one prompt.")
    from hfgen import tracking

    if output_dir and (problem := tracking.path_problem(output_dir, "--output_dir", directory=True)):
        raise UserError(problem + ".")
    pipeline = load_pipeline(pipeline_dir)
    check_inference_steps(pipeline, num_inference_steps)
    if given_guidance is not None and not guidance_applies(pipeline):
        print(guidance_note(pipeline_dir), file=sys.stderr)
    rows = generate_images(
        pipeline, list(prompts), num_images, num_inference_steps, guidance_scale, seed,
        **recorded_call_arguments(pipeline_dir),
    )  # fmt: skip
    return save_images(rows, list(prompts), output_dir or Path(pipeline_dir) / "generated")
