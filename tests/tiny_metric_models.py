"""Tiny random CLIP and DINOv2 models built from configs and saved like Hub checkpoints (no download), for the tests
of the paper's metrics (`b4m.metrics`, `b4m eval`)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import (
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    Dinov2Config,
    Dinov2Model,
)

SIDE = 32  # the models' image size


def tokenizer() -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (no merges): enough to turn any lowercase prompt into tokens."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({f"{c}</w>": len(letters) + i for i, c in enumerate(letters)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def save_tiny_metric_models(root: Path) -> tuple[Path, Path]:
    """Save a tiny CLIP (with its tokenizer and image processor) and a tiny DINOv2 under ``root``; returns their
    folders ``(clip, dino)``."""
    tok = tokenizer()
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    text = dict(
        small,
        vocab_size=len(tok),
        max_position_embeddings=77,
        bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(0)
    vision = dict(small, image_size=SIDE, patch_size=8)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    # initializer_range wider than the default 0.02, so random images get clearly different embeddings
    dino = Dinov2Model(Dinov2Config(**small, image_size=SIDE, patch_size=8, initializer_range=0.2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip_proc = CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
        dino_proc = BitImageProcessor(size={"shortest_edge": SIDE + 4}, crop_size={"height": SIDE, "width": SIDE})
    for model, proc, name in ((clip, clip_proc, "clip"), (dino, dino_proc, "dino")):
        model.save_pretrained(root / name)
        proc.save_pretrained(root / name)
    tok.save_pretrained(root / "clip")
    return root / "clip", root / "dino"
