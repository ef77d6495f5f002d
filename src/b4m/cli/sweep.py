"""``sweep``: independent b4m commands at once, one per free GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .console import console


def sweep(
    jobs: Annotated[
        Path,
        typer.Argument(help="Jobs file (TOML or JSON): name, argv (a b4m command) or command, depends_on, seeds."),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for logs/ and summary.json.")] = Path(
        "runs/sweep"
    ),
    workers: Annotated[int | None, typer.Option(help="Jobs at once (default: one per GPU; 1 without a GPU).")] = None,
    gpus: Annotated[
        str | None, typer.Option(help="GPU indices to use, e.g. 0,1 (default: every visible one).")
    ] = None,
    jobs_per_gpu: Annotated[int | None, typer.Option(help="Jobs sharing each GPU at once (default 1).")] = None,
    retries: Annotated[int | None, typer.Option(help="Times a failed job is run again (default 1).")] = None,
    metric: Annotated[
        str | None, typer.Option(help="Key of each job's run.json/results.json to rank by, e.g. final_loss.")
    ] = None,
    goal: Annotated[str | None, typer.Option(help="min or max: which end of the metric ranks first.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the jobs and the slots, and exit.")] = False,
) -> None:
    """Run independent b4m commands at once, one per free GPU: content and style runs, make per pair, seeds."""
    from ..sweep import load_jobs, make_slots, run_jobs

    job_list, settings = load_jobs(jobs)

    def pick(flag, key: str, default):  # a flag wins over the jobs file's [settings]
        return flag if flag is not None else settings.get(key, default)

    slots = make_slots(pick(workers, "workers", None), pick(gpus, "gpus", None), pick(jobs_per_gpu, "jobs_per_gpu", 1))
    if dry_run:
        for job in job_list:
            after = f"  (after {', '.join(job.depends_on)})" if job.depends_on else ""
            console.print(f"{job.name}: {job.display}{after}", highlight=False, markup=False, soft_wrap=True)
        console.print("slots: " + ", ".join(s.name for s in slots), highlight=False)
        return
    summary = run_jobs(
        job_list,
        output,
        slots=slots,
        retries=pick(retries, "retries", 1),
        metric=pick(metric, "metric", None),
        goal=pick(goal, "goal", "min"),
        console=console,
    )
    if summary["failed"] or summary["skipped"]:
        raise typer.Exit(1)
