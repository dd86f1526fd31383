"""Aspect-ratio buckets: train on images of many shapes without squaring them, each batch from one shape.

    aspect_ratio_buckets: ["1:1", "4:3", "3:4"]      ratios, each about resolution x resolution pixels
    aspect_ratio_buckets: ["768x512", "512x768"]    sizes (width x height)
    aspect_ratio_buckets: [auto]                    the data's own ratios, at about resolution^2 pixels

Every image goes to the bucket of the nearest aspect ratio (in log ratio), is resized to cover the bucket's size
and cropped to it; its latents are cached per bucket, and `BucketBatchSampler` draws every batch from one bucket,
so a batch stacks into one tensor. Sides are rounded to a multiple the model needs (the VAE's downsampling times the
UNet's, or the transformer's patch size). The original size and the crop's corner are cached beside the latents
(`original_size`, `crop_top_left`); SD 1.x and SD3 take no such micro-conditioning (SDXL does), so they are kept
in the dataset and in buckets.json only.

Batch order is a function of (seed, epoch) alone, so a resumed run that skips the batches it has trained on
(accelerate's `skip_first_batches`, which wraps this sampler) sees exactly the rest of the epoch. Under several
processes the batches come in runs of `num_processes` from the same bucket and accelerate deals them out in turn,
so at every step all processes train on the same shape (equal work per step: no process waits for a larger one).
"""

from __future__ import annotations

import math
import re

import torch

AUTO = "auto"
EXIF_ORIENTATION = 0x0112
_RATIO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


def bucket_problems(specs: list[str]) -> list[str]:
    """What is wrong with an `aspect_ratio_buckets` value, as messages naming the key."""
    if AUTO in specs and len(specs) > 1:
        return [f"aspect_ratio_buckets: 'auto' stands alone (got {specs})"]
    bad = [s for s in specs if s != AUTO and not _RATIO.match(s) and not _SIZE.match(s)]
    if bad:
        return [f"aspect_ratio_buckets: {bad} are neither ratios ('4:3'), sizes ('768x512') nor 'auto'"]
    zero = [s for s in specs if s != AUTO and 0 in [float(x) for x in (_RATIO.match(s) or _SIZE.match(s)).groups()]]
    return [f"aspect_ratio_buckets: {zero} have a zero side"] if zero else []


def sizes_off_multiple(specs: list[str], multiple: int) -> list[str]:
    """The sizes ('768x512') among `specs` with a side that is not a multiple of `multiple` (ratios are rounded to
    it, so they never are)."""
    sizes = [(spec, _SIZE.match(spec)) for spec in specs]
    return [spec for spec, match in sizes if match and (int(match[1]) % multiple or int(match[2]) % multiple)]


def size_for_ratio(ratio: float, resolution: int, multiple: int) -> tuple[int, int]:
    """(width, height) of about resolution^2 pixels at width/height = `ratio`, sides rounded to `multiple`."""
    width = math.sqrt(resolution * resolution * ratio)
    return tuple(max(multiple, round(side / multiple) * multiple) for side in (width, width / ratio))


