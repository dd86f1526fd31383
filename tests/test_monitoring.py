"""The reward-hacking monitor as a transformers callback (for the TRL-based online RL stages)."""

import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from hfgen.monitoring import HackingMonitorCallback
from hfgen.rl.monitor import HackingMonitor


def test_callback_reads_trl_logs_alerts_and_stops_training(tmp_path, capsys):
    callback = HackingMonitorCallback(stop_on_hacking=True)
    args, state, control = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerState(), TrainerControl()
    model = torch.nn.Linear(1, 1)
    for step in range(1, 9):
        callback.on_step_begin(args, state, control, model=model)
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


def test_without_beta_no_kl_is_fed_and_the_kl_signal_is_said_to_be_off(tmp_path, capsys):
    from trl import GRPOConfig

    # beta 0 (TRL's default): TRL logs no `kl`; a KL of 0 fed instead would leave kl_growth silently blind
    args = GRPOConfig(output_dir=str(tmp_path), beta=0.0, report_to=[], use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    callback = HackingMonitorCallback()
    callback.on_train_begin(args, state, control)
    assert "kl_growth signal is off" in capsys.readouterr().out
    for step in range(1, 9):
        state.global_step = step
        logs = {"loss": 0.1, "entropy": 1.0, "completions/mean_length": 10.0, "reward": 1.0}
        callback.on_log(args, state, control, logs=logs)
    assert all(row["kl"] is None for row in callback.monitor.history)
    assert "kl_growth" not in callback.monitor.signals() and "monitor/kl_slope" not in logs
    assert "entropy_collapse" in callback.monitor.signals()  # the others still judge
    callback.on_train_begin(GRPOConfig(output_dir=str(tmp_path), beta=0.1, use_cpu=True), state, control)
    assert "kl_growth" not in capsys.readouterr().out


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


def test_stop_on_hacking_puts_back_the_average_of_the_policies_before_the_onset(tmp_path, capsys):
    """The callback copies the trained weights at the start of each step (frozen ones are not its business); on an
    alert it stops and loads into the model the average of the policies of the steps before the onset, as PPO's
    loop keeps them. A run without an alert holds only the copies an alert could still keep."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[1].requires_grad_(False)
    frozen = model[1].weight.detach().clone()
    callback = HackingMonitorCallback(HackingMonitor(baseline_steps=2, patience=2), stop_on_hacking=True)
    args, state, control = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerState(), TrainerControl()
    policies = {}
    for step in range(1, 10):
        callback.on_step_begin(args, state, control, model=model)
        policies[step] = [p.detach().clone() for p in model[0].parameters()]
        with torch.no_grad():  # the step's update
            for p in model.parameters():
                p.add_(float(step))
        state.global_step = step
        logs = {"kl": 0.01, "entropy": 1.0, "completions/mean_length": 10.0 if step <= 4 else 30.0, "reward": 1.0}
        callback.on_log(args, state, control, logs=logs)
        if control.should_training_stop:
            break
    callback.on_train_end(args, state, control, model=model)
    assert state.global_step == 6 and callback.summary()["kept_policy_of_steps"] == [3, 4]  # length drift from 5
    for kept, (a, b) in zip(model[0].parameters(), zip(policies[3], policies[4])):
        torch.testing.assert_close(kept.detach(), (a + b) / 2)
    # frozen weights are not put back (added to in float steps: equal up to rounding)
    torch.testing.assert_close(model[1].weight.detach(), frozen + sum(range(1, 7)))
    assert "the output is the average of the policies of steps [3, 4]" in capsys.readouterr().out

    steady = HackingMonitorCallback(stop_on_hacking=True)
    for step in range(1, 21):
        steady.on_step_begin(args, state, control, model=model)
        state.global_step = step
        steady.on_log(args, state, TrainerControl(), logs={"kl": 0.01, "entropy": 1.0, "reward": 1.0})
    # the copies of steps 15-20: the next alert's window starts at step 18 at the earliest, 2 are kept before it
    assert sorted(steady.snapshots.copies) == list(range(15, 21))


def test_a_down_weighted_reward_model_is_weighed_by_its_reward_weight_under_trls_name_for_it(tmp_path):
    # TRL logs the reward model as rewards/<its folder>/mean; the monitor's weights are keyed by the recipe's
    # `reward_model`, so the model weighed 1.0 whatever reward_weights said: its rise of 1.0 (0.1 weighted) against
    # the format reward's fall of 0.2 (the trained reward falls) was a dominance alert
    from trl import GRPOConfig

    from hfgen.group_rl import GroupRLArguments, hacking_monitor, trl_reward_function

    def reward(prompts, completions, **_):  # stands for the reward model: hfgen names it as TRL does, after its dir
        return [0.0] * len(prompts)

    data_args = GroupRLArguments(dataset_name="embedded:arithmetic_prompts", reward_model_path=str(tmp_path / "reward"),
                                 reward_functions=["hfgen.data.arithmetic:answer_format"])  # fmt: skip
    config = GRPOConfig(output_dir=str(tmp_path), reward_weights=[0.1, 1.0], report_to=[], use_cpu=True)
    callback = hacking_monitor(data_args, config, [reward, trl_reward_function(data_args.reward_functions[0])])
    args, state, control = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerState(), TrainerControl()
    for step in range(1, 10):
        state.global_step = step
        rm, answer_format = (0.0, 0.5) if step <= 4 else (1.0, 0.3)
        logs = {"loss": 0.0, "entropy": 1.0, "completions/mean_length": 10.0, "reward": 0.1 * rm + answer_format,
                "rewards/reward/mean": rm, "rewards/answer_format/mean": answer_format}  # fmt: skip
        callback.on_log(args, state, control, logs=logs)
    assert callback.monitor.history[-1]["components"] == {"reward_model": 1.0, "answer_format": 0.3}
    assert not callback.monitor.alerts
