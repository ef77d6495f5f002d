"""The training loop every run uses (B4M's three stages and every baseline), and what it needs around it.

=================  ==========================================================================================
module             job
=================  ==========================================================================================
``config``         :class:`TrainConfig`: steps, lr, routing, batch, precision, speed switches, checkpoints
``sets``           :class:`TrainSet`: a set's cached latents and conditioning; encoding image sets once
``loop``           :func:`train`: draw, forward, backward, step; routing, accumulation, NaN stop, validation
``checkpoint``     atomic checkpoints, exact resume (fingerprint, optimizer, CPU generator)
``objective``      :class:`Objective`: train something else than PLP halves against another target (ZipLoRA)
``distributed``    data parallelism under ``accelerate launch`` (a no-op in one process)
``runs``           :func:`train_adapter` (attach, train, snapshot, take off) and a memo of finished runs
=================  ==========================================================================================

The names below are imported on first use (a :class:`TrainConfig` default does not load torch).
"""

from __future__ import annotations

from .._lazy import lazy_names

__all__, __getattr__ = lazy_names(
    __name__,
    {
        "config": "TrainConfig",
        "loop": "TrainResult train",
        "objective": "Objective",
        "runs": "RunRecord train_adapter",
        "sets": "TrainSet encode_set encode_sets",
    },
)
