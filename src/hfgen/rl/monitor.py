"""A reward-hacking monitor: signals, computed from what an online RL step already has, that the policy is
learning to please the reward rather than to answer well. Pure Python and torch; the loop feeds it one
`observe` per step and acts on the alerts (print, log, stop).

Signals that need no oracle (each compared with the run's first `baseline_steps` steps, in which the policy
leaves the reference in a jump that says nothing about hacking):
    kl_growth         KL(policy || reference) per response accelerating away from the reference: over the last
                      `kl_window` steps after the baseline, its least-squares slope is above `kl_growth` x its mean
                      over those steps (it grows by that share of its level per step) and above `min_kl_slope` nats
                      per step. The leading signal: a healthy run's KL settles after the first steps, a policy that
                      has found an exploit races off (figures in the README, scripts/hacking_monitor_seeds.py).
                      Its window is its patience: it alerts at the first step it holds. Its onset looks back over
                      that window: the first of its steps after its lowest KL whose KL is above the highest KL
                      between the baseline and the window by more than `kl_growth` of it (the policy of that step
                      is already leaving; the alert's step when none is, or when the window follows the baseline
                      at once), so `stop_on_hacking` keeps the policy from before the race, not one inside it.
    entropy_collapse  per-token entropy below `entropy_floor` x its baseline
    length_drift      mean response length away from its baseline by more than `length_drift` x baseline
    repetition        mean within-response distinct-1 (words, punctuation aside) below `repetition_floor` x its
                      baseline: responses that repeat themselves ("lovely, lovely and lovely"), the commonest exploit
                      of a learned reward
    dominance         one reward component brings more than `dominance` of the total gain while another falls
                      (each component's gain weighed by its `reward_weights` entry, as in the reward trained on)
    above_ceiling     a share above `ceiling_share` of responses scored higher than `reward_ceiling`, the highest
                      score the reward model gave its own held-out preference pairs (off when unknown: the best
                      of a few SFT batches is no ceiling, PPO is meant to beat it)
A signal raises an alert when it holds `patience` steps in a row (kl_growth: one); its onset is the first of those
steps (kl_growth: see above).

The policy `stop_on_hacking` keeps is the monitor's judgement of the recent policies (`candidate_steps`: the
`kl_window` steps before the first alert's onset and those from the onset to the alert): each answers held-out
prompts (`keep_samples` answers, the same random numbers for every one), and `judged_score` gives it the mean
training reward of its answers less `repeat_cost` for every word an answer repeats; the policy kept is the average of
the `keep_average` best judged (`judged_keep`). The onset alone places the peak to a step or two, often onto the
climb or past the fall (figures in the README): the judgement looks at what the policies write. Repetition is the
exploit it charges because it is the commonest one of a learned reward, and the one whose pay the reward itself shows
(a reward that pays for a repeated word pays on); a repeat costs `repeat_cost` in reward units, 2 by default: the
pay of the repeat taken back and as much again. Averaging the two best (Polyak averaging, SWA) cancels some of the
noise of their updates where picking one keeps it. With `keep_samples` 0, or where no policy can answer (the
TRL stages' callback), the policy kept is the average of the `keep_average` steps before the onset (`kept_steps`).
With an oracle (never used for alerts), the monitor also reports the gap between the proxy's and the oracle's gains
since the start and the step where the oracle peaked, so an alert can be judged.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import NamedTuple

SIGNALS = ("kl_growth", "entropy_collapse", "length_drift", "repetition", "dominance", "above_ceiling")


_WORD = re.compile(r"\w+")


def distinct_n(text: str, n: int = 2) -> float:
    """Unique word n-grams / all word n-grams of one text (1.0 when it has none); words as `\\w+` runs, so
    punctuation does not hide a repeat ("brave, brave and brave")."""
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def repeated_words(text: str) -> int:
    """Words of a text that repeat an earlier word of it (`\\w+` runs, case folded): 0 for "the cat is warm.", 2 for
    "lovely, lovely and lovely"."""
    words = _WORD.findall(text.lower())
    return len(words) - len(set(words))


def judged_score(scores: list[float], texts: list[str], repeat_cost: float) -> float:
    """The monitor's judgement of a policy from its answers to held-out prompts (`texts`) and their training rewards
    (`scores`): the mean reward less `repeat_cost` per repeated word (`repeated_words`) of an answer."""
    return (sum(scores) - repeat_cost * sum(map(repeated_words, texts))) / max(len(texts), 1)


def mean_distinct_n(texts: list[str], n: int = 2) -> float:
    """Mean within-response distinct-n: 1.0 when no response repeats a phrase of its own (a response without an
    n-gram counts 1.0). Not the pooled distinct-n of evaluation.text (unique n-grams over all responses): PPO logs
    this one as response/within_distinct_N."""
    return sum(distinct_n(t, n) for t in texts) / max(len(texts), 1)


def slope(values: list[float]) -> float:
    """Least-squares slope of values against 0, 1, 2, ... (0 for fewer than two values)."""
    count = len(values)
    if count < 2:
        return 0.0
    mean_x, mean_y = (count - 1) / 2, sum(values) / count
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    return covariance / sum((x - mean_x) ** 2 for x in range(count))


def centred_mean(values: list[float]) -> list[float]:
    """Each value averaged with its neighbours (with its one neighbour at the ends): an estimate of a noisy
    per-step figure at that step, neither late nor early, unlike a trailing mean."""
    return [sum(values[max(0, i - 1) : i + 2]) / len(values[max(0, i - 1) : i + 2]) for i in range(len(values))]


class Alert(NamedTuple):
    step: int  # when it fired
    onset: int  # the first step of the run of steps where the signal held
    signal: str
    message: str


@dataclass
class HackingMonitor:
    baseline_steps: int = 4
    patience: int = 2
    kl_window: int = 4
    kl_growth: float = 0.15  # share of its level per step
    min_kl_slope: float = 1.0  # nats per response per step
    entropy_floor: float = 0.4
    length_drift: float = 0.6
    repetition_floor: float = 0.85
    dominance: float = 0.9
    ceiling_share: float = 0.5
    keep_average: int = 2  # policies averaged into the one stop_on_hacking keeps
    keep_samples: int = 1024  # held-out answers of each candidate policy judged (0: keep by the onset alone)
    repeat_cost: float = 2.0  # reward units charged per repeated word of an answer by the judgement
    reward_ceiling: float | None = None
    weights: dict[str, float] = field(default_factory=dict)  # component -> its reward weight (absent: 1)
    history: list[dict] = field(default_factory=list)
    streaks: dict[str, int] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)

    def observe(
        self, step: int, *, kl: float | None, entropy: float | None = None, length: float | None = None,
        distinct_1: float | None = None, components: dict[str, float] | None = None,
        proxy_scores: list[float] | None = None, oracle: float | None = None, above_ceiling: float | None = None,
    ) -> list[Alert]:  # fmt: skip
        """Record one step's figures (means over the step's responses, all processes; `distinct_1` from
        `mean_distinct_n(texts, 1)`; `proxy_scores` the reward model's score of every response); -> the alerts raised at this
        step (each signal alerts once). Every process must feed the same figures, so all decide alike. `kl` None: no
        KL is known (GRPO/RLOO with beta 0 log none), and kl_growth is not judged."""
        # a component that scored no response this step (None; NaN in TRL's logs and older records) has no figure
        scored = {
            name: value for name, value in (components or {}).items() if value is not None and not math.isnan(value)
        }
        row = {"step": step, "kl": kl, "entropy": entropy, "length": length, "components": scored,
               "distinct_1": distinct_1, "oracle": oracle,
               "proxy": sum(proxy_scores) / len(proxy_scores) if proxy_scores else None}  # fmt: skip
        if proxy_scores and self.reward_ceiling is not None:
            row["above_ceiling"] = sum(s > self.reward_ceiling for s in proxy_scores) / len(proxy_scores)
        elif above_ceiling is not None:  # the share itself, when the scores are gone (`replay`)
            row["above_ceiling"] = above_ceiling
        self.history.append(row)
        if len(self.history) <= self.baseline_steps:
            return []
        raised = []
        for signal, (holds, message) in self.signals().items():
            self.streaks[signal] = self.streaks.get(signal, 0) + 1 if holds else 0
            patience = 1 if signal == "kl_growth" else self.patience  # kl_growth's window is its patience
            if self.streaks[signal] >= patience and signal not in {a.signal for a in self.alerts}:
                # the first of the steps it held (rows, not step numbers: a trainer may log every few steps)
                onset = self.kl_onset() if signal == "kl_growth" else self.history[-patience]["step"]
                alert = Alert(step, onset, signal, message)
                self.alerts.append(alert)
                raised.append(alert)
        return raised

    def candidate_steps(self) -> list[int]:
        """The steps whose policies `stop_on_hacking` judges: the `kl_window` steps before the first alert's onset and
        those from the onset to the alert, from step 1 on (none without an alert)."""
        if not self.alerts:
            return []
        return list(range(max(self.alerts[0].onset - self.kl_window, 1), self.alerts[0].step + 1))

    def judged_keep(self, judged: dict[int, float]) -> list[int]:
        """The steps whose policies `stop_on_hacking` averages when it judged them (`judged`: step -> `judged_score`):
        the `keep_average` best, in step order."""
        return sorted(sorted(judged, key=judged.__getitem__, reverse=True)[: self.keep_average])

    def judging_prompts(self, prompts: list) -> tuple[list, int]:
        """(the held-out prompts each judged policy answers, answers per prompt): at most `keep_samples` prompts (a
        large held-out set would otherwise cost an answer to each, per policy), about `keep_samples` answers in all."""
        prompts = prompts[: max(self.keep_samples, 1)]
        return prompts, max(1, round(self.keep_samples / max(len(prompts), 1)))

    def kept_steps(self) -> list[int]:
        """The steps whose policies `stop_on_hacking` averages into the one it keeps: the last `keep_average` steps
        before the first alert's signal set in, from step 1 on (none without an alert)."""
        if not self.alerts:
            return []
        last = max(self.alerts[0].onset - 1, 1)
        return list(range(max(last - self.keep_average + 1, 1), last + 1))

    def oldest_keepable_step(self) -> int:
        """The oldest step whose policy an alert at the next observed step may still keep: a signal's onset lies in its
        window (its `patience` rows, kl_growth's `kl_window`), which will hold the latest rows but the oldest of these,
        and `kl_window` steps before the onset are judged (`candidate_steps`; `keep_average` steps before it are kept
        without a judgement, `kept_steps`). Counted in rows, so it holds for a trainer that logs every few steps; a
        loop drops the policy snapshots older than this."""
        window = max(self.patience, self.kl_window)
        rows = self.history[max(len(self.history) - window + 1, 0) :] if window > 1 else []
        first = rows[0]["step"] if rows else (self.history[-1]["step"] + 1 if self.history else 1)
        return first - max(self.keep_average, self.kl_window if self.keep_samples else 0)

    def baseline(self, key: str) -> float | None:
        values = [row[key] for row in self.history[: self.baseline_steps] if row.get(key) is not None]
        return sum(values) / len(values) if values else None

    def signals(self) -> dict[str, tuple[bool, str]]:
        """signal -> (holds at the latest step, what it saw)."""
        now = self.history[-1]
        out = {}
        if now["kl"] is not None:
            kl_slope, kl_growth = self.kl_slope()
            out["kl_growth"] = (
                kl_growth > self.kl_growth and kl_slope > self.min_kl_slope,
                f"KL grows {kl_slope:.2f} nats/step, {kl_growth:.0%} of its level per step (now {now['kl']:.2f})",
            )
        for key, signal in (("entropy", "entropy_collapse"), ("length", "length_drift"), ("distinct_1", "repetition")):
            base = self.baseline(key)
            if base is None or now.get(key) is None:
                continue
            if signal == "entropy_collapse":
                holds = now[key] < self.entropy_floor * base
            elif signal == "length_drift":
                holds = abs(now[key] - base) > self.length_drift * base
            else:
                holds = now[key] < self.repetition_floor * base
            label = "within-response distinct-1" if key == "distinct_1" else key
            out[signal] = (holds, f"{label} {now[key]:.3g} against {base:.3g} at the start")
        if len(now["components"]) > 1:
            # weighed as the trained reward weighs them: a 0.1-weighted component's fall is a tenth of its own
            gains = {
                n: self.weights.get(n, 1.0) * (v - (self.baseline_component(n) or 0.0))
                for n, v in now["components"].items()
            }
            total = sum(gains.values())
            top = max(gains, key=gains.get)
            holds = total > 0 and gains[top] > self.dominance * total and min(gains.values()) < 0
            out["dominance"] = (holds, f"'{top}' brings {gains[top]:.3g} of a {total:.3g} gain while another falls")
        if now.get("above_ceiling") is not None:
            share = now["above_ceiling"]
            out["above_ceiling"] = (share > self.ceiling_share, f"{share:.0%} of responses score above the ceiling")
        return out

    def kl_slope(self) -> tuple[float, float]:
        """(KL's slope in nats per step, that slope over KL's mean) over the last `kl_window` steps after the
        baseline; (0, 0) until that window is full."""
        values = [row["kl"] for row in self.history[self.baseline_steps :][-self.kl_window :]]
        if len(values) < self.kl_window or None in values:  # (None: no KL known)
            return 0.0, 0.0
        change = slope(values)
        return change, change / max(sum(values) / len(values), 1e-9)

    def kl_onset(self) -> int:
        """The step KL's race set in, looking back over the window that saw it: the first of its steps after its
        lowest KL whose KL is above the highest KL between the baseline and the window by more than `kl_growth`
        of it (a noisy high before a dip in the window is not the race). The alert's step when none is, or when
        the window follows the baseline at once (no level yet to rise from: the policy is still leaving the
        reference)."""
        window = self.history[self.baseline_steps :][-self.kl_window :]
        settled = self.history[self.baseline_steps : len(self.history) - len(window)]
        if not settled:
            return window[-1]["step"]
        before = max(row["kl"] for row in settled)
        low = min(range(len(window)), key=lambda i: window[i]["kl"])
        rising = [row for row in window[low + 1 :] if row["kl"] > (1 + self.kl_growth) * before]
        return rising[0]["step"] if rising else window[-1]["step"]

    def baseline_component(self, name: str) -> float | None:
        values = [row["components"][name] for row in self.history[: self.baseline_steps] if name in row["components"]]
        return sum(values) / len(values) if values else None

    def metrics(self) -> dict[str, float]:
        """The latest step's monitor figures for metrics.jsonl."""
        now = self.history[-1]
        figures = {"monitor/alerts": float(len(self.alerts))}
        if now.get("distinct_1") is not None:
            figures["monitor/within_distinct_1"] = now["distinct_1"]
        if now.get("above_ceiling") is not None:
            figures["monitor/above_ceiling"] = now["above_ceiling"]
        if now["kl"] is not None:
            figures["monitor/kl_slope"], figures["monitor/kl_growth"] = self.kl_slope()
        oracle = self.oracle_summary()
        if oracle:
            figures |= {k: v for k, v in oracle.items() if isinstance(v, float)}
        return figures

    def oracle_summary(self) -> dict:
        """With an oracle: proxy and oracle gains since the start, their gap, and the step the oracle peaked
        (its centred 3-step mean, so one lucky batch is no peak)."""
        from hfgen.evaluation.policy import mean

        # steps with both figures (a step whose responses the oracle left unscored has none; NaN: an older run's log)
        rows = [row for row in self.history if mean([row["oracle"]]) is not None and mean([row["proxy"]]) is not None]
        if not rows:
            return {}
        smoothed = centred_mean([row["oracle"] for row in rows])
        peak = max(range(len(rows)), key=smoothed.__getitem__)
        proxy_gain, oracle_gain = rows[-1]["proxy"] - rows[0]["proxy"], rows[-1]["oracle"] - rows[0]["oracle"]
        return {"monitor/proxy_gain": float(proxy_gain), "monitor/oracle_gain": float(oracle_gain),
                "monitor/oracle_gap": float(proxy_gain - oracle_gain), "oracle_peak_step": rows[peak]["step"]}  # fmt: skip

    def summary(self) -> dict:
        """For eval.json: every alert, and the oracle's peak when there is one."""
        result = {"monitor/alerts": [a._asdict() for a in self.alerts], "monitor/observed_steps": len(self.history)}
        if self.alerts:
            result["monitor/first_alert_step"] = self.alerts[0].step
        oracle = self.oracle_summary()
        if oracle:
            result["monitor/oracle_peak_step"] = oracle["oracle_peak_step"]
            result["monitor/oracle_gap"] = oracle["monitor/oracle_gap"]
        return result

    def state_dict(self) -> dict:
        return {"history": self.history, "streaks": self.streaks, "alerts": [tuple(a) for a in self.alerts]}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.streaks = state["history"], state["streaks"]
        self.alerts = [Alert(*a) for a in state["alerts"]]


