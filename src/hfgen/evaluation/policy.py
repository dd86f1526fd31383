"""Held-out comparison of a tuned policy with its SFT starting point, shared by every post-SFT method (DPO, KTO,
ORPO, SimPO, and `hfgen compare` for PPO too).

Both policies answer the same held-out prompts, `samples_per_prompt` times each, with the same random numbers
(common random numbers: the comparison is less noisy than two independent draws); each sample's numbers come from
its place in the whole list, so a prompt's answers do not depend on how many processes share the prompts. Each
response is judged by the learned reward model and/or an oracle function; the figures are the mean scores of both
policies, the tuned policy's win rate over SFT per judge (ties count half), KL(tuned || SFT) per response (k1 summed
over the tuned policy's own response tokens), response length, EOS rate and diversity (distinct-n, self-BLEU).

PPO's final evaluation is this comparison too. The pieces are PPO's: `hfgen.rl.rollout` samples (KV-cached
`generate`, with `hfgen.rl.models`' pinned sampling config) and scores, and `hfgen.evaluation.text` gives win rates
and diversity; this module only arranges them for any pair of policies.
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from hfgen.evaluation.text import diversity, win_rate

NOT_JUDGES = ("response_length", "eos_rate")  # figures without a win rate: more is not better


@dataclass(frozen=True)
class Sampling:
    """How the held-out answers are sampled: the same settings for both policies."""

    samples_per_prompt: int = 4
    response_length: int = 24
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 42
    chunk_size: int = 64
    max_prompt_length: int | None = 256  # None: every prompt


def load_judges(reward_model_path: str | None, oracle_function: str | None, chunk_size: int, device):
    """(RewardScorer or None, oracle function or None): the learned reward model (read with its own tokenizer) and
    the independent oracle."""
    from hfgen.evaluation.command import load_reward_model
    from hfgen.rl.rollout import RewardScorer, load_function

    scorer = None
    if reward_model_path:
        reward_tokenizer, reward_model = load_reward_model(reward_model_path, device)
        reward_model.eval().requires_grad_(False)
        scorer = RewardScorer(reward_model, reward_tokenizer, {}, [1.0], chunk_size)
    return scorer, load_function(oracle_function) if oracle_function else None


@torch.no_grad()
def compare_to_reference(
    accelerator, policy, reference, tokenizer, prompts: list, sampling: Sampling, scorer=None, oracle=None,
    name: str = "policy", judges: dict | None = None,
) -> tuple[dict, list[dict]]:  # fmt: skip
    """-> (figures, one row per sampled prompt with both responses and their scores).

    `reference=None` with a PEFT `policy`: the reference is the policy with its adapter disabled. `scorer` (a
    `RewardScorer`) gives `reward_model` and, when it adds reward functions or weights (PPO's training reward),
    `score`; `oracle` and `judges` ({name: function(prompts, responses)}) give one figure each. Keys:
    `sft/<figure>`, `<name>/<figure>`, `win_rate/<judge>` (name over SFT), `kl_to_reference`, and the settings in `heldout/...`.
    Prompts are split over the processes and gathered; every process returns the same figures."""
    from accelerate.utils import gather_object

    from hfgen import tracking
    from hfgen.rl import functional as F
    from hfgen.rl.models import make_generation_config, stop_token_ids, tokenize_prompts
    from hfgen.rl.rollout import (
        episode_ids,
        function_scores,
        left_pad,
        reference_logprobs,
        response_texts,
        sample_responses,
        sampled_logprobs,
    )

    prompts = [p for p in prompts for _ in range(sampling.samples_per_prompt)]
    if not prompts:
        return {}, []
    prompts, queries = tokenize_prompts(tokenizer, prompts, sampling.max_prompt_length)
    judges = {**({"oracle": oracle} if oracle is not None else {}), **(judges or {})}
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    policy.eval()
    stop_ids = stop_token_ids(tokenizer, policy)  # every EOS id ends a response, as in PPO
    generation_config = make_generation_config(
        tokenizer, sampling.response_length, sampling.temperature, sampling.top_p, stop_ids, models=[policy, reference]
    )
    local: dict[str, dict[str, list]] = {}
    numbered = list(enumerate(zip(prompts, queries)))
    with accelerator.split_between_processes(numbered) as own:
        kept = len(own)  # the shards are padded to one length: sharded engines need the same passes on every rank
    with accelerator.split_between_processes(numbered, apply_padding=True) as shard:
        indices = [index for index, _ in shard][:kept]
        shard_prompts = [prompt for _, (prompt, _) in shard]
        query_ids, query_mask = left_pad([query for _, (_, query) in shard], tokenizer.pad_token_id, policy.device)
        # each row's random numbers come from its place in the whole list: the same for both policies (common
        # random numbers), and whatever the number of processes or the rank it lands on (one seed for every rank
        # gave rank r's k-th prompt rank 0's k-th prompt's numbers: alike answers, diversity falling with processes)
        seeds = [row_seed(sampling.seed, index) for index, _ in shard]
        for who in ("sft", name):
            use_reference = who == "sft" and reference is not None
            with policy.disable_adapter() if who == "sft" and reference is None else nullcontext():
                sampled = sample_responses(
                    reference if use_reference else policy, query_ids, query_mask, generation_config,
                    sampling.chunk_size, tokenizer.pad_token_id, seeds,
                )  # fmt: skip
            mask = F.response_mask(sampled.response_ids, stop_ids)
            texts = response_texts(tokenizer, sampled.response_ids, stop_ids)
            finished = F.has_stop_token(sampled.response_ids, stop_ids)
            figures: dict[str, list] = {"response": texts}
            if scorer is not None:  # scored as PPO scores: a response cut off without EOS is shown unfinished
                ids = episode_ids([query for _, (_, query) in shard], sampled.response_ids, mask)
                scores, components = scorer(shard_prompts, texts, finished.tolist(), policy.device, ids)
                if list(components) != ["reward_model"] or scorer.weights != [1.0]:
                    figures["score"] = scores.tolist()  # the training reward, without the missing-EOS penalty
                if "reward_model" in components:
                    figures["reward_model"] = components["reward_model"].tolist()
            for judge, function in judges.items():
                judged = function_scores(function, shard_prompts, texts, policy.device)
                figures[judge] = tracking.finite_or_null(judged.tolist())
            figures["response_length"] = mask.sum(1).float().tolist()
            figures["eos_rate"] = finished.float().tolist()
            local[who] = {key: values[:kept] for key, values in figures.items()}
        # KL(tuned || SFT) on the tuned policy's own samples: sum over its response tokens of log pi - log pi_sft
        input_ids = torch.cat([query_ids, sampled.response_ids], dim=1)
        attention_mask = torch.cat([query_mask, mask.long()], dim=1)
        passes = (input_ids, attention_mask, query_ids.shape[1], sampling.temperature, sampling.chunk_size)
        ref = reference_logprobs(policy, reference, *passes)
        logprobs = sampled_logprobs(accelerator, policy, sampled, *passes)
        local["kl"] = {"kl": ((logprobs - ref) * mask).sum(1).tolist()[:kept]}
    tokenizer.padding_side = padding_side

    rows: list[dict] = []
    for gathered_indices, shard_local in gather_object([(indices, local)]):
        for i, index in enumerate(gathered_indices):
            row = {"index": index, "prompt": prompts[index], "kl": shard_local["kl"]["kl"][i]}
            for who in ("sft", name):
                row |= {f"{who}/{key}": values[i] for key, values in shard_local[who].items()}
            rows.append(row)
    rows.sort(key=lambda row: row["index"])
    return summarise(rows, name, sampling), rows


@torch.no_grad()
def judge_policy(policy, tokenizer, prompts: list, sampling: Sampling, scorer, repeat_cost: float) -> float:
    """The reward-hacking monitor's judgement of `policy` (`hfgen.rl.monitor.judged_score`), for `stop_on_hacking` to
    choose among recent policies: its answers to `prompts`, `samples_per_prompt` each, every answer's random numbers
    from its place in the list (the same for every policy judged), scored by `scorer` (the training reward, the
    missing-EOS penalty aside). Every process answers every prompt: all get the same figure, and sharded engines
    (FSDP2, ZeRO-3) run the same passes on every rank."""
    from hfgen.rl import functional as F
    from hfgen.rl.models import make_generation_config, stop_token_ids, tokenize_prompts
    from hfgen.rl.monitor import judged_score
    from hfgen.rl.rollout import episode_ids, left_pad, response_texts, sample_responses

    prompts = [p for p in prompts for _ in range(sampling.samples_per_prompt)]
    prompts, queries = tokenize_prompts(tokenizer, prompts, sampling.max_prompt_length)
    policy.eval()
    stop_ids = stop_token_ids(tokenizer, policy)
    generation_config = make_generation_config(
        tokenizer, sampling.response_length, sampling.temperature, sampling.top_p, stop_ids, models=[policy]
    )
    query_ids, query_mask = left_pad(queries, tokenizer.pad_token_id, policy.device)
    seeds = [row_seed(sampling.seed, index) for index in range(len(queries))]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # as compare_to_reference samples
    try:
        sampled = sample_responses(
            policy, query_ids, query_mask, generation_config, sampling.chunk_size, tokenizer.pad_token_id, seeds
        )
    finally:
        tokenizer.padding_side = padding_side
    mask = F.response_mask(sampled.response_ids, stop_ids)
    texts = response_texts(tokenizer, sampled.response_ids, stop_ids)
    finished = F.has_stop_token(sampled.response_ids, stop_ids)
    ids = episode_ids(queries, sampled.response_ids, mask)
    scores, _ = scorer(prompts, texts, finished.tolist(), policy.device, ids)
    return judged_score(scores.tolist(), texts, repeat_cost)


def row_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th sampled row of a comparison seeded with `seed`, in torch's 64-bit range."""
    return (seed * 1_000_003 + index + 1) % 2**63


def summarise(rows: list[dict], name: str, sampling: Sampling) -> dict:
    """The figures of `compare_to_reference` from its rows (also how `hfgen compare` re-reads saved rows): the
    mean of every figure, and a win rate for every judge (every figure but length and EOS rate)."""
    results = {  # settings under heldout/, not eval/: a later `hfgen eval` of the run replaces eval/ (its own)
        "heldout/num_prompts": len(rows) // max(sampling.samples_per_prompt, 1),
        "heldout/samples_per_prompt": sampling.samples_per_prompt,
        "heldout/response_length": sampling.response_length,
        "heldout/temperature": sampling.temperature,
        "kl_to_reference": mean([row["kl"] for row in rows]),
    }
    figures = [key.split("/", 1)[1] for key in rows[0] if key.startswith(f"{name}/") and key != f"{name}/response"]
    for key in figures:
        results |= compared_figures(
            key, [row[f"{name}/{key}"] for row in rows], [row[f"sft/{key}"] for row in rows], name
        )
    for who in ("sft", name):
        groups: dict = {}
        for row in rows:
            groups.setdefault(str(row["prompt"]), []).append(row[f"{who}/response"])
        results |= {f"{who}/{key}": value for key, value in diversity(list(groups.values())).items()}
    return results


def distinct_prompts(prompts: list) -> list:
    """The prompts without repeats, in order of first appearance: the comparison groups the samples by prompt text
    (self-BLEU, distinct-n), so a repeated prompt would pool two groups' samples and weigh twice in every mean."""
    return list({repr(prompt): prompt for prompt in prompts}.values())


def compared_figures(key: str, ours: list, sft: list, name: str) -> dict:
    """Both policies' means of one figure over the responses it scored, and for a judge (not length or EOS rate)
    the win rate over the pairs it scored on both sides; `heldout/pairs_left_out/KEY` counts the pairs a judge
    left unscored on either side (present only when there are some). Also GRPO's and RLOO's comparison."""
    results = {f"sft/{key}": mean(sft), f"{name}/{key}": mean(ours)}
    if key not in NOT_JUDGES:
        pairs = [(a, b) for a, b in zip(ours, sft) if scored(a) and scored(b)]
        results[f"win_rate/{key}"] = win_rate(*zip(*pairs)) if pairs else None
        if len(pairs) < len(ours):
            results[f"heldout/pairs_left_out/{key}"] = len(ours) - len(pairs)
    return results


def mean(values: list[float]) -> float | None:
    """The mean of the scored values: None (a reward function's "not scored") and NaN are skipped; None when
    nothing was scored (eval.json holds null, not NaN, which is no JSON)."""
    kept = [v for v in values if scored(v)]
    return sum(kept) / len(kept) if kept else None


def scored(value) -> bool:
    """Whether a judge scored a response: None (a reward function's "not scored") and NaN are no scores."""
    return value is not None and not math.isnan(value)


def bootstrap_interval(
    rows: list[dict], statistic, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(rows)`, resampling whole prompts (the samples of one prompt are
    not independent of each other)."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(str(row["prompt"]), []).append(row)
    clusters = list(groups.values())
    rng = random.Random(seed)
    values = sorted(statistic([row for _ in clusters for row in rng.choice(clusters)]) for _ in range(resamples))
    tail = (1 - level) / 2
    return values[int(tail * (resamples - 1))], values[int((1 - tail) * (resamples - 1))]


def format_comparison(results: dict, name: str) -> str:
    """The held-out comparison as a small table: SFT, the tuned policy, and its win rate over SFT, one row per
    figure the comparison has."""
    lines = [
        f"Held-out evaluation: {results['heldout/num_prompts']} prompts x {results['heldout/samples_per_prompt']} samples",
        f"  {'':<18}{'SFT':>9}{name.upper():>9}{'win rate':>10}",
    ]
    for key in [key.split("/", 1)[1] for key in results if key.startswith(f"{name}/")]:
        if results[f"{name}/{key}"] is not None and results[f"sft/{key}"] is not None:
            win = results.get(f"win_rate/{key}")
            lines.append(
                f"  {key:<18}{results[f'sft/{key}']:>9.3f}{results[f'{name}/{key}']:>9.3f}"
                + (f"{win:>10.3f}" if win is not None else "")
            )
    lines.append(f"  KL({name.upper()} || SFT) per response: {results['kl_to_reference']:.3f} nats")
    return "\n".join(lines)
