"""Image data for the diffusion stages: image-caption datasets in, normalised tensors out, checked before training.

Sources: a hub dataset id (e.g. lambdalabs/naruto-blip-captions), a local `imagefolder` dir (images plus a
metadata.jsonl with `file_name` and caption fields), a saved dataset dir, or `embedded:digits`: scikit-learn's
bundled 1,797 handwritten digits (8x8, no download), upscaled to 32x32, each with one of several caption
wordings ("a handwritten digit 7", "the digit seven, handwritten", ...). `embedded:digits-aspect` holds the same
digits at three aspect ratios (1:1 32x32, 3:2 48x32, 2:3 32x48: the 32x32 digit centred on a black canvas, the
ratio cycling with the row), for aspect-ratio buckets (hfgen.diffusion.buckets).

`check_image_data` finds problems before any model is built: missing columns, empty captions, and images that do
not decode (a missing file named in metadata.jsonl, a truncated PNG), reading up to ROWS_CHECKED images. A bad
image met later still stops the run with a UserError naming it, never a traceback mid-training.
"""

from __future__ import annotations

import functools
import io
import random
from dataclasses import dataclass, field
from pathlib import Path

from hfgen.data.loading import (
    ROWS_CHECKED,
    DataArguments,
    column_problems,
    load_raw,
    load_splits_for_check,
    split_dataset,
)
from hfgen.errors import UserError

DIGITS = "embedded:digits"
DIGITS_ASPECT = "embedded:digits-aspect"
DIGIT_DATASETS = (DIGITS, DIGITS_ASPECT)  # evaluated with the digit classifier
DIGITS_ASPECT_CANVASES = ((32, 32), (48, 32), (32, 48))  # (width, height): 1:1, 3:2, 2:3
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Several wordings, so the text encoder sees "7" and "seven" in different sentences; the evaluation prompt
# ("a handwritten digit k", the first) is one of them.
DIGIT_CAPTIONS = (
    "a handwritten digit {n}",
    "the digit {word}, handwritten",
    "a handwritten {word}",
    "the number {n} written by hand",
    "a scan of a handwritten {n}",
    "digit {word}",
)
DIGITS_SIZE = 32  # pixels: the 8x8 scans, upscaled 4x (bilinear)
DIGITS_TEST_FRACTION = 0.1
DIGITS_SEED = 1234


@dataclass
class ImageDataArguments(DataArguments):
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    caption_column: str = field(
        default="text", metadata={"help": "Column holding the captions (a string, or a list: one is drawn per step)."}
    )
    resolution: int = field(
        default=512, metadata={"help": "Images are resized (shorter side) and cropped to resolution x resolution."}
    )
    aspect_ratio_buckets: list[str] = field(
        default_factory=list,
        metadata={"help": "Train at several aspect ratios: ratios ('4:3') of about resolution^2 pixels, sizes "
                          "('768x512'), or 'auto' (the data's own ratios); each image goes to the nearest bucket "
                          "and every batch comes from one bucket. Empty: square resolution x resolution."},
    )  # fmt: skip
    center_crop: bool = field(default=True, metadata={"help": "Crop the center (false: a random crop each time)."})
    random_flip: bool = field(default=False, metadata={"help": "Flip images horizontally at random."})


def digit_caption(digit: int, wording: int) -> str:
    return DIGIT_CAPTIONS[wording % len(DIGIT_CAPTIONS)].format(n=digit, word=DIGIT_WORDS[digit])


