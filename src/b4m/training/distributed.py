"""Data parallelism over processes for the training loop: ``accelerate launch -m b4m.cli content …``.

The scheme keeps a run's result that of one process, up to the order of floating-point sums:

- every rank draws the same full micro-batch (images, noise, timesteps) from the same CPU generator, exactly as one
  process does, and keeps its share of the rows of every set (:meth:`Dist.shard_rows`), so each rank's batch still
  has the main sets' rows first and the per-row gradient routing of :func:`b4m.adapter.walker.routing` holds on
  every rank;
- the per-row loss weights stay those of the whole batch, so the ranks' losses add up to the one-process loss;
- the trainable parameters' gradients (and the step's loss) are summed over ranks before the optimizer step
  (:meth:`Dist.all_reduce_grads`), so every rank takes the same step and the adapters stay identical;
- only rank 0 writes checkpoints and TensorBoard logs, samples validation images and draws progress bars; the others
  wait at a barrier.

The process group comes from accelerate's :class:`~accelerate.PartialState`, so ``accelerate launch`` and
``torchrun`` environments work (NCCL on GPUs, one GPU per process: ``cuda:LOCAL_RANK``; gloo on CPUs). With one
process :func:`current` is a no-op :class:`Dist` and accelerate is not imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import B4MError

if TYPE_CHECKING:  # torch is imported where a tensor is handled: one process checking its input never loads it
    import torch


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # the device this rank trains on (None: one process, the model decides)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        """A micro-batch is split evenly: ``batch_size`` images per set must divide among the processes."""
        if batch_size % self.world_size:
            raise B4MError(
                f"batch_size {batch_size} (images per set per micro-step) does not split over {self.world_size} "
                f"processes; use a multiple of {self.world_size} (--batch-size)"
            )

    def shard_rows(self, n_sets: int, batch_size: int) -> torch.Tensor | None:
        """Rows of a micro-batch of ``n_sets`` blocks of ``batch_size`` rows (one block per set) this rank keeps:
        the same share of every block, so the blocks' order (main sets first) is kept. None with one process."""
        if not self.enabled:
            return None
        self.check_batch(batch_size)
        import torch

        per = batch_size // self.world_size
        start = self.rank * per
        return torch.cat([torch.arange(k * batch_size + start, k * batch_size + start + per) for k in range(n_sets)])

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum ``tensors`` over the ranks, in place: one collective per dtype (the tensors packed into one buffer)."""
        if not self.enabled or not tensors:
            return
        import torch
        import torch.distributed as td

        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            td.all_reduce(flat, op=td.ReduceOp.SUM)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def all_reduce_grads(self, params: Iterable[torch.Tensor], *extra: torch.Tensor) -> None:
        """Sum the gradients of ``params`` (those that have one: the same ones on every rank, as every rank runs the
        same graph) and the ``extra`` tensors (e.g. the step's loss) over the ranks."""
        if self.enabled:
            self.all_reduce_sum([p.grad for p in params if p.grad is not None] + list(extra))

    def barrier(self) -> None:
        """Wait until every rank gets here (rank 0's writes are done)."""
        if not self.enabled:
            return
        import torch.distributed as td

        if self.device is not None and self.device.type == "cuda":
            td.barrier(device_ids=[self.device.index])
        else:
            td.barrier()


_current: Dist | None = None


def current() -> Dist:
    """The :class:`Dist` of this process, made once: from accelerate's ``PartialState`` when the environment says
    there are several processes (``WORLD_SIZE`` > 1, as ``accelerate launch`` and ``torchrun`` set it, or a process
    group already set up), else a no-op one. Under CUDA each rank's current device becomes ``cuda:LOCAL_RANK``, so
    models loaded on ``"cuda"`` afterwards land on the rank's own GPU."""
    global _current
    if _current is None:
        _current = _from_environment()
    return _current


def reset() -> None:
    """Forget the cached :class:`Dist` (tests; a process that set up a new group)."""
    global _current
    _current = None


def _from_environment() -> Dist:
    # A process that has not imported torch has no process group yet: only the environment can say there are several.
    loaded = sys.modules.get("torch")
    initialized = loaded is not None and loaded.distributed.is_available() and loaded.distributed.is_initialized()
    if not initialized and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if cpu and "LOCAL_RANK" not in os.environ and "RANK" in os.environ:
        os.environ["LOCAL_RANK"] = os.environ["RANK"]  # accelerate detects CPU processes by LOCAL_RANK
    state = PartialState(cpu=cpu)
    if state.num_processes <= 1:
        return Dist()
    device = state.device if state.device.type == "cuda" else torch.device("cpu")
    return Dist(state.process_index, state.num_processes, state.local_process_index, device)
