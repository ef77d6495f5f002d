"""A FLUX transformer from one ``.safetensors`` file, the rest of the model from a diffusers folder or Hub id.

FLUX users often own the transformer as one file (Black Forest Labs' ``flux1-dev.safetensors`` with BFL names such as
``double_blocks.0.img_attn.qkv.weight``, ComfyUI's fp8 copies of it, or a file in diffusers' own names) and the text
encoders, VAE, scheduler and tokenizers as a diffusers folder. ``--transformer FILE --model FOLDER`` loads them
together: the file through diffusers' ``from_single_file`` (``FluxTransformer2DModel`` or
``Flux2Transformer2DModel``, with the folder's ``transformer/config.json``; BFL names go through diffusers' own
converters), then the pipeline through ``from_pretrained(FOLDER, transformer=...)``. Nothing here needs the network
when the folder is local.

:func:`read_transformer_file` and :func:`check_transformer_fits` read the file's header only (names, shapes and
dtypes; no torch), so a wrong file is refused in one line before any weights load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import B4MError, first_line

if TYPE_CHECKING:
    import torch
    from torch import nn

#: The family names b4m's identities carry, as users know them.
FAMILY_NAMES = {"flux": "FLUX.1", "flux2": "FLUX.2"}
#: A whole ComfyUI checkpoint (transformer, text encoders and VAE in one file) holds the transformer under this.
COMFY_PREFIX = "model.diffusion_model."
#: Tensors of one file layout and family that no other has (diffusers' own ``CHECKPOINT_KEY_NAMES`` where it has one).
MARKERS = {
    ("flux2", "bfl"): "single_stream_modulation.lin.weight",
    ("flux2", "diffusers"): "single_stream_modulation.linear.weight",
    ("flux", "bfl"): "double_blocks.0.img_mod.lin.weight",
    ("flux", "diffusers"): "transformer_blocks.0.norm1_context.linear.weight",
}
#: Per layout: the double and single block prefixes, the image and text input projections (``[width, in]``).
LAYOUTS = {
    "bfl": ("double_blocks.", "single_blocks.", "img_in.weight", "txt_in.weight"),
    "diffusers": ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.weight", "context_embedder.weight"),
}
#: The guidance embedding's first weight, per family and layout (FLUX.1-dev has one, schnell none).
GUIDANCE = {
    ("flux", "bfl"): "guidance_in.in_layer.weight",
    ("flux2", "bfl"): "guidance_in.in_layer.weight",
    ("flux", "diffusers"): "time_text_embed.guidance_embedder.linear_1.weight",
    ("flux2", "diffusers"): "time_guidance_embed.guidance_embedder.linear_1.weight",
}
#: diffusers' converter of BFL FLUX.1 files hard-codes FLUX.1's width (``inner_dim = 3072``).
BFL_FLUX1_WIDTH = 3072


@dataclass(frozen=True)
class TransformerFile:
    """What a transformer file's header says: its family (``flux``, ``flux2``), its names (``bfl``: Black Forest
    Labs' and ComfyUI's; ``diffusers``), the prefix its tensors sit under (``model.diffusion_model.`` in a whole
    ComfyUI checkpoint, else none), and the shape and dtype of every tensor (names without the prefix)."""

    path: Path
    family: str
    layout: str
    prefix: str
    shapes: dict[str, tuple[int, ...]]
    dtypes: tuple[str, ...]

    def blocks(self, kind: int) -> int:
        """Double (``kind`` 0) or single (1) blocks: one more than the highest block index."""
        prefix = LAYOUTS[self.layout][kind]
        found = [int(k[len(prefix) :].split(".", 1)[0]) for k in self.shapes if k.startswith(prefix)]
        return max(found) + 1 if found else 0

    def geometry(self) -> dict[str, Any]:
        """Double and single blocks, width, latent and text input widths, guidance embedding: the transformer config's
        ``num_layers``, ``num_single_layers``, heads × head width, ``in_channels``, ``joint_attention_dim``,
        ``guidance_embeds``."""
        image, text = (self.shapes.get(LAYOUTS[self.layout][i], (0, 0)) for i in (2, 3))
        return {
            "double blocks": self.blocks(0),
            "single blocks": self.blocks(1),
            "width": image[0],
            "latent channels": image[1],
            "text width": text[1],
            "guidance embedding": GUIDANCE[self.family, self.layout] in self.shapes,
        }

    def describe(self) -> str:
        g = self.geometry()
        names = "BFL/ComfyUI names" if self.layout == "bfl" else "diffusers names"
        blocks = f"{g['double blocks']} double and {g['single blocks']} single blocks"
        dtypes = "/".join(self.dtypes)
        return f"a {FAMILY_NAMES[self.family]} transformer ({names}, {dtypes}, {blocks}, width {g['width']})"


def read_transformer_file(path: str | Path) -> TransformerFile:
    """The header of a FLUX.1 or FLUX.2 transformer file (no tensor is read).

    Raises:
        B4MError: No such file, a pickle, not a readable ``.safetensors`` file, a ComfyUI "scaled fp8" file (its
            per-layer scales would need ComfyUI's own loader), or no FLUX transformer's tensors.
    """
    from safetensors import safe_open  # safetensors' own module: no torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise B4MError(f"{path}: no such transformer file")
    if path.suffix.lower() != ".safetensors":
        raise B4MError(f"{path}: not a .safetensors file (the transformer must be one; pickles can run code)")
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            header = {k: (tuple(s.get_shape()), s.get_dtype()) for k, s in slices.items()}
    except Exception as e:  # safetensors raises its own error type for malformed files
        raise B4MError(f"{path}: not a readable .safetensors file ({first_line(e)})") from e
    if "scaled_fp8" in header or any(k.endswith((".scale_weight", ".scale_input")) for k in header):
        raise B4MError(
            f"{path}: a ComfyUI scaled-fp8 checkpoint (per-layer scale_weight tensors), which diffusers cannot load; "
            "use a bf16, fp16 or plain fp8 (e4m3fn) file"
        )
    prefix = COMFY_PREFIX if any(k.startswith(COMFY_PREFIX) for k in header) else ""
    header = {k[len(prefix) :]: v for k, v in header.items() if k.startswith(prefix)}
    for (family, layout), marker in MARKERS.items():
        if marker in header:
            shapes = {k: shape for k, (shape, _) in header.items()}
            dtypes = tuple(sorted({dtype for _, dtype in header.values()}))
            return TransformerFile(path, family, layout, prefix, shapes, dtypes)
    raise B4MError(
        f"{path}: not a FLUX.1 or FLUX.2 transformer checkpoint (no {MARKERS['flux', 'bfl']} or "
        f"{MARKERS['flux', 'diffusers']} tensor, nor FLUX.2's)"
    )


def not_a_whole_model(file: TransformerFile) -> B4MError:
    """The error for a transformer file given as the whole model (``--model FILE``), naming the way to load it."""
    return B4MError(
        f"{file.path}: {file.describe()}, not a whole model; load it with --transformer {file.path} --model FOLDER "
        "(a diffusers FLUX folder or Hub id: text encoders, VAE, scheduler)"
    )


def check_transformer_fits(file: TransformerFile, family: str | None, config: dict | None, model: str) -> None:
    """Refuse, in one line naming the file, a transformer that cannot stand in for model ``model``'s: another family
    (``family`` None: ``model`` is not a FLUX.1 or FLUX.2 [klein] pipeline), or other block counts, width, input
    widths or guidance embedding than ``model``'s ``transformer/config.json`` (``config``; None: not known yet, an
    uncached Hub id). A BFL FLUX.1 file must be FLUX.1's width, the only one diffusers' converter takes."""
    if family is None:
        raise B4MError(
            f"{file.path}: --transformer replaces the transformer of a FLUX.1 or FLUX.2 [klein] diffusers model, and "
            f"{model} is none"
        )
    if family != file.family:
        raise B4MError(f"{file.path}: {file.describe()}, but {model} is a {FAMILY_NAMES[family]} model")
    if config is None:
        return
    ours = file.geometry()
    theirs = {
        "double blocks": config.get("num_layers"),
        "single blocks": config.get("num_single_layers"),
        "width": config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0),
        "latent channels": config.get("in_channels"),
        "text width": config.get("joint_attention_dim"),
        "guidance embedding": bool(config.get("guidance_embeds", False)),
    }
    differ = [f"{k} {_shown(ours[k])} vs {_shown(theirs[k])}" for k in ours if ours[k] != theirs[k]]
    if differ:
        raise B4MError(f"{file.path}: does not fit {model}'s transformer config ({', '.join(differ)})")
    if file.family == "flux" and file.layout == "bfl" and ours["width"] != BFL_FLUX1_WIDTH:
        raise B4MError(
            f"{file.path}: a BFL-named FLUX.1 transformer {ours['width']} wide; diffusers' converter takes FLUX.1's "
            f"{BFL_FLUX1_WIDTH} only (save it in diffusers' names instead)"
        )


def _shown(value: Any) -> str:
    return ("yes" if value else "no") if isinstance(value, bool) else str(value)


def transformer_class(family: str) -> type:
    """diffusers' transformer class of a family."""
    if family == "flux2":
        from diffusers import Flux2Transformer2DModel

        return Flux2Transformer2DModel
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel


