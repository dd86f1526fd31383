"""PPO for language models as pure functions of tensors (torch only, no models, no state).

Shapes: B = sequences in the batch, T = response tokens (padded to the longest response), V = vocabulary.
A response `mask` is a (B, T) bool/0-1 tensor that is True on the tokens the policy actually produced, up to
and including the first EOS; it is always a prefix (True...True False...False) and never empty, since every
response has at least one token. Functions that reduce over tokens take the mask and ignore everything else.

References: Schulman et al. 2017 (PPO: clipped surrogate), Schulman et al. 2016 (GAE), Ziegler et al. 2019
and Ouyang et al. 2022 (per-token KL penalty, score at the end of the response), Huang et al. 2024 ("The N+
implementation details of RLHF with PPO"), http://joschu.net/blog/kl-approx.html (k1/k3 KL estimators).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch

# Sums a tensor over all processes (e.g. `lambda t: accelerator.reduce(t, "sum")`), so statistics that
# normalise a batch see the global batch under data parallelism. None: this process's batch only.
AllReduceSum = Callable[[torch.Tensor], torch.Tensor] | None


# ---- masked statistics ------------------------------------------------------------------------------


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is true; over `dim`, or over everything when None."""
    masked = values * mask
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is true (0 where the mask is empty)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_mean_var(
    values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, all_reduce: AllReduceSum = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of the masked entries of `values`, as 0-d tensors; over all processes with
    `all_reduce`. Two passes (mean first, then squared deviations), so a large mean costs no precision."""
    mask = mask.to(values.dtype)
    totals = torch.stack([masked_sum(values, mask), mask.sum()])
    if all_reduce is not None:
        totals = all_reduce(totals)
    mean = totals[0] / totals[1].clamp(min=1)
    squares = masked_sum((values - mean) ** 2, mask)
    if all_reduce is not None:
        squares = all_reduce(squares)
    count = totals[1]
    if unbiased:
        count = count - 1  # Bessel's correction
    return mean, squares / count.clamp(min=1)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_reduce: AllReduceSum = None
) -> torch.Tensor:
    """Scale the masked entries of `values` (any shape) to unit variance, and to zero mean when `shift_mean`;
    entries outside the mask become 0."""
    mean, var = masked_mean_var(values, mask, all_reduce=all_reduce)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduceSum = None
) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over the masked tokens (of all processes with `all_reduce`): 1 is a
    perfect value model, 0 is no better than predicting the mean, negative is worse. A ratio of global variances,
    not a mean of per-process ratios."""
    _, residual_var = masked_mean_var(returns - values, mask, all_reduce=all_reduce)
    _, returns_var = masked_mean_var(returns, mask, all_reduce=all_reduce)
    return 1 - residual_var / returns_var.clamp(min=1e-8)


# ---- responses --------------------------------------------------------------------------------------


def is_stop_token(response_ids: torch.Tensor, eos_token_ids: int | Sequence[int]) -> torch.Tensor:
    """(B, T) bool: where a token is one of the stop tokens (a model may have several EOS ids, e.g. end of text
    and end of turn)."""
    if isinstance(eos_token_ids, int):
        return response_ids == eos_token_ids
    return torch.isin(response_ids, torch.as_tensor(list(eos_token_ids), device=response_ids.device))


def response_mask(response_ids: torch.Tensor, eos_token_ids: int | Sequence[int]) -> torch.Tensor:
    """(B, T) long token ids -> (B, T) bool: true up to and including the first stop token of each row (the whole
    row when it has none). What comes after the first EOS was never part of the response."""
    is_eos = is_stop_token(response_ids, eos_token_ids)
    eos_before = is_eos.cumsum(1) - is_eos.long()  # EOS tokens strictly before each position
    return eos_before == 0


def truncate_after_eos(
    response_ids: torch.Tensor, eos_token_ids: int | Sequence[int], pad_token_id: int
) -> torch.Tensor:
    """(B, T) token ids with every token after the first EOS replaced by `pad_token_id`."""
    return response_ids.masked_fill(~response_mask(response_ids, eos_token_ids), pad_token_id)


def has_stop_token(response_ids: torch.Tensor, eos_token_ids: int | Sequence[int]) -> torch.Tensor:
    """(B,) bool: the response ended by itself (emitted a stop token) rather than being cut at the length limit."""
    return is_stop_token(response_ids, eos_token_ids).any(dim=1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) prefix mask -> (B,) index of each response's last token (its first EOS, or T-1 when cut off)."""
    return (mask.sum(1) - 1).clamp(min=0).long()


# ---- log-probabilities and entropy ------------------------------------------------------------------


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) logits, (B, T) tokens -> (B, T) log-probabilities of `tokens` under softmax(logits / temperature).

    The temperature the rollouts were sampled with must be applied here too: the policy being optimised is
    the tempered distribution. Computed as logit - logsumexp, in float32, without a (B, T, V) log-softmax copy.
    """
    return token_logprobs_and_entropy(logits, tokens, temperature, entropy=False)[0]


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(..., V) logits -> (...) entropy in nats of softmax(logits / temperature)."""
    logits = logits.float() / temperature
    return _entropy(logits, torch.logsumexp(logits, dim=-1))


