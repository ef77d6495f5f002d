"""The built-in world's training defaults: what ``b4m content``, ``style`` and ``make`` use on the world when no flag
or file says otherwise (SDXL and SD keep the official B4M settings of the config dataclasses).

The world's 32-px model learns a concept in tens of steps, not a thousand: these are the settings of ``b4m demo``
(docs/world.md), 90 steps of two images per set at lr 2e-3 for each break run and 80 steps at half that lr for make,
with every micro-step's images in one batch (the lr, then the make steps, then the break steps chosen on the dev
split within the demo's 5-minute CPU budget: docs/world.md, "The demo's pair"). Data only (no torch): the command
line reads it for its help.
"""

from __future__ import annotations

from typing import Any

BREAK_STEPS = 90  # 60 until 2026-12-07: 90 passes 9 of the 16 dev pairs at the demo's settings, 60 passes 8
MAKE_STEPS = 80  # 40 until 2026-12-06: 80 passes 8 of the 16 dev pairs at the demo's settings, 40 passes 5
LR = 2e-3
BATCH_SIZE = 2
RANK = 64

#: The demo's pair, fixed by a rule written before any test result: the first test pair in catalog order (both
#: novel, so they stand for a user's subject and an artist's style; docs/world.md, "The demo's pair").
DEMO_CONTENT, DEMO_STYLE = "star", "chevron"

#: Per stage, in the TOML layout of :class:`b4m.runs.config.StageConfig`.
TRAINING_DEFAULTS: dict[str, dict[str, Any]] = {
    "content": {
        "adapter": {"rank": RANK},
        "train": {"steps": BREAK_STEPS, "lr": LR, "batch_size": BATCH_SIZE, "grad_accum": 1},
    },
    "style": {
        "adapter": {"rank": RANK},
        "train": {"steps": BREAK_STEPS, "lr": LR, "batch_size": BATCH_SIZE, "grad_accum": 1},
    },
    "make": {"train": {"steps": MAKE_STEPS, "lr": LR / 2, "batch_size": BATCH_SIZE, "grad_accum": 1}},
}
