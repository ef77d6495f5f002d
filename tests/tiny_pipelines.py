"""Tiny SD, SDXL and FLUX pipelines built in code and saved as diffusers folders: nothing is downloaded.

Images are 32 px: the VAE has two blocks (factor 2) and the UNets a 16 px sample size. The tokenizer is a byte-level
CLIP BPE whose vocabulary holds every byte (alone and word-final) plus a few whole words, written by
:func:`write_clip_vocab`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from conftest import TINY_SD_UNET, TINY_SDXL_UNET

IMAGE_SIZE = 32
MAX_LENGTH = 77
WORDS = ("a", "photo", "of", "cat", "dog", "in", "the", "style", "painting", "sks")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)

# Text dims of the tiny encoders: SD 24; SDXL 16 + 24 = 40 (the UNets' cross_attention_dim), pooled projection 32.
SD_TEXT = 24
SDXL_TEXT = (16, 24)
SDXL_POOLED = 32

SD_UNET = {**TINY_SD_UNET, "sample_size": IMAGE_SIZE // 2, "cross_attention_dim": SD_TEXT}
SDXL_UNET = {
    **TINY_SDXL_UNET,
    "sample_size": IMAGE_SIZE // 2,
    "cross_attention_dim": sum(SDXL_TEXT),
    "projection_class_embeddings_input_dim": 6 * TINY_SDXL_UNET["addition_time_embed_dim"] + SDXL_POOLED,
}


def write_clip_vocab(folder: Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of a byte-level CLIP BPE into ``folder``.

    Every byte character is a token alone and with CLIP's word-end mark ``</w>``, so any text tokenizes; the merges
    build :data:`WORDS` left to right into whole-word tokens.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chars = ByteLevel.alphabet()
    vocab = [*chars, *(c + "</w>" for c in chars)]
    merges = []
    for word in WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.append(parts[0])
    vocab = list(dict.fromkeys([*vocab, BOS, EOS]))
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *dict.fromkeys(merges)]) + "\n", encoding="utf-8")
    return folder


def make_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """A CLIP tokenizer over the tiny vocabulary (its files are written to a temporary folder and read back)."""
    with tempfile.TemporaryDirectory() as folder:
        vocab = write_clip_vocab(Path(folder))
        return CLIPTokenizer.from_pretrained(vocab, pad_token=pad_token, model_max_length=MAX_LENGTH)


def _text_config(tokenizer: CLIPTokenizer, hidden: int, projection: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_vae(scaling_factor: float, seed: int = 0) -> AutoencoderKL:
    """A two-block VAE (factor 2, 4 latent channels)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
    )


def _unet(config: dict, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config)


def save_tiny_sdxl(path: str | Path) -> Path:
    """Save a tiny SDXL pipeline folder (Euler sampler, epsilon prediction) at ``path`` and return it."""
    path = Path(path)
    tokenizer = make_tokenizer()
    tokenizer_2 = make_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!"
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(_text_config(tokenizer, SDXL_TEXT[0]))
    torch.manual_seed(2)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, SDXL_TEXT[1], SDXL_POOLED))
    pipe = StableDiffusionXLPipeline(
        vae=make_vae(0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_unet(SDXL_UNET, seed=3),
        scheduler=EulerDiscreteScheduler(**BETAS, steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False,
    )
    pipe.save_pretrained(path)
    return path


def save_tiny_sd(path: str | Path, prediction_type: str = "epsilon") -> Path:
    """Save a tiny SD 1.x-style pipeline folder (PNDM sampler) at ``path`` and return it.

    ``prediction_type="v_prediction"`` makes it an SD 2.x-v-style model.
    """
    path = Path(path)
    tokenizer = make_tokenizer()
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(_text_config(tokenizer, SD_TEXT))
    pipe = StableDiffusionPipeline(
        vae=make_vae(0.18215),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=_unet(SD_UNET, seed=3),
        scheduler=PNDMScheduler(
            **BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


# FLUX: CLIP 16 wide (pooled 16), T5 24 wide (the joint attention width), 16 latent channels packed into 64.
FLUX_CLIP = 16
FLUX_T5 = 24
FLUX_T5_LENGTH = 16
FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=FLUX_T5,
    pooled_projection_dim=FLUX_CLIP,
    guidance_embeds=True,  # like FLUX.1-dev
    axes_dims_rope=(2, 2, 4),
)
# FLUX.1-dev's scheduler config (resolution-dependent shift at sampling time).
FLUX_SCHEDULER = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
# FLUX.1 schnell's scheduler config (a static shift of 1: none; its 4 sampling steps are what it was distilled for).
SCHNELL_SCHEDULER = {**FLUX_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}


def make_t5_tokenizer(max_length: int = FLUX_T5_LENGTH) -> T5TokenizerFast:
    """A T5 (SentencePiece-style unigram) tokenizer built in code: every lower-case letter and digit, the words of
    :data:`WORDS` whole, ``</s>`` appended to every prompt, padded with ``<pad>`` (id 0) as T5's."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces += [("\u2581" + w, -0.5) for w in WORDS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


def save_tiny_flux(path: str | Path, *, schnell: bool = False) -> Path:
    """Save a tiny FLUX.1-dev-like pipeline folder at ``path`` and return it: one double and one single block,
    guidance embedding, 16 latent channels with FLUX.1's VAE shift and scale, FLUX.1-dev's scheduler config.
    ``schnell``: FLUX.1-schnell-like instead: no guidance embedding, schnell's scheduler config, and T5's own 512-token
    limit (so that schnell's 256 tokens show)."""
    path = Path(path)
    tokenizer = make_tokenizer()
    tokenizer_2 = make_t5_tokenizer(512 if schnell else FLUX_T5_LENGTH)
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(_text_config(tokenizer, FLUX_CLIP))
    torch.manual_seed(2)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=FLUX_T5,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=0,
        )
    )
    torch.manual_seed(3)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    torch.manual_seed(4)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(SCHNELL_SCHEDULER if schnell else FLUX_SCHEDULER)),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=FluxTransformer2DModel(**{**FLUX_TRANSFORMER, "guidance_embeds": not schnell}),
    )
    pipe.save_pretrained(path)
    return path


