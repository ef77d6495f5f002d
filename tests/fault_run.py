"""The ``b4m`` command line in a process that kills itself (SIGKILL), or signals itself, at one point of a run: the
subprocess of the fault-injection suite (tests/test_faults.py).

    python tests/fault_run.py POINT b4m-arguments…

POINT is where the process dies, with no cleanup of any kind (SIGKILL):

- ``none``: it does not (the command runs to its end);
- ``step:N``: at the start of optimizer step N (mid-training, between checkpoints);
- ``adapter-written:N``: in the write of checkpoint N, its adapter file written, ``state.pt`` not yet;
- ``state-written:N``: checkpoint N's files all written into ``step-N.tmp``, the folder not yet renamed;
- ``after-rename:N``: checkpoint N renamed to its final name, older ones not yet pruned;
- ``final-adapter``: the run's adapter file written under its temporary name, not yet renamed;
- ``signal:NAME:N``: not a kill: the process sends itself signal NAME (SIGINT, SIGTERM) during step N;
- ``hold:FILE``: not a fault: training starts once FILE exists (a run that holds its folder meanwhile).

``B4M_TEST_FSIZE`` (bytes) sets a file-size limit (``RLIMIT_FSIZE``) with SIGXFSZ ignored, so a write past it fails
with the error a full disk gives (EFBIG), raised as each writer raises it. One thread, as the suite's own runs.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch

import b4m.files
import b4m.training.checkpoint as checkpoint
import b4m.training.loop as loop
from b4m.cli.app import main


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    kind, _, arg = point.partition(":")
    if kind == "none":
        return
    if kind == "hold":  # not a fault: training starts once the file ``arg`` exists (a run that holds its folder)
        real_first = loop.train_step

        def held_step(*args, **kwargs):
            deadline = time.monotonic() + 300
            while not Path(arg).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            return real_first(*args, **kwargs)

        loop.train_step = held_step
    elif kind in ("step", "signal"):
        signum, _, n = arg.rpartition(":")
        real_step, calls = loop.train_step, []

        def train_step(*args, **kwargs):
            calls.append(1)
            if len(calls) == int(n):
                if kind == "step":
                    die()
                os.kill(os.getpid(), signal.Signals[signum])
            return real_step(*args, **kwargs)

        loop.train_step = train_step
    elif kind == "adapter-written":
        real_save = checkpoint.save_adapter

        def save_adapter(adapter, path):
            real_save(adapter, path)
            if Path(path).parent.name == f"step-{int(arg):06d}.tmp":
                die()

        checkpoint.save_adapter = save_adapter
    elif kind == "state-written":
        real_state = checkpoint._write_state

        def write_state(state, path):
            real_state(state, path)
            if state["step"] == int(arg):
                die()

        checkpoint._write_state = write_state
    elif kind == "after-rename":
        real_publish = checkpoint._publish

        def publish(tmp, final):
            real_publish(tmp, final)
            if final.name == f"step-{int(arg):06d}":
                die()

        checkpoint._publish = publish
    elif kind == "final-adapter":
        real_file = b4m.files.save_file

        def save_file(tensors, filename, metadata=None):
            real_file(tensors, filename, metadata=metadata)
            if Path(filename).name.startswith((".content.b4m.safetensors.", ".style.b4m.safetensors.")):
                die()

        b4m.files.save_file = save_file
    else:
        raise SystemExit(f"unknown point {point!r}")


def stop_worker(rank: int, world: int, port: int, out: Path) -> None:
    """One of two gloo processes polling a :class:`~b4m.training.checkpoint.Stopper` as the loop does (a loss read
    every 2 steps): rank 0's clock asks for a checkpoint at every read, rank 1's never; SIGTERM reaches rank 1 only,
    in step 5. Saves what this rank decided at each step (tests/test_faults.py)."""
    import torch.distributed as td

    from b4m.training import distributed

    torch.set_num_threads(1)
    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    distributed._current = distributed.Dist(rank, world)
    decided = []
    with checkpoint.Stopper(1e-9 if rank == 0 else 1e3) as stopper:
        for step in range(1, 9):
            if rank == 1 and step == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            stop, timed = stopper.poll(step, step % 2 == 0, torch.device("cpu"))
            decided.append((step, stop, timed, stopper.signum))
            if stop:
                break
    torch.save(decided, out / f"rank{rank}.pt")
    td.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    if "B4M_TEST_FSIZE" in os.environ:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(os.environ["B4M_TEST_FSIZE"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    arm(sys.argv[1])
    sys.argv = ["b4m", *sys.argv[2:]]
    main()
