"""Kill-and-resume harness: run a stage with `HFGEN_KILL_AT` so it SIGKILLs itself at a named point (see
`hfgen.guard.kill_point`), resume it with `--resume_from_checkpoint true` until it completes, and compare the final
weights (bit for bit) and metrics.jsonl rows with an uninterrupted run's. Used by tests/test_kill_resume.py and
scripts/kill_matrix.py (the full matrix of stages x points)."""

import signal
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import run_hfgen
from hfgen import tracking

# Row keys that measure the machine, not the training: wall-clock rates and times (TRL's GRPO/RLOO `step_time`);
# and Trainer's `train_loss`, the mean over the steps of one `train()` call, which a resumed call starts again.
# (TRL's `num_tokens` is compared: `tracking.trainer_resume` restores it.)
VOLATILE = ("runtime", "per_second", "_per_s", "eps", "time/", "step_time", "train_loss")

ORACLE = "hfgen.data.embedded:oracle_scores"
# Each kind of stage as a few-step run of its tiny recipe from the tiny pretrained Llama (with `--max_steps`; shared
# by tests/test_kill_resume.py and scripts/kill_matrix.py). The preference stages' held-out comparison is small; GRPO
# and RLOO are scored by the embedded oracle, which varies within every group (the arithmetic recipes' exact-answer
# reward is 0 on every answer of a model that never learnt arithmetic, and the weights would not move).
PREFERENCE_ARGS = ["--max_train_samples", "64", "--max_eval_samples", "8", "--per_device_train_batch_size", "8",
                   "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "2", "--eval_num_prompts", "4",
                   "--eval_samples_per_prompt", "2", "--eval_response_length", "8"]  # fmt: skip
GROUP_RL_ARGS = ["--dataset_name", "embedded:prompts", "--reward_functions", ORACLE, "--reward_weights", "1.0",
                 "--oracle_function", ORACLE, "--freeze_modules", "[]", "--learning_rate", "1e-3",
                 "--max_train_samples", "64", "--max_eval_samples", "4", "--eval_samples_per_prompt", "2",
                 "--num_generations", "4", "--per_device_train_batch_size", "8", "--max_completion_length", "12",
                 "--steps_per_generation", "2", "--save_steps", "2", "--logging_steps", "1"]  # fmt: skip


def train(recipe, output_dir, overrides, kill_at=None, resume=False):
    args = ["train", recipe, *overrides, "--output_dir", output_dir]
    args += ["--resume_from_checkpoint", "true"] if resume else []
    return run_hfgen(*args, env={"HFGEN_KILL_AT": kill_at} if kill_at else {"HFGEN_KILL_AT": ""})


def killed_then_resumed(recipe, output_dir, overrides, kill_points, killed_code=-signal.SIGKILL) -> list[str]:
    """Run once per kill point, each killed there (each resumed from the newest complete checkpoint of the last),
    then once to the end. Returns what each resume said about skipped checkpoints (its stderr lines). `killed_code`:
    a killed run's exit code (`hfgen train --num_processes N`, which launches the processes, exits 128 + 9)."""
    notes = []
    resume = False
    for point in kill_points:
        result = train(recipe, output_dir, overrides, kill_at=point, resume=resume)
        assert result.returncode == killed_code, (
            f"{point}: not killed (rc {result.returncode}): {result.stderr[-3000:]}"
        )
        assert not tracking.is_complete(output_dir), f"{point}: a killed run left COMPLETE"
        notes += [line for line in result.stderr.splitlines() if "resume:" in line]
        resume = bool(tracking.complete_checkpoints(output_dir))
    result = train(recipe, output_dir, overrides, resume=resume)
    assert result.returncode == 0, result.stderr[-3000:]
    assert tracking.is_complete(output_dir)
    return notes + [line for line in result.stderr.splitlines() if "resume:" in line]


def final_weights(run_dir) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file of the run's output (checkpoints excluded), by relative path."""
    run_dir = Path(run_dir)
    files = [p for p in run_dir.rglob("*.safetensors") if not p.relative_to(run_dir).parts[0].startswith("checkpoint-")]
    return {str(p.relative_to(run_dir)): load_file(p) for p in files}


def weight_differences(run_a, run_b) -> list[str]:
    """What differs between two runs' final weights, bit for bit (empty: identical)."""
    a, b = final_weights(run_a), final_weights(run_b)
    if a.keys() != b.keys():
        return [f"files {sorted(a)} != {sorted(b)}"]
    return [f"{f}:{name}" for f in a for name in a[f] if not torch.equal(a[f][name], b[f].get(name, torch.empty(0)))]


def stable_rows(run_dir) -> list[dict]:
    return [
        {k: v for k, v in row.items() if not any(word in k for word in VOLATILE)}
        for row in tracking.read_metrics(run_dir)
    ]
