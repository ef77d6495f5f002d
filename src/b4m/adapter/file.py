"""B4M adapter files (``*.b4m.safetensors``): all four parts of every PLP layer plus what is needed to fuse safely.

A file holds, per adapted module, ``<module>.up_frozen`` (A), ``<module>.up_learned`` (B), ``<module>.down_frozen``
(C) and ``<module>.down_learned`` (D), and in its metadata the :class:`~b4m.adapter.config.PLPConfig`, the role of the
run (``content``, ``style`` or ``fused``) and a fingerprint of everything two runs must share to be fused: rank, ratio,
frozen init, seed, half assignment, the adapted modules, the base model and a digest of A and C.

Fusing (the paper's reconstruction of LoRA_f, section 4.2) takes the content half from the content run and the style
half from the style run, with the shared frozen parts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import B4MError
from ..files import load_safetensors, save_safetensors
from ..version import __version__
from .config import PLPConfig
from .layer import PLPLinear
from .walker import add_plp, linear_module, plp_layers, remove_plp, resolve_targets

FORMAT = "b4m-plp/1"
PARTS = ("up_frozen", "up_learned", "down_frozen", "down_learned")
FILE_ROLES = ("content", "style", "fused")
# Frozen parts regenerated on another machine may differ in the last bit of a float64 → float32 cast.
FROZEN_ATOL = 1e-6


@dataclass
class AdapterFile:
    """The contents of a B4M adapter file."""

    config: PLPConfig
    role: str
    tensors: dict[str, dict[str, torch.Tensor]]  # module name -> part name -> tensor
    metadata: dict[str, str] = field(default_factory=dict)  # user-facing extras (trigger words, run name, …)
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.role not in FILE_ROLES:
            raise B4MError(f"{self._where()}role must be one of {FILE_ROLES}, got {self.role!r}")

    def _where(self) -> str:
        return f"{self.path}: " if self.path else ""

    @property
    def modules(self) -> list[str]:
        return sorted(self.tensors)

    def frozen_digest(self) -> str:
        """sha256 of A and C of every module (float32 bytes, modules in sorted order)."""
        h = hashlib.sha256()
        for name in self.modules:
            for part in ("up_frozen", "down_frozen"):
                h.update(name.encode())
                h.update(self.tensors[name][part].float().contiguous().numpy().tobytes())
        return h.hexdigest()

    def identity(self) -> dict:
        """What two runs must share to be fused (the fingerprint's inputs)."""
        c = self.config
        return {
            "base_model": c.base_model,
            "rank": c.rank,
            "ratio": c.ratio,
            "init": c.init,
            "seed": c.seed,
            "assignment": c.assignment,
            "modules": self.modules,
            "frozen_digest": self.frozen_digest(),
        }

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    def num_parameters(self) -> tuple[int, int]:
        """(learned, frozen) entry counts."""
        learned = sum(t[p].numel() for t in self.tensors.values() for p in ("up_learned", "down_learned"))
        frozen = sum(t[p].numel() for t in self.tensors.values() for p in ("up_frozen", "down_frozen"))
        return learned, frozen

    def factors(self, *, scale: float = 1.0, content_scale: float = 1.0, style_scale: float = 1.0) -> dict:
        """Plain-LoRA factors ``{module: (up m×r, down r×n)}`` with ΔW = up @ down and the scales folded in."""
        up_s, down_s = self.config.half_scales(content_scale, style_scale)
        out = {}
        for name in self.modules:
            t = self.tensors[name]
            up = torch.cat([t["up_frozen"], up_s * t["up_learned"]], dim=0).float() * scale
            down = torch.cat([t["down_frozen"], down_s * t["down_learned"]], dim=1).float()
            out[name] = (up, down)
        return out


# --------------------------------------------------------------------------------------------------------------------
# Model <-> file


def adapter_from_model(
    model: nn.Module, config: PLPConfig, role: str, metadata: dict[str, str] | None = None
) -> AdapterFile:
    """Snapshot the PLP layers of ``model`` (detached float32 CPU copies); ``config`` with no targets records the
    model's own, the ones :func:`~b4m.adapter.walker.add_plp` used (:func:`~b4m.adapter.walker.resolve_targets`)."""
    config = resolve_targets(model, config)
    layers = plp_layers(model)
    if not layers:
        raise B4MError("the model carries no PLP adapter to save")
    tensors = {
        name: {p: getattr(layer, p).detach().float().cpu().clone() for p in PARTS} for name, layer in layers.items()
    }
    return AdapterFile(config, role, tensors, dict(metadata or {}))


def model_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The ΔW of every PLP layer of ``model`` as plain LoRA factors ``{module: (up m×r, down r×n)}`` (float32, CPU),
    with the layers' scales folded into ``up``; what :meth:`AdapterFile.factors` gives for a saved adapter.

    Raises:
        B4MError: ``model`` has no PLP layers.
    """
    layers = plp_layers(model)
    if not layers:
        raise B4MError("the model carries no PLP adapter layers; nothing to export")
    factors = {}
    with torch.no_grad():
        for name, layer in layers.items():
            up = layer.up().detach().float().cpu()
            if layer.scale != 1.0:
                up = up * float(layer.scale)
            factors[name] = (up.contiguous(), layer.down().detach().float().cpu().contiguous())
    return factors


def save_adapter(adapter: AdapterFile, path: str | Path) -> Path:
    """Write ``adapter`` atomically (temp file, then rename). Returns the path.

    Raises:
        B4MError: A tensor holds NaN or Inf (named by module and part: such an adapter is never written), or the
            file could not be written (a full disk).
    """
    path = Path(path)
    for name in adapter.modules:
        for p in PARTS:
            if not torch.isfinite(adapter.tensors[name][p]).all():
                raise B4MError(f"{path}: not written, {name}.{p} holds NaN or Inf values (the training diverged)")
    flat = {f"{name}.{p}": adapter.tensors[name][p] for name in adapter.modules for p in PARTS}
    meta = {
        "b4m_format": FORMAT,
        "b4m_version": __version__,
        "b4m_role": adapter.role,
        "b4m_config": json.dumps(adapter.config.to_dict(), sort_keys=True),
        "b4m_fingerprint": adapter.fingerprint(),
        "b4m_metadata": json.dumps(adapter.metadata, sort_keys=True),
    }
    save_safetensors(flat, path, meta)
    adapter.path = path
    return path


def is_adapter_file(metadata: dict) -> bool:
    return metadata.get("b4m_format", "").startswith("b4m-plp/")


def adapter_metadata(path: str | Path) -> dict:
    """The run's metadata of an adapter file (prompt, trigger words, …) from its header alone; {} if it has none."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("b4m_metadata", "{}"))


def load_adapter(path: str | Path) -> AdapterFile:
    """Read and validate a B4M adapter file. Errors are one line naming the file and the problem."""
    path = Path(path)
    flat, meta = load_safetensors(path)
    if not is_adapter_file(meta):
        raise B4MError(
            f"{path}: not a b4m adapter file (no b4m metadata; a plain LoRA?). "
            "This needs a .b4m.safetensors file written by `b4m content`, `b4m style`, `b4m make` or `b4m fuse`"
        )
    if meta["b4m_format"] != FORMAT:
        raise B4MError(f"{path}: format {meta['b4m_format']} is not supported by b4m {__version__} ({FORMAT})")
    try:
        config = PLPConfig.from_dict(json.loads(meta["b4m_config"]))
        extra = json.loads(meta.get("b4m_metadata", "{}"))
        role = meta["b4m_role"]
    except (KeyError, json.JSONDecodeError, TypeError) as e:
        raise B4MError(f"{path}: damaged b4m metadata ({e})") from e
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        name, _, part = key.rpartition(".")
        if part not in PARTS:
            raise B4MError(f"{path}: unexpected tensor {key}")
        tensors.setdefault(name, {})[part] = value
    for name, parts in tensors.items():
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise B4MError(f"{path}: module {name} lacks {', '.join(missing)}")
        _check_shapes(path, name, parts, config)
    adapter = AdapterFile(config, role, tensors, extra, path)
    stored = meta.get("b4m_fingerprint")
    if stored and stored != adapter.fingerprint():
        raise B4MError(f"{path}: fingerprint {stored} does not match the tensors ({adapter.fingerprint()}); damaged?")
    return adapter


def _check_shapes(path: Path, name: str, parts: dict[str, torch.Tensor], config: PLPConfig) -> None:
    a, b, c, d = (parts[p] for p in PARTS)
    r = config.rank
    ok = all(t.ndim == 2 for t in (a, b, c, d))
    ok = ok and a.shape[1] == b.shape[1] == r and c.shape[0] == d.shape[0] == r
    if ok:
        m, n = a.shape[0] + b.shape[0], c.shape[1] + d.shape[1]
        ok = (a.shape[0], c.shape[1]) == config.frozen_dims(m, n)
    if not ok:
        shapes = ", ".join(f"{p} {tuple(t.shape)}" for p, t in parts.items())
        raise B4MError(f"{path}: module {name} has shapes that do not fit rank {r}, ratio {config.ratio}: {shapes}")


def apply_adapter(model: nn.Module, adapter: AdapterFile) -> dict[str, PLPLinear]:
    """Attach PLP layers to ``model`` and load the file's tensors into them (checked against the model first)."""
    where = adapter._where()
    for name in adapter.modules:
        lin = linear_module(model, name, where)
        t = adapter.tensors[name]
        m = t["up_frozen"].shape[0] + t["up_learned"].shape[0]
        n = t["down_frozen"].shape[1] + t["down_learned"].shape[1]
        if (m, n) != (lin.out_features, lin.in_features):
            raise B4MError(
                f"{where}module {name} is {n}→{m} in the file but {lin.in_features}→{lin.out_features} in the model"
            )
    config = PLPConfig.from_dict({**adapter.config.to_dict(), "targets": adapter.modules, "exclude": []})
    layers = add_plp(model, config)
    with torch.no_grad():
        for name, layer in layers.items():
            for p in PARTS:
                getattr(layer, p).copy_(adapter.tensors[name][p])
    return layers


@contextlib.contextmanager
def attached(model: nn.Module, adapter: AdapterFile) -> Iterator[dict[str, PLPLinear]]:
    """``adapter`` attached to ``model`` (:func:`apply_adapter`) inside the block, taken off again after."""
    layers = apply_adapter(model, adapter)
    try:
        yield layers
    finally:
        remove_plp(model)


# --------------------------------------------------------------------------------------------------------------------
# Fuse


def compatibility_problems(a: AdapterFile, b: AdapterFile) -> list[str]:
    """Why ``a`` and ``b`` cannot be fused (empty if they can). Each entry names the field and both values."""
    ia, ib = a.identity(), b.identity()
    problems = []
    for key in ("base_model", "rank", "ratio", "init", "seed", "assignment"):
        if ia[key] != ib[key]:
            problems.append(f"{key} differs ({ia[key]!r} vs {ib[key]!r})")
    if ia["modules"] != ib["modules"]:
        only_a = sorted(set(ia["modules"]) - set(ib["modules"]))
        only_b = sorted(set(ib["modules"]) - set(ia["modules"]))
        detail = []
        if only_a:
            detail.append(f"{len(only_a)} only in the first, e.g. {only_a[0]}")
        if only_b:
            detail.append(f"{len(only_b)} only in the second, e.g. {only_b[0]}")
        problems.append(f"adapted modules differ ({'; '.join(detail)})")
    if not problems and ia["frozen_digest"] != ib["frozen_digest"]:
        for name in a.modules:
            for p in ("up_frozen", "down_frozen"):
                diff = (a.tensors[name][p] - b.tensors[name][p]).abs().max().item()
                if diff > FROZEN_ATOL:
                    problems.append(f"frozen part {p} of {name} differs (max |Δ| {diff:.3g})")
                    return problems
        warnings.warn(
            f"frozen parts differ by at most {FROZEN_ATOL} (last-bit differences between machines); fusing",
            stacklevel=2,
        )
    return problems


def fuse(content: AdapterFile, style: AdapterFile, metadata: dict[str, str] | None = None) -> AdapterFile:
    """LoRA_f: the content run's content half, the style run's style half, and the shared frozen parts."""
    for f, want in ((content, "content"), (style, "style")):
        if f.role != want:
            raise B4MError(f"{f._where()}is a {f.role} run, but it was given as the {want} run")
    problems = compatibility_problems(content, style)
    if problems:
        names = f"{content.path or 'content'} and {style.path or 'style'}"
        raise B4MError(f"cannot fuse {names}: " + "; ".join(problems))
    c_half = "up_learned" if content.config.half_of("content") == "up" else "down_learned"
    s_half = "down_learned" if c_half == "up_learned" else "up_learned"
    tensors = {}
    for name in content.modules:
        tensors[name] = {
            "up_frozen": content.tensors[name]["up_frozen"].clone(),
            "down_frozen": content.tensors[name]["down_frozen"].clone(),
            c_half: content.tensors[name][c_half].clone(),
            s_half: style.tensors[name][s_half].clone(),
        }
    meta = {"content_run": str(content.path or ""), "style_run": str(style.path or "")}
    for key in ("trigger_words",):
        words = [*json.loads(content.metadata.get(key, "[]")), *json.loads(style.metadata.get(key, "[]"))]
        if words:
            meta[key] = json.dumps(words)
    meta.update(metadata or {})
    return AdapterFile(content.config, "fused", tensors, meta)