def token_logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, entropy: bool = True, entropy_grad=False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` and `entropy_from_logits` of the same logits, sharing the tempered float32 copy and the
    logsumexp (each a pass over B x T x V: at a large vocabulary they cost as much as the LM head). The entropy is
    computed without gradient unless `entropy_grad` (an entropy bonus); with `entropy=False` it is None."""
    logits = logits.float() / temperature
    log_normaliser = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - log_normaliser
    if not entropy:
        return logprobs, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return logprobs, _entropy(logits, log_normaliser)


def _entropy(tempered_logits: torch.Tensor, log_normaliser: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum_v softmax(z)_v z_v for tempered logits z."""
    return log_normaliser - (torch.softmax(tempered_logits, dim=-1) * tempered_logits).sum(-1)


# ---- rewards ----------------------------------------------------------------------------------------

KLEstimator = Literal["k1", "k3"]


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """(B, T) log-probs of the sampled tokens under the policy and the reference -> (B, T) per-token estimates
    of KL(policy || reference), for tokens sampled from the policy.

    k1 = log(p/q), unbiased, can be negative per token. k3 = (q/p - 1) - log(q/p), unbiased and never
    negative, with lower variance when p and q are close (Schulman's "Approximating KL divergence").
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator '{estimator}' (use 'k1' or 'k3')")


def kl_penalised_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of InstructGPT-style RLHF: r_t = -kl_coef * KL_t on every response token, plus the
    sequence's score on its last token (the first EOS, or the last token of a response cut off without one).

    scores (B,), kl (B, T), mask (B, T) -> (rewards (B, T), kl_rewards (B, T)); both 0 outside the mask.
    """
    kl_rewards = -kl_coef * kl * mask
    rewards = kl_rewards.clone()
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl_rewards


def generalized_advantage_estimation(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) over response tokens (Schulman et al. 2016).

    delta_t = r_t + gamma * V_{t+1} - V_t, with V = 0 after the last response token;
    A_t = sum_k (gamma * lambda)^k delta_{t+k};  returns R_t = A_t + V_t (the value model's target).

    rewards, values, mask: (B, T) -> (advantages (B, T), returns (B, T)), 0 outside the mask.
    """
    rewards, values = rewards * mask, values * mask
    length = rewards.shape[1]
    advantage = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(advantage)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * advantage
        advantages_reversed.append(advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages * mask, (advantages + values) * mask


# ---- losses -----------------------------------------------------------------------------------------


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # 0-d, the clipped surrogate to minimise
    clip_fraction: torch.Tensor  # 0-d, share of tokens where the clipped term was the active one
    approx_kl: torch.Tensor  # 0-d, 0.5 * mean (log new/old)^2: how far this update moved the policy
    ratio: torch.Tensor  # 0-d, mean probability ratio new/old (1 at the first minibatch)


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
) -> PolicyLoss:
    """PPO's clipped surrogate (Schulman et al. 2017), as a loss:
    mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps)) with ratio_t = pi(a_t) / pi_old(a_t).

    logprobs (B, T) under the policy being trained (with grad), old_logprobs (B, T) from the rollout,
    advantages (B, T), mask (B, T).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
        mean_ratio = masked_mean(ratio, mask)
    return PolicyLoss(masked_mean(torch.max(unclipped, clipped), mask), clip_fraction, approx_kl, mean_ratio)


class ValueLoss(NamedTuple):
    loss: torch.Tensor  # 0-d
    clip_fraction: torch.Tensor  # 0-d, share of tokens where the clipped prediction gave the larger error


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float = 0.2,
) -> ValueLoss:
    """0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old_t - eps, V_old_t + eps) - R_t)^2), as in OpenAI's
    baselines and lm-human-preferences. values (B, T) with grad, old_values and returns (B, T), mask (B, T)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > unclipped_error).float(), mask)
    return ValueLoss(0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask), clip_fraction)


def kl_loss(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: Literal["k2", "k3"] = "k3"
) -> torch.Tensor:
    """KL(policy || reference) as a loss term (GRPO-style), instead of, or beside, the per-token reward penalty:
    the masked mean over tokens of k2 = 0.5 * log(p/q)^2 or k3 = (q/p - 1) - log(q/p), both >= 0 with gradient
    pulling the policy toward the reference. logprobs (B, T) with grad, ref_logprobs and mask (B, T)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k2":
        per_token = 0.5 * log_ratio**2
    elif estimator == "k3":
        per_token = torch.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"unknown KL loss estimator '{estimator}' (use 'k2' or 'k3')")
    return masked_mean(per_token, mask)


# ---- reward normalisation ---------------------------------------------------------------------------


class RewardNormalizer:
    """Scores -> (score - mean) / std with statistics of the scores seen (Huang et al. detail 11; OpenRLHF's
    `normalize_reward`), then clipped to [-clip, clip] when `clip` is set (DeepSpeed-Chat's reward clipping).

    mode "running": mean and std of every score so far (all processes with `all_reduce`); "sft": of the first
    batch only, which the SFT policy produced (the policy starts as the SFT model), then frozen, so SFT responses
    sit at mean 0 and std 1 for the whole run (a batch of one score has no std: batches are pooled until there are
    two scores); "none": unchanged (clipping aside). Scores pass unnormalised until there are two.
    A checkpointable object (state_dict / load_state_dict)."""

    def __init__(self, mode: Literal["none", "running", "sft"] = "none", clip: float | None = None):
        if mode not in ("none", "running", "sft"):
            raise ValueError(f"unknown reward normalisation '{mode}' (use none, running or sft)")
        self.mode, self.clip = mode, clip
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0  # Chan et al.'s parallel variance: count, mean, sum of squares

    def update(self, scores: torch.Tensor, all_reduce: AllReduceSum = None) -> None:
        if self.mode == "none" or (self.mode == "sft" and self.count > 1):  # frozen once it has a std
            return
        ones = torch.ones_like(scores, dtype=torch.float32)
        batch_mean, batch_var = masked_mean_var(scores.float(), ones, unbiased=False, all_reduce=all_reduce)
        totals = torch.tensor([float(len(scores))], device=scores.device)
        batch_count = (all_reduce(totals) if all_reduce is not None else totals).item()
        delta = batch_mean.item() - self.mean
        total = self.count + batch_count
        self.mean += delta * batch_count / total
        self.m2 += batch_var.item() * batch_count + delta**2 * self.count * batch_count / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / max(self.count - 1, 1)) ** 0.5

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if self.mode != "none" and self.count > 1:
            scores = (scores - self.mean) / max(self.std, 1e-8)
        return scores.clamp(-self.clip, self.clip) if self.clip is not None else scores

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


# ---- exponential moving average of weights ----------------------------------------------------------


class ExponentialMovingAverage:
    """An EMA copy of named parameters (DeepSpeed-Chat's actor EMA): shadow = decay * shadow + (1 - decay) * param
    after each optimiser step. Kept in float32 beside the model; checkpointable (state_dict / load_state_dict)."""

    def __init__(self, named_parameters, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in named_parameters}

    @torch.no_grad()
    def update(self, named_parameters) -> None:
        for name, p in named_parameters:
            self.shadow[name].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            self.shadow[name].copy_(value)
