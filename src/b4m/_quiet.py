"""Third-party notices that say nothing to a b4m user, dropped where they are logged.

Each is a (logger, text) pair in :data:`NOTICES`; :func:`quiet_import_notices` (run when ``b4m`` is imported, before
any library it names is) puts one filter on each of those loggers that drops the records containing the text. Every
other record passes, so a library's real warnings still reach the user.
"""

from __future__ import annotations

import logging

#: ``{logger: (text, why it says nothing to a b4m user)}``.
NOTICES: dict[str, tuple[str, str]] = {
    # Importing diffusers' SD and SDXL pipelines imports transformers' CLIP and SigLIP image processors (for the
    # safety checker and IP-Adapter, which b4m never calls); without torchvision transformers says so on every
    # command. The PIL fallback it names is complete for b4m.
    "transformers.utils.import_utils": ("requires torchvision (not installed)", "image processors b4m never calls"),
    # torchao (the `lowmem` extra, 8-bit base weights) loads its optional C++ kernels at import; a build made for
    # another torch (a CPU torch, an older CUDA) fails to load them, and its weight-only int8/float8 path, the one
    # b4m uses, runs without them.
    "torchao": ("Failed to load ", "torchao's optional kernels for another torch build"),
    # torchao registers Enum types with torch's pytree, which newer torch deprecates (a note to torchao's authors).
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported", "torchao's pytree registration"),
    # diffusers imports torchao's serialized tensor types when torchao is installed; their module moved in torchao
    # 0.18. Only loading a checkpoint saved quantized by torchao needs them, which b4m never does.
    "diffusers.quantizers.torchao.torchao_quantizer": (
        "Unable to import `torchao` Tensor objects",
        "torchao-serialized checkpoints, which b4m never loads",
    ),
}


class _DropNotice(logging.Filter):
    """Drops a logger's records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_import_notices() -> None:
    """Install the filter of every :data:`NOTICES` entry on its logger (idempotent)."""
    for name, (text, _) in NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.text == text for f in logger.filters):
            logger.addFilter(_DropNotice(text))
