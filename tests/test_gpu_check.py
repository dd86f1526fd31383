"""scripts/gpu_check.py is ready for a GPU machine: its dry run lists every (recipe, engine) cell, and every key its
cells override is one the recipe's stage accepts (a rename upstream breaks this test, not the check on a GPU)."""

import importlib.util
import subprocess
import sys

import pytest

from conftest import REPO
from hfgen.recipe import known_keys, read_recipe_file


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # (importing the recipe machinery takes ~20 s on a busy 2-core machine)
def test_dry_run_lists_every_cell_and_its_overrides_are_known_keys(tmp_path):
    gpu_check = load_script()
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/gpu_check.py"), "--dry-run", "--work_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    cells = result.stdout.splitlines()
    assert len(cells) == len(gpu_check.RECIPES) * len(gpu_check.ENGINES)
    assert cells[0].startswith("single")  # the PPO cells of every engine start from the single-GPU outputs
    for name, recipe in gpu_check.RECIPES.items():
        assert (REPO / recipe).is_file(), recipe
        stage = read_recipe_file(REPO / recipe)["stage"]
        command = gpu_check.command(name, "zero3", 8, 5, tmp_path, 29500)
        assert command[command.index("--config_file") + 1].endswith("deepspeed_zero3.yaml")
        keys = {arg[2:] for arg in command[command.index(str(REPO / recipe)) + 1 :] if arg.startswith("--")}
        assert keys <= set(known_keys(stage)), (name, keys - set(known_keys(stage)))