@functools.lru_cache(maxsize=1)
def digits_dataset():
    """scikit-learn's handwritten digits as a DatasetDict (train/test, a fixed random split) of image, text, label."""
    import datasets
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = random.Random(DIGITS_SEED)
    order = list(range(len(digits.images)))
    rng.shuffle(order)
    test_size = int(len(order) * DIGITS_TEST_FRACTION)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(DIGIT_WORDS)),
        }
    )

    def rows(indices):
        images, texts, labels = [], [], []
        for i in indices:
            pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)  # 0..16 ink levels -> 0..255
            images.append(Image.fromarray(pixels, mode="L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.BILINEAR))
            texts.append(digit_caption(int(digits.target[i]), rng.randrange(len(DIGIT_CAPTIONS))))
            labels.append(int(digits.target[i]))
        return datasets.Dataset.from_dict({"image": images, "text": texts, "label": labels}, features=features)

    return datasets.DatasetDict({"train": rows(order[test_size:]), "test": rows(order[:test_size])})


@functools.lru_cache(maxsize=1)
def digits_aspect_dataset():
    """`digits_dataset` with row i's digit centred on the canvas DIGITS_ASPECT_CANVASES[i % 3] (black padding)."""
    from PIL import Image

    def pad(batch, indices):
        images = []
        for image, index in zip(batch["image"], indices):
            width, height = DIGITS_ASPECT_CANVASES[index % len(DIGITS_ASPECT_CANVASES)]
            canvas = Image.new("L", (width, height))
            canvas.paste(image, ((width - image.width) // 2, (height - image.height) // 2))
            images.append(canvas)
        return {"image": images}

    return digits_dataset().map(pad, batched=True, with_indices=True)


def load_image_splits(args: DataArguments, seed: int = 0, hold_out: bool = True):
    """(train, eval) image datasets: the embedded digits or any `load_raw` source, split as `load_splits` does
    (`hold_out=False`: without a test split, every row trains and eval is empty)."""
    embedded = {DIGITS: digits_dataset, DIGITS_ASPECT: digits_aspect_dataset}
    name = args.dataset_name
    raw = embedded[name]() if name in embedded else load_raw(name, args.dataset_config)
    if name not in embedded:
        raw = paths_beside_the_data(raw, name, args.image_column)
    return split_dataset(raw, args, seed, hold_out=hold_out)


def paths_beside_the_data(raw, name: str, image_column: str):
    """Image paths in a JSON/CSV file (or a folder of them) are relative to the file, as an imagefolder's metadata
    file names its images: a relative path that exists there is made absolute (one that does not is left as it is,
    relative to the working directory)."""
    import datasets

    base = Path(name).expanduser()
    base = base.parent if base.is_file() else base
    if not base.is_dir():
        return raw

    strings = (datasets.Value("string"), datasets.Value("large_string"))

    def resolved(path):
        if isinstance(path, str) and path and not Path(path).is_absolute() and (base / path).is_file():
            return str((base / path).resolve())
        return path

    def resolve(row):
        value = row[image_column]
        if isinstance(value, dict):  # {bytes, path} (datasets' image storage): the path is read when bytes is empty
            return {image_column: value if value.get("bytes") else {**value, "path": resolved(value.get("path"))}}
        return {image_column: resolved(value)}

    def holds_paths(feature) -> bool:
        # (JSON loads strings as "string", CSV and parquet as "large_string"; a parquet of {bytes, path} structs
        # as a dict of the two)
        return feature in strings or (isinstance(feature, dict) and feature.get("path") in strings)

    return datasets.DatasetDict(
        {
            split: dataset.map(resolve) if holds_paths(dataset.features.get(image_column)) else dataset
            for split, dataset in raw.items()
        }
    )


# ---- checks ---------------------------------------------------------------------------------------------


def open_image(value, where: str):
    """A decoded RGB PIL image from a dataset value (PIL image, or {'bytes', 'path'}); a UserError if it cannot be."""
    from PIL import Image, ImageOps

    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray)):  # a parquet column of encoded files
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, dict) and value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, (dict, str)) and (path := value.get("path") if isinstance(value, dict) else value):
            if not Path(path).is_file():
                raise UserError(f"{where} '{path}' does not exist")
            where = f"{where} '{path}'"
            image = Image.open(path)
        else:
            raise ValueError(f"not an image: {type(value).__name__}")
        image.load()  # PIL opens lazily: only load() reads the pixels (and finds a truncated file)
        image = ImageOps.exif_transpose(image)  # a phone photo's pixels are stored turned; its EXIF says how
        return on_white(eight_bit(image)).convert("RGB")
    except Image.DecompressionBombError as error:  # PIL's guard: over 2 x MAX_IMAGE_PIXELS (a 14000x14000 scan)
        raise UserError(
            f"{where} is too large to decode ({error.args[0].split(',')[0]}): downscale it (training resizes it to "
            "the resolution anyway)"
        ) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise UserError(f"{where} cannot be decoded: {error}") from None


