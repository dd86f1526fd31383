"""The reward-hacking monitor (`hfgen.rl.monitor`): each signal against hand-made step figures."""

import pytest

from hfgen.rl import monitor as M

STEADY = dict(kl=1.0, entropy=2.0, length=10.0, distinct_1=1.0)


def feed(monitor, rows):
    alerts = []
    for step, row in enumerate(rows, start=1):
        alerts += monitor.observe(step, **row)
    return alerts


def test_distinct_n_and_slope_by_hand():
    assert M.distinct_n("the cat is lovely lovely lovely lovely") == pytest.approx(4 / 6)  # 6 bigrams, 4 unique
    assert M.distinct_n("one") == 1.0
    assert M.distinct_n("brave, brave and brave.", 1) == pytest.approx(2 / 4)  # punctuation hides no repeat
    assert M.mean_distinct_n(["a b c", "a a a"]) == pytest.approx((1.0 + 0.5) / 2)
    assert M.slope([1.0, 3.0, 5.0]) == pytest.approx(2.0) and M.slope([4.0]) == 0.0


def test_a_steady_run_raises_nothing():
    monitor = M.HackingMonitor()
    assert feed(monitor, [STEADY] * 20) == [] and monitor.summary()["monitor/alerts"] == []


def test_repetition_alerts_after_patience_with_its_onset():
    monitor = M.HackingMonitor(baseline_steps=3, patience=2)
    rows = [STEADY] * 5 + [STEADY | {"distinct_1": 0.6}] * 3
    alerts = feed(monitor, rows)
    assert [(a.step, a.onset, a.signal) for a in alerts] == [(7, 6, "repetition")]  # once, not again at step 8
    assert monitor.summary()["monitor/first_alert_step"] == 7


@pytest.mark.parametrize(
    "change, signal",
    [({"length": 25.0}, "length_drift"), ({"length": 3.0}, "length_drift"), ({"entropy": 0.5}, "entropy_collapse")],
)
def test_length_drift_both_ways_and_entropy_collapse(change, signal):
    alerts = feed(M.HackingMonitor(), [STEADY] * 4 + [STEADY | change] * 2)
    assert [a.signal for a in alerts] == [signal]


def test_kl_growth_rate_relative_to_its_level():
    """KL that jumps off the reference in the baseline steps, then settles (noisy), or creeps up, is no alarm; KL
    racing off (+40% a step) alerts at the first step its window sees it, with that step as onset."""
    settled = [0.0, 1.0, 3.0, 4.0] + [2.0, 2.6, 2.0, 2.8, 2.2, 2.9, 2.1] * 2
    assert feed(M.HackingMonitor(), [STEADY | {"kl": kl} for kl in settled]) == []
    creeping = [STEADY | {"kl": 4.0 * 1.05**i} for i in range(24)]  # +5% a step
    assert feed(M.HackingMonitor(), creeping) == []
    small = [STEADY | {"kl": 0.05 * 1.5**i} for i in range(10)]  # +50% a step, but under 0.5 nats a step
    assert feed(M.HackingMonitor(), small) == []
    racing = [STEADY | {"kl": kl} for kl in [0.0, 1.0, 3.0, 4.0, 4.0, 4.0, 4.0, 4.0, 5.6, 7.8, 11.0]]
    monitor = M.HackingMonitor()
    alerts = feed(monitor, racing)
    # window 7-10: 4, 4, 5.6, 7.8; the race set in at step 9, the first above 1.15 x 4 (the highest before it)
    assert [(a.step, a.onset, a.signal) for a in alerts] == [(10, 9, "kl_growth")]
    assert monitor.kept_steps() == [7, 8]
    assert "of its level per step" in alerts[0].message
    assert feed(M.HackingMonitor(kl_growth=0.5), racing) == []  # the threshold is the recipe's


