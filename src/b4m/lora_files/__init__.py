"""Plain LoRA interchange: export any adapter as a LoRA file other tools read, and import such files back.

The interchange type is :data:`Factors` (:mod:`.factors`): ``{module name: (up, down)}`` with module names relative
to the denoiser in diffusers spelling (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` in a UNet,
``transformer_blocks.0.attn.to_q`` in a FLUX.1 transformer), ``up`` ``m × r``, ``down`` ``r × n`` and
``ΔW = up @ down`` (every scale already folded into ``up``).

Two file formats are written:

- ``diffusers``: the peft layout ``unet.<module>.lora_A.weight`` (down) / ``unet.<module>.lora_B.weight`` (up) with
  ``lora_alpha = rank`` stored in diffusers' ``lora_adapter_metadata`` entry, so
  ``StableDiffusion(XL)Pipeline.load_lora_weights`` applies the factors with scale exactly 1.
- ``kohya``: ``lora_unet_<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (= rank) for ComfyUI and
  A1111, in diffusers module naming (SD 1.x/2.x) or the original SGM block naming kohya sd-scripts uses for SDXL.
  Every key is checked against diffusers' own kohya renaming before writing (SDXL's ``add_embedding`` is spelled
  ``label_emb_0_0``/``_0_2`` in both namings: diffusers drops ``add_embedding_linear_*``); :func:`save_lora` returns
  the naming it used.

Reading also accepts the old diffusers layout (``<module>.lora.down.weight``, ``..._lora.down.weight``), including
the official B4M repository's ``unet.unet.<module>.lora.down.weight`` keys, and b4m's own older kohya files (SDXL's
``lora_unet_add_embedding_linear_*``). Renaming between kohya and diffusers names is done by diffusers' own
converters; this module only pairs, checks and rescales the tensors.

FLUX.1 transformers (``save_lora(..., family="flux")``; ``load_lora`` tells FLUX files by their keys): the diffusers
format under ``transformer.`` (``FluxPipeline.load_lora_weights``), and the kohya/BFL naming of sd-scripts and
ComfyUI (``lora_unet_double_blocks_0_img_attn_qkv``), whose fused qkv / linear1 layers carry block-diagonal factors
(:mod:`.flux`). FLUX.2 [klein] (``family="flux2"``) the same, in its own names (fused ``qkv`` only in the double
blocks); files of either family are read back.
"""

from __future__ import annotations

from .._lazy import lazy_names

__all__, __getattr__ = lazy_names(
    __name__,
    {
        "factors": "Factors applied apply_factors check_factors check_factors_fit",
        "formats": "EXPORT_DTYPES FORMATS",
        "names": "KOHYA_NAMINGS sgm_module_name",
        "flux": "FUSED_KEY",
        "read": "detect_format load_lora",
        "write": "DTYPE_NAMES FAMILIES SAVE_DTYPES dtype_from_name save_lora",
    },
)
