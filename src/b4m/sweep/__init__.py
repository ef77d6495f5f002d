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

The package: :mod:`~b4m.sweep.jobs` (jobs and the jobs file), :mod:`~b4m.sweep.slots` (GPUs and CPU workers),
:mod:`~b4m.sweep.scheduler` (running them: :class:`Scheduler`, :func:`run_jobs`) and :mod:`~b4m.sweep.summary`
(metrics, the live table, the summary and ``summary.json``).
"""

from .jobs import Job, JobState, b4m_command, load_jobs, parse_jobs
from .scheduler import Scheduler, run_jobs
from .slots import Slot, make_slots, visible_gpus
from .summary import GOALS, STATUS_STYLE, read_metric, summary_table

__all__ = [
    "GOALS",
    "STATUS_STYLE",
    "Job",
    "JobState",
    "Scheduler",
    "Slot",
    "b4m_command",
    "load_jobs",
    "make_slots",
    "parse_jobs",
    "read_metric",
    "run_jobs",
    "summary_table",
    "visible_gpus",
]
