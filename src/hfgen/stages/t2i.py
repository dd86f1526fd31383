"""Stage `t2i`: train the UNet of a latent text-to-image pipeline (Stable Diffusion layout), full or LoRA.

    hfgen train recipes/tiny/t2i_digits.yaml        (from scratch; its VAE comes from recipes/tiny/vae_digits.yaml)
    hfgen train recipes/sd-1.5/t2i_lora.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml scripts/train.py recipes/sd-1.5/t2i_full.yaml

The pipeline (tokenizer, CLIP text encoder, AutoencoderKL, UNet2DConditionModel, scheduler) is a pretrained one or
is built from component configs. The loss is DDPM's (Ho et al., 2020): noise the VAE latents of an image to a
random timestep and regress the noise (epsilon) or the velocity (v-prediction, Salimans & Ho, 2022), optionally
weighted by min-SNR (Hang et al., 2023) and with offset noise. Captions are replaced by the empty prompt with
probability `condition_dropout`, so the same UNet also learns the unconditional prediction that classifier-free
guidance (Ho & Salimans, 2022) needs at sampling time. LoRA puts peft adapters on the UNet's attention projections
(and the text encoder's, with `train_text_encoder`) and saves them where `pipe.load_lora_weights(dir)` finds them.

Deviation from diffusers' train_text_to_image.py, for speed: with `cache_latents` (the default) the frozen VAE
encodes every image once (both orientations when `random_flip`) and a frozen text encoder every distinct caption
once, before training; each step then draws z from the cached latent distribution, as encoding on the fly would.
Needs center crops; set `cache_latents: false` for random crops.

Data (hfgen.diffusion.image_stage, shared with `t2i_flow`): a dataset of captioned images, square or in aspect-ratio
buckets (`aspect_ratio_buckets`, hfgen.diffusion.buckets: every batch from one bucket); or DreamBooth's instance
images under `instance_prompt`, with prior preservation on class images the base generates (hfgen.diffusion.dreambooth).

Output: a StableDiffusionPipeline dir (`DiffusionPipeline.from_pretrained(dir)`), or for LoRA the adapter file plus
lora_base.json naming the base pipeline; validation grids in validation/; eval.json with prompt adherence,
diversity and images/s (hfgen.evaluation.images).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from hfgen import guard, loop, tracking
from hfgen.diffusion import image_stage
from hfgen.diffusion.components import (
    CAPTION_TOKENIZER,
    FrozenInHalf,
    PipelineArguments,
    check_pipeline_arguments,
    tokenize,
)
from hfgen.diffusion.data import ImageDataArguments
from hfgen.diffusion.dreambooth import prior_preserving_loss
from hfgen.diffusion.image_stage import ImageStageArguments
from hfgen.models import check_lora_targets

UNET_LORA_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class T2ITrainingArguments(ImageStageArguments):
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(UNET_LORA_MODULES), metadata={"help": "UNet modules that get adapters."}
    )
    train_text_encoder: bool = field(
        default=False, metadata={"help": "Also train the text encoder (LoRA adapters with use_lora, else fully)."}
    )
    snr_gamma: float | None = field(
        default=None, metadata={"help": "Min-SNR loss weighting gamma (5.0 recommended); unset: plain MSE."}
    )
    noise_offset: float = field(default=0.0, metadata={"help": "Offset noise scale (0.1 is common); 0: off."})
    cache_latents: bool = field(
        default=True,
        metadata={"help": "Encode images (and captions, if the text encoder is frozen) once before training."},
    )


ARGUMENTS = (PipelineArguments, ImageDataArguments, T2ITrainingArguments)


def check(model_args: PipelineArguments, data_args: ImageDataArguments, args: T2ITrainingArguments) -> list[str]:
    problems = check_pipeline_arguments(model_args) + image_stage.check_image_stage(model_args, data_args, args)
    if args.cache_latents and not data_args.center_crop:
        problems.append(
            "cache_latents needs center_crop: true (random crops differ every epoch); or cache_latents: false"
        )
    if args.use_lora and args.train_text_encoder and (problem := text_encoder_lora_problem()):
        problems.append(problem)
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        problems.append(f"snr_gamma must be positive, got {args.snr_gamma}")
    return problems


def text_encoder_lora_problem() -> str | None:
    """transformers' add_adapter (the text encoder's LoRA) needs a newer peft than diffusers' does (the UNet's)."""
    from importlib.metadata import version

    from packaging.version import Version
    from transformers.integrations.peft import MIN_PEFT_VERSION

    installed = version("peft")
    if Version(installed) < Version(MIN_PEFT_VERSION):
        return (f"use_lora with train_text_encoder needs peft >= {MIN_PEFT_VERSION} (transformers' adapters on the "
                f"text encoder); peft {installed} is installed: upgrade it, or set train_text_encoder: false")  # fmt: skip
    return None


def refused_engines(model_args: PipelineArguments, data_args: ImageDataArguments, args: T2ITrainingArguments):
    """Engines this stage cannot use (see the README's engine table)."""
    refused = {"zero3": "ZeRO-3 would partition the frozen text encoder at load, which this loop calls directly; use "
                        "zero2 or fsdp2"}  # fmt: skip
    if args.train_text_encoder:  # two trained models: DeepSpeed takes one per engine, FSDP2 clips one at a time
        why = "train_text_encoder trains a second model; use DDP"
        refused |= {"zero2": why, "fsdp2": why}
    if args.use_ema:
        refused["fsdp2"] = "use_ema averages whole UNet weights, which FSDP2 shards; use DDP or zero2"
    return refused


# ---- loss ------------------------------------------------------------------------------------------------


def diffusion_loss(model_pred, target, timesteps, noise_scheduler, snr_gamma: float | None):
    """MSE to the target, or with min-SNR weighting (Hang et al., 2023, section 3.4): each timestep's loss is
    weighted by min(SNR, gamma) / SNR for epsilon targets, / (SNR + 1) for v targets."""
    from diffusers.training_utils import compute_snr

    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float())
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma)
    weights = weights / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weights / snr
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    return (loss * weights).mean()


