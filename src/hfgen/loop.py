"""The accelerate loop of the stages hfgen drives itself (ppo, vae, t2i): one module for the mechanics that depend
on the engine (DDP, FSDP2, DeepSpeed ZeRO-2/3), so a stage keeps only its own algorithm.

    accelerator = make_accelerator(output_dir, seed, ...)      the launch checked, everything seeded
    optimizer = adamw(groups, ...); scheduler = lr_schedule(...)  stepped once per optimizer step, checkpointed
    model, optimizer, loader = prepare(accelerator, model, optimizer, loader, micro_batch_size=..., max_grad_norm=...)
    reference = prepare_frozen(accelerator, reference)          frozen models sharded like the trained one
    with gathered(accelerator, model, reference) as (policy, ref): generate / call children with full weights
    clip_gradients(accelerator, model, max_norm)                through the engine (DeepSpeed clips in its step)
    backward_and_step(accelerator, model, optimizer, loss, ...)   backward, clipping, divergence check, step
    state = full_state_dict(accelerator, model)                 whole weights on the main process, for save_pretrained
    whole = whole_on_main(accelerator, model, empty)           a plain whole copy on the main process (diffusers saves)
    local_shard(p); whole_from_shard(p, shard); shard_of(p, whole)   per-weight state kept
                                                                 shard by shard (an EMA, snapshots of the policy)
    step = resume(accelerator, resume_from_checkpoint, output_dir); save_checkpoint(...)  (atomic, rotated)

What each engine needs, and where it is handled:
- DeepSpeed sizes its batch from a dataloader; a loop without one (PPO) states its micro-batch size (`prepare`).
  Gradient clipping is DeepSpeed's own (the config's `gradient_clipping`, set from the stage's max norm).
- ZeRO-3 partitions parameters: `generate` and calls to a prepared model's children need them gathered (`gathered`);
  frozen models become DeepSpeed inference engines (TRL's `prepare_deepspeed`), the whole weights come from
  `accelerator.get_state_dict` (which needs `stage3_gather_16bit_weights_on_model_save`, set here).
- FSDP2 gathers a unit's parameters in its forward hooks: a call that bypasses the root's forward (a child's
  forward, `generate` on a submodule) would see the root's shards, so `gathered` unshards every unit of the model
  and keeps them whole until the context ends. Frozen models are sharded with accelerate's own FSDP2 preparation
  (which also spreads rank 0's weights under `fsdp_cpu_ram_efficient_loading`).
- A launch that would silently run N single-process copies (accelerate launched N processes, each of which sees one)
  or an engine a stage cannot use stops with exit code 2 before any model loads (`check_launch`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path

import torch

from hfgen import tracking
from hfgen.errors import UserError

FINGERPRINT_ENV = "HFGEN_WEIGHTS_FINGERPRINT"  # tests set it to 1: each rank writes a hash of its full weights
# The stages whose processes transformers' TrainingArguments sets up (its Trainer, TRL's trainers): under DeepSpeed on
# CPUs they need the recipe key `ddp_backend: gloo`, accelerate knowing no backend for DeepSpeed's CPU accelerator
TRAINER_STAGES = ("pretrain", "sft", "reward", "dpo", "kto", "orpo", "simpo", "grpo", "rloo")


# ---- the launch -------------------------------------------------------------------------------------


def launched_engine() -> str:
    """The engine `accelerate launch` asked for, from its environment: ddp, fsdp1, fsdp2, zero1, zero2 or zero3
    ("ddp" stands for every plain data-parallel or single-process run)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "zero" + os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp" + os.environ.get("FSDP_VERSION", "1")
    return "ddp"


def engine(accelerator) -> str:
    """The engine an Accelerator runs: ddp, fsdp1, fsdp2, zero1, zero2 or zero3."""
    return _engine_of(accelerator.state)


def current_engine() -> str:
    """The engine of this process's accelerate state (a Trainer's or a stage's Accelerator), or, before there is
    one, the engine the launch asked for."""
    from accelerate.state import AcceleratorState

    return _engine_of(AcceleratorState()) if AcceleratorState._shared_state else launched_engine()


def _engine_of(state) -> str:
    from accelerate.utils import DistributedType

    if state.distributed_type == DistributedType.DEEPSPEED:
        return f"zero{state.deepspeed_plugin.zero_stage}"
    if state.distributed_type == DistributedType.FSDP:
        return f"fsdp{state.fsdp_plugin.fsdp_version}"
    return "ddp"


