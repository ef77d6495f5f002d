"""A sweep's jobs: :class:`Job` (and :class:`JobState`, its progress in a run), the jobs file (TOML or JSON, format in
:mod:`b4m.sweep`) and its checks."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import B4MError
from .slots import Slot

_NAME = re.compile(r"^[A-Za-z0-9_.:+=@-]+$")
#: The ``[sweep]`` table's keys (defaults for ``b4m sweep``'s flags).
SETTINGS = ("retries", "metric", "goal", "workers", "gpus", "jobs_per_gpu")
#: A ``[[jobs]]`` entry's keys.
ENTRY_KEYS = ("name", "argv", "command", "depends_on", "seeds", "result")


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
class JobState:
    """A job's progress in a run (:class:`b4m.sweep.scheduler.Scheduler`): what the summary reports of it."""

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
    unknown = sorted(set(settings) - set(SETTINGS))
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
        expanded = _parse_entry(entry, i, source)
        jobs += expanded
        if expanded[0].group is not None:  # a seed entry: its name stands for all its jobs
            groups[expanded[0].group] = [j.name for j in expanded]
    names = [j.name for j in jobs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise B4MError(f"{source}: job name(s) used twice: {', '.join(dupes)}")
    for job in jobs:
        job.depends_on = _resolve_deps(job, groups, names, source)
    _check_acyclic(jobs, source)
    return jobs


def _parse_entry(entry: Any, i: int, source: str) -> list[Job]:
    """The job(s) of entry ``i`` of a jobs file: one, or one per seed (dependencies not resolved yet)."""
    if not isinstance(entry, dict):
        raise B4MError(f"{source}: job {i + 1} is not a table")
    name = str(entry.get("name", ""))
    where = f"{source}: job {name or i + 1}"
    if not _NAME.match(name):
        raise B4MError(f"{where}: needs a name of letters, digits and -_.:+=@")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
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
        return [Job(name, command, deps, result)]
    if not isinstance(seeds, list) or not seeds:
        raise B4MError(f"{where}: seeds must be a non-empty list")
    jobs = []
    for seed in seeds:
        sub = lambda text, seed=seed: text.replace("{seed}", str(seed))  # noqa: E731
        jobs.append(Job(f"{name}-s{seed}", [sub(a) for a in command], deps, sub(result) if result else None, name))
    return jobs


def _resolve_deps(job: Job, groups: dict[str, list[str]], names: list[str], source: str) -> list[str]:
    """``job``'s dependencies as job names: a seed group's name stands for all its jobs."""
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
    return deps


def _check_acyclic(jobs: list[Job], source: str) -> None:
    """Refuse dependency cycles (they would wait forever): peel off jobs whose dependencies are all peeled."""
    left = {j.name: set(j.depends_on) for j in jobs}
    while left:
        ready = [n for n, deps in left.items() if not deps & left.keys()]
        if not ready:
            raise B4MError(f"{source}: dependency cycle among {', '.join(sorted(left))}")
        for n in ready:
            del left[n]