def test_one_component_dominating_and_scores_above_the_ceiling():
    rows = [STEADY | {"components": {"rm": 0.0, "format": 1.0}}] * 4
    rows += [STEADY | {"components": {"rm": 3.0, "format": 0.5}}] * 2  # all the gain from rm while format falls
    assert [a.signal for a in feed(M.HackingMonitor(), rows)] == ["dominance"]
    # weighed as trained (reward_weights [1, 0.1]): rm's gain of 0.3 is most of the reward's, format's fall of 0.5
    # a tenth of it; unweighed, format's fall hid the gain (0.3 - 0.5 < 0) and no alert came
    rows = [STEADY | {"components": {"rm": 0.0, "format": 1.0}}] * 4
    rows += [STEADY | {"components": {"rm": 0.3, "format": 0.5}}] * 2
    assert feed(M.HackingMonitor(), rows) == []
    assert [a.signal for a in feed(M.HackingMonitor(weights={"rm": 1.0, "format": 0.1}), rows)] == ["dominance"]
    rows = [STEADY | {"proxy_scores": [0.0, 1.0, 2.0]}] * 4 + [STEADY | {"proxy_scores": [2.5, 3.0, 0.0]}] * 2
    assert [a.signal for a in feed(M.HackingMonitor(reward_ceiling=2.0), rows)] == ["above_ceiling"]  # 2 of 3 above
    assert feed(M.HackingMonitor(reward_ceiling=5.0), rows) == []
    assert feed(M.HackingMonitor(), rows) == []  # no known ceiling: the signal is off


def test_oracle_summary_and_state_round_trip():
    monitor = M.HackingMonitor()
    oracle = [0.0, 1.0, 2.0, 3.0, 3.0, 2.0, 1.0, 0.0]
    feed(monitor, [STEADY | {"proxy_scores": [float(i)], "oracle": o} for i, o in enumerate(oracle)])
    summary = monitor.summary()
    assert summary["monitor/oracle_peak_step"] == 4  # the centred 3-step mean: 2.67 at steps 4 and 5, the first
    assert M.centred_mean([0.0, 3.0, 0.0, 6.0]) == pytest.approx([1.5, 1.0, 3.0, 3.0])
    assert summary["monitor/oracle_gap"] == pytest.approx((7 - 0) - (0 - 0))
    copy = M.HackingMonitor()
    copy.load_state_dict(monitor.state_dict())
    assert copy.summary() == summary and copy.history == monitor.history


def test_thresholds_are_recipe_keys_of_every_online_rl_stage():
    from hfgen.group_rl import GroupRLArguments
    from hfgen.recipe import known_keys
    from hfgen.stages.ppo import PPOConfig

    for stage in ("ppo", "grpo", "rloo"):
        assert {"hacking_monitor", "monitor_patience", "monitor_kl_growth"} <= set(known_keys(stage))
    assert M.build_monitor(PPOConfig()) == M.HackingMonitor()  # the keys' defaults are the monitor's
    monitor = M.build_monitor(GroupRLArguments(monitor_patience=3, monitor_kl_growth=0.4), reward_ceiling=2.0)
    assert (monitor.patience, monitor.kl_growth, monitor.reward_ceiling) == (3, 0.4, 2.0)
    assert M.build_monitor(PPOConfig(hacking_monitor=False)) is None
    config = PPOConfig(reward_model_path="rm", reward_functions=["hfgen.data.arithmetic:exact_answer"])
    assert M.build_monitor(config, reward_weights=[1.0, 0.1]).weights == {"reward_model": 1.0, "exact_answer": 0.1}
    problems = M.monitor_problems(
        PPOConfig(hacking_monitor=False, stop_on_hacking=True, monitor_kl_window=1, monitor_repetition_floor=1.5)
    )
    assert problems == [
        "stop_on_hacking needs hacking_monitor: true",
        "monitor_kl_window must be at least 2, got 1",
        "monitor_repetition_floor is a share: give a value in (0, 1], got 1.5",
    ]


