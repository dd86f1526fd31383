"""Stage `t2i_flow`: train the transformer of a flow-matching text-to-image pipeline (Stable Diffusion 3 layout:
MMDiT, two CLIP text encoders with projection, optional T5, 16-channel VAE; or a pretrained Flux.1 pipeline), full
or LoRA.

    hfgen train recipes/tiny/t2i_flow_digits.yaml   (from scratch; its VAE comes from recipes/tiny/vae_digits16.yaml)
    hfgen train recipes/tiny/t2i_flow_digits_lora.yaml
    hfgen train recipes/sd-3.5-medium/lora.yaml
    hfgen train recipes/flux.1-dev/lora.yaml

The loss is rectified flow's (hfgen.diffusion.flow): latents and noise joined by a straight line, the transformer
regresses the velocity, with the timestep samplings of SD3's training (`weighting_scheme`, `logit_mean`,
`logit_std`, `mode_scale`) and the scheduler's `shift`. The text encoders are frozen and every distinct caption is
encoded once by the pipeline's own `encode_prompt` (sequence and pooled embeddings), so training conditions on
exactly what sampling will; the VAE latents are cached too (hfgen.diffusion.latents, shared with `t2i`). Captions
are dropped to the empty prompt with probability `condition_dropout` (classifier-free guidance). Data as for `t2i`
(hfgen.diffusion.image_stage): square or in aspect-ratio buckets, or DreamBooth's instance and class images.

Output: a StableDiffusion3Pipeline dir (`DiffusionPipeline.from_pretrained(dir)`), or for LoRA the adapter file
plus lora_base.json (`pipe.load_lora_weights(dir)` on the base); validation grids; eval.json as for `t2i`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hfgen import guard, loop, tracking
from hfgen.diffusion import image_stage
from hfgen.diffusion.components import FrozenInHalf
from hfgen.diffusion.data import ImageDataArguments
from hfgen.diffusion.dreambooth import prior_preserving_loss
from hfgen.diffusion.flow import WEIGHTING_SCHEMES
from hfgen.diffusion.flow_components import (
    CAPTION_TOKENIZER,
    FlowPipelineArguments,
    check_flow_pipeline_arguments,
    is_flux,
    size_problems,
)
from hfgen.diffusion.image_stage import ImageStageArguments
from hfgen.models import check_lora_targets

# Attention of both streams (image and text) and both MLPs of every MMDiT block.
TRANSFORMER_LORA_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]  # fmt: skip


@dataclass
class FlowTrainingArguments(ImageStageArguments):
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(TRANSFORMER_LORA_MODULES),
        metadata={"help": "Transformer modules that get adapters (attention and MLP projections)."},
    )
    weighting_scheme: str = field(
        default="logit_normal",
        metadata={"help": "Timestep sampling (logit_normal, mode, uniform) or loss weighting (sigma_sqrt, cosmap).",
                  "choices": WEIGHTING_SCHEMES},
    )  # fmt: skip
    logit_mean: float = field(default=0.0, metadata={"help": "Mean of the logit-normal timestep density."})
    logit_std: float = field(default=1.0, metadata={"help": "Std of the logit-normal timestep density."})
    mode_scale: float = field(default=1.29, metadata={"help": "Scale of the `mode` timestep density."})


ARGUMENTS = (FlowPipelineArguments, ImageDataArguments, FlowTrainingArguments)


def check(model_args: FlowPipelineArguments, data_args: ImageDataArguments, args: FlowTrainingArguments) -> list[str]:
    problems = check_flow_pipeline_arguments(model_args) + image_stage.check_image_stage(model_args, data_args, args)
    if not data_args.center_crop:
        problems.append("t2i_flow caches latents, which needs center_crop: true")
    if args.logit_std <= 0:
        problems.append(f"logit_std must be positive, got {args.logit_std}")
    # Each density's parameters are read by it alone (compute_density_for_timestep_sampling): set for another, they
    # would be ignored. (Compared with the defaults: a recipe spelling those out for another scheme still checks.)
    unused = {"logit_normal": ("logit_mean", "logit_std"), "mode": ("mode_scale",)}
    for scheme, keys in unused.items():
        changed = [k for k in keys if getattr(args, k) != getattr(FlowTrainingArguments, k)]
        if changed and args.weighting_scheme != scheme:
            problems.append(f"{', '.join(changed)}: parameters of the {scheme} timestep density; weighting_scheme "
                            f"{args.weighting_scheme} does not read them: drop them or set weighting_scheme: {scheme}")  # fmt: skip
    return problems + size_problems(model_args, data_args)


def refused_engines(model_args, data_args, args):
    refused = {"zero3": "ZeRO-3 would partition the frozen text encoders, which this loop calls directly; use zero2 "
                        "or fsdp2"}  # fmt: skip
    if args.use_ema:
        refused["fsdp2"] = "use_ema averages whole transformer weights, which FSDP2 shards; use DDP or zero2"
    return refused


def caption_lengths(model_args, parts: dict) -> list[tuple]:
    """(tokenizer, the tokens it encodes, what sets that) for each distinct tokenizer of the pipeline: CLIP's
    model_max_length (max_caption_tokens for the caption tokenizer built here), T5's max_sequence_length (unset:
    the pipeline's default, 256 for SD3 and 512 for Flux)."""
    import inspect

    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    pipeline_class = FluxPipeline if is_flux(parts) else StableDiffusion3Pipeline
    t5_default = inspect.signature(pipeline_class.__call__).parameters["max_sequence_length"].default
    scratch = model_args.tokenizer_name == CAPTION_TOKENIZER and not model_args.pretrained_model_name_or_path
    lengths, seen = [], set()
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = parts.get(name)
        if tokenizer is None or id(tokenizer) in seen:
            continue
        seen.add(id(tokenizer))
        if type(tokenizer).__name__.startswith("T5"):
            length = model_args.max_sequence_length or t5_default
            lengths.append((tokenizer, length, "max_sequence_length" if model_args.max_sequence_length else
                            "the pipeline's T5 length"))  # fmt: skip
        else:
            lengths.append((tokenizer, tokenizer.model_max_length, "max_caption_tokens" if scratch else
                            f"{name}'s model_max_length"))  # fmt: skip
    return lengths


