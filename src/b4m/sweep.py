"""``b4m sweep``: independent runs at once, one process per free GPU (or CPU worker), from a jobs file.

A jobs file (TOML or JSON) lists jobs; each is a ``b4m`` command (``argv``, its arguments after ``b4m``) or any
command (``command``, a full argument list), with optional ``depends_on`` (names of jobs that must succeed first:
make waits for its content and style runs), ``seeds`` (one job per seed, ``{seed}`` in the arguments replaced,
named ``NAME-sSEED``; depending on ``NAME`` waits for all of them) and ``result`` (a JSON file the job writes, for the
summary's metric; by default ``run.json`` or ``results.json`` in the job's ``-o``/``--output`` folder)::

    [sweep]                  # optional defaults; the command's flags win
    retries = 1
    metric = "final_loss"    # a key (dotted for nested ones) of each job's result JSON; ranks the summary
    goal = "min"

    [[jobs]]
    name = "dog"
    argv = ["content", "--images", "data/dog", "--prompt", "a photo of sks dog", "-o", "runs/dog"]

    [[jobs]]
    name = "yarn"
    argv = ["style", "--images", "data/yarn", "--prompt", "a cat in zwx style", "-o", "runs/yarn"]

    [[jobs]]
    name = "dog-yarn"
    argv = ["make", "--content", "runs/dog", "--style", "runs/yarn", "-o", "runs/dog-yarn"]
    depends_on = ["dog", "yarn"]

Each job runs as a subprocess with ``CUDA_VISIBLE_DEVICES`` set to its slot's GPU (on a machine without GPUs: one CPU
process per worker, ``OMP_NUM_THREADS`` split between them unless set), in the current folder; its output goes to
``OUT/logs/NAME.log`` (every attempt appended). A failed job is run again up to ``retries`` times; a job whose
dependency failed is skipped. The summary (``OUT/summary.json`` and a table) lists every job's status, attempts, time,
slot and metric, ranked by the metric when one is given.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import B4MError
from .io_utils import atomic_path

GOALS = ("min", "max")
_NAME = re.compile(r"^[A-Za-z0-9_.:+=@-]+$")


@dataclass
class Job:
    """One command of a sweep. ``command`` is the full argument list (``b4m`` commands: ``python -m b4m.cli …``)."""

    name: str
    command: list[str]
    depends_on: list[str] = field(default_factory=list)
    result: str | None = None  # JSON file with the job's metric (None: guessed from the command's --output)
    group: str | None = None  # the entry a seed expansion came from

    @property
    def display(self) -> str:
        cmd = self.command
        if cmd[:3] == [sys.executable, "-m", "b4m.cli"]:
            cmd = ["b4m", *cmd[3:]]
        return shlex.join(cmd)


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


@dataclass
class JobState:
    job: Job
    status: str = "waiting"  # waiting, running, done, failed, skipped
    attempts: int = 0
    returncode: int | None = None
    seconds: float = 0.0
    slot: str | None = None
    metric: float | None = None
    note: str = ""
    process: subprocess.Popen | None = None
    started: float = 0.0
    held: Slot | None = None  # the slot it runs on now


# --------------------------------------------------------------------------------------------------------------------
# Jobs files


def b4m_command(argv: Sequence[str]) -> list[str]:
    """The full command line of ``b4m ARGV`` in this Python (a leading ``"b4m"`` is optional)."""
    argv = [str(a) for a in argv]
    if argv and argv[0] == "b4m":
        argv = argv[1:]
    return [sys.executable, "-m", "b4m.cli", *argv]


def load_jobs(path: str | Path) -> tuple[list[Job], dict[str, Any]]:
    """The jobs of a TOML or JSON jobs file (seed entries expanded, dependencies checked) and its ``[sweep]``
    settings."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise B4MError(f"{path}: cannot read the jobs file ({e.strerror or e})") from e
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise B4MError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({e})") from e
    if isinstance(data, list):
        data = {"jobs": data}
    settings = data.get("sweep", {})
    unknown = sorted(set(settings) - {"retries", "metric", "goal", "workers", "gpus", "jobs_per_gpu"})
    if unknown:
        raise B4MError(f"{path}: unknown [sweep] setting(s): {', '.join(unknown)}")
    entries = data.get("jobs")
    if not isinstance(entries, list) or not entries:
        raise B4MError(f"{path}: no jobs (write [[jobs]] tables with a name and argv)")
    return parse_jobs(entries, str(path)), settings


