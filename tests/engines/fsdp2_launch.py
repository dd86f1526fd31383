"""Test setup, never used by a user's run: imported by `run_recipes.py --fsdp2`, it puts hfgen's training entry (the
code users run, Trainer-based stages included) on accelerate's FSDP2 branch on CPU processes.

accelerate maps any CPU run to DDP (MULTI_CPU), even with --use_fsdp. On CPU, torch's `fully_shard` works on gloo,
so right after each Accelerator is created its state is switched onto the FSDP branch with an FSDP2 plugin: from
there `prepare`, backward, clipping, `get_state_dict` and saving run accelerate's real FSDP2 code. Its state_dict_type
is FSDP_STATE_DICT_TYPE's, as a launch config's `fsdp_state_dict_type` sets it (FULL_STATE_DICT when unset), and its
cpu_ram_efficient_loading FSDP_CPU_RAM_EFFICIENT_LOADING's (`fsdp_cpu_ram_efficient_loading`, which also has
transformers load the weights on the first process alone).
"""

import os

from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_create = Accelerator.__init__


def _create_on_fsdp2(self, *args, **kwargs):
    _create(self, *args, **kwargs)
    PartialState().distributed_type = DistributedType.FSDP
    self.state.distributed_type = DistributedType.FSDP
    # A new plugin for every Accelerator (several stages run in one process): accelerate records the first model's
    # layer class in the plugin it wraps with.
    efficient_loading = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true"
    self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        state_dict_type=os.environ.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT"),
        cpu_ram_efficient_loading=efficient_loading,
    )  # fmt: skip


Accelerator.__init__ = _create_on_fsdp2