def test_kl_growth_onset_is_where_the_race_set_in_not_a_noisy_step_before_it():
    """The onset is the first step of the window above the highest KL before it by more than kl_growth of it: a
    step that is merely the highest so far (noise on a plateau) is not the onset."""
    kls = [0.0, 1.0, 3.0, 4.0, 6.0, 6.2, 5.8, 6.3, 6.1, 6.5, 9.0, 16.0]  # 6.5 is a new high, 9.0 is the race
    monitor = M.HackingMonitor()
    alerts = feed(monitor, [STEADY | {"kl": kl} for kl in kls])
    assert [(a.step, a.onset) for a in alerts] == [(12, 11)] and monitor.kept_steps() == [9, 10]
    # an alert at step 13 would look back over steps 10-13 (its window): onset 10 at the earliest, and the judgement
    # takes the 4 steps (kl_window) before it; without a judgement, the 2 (keep_average) before it
    assert monitor.oldest_keepable_step() == 6
    monitor.keep_samples = 0
    assert monitor.oldest_keepable_step() == 8
    # a noisy step above the highest before the window (6.0 > 1.15 x 5.2), then a dip, then the race
    kls = [0.0, 1.0, 1.5, 1.8, 2.5, 4.0, 4.3, 5.2, 6.0, 5.0, 7.9, 13.1]
    monitor = M.HackingMonitor()
    alerts = feed(monitor, [STEADY | {"kl": kl} for kl in kls])
    assert [(a.step, a.onset) for a in alerts] == [(12, 11)] and monitor.kept_steps() == [9, 10]
    # a race in the first window after the baseline: no settled level to rise from, the onset is the alert's step
    monitor = M.HackingMonitor()
    alerts = feed(monitor, [STEADY | {"kl": kl} for kl in [0.0, 0.5, 1.0, 1.5, 2.6, 3.9, 5.0, 6.7]])
    assert [(a.step, a.onset) for a in alerts] == [(8, 8)] and monitor.kept_steps() == [6, 7]


def test_kept_policies_are_the_steps_before_the_onset_from_step_one_on():
    """stop_on_hacking averages the policies of the `keep_average` steps before the first alert's onset; fewer
    when the onset is near the start; every one of them within the snapshots the loop holds (`oldest_keepable_step`)."""
    racing = [STEADY | {"kl": kl} for kl in [0.0, 1.0, 3.0, 4.0, 4.0, 4.0, 4.0, 4.0, 5.6, 7.8, 11.0]]
    monitor = M.HackingMonitor(keep_average=1)
    feed(monitor, racing)
    assert monitor.kept_steps() == [8]
    early = M.HackingMonitor(keep_average=4)
    early.alerts = [M.Alert(step=4, onset=3, signal="repetition", message="")]
    assert early.kept_steps() == [1, 2]
    for onset in range(6, 10):  # an alert at step 9: kl_growth's onset lies in its window, steps 6-9
        late = M.HackingMonitor(keep_average=3, keep_samples=0)
        feed(late, [STEADY] * 8)
        oldest = late.oldest_keepable_step()  # the snapshots a loop still holds while step 9 runs
        late.alerts = [M.Alert(step=9, onset=onset, signal="kl_growth", message="")]
        assert min(late.kept_steps()) >= oldest and len(late.kept_steps()) == 3
    assert oldest == 3  # the earliest onset (6) less keep_average: no snapshot is held longer than needed


def test_onset_and_keepable_steps_count_rows_when_a_trainer_logs_every_few_steps():
    """A trainer that logs every 5 steps (TRL's logging_steps): a signal that held at steps 35 and 40 set in at
    step 35 (not 39), and the policies kept come from before it."""
    monitor = M.HackingMonitor(baseline_steps=3, patience=2)
    rows = [STEADY] * 6 + [STEADY | {"distinct_1": 0.6}] * 2
    alerts = [alert for step, row in zip(range(5, 45, 5), rows) for alert in monitor.observe(step, **row)]
    assert [(a.step, a.onset) for a in alerts] == [(40, 35)] and monitor.kept_steps() == [33, 34]
    # the next alert's window (4 rows) holds the rows of steps 30, 35, 40 and the next: the judgement's 4 steps
    # (kl_window) before 30 on
    assert monitor.oldest_keepable_step() == 26


