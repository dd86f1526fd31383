"""`hfgen.rl.policy_weights.PolicySnapshots`: the recent policies stop_on_hacking may keep, through a checkpoint."""

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hfgen.rl.policy_weights import PolicySnapshots


def policy_at(value: float) -> torch.nn.Module:
    policy = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in policy.parameters():
            p.fill_(value)
    policy.bias.requires_grad_(False)  # frozen: not a trained weight, never copied
    return policy


def test_snapshots_saved_in_a_checkpoint_come_back_and_restore_the_same_average(tmp_path):
    snapshots = PolicySnapshots()
    for step in (1, 2, 3):
        snapshots.take(step, policy_at(float(step)), oldest=2)  # step 1's copy is dropped when step 3's is taken
    snapshots.save(tmp_path)
    resumed = PolicySnapshots()
    resumed.load(tmp_path)
    assert sorted(resumed.copies) == [2, 3] and set(resumed.copies[2]) == {"weight"}
    policy = policy_at(0.0)
    assert resumed.restore(policy, [2, 3]) == [2, 3]
    torch.testing.assert_close(policy.weight, torch.full((2, 3), 2.5))
    assert torch.equal(policy.bias, torch.zeros(2))


def test_snapshots_of_another_process_layout_are_dropped_with_a_warning(tmp_path, capsys):
    snapshots = PolicySnapshots()
    snapshots.take(4, policy_at(4.0), oldest=1)
    snapshots.save(tmp_path)
    path = tmp_path / PolicySnapshots.FOLDER / "process-0.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors, layout = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
    save_file(tensors, str(path), metadata=layout | {"num_processes": "8"})  # written by an 8-process run
    resumed = PolicySnapshots()
    resumed.load(tmp_path)
    assert resumed.copies == {} and "not used" in capsys.readouterr().out
    # a checkpoint without snapshots (written without stop_on_hacking) leaves none either
    resumed.load(tmp_path / "elsewhere")
    assert resumed.copies == {}
