"""The policy's trained weights (its LoRA adapters with use_peft): CPU snapshots (kept by `stop_on_hacking` to
restore an earlier policy) and the EMA copy saved beside the policy."""

from __future__ import annotations

from pathlib import Path

import torch


def trained_policy_parameters(policy):
    """(name, parameter) of the policy's trained weights (its LoRA adapters with use_peft)."""
    return [(name, p) for name, p in policy.named_parameters() if p.requires_grad]


def save_ema_policy(policy, ema, directory: Path) -> None:
    """The policy with its EMA weights swapped in, saved like the policy (full model or adapter); then restored."""
    live = {name: p.detach().clone() for name, p in trained_policy_parameters(policy)}
    with torch.no_grad():
        for name, p in trained_policy_parameters(policy):
            p.copy_(ema.shadow[name])
        policy.save_pretrained(directory)
        for name, p in trained_policy_parameters(policy):
            p.copy_(live[name])


def policy_weights(policy) -> dict[str, torch.Tensor]:
    """A CPU copy of the policy's trained weights (its adapters with use_peft)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in trained_policy_parameters(policy)}


@torch.no_grad()
def load_policy_weights(policy, weights: dict[str, torch.Tensor]) -> None:
    for name, p in trained_policy_parameters(policy):
        p.copy_(weights[name])
