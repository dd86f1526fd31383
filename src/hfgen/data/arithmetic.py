"""An embedded task with verifiable answers, where RL can beat supervised fine-tuning: sums of single digits.

A problem is a chain of three single digits to add ("3+8+5=?"); its answer is worked step by step in a
fixed format ("3+8=11. 11+5=16. answer: 16"). The demonstrations come from a **careless tutor**: each step is
miscalculated with probability `SLIP_RATE` (the wrong partial sum is then carried on), and some answers end
without the "answer: N" line. A model fine-tuned on them learns to make the tutor's slips, so its sampled answers
are often wrong; a rule reward that checks the exact answer can train the slips away, which no amount of imitation
can. Every fact a step needs (x+y for x <= 18, y <= 9) is in the pretraining corpus, written correctly.

Problems are split by a hash of their digits, so held-out (test) problems are never in any train split.

Datasets (`embedded:NAME`), each with `train` and `test` splits:
    arithmetic_corpus        {"text"}                      pretraining text: addition facts and correct worked sums
    arithmetic_instructions  {"prompt", "completion"}      conversational, the careless tutor's demonstrations (SFT)
    arithmetic_prompts       {"prompt", "answer"}          conversational prompts and their exact answers (RL, eval)

Rule rewards, `module:function(prompts, responses) -> scores` like every hfgen reward function:
    hfgen.data.arithmetic:exact_answer   1 if the response's "answer: N" is the sum, else 0
    hfgen.data.arithmetic:answer_format  1 if the response is steps then one "answer: N" line, else 0
    hfgen.data.arithmetic:exact_match    1 if "answer: N" matches the dataset's `answer` column (for any such data)
    hfgen.data.arithmetic:correct_steps  share of the steps written correctly: a judge of the working (the oracle)
"""

from __future__ import annotations

import random
import re
import zlib

SLIP_RATE = 0.25  # chance that the tutor gets a step wrong; with 2 steps about 44% of answers are wrong
NO_FORMAT_RATE = 0.1  # chance that the tutor ends with "so N" instead of "answer: N"
TERMS = (3,)  # digits per problem: one length, so a digit's place in the prompt is fixed
TEST_SHARE = 10  # one problem in TEST_SHARE (by hash) is held out
SIZES = {"arithmetic_corpus": 4000, "arithmetic_instructions": 4000, "arithmetic_prompts": 4000}
TEST_SIZE = 200
SPLIT_SEEDS = {"train": 4321, "test": 56789}
NAMES = tuple(SIZES)

_PROBLEM = re.compile(r"^\s*(\d(?:\s*\+\s*\d)+)\s*=\s*\?\s*$")
_ANSWER = re.compile(r"answer:\s*(-?\d+)")
_FORMAT = re.compile(r"^(\d+\+\d=\d+\. )+answer: \d+$")


# ---- problems and answers ------------------------------------------------------------------------------


def problem_text(digits: tuple[int, ...]) -> str:
    return "+".join(map(str, digits)) + "=?"


def parse_problem(prompt: str) -> tuple[int, ...] | None:
    """The digits of a problem ("3+8+5=?"), or None when the prompt is not one."""
    match = _PROBLEM.match(prompt)
    return tuple(int(d) for d in match.group(1).split("+")) if match else None


def parse_answer(response: str) -> int | None:
    """The number after the last "answer:" in a response, or None."""
    found = _ANSWER.findall(response)
    return int(found[-1]) if found else None


def worked_answer(digits: tuple[int, ...], rng: random.Random | None = None) -> str:
    """The steps and the answer line; with `rng`, the careless tutor's version (slips and missing format)."""
    total, steps = digits[0], []
    for digit in digits[1:]:
        step = total + digit
        if rng is not None and rng.random() < SLIP_RATE:
            step += rng.choice((-2, -1, 1, 2)) if step > 1 else rng.choice((1, 2))
        steps.append(f"{total}+{digit}={step}.")
        total = step
    ending = f"so {total}" if rng is not None and rng.random() < NO_FORMAT_RATE else f"answer: {total}"
    return " ".join(steps) + " " + ending


def is_held_out(digits: tuple[int, ...]) -> bool:
    return zlib.crc32(bytes(digits)) % TEST_SHARE == 0


def random_problem(rng: random.Random, held_out: bool) -> tuple[int, ...]:
    while True:
        digits = tuple(rng.randrange(10) for _ in range(rng.choice(TERMS)))
        if is_held_out(digits) == held_out:
            return digits


