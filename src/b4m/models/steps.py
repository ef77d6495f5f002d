"""Where a sampler is: every sampler b4m makes announces each step it begins as ``(index, steps)``, and whoever
needs it per step listens (K-LoRA's choice of LoRA per layer and step: :mod:`b4m.adapter.klora`).

The announcement comes from the sampler that the sampling loop drives, so every loop that runs one of b4m's samplers
announces its steps with no change to the loop: the world model's own loop and diffusers' SD and SDXL pipelines
alike. :func:`announcing` wraps a scheduler (:func:`b4m.models.schedulers.make_scheduler` and
:meth:`~b4m.models.diffusers_common.DiffusersModel.make_sampler` wrap every one they make):

- ``set_timesteps`` starts a run of ``steps = len(timesteps)`` loop iterations and announces step 0;
- ``set_begin_index`` (img2img's shortened schedules) announces the step the loop starts at;
- ``step`` ends a step; unless it was the last, the next one begins and is announced.

So step ``i`` is announced before the loop's denoiser calls of step ``i``, however many those are (one batched
call with classifier-free guidance, two without), and ``steps`` is the number of the loop's steps: ``N`` for DDIM,
Euler, DPM-Solver or UniPC at ``N`` steps (PNDM runs more: its Runge-Kutta warm-up adds iterations). Listeners hear
every b4m sampler stepping in their thread while they listen (:func:`step_listener`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

StepListener = Callable[[int, int], None]
"""``listener(index, steps)``: step ``index`` (0-based) of ``steps`` begins."""

_LISTENERS: contextvars.ContextVar[tuple[StepListener, ...]] = contextvars.ContextVar("b4m_step_listeners", default=())


@contextlib.contextmanager
def step_listener(listener: StepListener) -> Iterator[None]:
    """Call ``listener(index, steps)`` at every step a sampler begins in this thread, for the duration of the block."""
    token = _LISTENERS.set((*_LISTENERS.get(), listener))
    try:
        yield
    finally:
        _LISTENERS.reset(token)


def announce(index: int, steps: int) -> None:
    """Step ``index`` of ``steps`` begins: tell every listener (what a hand-written sampling loop calls)."""
    for listener in _LISTENERS.get():
        listener(index, steps)


def announcing(scheduler: Any) -> Any:
    """``scheduler`` (a diffusers scheduler) made to announce its steps (see the module docstring); returns it."""
    set_timesteps, step = scheduler.set_timesteps, scheduler.step
    state = {"index": 0, "steps": 0}

    def begin(index: int) -> None:
        state["index"] = index
        if 0 <= index < state["steps"]:
            announce(index, state["steps"])

    @functools.wraps(set_timesteps)
    def announcing_set_timesteps(*args: Any, **kwargs: Any) -> Any:
        out = set_timesteps(*args, **kwargs)
        state["steps"] = len(scheduler.timesteps)
        begin(0)
        return out

    @functools.wraps(step)
    def announcing_step(*args: Any, **kwargs: Any) -> Any:
        out = step(*args, **kwargs)
        begin(state["index"] + 1)
        return out

    scheduler.set_timesteps, scheduler.step = announcing_set_timesteps, announcing_step
    if hasattr(scheduler, "set_begin_index"):
        set_begin_index = scheduler.set_begin_index

        @functools.wraps(set_begin_index)
        def announcing_set_begin_index(begin_index: int = 0) -> Any:
            out = set_begin_index(begin_index)
            begin(int(begin_index))
            return out

        scheduler.set_begin_index = announcing_set_begin_index
    return scheduler
