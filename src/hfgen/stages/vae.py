"""Stage `vae`: train an AutoencoderKL, the latent space of a latent diffusion pipeline.

    hfgen train recipes/tiny/vae_digits.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml scripts/train.py recipes/tiny/vae_digits.yaml

From a config (scratch) or a pretrained VAE (fine-tuning). The loss is the Latent Diffusion autoencoder's
(Rombach et al., 2022, appendix G): reconstruction + kl_weight * KL to N(0, I), both per pixel, plus, when
`adversarial_weight` > 0, a hinge GAN term from a small PatchGAN discriminator (Isola et al., 2017) switched on at
`adversarial_start_step`. Cut from the paper: the LPIPS perceptual term (its VGG weights would be a download) and
the adaptive GAN weight (a fixed weight here). After training from scratch the latent scaling factor (1 / std of
the training latents, how SD's 0.18215 was found) is written into the VAE's config, so the t2i stage's latents have
unit variance; a fine-tuned VAE keeps its pretrained factor (the denoisers made for it use that scale). Both
figures go to eval.json (`vae/scaling_factor`, `vae/measured_scaling_factor`). Held-out reconstruction error before and after training goes to eval.json; originals over
reconstructions to reconstructions.png. The output dir loads with `AutoencoderKL.from_pretrained(dir)` and is what a
t2i recipe names as `vae_name_or_path`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from hfgen import guard, loop, tracking
from hfgen.diffusion import training
from hfgen.diffusion.components import build_vae, load_vae, patch_discriminator
from hfgen.diffusion.data import (
    ImageDataArguments,
    check_image_data,
    held_out_transform,
    load_image_splits,
    pixel_transform,
    undecoded,
)
from hfgen.diffusion.latents import PixelRows
from hfgen.errors import UserError
from hfgen.models import check_config_file, check_model_source

EVAL_IMAGES_SHOWN = 8


@dataclass
class VAEModelArguments:
    vae_config: str | None = field(
        default=None, metadata={"help": "From scratch: AutoencoderKL config JSON (e.g. recipes/tiny/vae_digits.json)."}
    )
    pretrained_vae_name_or_path: str | None = field(
        default=None, metadata={"help": "Fine-tune this AutoencoderKL: a dir, a pipeline dir or hub id (its vae)."}
    )


@dataclass
class VAETrainingArguments(training.LoopArguments):
    reconstruction_loss: str = field(
        default="l1", metadata={"help": "Pixel loss: l1 (as the LDM autoencoder) or mse.", "choices": ["l1", "mse"]}
    )
    kl_weight: float = field(default=1e-6, metadata={"help": "Weight of the KL term (the LDM autoencoders use 1e-6)."})
    adversarial_weight: float = field(
        default=0.0, metadata={"help": "Weight of the PatchGAN hinge loss on reconstructions (0: no discriminator)."}
    )
    adversarial_start_step: int = field(default=0, metadata={"help": "Step from which the adversarial term is on."})
    discriminator_channels: int = field(default=64, metadata={"help": "Width of the patch discriminator."})
    eval_batch_size: int = field(default=64, metadata={"help": "Images per batch when measuring held-out error."})


ARGUMENTS = (VAEModelArguments, ImageDataArguments, VAETrainingArguments)


def check(model_args: VAEModelArguments, data_args: ImageDataArguments, args: VAETrainingArguments) -> list[str]:
    problems = training.check_loop_arguments(args)
    if bool(model_args.vae_config) == bool(model_args.pretrained_vae_name_or_path):
        problems.append("set exactly one of vae_config (from scratch) or pretrained_vae_name_or_path (fine-tune)")
    problems += check_config_file("vae_config", model_args.vae_config)
    problems += check_model_source("pretrained_vae_name_or_path", model_args.pretrained_vae_name_or_path)
    if args.kl_weight < 0 or args.adversarial_weight < 0:
        problems.append("kl_weight and adversarial_weight must be >= 0")
    if args.max_train_steps:  # (a budget of epochs is known once the data is: `never_adversarial` then)
        problems += never_adversarial(args, args.max_train_steps)
    return problems + check_image_data(data_args, need_captions=False)


def never_adversarial(args: VAETrainingArguments, max_steps: int) -> list[str]:
    """adversarial_weight with adversarial_start_step at or past the run's last step: the GAN term never switches
    on (the weights came out as without it, while the discriminator was built and refused engines)."""
    if args.adversarial_weight <= 0 or args.adversarial_start_step < max_steps:
        return []
    return [
        f"adversarial_start_step {args.adversarial_start_step} is at or past the run's {max_steps} steps: the GAN term "
        f"(adversarial_weight {args.adversarial_weight}) would never switch on; lower adversarial_start_step, train "
        "longer, or drop adversarial_weight"
    ]


def refused_engines(model_args: VAEModelArguments, data_args: ImageDataArguments, args: VAETrainingArguments):
    """Engines this stage cannot use (see the README's engine table)."""
    if args.adversarial_weight > 0:  # a second trained model with its own optimizer: one engine per model
        why = "the GAN discriminator (adversarial_weight > 0) is a second trained model; use DDP"
        return {"zero2": why, "zero3": why, "fsdp2": why}
    return {}


class EncodeDecode(torch.nn.Module):
    """The VAE's training pass as one `forward`: encode, draw z from the posterior, decode. DDP synchronises the
    gradients of what runs through `forward` only, and AutoencoderKL's own forward hides the posterior (the KL
    term needs it)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels, generator=None):
        posterior = self.vae.encode(pixels).latent_dist
        return self.vae.decode(posterior.sample(generator)).sample, posterior


def reconstruction_error(vae, dataloader, device) -> float:
    """Mean squared error of reconstructions through the posterior mean, pixels in [0, 1]."""
    vae.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in dataloader:
            pixels = batch["pixel_values"].to(device, vae.dtype)
            reconstructed = vae.decode(vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)
            total += F.mse_loss((reconstructed + 1) / 2, (pixels + 1) / 2, reduction="sum").item()
            count += pixels.numel()
    vae.train()
    return total / count


def latent_scaling_factor(vae, images, batch_size: int, device, seed: int, max_batches: int = 16) -> float:
    """1 / std of latents sampled from the training images: makes the diffusion model's inputs unit-variance.
    The first `max_batches` batches of `images` in order (their first epoch's crops and flips), each latent drawn
    from a generator of `seed`: the training loader's order after the run and the global random state differ
    between a resumed run and the uninterrupted one (the factor, in config.json, scales every later model's
    latents), and between the processes of a launch."""
    if hasattr(images, "set_epoch"):
        images.set_epoch(0)
    generator = torch.Generator(device=device).manual_seed(seed)
    latents = []
    with torch.inference_mode():
        for index, batch in enumerate(torch.utils.data.DataLoader(images, batch_size=batch_size)):
            if index == max_batches:
                break
            posterior = vae.encode(batch["pixel_values"].to(device, vae.dtype)).latent_dist
            latents.append(posterior.sample(generator=generator).float())
    return 1.0 / torch.cat(latents).flatten().std().item()


def run(model_args: VAEModelArguments, data_args: ImageDataArguments, args: VAETrainingArguments) -> Path:
    from diffusers import AutoencoderKL

    accelerator = training.make_accelerator(args, refused_engines(model_args, data_args, args))
    output_dir = Path(args.output_dir)

    # Model: from a config, or a pretrained VAE to fine-tune.
    vae = (
        build_vae(model_args.vae_config) if model_args.vae_config else load_vae(model_args.pretrained_vae_name_or_path)
    )
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    use_adversary = args.adversarial_weight > 0
    discriminator = patch_discriminator(vae.config.in_channels, args.discriminator_channels) if use_adversary else None

    # Data: images only, resized and cropped (captions unused).
    train_rows, eval_rows = load_image_splits(data_args, seed=args.seed)
    # (random crops and flips drawn per (seed, epoch, row): a resume sees what the uninterrupted run saw)
    train_set = PixelRows(
        undecoded(train_rows, data_args.image_column), pixel_transform(data_args, data_args.dataset_name), args.seed
    )
    eval_set = undecoded(eval_rows, data_args.image_column).with_transform(
        held_out_transform(data_args, data_args.dataset_name)
    )
    train_loader = training.train_dataloader(train_set, args, accelerator.num_processes)
    eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=args.eval_batch_size)

    # Optimizers and schedule.
    optimizer = training.make_optimizer([vae.parameters()], args, accelerator.num_processes)
    (autoencoder,), optimizer, train_loader, lr_scheduler, budget = training.prepare_training(
        accelerator, args, [EncodeDecode(vae)], optimizer, train_loader
    )
    max_steps, num_epochs, steps_per_epoch = budget
    if problems := never_adversarial(args, max_steps):  # (an epoch budget: known now that the data is)
        raise UserError(problems[0])
    if use_adversary:
        disc_optimizer = training.make_optimizer([discriminator.parameters()], args, accelerator.num_processes)
        discriminator, disc_optimizer = loop.prepare(
            accelerator, discriminator, disc_optimizer, micro_batch_size=args.train_batch_size,
            max_grad_norm=args.max_grad_norm,
        )  # fmt: skip

    log = training.StepLog(accelerator, args.output_dir, args.logging_steps)
    rng = training.TrainingRNG(args.seed + accelerator.process_index, accelerator.device, log)  # (log window too)
    accelerator.register_for_checkpointing(rng)
    global_step, first_epoch, skip = training.resume(accelerator, args, steps_per_epoch, rng)
    if global_step == 0:  # into eval.json now: a resumed run has it from there
        with loop.gathered(accelerator, autoencoder) as (unwrapped,):
            initial_error = reconstruction_error(unwrapped.vae, eval_loader, accelerator.device)
        tracking.update_eval(output_dir, {"quality/reconstruction_mse_initial": initial_error})
    divergence = guard.Divergence(output_dir)
    accelerator.print(f"vae: {sum(p.numel() for p in vae.parameters()):,} parameters, {max_steps} steps")

    for epoch in range(first_epoch, num_epochs):
        autoencoder.train()
        skipped = skip if epoch == first_epoch else 0
        for index, batch in enumerate(training.epoch_batches(accelerator, train_loader, epoch, skipped), skipped):
            # (an epoch's last, shorter accumulation: its losses weigh GA / k, for the mean over its k batches)
            scale = training.accumulation_scale(args, len(train_loader), index)
            adversarial = use_adversary and global_step >= args.adversarial_start_step
            with accelerator.accumulate(autoencoder):
                pixels = batch["pixel_values"]
                # Encode to the posterior q(z|x), draw z from it, decode
                reconstruction, posterior = autoencoder(pixels, rng.generator)
                # Reconstruction and KL terms, both per pixel (the LDM autoencoder's weighting)
                if args.reconstruction_loss == "l1":
                    reconstruction_loss = F.l1_loss(reconstruction.float(), pixels.float())
                else:
                    reconstruction_loss = F.mse_loss(reconstruction.float(), pixels.float())
                kl_loss = posterior.kl().mean() / pixels[0].numel()
                loss = reconstruction_loss + args.kl_weight * kl_loss
                losses = {"loss": loss, "reconstruction_loss": reconstruction_loss, "kl_loss": kl_loss}

                if adversarial:
                    # The discriminator's hinge loss on real vs detached reconstructions: its gradient accumulates
                    # over the step's micro-batches, as the autoencoder's does, for one step at the step's end ...
                    logits = discriminator(torch.cat([pixels, reconstruction.detach()]))
                    real, fake = logits.chunk(2)
                    disc_loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
                    accelerator.backward(disc_loss * scale)
                    disc_gradients = [p.grad.clone() for p in discriminator.parameters()]
                    # ... and the autoencoder is pushed to make reconstructions the discriminator (as it was before
                    # this step: the same for every split of the step's batch) calls real
                    generator_loss = -discriminator(reconstruction).mean()
                    loss = loss + args.adversarial_weight * generator_loss
                    losses.update(disc_loss=disc_loss, generator_loss=generator_loss)

                log.add_micro_batch(**losses)
                loop.backward_and_step(
                    accelerator, autoencoder, optimizer, loss * scale, args.max_grad_norm, global_step + 1, divergence
                )
                if adversarial:
                    # the generator loss also reached the discriminator: not its update
                    for parameter, gradient in zip(discriminator.parameters(), disc_gradients):
                        parameter.grad.copy_(gradient)
                    if accelerator.sync_gradients:  # one discriminator step per autoencoder step
                        disc_optimizer.step()
                        disc_optimizer.zero_grad()

            if accelerator.sync_gradients:
                log.end_step(lr=lr_scheduler.get_last_lr()[0])  # the rate this step used, before the schedule moves on
                lr_scheduler.step()
                global_step += 1
                log.maybe_write(global_step)
                training.maybe_checkpoint(accelerator, args, global_step)
                if global_step >= max_steps:
                    break
    training.check_trained_to_end(global_step, max_steps)
    log.maybe_write(global_step, force=True)
    accelerator.wait_for_everyone()

    # Save: the latent scaling factor first (in the config), then the whole model as safetensors.
    guard.kill_point("eval")
    with loop.gathered(accelerator, autoencoder) as (unwrapped,):
        measured = latent_scaling_factor(unwrapped.vae, train_set, args.train_batch_size, accelerator.device, args.seed)
        # A fine-tuned VAE keeps its own factor (as SD's keeps 0.18215): the denoisers trained on its latents were
        # trained with that scale, and fine-tuning leaves the latent space about where it was.
        scaling_factor = vae.config.scaling_factor if model_args.pretrained_vae_name_or_path else measured
        unwrapped.vae.register_to_config(scaling_factor=scaling_factor)
        final_error = reconstruction_error(unwrapped.vae, eval_loader, accelerator.device)
    guard.check_final_model(
        output_dir, global_step, {"held-out reconstruction error": final_error, "latent scaling factor": measured}
    )

    whole = loop.whole_on_main(accelerator, autoencoder, lambda: EncodeDecode(AutoencoderKL.from_config(vae.config)))
    if accelerator.is_main_process:
        whole.vae.register_to_config(scaling_factor=scaling_factor)  # (from_config drops it where it was a default)
        whole.vae.save_pretrained(output_dir)
        guard.kill_point("final_save")
        save_reconstructions(whole.vae, eval_set, output_dir / "reconstructions.png")
        results = {"quality/reconstruction_mse": final_error, "vae/scaling_factor": scaling_factor,
                   "vae/measured_scaling_factor": measured,
                   "vae/parameters": sum(p.numel() for p in whole.vae.parameters()), "train/steps": global_step}  # fmt: skip
        initial_error = tracking.update_eval(output_dir, results).get("quality/reconstruction_mse_initial")
        before = "n/a" if initial_error is None else f"{initial_error:.5f}"  # (a run resumed from an older hfgen's)
        accelerator.print(f"held-out reconstruction MSE {before} -> {final_error:.5f}")
    loop.maybe_write_fingerprint(accelerator, autoencoder, output_dir)
    tracking.finish_trackers(accelerator)  # the process group outlives the stage: tracking.shutdown_distributed
    return output_dir


def save_reconstructions(vae, eval_set, path: Path) -> None:
    """Held-out originals (top row) over their reconstructions (bottom row)."""
    from hfgen.diffusion.rendering import make_grid, to_images

    pixels = torch.stack([eval_set[i]["pixel_values"] for i in range(min(EVAL_IMAGES_SHOWN, len(eval_set)))])
    with torch.inference_mode():
        reconstructed = vae.decode(vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()).sample
    make_grid([to_images(pixels), to_images(reconstructed)]).save(path)
