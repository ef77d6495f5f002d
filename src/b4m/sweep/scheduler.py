"""Running a sweep: a :class:`Scheduler` starts each job on a free slot once its dependencies have succeeded, runs
failed jobs again, skips the jobs after a failure and writes the summary; :func:`run_jobs` runs one."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import B4MError
from .jobs import Job, JobState
from .slots import Slot, make_slots
from .summary import GOALS, last_line, live_table, read_metric, summarize, summary_table, write_summary


class Scheduler:
    """One sweep: its jobs' states, the free slots and the clock (started when the scheduler is made).

    :meth:`run` calls :meth:`step` until every job has ended; a step collects the jobs that exited (:meth:`collect`),
    skips those whose dependencies failed (:meth:`skip_blocked`) and starts the ready ones on free slots
    (:meth:`start_ready`). The settings are described at :func:`run_jobs`; ``jobs`` come from
    :func:`~b4m.sweep.jobs.load_jobs` or :func:`~b4m.sweep.jobs.parse_jobs` (or are built directly: dependencies must
    name jobs), ``out`` is the folder for ``logs/`` and ``summary.json``.
    """

    def __init__(
        self,
        jobs: Sequence[Job],
        out: str | Path,
        *,
        slots: Sequence[Slot] | None = None,
        retries: int = 1,
        metric: str | None = None,
        goal: str = "min",
        console=None,
        env: dict[str, str] | None = None,
        on_finish: Callable[[JobState], None] | None = None,
    ):
        if goal not in GOALS:
            raise B4MError(f"goal must be one of {GOALS}, got {goal!r}")
        if retries < 0:
            raise B4MError(f"retries must be at least 0, got {retries}")
        self.out = Path(out)
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.slots = list(slots) if slots is not None else make_slots()
        if not self.slots:
            raise B4MError("no slot to run jobs on")
        self.states = {j.name: JobState(j) for j in jobs}
        missing = sorted({d for j in jobs for d in j.depends_on} - set(self.states))
        if missing:
            raise B4MError(f"jobs depend on unknown job(s): {', '.join(missing)}")
        self.free = list(self.slots)
        self.retries, self.metric, self.goal = retries, metric, goal
        self.console, self.env, self.on_finish = console, env, on_finish
        # A terminal gets a live table; a log file one line per event.
        self.live_view = console is not None and console.is_terminal
        self.t0 = time.perf_counter()

    def log_path(self, job: Job) -> Path:
        """The job's log: every attempt's output, appended."""
        return self.logs / f"{job.name}.log"

    def event(self, text: str) -> None:
        """One line (with the sweep's time) on a console that shows no live table."""
        if self.console is not None and not self.live_view:
            line = f"[{time.perf_counter() - self.t0:6.0f} s] {text}"
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    # ----------------------------------------------------------------------------------------------------------------
    # A job's life

    def start(self, state: JobState, slot: Slot) -> None:
        """Start an attempt of the job on ``slot``: its own process group, its output appended to its log."""
        state.attempts += 1
        state.slot = slot.name
        with open(self.log_path(state.job), "a") as f:
            f.write(f"# attempt {state.attempts} on {slot.name}: {state.job.display}\n")
            f.flush()
            job_env = {
                **os.environ,
                **(self.env or {}),
                **slot.env(),
                "B4M_SWEEP_JOB": state.job.name,
                "B4M_SWEEP_ATTEMPT": str(state.attempts),
            }
            state.process = subprocess.Popen(
                state.job.command,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=job_env,
                start_new_session=True,  # its own process group: stopping it stops what it started
            )
        state.status, state.started, state.held = "running", time.perf_counter(), slot
        self.event(f"{state.job.name} started on {slot.name} (attempt {state.attempts}): {state.job.display}")

    def exited(self, state: JobState) -> None:
        """A running job's process has exited: free its slot; the job is done, waits for a retry, or failed."""
        rc = state.process.returncode
        state.seconds += time.perf_counter() - state.started
        state.returncode = rc
        self.free.append(state.held)
        state.process = state.held = None
        if rc == 0:
            self.finish(state, "done")
        elif state.attempts <= self.retries:
            state.status = "waiting"
            state.note = f"exit {rc}; retrying"
            self.event(f"{state.job.name} failed with exit {rc}; retrying ({self.log_path(state.job)})")
        else:
            last = last_line(self.log_path(state.job))
            self.finish(state, "failed", f"exit {rc}: {last}" if last else f"exit {rc}")

    def finish(self, state: JobState, status: str, note: str = "") -> None:
        """The job has ended (done, failed or skipped): read its metric when done, tell ``on_finish``."""
        state.status, state.note = status, note
        if status == "done" and self.metric:
            state.metric = read_metric(state.job, self.metric)
        shown = f"{self.metric} {state.metric:.4g}" if state.metric is not None else note
        self.event(f"{state.job.name} {status}" + (f" ({shown})" if shown else ""))
        if self.on_finish is not None:
            self.on_finish(state)

    # ----------------------------------------------------------------------------------------------------------------
    # A pass over the jobs

    def collect(self) -> None:
        """Handle every running job whose process has exited."""
        for state in self.states.values():
            if state.status == "running" and state.process.poll() is not None:
                self.exited(state)

    def skip_blocked(self) -> None:
        """Skip the waiting jobs with a failed or skipped dependency, down the dependency chains."""
        changed = True
        while changed:
            changed = False
            for state in self.states.values():
                if state.status != "waiting":
                    continue
                bad = [d for d in state.job.depends_on if self.states[d].status in ("failed", "skipped")]
                if bad:
                    self.finish(state, "skipped", f"{bad[0]} {self.states[bad[0]].status}")
                    changed = True

    def start_ready(self) -> None:
        """Start waiting jobs whose dependencies are all done, in order, while there are free slots."""
        for state in self.states.values():
            if not self.free:
                break
            if state.status == "waiting" and all(self.states[d].status == "done" for d in state.job.depends_on):
                self.start(state, self.free.pop(0))

    def step(self) -> bool:
        """One pass: collect finished jobs, skip the blocked ones, start the ready ones. False when all ended."""
        self.collect()
        self.skip_blocked()
        self.start_ready()
        return any(s.status in ("waiting", "running") for s in self.states.values())

    def stop(self) -> None:
        """Stop the running jobs (and what they started): they failed, ``interrupted``."""
        for state in self.states.values():
            if state.status == "running":
                _end_process(state.process)
                state.seconds += time.perf_counter() - state.started
                state.status, state.note = "failed", "interrupted"

    # ----------------------------------------------------------------------------------------------------------------
    # The whole sweep

    def summary(self) -> dict:
        """The summary so far (see :func:`b4m.sweep.summary.summarize`)."""
        elapsed = time.perf_counter() - self.t0
        return summarize(self.states, self.slots, self.metric, self.goal, elapsed, self.out)

    def run(self, poll: float = 0.2) -> dict:
        """Step every ``poll`` seconds until all jobs have ended; returns the summary, also written to
        ``out/summary.json`` when the sweep is interrupted (Ctrl-C, SIGTERM: the running jobs are stopped first)."""
        live = None
        if self.live_view:
            from rich.live import Live

            live = Live(live_table(self.states, self.t0), console=self.console, refresh_per_second=4, transient=True)
            live.start()
        # SIGTERM (a time limit, a job scheduler) ends the sweep like Ctrl-C: jobs stopped, the summary written.
        terminate = _on_sigterm()
        try:
            while self.step():
                if live is not None:
                    live.update(live_table(self.states, self.t0, self.logs))
                time.sleep(poll)
        except BaseException:
            self.stop()
            raise
        finally:
            terminate()
            if live is not None:
                live.update(live_table(self.states, self.t0, self.logs))
                live.stop()
            summary = self.summary()
            write_summary(summary, self.out)
        if self.console is not None:
            self.console.print(summary_table(summary))
            where = f"summary: {self.out / 'summary.json'}, logs: {self.logs}"
            self.console.print(where, highlight=False, markup=False)
        return summary


def run_jobs(jobs: Sequence[Job], out: str | Path, *, poll: float = 0.2, **settings) -> dict:
    """Run ``jobs`` on their slots (default :func:`make_slots`), each when its dependencies have succeeded; returns
    the summary (also written to ``out/summary.json``). ``poll``: seconds between checks of the running jobs.

    ``settings`` are :class:`Scheduler`'s: ``slots`` (where jobs run, one at a time per slot), ``retries`` (times a
    failed job is run again, default 1), ``metric`` (a key of each job's result JSON to report and rank by, see
    :func:`read_metric`), ``goal`` (``min`` or ``max``: which end of the metric ranks first), ``console`` (a rich
    console for the live view and the summary table, or None), ``env`` (extra environment variables for every job)
    and ``on_finish`` (called with each job's state when it ends: done, failed or skipped).
    """
    return Scheduler(jobs, out, **settings).run(poll)


def _end_process(p: subprocess.Popen | None) -> None:
    """End a running job's process and whatever it started (it runs in its own process group)."""
    if p is None or p.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _on_sigterm() -> Callable[[], None]:
    """Raise SystemExit on SIGTERM while the sweep runs (main thread only); returns what restores the old handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)
