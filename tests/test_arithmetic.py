"""The embedded arithmetic task: its rewards, judge and splits, against hand-computed values."""

import math

import pytest

from hfgen.data import arithmetic
from hfgen.group_rl import (
    call_reward_function,
    groups_no_signal_share,
    no_signal_share,
    trl_reward_function,
    weighted_totals,
)

PROMPTS = ["3+8+5=?", "3+8+5=?", "1+2+3+4=?", "describe the cat.", "3+8+5=?"]
RESPONSES = [
    "3+8=11. 11+5=16. answer: 16",  # right, well formed
    "3+8=12. 12+5=17. answer: 17",  # a slip carried on
    "1+2=3. 3+3=6. 6+4=10. so 10",  # right sum, no answer line
    "answer: 16",  # not a problem
    "3+8=11. 11+5=16. answer: 16 answer: 15",  # two answers: the last counts, the format fails
]


def test_exact_answer_by_hand():
    assert arithmetic.exact_answer(PROMPTS, RESPONSES) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_answer_format_by_hand():
    assert arithmetic.answer_format(PROMPTS, RESPONSES) == [1.0, 1.0, 0.0, 0.0, 0.0]  # no steps: not the format


def test_correct_steps_by_hand():
    assert arithmetic.correct_steps(PROMPTS, RESPONSES) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert arithmetic.correct_steps(["1+2+3+4=?"], ["1+2=3. 3+3=7. 7+4=11. answer: 11"]) == [pytest.approx(1 / 3)]


def test_exact_match_reads_the_answer_column():
    assert arithmetic.exact_match(PROMPTS[:3], RESPONSES[:3], ["16", "16", "10"]) == [1.0, 0.0, 0.0]


def test_no_signal_share_by_hand():
    # groups of 3: [1,1,1] no signal, [0,1,0] signal, [0.5,0.5,0.5] no signal, [0,0,1] signal
    rewards = [1, 1, 1, 0, 1, 0, 0.5, 0.5, 0.5, 0, 0, 1]
    assert no_signal_share(rewards, 3) == 0.5
    assert no_signal_share(rewards, 2) == pytest.approx(2 / 6)  # pairs: [1,1] [1,0] [1,0] [.5,.5] [.5,0] [0,1]
    assert no_signal_share(rewards, 1) == 1.0


def test_a_completion_no_reward_function_scored_is_left_out_as_trl_leaves_it_out():
    # TRL 1.16: every function's None makes a completion unscorable (NaN: out of its group's baseline and the logged
    # reward, advantage 0); hfgen counted it 0, so [1, None, None, 1] was a group with signal
    nan = math.nan
    rewards_per_func = [[1.0, nan], [nan, nan], [nan, 2.0], [nan, nan]]
    totals = weighted_totals(rewards_per_func, [1.0, 0.5])
    assert totals[0] == 1.0 and totals[2] == 1.0 and totals[[1, 3]].isnan().all()
    # groups of 4: [1, -, -, 1] no signal, [0, -, 1, -] signal, [-, -, -, -] nothing scored: no signal
    assert no_signal_share([1, nan, nan, 1, 0, nan, 1, nan, nan, nan, nan, nan], 4) == pytest.approx(2 / 3)
    assert no_signal_share([nan, 1.0], 2) == 1.0  # one scored: its advantage is 0 too


def test_under_normalize_then_sum_a_group_teaches_when_any_component_varies_in_it():
    # TRL normalises each component within its group before the weighted sum: exact answers [1, 0, 1, 0] and a bonus
    # [0, 2, 0, 2] weighted [1, 0.5] total 1.0 each, yet give advantages +-0.87; hfgen counted the group silent
    rewards_per_func = [[1.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    assert groups_no_signal_share(rewards_per_func, [1.0, 0.5], 4, "normalize_then_sum") == 0.5
    assert groups_no_signal_share(rewards_per_func, [1.0, 0.5], 4, "sum_then_normalize") == 1.0  # equal totals
    # a component weighted 0 (a metric logged as a reward) adds 0 to every advantage whatever it varies: TRL's
    # weighted sum teaches nothing where only it varies (review 40 F12: hfgen counted such a group as teaching)
    logged = [[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    assert groups_no_signal_share(logged, [1.0, 0.0], 4, "normalize_then_sum") == 1.0
    assert groups_no_signal_share(logged, [0.0, 0.0], 4, "normalize_then_sum") == 1.0  # nothing weighted


def test_reward_functions_in_trls_calling_convention():
    """Conversational prompts and completions reach the function as texts; dataset columns it names come along."""
    prompts = [[{"role": "user", "content": "3+8+5=?"}]] * 2
    completions = [[{"role": "assistant", "content": RESPONSES[0]}], [{"role": "assistant", "content": RESPONSES[1]}]]
    exact = trl_reward_function("hfgen.data.arithmetic:exact_answer")
    assert exact.__name__ == "exact_answer"
    assert exact(prompts=prompts, completions=completions, answer=["16", "16"], trainer_state=None) == [1.0, 0.0]
    by_column = trl_reward_function("hfgen.data.arithmetic:exact_match")
    assert by_column(prompts=prompts, completions=completions, answer=["17", "17"], log_metric=print) == [0.0, 1.0]
    assert call_reward_function(arithmetic.answer_format, ["x"], ["1+2=3. answer: 3"], {"answer": ["3"]}) == [1.0]


def test_splits_are_disjoint_and_the_tutor_is_careless():
    train = {row["prompt"][0]["content"] for row in arithmetic.generate_rows("arithmetic_prompts", "train")}
    test = [row["prompt"][0]["content"] for row in arithmetic.generate_rows("arithmetic_prompts", "test")]
    assert test and not train.intersection(test)
    sft = arithmetic.generate_rows("arithmetic_instructions", "train")
    prompts = [row["prompt"][0]["content"] for row in sft]
    answers = [row["completion"][0]["content"] for row in sft]
    right = sum(arithmetic.exact_answer(prompts, answers)) / len(sft)
    assert 0.4 < right < 0.7  # room for RL above imitation
    assert all(arithmetic.parse_problem(p) for p in prompts)


def test_gsm8k_exact_answer_by_hand():
    solutions = ["She has 3 + 4 = 7 apples.\n#### 7", "Total 1,200 dollars.\n#### 1,200", "#### -3"]
    responses = ["3 and 4 make 7. #### 7", "The answer: 1200.", "so it is 3"]
    assert arithmetic.gsm8k_exact_answer(["q"] * 3, responses, solutions) == [1.0, 1.0, 0.0]
    assert arithmetic.final_number("no number here") is None and arithmetic.final_number("x 2.0 y 5.0") == "5"