def load_transformer(file: TransformerFile, source: str, dtype: torch.dtype, *, local: bool) -> nn.Module:
    """The transformer of ``file`` in ``dtype``, built with the ``transformer/config.json`` of ``source`` (a diffusers
    folder, ``local``, or a Hub id) by diffusers' ``from_single_file``, which converts BFL names with its own
    converter and keeps diffusers names as they are (a file in diffusers names must hold exactly the model's tensors,
    in its shapes: checked here first). fp8 tensors are cast to ``dtype``.

    Raises:
        B4MError: The tensors do not fit the model, or diffusers could not convert or load them.
    """
    import torch
    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from safetensors import safe_open

    cls = transformer_class(file.family)
    kwargs: dict[str, Any] = {"config": source, "subfolder": "transformer", "torch_dtype": dtype}
    if local:
        kwargs["local_files_only"] = True
    if file.layout == "diffusers":
        _check_names(file, cls, source, local)
    try:
        with safe_open(str(file.path), framework="pt") as f:  # the transformer's tensors only, without the prefix
            state = {k[len(file.prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(file.prefix)}  # noqa: SIM118
        model = cls.from_single_file(state, **kwargs)
    except (KeyError, ValueError, RuntimeError, OSError, SingleFileComponentError) as e:
        raise B4MError(f"{file.path}: cannot load it as {source}'s transformer ({first_line(e)})") from e
    missing = [name for name, p in model.named_parameters() if p.device == torch.device("meta")]
    if missing:
        raise B4MError(f"{file.path}: {len(missing)} of the transformer's tensors are not in it (e.g. {missing[0]})")
    return model.requires_grad_(False).eval()


def _check_names(file: TransformerFile, cls: type, source: str, local: bool) -> None:
    """A diffusers-named file holds exactly the model's tensors in their shapes (else diffusers would try to convert
    it as a BFL file and fail on a missing name)."""
    import torch

    config = cls.load_config(source, subfolder="transformer", local_files_only=local or None)
    with torch.device("meta"):
        skeleton = cls.from_config(config)
    wanted = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    missing = sorted(set(wanted) - set(file.shapes))
    extra = sorted(set(file.shapes) - set(wanted))
    if missing or extra:
        what = f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else ""
        what += ("; " if missing and extra else "") + (f"{len(extra)} unknown (e.g. {extra[0]})" if extra else "")
        raise B4MError(f"{file.path}: not {source}'s transformer in diffusers names: {what}")
    wrong = [k for k in wanted if wanted[k] != file.shapes[k]]
    if wrong:
        k = wrong[0]
        raise B4MError(f"{file.path}: {k} is {list(file.shapes[k])}, {source}'s transformer has {list(wanted[k])}")
