"""Long work of the app (training runs, make, generate) as ``b4m`` commands in child processes, one at a time (one
run per GPU), queued otherwise: each writes the run folder its command writes, the page never waits on it, and
cancelling sends SIGTERM, on which a run writes a checkpoint and exits (docs/reliability.md): a cancelled run
resumes, from the app or with the CLI's ``--resume``."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

#: A progress line of a run (b4m.progress, lines when output is a pipe): "content step 10/60 … loss 0.1936".
PROGRESS = re.compile(r"^(?P<label>\w+) step (?P<step>\d+)/(?P<total>\d+)\b.*?(?:loss (?P<loss>[\d.]+|…))?$")
#: Seconds between a child's progress lines (its B4M_PROGRESS_SECONDS).
PROGRESS_SECONDS = "1"
STATES = ("queued", "running", "done", "failed", "cancelled")


@dataclass
class Job:
    """One command: its arguments (after ``b4m``), what it is for, its state and what it printed."""

    id: int
    title: str
    args: list[str]
    state: str = "queued"
    lines: list[str] = field(default_factory=list)
    step: int = 0
    total: int = 0
    loss: float | None = None
    started: float | None = None
    first_step_at: tuple[float, int] | None = None  # (time, step) of the first progress line: the rate's start
    ended: float | None = None
    returncode: int | None = None
    process: subprocess.Popen | None = None

    @property
    def seconds_left(self) -> float | None:
        """From the steps since the first progress line (warm-up excluded)."""
        if self.first_step_at is None or self.step <= self.first_step_at[1] or not self.total:
            return None
        t0, s0 = self.first_step_at
        return (time.monotonic() - t0) / (self.step - s0) * (self.total - self.step)

    @property
    def error(self) -> str:
        """The command's one-line error (b4m prints ``error: …``), or its last line."""
        errors = [line for line in self.lines if line.startswith("error: ")]
        return (errors[-1][len("error: ") :] if errors else (self.lines[-1] if self.lines else "")).strip()

    def summary(self) -> str:
        if self.state == "running" and self.total:
            left = self.seconds_left
            eta = f", about {left:.0f} s left" if left is not None else ""
            loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
            return f"{self.title}: step {self.step}/{self.total}{loss}{eta}"
        if self.state == "failed":
            return f"{self.title}: failed: {self.error}"
        if self.state == "cancelled":
            return f"{self.title}: cancelled (a checkpoint was written where the run had one; resume continues it)"
        return f"{self.title}: {self.state}"


class JobQueue:
    """Runs submitted jobs one after the other in a background thread."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.jobs: list[Job] = []
        self._waiting: deque[Job] = deque()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._env = {**os.environ, **(env or {}), "B4M_PROGRESS_SECONDS": PROGRESS_SECONDS, "NO_COLOR": "1"}
        threading.Thread(target=self._work, name="b4m-jobs", daemon=True).start()

    def submit(self, title: str, args: list[str]) -> Job:
        with self._lock:
            job = Job(next(self._ids), title, [str(a) for a in args])
            self.jobs.append(job)
            self._waiting.append(job)
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        """A queued job never starts; a running one gets SIGTERM (a run checkpoints, then exits)."""
        with self._lock:
            if job.state == "queued":
                self._waiting.remove(job)
                job.state = "cancelled"
                return
            process = job.process
        if job.state == "running" and process is not None:
            process.send_signal(signal.SIGTERM)
            job.state = "cancelled"

    def wait(self, job: Job, timeout: float = 600.0) -> Job:
        """Block until ``job`` ends (tests, scripts); the app polls instead."""
        deadline = time.monotonic() + timeout
        while job.ended is None and not (job.state == "cancelled" and job.process is None):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{job.title}: still {job.state} after {timeout:.0f} s")
            time.sleep(0.1)
        return job

    def current(self) -> Job | None:
        return next((j for j in self.jobs if j.state == "running"), None)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting:
                    self._wake.wait()
                job = self._waiting.popleft()
                job.state = "running"
            self._run(job)

    def _run(self, job: Job) -> None:
        job.started = time.monotonic()
        try:
            job.process = subprocess.Popen(
                [sys.executable, "-m", "b4m.cli", *job.args],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=self._env,
            )
        except OSError as e:
            job.lines.append(f"error: could not start b4m ({e})")
            job.state, job.ended = "failed", time.monotonic()
            return
        for raw in job.process.stdout:
            line = raw.rstrip()
            job.lines.append(line)
            m = PROGRESS.match(line)
            if m:
                job.step, job.total = int(m["step"]), int(m["total"])
                if m["loss"] and m["loss"] != "…":
                    job.loss = float(m["loss"])
                if job.first_step_at is None:
                    job.first_step_at = (time.monotonic(), job.step)
        job.returncode = job.process.wait()
        job.ended = time.monotonic()
        if job.state != "cancelled":
            job.state = "done" if job.returncode == 0 else "failed"
        job.process = None
