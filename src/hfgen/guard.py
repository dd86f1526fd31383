"""What stops a run cleanly instead of letting it go wrong: the divergence guard, a save on SIGINT/SIGTERM, and the
kill points the resume tests use. Trainer stages get all three through `tracking.trainer_callbacks`; the stages'
own accelerate loops call `Divergence.check_step`, `signalled` and `kill_point` at the same moments.

Recipe keys (every stage): `nan_tolerance` (steps with a non-finite loss or gradient norm that are skipped before
the run stops with exit code 3; under fp16's loss scaler, the overflowed gradients it skips itself are not counted)
and `save_on_signal` (SIGINT/SIGTERM writes a checkpoint, then the run exits). `hfgen.train.run_recipe` sets them
for the run with `configure`.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from hfgen.errors import Diverged

# Test harness: `HFGEN_KILL_AT=POINT` or `POINT@STEP` SIGKILLs the process at that point (inert when unset);
# `POINT@STEP:TERM` (or `:INT`) sends that signal instead, as a scheduler's preemption notice would.
# Points: step (inside an optimizer step, before the update), checkpoint (a checkpoint's files written, its
# completion marker not yet), final_save (the final model half saved), eval (during an evaluation).
KILL_AT = "HFGEN_KILL_AT"
KILL_POINTS = ("step", "checkpoint", "final_save", "eval")


def kill_point(name: str, step: int | None = None) -> None:
    """SIGKILL this process here when HFGEN_KILL_AT names this point (and step): what a preemption does, at a
    chosen moment, so the resume tests can hit a millisecond-long checkpoint write every time."""
    wanted = os.environ.get(KILL_AT)
    if not wanted:
        return
    wanted, _, signal_name = wanted.partition(":")
    point, _, at = wanted.partition("@")
    if point == name and (not at or step is None or int(at) == step):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), getattr(signal, f"SIG{signal_name}") if signal_name else signal.SIGKILL)


@dataclass
class Settings:
    nan_tolerance: int = 0
    save_on_signal: bool = False


settings = Settings()
_signal_received: int | None = None
# Steps the divergence guard skipped in this run (every `Divergence` of the run shares them): a checkpoint records
# them (`tracking.finish_checkpoint`) and a resume restores them, so `nan_tolerance` counts over the whole run.
skipped_steps: set[int] = set()
# The handlers `configure` replaced with `_note_signal`, put back for a later run in this process without
# save_on_signal (an rlhf pipeline's next step, a sweep's next point): else its Ctrl-C was held until a checkpoint
# that might never come.
_handlers_before: dict[int, object] = {}


def configure(nan_tolerance: int = 0, save_on_signal: bool = False) -> None:
    """The current run's settings (set by `run_recipe`); with `save_on_signal`, SIGINT and SIGTERM are caught and
    turned into a checkpoint at the end of the current step (`signalled`)."""
    global _signal_received
    settings.nan_tolerance, settings.save_on_signal = nan_tolerance, save_on_signal
    _signal_received = None
    skipped_steps.clear()
    if save_on_signal:
        for signum in (signal.SIGINT, signal.SIGTERM):
            if (previous := signal.signal(signum, _note_signal)) is not _note_signal:
                _handlers_before[signum] = previous
    else:
        restore_signal_handlers()


def restore_signal_handlers() -> None:
    """The handlers `configure` replaced, back: for what runs after a run with save_on_signal in this process."""
    for signum, handler in _handlers_before.items():
        signal.signal(signum, handler)
    _handlers_before.clear()


def _note_signal(signum, frame) -> None:
    global _signal_received
    _signal_received = signum
    print(f"hfgen: {signal.Signals(signum).name} received: saving a checkpoint after this step", file=sys.stderr)


def signalled() -> bool:
    """True once SIGINT/SIGTERM arrived in a run with `save_on_signal: true`: save a checkpoint, then `exit_on_signal`.
    Called by every process at the same moment of each step: on several processes, one that was signalled (one
    preempted machine) tells the others, so they all save the same checkpoint and leave together (one deciding
    alone would leave the rest waiting in a collective forever). Costs one tiny all-reduce a step, only with
    `save_on_signal`."""
    global _signal_received
    if not settings.save_on_signal:
        return False
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        import torch
        from accelerate import PartialState

        flag = torch.tensor([_signal_received or 0], device=PartialState().device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and _signal_received is None:
            _signal_received = int(flag.item())
            print(f"hfgen: another process received {signal.Signals(_signal_received).name}: saving a checkpoint "
                  "after this step", file=sys.stderr)  # fmt: skip
    return _signal_received is not None


def received_signal() -> int | None:
    """The signal this process received (no collective: for the end of a run, after its last step)."""
    return _signal_received


def exit_on_signal(checkpoint) -> None:
    """After the checkpoint `signalled` asked for: leave without the COMPLETE marker (exit 128 + signal number)."""
    if _signal_received is None:
        return
    from hfgen import tracking

    if tracking.is_main_process():  # (one line for the run, not one for each of its processes)
        print(f"hfgen: saved {checkpoint}; continue with --resume_from_checkpoint true", file=sys.stderr)
    sys.exit(128 + _signal_received)


class Divergence:
    """Watches each optimizer step's loss and gradient norm. A non-finite one skips the step (its gradients are
    dropped, so the optimizer leaves the weights as they were) while fewer than `nan_tolerance` steps have been
    skipped, and otherwise stops the run: `Diverged`, exit code 3, no final model, no COMPLETE marker; the
    newest complete checkpoint stays on disk."""

    def __init__(self, output_dir, tolerance: int | None = None):
        self.output_dir = output_dir
        self.tolerance = settings.nan_tolerance if tolerance is None else tolerance
        self.last_finite: tuple[int, float] | None = None

    def note_loss(self, step: int, loss) -> None:
        """A logged loss (Trainer's `on_log`): remembered for the message when finite."""
        if loss is not None and math.isfinite(float(loss)):
            self.last_finite = (step, float(loss))

    def check_step(self, step: int, loss=None, optimizer=None) -> bool:
        """Before `optimizer.step()`: True to take the step; False when it was skipped (gradients set to None).
        Raises `Diverged` past the tolerance. One device sync per call (`.item()`)."""
        import torch

        figures = {}
        if loss is not None:
            figures["loss"] = float(loss.detach().float()) if isinstance(loss, torch.Tensor) else float(loss)
        if optimizer is not None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if grads:
                figures["gradient norm"] = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])
                ).item()
        bad = {name: value for name, value in figures.items() if not math.isfinite(value)}
        if "gradient norm" in bad and (scaler := loss_scaler(optimizer)) is not None:
            # fp16's loss scaler (accelerate's GradScaler, on a GPU): gradients that overflowed at its scale are
            # routine, its step skips them and lowers the scale (from 2**16 at the start, and again each time its
            # growth overflows). Only a scale that fell below 1, gradients overflowing float16 unscaled, is divergence.
            if (scale := scaler.get_scale()) >= 1:
                del bad["gradient norm"]
            else:
                bad[f"gradient norm at float16 loss scale {scale:.3g}"] = bad.pop("gradient norm")
        if not bad:
            if "loss" in figures:
                self.last_finite = (step, figures["loss"])
            return True
        what = ", ".join(f"the {name} is {value}" for name, value in bad.items())
        skipped_steps.add(step)  # a step counts once, however many optimizer steps (PPO's minibatches) it holds
        if len(skipped_steps) > self.tolerance:
            raise Diverged(self.message(step, what))
        print(
            f"hfgen: step {step}: {what}; skipped ({len(skipped_steps)} of nan_tolerance {self.tolerance})",
            file=sys.stderr,
        )
        if optimizer is not None:
            drop_gradients(optimizer)
        return False

    def message(self, step: int, what: str) -> str:
        last = (
            f"last finite loss {self.last_finite[1]:.6g} at step {self.last_finite[0]}"
            if self.last_finite
            else "no finite loss seen before"
        )
        return (
            f"training stopped at step {step}: {what} ({last}). The model was not saved and the run is not COMPLETE; "
            f"{newest_complete(self.output_dir)}. Lower learning_rate (or raise warmup, clip with max_grad_norm), or "
            "set nan_tolerance: N in the recipe to skip up to N such steps."
        )


