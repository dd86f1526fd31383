"""What the t2i and vae stages share beyond `hfgen.loop` (the engine mechanics of every loop hfgen drives): their
loop keys, named as in diffusers' training examples (`train_batch_size`, `max_train_steps`, `checkpointing_steps`,
`checkpoints_total_limit`, `resume_from_checkpoint`, ...) so their users find their flags, and the epoch-based
bookkeeping of a dataloader loop (step budget, resume position, training RNG, logged means, checkpoints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from hfgen import guard, tracking

LR_SCHEDULES = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]


@dataclass
class LoopArguments:
    """The training loop: batch, steps, optimizer (AdamW), schedule, precision, checkpoints."""

    output_dir: str | None = field(default=None, metadata={"help": "Run directory: model, metrics, checkpoints."})
    seed: int = field(default=42, metadata={"help": "Seed for initialisation, data order, noise and timesteps."})
    train_batch_size: int = field(default=16, metadata={"help": "Images per process per step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step."})
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps in all (overrides num_train_epochs)."}
    )
    num_train_epochs: int = field(default=1, metadata={"help": "Passes over the data, when max_train_steps is unset."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    scale_lr: bool = field(
        default=False, metadata={"help": "Multiply the learning rate by batch x accumulation x processes."}
    )
    lr_scheduler: str = field(default="constant", metadata={"help": "Learning-rate schedule.", "choices": LR_SCHEDULES})
    lr_warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: no clipping)."})
    mixed_precision: str = field(
        default="no",
        metadata={"help": "no, fp16 (CUDA) or bf16; frozen models are cast to it.", "choices": ["no", "fp16", "bf16"]},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward: less memory, ~30% slower."}
    )
    checkpointing_steps: int = field(
        default=500, metadata={"help": "Save a resumable checkpoint-N every this many steps (0: never)."}
    )
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint-N dir, or 'true' for the newest one in output_dir."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log the mean loss to metrics.jsonl every N steps."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Worker processes loading images."})


def check_loop_arguments(args: LoopArguments) -> list[str]:
    problems = []
    for key in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "logging_steps"):
        if getattr(args, key) < 1:
            problems.append(f"{key} must be at least 1, got {getattr(args, key)}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:  # (0 kept every one)
        problems.append(f"checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}; unset it "
                        "to keep every checkpoint, or set checkpointing_steps: 0 for none")  # fmt: skip
    if args.max_train_steps is not None and args.max_train_steps < 1:
        problems.append(f"max_train_steps must be at least 1, got {args.max_train_steps}")
    # (mixed_precision fp16 without a CUDA GPU: `recipe.precision_problems`, the rule of every stage)
    resume = args.resume_from_checkpoint
    if resume and resume.lower() not in ("true", "false") and not Path(resume).is_dir():
        problems.append(f"resume_from_checkpoint '{resume}' is not a directory")
    return problems


def make_accelerator(args: LoopArguments, refused: dict[str, str]):
    from hfgen import loop

    return loop.make_accelerator(
        args.output_dir, args.seed, args.gradient_accumulation_steps, args.mixed_precision, refused=refused
    )


def weight_dtype(accelerator):
    """The dtype frozen models are cast to under mixed precision (trained weights stay float32)."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_optimizer(parameter_groups, args: LoopArguments, num_processes: int):
    """AdamW over `parameter_groups`; lr scaled by the global batch when `scale_lr`. Fused, as the text stages' (and
    transformers' default): the per-parameter loop torch picks on CPU raised a raw RuntimeError for an update past
    float32's range (learning_rate 1e39), where the fused one leaves inf weights for the divergence guard to stop."""
    from hfgen import loop

    scale = args.train_batch_size * args.gradient_accumulation_steps * num_processes if args.scale_lr else 1
    return loop.adamw(
        parameter_groups, args.learning_rate * scale, (args.adam_beta1, args.adam_beta2), args.adam_weight_decay,
        args.adam_epsilon, fused=True,
    )  # fmt: skip


def train_dataloader(dataset, args: LoopArguments, num_processes: int, collate_fn=None):
    """Shuffled training batches of `train_batch_size` (seeded once prepared: `loop.make_accelerator`); a last
    partial batch is dropped when the data fills at least one batch on every process."""
    import torch

    return torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers, drop_last=len(dataset) >= args.train_batch_size * num_processes,
    )  # fmt: skip


def step_budget(args: LoopArguments, batches_per_epoch: int) -> tuple[int, int, int]:
    """(optimizer steps in all, epochs, optimizer steps per epoch) for a dataloader giving this process
    `batches_per_epoch` (the prepared loader's length: `prepare_training`)."""
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / args.gradient_accumulation_steps))
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    return max_steps, math.ceil(max_steps / steps_per_epoch), steps_per_epoch


def make_lr_scheduler(accelerator, optimizer, args: LoopArguments, max_steps: int):
    from hfgen import loop

    return loop.lr_schedule(accelerator, args.lr_scheduler, optimizer, args.lr_warmup_steps, max_steps)


