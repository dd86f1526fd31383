"""The `hfgen` console script itself (pyproject's [project.scripts] entry), not only `python -m hfgen.cli`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

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
    assert keys.returncode == 0 and {"stop_on_hacking", "missing_eos_penalty", "kl_coef"} <= set(keys.stdout.split())
    missing = hfgen("eval", tmp_path / "nothing_here")
    assert missing.returncode == 2 and "nothing_here" in missing.stderr and "Traceback" not in missing.stderr