# ---- rule rewards ----------------------------------------------------------------------------------------


def exact_answer(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 when the response's last "answer: N" is the problem's sum, else 0.0 (also for prompts that are no
    problem)."""
    scores = []
    for prompt, response in zip(prompts, responses):
        digits = parse_problem(prompt)
        scores.append(float(digits is not None and parse_answer(response) == sum(digits)))
    return scores


def answer_format(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 when the response is "a+b=c." steps followed by a single "answer: N", nothing else; else 0.0."""
    return [float(bool(_FORMAT.match(response.strip()))) for response in responses]


def exact_match(prompts: list[str], responses: list[str], answer: list) -> list[float]:
    """1.0 when the response's "answer: N" equals the row's `answer` column (a reward function receives any
    dataset column it names as a parameter), else 0.0."""
    return [float(str(parse_answer(r)) == str(a).strip()) for r, a in zip(responses, answer)]


# ---- datasets ----------------------------------------------------------------------------------------------


def _corpus_document(rng: random.Random) -> str:
    """Correct addition facts and correctly worked sums, in the task's own notation."""
    parts = []
    for _ in range(rng.randint(4, 10)):
        if rng.random() < 0.2:
            a, b = rng.randrange(19), rng.randrange(10)
            parts.append(f"{a}+{b}={a + b}.")
        else:
            digits = random_problem(rng, held_out=False)
            parts.append(f"{problem_text(digits)} {worked_answer(digits)}")
    return " ".join(parts)


def generate_rows(name: str, split: str) -> list[dict]:
    """Rows of arithmetic dataset `name` for `split` ('train' or 'test'), deterministic."""
    rng = random.Random(f"{name}:{SPLIT_SEEDS[split]}")
    count = SIZES[name] if split == "train" else TEST_SIZE
    held_out = split == "test"
    rows = []
    for _ in range(count):
        if name == "arithmetic_corpus":
            rows.append({"text": _corpus_document(rng)})
            continue
        digits = random_problem(rng, held_out)
        prompt = [{"role": "user", "content": problem_text(digits)}]
        if name == "arithmetic_instructions":
            rows.append(
                {"prompt": prompt, "completion": [{"role": "assistant", "content": worked_answer(digits, rng)}]}
            )
        elif name == "arithmetic_prompts":
            rows.append({"prompt": prompt, "answer": str(sum(digits))})
        else:
            raise KeyError(name)
    return rows


def tokenizer_training_text() -> list[str]:
    """Text the arithmetic tokenizer is trained on: the corpus and the demonstrations."""
    texts = [row["text"] for row in generate_rows("arithmetic_corpus", "train")]
    for row in generate_rows("arithmetic_instructions", "train")[:1000]:
        texts += [row["prompt"][0]["content"], row["completion"][0]["content"]]
    return texts


_STEP = re.compile(r"(\d+)\+(\d+)=(\d+)\.")


def correct_steps(prompts: list[str], responses: list[str]) -> list[float]:
    """A judge of the working, not only the answer: the share of the problem's steps the response writes out
    correctly ("11+5=16."), in order. An answer guessed right after wrong steps scores low."""
    scores = []
    for prompt, response in zip(prompts, responses):
        digits = parse_problem(prompt)
        if digits is None:
            scores.append(0.0)
            continue
        expected, total = [], digits[0]
        for digit in digits[1:]:
            expected.append((total, digit, total + digit))
            total += digit
        written = [tuple(int(n) for n in step) for step in _STEP.findall(response)]
        scores.append(sum(a == b for a, b in zip(written, expected)) / len(expected))
    return scores


# ---- GSM8K-style answers (recipes/qwen2.5-0.5b/grpo_gsm8k.yaml) -------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The answer a response or a GSM8K solution gives: the number after its last "####" or "answer:", else its
    last number; commas and a trailing ".0" dropped."""
    for marker in ("####", "answer:"):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
            found = _NUMBER.findall(text)
            return _canonical(found[0]) if found else None
    found = _NUMBER.findall(text)
    return _canonical(found[-1]) if found else None


def _canonical(number: str) -> str:
    number = number.replace(",", "")
    return number[:-2] if number.endswith(".0") else number


def gsm8k_exact_answer(prompts: list[str], responses: list[str], answer: list[str]) -> list[float]:
    """1.0 when the response's final number equals the GSM8K solution's "#### N" (the dataset's `answer` column)."""
    return [
        float(final_number(r) is not None and final_number(r) == final_number(a)) for r, a in zip(responses, answer)
    ]