def prepare_training(accelerator, args: LoopArguments, models: list, optimizer, train_loader):
    """`loop.prepare` of the trained `models`, their optimizer and the training loader -> (prepared models,
    prepared optimizer, prepared loader, lr schedule, `step_budget`).

    The budget counts the batches the prepared loader gives this process: accelerate deals an epoch's batches out
    to the processes and drops (drop_last) or completes (even_batches) the last round, so the unprepared loader's
    batches / processes overestimated an epoch (5 batches on 2 processes: 2 each, not 3); the epochs then ran out
    before max_steps, and a resume skipped to another batch than the one the run stopped at. The schedule, which
    needs max_steps, is made then, over the torch optimizer (prepare's wrapper is none under DeepSpeed)."""
    from hfgen import loop

    *models, prepared_optimizer, train_loader = loop.prepare(
        accelerator, *models, optimizer, train_loader,
        micro_batch_size=args.train_batch_size, max_grad_norm=args.max_grad_norm,
    )  # fmt: skip
    if len(train_loader) == 0:  # (the samplers keep at least one batch per process; a guard against a new one)
        raise RuntimeError(f"the prepared training dataloader gives process {accelerator.process_index} no batch")
    budget = step_budget(args, len(train_loader))
    lr_scheduler = make_lr_scheduler(accelerator, optimizer, args, budget[0])
    return models, prepared_optimizer, train_loader, lr_scheduler, budget


def check_trained_to_end(global_step: int, max_steps: int) -> None:
    """After the epoch loop: it must have reached max_steps (a resume from a checkpoint past it is refused:
    `tracking.check_budget_reaches`). Ending short is a bug in the step budget, not a finished run: the model
    would be saved, COMPLETE written, with fewer steps than announced and the schedule never run to its end."""
    if global_step < max_steps:
        raise RuntimeError(
            f"the training loop ran out of batches at step {global_step} of {max_steps}: the step budget "
            "(`training.step_budget`) does not match the batches the dataloader gave"
        )


def resume(accelerator, args: LoopArguments, steps_per_epoch: int, rng: TrainingRNG) -> tuple[int, int, int]:
    """Load the checkpoint named by `resume_from_checkpoint`, if any: (global step, first epoch, batches of that
    epoch to skip). Everything registered with the accelerator comes back: models, optimizer, schedule, RNG, EMA;
    `rng`, the loop's registered `TrainingRNG`, says whether its log window came back with it."""
    from hfgen import loop

    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    epochs = f"num_train_epochs: {args.num_train_epochs} ({max_steps} steps)"
    budget = f"max_train_steps: {max_steps}" if args.max_train_steps else epochs
    step = loop.resume(accelerator, args.resume_from_checkpoint, args.output_dir, (max_steps, budget))
    if step and rng.log is not None and not rng.window_restored and accelerator.is_main_process:
        checkpoint = Path(args.output_dir) / f"checkpoint-{step}"  # (the name only: the note says whose it is)
        tracking.note_window_not_kept(checkpoint, step, args.logging_steps, max_steps)
    if step == max_steps:  # trained to the end: no epoch left to enter (the loop checks its budget after a step)
        return step, math.ceil(max_steps / steps_per_epoch), 0
    return step, step // steps_per_epoch, (step % steps_per_epoch) * args.gradient_accumulation_steps


def epoch_batches(accelerator, dataloader, epoch: int, skip: int):
    """The epoch's batches in their seeded order, without the first `skip` (already trained on before a resume)."""
    dataloader.set_epoch(epoch)
    if hasattr(dataloader.dataset, "set_epoch"):  # per-row random transforms (`latents.PixelRows`); accelerate
        dataloader.dataset.set_epoch(epoch)  # tells the dataset only when its sampler takes no epoch
    return accelerator.skip_first_batches(dataloader, skip) if skip else dataloader


def accumulation_scale(args: LoopArguments, batches_per_epoch: int, index: int) -> float:
    """The factor on the loss of an epoch's batch `index` (0-based, of `batches_per_epoch` on this process): GA / k
    for the k batches of an epoch's last, shorter accumulation (batches per epoch not a multiple of
    gradient_accumulation_steps, GA), 1 otherwise. accelerate's backward divides every loss by GA, so that step's
    gradient would be k / GA of its batches' mean, not their mean (the Trainer stages correct it alike)."""
    short = batches_per_epoch % args.gradient_accumulation_steps
    return args.gradient_accumulation_steps / short if short and index >= batches_per_epoch - short else 1.0


