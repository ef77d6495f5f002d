"""B4M, the method (paper section 4): the one implementation that the commands (``b4m content``, ``style``,
``make``, ``generate``), the demo, the benchmark and every ablation call.

- :mod:`.config`: :class:`B4MConfig` and :class:`MakeConfig`, every setting and default;
- :mod:`.stages`: :func:`break_run`, :func:`fuse`, :func:`make`, :func:`generate`, and :func:`run` (all four for one
  pair, as the benchmark runs them).

The names below are imported on first use.
"""

from __future__ import annotations

from .._lazy import lazy_names

__all__, __getattr__ = lazy_names(
    __name__,
    {
        "config": "B4MConfig MakeConfig",
        "stages": "B4MResult applied_adapter break_run break_train_config fuse generate make make_sets run",
    },
)
