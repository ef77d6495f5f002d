"""b4m: Break-for-Make content-style customization of text-to-image diffusion models."""

from .errors import B4MError
from .plp import PLPConfig, PLPLinear, add_plp, dry_run, merge_plp, plp_layers, remove_plp, set_scales

__version__ = "0.1.0"

__all__ = [
    "B4MError",
    "PLPConfig",
    "PLPLinear",
    "__version__",
    "add_plp",
    "dry_run",
    "merge_plp",
    "plp_layers",
    "remove_plp",
    "set_scales",
]
