"""The reward-hacking monitor as a transformers callback (for the TRL-based online RL stages)."""

from transformers import TrainerControl, TrainerState, TrainingArguments

from hfgen.monitoring import HackingMonitorCallback


def test_callback_reads_trl_logs_alerts_and_stops_training(tmp_path, capsys):
    callback = HackingMonitorCallback(stop_on_hacking=True)
    args, state, control = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerState(), TrainerControl()
    for step in range(1, 9):
        state.global_step = step
        length = 10.0 if step <= 5 else 30.0  # completions triple in length from step 6
        logs = {"loss": 0.1, "kl": 0.01, "entropy": 1.0, "completions/mean_length": length, "reward": 1.0,
                "rewards/accuracy/mean": 1.0}  # fmt: skip
        callback.on_log(args, state, control, logs=logs)
        if control.should_training_stop:
            break
    assert state.global_step == 7 and logs["monitor/alert/length_drift"] == 6.0
    assert "reward-hacking alert at step 7 (length_drift, since step 6)" in capsys.readouterr().out
    summary = callback.summary()
    assert summary["stopped_early"] and summary["stopped_at_step"] == 7 and summary["stop_signal"] == "length_drift"
    callback.on_log(args, state, TrainerControl(), logs={"eval_loss": 1.0})  # rows without RL figures are skipped
    assert len(callback.monitor.history) == 7


def test_callback_state_is_saved_in_a_checkpoint_and_restored(tmp_path):
    args, state, control = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerState(), TrainerControl()
    callback = HackingMonitorCallback()
    for step in (1, 2):
        state.global_step = step
        callback.on_log(args, state, control, logs={"loss": 0.1, "kl": 0.01, "reward": float(step)})
    (tmp_path / "checkpoint-2").mkdir()
    callback.on_save(args, state, control)
    resumed = HackingMonitorCallback()
    resumed.load(tmp_path / "checkpoint-2")
    assert resumed.monitor.history == callback.monitor.history and len(resumed.monitor.history) == 2
    resumed.load(tmp_path)  # a checkpoint without the monitor's file (written with it off): the state is kept
    assert len(resumed.monitor.history) == 2
