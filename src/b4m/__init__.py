"""b4m: Break-for-Make content-style customization of text-to-image diffusion models.

The names below are imported on first use (``b4m.PLPConfig`` loads the adapter layer, ``b4m.load_model`` the model
loaders), so ``import b4m`` stays cheap. The layers of the package and what each holds: docs/design.md.
"""

from __future__ import annotations

from ._lazy import lazy_names
from ._quiet import quiet_import_notices
from .errors import B4MError
from .version import __version__

quiet_import_notices()  # before any library whose notices it drops is imported (b4m._quiet)

_api, __getattr__ = lazy_names(
    __name__,
    {
        "b4m.adapter": (
            "PLPConfig PLPLinear AdapterFile add_plp dry_run fuse load_adapter merge_plp plp_layers remove_plp "
            "save_adapter set_scales"
        ),
        "b4m.loading": "load_model",
        "b4m.method": "B4MConfig MakeConfig",
    },
)
__all__ = ["B4MError", "__version__", *_api]
