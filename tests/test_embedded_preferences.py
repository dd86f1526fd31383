"""The embedded world's extra judges (hfgen.data.embedded): on-topic share and a deliberately hackable reward."""

from hfgen.data.embedded import hackable_reward_scores, on_topic_scores


def test_on_topic_and_hackable_reward_by_hand():
    prompts = ["describe the red cat.", "write about the horse."]
    assert on_topic_scores(prompts, ["the cat is kind.", "the book is warm and lovely."]) == [1.0, 0.0]
    # +1 subject, +1 per pleasant word however often it repeats; -1 off topic
    assert hackable_reward_scores(prompts, ["the cat is lovely lovely lovely.", "the book is warm."]) == [4.0, 0.0]


def test_topic_twins_are_the_chosen_answer_about_another_subject_and_come_last():
    from hfgen.data.embedded import SUBJECTS, TOPIC_TWIN_SHARE, generate_rows, oracle_score

    rows = generate_rows("preferences", "train")
    twins = rows[-round(len(rows) * TOPIC_TWIN_SHARE) :]
    for row in twins:
        prompt, chosen, rejected = (row[key][0]["content"] for key in ("prompt", "chosen", "rejected"))
        # one word differs, the subject: as fluent, as pleasant, the same colour named or not (no shortcut)
        changed = [(a, b) for a, b in zip(chosen.split(), rejected.split()) if a != b]
        assert len(chosen.split()) == len(rejected.split()) and len(changed) == 1, (chosen, rejected)
        assert changed[0][0] in SUBJECTS and changed[0][1] in SUBJECTS
        assert oracle_score(prompt, chosen) > oracle_score(prompt, rejected)
        assert on_topic_scores([prompt, prompt], [chosen, rejected]) == [1.0, 0.0]


def test_topic_trades_pay_a_pleasant_word_for_another_thing_and_come_before_the_twins():
    from hfgen.data.embedded import POSITIVE, TOPIC_TRADE_SHARE, TOPIC_TWIN_SHARE, generate_rows, oracle_score

    for split in ("train", "test"):
        rows = generate_rows("preferences", split)
        trades, twins = round(len(rows) * TOPIC_TRADE_SHARE), round(len(rows) * TOPIC_TWIN_SHARE)
        assert trades >= 0.1 * len(rows)  # enough of them to teach it
        for row in rows[len(rows) - twins - trades : len(rows) - twins]:
            prompt, chosen, rejected = (row[key][0]["content"] for key in ("prompt", "chosen", "rejected"))
            words = [set(text.rstrip(".").replace(",", "").split()) for text in (chosen, rejected)]
            assert len(words[1] & set(POSITIVE)) == len(words[0] & set(POSITIVE)) + 1  # one pleasant word nicer...
            assert on_topic_scores([prompt], [chosen]) == [1.0] and on_topic_scores([prompt], [rejected]) == [0.0]
            assert oracle_score(prompt, chosen) > oracle_score(prompt, rejected)  # ...yet worse: about another thing
