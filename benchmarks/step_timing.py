"""The one timing loop the benchmarks share: the fastest of N training steps after a warm-up step."""

from __future__ import annotations

import time
from typing import Callable


def fastest_rate(step: Callable[[], None], batch: int, steps: int, synchronize: Callable[[], None] = lambda: None) -> float:
    """Samples/s of the fastest of `steps` calls of `step` (one training step on `batch` samples).
    The first call is not timed: it pays for allocations (and CUDA autotuning). The fastest rather
    than the mean, because on a shared machine other work only ever slows a step down.
    `synchronize` waits for queued device work (torch.cuda.synchronize) around each timed step."""
    times = []
    for i in range(steps + 1):
        synchronize()
        t0 = time.perf_counter()
        step()
        synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return batch / min(times)
