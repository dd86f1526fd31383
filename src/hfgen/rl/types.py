"""Typed containers that travel through a PPO step: a batch of scored rollouts, and one update's statistics."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch


@dataclasses.dataclass(frozen=True)
class Rollout:
    """B sampled episodes: the prompts (left-padded to P tokens), the responses (T tokens, padded after the
    first EOS) and everything PPO needs about them. Built by the rollout phase; `advantages` and `returns`
    are filled in (with `dataclasses.replace`) once the rewards are known.
    """

    input_ids: torch.Tensor  # (B, P + T) long: prompt then response
    attention_mask: torch.Tensor  # (B, P + T) long: 0 on left padding and after each response's first EOS
    context_length: int  # P
    response_mask: torch.Tensor  # (B, T) bool: the response's own tokens, up to and including the first EOS
    logprobs: torch.Tensor  # (B, T) float: log pi_old(token) at the sampling temperature
    ref_logprobs: torch.Tensor  # (B, T) float: the same under the frozen reference policy
    values: torch.Tensor | None  # (B, T) float: V_old before each response token (None until the update's first
    # forward pass gives them: hfgen.stages.ppo.values_from_first_pass)
    scores: torch.Tensor  # (B,) float: sequence reward (reward model and/or functions, missing-EOS penalty)
    advantages: torch.Tensor | None = None  # (B, T) float, whitened
    returns: torch.Tensor | None = None  # (B, T) float, the value model's targets

    @property
    def response_ids(self) -> torch.Tensor:
        """(B, T) long."""
        return self.input_ids[:, self.context_length :]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> Rollout:
        """The episodes at `rows` (a (b,) index tensor), e.g. one shuffled micro-batch."""
        picked = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            picked[field.name] = value[rows] if isinstance(value, torch.Tensor) else value
        return Rollout(**picked)


class PPOStats(NamedTuple):
    """One micro-batch's training statistics (0-d tensors); stacked over an update and averaged for logging."""

    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    policy_clip_fraction: torch.Tensor
    value_clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    entropy: torch.Tensor
    ratio: torch.Tensor
    ptx_loss: torch.Tensor | None = None  # PPO-ptx: LM loss on the pretraining data


class RolloutDetails(NamedTuple):
    """What a rollout knows beyond PPO's tensors, for metrics and sample tables."""

    texts: list[str]  # B response texts, up to the first EOS
    components: dict[str, torch.Tensor]  # reward component name -> (B,) scores
    entropy: torch.Tensor  # (B, T) entropy of the sampling distribution at each response token
    has_eos: torch.Tensor  # (B,) bool
