"""The policy's trained weights (its LoRA adapters with use_peft): CPU snapshots (kept by `stop_on_hacking` to
restore an earlier policy) and the EMA copy saved beside the policy. Both hold each process's part of each weight
(`loop.local_shard`), so they cost no communication per step and are right under FSDP2 and ZeRO-3, where a
parameter outside a forward pass is a shard (or empty)."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import PartialState
from safetensors import safe_open
from safetensors.torch import save_file

from hfgen import loop
from hfgen.rl.functional import ExponentialMovingAverage


def trained_policy_parameters(policy):
    """(name, parameter) of the policy's trained weights (its LoRA adapters with use_peft)."""
    return [(name, p) for name, p in policy.named_parameters() if p.requires_grad]


def policy_weights(policy) -> dict[str, torch.Tensor]:
    """A CPU copy of this process's part of the policy's trained weights."""
    return {name: loop.local_shard(p).to("cpu", copy=True) for name, p in trained_policy_parameters(policy)}


def average_policy_weights(copies: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of several `policy_weights` copies (in float32, returned in the copies' dtype): with LoRA the
    adapters' A and B are averaged separately, whose product is close to the average product for the nearby
    policies of consecutive steps."""
    return {
        name: (sum(copy[name].float() for copy in copies) / len(copies)).to(copies[0][name].dtype) for name in copies[0]
    }


@torch.no_grad()
def load_policy_weights(policy, weights: dict[str, torch.Tensor]) -> None:
    """Write back a `policy_weights` copy taken by this process."""
    for name, p in trained_policy_parameters(policy):
        loop.local_shard(p).copy_(weights[name])


class PolicySnapshots:
    """`policy_weights` copies of the policies of recent steps, for `stop_on_hacking` to put back the average of those
    from before an alert's onset (`HackingMonitor.kept_steps`); the PPO loop and the TRL stages' callback share it.
    The policy of step K is the one that sampled step K: the weights before K's update. The copies go into every
    checkpoint (`save`, `load`), so a run resumed after a kill keeps the policy the uninterrupted run keeps: an alert
    a few steps after the resume may keep policies of steps before it."""

    FOLDER = "policy_snapshots"

    def __init__(self):
        self.copies: dict[int, dict[str, torch.Tensor]] = {}

    def take(self, step: int, policy, oldest: int) -> None:
        """Copy `policy` as step `step`'s, dropping the copies of steps before `oldest` (no alert can keep them)."""
        self.copies = {s: copy for s, copy in self.copies.items() if s >= oldest}
        self.copies[step] = policy_weights(policy)

    def restore(self, policy, steps: list[int]) -> list[int]:
        """Load into `policy` the average of the copies of `steps` (those there are: a resume from a checkpoint
        without them, or written under another layout, lacks the older ones; with none of them, the oldest copy)
        -> the steps averaged (none, and `policy` unchanged, when there is no copy)."""
        if not self.copies:
            return []
        kept = [s for s in steps if s in self.copies] or [min(self.copies)]
        load_policy_weights(policy, average_policy_weights([self.copies[s] for s in kept]))
        return kept

    def save(self, checkpoint: str | Path) -> None:
        """Write this process's copies into `checkpoint` (policy_snapshots/process-I.safetensors). Every process
        writes its own: under FSDP2 and ZeRO-3 each holds other shards (no communication, as when they were taken).
        They cost up to `HackingMonitor.oldest_keepable_step`'s few copies of the trained weights per checkpoint."""
        if not self.copies:
            return
        state = PartialState()
        path = self._file(checkpoint, state)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{step}/{name}": t.contiguous() for step, copy in self.copies.items() for name, t in copy.items()}
        save_file(tensors, str(path), metadata=self._layout(state))

    def load(self, checkpoint: str | Path) -> None:
        """Read back the copies `save` wrote into `checkpoint` for this process (none when it has none). Copies
        written under another number of processes or another engine hold other shards: they are dropped, with a
        warning, and the run keeps what it can (`restore`)."""
        state = PartialState()
        path = self._file(checkpoint, state)
        self.copies = {}
        if not path.is_file():
            return
        with safe_open(str(path), "pt") as f:
            if f.metadata() != self._layout(state):
                if state.is_main_process:
                    print(f"warning: {path.parent} was written under {f.metadata()}, not this run's "
                          f"{self._layout(state)}: its policy snapshots are not used; stop_on_hacking keeps the "
                          "policies of the steps this run samples")  # fmt: skip
                return
            for key in f.keys():
                step, name = key.split("/", 1)
                self.copies.setdefault(int(step), {})[name] = f.get_tensor(key)

    @classmethod
    def _file(cls, checkpoint: str | Path, state) -> Path:
        return Path(checkpoint) / cls.FOLDER / f"process-{state.process_index}.safetensors"

    @staticmethod
    def _layout(state) -> dict[str, str]:
        """What decides which shard of each weight a process holds."""
        return {"num_processes": str(state.num_processes), "distributed_type": str(state.distributed_type)}


class PolicyEMA:
    """An EMA of the policy's trained weights (DeepSpeed-Chat's actor EMA), averaged shard by shard after each
    optimiser step. Checkpointed as whole tensors (accelerate calls `state_dict` on every process and saves the main
    process's), so a resume under another engine or process count finds them."""

    def __init__(self, accelerator, policy, decay: float):
        self.accelerator, self.policy = accelerator, policy
        self.average = ExponentialMovingAverage(self._shards(), decay)

    def _shards(self):
        return [(name, loop.local_shard(p)) for name, p in trained_policy_parameters(self.policy)]

    def update(self) -> None:
        self.average.update(self._shards())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole EMA weights, on every process (a collective: every process must call it)."""
        return {
            name: loop.whole_from_shard(p, self.average.shadow[name]).cpu()
            for name, p in trained_policy_parameters(self.policy)
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, p in trained_policy_parameters(self.policy):
            self.average.shadow[name].copy_(loop.shard_of(p, state[name]))

    def save(self, trainable_state: dict | None, directory: Path) -> None:
        """Save the policy as the run saves it (full model or adapter) with its EMA weights in place of the trained
        ones: `trainable_state` is `loop.full_state_dict` of the prepared PolicyAndValue (whole on the main process,
        empty or None on others). Every process must call it."""
        averaged = self.state_dict()
        if not self.accelerator.is_main_process:
            return
        policy_state = loop.part(trainable_state, "policy")
        # A tied weight (the LM head sharing the embeddings) is one parameter under several names: each gets it.
        names = {id(p): name for name, p in trained_policy_parameters(self.policy)}
        state = dict(policy_state)
        for alias, p in self.policy.named_parameters(remove_duplicate=False):
            if id(p) in names and alias in state:
                state[alias] = averaged[names[id(p)]].to(state[alias].dtype)
        self.policy.save_pretrained(directory, state_dict=state)