def test_replay_of_logged_figures_raises_the_alerts_of_the_run():
    """`replay` feeds metrics.jsonl rows as the training loop fed `observe`: the same alerts, the share above the
    reward ceiling read from its logged figure."""
    live = M.HackingMonitor(reward_ceiling=2.0)
    rows = []
    for step in range(1, 9):
        figures = {"objective/kl": 1.0, "response/entropy_per_token": 2.0, "response/length_mean": 10.0,
                   "response/within_distinct_1": 1.0 if step < 6 else 0.5, "reward/rm": 0.5, "oracle/score": 1.0}  # fmt: skip
        scores = [0.0, 1.0] if step < 5 else [3.0, 3.0]
        live.observe(step, kl=1.0, entropy=2.0, length=10.0, distinct_1=figures["response/within_distinct_1"],
                     components={"rm": 0.5}, proxy_scores=scores, oracle=1.0)  # fmt: skip
        rows.append({"step": step, **figures, **live.metrics()})
    replayed = M.replay(M.HackingMonitor(), rows)
    assert [(a.signal, a.step, a.onset) for a in live.alerts] == [("above_ceiling", 6, 5), ("repetition", 7, 6)]
    assert replayed == live.alerts and M.HackingMonitor().kept_steps() == []


def test_the_judgement_charges_repeated_words_and_keeps_the_best_judged_candidates():
    """`judged_score`: the mean reward less `repeat_cost` per repeated word; `candidate_steps` runs from kl_window
    steps before the onset to the alert (from step 1 on); `judged_keep` averages the `keep_average` best, in step order,
    whether or not they are neighbours; every candidate is within the snapshots the loop holds."""
    assert M.repeated_words("the cat is warm.") == 0 and M.repeated_words("Lovely, lovely and LOVELY") == 2
    # "kind" pays 1 a word: the repeating answer earns more reward and is judged worse
    honest, hacked = ["the cat is kind."], ["the cat is kind kind kind kind."]
    assert M.judged_score([2.0], honest, 2.0) == 2.0 and M.judged_score([5.0], hacked, 2.0) == -1.0
    assert M.judged_score([2.0, 5.0], honest + hacked, 0.0) == 3.5  # repeat_cost 0: the reward alone
    monitor = M.HackingMonitor()
    monitor.alerts = [M.Alert(step=9, onset=8, signal="kl_growth", message="")]
    assert monitor.candidate_steps() == [4, 5, 6, 7, 8, 9]
    assert monitor.judged_keep({4: 1.0, 5: 3.0, 6: 2.0, 7: 3.5, 8: 0.5, 9: -2.0}) == [5, 7]
    assert M.HackingMonitor(keep_average=1).judged_keep({4: 1.0, 5: 3.0}) == [5]
    early = M.HackingMonitor()
    early.alerts = [M.Alert(step=4, onset=3, signal="repetition", message="")]
    assert early.candidate_steps() == [1, 2, 3, 4]
    prompts, per_prompt = M.HackingMonitor().judging_prompts(list(range(51)))
    assert prompts == list(range(51)) and per_prompt == 20
    prompts, per_prompt = M.HackingMonitor().judging_prompts(list(range(5000)))  # at most keep_samples prompts
    assert prompts == list(range(1024)) and per_prompt == 1
    for onset in range(6, 10):  # an alert at step 9: kl_growth's onset lies in its window, steps 6-9
        late = M.HackingMonitor()
        feed(late, [STEADY] * 8)
        oldest = late.oldest_keepable_step()  # the snapshots a loop still holds while step 9 runs
        late.alerts = [M.Alert(step=9, onset=onset, signal="kl_growth", message="")]
        assert min(late.candidate_steps()) >= oldest
    assert oldest == 2  # the earliest onset (6) less kl_window
