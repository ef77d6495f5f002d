"""``PLPConfig``: everything that defines a PLP adapter's structure (two adapters fuse only if these agree)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import B4MError
from ..settings import setting

FROZEN_INITS = ("approx", "exact", "random")
LEARNED_INITS = ("zero", "kaiming", "gaussian")
ASSIGNMENTS = ("paper", "official")
ROLES = ("content", "style")
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: FLUX.1's default targets (a full-match regex): the attention projections of every double-stream block (image
#: stream ``to_q/k/v``, ``to_out.0``; text stream ``add_q/k/v_proj``, ``to_add_out``) and of every single-stream block
#: (``attn.to_q/k/v``, and ``proj_mlp`` and ``proj_out``, the MLP input and the attention+MLP output projection, which
#: are not square: hidden → 4·hidden and 5·hidden → hidden). Those are the layers that attend and mix text with image
#: tokens, the transformer's counterpart of a UNet's attention projections (:data:`DEFAULT_TARGETS`); single blocks
#: carry half of FLUX.1's depth and put their attention output through ``proj_out``, so leaving them out would adapt
#: only part of the attention. A regex rather than suffixes because the suffix ``proj_out`` also names the model's
#: final output layer (``proj_out`` at the top level), which is not adapted (nor writable in the kohya/BFL format).
FLUX_TARGETS = (
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|single_transformer_blocks\.\d+\.(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp|proj_out)"
)
#: FLUX.2 [klein]'s default targets (a full-match regex): the attention projections of every double-stream block, as
#: FLUX.1's (image stream ``to_q/k/v``, ``to_out.0``; text stream ``add_q/k/v_proj``, ``to_add_out``), and of every
#: single-stream block, where FLUX.2 fuses them with the MLP: ``attn.to_qkv_mlp_proj`` (q, k, v and the SwiGLU's two
#: inputs: hidden → 3·hidden + 2·mlp, e.g. 3072 → 27648 in klein 4B) and ``attn.to_out`` (attention output and MLP
#: output: hidden + mlp → hidden). The fused layers cannot be split without leaving part of the attention unadapted,
#: so they are adapted whole: non-square layers, where PLP's frozen fractions are computed per side. The reason is
#: FLUX.1's (:data:`FLUX_TARGETS`): the layers that attend and mix text with image tokens. A regex, as FLUX.1's, so
#: that only the blocks' layers match (the embedders, modulations and the top-level ``proj_out`` are not adapted).
KLEIN_TARGETS = (
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
)
#: The default targets of a denoiser by its class name (peft's per-model-type mapping): what an adapter whose
#: :attr:`PLPConfig.targets` is empty adapts, resolved where it is attached
#: (:func:`b4m.adapter.walker.resolve_targets`, which also looks at the class's bases). Any other model gets
#: :data:`DEFAULT_TARGETS` (SD's and SDXL's UNet, the built-in world's).
MODEL_TARGETS: dict[str, str] = {"FluxTransformer2DModel": FLUX_TARGETS, "Flux2Transformer2DModel": KLEIN_TARGETS}
_BREAK = ("content", "style")  # the b4m commands whose --rank and --seed set a field (b4m.cli reads the metadata)


@dataclass
class PLPConfig:
    """Everything that defines a PLP adapter's structure. Two adapters can be fused only if these agree.

    Each field's ``metadata["help"]`` says what it does; ``flag`` and ``commands`` name its command-line option and
    the ``b4m`` commands that offer it.
    """

    rank: int = setting(64, "LoRA rank r.", flag="--rank", commands=_BREAK)
    ratio: float = setting(0.5, "Frozen fraction d of each factor's feature dimension (paper 5.7), in [0, 1).")
    init: str = setting(
        "approx", "Frozen-part init: approx (paper/official), exact (A·C = 0), random (w/o Orth ablation)."
    )
    seed: int = setting(
        0,
        "Seed of the frozen parts A and C (and of a non-zero D init); runs to fuse must share it.",
        flag="--seed",
        commands=_BREAK,
    )
    assignment: str = setting("paper", "paper: content = B (up), style = D (down); official: the swap.")
    targets: list[str] | str = setting(
        help="Module names: a list of exact names or dotted suffixes, or one full-match regex; empty: the adapted "
        "model's own (to_q, to_k, to_v, to_out.0; FLUX.1 and FLUX.2 klein: their attention projections).",
        factory=list,
    )
    exclude: list[str] | str = setting(help="Same rule as targets; wins.", factory=list)
    base_model: str = setting("", "Identity of the base model the adapter belongs to.")
    learned_init: str = setting(
        "zero",
        "Init of the learned down half D (B is always zero): zero (B4M), kaiming (peft's LoRA default, "
        "U(±1/√n)) or gaussian (N(0, 1/r²), diffusers' DreamBooth-LoRA). ratio 0 needs a non-zero one.",
    )

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise B4MError(f"rank must be >= 1, got {self.rank}")
        if not 0 <= self.seed < 2**32:  # numpy's PCG64 seeds the frozen parts with it
            raise B4MError(f"seed must be a whole number from 0 to 2**32 - 1, got {self.seed}")
        if not 0.0 <= self.ratio < 1.0:
            raise B4MError(f"ratio must be in [0, 1), got {self.ratio} (1 would leave nothing to learn)")
        if self.learned_init not in LEARNED_INITS:
            raise B4MError(f"learned_init must be one of {LEARNED_INITS}, got {self.learned_init!r}")
        if self.ratio == 0.0 and self.learned_init == "zero":
            raise B4MError(
                "ratio 0 leaves no frozen part: with B = D = 0 nothing would ever receive a gradient; use ratio > 0 "
                "or a non-zero learned_init ('kaiming' or 'gaussian')"
            )
        if self.init not in FROZEN_INITS:
            raise B4MError(f"init must be one of {FROZEN_INITS}, got {self.init!r}")
        if self.assignment not in ASSIGNMENTS:
            raise B4MError(f"assignment must be one of {ASSIGNMENTS}, got {self.assignment!r}")
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)

    def frozen_dims(self, m: int, n: int) -> tuple[int, int]:
        """``(d_out, d_in)``: the frozen rows of ``W_up`` and columns of ``W_down`` of an ``m × n`` layer."""
        return int(self.ratio * m), int(self.ratio * n)

    def half_of(self, role: str) -> str:
        """``"up"`` (B) or ``"down"`` (D): the learned half that holds ``role`` ("content" or "style")."""
        if role not in ROLES:
            raise B4MError(f"role must be one of {ROLES}, got {role!r}")
        content = "up" if self.assignment == "paper" else "down"
        if role == "content":
            return content
        return "down" if content == "up" else "up"

    def half_scales(self, content_scale: float, style_scale: float) -> tuple[float, float]:
        """(up_scale, down_scale): the content and style multipliers placed on the halves that hold them."""
        if self.half_of("content") == "up":
            return content_scale, style_scale
        return style_scale, content_scale

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PLPConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise B4MError(f"unknown PLP config keys: {', '.join(unknown)}")
        return cls(**data)