# ---- the stage ---------------------------------------------------------------------------------------------


def run(model_args: PipelineArguments, data_args: ImageDataArguments, args: T2ITrainingArguments) -> Path:
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import cast_training_params

    from hfgen.diffusion.components import load_components
    from hfgen.diffusion.data import every_caption
    from hfgen.diffusion.latents import encode_captions
    from hfgen.diffusion.training import (
        StepLog,
        TrainingRNG,
        accumulation_scale,
        check_trained_to_end,
        epoch_batches,
        make_accelerator,
        make_optimizer,
        maybe_checkpoint,
        prepare_training,
        resume,
        weight_dtype,
    )  # fmt: skip

    accelerator = make_accelerator(args, refused_engines(model_args, data_args, args))
    output_dir = Path(args.output_dir)
    device, dtype = accelerator.device, weight_dtype(accelerator)

    # Models: pretrained pipeline, or components from configs (the caption tokenizer learns the training captions).
    train_rows = image_stage.training_rows(data_args, args, args.seed)
    parts = load_components(model_args, every_caption(train_rows[data_args.caption_column]))
    tokenizer, text_encoder, vae, unet = parts["tokenizer"], parts["text_encoder"], parts["vae"], parts["unet"]
    noise_scheduler = parts["noise_scheduler"]
    if model_args.text_encoder_pretraining_steps:  # a new text encoder learns captions the CLIP way first
        from hfgen.diffusion.text_pretraining import pretrain_text_encoder

        first, last = pretrain_text_encoder(
            text_encoder, tokenizer, train_rows, data_args, model_args.text_encoder_pretraining_steps, args.seed, device
        )
        tracking.update_eval(output_dir, {"text_encoder/clip_loss_initial": first, "text_encoder/clip_loss": last})
    # DreamBooth's class images come from the base pipeline, before it trains.
    n_instance = len(train_rows)
    if args.use_lora:  # before the class images, which can take a while
        check_lora_targets(args.lora_target_modules, unet, "the UNet", all_linear=False,
                           warn_partial=args.lora_target_modules != list(UNET_LORA_MODULES))  # fmt: skip
    train_rows = image_stage.with_class_rows(
        train_rows, data_args, args, lambda: base_pipeline(model_args, parts).to(device), accelerator,
        pretrained=model_args.pretrained_model_name_or_path,
    )  # fmt: skip
    if accelerator.is_main_process:
        cut_at = "max_caption_tokens" if model_args.tokenizer_name == CAPTION_TOKENIZER and not (
            model_args.pretrained_model_name_or_path) else "the tokenizer's model_max_length"  # fmt: skip
        image_stage.warn_of_cut_captions(
            train_rows, data_args.caption_column, tokenizer, tokenizer.model_max_length, cut_at
        )
    train_text_encoder = args.train_text_encoder
    vae.requires_grad_(False)
    text_encoder.requires_grad_(train_text_encoder and not args.use_lora)
    unet.requires_grad_(not args.use_lora)
    if args.use_lora:
        from peft import LoraConfig

        lora = dict(r=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank, init_lora_weights="gaussian")
        unet.add_adapter(LoraConfig(**lora, target_modules=args.lora_target_modules))
        if train_text_encoder:
            text_encoder.add_adapter(LoraConfig(**lora, target_modules=TEXT_ENCODER_LORA_MODULES))
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    # Frozen weights in the mixed-precision dtype; trained ones (full UNet, LoRA adapters) stay float32. The frozen
    # VAE and text encoder are saved as loaded (a LoRA run saves no UNet).
    if not train_text_encoder:
        loop.replicated(accelerator, text_encoder)  # whole on every process (the main one renders alone)
    for model in (vae, text_encoder, unet):
        model.to(device)
    frozen_models = {"vae": vae} if train_text_encoder else {"vae": vae, "text_encoder": text_encoder}
    frozen = FrozenInHalf(model_args, frozen_models, dtype)
    if args.use_lora and dtype != torch.float32:  # (diffusers warns about any dtype cast, even a no-op one)
        unet.to(dtype=dtype)
    if args.use_lora:
        cast_training_params([unet, text_encoder] if train_text_encoder else [unet], dtype=torch.float32)
    ema_unet = image_stage.make_ema(unet, UNet2DConditionModel, args, accelerator)

    # Data: cached latent distributions and captions (hidden states when the text encoder is frozen, else token
    # ids), or pixels and token ids encoded every step. Bucket sides: multiples of the VAE's and UNet's downsampling
    # and of 8 (StableDiffusionPipeline samples no other sizes).
    downsampling = 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.block_out_channels) - 1)
    size_multiple = math.lcm(8, downsampling)
    train_set, captions, train_loader = image_stage.training_data(
        train_rows, n_instance, data_args, args, accelerator, vae, size_multiple,
        tokenizer=None if args.cache_latents else tokenizer,
    )  # fmt: skip
    if args.cache_latents:
        empty_caption = len(captions) - 1
        if train_text_encoder:
            caption_ids = tokenize(tokenizer, captions).to(device)
        else:
            caption_states = encode_captions(captions, tokenizer, text_encoder, device)
    else:
        empty_ids = tokenize(tokenizer, [""]).to(device)

    # Optimizer over what trains, schedule, and everything through accelerate.
    trained = [unet] + ([text_encoder] if train_text_encoder else [])
    optimizer = make_optimizer(
        [[p for p in model.parameters() if p.requires_grad] for model in trained], args, accelerator.num_processes
    )
    trained, optimizer, train_loader, lr_scheduler, budget = prepare_training(
        accelerator, args, trained, optimizer, train_loader
    )
    max_steps, num_epochs, steps_per_epoch = budget
    unet = trained[0]
    if train_text_encoder:
        text_encoder = trained[1]
    if ema_unet is not None:
        ema_unet.to(device)

    log = StepLog(accelerator, args.output_dir, args.logging_steps)
    rng = TrainingRNG(args.seed + accelerator.process_index, device, log)  # the log's window resumes with it
    accelerator.register_for_checkpointing(rng)
    global_step, first_epoch, skip = resume(accelerator, args, steps_per_epoch, rng)
    divergence = guard.Divergence(output_dir)
    prior_loss_weight = args.prior_loss_weight if args.with_prior_preservation else None
    total_batch = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    accelerator.print(f"t2i: {trainable:,} trainable UNet parameters, {len(train_set)} images, {max_steps} steps")

    loop_started, first_step = time.perf_counter(), global_step
    for epoch in range(first_epoch, num_epochs):
        for model in trained:
            model.train()
        skipped = skip if epoch == first_epoch else 0
        for index, batch in enumerate(epoch_batches(accelerator, train_loader, epoch, skipped), skipped):
            # (an epoch's last, shorter accumulation: its losses weigh GA / k, for the mean over its k batches)
            scale = accumulation_scale(args, len(train_loader), index)
            with accelerator.accumulate(*trained):
                # Convert images to latent space: z ~ q(z|x) from the cached posterior, or by encoding the pixels
                if args.cache_latents:
                    latents = image_stage.sample_cached_latents(batch, data_args.random_flip, rng.generator, device)
                else:
                    latents = vae.encode(batch["pixel_values"].to(dtype)).latent_dist.sample(rng.generator)
                latents = latents.to(torch.float32) * vae.config.scaling_factor

                # Sample noise that we'll add to the latents (offset noise shifts whole channels: darker/brighter images)
                noise = torch.randn(latents.shape, generator=rng.generator, device=device)
                if args.noise_offset:
                    noise += args.noise_offset * torch.randn(
                        latents.shape[:2] + (1, 1), generator=rng.generator, device=device
                    )
                bsz = latents.shape[0]
                # Sample a random timestep for each image
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=rng.generator, device=device
                )
                # Add noise to the latents according to the noise magnitude at each timestep
                # (this is the forward diffusion process)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)

                # Get the text embedding for conditioning; drop captions at random for classifier-free guidance
                dropped = torch.rand(bsz, generator=rng.generator, device=device) < args.condition_dropout
                if args.cache_latents:
                    caption_index = torch.where(
                        dropped, empty_caption, image_stage.draw_captions(batch, rng.generator, device)
                    )
                if args.cache_latents and not train_text_encoder:
                    encoder_hidden_states = caption_states[caption_index]
                else:
                    if args.cache_latents:
                        input_ids = caption_ids[caption_index]
                    else:
                        input_ids = torch.where(dropped[:, None], empty_ids, batch["input_ids"])
                    encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]

                # Get the target for loss depending on the prediction type
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise

                # Predict the noise residual (or velocity) and compute loss (DreamBooth: instance + weighted prior)
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states.to(dtype), return_dict=False)[0]
                loss = prior_preserving_loss(
                    lambda *part: diffusion_loss(*part, noise_scheduler, args.snr_gamma),
                    (model_pred, target, timesteps), prior_loss_weight,
                )  # fmt: skip

                # Backpropagate
                log.add_micro_batch(loss=loss)
                accelerator.backward(loss * scale)
                loop.clip_gradients(accelerator, trained, args.max_grad_norm)
                if accelerator.sync_gradients:
                    guard.kill_point("step", global_step + 1)
                    divergence.check_step(global_step + 1, loss, optimizer)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            # Checks once an optimizer step has been taken (not on accumulation micro-steps)
            if accelerator.sync_gradients:
                log.end_step(lr=lr_scheduler.get_last_lr()[0])  # the rate this step used, before the schedule moves on
                lr_scheduler.step()
                global_step += 1
                if ema_unet is not None:
                    ema_unet.step(unet.parameters())
                log.maybe_write(global_step)
                maybe_checkpoint(accelerator, args, global_step)
                if args.validation_steps and global_step % args.validation_steps == 0:
                    with loop.gathered(accelerator, unet, text_encoder) as (whole_unet, whole_text_encoder):
                        validate(
                            accelerator, args, parts, whole_unet, whole_text_encoder, ema_unet, global_step,
                            data_args.resolution,
                        )  # fmt: skip
                if global_step >= max_steps:
                    break
    check_trained_to_end(global_step, max_steps)
    log.maybe_write(global_step, force=True)
    loop_time = time.perf_counter() - loop_started
    accelerator.wait_for_everyone()
    image_stage.record_speed(output_dir, global_step, first_step, loop_time, total_batch)

    if global_step > first_step:
        # The UNet the run saves (the EMA average when kept: early in its warm-up that is about the trained weights)
        # on the last step's inputs, on every process, before the save: the guard saw only that step's loss and
        # gradients, and an update that broke the model saved one whose every sample was NaN.
        with torch.no_grad(), loop.gathered(accelerator, unet) as (whole,), image_stage.ema_weights(ema_unet, whole):
            prediction = whole(noisy_latents, timesteps, encoder_hidden_states.to(dtype), return_dict=False)[0]
        guard.check_final_model(
            output_dir, global_step, {"noise prediction on the last batch": prediction.float().abs().mean().item()}
        )

    # Save: the full pipeline (EMA weights when kept), or the LoRA adapters beside the name of their base.
    whole_unet = loop.whole_on_main(accelerator, unet, lambda: image_stage.empty_like(unet))
    if accelerator.is_main_process:
        if ema_unet is not None:
            ema_unet.copy_to(whole_unet.parameters())
        text_encoder = accelerator.unwrap_model(text_encoder)  # (trained only under DDP: see refused_engines)
        # saved first: a failure while rendering the last grid leaves the trained weights on disk
        save(output_dir, model_args, args, parts, whole_unet, text_encoder, frozen, data_args.resolution)
        guard.kill_point("final_save")
        validate(accelerator, args, parts, whole_unet, text_encoder, None, global_step, data_args.resolution)
    loop.maybe_write_fingerprint(accelerator, trained[0], output_dir)
    accelerator.wait_for_everyone()
    tracking.finish_trackers(accelerator)  # the process group outlives the stage: tracking.shutdown_distributed

    # Evaluate: prompt adherence (digits), diversity and images/s of the saved pipeline, as a user would load it.
    if accelerator.is_main_process and args.eval_images_per_prompt:
        image_stage.evaluate(output_dir, data_args, args, device)
    return output_dir


