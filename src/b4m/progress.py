"""What long work shows while it runs: a rich progress bar on a terminal, plain lines in a log file or pipe."""

from __future__ import annotations

import os
import time
from collections.abc import Callable


#: Seconds between progress lines when output is not a terminal (a log file, a pipe, b4m sweep's job logs);
#: ``B4M_PROGRESS_SECONDS`` sets another (the app reads a run's progress from these lines every second).
def _seconds(text: str | None, default: float = 30.0) -> float:
    try:
        value = float(text) if text else default
    except ValueError:
        return default
    return value if value >= 0 else default


LOG_EVERY_S = _seconds(os.environ.get("B4M_PROGRESS_SECONDS"))

Progress = Callable[[int, int, float | None], None]


def count(n: int, noun: str) -> str:
    """``1 image``, ``4 images``: a number and its noun (plural with an s)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def say(console, text: str) -> None:
    """Print one plain line (no markup, no highlighting) on ``console``; nothing without one."""
    if console is not None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)


def progress_printer(console, label: str) -> Progress:
    """``update(step, total, loss_or_None)``: a rich progress bar with loss, it/s and ETA on a terminal; plain lines
    (at most one per :data:`LOG_EVERY_S` seconds, and the last step) when output goes to a file or pipe, where a bar
    shows nothing until it ends; silent without a console."""
    if console is None:
        return lambda step, total, loss: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        TextColumn("loss {task.fields[loss]}"),
        console=console,
    )
    live = console.is_terminal
    state = {"task": None, "t0": None, "first": None, "logged": None, "loss": "…"}

    def update(step: int, total: int, loss: float | None) -> None:
        now = time.perf_counter()
        if state["t0"] is None:
            state["t0"], state["first"], state["logged"] = now, step - 1, now
            if step > 1:
                say(console, f"{label}: resuming after step {step - 1}")
            if live:
                bar.start()
                state["task"] = bar.add_task(label, total=total, completed=step - 1, rate="", loss="…")
        elapsed = now - state["t0"]
        rate = f"{(step - state['first']) / elapsed:.2f} it/s" if elapsed >= 0.5 else ""  # none from one quick step
        if loss is not None:
            state["loss"] = f"{loss:.4f}"
        if live:
            bar.update(state["task"], completed=step, rate=rate, loss=state["loss"])
            if step == total:
                bar.stop()
        elif step == total or (loss is not None and now - state["logged"] >= LOG_EVERY_S):
            state["logged"] = now
            say(console, " ".join(x for x in (f"{label} step {step}/{total}", rate, f"loss {state['loss']}") if x))

    return update
