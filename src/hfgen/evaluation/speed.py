"""Speed: generation throughput and peak memory.

Throughput is measured on hfgen's own generation path (`hfgen.generate.generate_text`, the one `hfgen
generate`, the stages' samples and `hfgen eval` use) with a fixed number of new tokens
(min_new_tokens = max_new_tokens), so tokens/s does not depend on when a model happens to emit EOS.
Peak memory is CUDA's max allocated bytes on a GPU (reset with `reset_peak_memory`), and the process's
peak resident set size on CPU (which cannot be reset: it covers the whole process so far).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_time(run: Callable[[], object], repeats: int = 2, warmup: int = 1, device="cpu") -> float:
    """Shortest wall time of `repeats` calls of `run` after `warmup` untimed ones (the least disturbed run)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def generation_tokens_per_second(
    model, tokenizer, prompts: list, *, new_tokens: int = 64, chat: bool = False, repeats: int = 2,
    temperature: float = 0.8, top_p: float = 0.95,
) -> float:  # fmt: skip
    """New tokens per second generating exactly `new_tokens` tokens for each of `prompts` in one batch (fewer where
    a model's learned positions end: the tokens counted are those generated, not those asked for)."""
    from hfgen.generate import generate_tokens

    generated = []

    def run():
        completions = generate_tokens(
            model, tokenizer, prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=temperature,
            top_p=top_p, chat=chat, batch_size=len(prompts),
        )  # fmt: skip
        generated.append(sum(len(c.completion_ids) for group in completions for c in group))

    device = next(model.parameters()).device
    seconds = best_time(run, repeats, device=device)
    return generated[-1] / seconds


def reset_peak_memory(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> tuple[float, str]:
    """(megabytes, what was measured): CUDA max allocated since the last reset, or the process's peak RSS."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    # Linux: the high-water mark of this process image. ru_maxrss would carry over the parent's peak through fork and
    # exec: a sweep's or compare's child process reported the parent's training memory as its own
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10, "process_peak_rss"
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS
    return (peak / 2**20 if sys.platform == "darwin" else peak / 2**10), "process_peak_rss"