def loss_scaler(optimizer):
    """The fp16 GradScaler an accelerate-prepared optimizer steps through (`AcceleratedOptimizer.scaler`), or None."""
    scaler = getattr(optimizer, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def drop_gradients(optimizer) -> None:
    """The step's gradients set to None: the optimizer leaves the parameters without one alone. fp16's loss scaler
    asserts at its step that it checked the gradients for overflow, which its `unscale_` does (clipping calls it):
    called here when clipping did not (max_grad_norm 0)."""
    if (scaler := loss_scaler(optimizer)) is not None:
        try:
            scaler.unscale_(optimizer.optimizer)  # (the scaler keys its checks by the wrapped optimizer)
        except RuntimeError as error:
            if "already been called" not in str(error):  # "unscale_() has already been called ...": by clipping
                raise
    optimizer.zero_grad(set_to_none=True)


def check_final_model(output_dir, step: int, figures: dict) -> None:
    """After the last update, before the final model is saved: a held-out figure the model computes (its
    reconstruction error, a loss) that is not finite means the last update (which the per-step check saw only the
    loss and gradients of) or the steps `nan_tolerance` skipped left a model that no longer computes. `Diverged`,
    as for a step past the tolerance: no model saved, no COMPLETE. Every process calls it (`agreed`)."""
    names = list(figures)
    values = agreed([math.nan if figures[name] is None else float(figures[name]) for name in names])
    bad = {name: value for name, value in zip(names, values) if not math.isfinite(value)}
    if not bad:
        return
    what = ", ".join(f"its {name} is {value}" for name, value in bad.items())
    skipped = f" ({len(skipped_steps)} step(s) were skipped under nan_tolerance)" if skipped_steps else ""
    raise Diverged(
        f"training ended at step {step} with a model that no longer computes: {what}{skipped}. The model was not "
        f"saved and the run is not COMPLETE; {newest_complete(output_dir)}. Lower learning_rate (or raise warmup, "
        "clip with max_grad_norm); nan_tolerance skips steps, it cannot keep a model whose outputs are not finite."
    )


def check_saved_model(output_dir) -> None:
    """After a Trainer stage's final save, before COMPLETE: the output dir holds a model `from_pretrained` loads
    (config and weights, or a peft adapter). An engine's save that wrote none (ZeRO-3 left DeepSpeed's shards, FSDP
    under SHARDED_STATE_DICT wrote nothing: `finetune.saving_whole_models` handles both) would otherwise end COMPLETE
    with no model for the next stage. Every process calls it (`agreed`): the main process, which saved, looks."""
    from hfgen import tracking
    from hfgen.models import unloadable_model_problem

    problem = unloadable_model_problem(Path(output_dir)) if tracking.is_main_process() else None
    if math.isfinite(agreed([math.nan if problem else 0.0])[0]):
        return
    raise RuntimeError(
        f"the final save wrote no loadable model: {output_dir} {problem or '(as the main process found)'}. The run is "
        f"not COMPLETE; {newest_complete(output_dir)}. The engine's save did not gather the whole model: report it, "
        "with the launch config"
    )


def check_checkpoint(output_dir, path, step: int, models) -> None:
    """Before checkpoint-STEP at `path` is marked complete: trained weights that went to inf or NaN in an update (the
    per-step check saw only that step's loss and gradients) make a checkpoint no resume can continue from, yet
    `resume_from_checkpoint: true` would take it and the divergence messages would name it as the one kept.
    `Diverged` instead, and the checkpoint's files (written or not) go. Every process calls it: each checks the
    weights it holds (its shard under ZeRO-3 and FSDP2, `loop.local_shard`), and all agree (`agreed`). One read of
    the trained weights per checkpoint."""
    import torch

    from hfgen.loop import local_shard

    # trained weights only: frozen ones are the starting model's, as loaded
    held = [
        (n, local_shard(p)) for model in filter(None, models) for n, p in model.named_parameters() if p.requires_grad
    ]
    broken = [
        name
        for name, weights in held
        if weights.numel() and not torch.isfinite(torch.stack([weights.amax(), weights.amin()])).all()
    ]  # (amax and amin are NaN when any value is, inf when one is: no full-size copy of each tensor)
    if math.isfinite(agreed([math.nan if broken else 0.0])[0]):
        return
    from hfgen import tracking

    if tracking.is_main_process():
        tracking.remove_dir(Path(path))
    shown = f" ({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''})" if broken else ""
    raise Diverged(
        f"training stopped at step {step}: its update left trained weights that are inf or NaN{shown}, so "
        f"checkpoint-{step} was not kept. The model was not saved and the run is not COMPLETE; "
        f"{newest_complete(output_dir)}. Lower learning_rate (or raise warmup, clip with max_grad_norm)."
    )


def agreed(values: list[float]) -> list[float]:
    """`values` summed over the processes of a distributed run (one tiny all-reduce), so that a NaN or inf any
    process found is non-finite on every process: all stop together, where one stopping alone would leave the
    others waiting in a collective forever. Unchanged on one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    import torch
    from accelerate import PartialState

    total = torch.tensor(values, dtype=torch.float64, device=PartialState().device)
    dist.all_reduce(total)
    return total.tolist()


def newest_complete(output_dir) -> str:
    from hfgen import tracking

    newest = tracking.complete_checkpoints(output_dir)
    return f"the newest complete checkpoint is {newest[-1]}" if newest else "no complete checkpoint was written"


def run_child(command: list[str], env: dict | None = None) -> int:
    """Run `command` (compare's training runs, sweep's evaluations) and hand back its exit code as a shell reports
    it (killed by signal N: 128 + N); the child stops with this process: SIGINT/SIGTERM received here are passed on
    to it once and waited for (a training child with save_on_signal writes its checkpoint), and the code is then
    128 + that signal whatever the child made of it, so the caller stops as asked; the child gets SIGTERM should
    this process die. subprocess.run left it running as an orphan on SIGTERM, and SIGKILLed it 0.25 s after a
    Ctrl-C. The child has a session of its own, so a terminal's Ctrl-C reaches it once, from here."""
    import subprocess
    import threading

    if threading.current_thread() is not threading.main_thread():  # (signal handlers are the main thread's)
        return subprocess.run(command, env=env).returncode
    ask_for_sigterm = parent_death_signal()  # looked up here: the child only calls it between fork and exec
    parent = os.getpid()

    def in_the_child() -> None:
        ask_for_sigterm()
        if os.getppid() != parent:  # this process died before the child could ask
            os._exit(128 + signal.SIGTERM)

    child = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=in_the_child)
    received: list[int] = []

    def pass_on(signum, frame) -> None:
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    # (a signal this process ignores, as a shell's background job ignores SIGINT, stays ignored)
    heard = [signum for signum in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(signum) is not signal.SIG_IGN]
    previous = {signum: signal.signal(signum, pass_on) for signum in heard}
    try:
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if child.poll() is None:  # this process is leaving on an error of its own
            child.kill()
            child.wait()
    if received:
        return 128 + received[0]
    return 128 - code if code < 0 else code