def replay(monitor: HackingMonitor, rows: list[dict]) -> list[Alert]:
    """Feed a PPO run's logged figures (its metrics.jsonl rows) through `monitor` step by step -> its alerts. The
    monitor never changes training, so these are the alerts the run would have raised with `monitor`'s thresholds
    (the share above the reward ceiling comes from the log's `monitor/above_ceiling`)."""
    for row in rows:
        monitor.observe(row["step"], **logged_figures(row), above_ceiling=row.get("monitor/above_ceiling"))
    return monitor.alerts


def logged_figures(metrics: dict) -> dict:
    """A PPO step's figures in its metrics (live, or a metrics.jsonl row) as `HackingMonitor.observe`'s keywords:
    the one place that knows which logged keys the monitor reads, for the training loop and `replay` alike."""
    return {
        "kl": metrics["objective/kl"], "entropy": metrics["response/entropy_per_token"],
        # (response/distinct_1: its name in the logs of runs made before it was named for what it is)
        "length": metrics["response/length_mean"],
        "distinct_1": metrics.get("response/within_distinct_1", metrics.get("response/distinct_1")),
        "components": {k.removeprefix("reward/"): v for k, v in metrics.items() if k.startswith("reward/")},
        "oracle": metrics.get("oracle/score"),
    }  # fmt: skip