def on_white(image):
    """A transparent image (RGBA, LA, or any mode with a transparent colour key: a palette, or an RGB/grayscale
    PNG with a tRNS chunk as optipng/oxipng store a binary alpha) laid on white, as a viewer shows it:
    convert("RGB") drops the alpha channel (and the colour key) and keeps the colour under it, which is often
    black, so a logo or a line drawing whose shape lives in the alpha channel would train as a blank square."""
    from PIL import Image

    if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in image.info:
        return image
    image = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)


def eight_bit(image):
    """A 16- or 32-bit grayscale image (16-bit PNGs, TIFFs) scaled to 8 bits: PIL's convert("RGB") clips such values
    at 255, so a 16-bit image would train as white."""
    import numpy as np
    from PIL import Image

    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return image
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":  # floats: 0-1 as most tools write them, else 0-255
        scale = 255.0 if pixels.max(initial=0) <= 1 else 1.0
    else:  # I;16 is 16-bit; "I" holds 16-bit PNGs in older Pillow too, and 8-bit values when they fit
        scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 1.0
    gray = Image.fromarray(np.clip(pixels * scale + 0.5, 0, 255).astype(np.uint8), mode="L")
    key = image.info.get("transparency")
    if isinstance(key, int):  # a 16-bit tRNS colour key: kept as an alpha channel, which `on_white` lays on white
        return Image.merge("LA", (gray, Image.fromarray(np.where(pixels == key, 0, 255).astype(np.uint8), "L")))
    return gray


def image_problems(dataset, image_column: str, source: str, limit: int = ROWS_CHECKED) -> list[str]:
    """Rows among the first `limit` whose image does not decode, as messages naming the file when there is one."""
    from hfgen.data.loading import source_rows

    problems = []
    for index, value in enumerate(
        undecoded(dataset, image_column).select(range(min(limit, len(dataset))))[image_column]
    ):
        try:
            open_image(value, f"dataset '{source}' row {source_rows(dataset, [index])[0]} (counted from 1) image")
        except UserError as error:
            problems.append(str(error))
            if len(problems) == 5:
                return problems + ["(stopped looking after 5 bad images)"]
    return problems


def row_files(dataset, image_column: str, source: str, positions: list[int]) -> str:
    """ "; images [...]": the image files of `positions` of an image folder's dataset, relative to the folder (a
    caption file or a metadata line sits beside its image), for messages whose row numbers count rows of several
    files (a caption folder, one metadata.jsonl per subfolder); "" for a single data file, whose rows are lines."""
    folder = Path(source).expanduser()
    if not folder.is_dir() or not positions:
        return ""
    names = []
    for value in undecoded(dataset, image_column).select(positions)[image_column]:
        path = value.get("path") if isinstance(value, dict) else value
        if not isinstance(path, str):
            return ""
        try:
            names.append(Path(path).resolve().relative_to(folder.resolve()).as_posix())
        except ValueError:
            names.append(path)
    return f"; images {names}"


def caption_problems(
    dataset, column: str, source: str, files=None, limit: int = ROWS_CHECKED, empties: bool = False
) -> list[str]:
    """Rows among the first `limit` whose caption training cannot use or would use wrongly, each named by its row:
    a dict, a list holding a non-string (these stopped `train` with a message naming no row), a class-id column,
    and a blank caption or blank list item (a list's "" was drawn as an unconditional caption: an unasked
    dropout). None, "" and [] are `column_problems`' to report among the first rows, and reported here with
    `empties` (past them)."""
    import datasets

    from hfgen.data.loading import NON_TEXT_COLUMNS, source_rows

    feature = dataset.features.get(column)
    if isinstance(feature, datasets.ClassLabel):  # a folder of class subfolders: `label` holds 0, 1, 2, ...
        return [
            f"dataset '{source}' column '{column}' holds class ids (0..{feature.num_classes - 1} for "
            f"{feature.names[:5]}{'...' if feature.num_classes > 5 else ''}), not captions; set caption_column to a "
            "column of text (a metadata.jsonl with a caption per file_name, or a .txt caption beside each image)"
        ]
    unusable, blank, empty = [], [], []  # positions in `dataset`
    for index, value in enumerate(dataset.select(range(min(limit, len(dataset))))[column]):
        if value is None or value == "" or value == []:
            if empties:
                empty.append((index, value))
            continue
        if isinstance(value, (int, float)) and column not in NON_TEXT_COLUMNS:
            continue
        try:
            options = caption_options(value)
        except UserError:
            unusable.append((index, value))
            continue
        if any(not option.strip() for option in options):
            blank.append((index, value))
    problems = []
    for found, what in (
        (empty, "empty values"),
        (unusable, "values that are neither a string nor a list of strings"),
        (blank, "blank captions or blank list items, which would train as the unconditional caption (an unasked "
                "condition dropout; condition_dropout sets that)"),
    ):  # fmt: skip
        if found:
            rows = source_rows(dataset, [index for index, _ in found[:5]])
            problems.append(
                f"dataset '{source}' column '{column}' has {what} (rows {rows}{'...' if len(found) > 5 else ''}, "
                f"counted from 1{files([index for index, _ in found[:5]]) if files else ''}; row {rows[0]}: "
                f"{found[0][1]!r})"
            )
    return problems


