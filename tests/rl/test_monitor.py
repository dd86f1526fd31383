"""The reward-hacking monitor (`hfgen.rl.monitor`): each signal against hand-made step figures."""

import pytest

from hfgen.rl import monitor as M

STEADY = dict(kl=1.0, entropy=2.0, length=10.0, distinct_2=1.0)


def feed(monitor, rows):
    alerts = []
    for step, row in enumerate(rows, start=1):
        alerts += monitor.observe(step, **row)
    return alerts


def test_distinct_n_and_slope_by_hand():
    assert M.distinct_n("the cat is lovely lovely lovely lovely") == pytest.approx(4 / 6)  # 6 bigrams, 4 unique
    assert M.distinct_n("one") == 1.0
    assert M.mean_distinct_n(["a b c", "a a a"]) == pytest.approx((1.0 + 0.5) / 2)
    assert M.slope([1.0, 3.0, 5.0]) == pytest.approx(2.0) and M.slope([4.0]) == 0.0


def test_a_steady_run_raises_nothing():
    monitor = M.HackingMonitor()
    assert feed(monitor, [STEADY] * 20) == [] and monitor.summary()["monitor/alerts"] == []


def test_repetition_alerts_after_patience_with_its_onset():
    monitor = M.HackingMonitor(baseline_steps=3, patience=2)
    rows = [STEADY] * 5 + [STEADY | {"distinct_2": 0.6}] * 3
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


def test_kl_growth_rate():
    rows = [STEADY | {"kl": 1.0 + 0.2 * i} for i in range(8)]  # a slow rise is no alarm
    assert feed(M.HackingMonitor(max_kl_slope=1.0), rows) == []
    rows = [STEADY] * 4 + [STEADY | {"kl": 1.0 + 2.0 * i} for i in range(1, 5)]
    assert [a.signal for a in feed(M.HackingMonitor(max_kl_slope=1.0), rows)] == ["kl_growth"]


def test_one_component_dominating_and_scores_above_the_ceiling():
    rows = [STEADY | {"components": {"rm": 0.0, "format": 1.0}}] * 3
    rows += [STEADY | {"components": {"rm": 3.0, "format": 0.5}}] * 2  # all the gain from rm while format falls
    assert [a.signal for a in feed(M.HackingMonitor(), rows)] == ["dominance"]
    rows = [STEADY | {"proxy_scores": [0.0, 1.0, 2.0]}] * 3 + [STEADY | {"proxy_scores": [2.5, 3.0, 0.0]}] * 2
    assert [a.signal for a in feed(M.HackingMonitor(reward_ceiling=2.0), rows)] == ["above_ceiling"]  # 2 of 3 above
    assert feed(M.HackingMonitor(reward_ceiling=5.0), rows) == []
    assert feed(M.HackingMonitor(), rows) == []  # no known ceiling: the signal is off


def test_oracle_summary_and_state_round_trip():
    monitor = M.HackingMonitor()
    oracle = [0.0, 1.0, 2.0, 3.0, 3.0, 2.0, 1.0, 0.0]
    feed(monitor, [STEADY | {"proxy_scores": [float(i)], "oracle": o} for i, o in enumerate(oracle)])
    summary = monitor.summary()
    assert summary["monitor/oracle_peak_step"] == 5  # 3-step running mean peaks at steps 3-5
    assert summary["monitor/oracle_gap"] == pytest.approx((7 - 0) - (0 - 0))
    copy = M.HackingMonitor()
    copy.load_state_dict(monitor.state_dict())
    assert copy.summary() == summary and copy.history == monitor.history