class TrainingRNG:
    """The training loop's own random generator (noise, timesteps, dropped captions, flips), one stream per process,
    saved in checkpoints (`accelerator.register_for_checkpointing`). A resumed run then draws exactly what the
    uninterrupted run drew, whatever else used the global RNG meanwhile: a new DataLoader iterator, for one, takes
    a draw from it, at a different moment in a resumed run.

    accelerate writes a registered object's `state_dict` from the main process only (one custom_checkpoint_N.pkl)
    but calls it on every process, and every process loads that file: the state holds every process's stream
    (gathered, a collective), and each process takes back its own. Saving the main process's alone gave every
    process rank 0's stream after a resume: the same noise and timesteps on all, a different run.

    `log`: the loop's `StepLog`, whose window (the losses of the steps since its last row) goes along the same way:
    a checkpoint between two log rows left it out, and the first row after a resume averaged fewer steps than the
    uninterrupted run's."""

    def __init__(self, seed: int, device, log: StepLog | None = None):
        import torch

        self.generator = torch.Generator(device).manual_seed(seed)
        self.log = log
        self.window_restored = False  # whether a checkpoint's log window came back (`resume` says when not)

    def state_dict(self) -> dict:
        """Every process's generator state, and log window, in process order (every process must call it)."""
        from accelerate.utils import gather_object

        state = {"states": gather_object([self.generator.get_state()])}
        if self.log is not None:
            state["log_windows"] = gather_object([self.log.window()])
        return state

    def load_state_dict(self, state: dict) -> None:
        from accelerate import PartialState

        from hfgen.errors import UserError

        process = PartialState()
        states = state["states"] if "states" in state else [state["state"]]  # earlier hfgen: the main process's
        if len(states) != process.num_processes:  # (`check_same_run` refuses a checkpoint of another launch)
            raise UserError(
                f"this checkpoint holds the training RNG of {len(states)} process(es), this run has "
                f"{process.num_processes}: it was written by an earlier hfgen, which kept the main process's alone, "
                "so no resume of it on several processes can repeat the run; start it afresh."
            )
        self.generator.set_state(states[process.process_index])
        if self.log is not None and "log_windows" in state:  # (a checkpoint of an earlier hfgen: an empty window)
            self.log.restore_window(state["log_windows"][process.process_index])
            self.window_restored = True


class StepLog:
    """Mean loss over the last `logging_steps` steps, averaged across processes, appended to metrics.jsonl. Losses
    stay tensors between logs, so logging costs no per-step synchronisation. Each value is the mean over the steps
    that had it: vae's adversarial losses exist only from `adversarial_start_step` on, and a row whose window began
    before it divided their sums by every step of the window (half the disc_loss for a switch-on mid-window)."""

    def __init__(self, accelerator, output_dir: str, every: int):
        self.accelerator, self.every = accelerator, every
        self.logger = tracking.MetricsLogger(output_dir)  # cut back to the checkpoint by `resume`
        self.sums: dict = {}
        self.counts: dict = {}  # name: steps of the window that had it
        self.count = 0  # steps of the window
        self.micro: dict = {}  # name: (sum, count) over the current optimizer step's micro-batches
        self.lr = None  # the learning rate of the last step ended

    def add(self, **values) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
            self.counts[name] = self.counts.get(name, 0) + 1
        self.count += 1

    def add_micro_batch(self, **values) -> None:
        """One micro-batch's values; `end_step` adds their mean over the step (gradient_accumulation_steps > 1:
        the step's loss is that of all its micro-batches, not of the last one)."""
        for name, value in values.items():
            total, count = self.micro.get(name, (0.0, 0))
            self.micro[name] = (total + value.detach().float(), count + 1)

    def end_step(self, lr: float) -> None:
        """The step's mean of its micro-batches, and `lr`, the learning rate the step used (read before the
        schedule's step: after it, the scheduler gives the next step's rate), logged with the next row."""
        self.add(**{name: total / count for name, (total, count) in self.micro.items()})
        self.micro = {}
        self.lr = lr

    def window(self) -> dict:
        """The steps since the last row (their sums, counts and last learning rate), for a checkpoint."""
        sums = {name: total.item() for name, total in self.sums.items()}
        return {"sums": sums, "counts": dict(self.counts), "count": self.count, "lr": self.lr}

    def restore_window(self, window: dict) -> None:
        """A checkpoint's `window`: the next row averages the same steps as the uninterrupted run's (the sums were
        float32 tensors, exact as Python floats)."""
        import torch

        device = self.accelerator.device
        self.sums = {
            name: torch.tensor(total, dtype=torch.float32, device=device) for name, total in window["sums"].items()
        }
        self.count, self.lr = window["count"], window["lr"]
        # an earlier hfgen's checkpoint kept one count for the whole window: the best guess for every value
        self.counts = dict(window.get("counts") or {name: self.count for name in self.sums})

    def maybe_write(self, step: int, force: bool = False, **extra) -> dict | None:
        if not self.count or (step % self.every and not force):
            return None
        means = {
            name: self.accelerator.reduce(total, "mean").item() / self.counts[name] for name, total in self.sums.items()
        }
        self.logger.log(step, **means, lr=self.lr, **extra)
        self.sums, self.counts, self.count = {}, {}, 0
        return means


def maybe_checkpoint(accelerator, args: LoopArguments, step: int) -> None:
    """A resumable checkpoint-STEP every `checkpointing_steps`, rotated, with the run's recipe beside it; and on
    SIGINT/SIGTERM with `save_on_signal`, one now, then exit."""
    from hfgen import loop

    if (args.checkpointing_steps and step % args.checkpointing_steps == 0) or guard.signalled():
        guard.exit_on_signal(loop.save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit))
