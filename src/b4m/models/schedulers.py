"""Sampling schedulers by short name (``SampleRequest.scheduler``, the CLI's ``--scheduler``); each announces its steps
(:mod:`b4m.models.steps`)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..errors import B4MError
from .steps import announcing

#: Short name -> diffusers scheduler class. Every class is built from the base model's own scheduler config, so the
#: model's noise schedule and prediction type (epsilon or v) carry over.
SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCMultistepScheduler,
}


def make_scheduler(name: str, config: Mapping[str, Any]) -> SchedulerMixin:
    """A fresh scheduler ``name`` from a model's scheduler ``config``.

    Args:
        name: A key of :data:`SCHEDULERS`.
        config: The base model's scheduler config (any diffusers scheduler's ``.config``).

    Returns:
        A new scheduler instance (schedulers keep per-run state, so each sampling run gets its own) that announces
        each step it begins (:func:`b4m.models.steps.announcing`).

    Raises:
        B4MError: ``name`` is not a known scheduler.
    """
    cls = SCHEDULERS.get(name)
    if cls is None:
        raise B4MError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULERS)}")
    overrides = {}
    if "clip_sample" not in config and "clip_sample" in inspect.signature(cls.__init__).parameters:
        # Latents are not in [-1, 1]: a config written for another scheduler must not get DDIM's clipping default.
        overrides["clip_sample"] = False
    return announcing(cls.from_config(config, **overrides))
