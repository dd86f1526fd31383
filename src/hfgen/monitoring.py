"""The reward-hacking monitor (`hfgen.rl.monitor`) for trainers that log through transformers' callbacks: the
TRL-based online RL stages (GRPO, RLOO) add `HackingMonitorCallback` to their trainer.

    callback = HackingMonitorCallback(build_monitor(args), stop_on_hacking=args.stop_on_hacking)  # the recipe's keys
    trainer = GRPOTrainer(..., callbacks=[callback])
    ...; results |= callback.summary()      # into eval.json

It reads the figures TRL logs each logging step: `kl` (per token, turned into per response with the mean completion
length, the unit PPO's monitor uses; TRL logs none with `beta` 0, the kl_growth signal is then off and said so at
the start), `entropy`, `completions/mean_length` and each reward function's
`rewards/NAME/mean`. Responses themselves are not in the logs, so the repetition and above-ceiling signals stay off
here. Alerts are printed and added to the logged row (so metrics.jsonl and the report carry them, when this callback
runs before the one writing metrics); with `stop_on_hacking` the trainer stops at the end of the step, normally, and
the model holds the average of the policies of the steps before the alert's onset (`HackingMonitor.kept_steps`, PPO's
keep with `monitor_keep_samples` 0: PPO's loop judges recent policies by their held-out answers, which a callback
has no sampler for), from CPU copies of the trained weights taken at the start of each recent step.
The monitor's state (its history, streaks and alerts) is written into every checkpoint (`hacking_monitor.json`), with
stop_on_hacking's copies of recent policies (`PolicySnapshots.save`), and read back with `load(checkpoint)` before a
resumed run trains, so a resume judges against the same baseline and keeps what the uninterrupted run keeps.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from hfgen.rl.monitor import HackingMonitor
from hfgen.rl.policy_weights import PolicySnapshots


class HackingMonitorCallback(TrainerCallback):
    def __init__(
        self, monitor: HackingMonitor | None = None, stop_on_hacking: bool = False, component_names: dict | None = None
    ):
        """`component_names`: TRL's name of each reward function (its `rewards/NAME/mean`) -> the recipe's name of
        that component, the key of the monitor's weights (TRL names the reward model after its folder, hfgen
        `reward_model`); a name not in it is kept."""
        self.monitor = monitor or HackingMonitor()
        # PPO's loop judges recent policies by their held-out answers; a callback has no sampler and scorer of its
        # own, so it keeps by the onset (and holds only the copies that keep needs)
        self.monitor.keep_samples = 0
        self.stop_on_hacking = stop_on_hacking
        self.component_names = component_names or {}
        self.stopped: dict = {}
        self.snapshots = PolicySnapshots()

    def on_train_begin(self, args, state, control, **kwargs):
        if getattr(args, "beta", None) == 0 and state.is_world_process_zero:
            print("reward-hacking monitor: with beta 0 TRL computes no KL to the reference, so the kl_growth signal "
                  "is off (set beta > 0 to watch it); entropy, length and reward components are still watched")  # fmt: skip

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.stop_on_hacking and not self.stopped:  # the policy of the step about to run, before its update
            self.snapshots.take(state.global_step + 1, model, self.monitor.oldest_keepable_step())

    STATE_FILE = "hacking_monitor.json"

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero:  # every process holds the same state: it is fed the same gathered figures
            (folder / self.STATE_FILE).write_text(
                json.dumps({"monitor": self.monitor.state_dict(), **self.stopped}), encoding="utf-8"
            )
        if self.stop_on_hacking:  # each process its own copies (its shards)
            self.snapshots.save(folder)

    def load(self, checkpoint: str | Path) -> None:
        """Restore the state saved in `checkpoint` (absent in checkpoints written without the monitor: kept fresh),
        the recent policies `stop_on_hacking` may keep included."""
        path = Path(checkpoint) / self.STATE_FILE
        if path.is_file():
            state = json.loads(path.read_text(encoding="utf-8"))
            self.monitor.load_state_dict(state.pop("monitor"))
            self.stopped = state
        if self.stop_on_hacking:
            self.snapshots.load(checkpoint)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "kl" not in logs and "reward" not in logs:
            return  # an evaluation or end-of-training row
        length = logs.get("completions/mean_length")
        components = {
            self.component_names.get(name.split("/")[1], name.split("/")[1]): value
            for name, value in logs.items()
            if name.startswith("rewards/") and name.endswith("/mean")
        }
        kl = logs["kl"] * (length or 1.0) if "kl" in logs else None  # none logged with beta 0: no KL signal
        alerts = self.monitor.observe(
            state.global_step, kl=kl, entropy=logs.get("entropy"), length=length,
            components=components, oracle=logs.get("oracle/mean"),  # the oracle is only reported, never alerted on
            proxy_scores=[logs["reward"]] if "reward" in logs else None,
        )  # fmt: skip
        logs.update(self.monitor.metrics())
        for alert in alerts:
            if state.is_world_process_zero:
                print(f"reward-hacking alert at step {alert.step} ({alert.signal}, since step {alert.onset}): "
                      f"{alert.message}")  # fmt: skip
            logs[f"monitor/alert/{alert.signal}"] = float(alert.onset)
        if alerts and self.stop_on_hacking and not self.stopped:
            control.should_training_stop = True
            # and no checkpoint of this step: a run resumed from it (killed while saving its output, or resumed when
            # complete) would train on past the stop, its monitor having raised this alert already; resumed from
            # an earlier one, it replays the steps to this alert and stops here again with the same policies
            control.should_save = False
            self.stopped = {"stopped_early": True, "stopped_at_step": state.global_step,
                            "stop_reason": alerts[0].message, "stop_signal": alerts[0].signal}  # fmt: skip

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """After a stop: put the policy to keep into the model, before the stage saves it as the output."""
        if self.stopped and self.snapshots.copies:
            kept = self.snapshots.restore(model, self.monitor.kept_steps())
            self.snapshots = PolicySnapshots()
            self.stopped["kept_policy_of_steps"] = kept
            if state.is_world_process_zero:
                print(f"stop_on_hacking: stopped at step {self.stopped['stopped_at_step']}; the output is the average "
                      f"of the policies of steps {kept}, before the alert's onset")  # fmt: skip

    def summary(self) -> dict:
        """For eval.json: the alerts, and whether (and why) the run stopped early."""
        return {"stopped_early": False, **self.stopped, **self.monitor.summary()}
