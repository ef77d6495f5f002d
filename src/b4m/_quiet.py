"""Third-party notices that say nothing to a b4m user."""

from __future__ import annotations

import logging

#: transformers' logger that reports an image processor's missing torchvision backend.
_LOGGER = "transformers.utils.import_utils"


class _NoTorchvisionNotice(logging.Filter):
    """Drops transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to …Pil" notice.

    Importing diffusers' SD and SDXL pipelines imports transformers' CLIP and SigLIP image processors (for the safety
    checker and IP-Adapter, which b4m never calls); without torchvision transformers says so on every command. The
    PIL fallback it names is complete for b4m, so the notice only adds noise. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


_FILTER = _NoTorchvisionNotice()


def quiet_torchvision_notice() -> None:
    """Install the filter on transformers' import logger (once; idempotent)."""
    logger = logging.getLogger(_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
