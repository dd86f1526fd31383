"""Render images from a text-to-image pipeline: PNGs per prompt and a grid (one row per prompt).

    hfgen generate outputs/tiny/t2i --prompt "a handwritten digit 3" --num_samples 8 --guidance_scale 3

Used by `hfgen generate`, by the t2i stage's validation grids and by the image evaluation.
"""

from __future__ import annotations

import math
import os
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
# what `save_images` wrote in a dir, the only files a later call there deletes or replaces: it deleted every PNG whose
# name fit SAVED_IMAGE, e.g. a user's 2023-06-beach-1.png in the --output_dir given
IMAGES_MANIFEST = "hfgen_images.json"


def image_names(prompts: list[str], counts: list[int]) -> list[str]:
    """The files `save_images` writes for `counts[i]` images of prompts[i]: NN-prompt-slug-K.png, then grid.png."""
    names = [f"{index:02d}-{slug(prompt)}-{k}.png" for index, (prompt, count) in enumerate(zip(prompts, counts))
             for k in range(count)]  # fmt: skip
    return names + ["grid.png"]


def written_images(output_dir: Path) -> list[str]:
    """The images an earlier `save_images` wrote in `output_dir`, by its manifest (names only: never a path out)."""
    from hfgen import tracking

    listed = tracking.read_json(output_dir / IMAGES_MANIFEST, {})
    listed = listed.get("images", []) if isinstance(listed, dict) else []
    return [name for name in listed if isinstance(name, str) and SAVED_IMAGE.fullmatch(name)]


def foreign_images_problem(output_dir: str | Path, names: list[str], label: str) -> str | None:
    """A dir holding files of the names a render writes that no render wrote there (the user's own): they would be
    replaced. Checked before rendering (`render_images`) and again as it saves."""
    output_dir = Path(output_dir)
    earlier = set(written_images(output_dir))
    foreign = [name for name in names if os.path.lexists(output_dir / name) and name not in earlier]
    if not foreign:
        return None
    shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
    return (
        f"{label} '{output_dir}' holds {shown}, which no hfgen render wrote there (its {IMAGES_MANIFEST} does not "
        "list them), and a render there writes files of those names: give another (or an empty) directory, or move "
        "them out (an earlier hfgen's images, which no list names, you may delete)"
    )


def save_images(rows: list[list], prompts: list[str], output_dir: str | Path, label: str = "output dir") -> list[Path]:
    """PNGs named NN-prompt-slug-K.png, then grid.png (last in the returned list), listed in IMAGES_MANIFEST. The
    images an earlier call wrote in `output_dir` (by its list) are deleted first: a second render with fewer prompts
    or samples would otherwise leave the first's extra images beside its own, as if rendered now. Nothing else is
    deleted, and a file of one of the names that the list does not hold is refused (`foreign_images_problem`)."""
    from hfgen import tracking
    from hfgen.errors import UserError

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    names = image_names(prompts, [len(row) for row in rows])
    if problem := foreign_images_problem(output_dir, names, label):
        raise UserError(problem + ".")
    earlier = written_images(output_dir)
    # listed before any is written (a kill half way leaves none unlisted), the earlier ones all gone before the new
    # ones are written, grid.png last: never an earlier grid beside some of the new images
    tracking.write_json(output_dir / IMAGES_MANIFEST, {"images": sorted(set(earlier) | set(names))})
    for name in earlier:
        (output_dir / name).unlink(missing_ok=True)
    images = [image for row in rows for image in row] + [make_grid(rows)]
    paths = [output_dir / name for name in names]
    for path, image in zip(paths, images):
        image.save(path)
    tracking.write_json(output_dir / IMAGES_MANIFEST, {"images": names})
    return paths


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
    output_dir = output_dir or Path(pipeline_dir) / "generated"
    names = image_names(list(prompts), [num_images] * len(prompts))
    if problem := foreign_images_problem(output_dir, names, "--output_dir"):  # before the render, not after it
        raise UserError(problem + ".")
    pipeline = load_pipeline(pipeline_dir)
    check_inference_steps(pipeline, num_inference_steps)
    if given_guidance is not None and not guidance_applies(pipeline):
        print(guidance_note(pipeline_dir), file=sys.stderr)
    rows = generate_images(
        pipeline, list(prompts), num_images, num_inference_steps, guidance_scale, seed,
        **recorded_call_arguments(pipeline_dir),
    )  # fmt: skip
    return save_images(rows, list(prompts), output_dir, "--output_dir")