# FLUX.2 [klein]: a Qwen3 text encoder 8 wide with 27 layers (the pipeline stacks the hidden states of layers 9, 18
# and 27: 3 · 8 = 24 = the transformer's joint attention width), 4 VAE latent channels patchified 2×2 into 16.
KLEIN_TEXT = 8
KLEIN_TEXT_LAYERS = 27
KLEIN_TEXT_LENGTH = 64
KLEIN_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=3 * KLEIN_TEXT,
    timestep_guidance_channels=16,
    axes_dims_rope=(2, 2, 2, 2),
    guidance_embeds=False,  # like FLUX.2 [klein] base: not guidance-distilled
)
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's chat template cut to what Flux2KleinPipeline uses: one user turn, the generation prompt and, with
# enable_thinking=False, the empty think block.
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def make_qwen_tokenizer():
    """A Qwen2-style byte-level BPE tokenizer built in code: every byte, the words of :data:`WORDS` whole (with and
    without a leading space), Qwen's chat special tokens, padded with ``<|endoftext|>``, and a chat template."""
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast

    chars = ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    merges = []
    for word in (*WORDS, *("\u0120" + w for w in WORDS), "user", "assistant"):
        parts = list(word)
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in QWEN_SPECIAL])
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=KLEIN_TEXT_LENGTH,
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def save_tiny_flux2(path: str | Path) -> Path:
    """Save a tiny FLUX.2 [klein] base-like pipeline folder at ``path`` and return it: one double and one single
    block, no guidance embedding (true CFG in the pipeline), a 27-layer Qwen3, a FLUX.2 VAE whose batch-norm
    statistics are not the identity, FLUX.1-dev's flow-matching scheduler config (dynamic shift)."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = Path(path)
    tokenizer = make_qwen_tokenizer()
    torch.manual_seed(1)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=KLEIN_TEXT,
            intermediate_size=16,
            num_hidden_layers=KLEIN_TEXT_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=4,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(3)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    vae.bn.running_mean.copy_(torch.randn(16) * 0.1)
    vae.bn.running_var.copy_(torch.rand(16) + 0.5)
    torch.manual_seed(4)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=Flux2Transformer2DModel(**KLEIN_TRANSFORMER),
        is_distilled=False,
    )
    pipe.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Reference images for the commands' end-to-end tests


def save_square_images(folder: str | Path, n: int, colour: tuple[int, int, int]) -> str:
    """``n`` 40-px PNGs of a ``colour`` square on white (each a pixel taller than the one before) in a new
    ``folder``; returns its path."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True)
    for i in range(n):
        a = np.full((40, 40, 3), 255, np.uint8)
        a[8 + i : 32, 8:32] = colour
        Image.fromarray(a).save(folder / f"{i}.png")
    return str(folder)


def dog_and_yarn(root: str | Path) -> dict[str, str]:
    """A content (``dog``), a style (``yarn``) and one auxiliary set for each run (``aux``: another style for the
    content run, ``content_aux``: another object for the style run), two images each, under ``root``."""
    root = Path(root)
    save_square_images(root / "aux" / "set0", 2, (0, 0, 200))
    (root / "aux" / "set0" / "prompt.txt").write_text("a cat in style0 style")
    save_square_images(root / "caux" / "obj0", 2, (0, 150, 0))
    (root / "caux" / "obj0" / "prompt.txt").write_text("a photo of obj0")
    return {
        "dog": save_square_images(root / "dog", 2, (120, 60, 20)),
        "yarn": save_square_images(root / "yarn", 2, (250, 100, 200)),
        "aux": str(root / "aux"),
        "content_aux": str(root / "caux"),
    }
