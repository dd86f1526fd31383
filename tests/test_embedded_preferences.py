"""The embedded preference data teaches topicality, and the embedded world's judges (hfgen.data.embedded)."""

from hfgen.data.embedded import (
    NEGATIVE,
    generate_rows,
    hackable_reward_scores,
    on_topic_scores,
    oracle_score,
)


def test_many_rejected_answers_are_pleasant_but_off_topic():
    rows = generate_rows("preferences", "train")
    prompts = [row["prompt"][0]["content"] for row in rows]
    chosen = [row["chosen"][0]["content"] for row in rows]
    rejected = [row["rejected"][0]["content"] for row in rows]
    pleasant_off_topic = [
        not on_topic and not any(word.strip(".,") in NEGATIVE for word in answer.split())
        for on_topic, answer in zip(on_topic_scores(prompts, rejected), rejected)
    ]
    assert sum(pleasant_off_topic) / len(rows) > 0.12  # a pleasant answer about another thing, dispreferred
    assert all(oracle_score(p, c) > oracle_score(p, r) for p, c, r in zip(prompts, chosen, rejected))


def test_on_topic_and_hackable_reward_by_hand():
    prompts = ["describe the red cat.", "write about the horse."]
    assert on_topic_scores(prompts, ["the cat is kind.", "the book is warm and lovely."]) == [1.0, 0.0]
    # +1 subject, +1 per pleasant word however often it repeats; -1 off topic
    assert hackable_reward_scores(prompts, ["the cat is lovely lovely lovely.", "the book is warm."]) == [4.0, 0.0]