def base_pipeline(model_args: PipelineArguments, parts):
    """The pipeline as it was before training, sampled as its users sample it: a pretrained base with its own
    sampler and VAE, not the recipe's prediction_type / vae_name_or_path (which its UNet was not trained with)."""
    from hfgen.diffusion.components import load_vae, make_pipeline

    vae = parts["vae"]
    if model_args.pretrained_model_name_or_path and model_args.vae_name_or_path:
        vae = load_vae(
            model_args.pretrained_model_name_or_path, model_args.revision, subfolder="vae", variant=model_args.variant
        )
    return make_pipeline(parts["tokenizer"], parts["text_encoder"], vae, parts["unet"], parts["base_sampler"])


def validate(accelerator, args, parts, unet, text_encoder, ema_unet, step: int, resolution: int) -> None:
    """Render the validation prompts with the current (or EMA) weights into validation/step-N.png (main process).
    `unet` and `text_encoder` are unwrapped, with whole weights (`loop.gathered`)."""
    if not args.validation_prompts or not accelerator.is_main_process:
        return
    from hfgen.diffusion.components import make_pipeline

    pipeline = make_pipeline(parts["tokenizer"], text_encoder, parts["vae"], unet, parts["sampler"])
    size = {"height": resolution, "width": resolution}  # the trained size, not the base UNet's sample_size
    image_stage.validation_grid(accelerator, args, pipeline, unet, ema_unet, step, **size)


