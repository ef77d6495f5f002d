"""Where a sweep's jobs run: :class:`Slot` (a GPU or a CPU worker), :func:`visible_gpus`, :func:`make_slots`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import B4MError


@dataclass
class Slot:
    """Where a job runs: a GPU (``gpu`` = its CUDA index) or a CPU worker (``gpu`` None)."""

    name: str
    gpu: str | None = None
    threads: int | None = None  # OMP_NUM_THREADS for CPU workers

    def env(self) -> dict[str, str]:
        if self.gpu is not None:
            return {"CUDA_VISIBLE_DEVICES": self.gpu}
        return {"OMP_NUM_THREADS": str(self.threads)} if self.threads and "OMP_NUM_THREADS" not in os.environ else {}


def visible_gpus() -> list[str]:
    """The CUDA indices this process may use (``CUDA_VISIBLE_DEVICES`` if set, else every GPU torch sees)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def make_slots(
    workers: int | None = None, gpus: str | Sequence[str] | None = None, jobs_per_gpu: int = 1
) -> list[Slot]:
    """One slot per GPU (``jobs_per_gpu`` each; ``workers`` caps the number), or ``workers`` CPU slots (default 1)
    when there is no GPU; CPU slots split the cores' threads between them."""
    if workers is not None and workers < 1:
        raise B4MError(f"workers must be at least 1, got {workers}")
    if jobs_per_gpu < 1:
        raise B4MError(f"jobs per GPU must be at least 1, got {jobs_per_gpu}")
    ids = [g.strip() for g in gpus.split(",") if g.strip()] if isinstance(gpus, str) else list(gpus or [])
    ids = ids or (visible_gpus() if gpus is None else [])
    if ids:
        slots = [Slot(f"gpu{g}" + (f".{k}" if jobs_per_gpu > 1 else ""), g) for k in range(jobs_per_gpu) for g in ids]
        return slots[: workers or len(slots)]
    n = workers or 1
    threads = max(1, (os.cpu_count() or 1) // n)
    return [Slot(f"cpu{i}", None, threads) for i in range(n)]
