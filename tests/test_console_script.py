"""The `hfgen` console script itself (pyproject's [project.scripts] entry), not only `python -m hfgen.cli`."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from hfgen.stages.ppo import PPOConfig

SCRIPT = Path(sys.executable).parent / "hfgen"


@pytest.mark.skipif(not SCRIPT.is_file(), reason="the package is not installed in this environment (pip install -e .)")
def test_console_script_runs_the_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}

    def hfgen(*args):
        return subprocess.run(
            [str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True, text=True, env=env, timeout=300
        )

    result = hfgen("--help")
    assert result.returncode == 0 and "train" in result.stdout and "eval" in result.stdout
    keys = hfgen("train", REPO / "recipes/tiny/ppo.yaml", "--list-keys")
    assert keys.returncode == 0
    # each key a recipe line with its default and what it does (README sends the monitor's thresholds here:
    # --list-keys printed bare names, probe 42 D2)
    listed = {}
    for line in keys.stdout.splitlines():
        value, _, text = line.partition("  # ")
        listed.update({key: (default, text) for key, default in yaml.safe_load(value).items()})
    assert {"stop_on_hacking", "missing_eos_penalty", "kl_coef"} <= set(listed)
    fields = {f.name: f for f in dataclasses.fields(PPOConfig)}
    for key in ("kl_coef", "monitor_patience", "monitor_kl_growth", "stop_on_hacking", "response_length"):
        assert listed[key][0] == fields[key].default and listed[key][1], (key, listed[key])
    missing = hfgen("eval", tmp_path / "nothing_here")
    assert missing.returncode == 2 and "nothing_here" in missing.stderr and "Traceback" not in missing.stderr
