"""Embedded datasets for the whole RLHF story, generated deterministically, no download.

A tiny world of things (cat, river, lamp...), colours and adjectives. Half of the adjectives are
pleasant, half unpleasant, and the pretraining corpus and the SFT responses use both equally. The
**oracle** encodes the preference rule that generated the preference pairs: a good answer talks about
the thing the prompt asked about (and its colour), in pleasant words, without repeating itself, briefly.
So a policy fine-tuned with PPO against a reward model learned from the pairs should move toward
pleasant, on-topic answers, and that gain can be checked by the oracle, independently of the reward model.

Datasets (`embedded:NAME` in any dataset key), each with `train` and `test` splits:
    corpus          {"text"}                       pretraining documents
    instructions    {"messages"}                   user/assistant conversations for SFT
    instructions_pc {"prompt", "completion"}       the same, as conversational prompt/completion
    preferences     {"prompt", "chosen", "rejected"}  conversational preference pairs (chosen: higher oracle score;
                                                   the last 15% are topic twins: rejected = chosen about another thing)
    prompts         {"prompt"}                     conversational prompts for PPO and evaluation

The `arithmetic_*` datasets (a task with verifiable answers, for GRPO/RLOO) live in `hfgen.data.arithmetic`.
"""

from __future__ import annotations

import random
import re

from hfgen.data.arithmetic import NAMES as ARITHMETIC_NAMES
from hfgen.data.arithmetic import generate_rows as arithmetic_rows

SUBJECTS = (
    "cat", "dog", "bird", "fish", "horse", "rabbit", "fox", "bear", "owl", "frog", "tree", "flower", "river",
    "garden", "house", "city", "car", "boat", "train", "book", "song", "cake", "lamp", "hill", "star", "moon",
)  # fmt: skip
COLORS = ("red", "blue", "green", "yellow", "white", "black", "brown", "gray")
POSITIVE = ("happy", "kind", "bright", "warm", "lovely", "gentle", "cheerful", "calm", "sweet", "brave")
NEGATIVE = ("sad", "cold", "dull", "grim", "rude", "gloomy", "noisy", "bitter", "lazy", "weak")
ADJECTIVES = POSITIVE + NEGATIVE
VERBS = ("sits", "runs", "sleeps", "waits", "plays", "rests", "hides", "stands")
PLACES = ("near", "by", "under", "behind", "beside", "above")
REQUESTS = (
    "describe the {thing}.",
    "tell me about the {thing}.",
    "what is the {thing} like?",
    "write about the {thing}.",
)

SPLIT_SEEDS = {"train": 1234, "test": 98765}
SIZES = {"corpus": 3000, "instructions": 3000, "preferences": 3000, "prompts": 512}
TEST_FRACTION = 0.1
MAX_GOOD_LENGTH = 12  # words; longer answers lose oracle score
TOPIC_TWIN_SHARE = 0.15  # of the preference pairs: the rejected answer is the chosen one about another thing


# ---- the oracle -------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+")


def oracle_score(prompt: str, response: str) -> float:
    """The preference rule behind the embedded data. Higher is better.

    +1 if the response names the prompt's subject (else -1), +0.5 if it also names the prompt's colour;
    +1 per distinct pleasant adjective (at most 3), -1 per unpleasant one; -1 per repeated word;
    -0.5 per word beyond MAX_GOOD_LENGTH.
    """
    asked = _WORD.findall(prompt.lower())
    words = _WORD.findall(response.lower())
    subject = next((w for w in asked if w in SUBJECTS), None)
    color = next((w for w in asked if w in COLORS), None)
    score = 1.0 if subject is not None and subject in words else -1.0
    if color is not None and color in words:
        score += 0.5
    score += min(len({w for w in words if w in POSITIVE}), 3)
    score -= sum(w in NEGATIVE for w in words)
    content = [w for w in words if w not in ("the", "a", "is", "and", "it")]
    score -= len(content) - len(set(content))
    score -= 0.5 * max(0, len(words) - MAX_GOOD_LENGTH)
    return score