def parent_death_signal():
    """A function that, called in a child process, asks for SIGTERM when its parent dies (Linux's PR_SET_PDEATHSIG;
    elsewhere it does nothing)."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGTERM)


# what `hfgen train --num_processes` (`train.launch_with_accelerate`) tells the processes it launches: its pid
LAUNCHER_PID = "HFGEN_LAUNCHER_PID"


def stop_with_launcher() -> None:
    """In a process `hfgen train --num_processes` (accelerate, torch elastic) launched: SIGTERM when the launching
    process dies. torch elastic starts each rank in a session of its own with no parent-death signal, so a launcher
    SIGKILLed (kill -9, the OOM killer, a scheduler) left its ranks training on to the end as orphans, holding the
    devices and the dir's lock. With save_on_signal they write a checkpoint first. Where hfgen launched the process
    it knows the launcher's pid, and a launcher that died before the request is noticed too (a launcher that is
    pid 1, a container's entrypoint, is no dead one)."""
    import socket

    parent_death_signal()()
    host, _, pid = os.environ.get(LAUNCHER_PID, "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and os.getppid() != int(pid):
        os.kill(os.getpid(), signal.SIGTERM)


def launcher_identity() -> str:
    """This process as `LAUNCHER_PID` names it: host and pid (a process on another machine has another parent)."""
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"
