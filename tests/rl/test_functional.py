"""The PPO math in `hfgen.rl.functional`, each function against values worked out by hand."""

import math

import pytest
import torch

from hfgen.rl import functional as F

T = torch.tensor


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=atol, rtol=0)


# ---- masked statistics ------------------------------------------------------------------------------


def test_masked_mean_ignores_masked_entries_and_reduces_over_a_dim():
    values = T([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    mask = T([[1, 1, 0, 1], [0, 0, 0, 1]])
    close(F.masked_mean(values, mask), (1 + 2 + 4 + 40) / 4)
    close(F.masked_mean(values, mask, dim=1), [7 / 3, 40.0])
    close(F.masked_sum(values, mask, dim=1), [7.0, 40.0])
    close(F.masked_mean(values, torch.zeros_like(mask)), 0.0)  # empty mask: 0, not NaN


def test_masked_mean_var_unbiased_and_biased():
    values, mask = T([1.0, 2.0, 3.0, 100.0]), T([True, True, True, False])
    mean, var = F.masked_mean_var(values, mask)
    close(mean, 2.0)
    close(var, 1.0)  # ((1-2)^2 + 0 + (3-2)^2) / (3 - 1)
    close(F.masked_mean_var(values, mask, unbiased=False)[1], 2 / 3)


def test_masked_whiten_standardises_and_zeroes_outside_the_mask():
    values, mask = T([1.0, 2.0, 3.0, 100.0]), T([True, True, True, False])
    close(F.masked_whiten(values, mask), [-1.0, 0.0, 1.0, 0.0], atol=1e-5)
    close(F.masked_whiten(values, mask, shift_mean=False), [1.0, 2.0, 3.0, 0.0], atol=1e-5)


class OtherRank:
    """Stands in for `accelerator.reduce(t, 'sum')` with a second process holding `values` (all unmasked)."""

    def __init__(self, values):
        self.values, self.mean = values, None

    def __call__(self, local):
        if local.ndim == 1:  # [sum, count]
            total = local + T([self.values.sum(), float(len(self.values))])
            self.mean = total[0] / total[1]
            return total
        return local + ((self.values - self.mean) ** 2).sum()  # squared deviations from the global mean


def test_whitening_statistics_span_all_processes_with_all_reduce():
    here, there = T([1.0, 2.0, 3.0]), T([5.0, 6.0, 7.0])
    mean, var = F.masked_mean_var(here, torch.ones(3), all_reduce=OtherRank(there))
    close(mean, 4.0)
    close(var, (9 + 4 + 1 + 1 + 4 + 9) / 5)
    whitened = F.masked_whiten(here, torch.ones(3), all_reduce=OtherRank(there))
    close(whitened, (here - 4.0) / math.sqrt(28 / 5), atol=1e-5)


def test_explained_variance_is_one_for_perfect_values_and_zero_for_the_mean():
    returns, mask = T([[1.0, 2.0, 3.0, 9.0]]), T([[1, 1, 1, 0]])
    close(F.explained_variance(returns, returns, mask), 1.0)
    close(F.explained_variance(torch.full_like(returns, 2.0), returns, mask), 0.0)
    close(F.explained_variance(T([[3.0, 2.0, 1.0, 0.0]]), returns, mask), 1 - 4.0)  # residual var 4, returns var 1


# ---- responses --------------------------------------------------------------------------------------

EOS, PAD = 1, 0
RESPONSES = T([[5, 1, 7, 1], [5, 6, 7, 8], [1, 0, 0, 0], [5, 6, 7, 1]])


def test_response_mask_keeps_tokens_up_to_and_including_the_first_eos():
    expected = T(
        [[True, True, False, False], [True, True, True, True], [True, False, False, False], [True, True, True, True]]
    )
    assert torch.equal(F.response_mask(RESPONSES, EOS), expected)


def test_truncate_after_eos_pads_what_follows_the_first_eos():
    expected = T([[5, 1, 0, 0], [5, 6, 7, 8], [1, 0, 0, 0], [5, 6, 7, 1]])
    assert torch.equal(F.truncate_after_eos(RESPONSES, EOS, PAD), expected)


def test_last_token_index_is_the_first_eos_or_the_end():
    assert F.last_token_index(F.response_mask(RESPONSES, EOS)).tolist() == [1, 3, 0, 3]


# ---- log-probabilities and entropy ------------------------------------------------------------------


def test_token_logprobs_apply_the_sampling_temperature():
    logits = T([[[0.0, math.log(3.0)]]])  # p = [1/4, 3/4]
    close(F.token_logprobs(logits, T([[1]])), [[math.log(0.75)]])
    close(F.token_logprobs(logits, T([[0]])), [[math.log(0.25)]])
    # temperature 2 halves the logits: p(1) = sqrt(3) / (1 + sqrt(3))
    close(F.token_logprobs(logits, T([[1]]), temperature=2.0), [[math.log(math.sqrt(3) / (1 + math.sqrt(3)))]])


def test_entropy_from_logits():
    close(F.entropy_from_logits(torch.zeros(2, 4)), [math.log(4)] * 2)
    close(F.entropy_from_logits(T([0.0, math.log(3.0)])), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    close(F.entropy_from_logits(T([0.0, 100.0]), temperature=1e4), math.log(2), atol=1e-4)  # hot: near uniform


# ---- rewards ----------------------------------------------------------------------------------------


def test_kl_estimators_k1_and_k3():
    logprobs, ref = T([[-1.0, -2.0, -0.5]]), T([[-2.0, -2.0, -0.25]])
    close(F.kl_per_token(logprobs, ref, "k1"), [[1.0, 0.0, -0.25]])
    # k3 = (q/p - 1) - log(q/p): for log(p/q) = 1, e^-1 - 1 + 1 = e^-1; for -0.25, e^0.25 - 1 - 0.25
    close(F.kl_per_token(logprobs, ref, "k3"), [[math.exp(-1), 0.0, math.exp(0.25) - 1.25]])
    assert (F.kl_per_token(torch.randn(50), torch.randn(50), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k2"):
        F.kl_per_token(logprobs, ref, "k2")


def test_kl_penalised_rewards_put_the_score_on_the_last_response_token():
    scores = T([2.0, 3.0])
    kl = T([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = T([[True, True, False], [True, True, True]])
    rewards, kl_rewards = F.kl_penalised_rewards(scores, kl, 0.1, mask)
    close(kl_rewards, [[-0.01, -0.02, 0.0], [-0.05, -0.05, -0.05]])
    close(rewards, [[-0.01, 1.98, 0.0], [-0.05, -0.05, 2.95]])


def test_gae_by_hand():
    rewards, values = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]])
    advantages, returns = F.generalized_advantage_estimation(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    # deltas: 0.1, 0.1, 0.3 ; A2 = 0.3, A1 = 0.1 + 0.5 * 0.3, A0 = 0.1 + 0.5 * 0.25
    close(advantages, [[0.225, 0.25, 0.3]])
    close(returns, [[0.725, 0.85, 1.0]])


def test_gae_with_lambda_one_is_the_discounted_return_minus_the_value():
    rewards, values = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]])
    advantages, returns = F.generalized_advantage_estimation(rewards, values, torch.ones(1, 3), gamma=0.9, lam=1.0)
    close(advantages, [[0.81 - 0.5, 0.9 - 0.6, 1.0 - 0.7]])
    close(returns, [[0.81, 0.9, 1.0]])


def test_gae_stops_at_the_end_of_the_response():
    rewards, values = T([[0.0, 1.0, 5.0]]), T([[0.5, 0.6, 9.0]])  # the third token is after EOS: ignored
    advantages, returns = F.generalized_advantage_estimation(rewards, values, T([[1, 1, 0]]), gamma=1.0, lam=0.5)
    close(advantages, [[0.3, 0.4, 0.0]])  # deltas 0.1 and 1 - 0.6 = 0.4 (no value after the end)
    close(returns, [[0.8, 1.0, 0.0]])


# ---- losses -----------------------------------------------------------------------------------------


def test_clipped_policy_loss_by_hand():
    logprobs = torch.log(T([[1.5, 0.5, 1.0]])).requires_grad_()
    old, advantages, mask = torch.zeros(1, 3), T([[1.0, 1.0, -1.0]]), torch.ones(1, 3)
    out = F.clipped_policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(1, 1) = 1
    close(out.loss, (-1.2 - 0.5 + 1.0) / 3)
    close(out.clip_fraction, 1 / 3)
    close(out.approx_kl, 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)
    close(out.ratio, 1.0)
    out.loss.backward()
    # d/dlogp of -A * ratio / 3 is -A * ratio / 3; the clipped token gets no gradient
    close(logprobs.grad, [[0.0, -0.5 / 3, 1.0 / 3]])


def test_clipped_policy_loss_ignores_masked_tokens():
    logprobs, old = T([[0.0, 5.0]]), torch.zeros(1, 2)
    out = F.clipped_policy_loss(logprobs, old, T([[2.0, 100.0]]), T([[1, 0]]))
    close(out.loss, -2.0)
    close(out.clip_fraction, 0.0)


def test_clipped_value_loss_by_hand():
    values = T([[1.0, 2.0]]).requires_grad_()
    old, returns = T([[0.5, 2.0]]), T([[1.0, 3.0]])
    out = F.clipped_value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: clipped prediction 0.7 -> error 0.09 beats 0; token 1: both errors 1
    close(out.loss, 0.5 * (0.09 + 1.0) / 2)
    close(out.clip_fraction, 0.5)
    out.loss.backward()
    close(values.grad, [[0.0, 0.5 * 2 * (2.0 - 3.0) / 2]])  # clipped token: no gradient through V


def two_processes(function, shards):
    """Runs function(shard, all_reduce) for two shards in two threads whose all_reduce sums across them, as
    `accelerator.reduce(t, "sum")` does across processes. -> the two results."""
    import threading

    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def worker(rank):
        def all_reduce(tensor):
            slots[rank] = tensor
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        results[rank] = function(shards[rank], all_reduce)

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_explained_variance_over_processes_is_that_of_the_pooled_batch():
    values, returns = (
        T([[1.0, 2.0], [0.0, 5.0], [3.0, 3.0], [9.0, 1.0]]),
        T([[1.5, 2.0], [1.0, 4.0], [2.0, 7.0], [8.0, 0.0]]),
    )
    mask = torch.ones(4, 2)
    pooled = F.explained_variance(values, returns, mask)
    shards = [(values[:1], returns[:1], mask[:1]), (values[1:], returns[1:], mask[1:])]  # unequal shards
    results = two_processes(lambda shard, reduce: F.explained_variance(*shard, all_reduce=reduce), shards)
    close(results[0], pooled, atol=1e-5)
    close(results[1], pooled, atol=1e-5)
    local_mean = (F.explained_variance(*shards[0]) + F.explained_variance(*shards[1])) / 2
    assert abs(local_mean - pooled) > 0.05  # the mean of per-process figures is another number


def test_several_stop_tokens_each_end_a_response():
    responses = T([[5, 2, 7, 1], [5, 6, 1, 2], [5, 6, 7, 8]])
    assert F.response_mask(responses, [1, 2]).sum(1).tolist() == [2, 3, 4]
    assert F.truncate_after_eos(responses, [1, 2], PAD).tolist() == [[5, 2, 0, 0], [5, 6, 1, 0], [5, 6, 7, 8]]
    assert F.has_stop_token(responses, [1, 2]).tolist() == [True, True, False]
    assert F.has_stop_token(responses, 2).tolist() == [True, True, False]


def test_kl_loss_k2_and_k3_by_hand():
    logprobs, ref, mask = T([[-1.0, -2.0, -0.5]]), T([[-2.0, -2.0, -0.25]]), T([[1, 1, 0]])
    close(F.kl_loss(logprobs, ref, mask, "k2"), (0.5 * 1.0 + 0.0) / 2)
    close(F.kl_loss(logprobs, ref, mask, "k3"), (math.exp(-1) + 0.0) / 2)
    trained = logprobs.clone().requires_grad_()
    F.kl_loss(trained, ref, mask, "k2").backward()
    assert trained.grad[0, 0] > 0 and trained.grad[0, 2] == 0  # pushes log p down toward q; masked token untouched


def test_reward_normalizer_sft_mode_puts_the_first_batch_at_mean_0_std_1_and_freezes():
    first, later = T([1.0, 2.0, 3.0, 6.0]), T([10.0, 20.0])
    normalizer = F.RewardNormalizer("sft")
    normalizer.update(first)
    normalised = normalizer(first)
    close(normalised.mean(), 0.0, atol=1e-6)
    close(normalised.std(), 1.0, atol=1e-6)
    normalizer.update(later)  # frozen after the SFT batch
    close(normalizer(T([6.0])), (6.0 - 3.0) / first.std().reshape(1), atol=1e-6)
    restored = F.RewardNormalizer("sft")
    restored.load_state_dict(normalizer.state_dict())
    close(restored(later), normalizer(later))


def test_reward_normalizer_sft_mode_pools_batches_of_one_score_until_it_has_two():
    # per_device_train_batch_size 1: it froze after one score, had no std, and never normalised
    normalizer = F.RewardNormalizer("sft")
    for score in (1.0, 3.0, 100.0):
        normalizer.update(T([score]))
    assert normalizer.count == 2 and normalizer.mean == pytest.approx(2.0)
    close(normalizer(T([3.0])), (3.0 - 2.0) / T([1.0, 3.0]).std().reshape(1), atol=1e-6)


def test_reward_normalizer_running_mode_pools_every_batch_and_clips():
    a, b = T([1.0, 2.0, 3.0]), T([10.0, 0.0])
    normalizer = F.RewardNormalizer("running", clip=1.0)
    normalizer.update(a)
    normalizer.update(b)
    pooled = torch.cat([a, b])
    assert normalizer.mean == pytest.approx(pooled.mean().item()) and normalizer.std == pytest.approx(
        pooled.std().item()
    )
    close(normalizer(T([3.2, 100.0, -100.0])), [(3.2 - 3.2) / pooled.std(), 1.0, -1.0], atol=1e-6)
    close(F.RewardNormalizer("none", clip=2.0)(T([5.0, -1.0])), [2.0, -1.0])
    shards = [a, b]  # over two processes: the statistics of both
    means = two_processes(
        lambda shard, reduce: (lambda n: (n.update(shard, reduce), n.mean)[1])(F.RewardNormalizer("running")), shards
    )
    assert means[0] == means[1] == pytest.approx(pooled.mean().item())


def test_exponential_moving_average_by_hand():
    weight = torch.nn.Parameter(T([0.0, 10.0]))
    ema = F.ExponentialMovingAverage([("w", weight)], decay=0.9)
    with torch.no_grad():
        weight.copy_(T([1.0, 0.0]))
    ema.update([("w", weight)])
    close(ema.shadow["w"], [0.1, 9.0])
    ema.update([("w", weight)])
    close(ema.shadow["w"], [0.19, 8.1])
