"""Metrics: the paper's cosine scores on real models (`real`), folders of images (`evaluate`), statistics (`stats`).

transformers is imported only when a metric model loads.
"""

from .evaluate import evaluate_folder
from .real import ClipEncoder, DinoEncoder, load_clip, load_dino, prompt_text, score_images
from .stats import Interval, bootstrap_mean, format_interval, paired_bootstrap, wilson_interval

__all__ = [
    "ClipEncoder",
    "DinoEncoder",
    "Interval",
    "bootstrap_mean",
    "evaluate_folder",
    "format_interval",
    "load_clip",
    "load_dino",
    "paired_bootstrap",
    "prompt_text",
    "score_images",
    "wilson_interval",
]