def parse_jobs(entries: Sequence[dict], source: str = "jobs") -> list[Job]:
    """Jobs from dicts (the jobs file's entries): seeds expanded, names unique, dependencies known and acyclic."""
    jobs: list[Job] = []
    groups: dict[str, list[str]] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise B4MError(f"{source}: job {i + 1} is not a table")
        name = str(entry.get("name", ""))
        where = f"{source}: job {name or i + 1}"
        if not _NAME.match(name):
            raise B4MError(f"{where}: needs a name of letters, digits and -_.:+=@")
        unknown = sorted(set(entry) - {"name", "argv", "command", "depends_on", "seeds", "result"})
        if unknown:
            raise B4MError(f"{where}: unknown key(s) {', '.join(unknown)}")
        if ("argv" in entry) == ("command" in entry):
            raise B4MError(f"{where}: give either argv (a b4m command's arguments) or command (any command)")
        args = entry.get("argv", entry.get("command"))
        if not isinstance(args, list) or not args or not all(isinstance(a, str | int | float) for a in args):
            raise B4MError(f"{where}: argv/command must be a non-empty list of strings")
        command = b4m_command(args) if "argv" in entry else [str(a) for a in args]
        deps = entry.get("depends_on", [])
        deps = [deps] if isinstance(deps, str) else [str(d) for d in deps]
        result = entry.get("result")
        seeds = entry.get("seeds")
        if seeds is None:
            jobs.append(Job(name, command, deps, result))
            continue
        if not isinstance(seeds, list) or not seeds:
            raise B4MError(f"{where}: seeds must be a non-empty list")
        groups[name] = []
        for seed in seeds:
            sub = lambda text, seed=seed: text.replace("{seed}", str(seed))  # noqa: E731
            expanded = Job(f"{name}-s{seed}", [sub(a) for a in command], deps, sub(result) if result else None, name)
            jobs.append(expanded)
            groups[name].append(expanded.name)
    names = [j.name for j in jobs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise B4MError(f"{source}: job name(s) used twice: {', '.join(dupes)}")
    for job in jobs:
        deps = []
        for dep in job.depends_on:
            if dep in groups:
                deps += groups[dep]
            elif dep in names:
                deps.append(dep)
            else:
                raise B4MError(f"{source}: job {job.name} depends on {dep!r}, which is not a job")
        if job.name in deps:
            raise B4MError(f"{source}: job {job.name} depends on itself")
        job.depends_on = deps
    _check_acyclic(jobs, source)
    return jobs


def _check_acyclic(jobs: list[Job], source: str) -> None:
    """Refuse dependency cycles (they would wait forever): peel off jobs whose dependencies are all peeled."""
    left = {j.name: set(j.depends_on) for j in jobs}
    while left:
        ready = [n for n, deps in left.items() if not deps & left.keys()]
        if not ready:
            raise B4MError(f"{source}: dependency cycle among {', '.join(sorted(left))}")
        for n in ready:
            del left[n]


# --------------------------------------------------------------------------------------------------------------------
# Slots


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


# --------------------------------------------------------------------------------------------------------------------
# Running


def _guess_result(job: Job) -> Path | None:
    cmd = job.command
    out = None
    for i, arg in enumerate(cmd):
        if arg in ("-o", "--output") and i + 1 < len(cmd):
            out = cmd[i + 1]
        elif arg.startswith("--output="):
            out = arg.split("=", 1)[1]
    if out is None:
        return None
    for name in ("run.json", "results.json"):
        if (Path(out) / name).exists():
            return Path(out) / name
    return None


def read_metric(job: Job, key: str) -> float | None:
    """``key`` (dotted for nested keys) of the job's result JSON, if it has a number there."""
    path = Path(job.result) if job.result else _guess_result(job)
    if path is None or not path.exists():
        return None
    try:
        value: Any = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _tail(path: Path, limit: int = 4096) -> str:
    """The last non-empty line of a log (progress bars' carriage returns count as line ends)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - limit))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    return lines[-1] if lines else ""


def _stop(state: JobState) -> None:
    """End a running job and whatever it started (it runs in its own process group)."""
    p = state.process
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


def run_jobs(
    jobs: Sequence[Job],
    out: str | Path,
    *,
    slots: Sequence[Slot] | None = None,
    retries: int = 1,
    metric: str | None = None,
    goal: str = "min",
    console=None,
    poll: float = 0.2,
    env: dict[str, str] | None = None,
    on_finish: Callable[[JobState], None] | None = None,
) -> dict:
    """Run ``jobs`` on ``slots`` (default :func:`make_slots`), each when its dependencies have succeeded; returns the
    summary (also written to ``out/summary.json``).

    Args:
        jobs: From :func:`load_jobs` or :func:`parse_jobs` (or built directly: dependencies must name jobs).
        out: Folder for ``logs/`` and ``summary.json``.
        slots: Where jobs run; one job per slot at a time.
        retries: How many times a failed job is run again.
        metric: A key of each job's result JSON to report and rank by (see :func:`read_metric`).
        goal: ``min`` or ``max``: which end of the metric ranks first.
        console: A rich console for the live view and the summary table, or None (silent).
        poll: Seconds between checks of the running jobs.
        env: Extra environment variables for every job.
        on_finish: Called with each job's state when it ends (done, failed or skipped).
    """
    if goal not in GOALS:
        raise B4MError(f"goal must be one of {GOALS}, got {goal!r}")
    if retries < 0:
        raise B4MError(f"retries must be at least 0, got {retries}")
    out = Path(out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    slots = list(slots) if slots is not None else make_slots()
    if not slots:
        raise B4MError("no slot to run jobs on")
    states = {j.name: JobState(j) for j in jobs}
    missing = sorted({d for j in jobs for d in j.depends_on} - set(states))
    if missing:
        raise B4MError(f"jobs depend on unknown job(s): {', '.join(missing)}")
    free = list(slots)
    t0 = time.perf_counter()
    # A terminal gets a live table; a log file one line per event.
    live_view = console is not None and console.is_terminal
    say = console.print if console is not None and not live_view else (lambda *a, **k: None)

    def event(text: str) -> None:
        say(f"[{time.perf_counter() - t0:6.0f} s] {text}", highlight=False, markup=False, soft_wrap=True)

    def finish(state: JobState, status: str, note: str = "") -> None:
        state.status, state.note = status, note
        if status == "done" and metric:
            state.metric = read_metric(state.job, metric)
        shown = f"{metric} {state.metric:.4g}" if state.metric is not None else note
        event(f"{state.job.name} {status}" + (f" ({shown})" if shown else ""))
        if on_finish is not None:
            on_finish(state)

    def start(state: JobState, slot: Slot) -> None:
        state.attempts += 1
        state.slot = slot.name
        log = logs / f"{state.job.name}.log"
        with open(log, "a") as f:
            f.write(f"# attempt {state.attempts} on {slot.name}: {state.job.display}\n")
            f.flush()
            job_env = {
                **os.environ,
                **(env or {}),
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
        event(f"{state.job.name} started on {slot.name} (attempt {state.attempts}): {state.job.display}")

    def step() -> bool:
        """One pass: collect finished jobs, skip the blocked ones, start the ready ones. False when all ended."""
        for state in states.values():
            if state.status != "running" or state.process.poll() is None:
                continue
            rc = state.process.returncode
            state.seconds += time.perf_counter() - state.started
            state.returncode = rc
            free.append(state.held)
            state.process = state.held = None
            if rc == 0:
                finish(state, "done")
            elif state.attempts <= retries:
                state.status = "waiting"
                state.note = f"exit {rc}; retrying"
                event(f"{state.job.name} failed with exit {rc}; retrying ({logs / state.job.name}.log)")
            else:
                last = _tail(logs / f"{state.job.name}.log")
                finish(state, "failed", f"exit {rc}: {last}" if last else f"exit {rc}")
        changed = True
        while changed:  # skips propagate down dependency chains
            changed = False
            for state in states.values():
                if state.status != "waiting":
                    continue
                bad = [d for d in state.job.depends_on if states[d].status in ("failed", "skipped")]
                if bad:
                    finish(state, "skipped", f"{bad[0]} {states[bad[0]].status}")
                    changed = True
        for state in states.values():
            if not free:
                break
            if state.status == "waiting" and all(states[d].status == "done" for d in state.job.depends_on):
                start(state, free.pop(0))
        return any(s.status in ("waiting", "running") for s in states.values())

    live = None
    if live_view:
        from rich.live import Live

        live = Live(_view(states, t0), console=console, refresh_per_second=4, transient=True)
        live.start()
    # SIGTERM (a time limit, a job scheduler) ends the sweep like Ctrl-C: its jobs are stopped, the summary written.
    terminate = _on_sigterm()
    try:
        while step():
            if live is not None:
                live.update(_view(states, t0, logs))
            time.sleep(poll)
    except BaseException:
        for state in states.values():
            if state.status == "running":
                _stop(state)
                state.seconds += time.perf_counter() - state.started
                state.status, state.note = "failed", "interrupted"
        raise
    finally:
        terminate()
        if live is not None:
            live.update(_view(states, t0, logs))
            live.stop()
        summary = _summary(states, slots, metric, goal, time.perf_counter() - t0, out)
        with atomic_path(out / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
    if console is not None:
        console.print(summary_table(summary))
        console.print(f"summary: {out / 'summary.json'}, logs: {logs}", highlight=False, markup=False)
    return summary


def _on_sigterm() -> Callable[[], None]:
    """Raise SystemExit on SIGTERM while the sweep runs (main thread only); returns what restores the old handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


STATUS_STYLE = {"waiting": "dim", "running": "cyan", "done": "green", "failed": "red", "skipped": "yellow"}


def _view(states: dict[str, JobState], t0: float, logs: Path | None = None):
    """The live table: one row per job (status, slot, attempt, time, its log's last line)."""
    from rich.table import Table

    counts = {k: sum(s.status == k for s in states.values()) for k in STATUS_STYLE}
    title = f"{time.perf_counter() - t0:.0f} s: {counts['done']}/{len(states)} done, {counts['running']} running"
    title += "".join(f", {counts[k]} {k}" for k in ("failed", "skipped") if counts[k])
    table = Table(title=title, title_justify="left")
    for column in ("job", "status", "slot", "try", "s", "last line"):
        table.add_column(column, justify="right" if column in ("try", "s") else "left", no_wrap=column != "last line")
    now = time.perf_counter()
    for s in states.values():
        seconds = s.seconds + (now - s.started if s.status == "running" else 0.0)
        running = s.status == "running" and logs is not None
        last = _tail(logs / f"{s.job.name}.log")[-70:] if running else s.note
        status = f"[{STATUS_STYLE[s.status]}]{s.status}[/]"
        table.add_row(
            s.job.name, status, s.slot or "", str(s.attempts or ""), f"{seconds:.0f}", last, end_section=False
        )
    return table


def _summary(states, slots, metric: str | None, goal: str, seconds: float, out: Path) -> dict:
    rows = [
        {
            "name": s.job.name,
            "status": s.status,
            "attempts": s.attempts,
            "returncode": s.returncode,
            "seconds": round(s.seconds, 2),
            "slot": s.slot,
            "metric": s.metric,
            "note": s.note,
            "group": s.job.group,
            "depends_on": s.job.depends_on,
            "command": s.job.display,
            "log": str(out / "logs" / f"{s.job.name}.log") if s.attempts else None,
        }
        for s in states.values()
    ]
    ranked = sorted((r for r in rows if r["metric"] is not None), key=lambda r: r["metric"], reverse=goal == "max")
    best: dict[str, str] = {}
    for r in ranked:
        if r["group"] and r["group"] not in best:
            best[r["group"]] = r["name"]
    counts = {k: sum(r["status"] == k for r in rows) for k in ("done", "failed", "skipped")}
    return {
        "seconds": round(seconds, 2),
        "slots": [s.name for s in slots],
        **counts,
        "metric": metric,
        "goal": goal,
        "ranking": [r["name"] for r in ranked],
        "best_per_group": best,
        "jobs": rows,
    }


def summary_table(summary: dict):
    """The summary as a rich table: jobs ranked by the metric (when there is one), the rest in file order."""
    from rich.table import Table

    rows = {r["name"]: r for r in summary["jobs"]}
    order = summary["ranking"] + [n for n in rows if n not in summary["ranking"]]
    metric = summary["metric"]
    title = f"{summary['done']} done, {summary['failed']} failed, {summary['skipped']} skipped"
    title += f" in {summary['seconds']:.0f} s"
    if metric:
        title += f"; ranked by {metric} ({'lowest' if summary['goal'] == 'min' else 'highest'} first)"
    table = Table(title=title, title_justify="left")
    for column in ("job", "status", "tries", "slot", "s", *([metric] if metric else []), "note"):
        table.add_column(column, justify="right" if column in ("tries", "s", metric) else "left")
    for name in order:
        r = rows[name]
        cells = [name, f"[{STATUS_STYLE[r['status']]}]{r['status']}[/]", str(r["attempts"]), r["slot"] or ""]
        cells.append(f"{r['seconds']:.0f}")
        if metric:
            cells.append("" if r["metric"] is None else f"{r['metric']:.4g}")
        cells.append(r["note"])
        table.add_row(*cells)
    return table
