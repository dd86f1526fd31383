"""The embedded world's extra judges (hfgen.data.embedded): on-topic share and a deliberately hackable reward."""

from hfgen.data.embedded import hackable_reward_scores, on_topic_scores


def test_on_topic_and_hackable_reward_by_hand():
    prompts = ["describe the red cat.", "write about the horse."]
    assert on_topic_scores(prompts, ["the cat is kind.", "the book is warm and lovely."]) == [1.0, 0.0]
    # +1 subject, +1 per pleasant word however often it repeats; -1 off topic
    assert hackable_reward_scores(prompts, ["the cat is lovely lovely lovely.", "the book is warm."]) == [4.0, 0.0]


def test_topic_twins_are_the_chosen_answer_about_another_thing_and_come_last():
    from hfgen.data.embedded import TOPIC_TWIN_SHARE, _thing_of, generate_rows, oracle_score

    rows = generate_rows("preferences", "train")
    twins = rows[-round(len(rows) * TOPIC_TWIN_SHARE) :]
    off_topic = 0
    for row in twins:
        prompt, chosen, rejected = (row[key][0]["content"] for key in ("prompt", "chosen", "rejected"))
        rest = chosen.split()[1 + len(_thing_of(prompt).split()) :]  # after "the <thing>": as fluent, as pleasant
        assert rejected.split()[-len(rest) :] == rest and rejected != chosen
        assert oracle_score(prompt, chosen) > oracle_score(prompt, rejected)
        off_topic += on_topic_scores([prompt], [rejected]) == [0.0]
    assert off_topic > 0.9 * len(twins)  # the others name the thing in another colour