def encode_captions(pipeline, captions: list[str], device, max_sequence_length: int | None, batch_size: int = 256):
    """(sequence embeddings, pooled embeddings) of each caption, by the pipeline's own `encode_prompt` (SD3: both
    CLIPs' penultimate states then T5's, or zeros without it; Flux: T5's states, CLIP's pooled output)."""
    length = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    sequences, pooled = [], []
    with torch.inference_mode():
        for start in range(0, len(captions), batch_size):
            chunk = captions[start : start + batch_size]
            if type(pipeline).__name__ == "FluxPipeline":
                embeds, pooled_embeds, _ = pipeline.encode_prompt(chunk, chunk, device=device, **length)
            else:
                embeds, _, pooled_embeds, _ = pipeline.encode_prompt(
                    chunk, chunk, chunk, device=device, do_classifier_free_guidance=False, **length
                )
            sequences.append(embeds.float())
            pooled.append(pooled_embeds.float())
    return torch.cat(sequences), torch.cat(pooled)


def run(model_args: FlowPipelineArguments, data_args: ImageDataArguments, args: FlowTrainingArguments) -> Path:
    from diffusers.training_utils import cast_training_params

    from hfgen.diffusion.data import every_caption
    from hfgen.diffusion.flow import flow_loss, noisy_latents, sample_sigmas
    from hfgen.diffusion.flow_components import (
        base_parts,
        latent_multiple,
        load_flow_components,
        make_pipeline,
        predict_velocity,
        sampling_arguments,
        set_latent_normalisation,
    )  # fmt: skip
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

    train_rows = image_stage.training_rows(data_args, args, args.seed)
    parts = load_flow_components(model_args, every_caption(train_rows[data_args.caption_column]))
    transformer, vae = parts["transformer"], parts["vae"]
    # The training schedule (all num_train_timesteps sigmas, shifted): a copy, as sampling resets the pipeline's own
    scheduler = type(parts["scheduler"]).from_config(parts["scheduler"].config)
    if model_args.text_encoder_pretraining_steps:  # new CLIP text encoders learn the captions contrastively first
        from hfgen.diffusion.text_pretraining import pretrain_text_encoder

        for index, name in enumerate(("text_encoder", "text_encoder_2")):
            first, last = pretrain_text_encoder(
                parts[name], parts["tokenizer"], train_rows, data_args, model_args.text_encoder_pretraining_steps,
                args.seed + index, device,
            )  # fmt: skip
            tracking.update_eval(output_dir, {f"{name}/clip_loss_initial": first, f"{name}/clip_loss": last})
    # Pipeline-call arguments so that samples (DreamBooth's class images, validation) are conditioned as training is
    sampling = sampling_arguments(model_args, data_args, parts)
    n_instance = len(train_rows)  # DreamBooth's class images come from the base pipeline, before it trains
    if args.use_lora:  # before the class images, which can take a while
        check_lora_targets(args.lora_target_modules, transformer, "the denoising transformer", all_linear=False,
                           warn_partial=args.lora_target_modules != list(TRANSFORMER_LORA_MODULES))  # fmt: skip
    base = lambda: make_pipeline(base_parts(model_args, parts)).to(device)  # noqa: E731
    train_rows = image_stage.with_class_rows(
        train_rows, data_args, args, base, accelerator, sampling, pretrained=model_args.pretrained_model_name_or_path
    )
    if accelerator.is_main_process:
        for tokenizer, length, cut_at in caption_lengths(model_args, parts):
            image_stage.warn_of_cut_captions(train_rows, data_args.caption_column, tokenizer, length, cut_at)
    # The frozen VAE and text encoders compute in the mixed-precision dtype and are saved as loaded
    frozen_models = {n: parts[n] for n in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3") if parts.get(n)}
    for model in frozen_models.values():
        loop.replicated(accelerator, model)
    frozen = FrozenInHalf(model_args, frozen_models, dtype)
    transformer.requires_grad_(not args.use_lora)
    if args.use_lora:
        from peft import LoraConfig

        transformer.add_adapter(
            LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank, init_lora_weights="gaussian",
                       target_modules=args.lora_target_modules)
        )  # fmt: skip
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.to(device)
    if args.use_lora:
        if dtype != torch.float32:
            transformer.to(dtype=dtype)
        cast_training_params([transformer], dtype=torch.float32)
    ema = image_stage.make_ema(transformer, type(transformer), args, accelerator)  # SD3 or Flux transformer

    # Cached inputs: VAE posteriors per image (per bucket), and every distinct caption's embeddings (the last: the
    # empty prompt). Bucket sides: multiples of the VAE's downsampling times the transformer's patch size (Flux:
    # its 2x2 latent packing; its config says patch_size 1).
    size_multiple = latent_multiple(vae.config, parts["transformer"].config)
    train_set, captions, train_loader = image_stage.training_data(
        train_rows, n_instance, data_args, args, accelerator, vae, size_multiple
    )
    if vae.config.shift_factor is None:  # a VAE trained here: normalise its latents as SD3 does
        set_latent_normalisation(vae, image_stage.latent_means(train_set))
        parts["latent_factors_set"] = True  # a LoRA run records them (its output has no VAE of its own)
    shift, latent_scale = vae.config.shift_factor, vae.config.scaling_factor
    caption_states, caption_pooled = encode_captions(
        make_pipeline(parts), captions, device, model_args.max_sequence_length
    )
    empty_caption = len(captions) - 1

    optimizer = make_optimizer(
        [[p for p in transformer.parameters() if p.requires_grad]], args, accelerator.num_processes
    )
    (transformer,), optimizer, train_loader, lr_scheduler, budget = prepare_training(
        accelerator, args, [transformer], optimizer, train_loader
    )
    max_steps, num_epochs, steps_per_epoch = budget
    if ema is not None:
        ema.to(device)

    log = StepLog(accelerator, args.output_dir, args.logging_steps)
    rng = TrainingRNG(args.seed + accelerator.process_index, device, log)  # the log's window resumes with it
    accelerator.register_for_checkpointing(rng)
    global_step, first_epoch, skip = resume(accelerator, args, steps_per_epoch, rng)
    divergence = guard.Divergence(output_dir)
    prior_loss_weight = args.prior_loss_weight if args.with_prior_preservation else None
    total_batch = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    trainable = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    accelerator.print(f"t2i_flow: {trainable:,} trainable parameters, {len(train_set)} images, {max_steps} steps")

    loop_started, first_step = time.perf_counter(), global_step
    for epoch in range(first_epoch, num_epochs):
        transformer.train()
        skipped = skip if epoch == first_epoch else 0
        for index, batch in enumerate(epoch_batches(accelerator, train_loader, epoch, skipped), skipped):
            # (an epoch's last, shorter accumulation: its losses weigh GA / k, for the mean over its k batches)
            loss_scale = accumulation_scale(args, len(train_loader), index)
            with accelerator.accumulate(transformer):
                latents = image_stage.sample_cached_latents(batch, data_args.random_flip, rng.generator, device)
                latents = (latents.float() - shift) * latent_scale
                noise = torch.randn(latents.shape, generator=rng.generator, device=device)
                bsz = len(latents)
                timesteps, sigmas = sample_sigmas(
                    scheduler, bsz, args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale,
                    rng.generator, device,
                )  # fmt: skip
                dropped = torch.rand(bsz, generator=rng.generator, device=device) < args.condition_dropout
                caption_index = torch.where(
                    dropped, empty_caption, image_stage.draw_captions(batch, rng.generator, device)
                )
                model_pred = predict_velocity(  # SD3 or Flux inputs, the guidance of a guidance-distilled one
                    transformer, parts["transformer"].config, noisy_latents(latents, noise, sigmas).to(dtype),
                    timesteps, caption_states[caption_index].to(dtype), caption_pooled[caption_index].to(dtype),
                    model_args.training_guidance_scale,
                )  # fmt: skip
                loss = prior_preserving_loss(  # DreamBooth: instance loss + weighted prior loss
                    lambda *part: flow_loss(*part, args.weighting_scheme),
                    (model_pred, latents, noise, sigmas),
                    prior_loss_weight,
                )
                log.add_micro_batch(loss=loss)
                accelerator.backward(loss * loss_scale)
                loop.clip_gradients(accelerator, transformer, args.max_grad_norm)
                if accelerator.sync_gradients:
                    guard.kill_point("step", global_step + 1)
                    divergence.check_step(global_step + 1, loss, optimizer)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                log.end_step(lr=lr_scheduler.get_last_lr()[0])  # the rate this step used, before the schedule moves on
                lr_scheduler.step()
                global_step += 1
                if ema is not None:
                    ema.step(transformer.parameters())
                log.maybe_write(global_step)
                maybe_checkpoint(accelerator, args, global_step)
                if args.validation_steps and global_step % args.validation_steps == 0:
                    with loop.gathered(accelerator, transformer) as (whole,):
                        validate(accelerator, args, parts, whole, ema, global_step, sampling)
                if global_step >= max_steps:
                    break
    check_trained_to_end(global_step, max_steps)
    log.maybe_write(global_step, force=True)
    loop_time = time.perf_counter() - loop_started
    accelerator.wait_for_everyone()
    image_stage.record_speed(output_dir, global_step, first_step, loop_time, total_batch)

    if global_step > first_step:
        # The transformer the run saves (the EMA average when kept) on the last step's inputs, on every process,
        # before the save: the guard saw only that step's loss and gradients, and an update that broke the model
        # saved one whose every sample was NaN.
        with torch.no_grad(), loop.gathered(accelerator, transformer) as (whole,), image_stage.ema_weights(ema, whole):
            prediction = predict_velocity(
                whole, parts["transformer"].config, noisy_latents(latents, noise, sigmas).to(dtype), timesteps,
                caption_states[caption_index].to(dtype), caption_pooled[caption_index].to(dtype),
                model_args.training_guidance_scale,
            )  # fmt: skip
        guard.check_final_model(
            output_dir, global_step, {"velocity prediction on the last batch": prediction.float().abs().mean().item()}
        )

    # Save from whole weights on the main process: FSDP2's unsharded parameters live in its gather buffers, which
    # safetensors cannot write (so not `loop.gathered` here, as for validation).
    whole = loop.whole_on_main(accelerator, transformer, lambda: image_stage.empty_like(transformer))
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(whole.parameters())
        # saved first: a failure while rendering the last grid leaves the trained weights on disk
        save(output_dir, model_args, args, parts, whole, frozen, data_args.resolution)
        guard.kill_point("final_save")
        validate(accelerator, args, parts, whole, None, global_step, sampling)
    loop.maybe_write_fingerprint(accelerator, transformer, output_dir)
    accelerator.wait_for_everyone()
    tracking.finish_trackers(accelerator)

    if accelerator.is_main_process and args.eval_images_per_prompt:
        image_stage.evaluate(output_dir, data_args, args, device)
    return output_dir


