"""Base models behind one interface, :class:`DiffusionModel` (SDXL, SD 1.x/2.x; the built-in world implements it
too, in :mod:`b4m.world.model`).

Importing this package loads only the interface (torch and PIL): the diffusers families and their loading live in
:mod:`.diffusers_common`, :mod:`.sd`, :mod:`.sdxl` and :mod:`.loading`. :func:`b4m.loading.load_model` picks the
model any command names.
"""

from .base import Conditioning, DiffusionModel, SampleRequest

__all__ = ["Conditioning", "DiffusionModel", "SampleRequest"]