def save(
    output_dir: Path, model_args: PipelineArguments, args: T2ITrainingArguments, parts, unet, text_encoder,
    frozen: FrozenInHalf, resolution: int,
) -> None:  # fmt: skip
    """A full pipeline dir, or LoRA weights that `pipe.load_lora_weights(output_dir)` loads on the base pipeline."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    from hfgen.diffusion.components import pipeline_changes

    if args.use_lora:
        from peft.utils import get_peft_model_state_dict

        text_encoder_layers = text_encoder_metadata = None
        if args.train_text_encoder:
            text_encoder_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
            text_encoder_metadata = text_encoder.peft_config["default"].to_dict()
        # The adapters' configs go into the file's metadata: without them load_lora_weights takes alpha = rank
        # (scale 1), not the recipe's lora_alpha / lora_rank.
        StableDiffusionPipeline.save_lora_weights(
            output_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
            text_encoder_lora_layers=text_encoder_layers, safe_serialization=True,
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=text_encoder_metadata,
        )  # fmt: skip
        scheduler_changes = {"prediction_type": model_args.prediction_type} if model_args.prediction_type else {}
        image_stage.write_lora_base(
            output_dir, model_args, pipeline_changes(model_args, parts["vae"], scheduler_changes)
        )
        return
    from hfgen.diffusion.components import make_pipeline

    # float32 on disk whatever the training precision (as the pretrained pipelines ship): what trained is float32
    frozen.restore()
    image_stage.record_sample_size(unet, resolution, parts["vae"])
    pipeline = make_pipeline(parts["tokenizer"], text_encoder, parts["vae"], unet, parts["sampler"])
    pipeline.save_pretrained(output_dir, safe_serialization=True)
