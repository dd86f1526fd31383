"""What the two text-to-image stages share around their own models and losses (`t2i`: UNet + DDPM, `t2i_flow`:
MMDiT + rectified flow): the keys of the loop they both run (LoRA, caption dropout, EMA, validation, evaluation,
DreamBooth), their checks, the training data (a dataset, or DreamBooth's instance and class images; square, or in
aspect-ratio buckets; cached latents or pixels) and its loader, latents drawn from cached posteriors, validation
grids, the speed record, the LoRA base file, and the evaluation of the saved pipeline.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hfgen import tracking
from hfgen.diffusion.components import LORA_BASE
from hfgen.diffusion.data import DIGIT_DATASETS, check_image_data
from hfgen.diffusion.dreambooth import (
    DreamBoothArguments,
    class_image_problems,
    class_image_source,
    dreambooth_problems,
)
from hfgen.diffusion.training import LoopArguments, check_loop_arguments
from hfgen.errors import UserError


@dataclass
class ImageStageArguments(LoopArguments, DreamBoothArguments):
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of the full denoiser."})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: the rank, i.e. scale 1)."})
    condition_dropout: float = field(
        default=0.1, metadata={"help": "Probability of training on the empty prompt (for classifier-free guidance)."}
    )
    use_ema: bool = field(default=False, metadata={"help": "Keep an EMA of the denoiser's weights and save that."})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay (with warm-up: lower early on)."})
    validation_prompts: list[str] = field(
        default_factory=list, metadata={"help": "Prompts rendered to validation/step-N.png during training."}
    )
    validation_steps: int = field(
        default=0, metadata={"help": "Render the validation grid every N steps (0: at the end only)."}
    )
    num_validation_images: int = field(default=4, metadata={"help": "Images per validation prompt."})
    num_inference_steps: int = field(default=25, metadata={"help": "Sampling steps for validation and evaluation."})
    guidance_scale: float = field(default=3.0, metadata={"help": "Classifier-free guidance scale at sampling time."})
    eval_images_per_prompt: int = field(
        default=20, metadata={"help": "Images per prompt for eval.json's adherence/diversity/speed (0: no evaluation)."}
    )


def check_image_stage(model_args, data_args, args: ImageStageArguments) -> list[str]:
    """The problems both stages look for in the keys they share."""
    problems = check_loop_arguments(args)
    if args.use_lora and not model_args.pretrained_model_name_or_path:
        problems.append("use_lora adapts a pretrained pipeline: set pretrained_model_name_or_path")
    if args.use_lora and args.use_ema:
        problems.append("use_ema averages full weights; it does not apply to use_lora")
    if args.num_validation_images < 1:  # (make_grid would fail on empty rows at the end of training)
        problems.append(f"num_validation_images must be at least 1, got {args.num_validation_images}; for no "
                        "validation grids set validation_prompts: []")  # fmt: skip
    if not 0 <= args.condition_dropout < 1:
        problems.append(f"condition_dropout must be in [0, 1), got {args.condition_dropout}")
    problems += dreambooth_problems(args, data_args.dataset_name, model_args.pretrained_model_name_or_path)
    if args.with_prior_preservation and data_args.aspect_ratio_buckets:
        problems.append("aspect_ratio_buckets with with_prior_preservation is not supported: a prior-preservation "
                        "batch stacks instance and class images in one tensor, and the class images are generated "
                        "at one size; drop one of the two keys")  # fmt: skip
    if args.instance_data_dir:
        pretrained = model_args.pretrained_model_name_or_path
        t5_length = getattr(model_args, "max_sequence_length", None)  # (t2i_flow's: the class images' sampling)
        source = class_image_source(pretrained, args.num_inference_steps, args.guidance_scale, t5_length)
        return problems + class_image_problems(args, class_data_dir(args), data_args.resolution, source, pretrained)
    return problems + check_image_data(data_args, need_captions=True, hold_out=False)


def class_data_dir(args: ImageStageArguments) -> Path:
    return Path(args.class_data_dir or Path(args.output_dir) / "class_images")


# ---- training data ------------------------------------------------------------------------------------


def training_rows(data_args, args: ImageStageArguments, seed: int):
    """The training split of the recipe's dataset, or DreamBooth's instance images under `instance_prompt`."""
    import functools

    from hfgen.data.loading import ROWS_CHECKED
    from hfgen.diffusion.data import caption_problems, load_image_splits, row_files
    from hfgen.diffusion.dreambooth import instance_rows
    from hfgen.errors import UserError

    # (no held-out slice: these stages evaluate by sampling the pipeline, and a carved slice was never trained on)
    if args.instance_data_dir:
        return instance_rows(args, data_args)
    rows = load_image_splits(data_args, seed, hold_out=False)[0]
    if len(rows) > ROWS_CHECKED:  # the check read the first rows; a bad caption past them stopped training unnamed
        files = functools.partial(row_files, rows, data_args.image_column, data_args.dataset_name)
        if problems := caption_problems(rows, data_args.caption_column, data_args.dataset_name, files, len(rows), True):
            raise UserError("; ".join(problems) + ".")
    return rows


def with_class_rows(rows, data_args, args: ImageStageArguments, make_pipeline, accelerator, call_arguments=None,
                    pretrained: str | None = None):  # fmt: skip
    """`rows` then the class images (generated by `make_pipeline()`, the base at `pretrained`, when missing, with
    `call_arguments` in every pipeline call) under prior preservation, else `rows` alone."""
    if not args.with_prior_preservation:
        return rows
    import datasets

    from hfgen.diffusion.dreambooth import class_rows

    class_dir = class_data_dir(args)
    sampling = (args.num_inference_steps, args.guidance_scale, args.seed)
    source = class_image_source(pretrained, args.num_inference_steps, args.guidance_scale,
                                (call_arguments or {}).get("max_sequence_length"))  # fmt: skip
    return datasets.concatenate_datasets(
        [rows, class_rows(args, data_args, class_dir, make_pipeline, accelerator, sampling, call_arguments, source)]
    )


def warn_of_cut_captions(rows, caption_column: str, tokenizer, length: int, key: str) -> None:
    """Print how many of the training captions (DreamBooth's class prompts included) are longer than the text
    encoder's `length` tokens, which the encoding cuts off (truncation, as the pipelines encode prompts) without a
    word: such a caption trains as its start, and captions that differ only after it train as one."""
    from hfgen.diffusion.data import every_caption

    captions = sorted(set(every_caption(rows[caption_column])))
    lengths = [len(ids) for ids in tokenizer(captions, truncation=False, verbose=False)["input_ids"]]
    cut = [(caption, n) for caption, n in zip(captions, lengths) if n > length]
    if cut:
        caption, n = cut[0]
        print(f"warning: {len(cut)} of {len(captions)} distinct captions are longer than {key} ({length} tokens, "
              f"the start and end tokens included) and are cut to it (e.g. {n} tokens: {caption[:60]!r}"
              f"{'...' if len(caption) > 60 else ''})")  # fmt: skip


def training_data(rows, n_instance: int, data_args, args, accelerator, vae, size_multiple: int, tokenizer=None):
    """(dataset, distinct captions (the empty prompt last) or None for pixels, DataLoader). Cached VAE posteriors
    unless a `tokenizer` is given (pixels and token ids, encoded every step). Square images, or aspect-ratio
    buckets (each batch from one; buckets.json records them); DreamBooth batches pair instance and class images."""
    from hfgen.diffusion import buckets
    from hfgen.diffusion.dreambooth import PriorBatchSampler
    from hfgen.diffusion.latents import CachedLatents, cache_latents, pixel_dataset

    cached, batch_size, sampler, captions = tokenizer is None, args.train_batch_size, None, None
    if data_args.aspect_ratio_buckets:
        if cached:
            dataset, captions = buckets.bucketed_latents(rows, data_args, vae, accelerator.device, size_multiple)
        else:
            dataset = buckets.bucketed_pixels(rows, data_args, tokenizer, size_multiple, args.seed)
        sampler = buckets.BucketBatchSampler(dataset.ranges(), batch_size, args.seed, accelerator.num_processes)
        if problem := buckets.short_bucket_problem(dataset, sampler):
            raise UserError(problem)
        if accelerator.is_main_process:
            tracking.write_json(Path(args.output_dir) / "buckets.json", buckets.summary(dataset, sampler))
    elif cached:
        dataset, captions = cache_latents(rows, data_args, vae, None, accelerator.device)
    else:
        dataset = pixel_dataset(rows, data_args, tokenizer, args.seed)
    if args.with_prior_preservation:
        sampler = PriorBatchSampler(n_instance, len(rows) - n_instance, batch_size, args.seed)
        if len(sampler) < accelerator.num_processes:  # accelerate deals whole rounds of pairs out: none would train
            raise UserError(
                f"with_prior_preservation: {n_instance} instance and {len(rows) - n_instance} class images make "
                f"{len(sampler)} batch pair(s) of train_batch_size {batch_size} per epoch, fewer than the "
                f"{accelerator.num_processes} processes, so no process would get one: add images (instance_data_dir, "
                "num_class_images) or lower train_batch_size"
            )
    loader_args = dict(num_workers=args.dataloader_num_workers, collate_fn=CachedLatents.collate if cached else None)
    if sampler is not None:
        return dataset, captions, torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **loader_args)
    drop_last = len(dataset) >= batch_size * accelerator.num_processes
    loader = torch.utils.data.DataLoader(dataset, batch_size, shuffle=True, drop_last=drop_last, **loader_args)
    return dataset, captions, loader


def latent_means(dataset) -> torch.Tensor:
    """Every cached posterior mean, flattened (one bucket or several)."""
    parts = getattr(dataset, "datasets", [dataset])
    return torch.cat([part.tensors["latent_mean"].flatten() for part in parts])


def sample_cached_latents(batch, random_flip: bool, generator, device) -> torch.Tensor:
    """z ~ q(z|x) from the cached posterior, of the flipped image for a random half when `random_flip` (both
    orientations are cached): what encoding the (randomly flipped) image now would draw."""
    mean, std = batch["latent_mean"], batch["latent_std"]
    if random_flip:
        flip = (torch.rand(len(mean), generator=generator, device=device) < 0.5)[:, None, None, None]
        mean = torch.where(flip, batch["flipped_latent_mean"], mean)
        std = torch.where(flip, batch["flipped_latent_std"], std)
    return mean + std * torch.randn(mean.shape, generator=generator, device=device)


def draw_captions(batch, generator, device) -> torch.Tensor:
    """Each cached image's caption index: its caption's, or for a row with a list of captions one of them drawn now
    from the training RNG (`generator`: checkpointed), so every step may see another and a resume draws the same."""
    if "caption_choices" not in batch:
        return batch["caption_index"].to(device)
    choices, counts = batch["caption_choices"].to(device), batch["caption_count"].to(device)
    pick = (torch.rand(len(counts), generator=generator, device=device) * counts).long()
    return choices.gather(1, pick[:, None])[:, 0]


# ---- the loop's other parts ---------------------------------------------------------------------------


def make_ema(model, model_cls, args: ImageStageArguments, accelerator):
    """diffusers' EMAModel of `model` (with warm-up), checkpointed with the run; None without `use_ema`. It keeps
    the device it was moved to across a resume (see `DeviceKeepingEMA`)."""
    if not args.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    class DeviceKeepingEMA(EMAModel):
        """accelerate's load_state loads a registered object's state on the CPU, and EMAModel.load_state_dict
        replaces its shadow weights with those tensors: after a resume on a GPU the EMA sat on the CPU, the
        denoiser on the GPU, and the first `step` mixed devices and raised. The loaded weights go where the old
        ones were."""

        def load_state_dict(self, state_dict: dict) -> None:
            device = self.shadow_params[0].device if self.shadow_params else None
            super().load_state_dict(state_dict)
            self.to(device)

    ema = DeviceKeepingEMA(
        model.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=3 / 4, foreach=True,
        model_cls=model_cls, model_config=model.config,
    )  # fmt: skip
    accelerator.register_for_checkpointing(ema)
    return ema


def empty_like(model):
    """A new denoiser (UNet or transformer) of `model`'s class, config and adapters, to load whole weights into (see
    `loop.whole_on_main`). Under FSDP2 `model`'s class is FSDP's subclass of the denoiser's; the new one is not."""
    from torch.distributed.fsdp import FSDPModule

    denoiser_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    empty = denoiser_class.from_config(model.config)
    for name, config in getattr(model, "peft_config", {}).items():
        empty.add_adapter(config, adapter_name=name)
    return empty


