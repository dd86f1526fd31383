"""What a PPO step leaves behind beyond its figures (`hfgen.rl.metrics`): their means over processes, the sample
table, and the reward-hacking monitor's verdict."""

from __future__ import annotations

from pathlib import Path

import torch

from hfgen import tracking
from hfgen.rl.metrics import RATES, SCORED_PARTS
from hfgen.rl.monitor import HackingMonitor, logged_figures
from hfgen.rl.rollout import prompt_text, reward_values

SAMPLE_ROWS = 4  # rows of the sample table printed (and written to samples.jsonl) every `sample_steps`


def global_means(accelerator, local: dict) -> dict[str, float | None]:
    """Means over processes of this process's figures, in one collective; rates are summed instead, and a figure
    given as its scored sum and count (`metrics.scored_figure`) is their ratio, None when none was scored."""
    names = list(local)
    means = accelerator.reduce(torch.stack([local[n].float().to(accelerator.device) for n in names]), "mean")
    reduced = {name: value.item() for name, value in zip(names, means)}
    for name in RATES:
        reduced[name] *= accelerator.num_processes
    metrics = {}
    for name, value in reduced.items():
        if name.endswith(SCORED_PARTS[0]):  # (means of both: their ratio is that of the sums)
            figure = name.removesuffix(SCORED_PARTS[0])
            count = reduced[figure + SCORED_PARTS[1]]
            metrics[figure] = value / count if count else None
        elif not name.endswith(SCORED_PARTS[1]):
            metrics[name] = value
    return metrics


def start_samples(output_dir: Path, start_step: int) -> None:
    """Before training (main process): samples.jsonl as it was at the resumed checkpoint (rows of later steps are
    about to be written again), or none on a fresh start (`start_step` 0). PPO's and GRPO/RLOO's."""
    path = output_dir / "samples.jsonl"
    if not start_step:
        path.unlink(missing_ok=True)
    elif path.is_file():
        tracking.write_jsonl(path, [row for row in tracking.read_jsonl(path) if row["step"] <= start_step])


def write_samples(output_dir: Path, step: int, prompts, texts, scores, oracle) -> None:
    """A table of prompts, responses and scores (detail 12: the way to see reward hacking), printed and appended
    to samples.jsonl; call on the main process."""
    rows = []
    for i in range(min(SAMPLE_ROWS, len(texts))):
        row = {"step": step, "prompt": prompt_text(prompts[i]), "response": texts[i], "score": float(scores[i])}
        if oracle is not None:
            row["oracle"] = tracking.finite_or_null(reward_values(oracle, oracle([prompts[i]], [texts[i]]), 1))[0]
        rows.append(row)
    with (output_dir / "samples.jsonl").open("a", encoding="utf-8") as f:
        f.writelines(tracking.json_line(row) for row in rows)
    for row in rows:
        judged = f"score {row['score']:+.2f}" + (
            f", oracle {row['oracle']:+.2f}" if row.get("oracle") is not None else ""
        )
        print(f"    [{judged}] {row['prompt'][:40]!r} -> {row['response'][:80]!r}")


def reward_ceiling(config) -> float | None:
    """The monitor's ceiling: `reward_ceiling`, else the highest score the reward model gave its held-out pairs
    (`score_max` in a reward run's eval.json), else None (that signal off)."""
    if config.reward_ceiling is not None or not config.reward_model_path:
        return config.reward_ceiling
    return tracking.read_json(Path(config.reward_model_path) / "eval.json", {}).get("score_max")


def watch_for_hacking(accelerator, monitor: HackingMonitor, step: int, metrics: dict, details, rollout) -> list:
    """Feed the monitor the step's global figures (the reward model's score of every response, gathered, so every
    process decides alike); alerts go to the console and, with the monitor's figures, into `metrics`."""
    proxy = details.components.get("reward_model", rollout.scores)
    alerts = monitor.observe(step, **logged_figures(metrics), proxy_scores=accelerator.gather(proxy.float()).tolist())
    metrics |= monitor.metrics()
    for alert in alerts:
        accelerator.print(
            f"reward-hacking alert at step {step} ({alert.signal}, since step {alert.onset}): {alert.message}"
        )
        metrics[f"monitor/alert/{alert.signal}"] = float(alert.onset)
    return alerts
