"""Image metrics for text-to-image pipelines: quality (prompt adherence, Fréchet distance), diversity, speed.

Everything is fixed and offline, so figures from different runs compare:
  digit classifier   an RBF support-vector classifier (scikit-learn SVC, C=10) on the 64 pixels of the real 8x8
                     scikit-learn digits, trained on a random 75% of them (seed 0). It never sees the diffusion
                     model; its accuracy on the other 25% is reported beside every adherence figure.
  prompt adherence   the share of images generated for "a handwritten digit k" that the classifier labels k,
                     averaged over k = 0..9. Images are brought to the classifier's form: grayscale, 8x8 by area
                     averaging. The real held-out digits passed through the same resize path give the ceiling.
  feature space      PCA (16 components) of all 1,797 real 8x8 digits: `frechet_distance` (FID's formula) between
                     generated and real digits is computed there, with two halves of the real digits as the floor.
  diversity          mean pairwise RMS pixel distance (pixels in [0, 1]) among one prompt's images, averaged over
                     prompts, beside the same figure for real images of the same digit.
  speed              images/s of the pipeline call, after a warm-up call.
  aspect-ratio buckets  adherence in every bucket (`bucket_adherence`): each sample's ink is cut to its bounding
                     box, centred and padded to a black square (MNIST's normalisation: it undoes where and how large
                     the digit sits on a non-square canvas, not its shape), then 8x8; classified by the same SVC
                     trained on real digits normalised the same way (`normalised_digit_classifier`), beside real
                     digits through the bucket's data path.

`evaluate_pipeline(pipeline_dir)` is what `hfgen eval PIPELINE_DIR` and the t2i stage call. For pipelines not
trained on `embedded:digits` it reports diversity (on 32x32 thumbnails) and speed only.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import numpy as np

DIGIT_PROMPT = "a handwritten digit {k}"
CLASSIFIER_SEED = 0
CLASSIFIER_TEST_FRACTION = 0.25
FEATURE_COMPONENTS = 16
GENERIC_PROMPTS = ("a photo of a cat", "a red car on a street", "a bowl of fruit", "a mountain lake at sunrise")
THUMBNAIL = 32  # pixels: diversity of non-digit images is measured on thumbnails this size


# ---- the fixed references: real digits, classifier, feature space --------------------------------------


@functools.lru_cache(maxsize=1)
def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 scikit-learn digits as (N, 64) pixels in [0, 1] (ink is bright) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def digit_classifier():
    """(classifier, held-out accuracy, held-out pixels, held-out labels): SVC on a random 75% of the real digits."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    pixels, labels = real_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        pixels, labels, test_size=CLASSIFIER_TEST_FRACTION, random_state=CLASSIFIER_SEED, stratify=labels
    )
    classifier = SVC(C=10.0).fit(x_train, y_train)
    return classifier, float(classifier.score(x_test, y_test)), x_test, y_test


@functools.lru_cache(maxsize=1)
def digit_feature_space():
    """PCA of the real 8x8 digits: the fixed feature space of `digit_features`."""
    from sklearn.decomposition import PCA

    return PCA(n_components=FEATURE_COMPONENTS, random_state=0).fit(real_digits()[0])


def digit_features(pixels: np.ndarray) -> np.ndarray:
    return digit_feature_space().transform(pixels)


def to_digit_pixels(images) -> np.ndarray:
    """PIL images -> (N, 64) in [0, 1]: grayscale, then 8x8 by area averaging (the inverse of an upscale)."""
    from PIL import Image

    return np.stack(
        [np.asarray(image.convert("L").resize((8, 8), Image.BOX), dtype=np.float32).ravel() / 255.0 for image in images]
    )


def thumbnails(images, size: int = THUMBNAIL) -> np.ndarray:
    from PIL import Image

    return np.stack(
        [
            np.asarray(image.convert("RGB").resize((size, size), Image.BOX), dtype=np.float32).ravel() / 255.0
            for image in images
        ]
    )


