"""Rectified-flow (flow-matching) training math, as SD3 and Flux are trained (Esser et al., 2024).

An image latent x0 and Gaussian noise x1 are joined by a straight line, x_t = (1 - sigma) x0 + sigma x1; the
transformer predicts the velocity x1 - x0 along it. Where on the line a step trains is drawn by `weighting_scheme`
(diffusers' `compute_density_for_timestep_sampling`: logit_normal with `logit_mean`/`logit_std`, mode with
`mode_scale`, or uniform) and mapped through the scheduler's sigmas, which carry the schedule's `shift`
(FlowMatchEulerDiscreteScheduler): training and sampling see the same shifted noise levels. The per-sample loss
weight is diffusers' `compute_loss_weighting_for_sd3` (sigma_sqrt, cosmap, or none for the others).
"""

from __future__ import annotations

import torch

WEIGHTING_SCHEMES = ["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none"]


def sample_sigmas(scheduler, batch_size: int, weighting_scheme: str, logit_mean: float, logit_std: float,
                  mode_scale: float, generator, device) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(timesteps the transformer is told, sigmas in [0, 1]) for a batch, drawn by `weighting_scheme` from the
    training scheduler's (shifted) schedule. As in diffusers' SD3/Flux training scripts, the draw u in [0, 1]
    indexes the schedule from its noisy end (sigma ~ 1 - u): a positive `logit_mean` trains at less noise."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        weighting_scheme, batch_size, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale,
        device=device, generator=generator,
    )  # fmt: skip
    num = scheduler.config.num_train_timesteps
    indices = (u * num).long().clamp(0, num - 1).cpu()
    return scheduler.timesteps[indices].to(device), scheduler.sigmas[indices].to(device, torch.float32)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The point at `sigmas` on the straight line from the latents (sigma 0) to the noise (sigma 1)."""
    sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    return (1.0 - sigmas) * latents + sigmas * noise


def flow_loss(model_pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
              weighting_scheme: str) -> torch.Tensor:  # fmt: skip
    """Weighted MSE between the predicted and the true velocity (noise - latents), one mean per sample first."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas).view(-1, *([1] * (latents.ndim - 1)))
    error = weighting.float() * (model_pred.float() - (noise - latents).float()) ** 2
    return error.reshape(len(error), -1).mean(dim=1).mean()