def unlisted_images(name: str) -> list[str]:
    """The images of an imagefolder (a folder with metadata.jsonl or metadata.csv files) that no metadata file
    names: `datasets` leaves them out without a word."""
    import csv
    import json

    from hfgen.data.loading import IMAGE_SUFFIXES, visible_files

    folder = Path(name).expanduser()
    if not folder.is_dir():
        return []
    files = visible_files(folder)
    listed = set()
    for metadata in (p for p in files if p.name in ("metadata.jsonl", "metadata.csv")):
        try:
            with metadata.open(encoding="utf-8-sig") as stream:  # Excel's "CSV UTF-8" starts with a BOM
                if metadata.suffix == ".csv":
                    names = [row.get("file_name") for row in csv.DictReader(stream)]
                else:
                    names = [json.loads(line).get("file_name") for line in stream if line.strip()]
        except (OSError, ValueError, AttributeError):
            return []  # a metadata file the loader itself reports
        listed |= {(metadata.parent / n).resolve() for n in names if isinstance(n, str)}
    if not listed:
        return []
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(str(p.relative_to(folder)) for p in images if p.resolve() not in listed)


def check_image_data(args: ImageDataArguments, need_captions: bool, hold_out: bool = True) -> list[str]:
    """Problems with the recipe's image dataset: loading, columns, empty captions, undecodable images (split as
    `load_image_splits(args, hold_out=hold_out)` splits it for the stage)."""
    if not args.dataset_name:
        return ["dataset_name is not set"]
    if args.resolution < 8 or args.resolution % 8:
        return [f"resolution must be a multiple of 8, got {args.resolution}"]
    if args.aspect_ratio_buckets:
        from hfgen.diffusion.buckets import bucket_problems

        if problems := bucket_problems(args.aspect_ratio_buckets):
            return problems
    splits, problems = load_splits_for_check(functools.partial(load_image_splits, hold_out=hold_out), args)
    if problems:
        return problems
    if unlisted := unlisted_images(args.dataset_name):
        print(f"warning: dataset '{args.dataset_name}': {len(unlisted)} image(s) in the folder are not in its "
              f"metadata file and are left out (e.g. '{unlisted[0]}'); list them to train on them")  # fmt: skip
    train, evaluation = splits
    columns = [args.image_column] + ([args.caption_column] if need_captions else [])
    missing = [c for c in columns if c not in train.column_names]
    if missing:
        return [
            f"dataset '{args.dataset_name}' lacks column(s) {missing} (it has {train.column_names}); set image_column"
            + (" and caption_column" if need_captions else "") + " to the columns holding the images"
            + (" and captions" if need_captions else "")
        ]  # fmt: skip
    train, evaluation = undecoded(train, args.image_column), undecoded(evaluation, args.image_column)
    checked = [train] + ([evaluation] if hold_out or len(evaluation) else [])  # (no held-out slice: none to check)
    problems = []
    for split in checked:
        files = functools.partial(row_files, split, args.image_column, args.dataset_name)
        problems += column_problems(split, columns, args.dataset_name, files)
    if need_captions and not problems:
        for split in checked:  # (a class-id column is named once, not per split)
            files = functools.partial(row_files, split, args.image_column, args.dataset_name)
            problems += [
                p for p in caption_problems(split, args.caption_column, args.dataset_name, files) if p not in problems
            ]
    problems += image_problems(train, args.image_column, args.dataset_name)
    return problems + image_problems(evaluation, args.image_column, args.dataset_name, limit=ROWS_CHECKED // 10)


# ---- tensors --------------------------------------------------------------------------------------------


def resize_and_crop(image, resolution: int, center_crop: bool, rng: random.Random | None = None):
    """Shorter side to `resolution` (bilinear), then a center or random square crop: the diffusers examples' order."""
    return fit(image, (resolution, resolution), center_crop, rng)[0]


def fit(image, size: tuple[int, int], center_crop: bool, rng: random.Random | None = None):
    """(image resized to cover `size` = (width, height), bilinear, then cropped to it; the crop's (top, left)
    in the resized image, SDXL's `crops_coords_top_left`)."""
    from PIL import Image

    target_width, target_height = size
    width, height = image.size
    scale = max(target_width / width, target_height / height)
    if scale != 1:
        image = image.resize(
            (max(target_width, round(width * scale)), max(target_height, round(height * scale))), Image.BILINEAR
        )
    width, height = image.size
    if center_crop:
        left, top = (width - target_width) // 2, (height - target_height) // 2
    else:
        rng = rng or random
        left, top = rng.randint(0, width - target_width), rng.randint(0, height - target_height)
    return image.crop((left, top, left + target_width, top + target_height)), (top, left)


def to_tensor(image):
    """PIL RGB -> float tensor (3, H, W) in [-1, 1], the range the VAE expects."""
    import numpy as np
    import torch

    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def pixel_transform(args: ImageDataArguments, source: str, flip: bool | None = None, size=None):
    """A `with_transform` function: images -> `pixel_values` (resized, cropped to `size` = (width, height), default
    resolution x resolution, maybe flipped), their `original_size` (height, width) and `crop_top_left`, captions
    kept. `flip=None` flips at random per `args.random_flip`; True/False forces it (for cached latents)."""
    from PIL import Image

    size = size or (args.resolution, args.resolution)

    def transform(batch, rngs=None):
        images = [open_image(value, f"dataset '{source}' image") for value in batch[args.image_column]]
        rngs = rngs or [random] * len(images)  # one random.Random per row (`row_rng`), else the global one
        pixels, original_sizes, crops = [], [], []
        for image, rng in zip(images, rngs):
            original_sizes.append((image.height, image.width))
            image, crop = fit(image, size, args.center_crop, rng)
            crops.append(crop)
            if flip if flip is not None else (args.random_flip and rng.random() < 0.5):
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            pixels.append(to_tensor(image))
        out = {"pixel_values": pixels, "original_size": original_sizes, "crop_top_left": crops}
        if args.caption_column in batch:
            out["caption"] = [pick_caption(c, rng) for c, rng in zip(batch[args.caption_column], rngs)]
        return out

    return transform


def held_out_transform(args: ImageDataArguments, source: str):
    """`pixel_transform` for measuring held-out images: centre-cropped and unflipped whatever the training crops,
    so every evaluation (the initial, the final, a resumed run's) sees the same pixels: random crops made the
    before/after figures differ by crop noise, not by training."""
    import dataclasses

    return pixel_transform(dataclasses.replace(args, center_crop=True), source, flip=False)


def undecoded(dataset, image_column: str):
    """The dataset with images left as bytes/paths, so that `pixel_transform` decodes them (and names bad ones)."""
    import datasets

    if isinstance(dataset.features.get(image_column), datasets.Image):
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def row_rng(seed: int, epoch: int, row: int) -> random.Random:
    """The random draws (crop, flip, caption) of one row in one epoch: a function of (seed, epoch, row) alone, so
    a resumed run, dataloader workers and prefetching draw what the uninterrupted run drew."""
    return random.Random(f"{seed}/{epoch}/{row}")


def caption_options(caption) -> list[str]:
    """A row's captions: its string, or its list of alternatives (one is drawn per step)."""
    if isinstance(caption, str):
        return [caption]
    if isinstance(caption, (list, tuple)) and caption and all(isinstance(c, str) for c in caption):
        return list(caption)
    raise UserError(f"caption {caption!r} is neither a string nor a list of strings")


def every_caption(captions) -> list[str]:
    """Every caption of a caption column, list alternatives included."""
    return [caption for value in captions for caption in caption_options(value)]


def pick_caption(caption, rng=None) -> str:
    """A caption may be a list of alternatives: take one at random from `rng` (default: the global `random`), as
    the diffusers examples do."""
    options = caption_options(caption)
    return options[0] if len(options) == 1 else (rng or random).choice(options)