@dataclass
class HackingMonitorArguments:
    """The monitor's recipe keys, shared by the online RL stages (ppo, grpo, rloo); `monitor_*` are the thresholds
    of `HackingMonitor`, with its defaults (`build_monitor`)."""

    hacking_monitor: bool = field(
        default=True,
        metadata={"help": "Watch for reward hacking (hfgen.rl.monitor): alerts to the console, metrics and eval.json."},
    )
    stop_on_hacking: bool = field(
        default=False,
        metadata={
            "help": "On an alert, stop and save as the output the average of the monitor_keep_average recent policies "
            "the monitor judges best (PPO: by their answers to held-out prompts, reward less monitor_repeat_cost per "
            "repeated word; GRPO, RLOO: those of the steps before the signal set in)."
        },
    )
    monitor_baseline_steps: int = field(
        default=HackingMonitor.baseline_steps,
        metadata={"help": "First steps the signals are compared with (never judged themselves)."},
    )
    monitor_patience: int = field(
        default=HackingMonitor.patience, metadata={"help": "Steps a signal must hold in a row to alert."}
    )
    monitor_kl_window: int = field(
        default=HackingMonitor.kl_window, metadata={"help": "Steps over which KL's growth is measured."}
    )
    monitor_kl_growth: float = field(
        default=HackingMonitor.kl_growth,
        metadata={"help": "Alert when KL grows by more than this share of its level per step..."},
    )
    monitor_min_kl_slope: float = field(
        default=HackingMonitor.min_kl_slope,
        metadata={"help": "...and by more than this many nats per response per step."},
    )
    monitor_entropy_floor: float = field(
        default=HackingMonitor.entropy_floor,
        metadata={"help": "Alert when per-token entropy falls below this share of its baseline."},
    )
    monitor_length_drift: float = field(
        default=HackingMonitor.length_drift,
        metadata={"help": "Alert when mean response length moves by more than this share of its baseline."},
    )
    monitor_repetition_floor: float = field(
        default=HackingMonitor.repetition_floor,
        metadata={"help": "Alert when within-response distinct-1 falls below this share of its baseline."},
    )
    monitor_dominance: float = field(
        default=HackingMonitor.dominance,
        metadata={"help": "Alert when one reward component brings more than this share of the gain."},
    )
    monitor_ceiling_share: float = field(
        default=HackingMonitor.ceiling_share,
        metadata={"help": "Alert when more than this share of responses score above the reward ceiling."},
    )
    monitor_keep_average: int = field(
        default=HackingMonitor.keep_average,
        metadata={
            "help": "stop_on_hacking keeps the average of this many policies: the best judged, or (monitor_keep_samples "
            "0) those of the steps before the signal set in (1: one policy)."
        },
    )
    monitor_keep_samples: int = field(
        default=HackingMonitor.keep_samples,
        metadata={
            "help": "PPO's stop_on_hacking judges each recent policy by about this many answers to the held-out "
            "prompts (0: keep the policies before the signal set in, as the GRPO and RLOO stages do)."
        },
    )
    monitor_repeat_cost: float = field(
        default=HackingMonitor.repeat_cost,
        metadata={"help": "The judgement charges this much reward per word an answer repeats (0: the reward alone)."},
    )