def as_pipeline_sees(pixels: np.ndarray, resolution: int) -> np.ndarray:
    """Real 8x8 digits through the training data's path (upscaled like embedded:digits, resized to `resolution`)
    and back to 8x8: what a perfect generator at that resolution would hand the classifier."""
    from hfgen.diffusion.data import resize_and_crop

    images = [resize_and_crop(real_digit_image(row).convert("RGB"), resolution, center_crop=True) for row in pixels]
    return to_digit_pixels(images)


# ---- metrics ------------------------------------------------------------------------------------------


def prompt_adherence(pixels_by_digit: dict[int, np.ndarray], classifier=None) -> tuple[float, dict[int, float]]:
    """(mean over digits, per digit) share of images the classifier (default `digit_classifier`'s) labels as the
    digit they were prompted for."""
    classifier = classifier or digit_classifier()[0]
    per_digit = {k: float((classifier.predict(pixels) == k).mean()) for k, pixels in pixels_by_digit.items()}
    return float(np.mean(list(per_digit.values()))), per_digit


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula):
    |mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2)). The last trace is computed as the sum of square
    roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), a symmetric matrix: stable where sqrtm(S_a S_b) is not."""
    mu_a, mu_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(cov_a)
    root_a = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    trace_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    distance = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_covmean)
    return max(distance, 0.0)  # rounding can leave a tiny negative for identical sets


def mean_pairwise_distance(pixels: np.ndarray) -> float:
    """Mean RMS distance between all pairs of rows (pixels in [0, 1]): 0 when all images are identical."""
    if len(pixels) < 2:
        return 0.0
    x = pixels.astype(np.float64)
    squared = (x**2).sum(1)
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * x @ x.T, 0.0) / x.shape[1])
    upper = np.triu_indices(len(x), k=1)
    return float(distances[upper].mean())


# ---- a whole pipeline ---------------------------------------------------------------------------------


def recipe_of(pipeline_dir: str | Path) -> dict:
    """The recipe of the run that wrote `pipeline_dir` (its recipe.yaml; for `hfgen merge`'s output of a LoRA run,
    the run's, kept in merged_from.json), or {} for a pipeline from elsewhere."""
    import json

    import yaml

    recipe, merged_from = Path(pipeline_dir) / "recipe.yaml", Path(pipeline_dir) / "merged_from.json"
    if recipe.is_file():
        return yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    return json.loads(merged_from.read_text(encoding="utf-8")).get("recipe") or {} if merged_from.is_file() else {}


def recorded_seed(recipe: dict) -> int:
    """The seed a t2i run's own evaluation used (its recipe's `seed`, else the stage's default), so that `hfgen eval`
    of the run measures, and merges into its eval.json, the figures the run measured; 0 for a pipeline from
    elsewhere (no recipe)."""
    from hfgen.diffusion.training import LoopArguments

    if not recipe:
        return 0
    return int(recipe.get("seed", LoopArguments.seed))


def evaluate_pipeline(
    pipeline_dir: str, prompts: list[str] | None = None, images_per_prompt: int | None = None,
    num_inference_steps: int | None = None, guidance_scale: float | None = None, seed: int | None = None,
    device: str | None = None, quiet: bool = False, digits: bool | None = None, samples_dir: str | None = None,
    pipeline=None,
) -> dict:  # fmt: skip
    """Generate `images_per_prompt` images per prompt and measure them; a flat dict of `quality/`, `diversity/`,
    `speed/` figures and the `eval/` settings. Digit prompts (and digit metrics) when the pipeline was trained on
    embedded:digits (or `digits=True`); else `prompts`, the run's validation_prompts, or a few generic ones.
    `samples_dir` also saves the images. Unset sampling settings come from the t2i run's recipe.yaml
    (eval_images_per_prompt, num_inference_steps, guidance_scale), else 20 / 25 / 3.0, and an unset `seed` is the
    one the run's own evaluation used (`recorded_seed`). Diversity needs two images per prompt: with one it is None.
    `quiet` is accepted for `hfgen eval` (progress bars are always off). `pipeline`: the one
    `load_pipeline(pipeline_dir, device)` gives, when the caller has loaded it already."""
    from hfgen.diffusion.components import load_pipeline
    from hfgen.diffusion.data import DIGIT_DATASETS
    from hfgen.diffusion.rendering import (
        check_inference_steps,
        generate_images,
        guidance_applies,
        guidance_note,
        recorded_call_arguments,
        recorded_sampling,
        save_images,
    )
    from hfgen.errors import UserError

    for name, value in (("images_per_prompt", images_per_prompt), ("num_inference_steps", num_inference_steps)):
        if value is not None and value < 1:  # (0 would otherwise read as unset: the default)
            raise UserError(f"hfgen eval: --{name} must be at least 1, got {value}.")
    recipe = recipe_of(pipeline_dir)
    images_per_prompt = images_per_prompt or recipe.get("eval_images_per_prompt") or 20
    seed = recorded_seed(recipe) if seed is None else seed
    given_guidance = guidance_scale
    num_inference_steps, guidance_scale = recorded_sampling(pipeline_dir, num_inference_steps, guidance_scale)
    digits = recipe.get("dataset_name") in DIGIT_DATASETS if digits is None else digits
    if digits:
        prompts = [DIGIT_PROMPT.format(k=k) for k in range(10)]
    recorded_prompts = recipe.get("validation_prompts")
    if isinstance(recorded_prompts, str):
        # recipe.yaml keeps a list key's single value as it was given (`--validation_prompts "a sks dog"`, or
        # `validation_prompts: a sks dog` in the recipe): one prompt, which list() would split into its characters
        recorded_prompts = [recorded_prompts]
    prompts = list(prompts or recorded_prompts or GENERIC_PROMPTS)
    pipeline = pipeline or load_pipeline(pipeline_dir, device=device)
    check_inference_steps(pipeline, num_inference_steps)
    call_arguments = recorded_call_arguments(pipeline_dir)
    recorded_guidance = guidance_scale
    if not guidance_applies(pipeline):  # (Flux without guidance_embeds ignores it: not recorded as if applied)
        if given_guidance is not None:
            print(guidance_note(pipeline_dir), file=sys.stderr)
        recorded_guidance = None

    def render():
        return generate_images(
            pipeline, prompts, images_per_prompt, num_inference_steps, guidance_scale, seed, **call_arguments
        )

    # warm-up: first-call allocations
    generate_images(pipeline, prompts[:1], 1, 2, guidance_scale, seed, **call_arguments)
    started = time.perf_counter()
    rows = render()
    elapsed = time.perf_counter() - started
    if samples_dir:
        save_images(rows, prompts, samples_dir)

    results = {
        "eval/images_per_prompt": images_per_prompt,
        "eval/num_prompts": len(prompts),
        "eval/num_inference_steps": num_inference_steps,
        "eval/guidance_scale": recorded_guidance,
        "eval/sampler": type(pipeline.scheduler).__name__,
        "eval/seed": seed,
        "speed/images_per_s": len(prompts) * images_per_prompt / elapsed,
    }
    if not digits:
        results["diversity/pairwise_distance"] = float(
            np.mean([mean_pairwise_distance(thumbnails(row)) for row in rows])
        )
    else:
        results |= digit_metrics([to_digit_pixels(row) for row in rows], rows[0][0].size[0])
    if images_per_prompt < 2:  # no pair to measure (was reported as 0: no diversity at all)
        results |= {key: None for key in results if key.startswith("diversity/") and not key.endswith("_real")}
    return results


def digit_metrics(pixels_by_prompt: list[np.ndarray], resolution: int) -> dict:
    """Adherence, Fréchet distance and diversity of generated digits, pixels_by_prompt[k] for digit k, each beside
    its reference figure: what a perfect generator at `resolution` scores, real digits through the path the
    generated images take (`as_pipeline_sees`: the upscale, resize and 8x8 box-averaging smooth every image, which
    lowers pairwise distances and moves the features, so raw real digits are no reference)."""
    _, accuracy, held_out, held_out_labels = digit_classifier()
    real_pixels, real_labels = real_digits()
    adherence, per_digit = prompt_adherence(dict(enumerate(pixels_by_prompt)))
    ceiling, _ = prompt_adherence(
        {k: as_pipeline_sees(held_out[held_out_labels == k], resolution) for k in range(len(pixels_by_prompt))}
    )
    # Fréchet distance is biased by the set's size (10 images score far above 200 of the same kind): the reference
    # is as many real digits per prompt as were generated, drawn from one half of the real digits, and both sets
    # are compared with the other half (images the reference set does not hold)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(real_pixels))
    drawn_from, compared_with = order[: len(order) // 2], real_pixels[order[len(order) // 2 :]]
    perfect = []
    for k, generated_k in enumerate(pixels_by_prompt):
        pool = drawn_from[real_labels[drawn_from] == k]
        picked = rng.choice(pool, len(generated_k), replace=len(generated_k) > len(pool))
        perfect.append(as_pipeline_sees(real_pixels[picked], resolution))
    reference_features = digit_features(compared_with)
    results = {
        "quality/prompt_adherence": adherence,
        **{f"quality/prompt_adherence_{k}": v for k, v in per_digit.items()},
        "quality/prompt_adherence_real_images": ceiling,
        "quality/classifier_heldout_accuracy": accuracy,
        "quality/frechet_distance": frechet_distance(
            digit_features(np.concatenate(pixels_by_prompt)), reference_features
        ),
        "quality/frechet_distance_real_images": frechet_distance(
            digit_features(np.concatenate(perfect)), reference_features
        ),
        "diversity/pairwise_distance": float(np.mean([mean_pairwise_distance(p) for p in pixels_by_prompt])),
        # (all the real digits of each prompt: a mean over pairs does not depend on their number)
        "diversity/pairwise_distance_real": float(
            np.mean(
                [
                    mean_pairwise_distance(as_pipeline_sees(real_pixels[real_labels == k], resolution))
                    for k in range(len(pixels_by_prompt))
                ]
            )
        ),
    }
    results["diversity/pairwise_distance_ratio"] = (
        results["diversity/pairwise_distance"] / results["diversity/pairwise_distance_real"]
    )
    return results


# ---- aspect-ratio buckets -----------------------------------------------------------------------------

INK_THRESHOLD = 0.2  # share of an image's brightest pixel from which a pixel counts as ink (the digit's box)
BUCKET_MEASURE = (
    "each sample's ink (pixels >= 0.2 of its brightest) cut to its bounding box, centred and padded to a black "
    "square, then 8x8 by area averaging; classified by an SVC trained on real digits normalised the same way"
)


def centred_on_square(image):
    """The image's ink cut to its bounding box and centred on a black square of the box's longer side (grayscale):
    MNIST's size-and-position normalisation. It undoes where and how large a digit sits on its canvas, never its
    shape (a stretched digit stays stretched). An image without ink is padded whole."""
    from PIL import Image

    gray = image.convert("L")
    pixels = np.asarray(gray, dtype=np.float32)
    ink = pixels >= INK_THRESHOLD * pixels.max() if pixels.max() > 0 else np.ones_like(pixels, dtype=bool)
    rows, columns = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    box = gray.crop((columns[0], rows[0], columns[-1] + 1, rows[-1] + 1))
    side = max(box.size)
    canvas = Image.new("L", (side, side))
    canvas.paste(box, ((side - box.width) // 2, (side - box.height) // 2))
    return canvas


def centre_crop(image):
    """The centred square of the image's shorter side (the earlier bucket measure, kept for comparison: it fits
    digits centred on a canvas of the bucket's ratio, as embedded:digits-aspect's, and nothing else)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def to_normalised_digit_pixels(images) -> np.ndarray:
    """PIL images -> (N, 64) in [0, 1], each `centred_on_square` then 8x8 by area averaging."""
    return to_digit_pixels([centred_on_square(image) for image in images])


def real_digit_image(row: np.ndarray):
    """One real 8x8 digit (64 pixels in [0, 1]) as embedded:digits renders it: upscaled to 32x32, bilinear."""
    from PIL import Image

    from hfgen.diffusion.data import DIGITS_SIZE

    digit = Image.fromarray((row.reshape(8, 8) * 255).round().astype(np.uint8), mode="L")
    return digit.resize((DIGITS_SIZE, DIGITS_SIZE), Image.BILINEAR)


@functools.lru_cache(maxsize=1)
def normalised_digit_classifier():
    """(classifier, held-out accuracy): `digit_classifier`'s SVC, split and held-out digits, on real digits through
    `to_normalised_digit_pixels`, so it takes the bucket measure's form."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    pixels, labels = real_digits()
    normalised = to_normalised_digit_pixels([real_digit_image(row) for row in pixels])
    x_train, x_test, y_train, y_test = train_test_split(
        normalised, labels, test_size=CLASSIFIER_TEST_FRACTION, random_state=CLASSIFIER_SEED, stratify=labels
    )
    classifier = SVC(C=10.0).fit(x_train, y_train)
    return classifier, float(classifier.score(x_test, y_test))


def in_bucket(pixels: np.ndarray, size: tuple[int, int]) -> list:
    """Real 8x8 digits through embedded:digits-aspect's path into a bucket of `size` (width, height): centred on
    the canvas of the nearest ratio, then fitted to the bucket as training fits it. What a perfect generator in that
    bucket would draw."""
    from PIL import Image

    from hfgen.diffusion.buckets import nearest_bucket
    from hfgen.diffusion.data import DIGITS_ASPECT_CANVASES, fit

    canvas_size = DIGITS_ASPECT_CANVASES[nearest_bucket(size, list(DIGITS_ASPECT_CANVASES))]
    images = []
    for row in pixels:
        digit, canvas = real_digit_image(row), Image.new("L", canvas_size)
        canvas.paste(digit, ((canvas.width - digit.width) // 2, (canvas.height - digit.height) // 2))
        images.append(fit(canvas, size, center_crop=True)[0])
    return images


def bucket_adherence_of(images_by_digit: list[list], size: tuple[int, int]) -> dict:
    """eval.json's figures for one bucket from images_by_digit[k] (drawn for digit k at `size`), each beside real
    held-out digits through the bucket's path (`_real_images`): `_bucket_WxH` by the bucket measure
    (BUCKET_MEASURE), `_bucket_WxH_centre_crop` by the earlier centred square on the plain classifier."""
    classifier = normalised_digit_classifier()[0]
    _, _, held_out, held_out_labels = digit_classifier()
    real = [in_bucket(held_out[held_out_labels == k], size) for k in range(len(images_by_digit))]
    name = f"quality/prompt_adherence_bucket_{size[0]}x{size[1]}"
    results = {}
    for source, suffix in ((images_by_digit, ""), (real, "_real_images")):
        normalised = {k: to_normalised_digit_pixels(images) for k, images in enumerate(source)}
        cropped = {k: to_digit_pixels([centre_crop(image) for image in images]) for k, images in enumerate(source)}
        results[name + suffix] = prompt_adherence(normalised, classifier)[0]
        results[name + "_centre_crop" + suffix] = prompt_adherence(cropped)[0]
    return results


def bucket_adherence(
    pipeline_dir: str, sizes: list[tuple[int, int]], images_per_prompt: int, num_inference_steps: int,
    guidance_scale: float, seed: int, device: str | None = None, pipeline=None,
) -> dict:  # fmt: skip
    """Prompt adherence of digits generated at each bucket's size (width x height) by the bucket measure
    (`bucket_adherence_of`), the lowest over the buckets, and the measure's classifier and description. `pipeline`:
    as in `evaluate_pipeline`."""
    from hfgen.diffusion.components import load_pipeline
    from hfgen.diffusion.rendering import generate_images, recorded_call_arguments

    pipeline = pipeline or load_pipeline(pipeline_dir, device=device)
    call_arguments = recorded_call_arguments(pipeline_dir)
    prompts = [DIGIT_PROMPT.format(k=k) for k in range(10)]
    results = {}
    for width, height in sizes:
        rows = generate_images(pipeline, prompts, images_per_prompt, num_inference_steps, guidance_scale, seed,
                               **(call_arguments | {"height": height, "width": width}))  # fmt: skip
        results |= bucket_adherence_of(rows, (width, height))
    results["quality/prompt_adherence_bucket_min"] = min(
        results[f"quality/prompt_adherence_bucket_{w}x{h}"] for w, h in sizes
    )
    results["quality/bucket_classifier_heldout_accuracy"] = normalised_digit_classifier()[1]
    return results | {"eval/bucket_measure": BUCKET_MEASURE}