def validate(accelerator, args, parts, transformer, ema, step: int, sampling: dict) -> None:
    """The validation prompts rendered with the current (or EMA) weights into validation/step-N.png (`sampling`:
    more pipeline-call arguments)."""
    if not args.validation_prompts or not accelerator.is_main_process:
        return
    from hfgen.diffusion.flow_components import make_pipeline

    image_stage.validation_grid(
        accelerator, args, make_pipeline(parts, transformer), transformer, ema, step, **sampling
    )


def save(output_dir: Path, model_args, args, parts, transformer, frozen, resolution: int) -> None:
    """A StableDiffusion3Pipeline dir (float32), or LoRA weights for `pipe.load_lora_weights(output_dir)`."""
    from diffusers import StableDiffusion3Pipeline

    if args.use_lora:
        from peft.utils import get_peft_model_state_dict

        # peft's key names (lora_A/lora_B), as diffusers' train_dreambooth_lora_sd3.py saves them, and the adapter's
        # config in the file's metadata (without it load_lora_weights takes alpha = rank, not the recipe's alpha)
        StableDiffusion3Pipeline.save_lora_weights(
            output_dir, transformer_lora_layers=get_peft_model_state_dict(transformer), safe_serialization=True,
            transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
        )  # fmt: skip
        from hfgen.diffusion.flow_components import lora_pipeline_changes

        image_stage.write_lora_base(output_dir, model_args, lora_pipeline_changes(model_args, parts))
        return
    from hfgen.diffusion.flow_components import make_pipeline

    frozen.restore()  # (what trained is float32)
    image_stage.record_sample_size(transformer, resolution, parts["vae"])
    make_pipeline(parts, transformer).save_pretrained(output_dir, safe_serialization=True)