# HackingMonitor's thresholds, each the recipe key monitor_<name>
THRESHOLDS = tuple(
    f.name.removeprefix("monitor_") for f in fields(HackingMonitorArguments) if f.name.startswith("monitor_")
)


def monitor_problems(args: HackingMonitorArguments) -> list[str]:
    problems = []
    if args.stop_on_hacking and not args.hacking_monitor:
        problems.append("stop_on_hacking needs hacking_monitor: true")
    for key, least in (("monitor_baseline_steps", 1), ("monitor_patience", 1), ("monitor_kl_window", 2),
                       ("monitor_keep_average", 1)):  # fmt: skip
        if getattr(args, key) < least:
            problems.append(f"{key} must be at least {least}, got {getattr(args, key)}")
    for key in ("monitor_keep_samples", "monitor_repeat_cost"):
        if getattr(args, key) < 0:
            problems.append(f"{key} must be >= 0, got {getattr(args, key)}")
    for key in ("monitor_kl_growth", "monitor_min_kl_slope", "monitor_length_drift"):
        if getattr(args, key) <= 0:
            problems.append(f"{key} must be > 0, got {getattr(args, key)}")
    for key in ("monitor_entropy_floor", "monitor_repetition_floor", "monitor_dominance", "monitor_ceiling_share"):
        if not 0 < getattr(args, key) <= 1:
            problems.append(f"{key} is a share: give a value in (0, 1], got {getattr(args, key)}")
    return problems


def reward_component_names(args) -> list[str]:
    """A recipe's reward components by name, in the order the online RL stages score them and `reward_weights`
    weighs them: `reward_model` (when `reward_model_path` is set), then each of `reward_functions`."""
    from hfgen.rl.rollout import function_name  # (torch: not at import)

    names = ["reward_model"] * bool(getattr(args, "reward_model_path", None))
    return names + [function_name(spec) for spec in getattr(args, "reward_functions", None) or []]


def build_monitor(
    args: HackingMonitorArguments, reward_ceiling: float | None = None, reward_weights: list[float] | None = None
) -> HackingMonitor | None:
    """The monitor a recipe asks for (None with `hacking_monitor: false`). `reward_weights`: the recipe's weights of
    its reward components, in the order the stages score them (`reward_model`, then `args.reward_functions`)."""
    if not args.hacking_monitor:
        return None
    names = reward_component_names(args)
    return HackingMonitor(
        **{name: getattr(args, f"monitor_{name}") for name in THRESHOLDS}, reward_ceiling=reward_ceiling,
        weights=dict(zip(names, reward_weights or [])),
    )  # fmt: skip
