"""Run folders: the B4M stages as the commands run them (``b4m content``, ``style``, ``make``, ``generate``), each a
thin layer over :mod:`b4m.method`: check the inputs, load the model, call the method, write the folder.

=================  ==========================================================================================
module             job
=================  ==========================================================================================
``config``         :class:`StageConfig`: the TOML file < flags, presets, each stage's defaults
``stages``         :func:`run_break` (content, style) and :func:`run_make`
``generation``     :func:`generate`
``image_folder``   generate's output folder: images written as drawn, ``--resume``'s missing ones, the grid
``flow``           :func:`run_flow`: ``b4m run``, the four stages in one process, the model loaded once
``folder``         one run per folder, run.json, plain LoRA exports, reading a run back
``toml_files``     reading a config or flow file (paths beside it), values as TOML text
``aux``            auxiliary sets generated with the base model, cached
=================  ==========================================================================================
"""

from __future__ import annotations

from .._lazy import lazy_names

__all__, __getattr__ = lazy_names(
    __name__,
    {
        "config": "StageConfig load_config",
        "flow": "run_flow",
        "generation": "generate",
        "stages": "run_break run_make",
    },
)