def bucket_sizes(specs: list[str], resolution: int, multiple: int, image_sizes=()) -> list[tuple[int, int]]:
    """The distinct (width, height) of the buckets, in the order given (`auto`: by ratio, from `image_sizes`)."""
    if specs == [AUTO]:
        # (ratios to 2 decimals, so near-equal ones share a bucket; one under 0.005, an image over 200 times
        # taller than wide, rounded to 0 and divided by zero: kept as it is)
        ratios = sorted({round(w / h, 2) or w / h for w, h in image_sizes})
        sizes = [size_for_ratio(r, resolution, multiple) for r in ratios]
    else:
        sizes = []
        for spec in specs:
            if match := _SIZE.match(spec):
                sizes.append((int(match[1]), int(match[2])))
            else:
                match = _RATIO.match(spec)
                sizes.append(size_for_ratio(float(match[1]) / float(match[2]), resolution, multiple))
        merged = {}  # a size given by several specs (ratios close at a small resolution round alike): one bucket
        for spec, size in zip(specs, sizes):
            merged.setdefault(size, []).append(spec)
        for (width, height), named in merged.items():
            if len(set(named)) > 1:
                print(f"warning: aspect_ratio_buckets: {', '.join(named)} all round to {width}x{height} (sides "
                      f"multiples of {multiple}): they make one bucket")  # fmt: skip
    return list(dict.fromkeys(sizes))


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest `size`'s (distance in log ratio: 2:1 and 1:2 are as far
    from 1:1)."""
    log_ratio = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda b: abs(math.log(buckets[b][0] / buckets[b][1]) - log_ratio))


def image_sizes(rows, image_column: str) -> list[tuple[int, int]]:
    """(width, height) of every image as displayed, read from the file headers (no decoding): EXIF orientations
    5-8 (a phone held upright) swap the stored sides, as `open_image` turns the pixels."""
    import io

    from PIL import Image

    from hfgen.diffusion.data import open_image, undecoded

    def displayed(image):
        width, height = image.size
        return (height, width) if image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8) else (width, height)

    sizes = []
    for value in undecoded(rows, image_column)[image_column]:
        try:
            if isinstance(value, dict) and value.get("bytes"):
                sizes.append(displayed(Image.open(io.BytesIO(value["bytes"]))))
                continue
            if isinstance(value, dict) and value.get("path"):
                sizes.append(displayed(Image.open(value["path"])))
                continue
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            pass  # a header that does not read: `open_image` names the file
        sizes.append(open_image(value, "image").size)  # decoded and already turned
    return sizes


class Bucketed(torch.utils.data.ConcatDataset):
    """One dataset per bucket, indexed as one; a batch is fetched from its single bucket in one call."""

    def __init__(self, datasets, sizes: list[tuple[int, int]]):
        super().__init__(datasets)
        self.sizes = sizes

    def set_epoch(self, epoch: int) -> None:  # the pixel datasets' random draws (`latents.PixelRows`)
        for dataset in self.datasets:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)

    def ranges(self) -> list[range]:
        starts = [0] + self.cumulative_sizes[:-1]
        return [range(start, end) for start, end in zip(starts, self.cumulative_sizes)]

    def __getitems__(self, indices: list[int]):
        bucket = next(b for b, end in enumerate(self.cumulative_sizes) if indices[0] < end)
        start = self.cumulative_sizes[bucket] - len(self.datasets[bucket])
        local = [i - start for i in indices]
        if min(local) < 0 or max(local) >= len(self.datasets[bucket]):
            raise ValueError(f"a batch mixes buckets: indices {indices}")  # a sampler bug, never user input
        dataset = self.datasets[bucket]
        return dataset.__getitems__(local) if hasattr(dataset, "__getitems__") else [dataset[i] for i in local]


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of `batch_size` indices, each from one bucket (`ranges`: each bucket's indices), shuffled within
    buckets and in order by (seed, epoch); incomplete batches are dropped. Batches come in runs of `num_processes`
    from one bucket (see the module docstring)."""

    def __init__(self, ranges: list[range], batch_size: int, seed: int, num_processes: int = 1):
        self.ranges, self.batch_size, self.seed, self.num_processes = ranges, batch_size, seed, num_processes
        self.drop_last, self.epoch = True, 0
        # accelerate hands the epoch to `batch_sampler.sampler` when it wraps this sampler in its BatchSamplerShard
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def runs_per_bucket(self) -> list[int]:
        return [len(r) // (self.batch_size * self.num_processes) for r in self.ranges]

    def __len__(self) -> int:
        return sum(self.runs_per_bucket()) * self.num_processes

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        runs = []
        for indices, count in zip(self.ranges, self.runs_per_bucket()):
            order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            per_run = self.batch_size * self.num_processes
            for run in range(count):
                chunk = order[run * per_run : (run + 1) * per_run]
                runs.append([chunk[b * self.batch_size : (b + 1) * self.batch_size] for b in range(self.num_processes)])
        for run in torch.randperm(len(runs), generator=generator).tolist():
            yield from runs[run]


def bucketed_latents(rows, data_args, vae, device, multiple: int):
    """(Bucketed CachedLatents, the distinct captions with the empty prompt last, a summary for buckets.json)."""
    from hfgen.diffusion.data import every_caption
    from hfgen.diffusion.latents import cache_latents

    rows, sizes, assignment = assign(rows, data_args, multiple)
    captions = sorted(set(every_caption(rows[data_args.caption_column]))) + [""]
    parts = [
        cache_latents(rows.select([i for i, b in enumerate(assignment) if b == bucket]), data_args, vae, None,
                      device, size=size, captions=captions)[0]
        for bucket, size in enumerate(sizes)
    ]  # fmt: skip
    return Bucketed(parts, sizes), captions


def bucketed_pixels(rows, data_args, tokenizer, multiple: int, seed: int):
    """Bucketed datasets of pixels fitted to their bucket's size (random crops, flips) and caption token ids."""
    from hfgen.diffusion.latents import pixel_dataset

    rows, sizes, assignment = assign(rows, data_args, multiple)
    parts = [
        pixel_dataset(rows.select([i for i, b in enumerate(assignment) if b == bucket]), data_args, tokenizer,
                      seed + bucket, size)
        for bucket, size in enumerate(sizes)
    ]  # fmt: skip
    return Bucketed(parts, sizes)


def assign(rows, data_args, multiple: int):
    """(rows, bucket sizes, each row's bucket index); buckets no image falls in are left out."""
    from hfgen.errors import UserError

    found = image_sizes(rows, data_args.image_column)
    sizes = bucket_sizes(data_args.aspect_ratio_buckets, data_args.resolution, multiple, found)
    odd = [f"{w}x{h}" for w, h in sizes if w % multiple or h % multiple]
    if odd:
        raise UserError(f"aspect_ratio_buckets: sizes {odd} are not multiples of {multiple}, which this model needs")
    assignment = [nearest_bucket(size, sizes) for size in found]
    used = sorted(set(assignment))
    return rows, [sizes[b] for b in used], [used.index(b) for b in assignment]


def summary(dataset: Bucketed, sampler: BucketBatchSampler) -> dict:
    """buckets.json: per bucket its size, images and batches per epoch (images beyond full batches wait for the
    next epoch's shuffle)."""
    return {
        f"{w}x{h}": {"images": len(part), "batches_per_epoch": runs * sampler.num_processes}
        for (w, h), part, runs in zip(dataset.sizes, dataset.datasets, sampler.runs_per_bucket())
    }


def short_bucket_problem(dataset: Bucketed, sampler: BucketBatchSampler) -> str | None:
    """The buckets holding fewer images than one batch on every process, as a message: incomplete batches are
    dropped, so their images would never train (a lone 3:1 image among squares trained on nothing, silently)."""
    buckets = summary(dataset, sampler)
    short = {size: counts["images"] for size, counts in buckets.items() if not counts["batches_per_epoch"]}
    if not short:
        return None
    return (
        f"aspect_ratio_buckets: {len(short)} bucket(s) hold fewer images than train_batch_size ({sampler.batch_size}) "
        f"x processes ({sampler.num_processes}), so their images would never train: {short} (images per bucket; all "
        f"buckets: {buckets}); add images of those shapes or remove these, lower train_batch_size, or list buckets "
        "that gather them"
    )
