"""Rollout containers select whole episodes; step metrics read sequence sums, token means and the time split."""

import math

import torch

from hfgen.evaluation.policy import format_comparison
from hfgen.rl.metrics import format_metrics, step_metrics
from hfgen.rl.records import global_means
from hfgen.rl.types import PPOStats, Rollout, RolloutDetails


def rollout() -> Rollout:
    mask = torch.tensor([[True, True, False], [True, True, True]])
    return Rollout(
        input_ids=torch.arange(10).view(2, 5), attention_mask=torch.ones(2, 5, dtype=torch.long), context_length=2,
        response_mask=mask, logprobs=torch.zeros(2, 3), ref_logprobs=torch.zeros(2, 3),
        values=torch.tensor([[1.0, 2.0, 0.0], [1.0, 2.0, 3.0]]), scores=torch.tensor([1.0, 3.0]),
        advantages=torch.zeros(2, 3), returns=torch.tensor([[1.0, 2.0, 0.0], [1.0, 2.0, 3.0]]),
    )  # fmt: skip


def test_select_takes_whole_episodes_and_keeps_the_context_length():
    picked = rollout().select(torch.tensor([1]))
    assert len(picked) == 1 and picked.context_length == 2
    assert picked.response_ids.tolist() == [[7, 8, 9]] and picked.scores.tolist() == [3.0]


ONE = torch.tensor(1.0)
STATS = [PPOStats(ONE, ONE * 2, ONE * 0.1, ONE * 0.2, ONE * 0.01, ONE * 0.5, ONE)] * 2
TIMING = {"generation": 1.0, "scoring": 0.5, "advantages": 0.0, "training": 2.0}


def test_step_metrics_by_hand():
    batch = rollout()
    kl = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 1.0]])
    details = RolloutDetails(
        ["a a", "b"], {"reward_model": torch.tensor([1.0, 3.0])}, torch.ones(2, 3), torch.tensor([True, False])
    )
    metrics = {k: float(v) for k, v in step_metrics(batch, details, kl, -0.1 * kl, STATS, TIMING, 2).items()}
    assert metrics["objective/kl"] == 1.5  # mean over responses of per-response sums: (1 + 2) / 2
    assert metrics["objective/entropy"] == 2.5  # (2 + 3) / 2 tokens
    assert abs(metrics["objective/rlhf_reward"] - (2.0 - 0.15)) < 1e-6
    assert metrics["val/explained_variance"] == 1.0 and metrics["val/eos_rate"] == 0.5
    assert metrics["response/length_mean"] == 2.5 and abs(metrics["per_token/kl"] - 3 / 5) < 1e-6
    assert metrics["speed/generation_tokens_per_s"] == 5.0 and metrics["speed/training_tokens_per_s"] == 10.0
    assert metrics["loss/value_avg"] == 2.0
    assert metrics["reward/reward_model/scored_sum"] == 4.0 and metrics["reward/reward_model/scored_count"] == 2
    # each response's own distinct-1, averaged ((1/2 + 1) / 2), under a name of its own: distinct_1 is the pooled
    # figure everywhere else (unique words over all responses: 2/3 here)
    assert metrics["response/within_distinct_1"] == 0.75 and "response/distinct_1" not in metrics
    line = format_metrics(3, 10, {**metrics, "eps": 4.0, **{f"time/{k}_s": v for k, v in TIMING.items()}})
    assert line.startswith("step 3/10 | score 2 |") and "gen/score/adv/train 29/14/0/57" in line


class TwoProcesses:
    """Stands in for the accelerator `records.global_means` reduces with: this process and a second one whose
    figures are `other` (the same names, in the same order)."""

    num_processes, device = 2, "cpu"

    def __init__(self, other: dict):
        self.other = torch.stack([value.float() for value in other.values()])

    def reduce(self, stacked, op):
        assert op == "mean"
        return (stacked + self.other) / 2


def test_a_reward_component_is_the_mean_of_the_responses_it_scored_over_every_process():
    # a function's None (NaN here) leaves a response unscored: reward/NAME was each process's nanmean, then their
    # mean, so NaN (no JSON in metrics.jsonl) when it scored none, and a process's one scored response weighed
    # as much as another's two
    def figures(partial: list[float]) -> dict:
        never = torch.tensor([math.nan, math.nan])
        details = RolloutDetails(
            ["a", "b"], {"partial": torch.tensor(partial), "never": never}, torch.ones(2, 3), torch.tensor([True] * 2)
        )
        return step_metrics(rollout(), details, torch.zeros(2, 3), torch.zeros(2, 3), STATS, TIMING, 2)

    metrics = global_means(TwoProcesses(figures([1.0, 1.0])), figures([math.nan, 4.0]))
    assert metrics["reward/partial"] == 2.0 and metrics["reward/never"] is None  # (1 + 1 + 4) / 3
    assert not any("scored_" in name for name in metrics)
    assert metrics["speed/generation_tokens_per_s"] == 2 * 5.0  # a rate is still summed over processes


def test_format_comparison_lists_both_policies_and_the_win_rate():
    table = format_comparison(
        {"heldout/num_prompts": 2, "heldout/samples_per_prompt": 1, "kl_to_reference": 1.25, "sft/oracle": 0.5,
         "ppo/oracle": 1.5, "win_rate/oracle": 0.75, "sft/response_length": 9.0, "ppo/response_length": 10.0,
         "sft/self_bleu": None, "ppo/self_bleu": None},  # one sample per prompt: no self-BLEU
        "ppo",
    )  # fmt: skip
    assert "oracle" in table and "0.750" in table and "1.250 nats" in table and "self_bleu" not in table