def check_launch(refused: dict[str, str] | None = None) -> None:
    """Stop (exit code 2) a launch that cannot do what was asked, before any model loads: processes that would each
    train alone (`accelerate launch` started WORLD_SIZE processes but accelerate sees one, e.g. CPU processes without
    ACCELERATE_USE_CPU), DeepSpeed asked for with ACCELERATE_USE_CPU, or an engine the stage refuses (`refused`:
    engine -> why)."""
    from accelerate.utils import parse_flag_from_env

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    asked = launched_engine()
    if asked.startswith("zero") and parse_flag_from_env("ACCELERATE_USE_CPU"):
        raise UserError(deepspeed_on_cpu_flag_problem())
    if world_size > 1:
        from accelerate import PartialState

        # Created as Accelerator and TrainingArguments would (this state is shared with theirs). accelerate knows no
        # process-group backend for DeepSpeed's CPU accelerator and would run each process alone: gloo is named.
        deepspeed_on_cpu = asked.startswith("zero") and os.environ.get("DS_ACCELERATOR") == "cpu"
        state = PartialState(
            cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **({"backend": "gloo"} if deepspeed_on_cpu else {})
        )
        if state.num_processes == 1:
            raise UserError(
                f"{world_size} processes were launched (WORLD_SIZE={world_size}) but accelerate sees 1 in each: every "
                "process would train alone, writing the same output. On a machine without GPUs set "
                "ACCELERATE_USE_CPU=true in the environment for DDP (`use_cpu: true` in the launch config is not enough); for "
                "DeepSpeed set "
                "DS_ACCELERATOR=cpu (without ACCELERATE_USE_CPU) and, for the Trainer-based stages "
                f"({', '.join(TRAINER_STAGES)}; the rlhf pipeline's steps among them), the recipe key "
                "`ddp_backend: gloo`. On GPUs check that torch sees them."
            )
    if refused and asked in refused:
        raise UserError(f"this stage cannot run under {asked}: {refused[asked]}")


def deepspeed_on_cpu_flag_problem() -> str:
    return (
        "the launch asked for DeepSpeed but ACCELERATE_USE_CPU=true is set, which turns accelerate's engine into plain "
        "data parallelism half way (the Trainer-based stages crashed after the model loaded, ppo/vae/t2i refused it): "
        "unset ACCELERATE_USE_CPU for DeepSpeed (on CPUs: DS_ACCELERATOR=cpu, see README 'Trying a preset on a CPU'), "
        "or launch plain DDP (recipes/accelerate/cpu_2proc.yaml) with it"
    )


def use_cpu_problem() -> str:
    return (
        f"the launch asked for {launched_engine()} but `use_cpu: true` (or ACCELERATE_USE_CPU) turns every engine into "
        "plain data parallelism: set use_cpu: false in the recipe (DeepSpeed on CPU: DS_ACCELERATOR=cpu)"
    )


