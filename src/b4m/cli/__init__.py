"""The ``b4m`` command line: a thin layer over the Python API (errors print as one line, without a traceback).

=============  ======================================================================================================
module         job
=============  ======================================================================================================
``app``        the typer app: the root (``--version``), every command bound to its name, :func:`main`
``options``    the stages' options, generated from the config dataclasses' field metadata
``stages``     ``content``, ``style``, ``make``, ``generate``
``files``      ``inspect``, ``dry-run``, ``fuse``, ``export``
``world``      ``world pretrain``, ``world oracle``, ``world evaluate``, ``demo``
``bench``      ``bench``, ``eval``
``sweep``      ``sweep``
``console``    the console every command prints on
=============  ======================================================================================================
"""

from .app import app, main

__all__ = ["app", "main"]
