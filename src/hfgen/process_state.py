"""What a command or a run changes for the whole process, put back after it: hfgen is also called from one Python
process several times (a notebook, a driver script, and `hfgen sweep`'s own points), where the next run, and the
caller, should find the process as a new one would.

The libraries set such state: transformers' Trainer, for `full_determinism`, makes torch deterministic-only and sets
CUDA_LAUNCH_BLOCKING and other variables (on a GPU every later run in the process, and every process it starts, ran
with synchronous kernels); its TrainingArguments set TF32 for `tf32` when a recipe is parsed; `--quiet` turns
transformers' and datasets' progress bars off.
"""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def kept():
    """Within the block, anything; after it, the environment variables, torch's deterministic-algorithm and cuDNN
    flags and the libraries' progress bars as they were before it (torch first imported inside the block: its
    defaults, not deterministic; the bars of a library first imported inside it stay as the block left them)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a launch's processes end with it, and what torch.distributed
        yield  # and DeepSpeed set in them for the process group (its variables) is for their later runs too
        return
    environ = dict(os.environ)
    torch_flags = _torch_flags() if "torch" in sys.modules else None
    precision = fp32_precision()
    bars = _progress_bars()
    try:
        yield
    finally:
        for name in set(os.environ) - set(environ):
            del os.environ[name]
        os.environ.update({name: value for name, value in environ.items() if os.environ.get(name) != value})
        if "torch" in sys.modules:
            _set_torch_flags(torch_flags or (False, False, False, False))
            set_fp32_precision(precision or "ieee")  # (torch's default)
        _set_progress_bars(bars)


def fp32_precision() -> str | None:
    """torch's float32 matmul precision ('ieee', or 'tf32' on GPUs that have it: transformers' `tf32` sets it through
    `enable_tf32`), None before torch is imported (or a torch without the setting)."""
    if "torch" not in sys.modules:
        return None
    import torch

    return getattr(torch.backends, "fp32_precision", None)


def set_fp32_precision(precision: str | None) -> None:
    import torch

    if precision is not None and hasattr(torch.backends, "fp32_precision") and fp32_precision() != precision:
        torch.backends.fp32_precision = precision


def _torch_flags() -> tuple[bool, bool, bool, bool]:
    import torch

    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )


def _set_torch_flags(flags: tuple[bool, bool, bool, bool]) -> None:
    import torch

    if _torch_flags() == flags:
        return
    deterministic, warn_only, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _progress_bars() -> dict[str, bool]:
    """Whether transformers' and datasets' bars are on, for those imported."""
    bars = {}
    if "transformers" in sys.modules:
        import transformers

        bars["transformers"] = transformers.utils.logging.is_progress_bar_enabled()
    if "datasets" in sys.modules:
        import datasets

        bars["datasets"] = datasets.is_progress_bar_enabled()
    return bars


def _set_progress_bars(bars: dict[str, bool]) -> None:
    if "transformers" in bars:
        import transformers

        logging = transformers.utils.logging
        (logging.enable_progress_bar if bars["transformers"] else logging.disable_progress_bar)()
    if "datasets" in bars:
        import datasets

        (datasets.enable_progress_bars if bars["datasets"] else datasets.disable_progress_bars)()


@contextlib.contextmanager
def environment_variables(values: dict[str, str]):
    """`values` set in os.environ for the block, and the caller's environment as it was after it."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
