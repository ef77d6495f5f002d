"""Base models behind one interface, :class:`DiffusionModel` (SDXL, SD 1.x/2.x; the built-in world implements it
too, in :mod:`b4m.world.model`).

Importing this package loads nothing; the interface (torch and PIL) on first use of its names, and the diffusers
families and their loading live in :mod:`.diffusers_common`, :mod:`.sd`, :mod:`.sdxl` and :mod:`.loading`.
:func:`b4m.loading.load_model` picks the model any command names.
"""

from __future__ import annotations

from .._lazy import lazy_names

__all__, __getattr__ = lazy_names(__name__, {"base": "Conditioning DiffusionModel SampleRequest"})