def make_accelerator(
    output_dir: str | Path,
    seed: int,
    gradient_accumulation_steps: int = 1,
    mixed_precision: str = "no",
    cpu: bool = False,
    log_with: list[str] | None = None,
    refused: dict[str, str] | None = None,
):
    """An Accelerator with a seeded data order (a resumed run sees the batches it would have) and everything seeded
    with `seed` (the same initialisation on every process), after `check_launch`; an engine in `refused` (or FSDP1:
    these loops call their models' parts directly, which FSDP2's unshard supports) stops the run."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    refused = {"fsdp1": "set fsdp_version: 2 in the launch config (FSDP2)", **(refused or {})}
    # accelerate's state is one per process, and an earlier run in it (a sweep's previous point, a notebook's last
    # command) left its own: another mixed precision ended in accelerate's "AcceleratorState has already been
    # initialized". Started afresh in one process, as TrainingArguments starts the Trainer stages'; a launch's
    # processes keep the state their process group was set up with (set up again, DeepSpeed's CPU processes lost
    # check_launch's gloo backend, or waited on each other)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    check_launch(refused)
    if cpu and launched_engine().startswith("zero"):  # accelerate's DeepSpeed set-up fails half-way on cpu=True
        raise UserError(use_cpu_problem())
    # Accelerator (and its DeepSpeed plugin) take this variable over the argument; these loops count their own
    # micro-steps, so another value left the optimizer steps skipped: the run ended having barely trained
    launched = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if launched is not None and launched.strip() != str(gradient_accumulation_steps):
        raise UserError(
            f"the launch asks for gradient accumulation over {launched} micro-batches "
            f"(ACCELERATE_GRADIENT_ACCUMULATION_STEPS={launched}: `accelerate launch --gradient_accumulation_steps "
            f"{launched}` with DeepSpeed, or the environment) but the recipe has gradient_accumulation_steps: "
            f"{gradient_accumulation_steps}; the recipe decides: set gradient_accumulation_steps: {launched} in it, "
            "or launch without the variable"
        )
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        cpu=cpu,
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
    )
    resolved = engine(accelerator)  # as accelerate resolved it, which may differ from what the launch asked
    if resolved in refused:
        raise UserError(f"this stage cannot run under {resolved}: {refused[resolved]}")
    if resolved == "ddp" and launched_engine() != "ddp":
        raise UserError(use_cpu_problem())
    set_seed(seed)
    return accelerator


# ---- optimizer, schedule, prepare -------------------------------------------------------------------


def adamw(
    parameter_groups, lr: float, betas: tuple[float, float], weight_decay: float, eps: float, fused: bool = False
):
    """AdamW over `parameter_groups` (lists of parameters, or dicts with their own lr). `fused`: torch's one-kernel
    AdamW (transformers' default optimizer, `adamw_torch_fused`): the same update to within float rounding, several
    times faster than the per-parameter loop on CPU."""
    groups = [g if isinstance(g, dict) else {"params": list(g)} for g in parameter_groups]
    for group in groups:
        group.setdefault("lr", lr)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, fused=fused or None)


def lr_schedule(accelerator, name: str, optimizer, warmup_steps: int, total_steps: int, starts: list | None = None):
    """A transformers schedule stepped once per optimizer step by the loop itself (not through `prepare`, which
    would step it once per process) and saved in checkpoints. `starts`: per parameter group, the optimizer steps
    before its own schedule begins (rate 0 until then, then the whole schedule, warm-up included, over the steps
    left): PPO's policy, frozen during the critic warm-up, whose warm-up a shared schedule would spend meanwhile."""
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import get_scheduler

    if not any(starts or []):
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    else:

        def multiplier(start: int):
            unused = torch.optim.SGD([torch.zeros(1)], lr=1.0)  # (transformers builds a schedule around an optimizer)
            scheduled = get_scheduler(
                name, unused, num_warmup_steps=warmup_steps, num_training_steps=total_steps - start
            )
            return lambda step: scheduled.lr_lambdas[0](step - start) if step >= start else 0.0

        scheduler = LambdaLR(optimizer, [multiplier(start) for start in starts])
    accelerator.register_for_checkpointing(scheduler)
    return scheduler


def prepare(accelerator, *objects, micro_batch_size: int, max_grad_norm: float):
    """`accelerator.prepare(*objects)` (models, optimizer, dataloaders) under any engine -> the prepared objects.
    DeepSpeed is told the micro-batch size (a loop without a dataloader has no other way to tell it), clips
    gradients itself at `max_grad_norm`, and under ZeRO-3 gathers whole weights for `full_state_dict`."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        config = plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
        config["train_batch_size"] = (
            micro_batch_size * accelerator.gradient_accumulation_steps * accelerator.num_processes
        )
        config["gradient_clipping"] = max_grad_norm or 0.0
        config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
    return accelerator.prepare(*objects)


def prepare_frozen(accelerator, model):
    """A frozen (no-grad, eval) model placed for the engine: a DeepSpeed inference engine under ZeRO-3 (its
    parameters were partitioned at load), an FSDP2 module under FSDP2, else the model on the device. It is not
    registered with the accelerator: checkpoints hold what trains."""
    if model is None:
        return None
    model.eval().requires_grad_(False)
    name = engine(accelerator)
    if name == "zero3":
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, accelerator)
    if name == "fsdp2":
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model)
    return model.to(accelerator.device)


def replicated(accelerator, model):
    """A frozen model kept whole on every process rather than sharded, for models only some processes call (a
    pipeline rendering on the main process). Under FSDP's `fsdp_cpu_ram_efficient_loading` transformers loaded the
    weights on the first process only: they are broadcast from it."""
    model.eval().requires_grad_(False)
    efficient = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() in ("1", "true")
    if engine(accelerator).startswith("fsdp") and efficient and accelerator.num_processes > 1:
        import torch.distributed as dist

        if any(p.is_meta for p in model.parameters()):
            model.to_empty(device=accelerator.device)
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
    return model.to(accelerator.device)


@contextlib.contextmanager
def gathered(accelerator, *models):
    """Full weights of prepared models (trained or frozen) for passes that do not go through their root forward:
    `generate`, a child model's forward, an adapter switched off. Yields the unwrapped models, in order. Under
    ZeRO-3 the parameters are gathered (DeepSpeed's fetch hooks off meanwhile, as TRL does); under FSDP2 every
    unit is unsharded and stays so until the end (so uneven work across ranks cannot hang a collective)."""
    name = engine(accelerator)
    with contextlib.ExitStack() as stack:
        for model in models:
            if model is None:
                continue
            if name == "zero3":
                import deepspeed
                from trl.models.utils import add_hooks, remove_hooks

                stack.enter_context(deepspeed.zero.GatheredParameters(list(model.parameters())))
                remove_hooks(model)
                stack.callback(add_hooks, model)
            elif name == "fsdp2":
                stack.enter_context(_unsharded(model))
        yield [None if m is None else accelerator.unwrap_model(m) for m in models]


@contextlib.contextmanager
def computing_as_prepared(accelerator, *models):
    """Within it, `models` that `accelerator` has not prepared (a Trainer's model before `train()`, a starting model
    loaded for a comparison) compute as a model it prepared does: under native mixed precision `prepare_model`
    replaces the forward by one under the half dtype's autocast whose outputs are cast to float32, and
    `unwrap_model` keeps it (`gathered`). A figure measured before training on the plain model and after it on the
    prepared one otherwise compares float32 with bfloat16 compute (DPO at learning rate 0: accuracy 0.375 and its
    chosen log-probs "fell"; SFT's response loss 1.417 -> 1.418), and a starting model compared with the trained
    one differs from it at learning rate 0. Models already prepared (or None), runs without mixed precision and
    FSDP2 (whose mixed precision is its sharding policy, not a forward wrapper) are left as they are."""
    from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager

    patched = []
    try:
        if accelerator.native_amp and not accelerator.is_fsdp2:
            for model in models:
                if model is None or "_original_forward" in vars(model):  # prepared: accelerate's forward already
                    continue
                autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
                patched.append((model, vars(model).get("forward")))
                model.forward = convert_outputs_to_fp32(autocast(model.forward))
        yield
    finally:
        for model, own_forward in reversed(patched):
            if own_forward is None:
                del model.forward  # the class's forward again
            else:
                model.forward = own_forward


@contextlib.contextmanager
def _unsharded(model):
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]  # the root first
    if units:  # FSDP takes the first unit to run forward as the root: a child's forward must not come first
        units[0]._get_fsdp_state()._lazy_init()
    resharding = [_reshards_after_forward(unit) for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)  # its forward hook would reshard after each call
        unit.unshard()
    try:
        yield
    finally:
        for unit, reshard in zip(units, resharding):
            unit.reshard()
            unit.set_reshard_after_forward(reshard, recurse=False)


def _reshards_after_forward(unit) -> bool:
    group = unit._get_fsdp_state()._fsdp_param_group  # FSDP2 exposes a setter for this, not a getter
    return group is not None and group.post_forward_mesh_info is not None


def clip_gradients(accelerator, models, max_norm: float) -> None:
    """Clip the gradients of a prepared model (or a list of them) on optimizer steps, through the engine: FSDP2
    clips its sharded gradients, DeepSpeed clips in its own step (see `prepare`)."""
    if accelerator.sync_gradients and max_norm:
        models = models if isinstance(models, (list, tuple)) else [models]
        accelerator.clip_grad_norm_([p for model in models for p in model.parameters()], max_norm)


def backward_and_step(accelerator, models, optimizer, loss, max_grad_norm: float, next_step: int, divergence) -> None:
    """One micro-batch's backward and the optimizer step it completes (a step on accumulation micro-steps is the
    engine's no-op): gradients clipped through the engine, then, on real steps, the `step` kill point (tests) and
    `divergence` (a `guard.Divergence`) checking the loss before the weights change."""
    from hfgen import guard

    accelerator.backward(loss)
    clip_gradients(accelerator, models, max_grad_norm)
    if accelerator.sync_gradients:
        guard.kill_point("step", next_step)
        divergence.check_step(next_step, loss, optimizer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def repeated_rows(dataloader) -> int:
    """How many rows of an epoch a prepared training dataloader trains twice: on N processes accelerate gives every
    process the same number of full batches (`even_batches`), completing the last ones with copies of the epoch's
    first rows when the rows do not fill whole batches of processes x per-device batch (one process: none, the
    last batch is short)."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    shard = getattr(dataloader, "batch_sampler", None)
    if not isinstance(shard, BatchSamplerShard) or shard.split_batches or not shard.even_batches or shard.drop_last:
        return 0
    if type(shard.batch_sampler) is not BatchSampler:  # batches of their own making (buckets) may be short
        return 0
    try:
        rows = len(shard.batch_sampler.sampler)  # GRPO's sampler repeats each prompt: it counts the repeats
    except TypeError:  # an iterable dataset has no length
        return 0
    return max(0, len(shard) * shard.batch_size * shard.num_processes - rows)


def note_repeated_rows(dataloader, output_dir: str | Path) -> None:
    """Say (main process) and record in data.json (`train_rows_repeated_per_epoch`) how many rows each epoch trains
    twice (`repeated_rows`): they count in the steps and the trained tokens, not in data.json's rows_kept."""
    repeated = repeated_rows(dataloader)
    if not repeated or not tracking.is_main_process():
        return
    shard = dataloader.batch_sampler
    rows = len(shard) * shard.batch_size * shard.num_processes - repeated
    # the copies cycle through the rows from the first: with fewer rows than copies, rows train 3 or more times
    most = 1 + math.ceil(repeated / rows)
    how_often = "twice" if most == 2 else f"up to {most} times"
    print(
        f"hfgen: the {rows} training rows of an epoch do not fill whole batches of {shard.num_processes} processes x "
        f"{shard.batch_size}: accelerate completes each epoch's last batches with {repeated} copies of its first "
        f"rows, which train {how_often} per epoch (and count in train_tokens); data.json records it as "
        "train_rows_repeated_per_epoch",
        file=sys.stderr,
    )
    path = Path(output_dir) / "data.json"
    tracking.write_json(path, {**tracking.read_json(path, {}), "train_rows_repeated_per_epoch": repeated})


# ---- whole weights ----------------------------------------------------------------------------------


def full_state_dict(accelerator, model) -> dict:
    """The whole state dict of a prepared model (gathered under ZeRO-3, from every shard under FSDP2), on the main
    process (others may get an empty or partial dict): what `save_pretrained(..., state_dict=...)` writes. Every
    process must call it."""
    return tied_as_in(accelerator.unwrap_model(model), accelerator.get_state_dict(model))


def tied_as_in(module, state: dict) -> dict:
    """`state` (a whole state dict of `module`) with the names of one parameter of `module` sharing one tensor.
    Tied weights (a causal LM's embeddings and LM head) are one parameter under two names; ZeRO-2 (a clone per name)
    and FSDP2 (a gathered copy per name) give each name a tensor of its own, which save_pretrained cannot tell from
    two weights and writes twice. Shared again, they are saved once, as under DDP. ZeRO-3's gathered state dict
    (which holds each parameter once) and the other processes' empty ones are left as they are."""
    if not state or any(hasattr(p, "ds_tensor") for p in module.parameters()):
        return state
    names = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    for first, *aliases in names.values():
        for alias in aliases:
            if first in state and alias in state:
                state[alias] = state[first]
    return state


def whole_on_main(accelerator, model, empty):
    """The prepared `model` with whole weights on the main process (None on the others), for saving and rendering
    there: the unwrapped model itself where every process holds whole weights (DDP, ZeRO-1/2), else `empty()` (the
    same architecture, built on the main process) loaded from `full_state_dict`: FSDP2's unsharded parameters live in
    its gather buffers, which safetensors cannot save. Every process must call it."""
    if engine(accelerator) not in ("fsdp2", "zero3"):
        return accelerator.unwrap_model(model) if accelerator.is_main_process else None
    state = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return None
    whole = empty()
    whole.load_state_dict(state)
    return whole.to(accelerator.device)


def part(state: dict, prefix: str) -> dict:
    """The entries of `state` under `prefix.` with the prefix removed (a child model's own state dict)."""
    return {name[len(prefix) + 1 :]: tensor for name, tensor in state.items() if name.startswith(prefix + ".")}


def maybe_write_fingerprint(accelerator, model, output_dir: str | Path) -> None:
    """Only when a test asks (HFGEN_WEIGHTS_FINGERPRINT=1): each rank writes a hash of the model's full weights
    (gathered under ZeRO-3, whole tensors under FSDP2), so a test can check that all ranks end identical. Never in a
    user's run: it copies every weight to CPU. Every process must call it."""
    if os.environ.get(FINGERPRINT_ENV) != "1":
        return
    module = accelerator.unwrap_model(model)
    if engine(accelerator) == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            state = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    else:
        state = {name: _full(tensor) for name, tensor in module.state_dict().items()}
    tracking.write_weights_fingerprint(state, output_dir)


def _full(tensor):
    full_tensor = getattr(tensor, "full_tensor", None)  # an FSDP2 DTensor: gathered from every shard
    return full_tensor() if full_tensor is not None else tensor


# ---- the part of a weight each process holds ----------------------------------------------------------


def local_shard(parameter):
    """The part of a prepared model's parameter this process holds, as a plain tensor sharing its storage (writing
    it writes the weight): the ZeRO-3 partition (the parameter itself is empty between passes), an FSDP2 DTensor's
    local shard, else the whole tensor. State kept per weight (an EMA, snapshots) kept this way costs no
    communication per step under any engine."""
    if hasattr(parameter, "ds_tensor"):
        return parameter.ds_tensor.data
    to_local = getattr(parameter, "to_local", None)
    return (to_local() if to_local is not None else parameter).detach()


def whole_from_shard(parameter, shard):
    """The whole tensor of which `shard` is this process's part, laid out as `parameter`'s `local_shard`. Every
    process must call it, for the same parameters in the same order."""
    if hasattr(parameter, "ds_tensor"):  # ZeRO-3: equal flat partitions, the last one padded
        import torch.distributed as dist

        group = getattr(parameter, "ds_process_group", None)
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts)[: parameter.ds_numel].view(parameter.ds_shape)
    if hasattr(parameter, "device_mesh"):  # FSDP2
        from torch.distributed.tensor import DTensor

        distributed = DTensor.from_local(
            shard.to(parameter.device), parameter.device_mesh, parameter.placements, shape=parameter.shape,
            stride=parameter.stride(),
        )  # fmt: skip
        return distributed.full_tensor().to(shard.device)
    return shard


def shard_of(parameter, whole):
    """This process's part of `whole`, a tensor shaped like `parameter` (the inverse of `whole_from_shard`; no
    communication)."""
    if hasattr(parameter, "ds_tensor"):
        import torch.distributed as dist

        group = getattr(parameter, "ds_process_group", None)
        size = parameter.ds_tensor.numel()
        flat = torch.nn.functional.pad(whole.reshape(-1), (0, size * dist.get_world_size(group) - whole.numel()))
        return flat.narrow(0, dist.get_rank(group) * size, size)
    if hasattr(parameter, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        distributed = distribute_tensor(
            whole.to(parameter.device), parameter.device_mesh, parameter.placements, src_data_rank=None
        )
        return distributed.to_local().to(whole.device)
    return whole


# ---- checkpoints, resume, metrics -------------------------------------------------------------------


def resume(
    accelerator, resume_from_checkpoint, output_dir: str | Path, budget: tuple[int, str], load_extra=None
) -> int:
    """Load the checkpoint `resume_from_checkpoint` names (a dir, or true for the newest) -> its step (0: none).
    Everything registered with the accelerator comes back: models, optimizer, schedule, RNGs, registered objects;
    `load_extra(path)` reads what `save_checkpoint`'s `save_extra` wrote. A checkpoint of another recipe or launch
    is refused (`tracking.check_same_run`), and so is one past the run's `budget` (its steps, and the keys that set
    them as the refusal names them: `tracking.check_budget_reaches`)."""
    path = tracking.resolve_resume(resume_from_checkpoint, output_dir)
    if path is not None:
        tracking.check_budget_reaches(path, tracking.checkpoint_step(path), *budget)
    tracking.start_metrics(output_dir, path)  # metrics.jsonl as it was at that checkpoint (none on a fresh start)
    if path is None:
        return 0
    step = tracking.load_checkpoint(accelerator, path)
    if load_extra is not None:
        load_extra(path)
    accelerator.print(f"resumed from {path} at step {step}")
    return step


def save_checkpoint(accelerator, output_dir: str | Path, step: int, total_limit: int | None, save_extra=None) -> Path:
    """A resumable checkpoint-STEP (rotated to `total_limit`), with the run's recipe beside it, marked complete last;
    `save_extra(path)`: see `tracking.save_checkpoint`."""
    recipe = Path(output_dir) / "recipe.yaml"
    return tracking.save_checkpoint(
        accelerator,
        output_dir,
        step,
        total_limit,
        recipe.read_text(encoding="utf-8") if recipe.is_file() else None,
        save_extra,
    )
