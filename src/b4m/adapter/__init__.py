"""The B4M adapter: PLP layers, their initialisation, the walker that attaches them, the Riemannian preconditioner
and the ``.b4m.safetensors`` file. Depends on torch (and numpy) only: nothing here knows about diffusion models.

=================  ==========================================================================================
module             job
=================  ==========================================================================================
``config``         :class:`PLPConfig`: rank, frozen ratio, init, seed, half assignment, targets
``init``           the frozen parts A, C and the learned D at step 0 (platform-stable PCG64 streams)
``lowrank``        the low-rank product and its add as one autograd node, with per-sample gradient routing
``layer``          :class:`PLPLinear`, wrapping one ``nn.Linear`` (training, sampling, merge)
``walker``         attach/remove/merge every layer of a model, routing, generation scales, dry run
``optim``          the Riemannian preconditioner around any torch optimizer
``file``           :class:`AdapterFile`: save/load, fingerprints, ``fuse``, attach to a model, plain factors
=================  ==========================================================================================

The names below are imported on first use: reading a :class:`PLPConfig` default does not load torch.
"""

from __future__ import annotations

from .._lazy import lazy_names

__all__, __getattr__ = lazy_names(
    __name__,
    {
        "config": "DEFAULT_TARGETS MODEL_TARGETS PLPConfig",
        "file": "AdapterFile adapter_from_model apply_adapter attached fuse load_adapter model_factors save_adapter",
        "layer": "PLPLinear",
        "optim": "create_optimizer precondition_",
        "walker": "add_plp dry_run merge_plp plp_layers remove_plp resolve_targets routing set_scales",
    },
)
