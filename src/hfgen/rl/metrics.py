"""What a PPO step reports: its figures (names as TRL's PPOTrainer logged them, plus ours) and the console line.
Torch only; reducing over processes is the caller's job (`hfgen.rl.records.global_means`).
"""

from __future__ import annotations

import torch

from hfgen.rl.functional import AllReduceSum, explained_variance, masked_mean
from hfgen.rl.monitor import mean_distinct_n
from hfgen.rl.types import PPOStats, Rollout, RolloutDetails

TIME_SPLIT = ("generation", "scoring", "advantages", "training")
RATES = ("speed/generation_tokens_per_s", "speed/training_tokens_per_s")  # per process: summed over processes
SCORED_PARTS = ("/scored_sum", "/scored_count")  # a mean over scored responses, as `scored_figure` splits it


def scored_figure(name: str, scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """The figure `name`, the mean of the responses a function scored (NaN: its None, unscored), as the sum and the
    count of this process's scored responses: a mean of per-process means would weigh a process with one scored
    response like one with all, and be NaN when one process scored none. `records.global_means` sums both over
    processes and writes the mean, or None (null) when no process scored any."""
    return {name + SCORED_PARTS[0]: scores.nansum(), name + SCORED_PARTS[1]: scores.isfinite().sum()}


def step_metrics(
    rollout: Rollout,
    details: RolloutDetails,
    kl: torch.Tensor,
    kl_rewards: torch.Tensor,
    stats: list[PPOStats],
    timing: dict[str, float],
    num_ppo_epochs: int,
    all_reduce: AllReduceSum = None,
) -> dict[str, torch.Tensor]:
    """This process's figures for one step, as 0-d tensors. kl and kl_rewards are (B, T), 0 outside the mask.

    Sequence-level figures (objective/*) are means over responses of sums over tokens; training figures are
    means over the update's micro-batches.
    """
    mask = rollout.response_mask
    lengths = mask.sum(1).float()

    def mean_of(field: str) -> torch.Tensor:
        return torch.stack([getattr(s, field) for s in stats]).mean()

    components = {}  # reward/NAME: over the responses it scored (None: unscored)
    for name, scores in details.components.items():
        components |= scored_figure(f"reward/{name}", scores)

    return {
        "objective/scores": rollout.scores.mean(),
        "objective/kl": kl.sum(1).mean(),
        "objective/entropy": (details.entropy * mask).sum(1).mean(),
        "objective/non_score_reward": kl_rewards.sum(1).mean(),
        "objective/rlhf_reward": (rollout.scores + kl_rewards.sum(1)).mean(),
        **components,
        "policy/approxkl_avg": mean_of("approx_kl"),
        "policy/clipfrac_avg": mean_of("policy_clip_fraction"),
        "policy/entropy_avg": mean_of("entropy"),
        "loss/policy_avg": mean_of("policy_loss"),
        "loss/value_avg": mean_of("value_loss"),
        "val/clipfrac_avg": mean_of("value_clip_fraction"),
        "val/ratio": mean_of("ratio"),
        **({"loss/ptx_avg": mean_of("ptx_loss")} if stats[0].ptx_loss is not None else {}),
        # global already (the same on every process), so the caller's mean over processes leaves it unchanged
        "val/explained_variance": explained_variance(rollout.values, rollout.returns, mask, all_reduce),
        "val/eos_rate": details.has_eos.float().mean(),
        "response/length_mean": lengths.mean(),
        "response/entropy_per_token": masked_mean(details.entropy, mask),
        # each response's own distinct-n, averaged (the monitor's repetition signal): not the pooled distinct-n of
        # eval.json and `hfgen eval`, hence the name
        "response/within_distinct_1": torch.tensor(mean_distinct_n(details.texts, 1)),
        "response/within_distinct_2": torch.tensor(mean_distinct_n(details.texts)),
        "per_token/kl": masked_mean(kl, mask),
        "speed/generation_tokens_per_s": lengths.sum() / max(timing["generation"], 1e-9),
        "speed/training_tokens_per_s": rollout.attention_mask.sum() * num_ppo_epochs / max(timing["training"], 1e-9),
        **{f"time/{name}_s": torch.tensor(seconds) for name, seconds in timing.items()},
    }


def format_metrics(step: int, total_steps: int, metrics: dict[str, float]) -> str:
    """One console line: the figures to watch, and the share of the step's time in each phase."""
    shown = [("score", "objective/scores"), ("oracle", "oracle/score"), ("kl", "objective/kl"),
             ("entropy", "policy/entropy_avg"), ("clipfrac", "policy/clipfrac_avg"), ("vloss", "loss/value_avg"),
             ("len", "response/length_mean"), ("eos", "val/eos_rate"), ("eps", "eps")]  # fmt: skip
    parts = [f"{label} {metrics[key]:.3g}" for label, key in shown if metrics.get(key) is not None]
    times = [metrics[f"time/{name}_s"] for name in TIME_SPLIT]
    split = "/".join(f"{100 * t / max(sum(times), 1e-9):.0f}" for t in times)
    return f"step {step}/{total_steps} | " + " | ".join(parts) + f" | time % gen/score/adv/train {split}"