@contextlib.contextmanager
def ema_weights(ema, model):
    """Within it, `model` holds the EMA's weights (the ones the run saves), when `ema` is not None; its own after."""
    if ema is None:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())


def validation_grid(accelerator, args: ImageStageArguments, pipeline, model, ema, step: int, **call_arguments) -> None:
    """Render the validation prompts with `pipeline` (whose denoiser is `model`, with the EMA weights swapped in
    when kept) into validation/step-N.png, on the main process; `call_arguments` go to every pipeline call."""
    from hfgen.diffusion.rendering import generate_images, make_grid

    pipeline.set_progress_bar_config(disable=True)
    model.eval()
    with accelerator.autocast(), ema_weights(ema, model):
        rows = generate_images(
            pipeline, args.validation_prompts, args.num_validation_images, args.num_inference_steps,
            args.guidance_scale, args.seed, **call_arguments,
        )  # fmt: skip
    model.train()
    path = Path(args.output_dir) / "validation" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows).save(path)


def record_sample_size(denoiser, resolution: int, vae) -> None:
    """The denoiser's config `sample_size` (its latent side) set to the training resolution's before saving: the
    pipelines render sample_size x the VAE's factor by default, which was the base's size, not the trained one
    (Flux's transformer has no sample_size: its pipeline is told the size, `sampling_arguments`)."""
    if "sample_size" in denoiser.config:
        denoiser.register_to_config(sample_size=resolution // 2 ** (len(vae.config.block_out_channels) - 1))


def record_speed(output_dir: Path, steps: int, first_step: int, seconds: float, total_batch: int) -> None:
    tracking.update_eval(
        output_dir,
        {"train/steps": steps, "train/runtime_s": seconds, "train/steps_per_s": (steps - first_step) / seconds,
         "train/images_per_s": (steps - first_step) * total_batch / seconds},
    )  # fmt: skip


def write_lora_base(output_dir: Path, model_args, changes: dict) -> None:
    """lora_base.json: the pipeline a LoRA run's adapters load on (`hfgen generate` / `eval` / `merge` read it), with
    the `changes` the recipe made to it (`components.pipeline_changes`), which they apply."""
    from hfgen.finetune import resolved

    # a local base as an absolute path: `hfgen generate RUN` from another directory finds it (as adapter_config.json)
    base = {"pretrained_model_name_or_path": resolved(model_args.pretrained_model_name_or_path),
            "revision": model_args.revision, "variant": model_args.variant, "pipeline_changes": changes}  # fmt: skip
    tracking.write_json(output_dir / LORA_BASE, base)


def evaluate(output_dir: Path, data_args, args: ImageStageArguments, device) -> dict:
    """eval.json's figures for the saved pipeline, loaded as a user would: prompt adherence (digits), diversity,
    images/s; with aspect-ratio buckets on digits, the adherence in every bucket too (`bucket_adherence`)."""
    import json

    from hfgen import guard
    from hfgen.diffusion.components import load_pipeline
    from hfgen.evaluation.images import evaluate_pipeline

    guard.kill_point("eval")
    digits = data_args.dataset_name in DIGIT_DATASETS
    pipeline = load_pipeline(str(output_dir), device=str(device))  # once, for both measures
    results = evaluate_pipeline(
        str(output_dir), prompts=args.validation_prompts or None, images_per_prompt=args.eval_images_per_prompt,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, seed=args.seed,
        device=str(device), digits=digits, samples_dir=str(output_dir / "samples"), pipeline=pipeline,
    )  # fmt: skip
    if digits and data_args.aspect_ratio_buckets:
        from hfgen.evaluation.images import bucket_adherence

        sizes = [tuple(map(int, name.split("x"))) for name in tracking.read_json(output_dir / "buckets.json")]
        results |= bucket_adherence(str(output_dir), sizes, args.eval_images_per_prompt, args.num_inference_steps,
                                    args.guidance_scale, args.seed, str(device), pipeline=pipeline)  # fmt: skip
    tracking.update_eval(output_dir, results)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))
    return results