def oracle_scores(prompts: list[str], responses: list[str]) -> list[float]:
    """Batched oracle, usable as a rule-based reward function: `reward_function: hfgen.data.embedded:oracle_scores`."""
    return [oracle_score(p, r) for p, r in zip(prompts, responses)]


def on_topic_scores(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 where the response names the prompt's subject, else 0.0: the share of answers that stay on the asked-about
    thing (`eval_functions: [hfgen.data.embedded:on_topic_scores]` in PPO's evaluation)."""
    scores = []
    for prompt, response in zip(prompts, responses):
        subject = next((w for w in _WORD.findall(prompt.lower()) if w in SUBJECTS), None)
        scores.append(float(subject is not None and subject in _WORD.findall(response.lower())))
    return scores


def hackable_reward_scores(prompts: list[str], responses: list[str]) -> list[float]:
    """A deliberately hackable reward, for checking the reward-hacking monitor (scripts/hacking_monitor_seeds.py):
    the oracle's subject term, plus 1 for every pleasant word however often it repeats. The oracle rises while the
    policy learns pleasant, on-topic answers, then falls as it learns to repeat "lovely" for more reward."""
    scores = []
    for prompt, response in zip(prompts, responses):
        asked, words = _WORD.findall(prompt.lower()), _WORD.findall(response.lower())
        subject = next((w for w in asked if w in SUBJECTS), None)
        scores.append((1.0 if subject is not None and subject in words else -1.0) + sum(w in POSITIVE for w in words))
    return scores


# ---- generators -------------------------------------------------------------------------------------


def _thing(rng: random.Random) -> str:
    subject = rng.choice(SUBJECTS)
    return f"{rng.choice(COLORS)} {subject}" if rng.random() < 0.5 else subject


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(5)
    a, b = rng.sample(ADJECTIVES, 2)
    if kind == 0:
        return f"the {_thing(rng)} is {a}."
    if kind == 1:
        return f"the {_thing(rng)} is {a} and {b}."
    if kind == 2:
        return f"the {_thing(rng)} {rng.choice(VERBS)} {rng.choice(PLACES)} the {_thing(rng)}."
    if kind == 3:
        return f"a {a} {rng.choice(SUBJECTS)} and a {b} {rng.choice(SUBJECTS)}."
    return f"the {rng.choice(SUBJECTS)} {rng.choice(VERBS)} and it is {a}."


def _answer(rng: random.Random, thing: str) -> str:
    """An SFT-style answer about `thing`: pleasant and unpleasant adjectives equally likely."""
    adjectives = rng.sample(ADJECTIVES, rng.choice((1, 2, 2, 3)))
    if len(adjectives) == 1:
        described = adjectives[0]
    else:
        described = ", ".join(adjectives[:-1]) + " and " + adjectives[-1]
    if rng.random() < 0.3:
        return f"the {thing} {rng.choice(VERBS)} {rng.choice(PLACES)} the {rng.choice(SUBJECTS)} and it is {described}."
    return f"the {thing} is {described}."


def _worse_answer(rng: random.Random, thing: str) -> str:
    """Off-topic, repetitive or rambling answers, so the pairs also teach relevance and brevity."""
    kind = rng.randrange(3)
    if kind == 0:
        return _answer(rng, rng.choice(SUBJECTS))
    if kind == 1:
        adjective = rng.choice(ADJECTIVES)
        return f"the {thing} is {adjective} and {adjective} and {adjective}."
    return " ".join(_sentence(rng) for _ in range(3))


def _request(rng: random.Random) -> str:
    return rng.choice(REQUESTS).format(thing=_thing(rng))


def _thing_of(request: str) -> str:
    words = request.rstrip(".?").removesuffix(" like").split()
    return " ".join(words[words.index("the") + 1 :])


def _conversation(rng):
    request = _request(rng)
    return request, _answer(rng, _thing_of(request))


def generate_rows(name: str, split: str) -> list[dict]:
    """Rows of embedded dataset `name` for `split` ('train' or 'test'), deterministic."""
    rng = random.Random(f"{name}:{SPLIT_SEEDS[split]}")
    size = SIZES[name.removesuffix("_pc")]
    count = size if split == "train" else max(1, int(size * TEST_FRACTION))
    rows = []
    if name == "preferences":
        # the topic twins come last, from their own seed: the pairs before them are those of earlier versions, and
        # so is the tokenizer (trained on the first 500)
        twins = round(count * TOPIC_TWIN_SHARE)
        count -= twins
        twin_rng = random.Random(f"preferences:twins:{SPLIT_SEEDS[split]}")
    for _ in range(count):
        if name == "corpus":
            rows.append({"text": " ".join(_sentence(rng) for _ in range(rng.randint(3, 8)))})
        elif name == "instructions":
            request, answer = _conversation(rng)
            rows.append({"messages": [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]})
        elif name == "instructions_pc":
            request, answer = _conversation(rng)
            rows.append(
                {
                    "prompt": [{"role": "user", "content": request}],
                    "completion": [{"role": "assistant", "content": answer}],
                }
            )
        elif name == "preferences":
            rows.append(_preference_pair(rng))
        elif name == "prompts":
            rows.append({"prompt": [{"role": "user", "content": _request(rng)}]})
        else:
            raise KeyError(name)
    if name == "preferences":
        rows += [_topic_twin_pair(twin_rng) for _ in range(twins)]
    return rows


def _preference_pair(rng: random.Random) -> dict:
    while True:
        request = _request(rng)
        thing = _thing_of(request)
        first = _answer(rng, thing)
        second = _answer(rng, thing) if rng.random() < 0.7 else _worse_answer(rng, thing)
        a, b = oracle_score(request, first), oracle_score(request, second)
        if a != b:  # ties carry no preference
            chosen, rejected = (first, second) if a > b else (second, first)
            return {
                "prompt": [{"role": "user", "content": request}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }


def _topic_twin_pair(rng: random.Random) -> dict:
    """A pair whose rejected answer is the chosen one word for word, but about another thing: as fluent and as
    pleasant, so all it teaches is to stay on the asked-about thing (the oracle's subject term)."""
    while True:
        request = _request(rng)
        thing = _thing_of(request)
        chosen = _answer(rng, thing)
        rejected = chosen.replace(f"the {thing}", f"the {_thing(rng)}", 1)
        if oracle_score(request, chosen) > oracle_score(request, rejected):  # not the same thing, nor named later
            break
    return {
        "prompt": [{"role": "user", "content": request}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def preference_pairs(count: int, seed: int) -> list[dict]:
    """`count` fresh preference pairs (same layout as `preferences`) from their own seed: pairs a reward model
    trained on the embedded splits has not seen."""
    rng = random.Random(f"preferences:fresh:{seed}")
    return [_preference_pair(rng) for _ in range(count)]


NAMES = ("corpus", "instructions", "instructions_pc", "preferences", "prompts") + ARITHMETIC_NAMES


def load_embedded(name: str):
    """A `datasets.DatasetDict` with train and test splits."""
    from datasets import Dataset, DatasetDict

    generate = arithmetic_rows if name in ARITHMETIC_NAMES else generate_rows
    return DatasetDict({split: Dataset.from_list(generate(name, split)) for split in SPLIT_SEEDS})


def tokenizer_training_text() -> list[str]:
    """Text the embedded tokenizer is trained on: the corpus and the conversations."""
    texts = [row["text"] for row in generate_rows("corpus", "train")]
    for row in generate_rows("instructions", "train"):
        texts += [m["content"] for m in row["messages"]]
    for row in generate_rows("preferences", "train")[:500]:
        texts += [row["chosen"][0]["content"], row["rejected"][0]["content"]]
    return texts
