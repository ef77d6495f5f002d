"""Partly Learnable Projection (PLP): the B4M adapter (paper section 4.1).

A PLP adapter on a linear layer ``W0`` (out ``m``, in ``n``) adds ``ΔW = W_up · W_down`` with rank ``r``::

    W_up   = [A; B]    (m × r)   rows [0, d_out) are A (frozen), rows [d_out, m) are B (learned)
    W_down = [C, D]    (r × n)   cols [0, d_in)  are C (frozen), cols [d_in, n)  are D (learned)

    ΔW = [[A·C, A·D],
          [B·C, B·D]]

with ``d_out = floor(ratio·m)`` and ``d_in = floor(ratio·n)``. ``A`` and ``C`` are buffers, not parameters, so no
optimizer (weight decay included) can ever move them. ``B`` and ``D`` start at zero (unless
:attr:`PLPConfig.learned_init` says otherwise, see below). Which learned half holds the content and which the style
is a setting (:attr:`PLPConfig.assignment`): ``paper`` gives content to ``B`` (the up projection, eq. 14) and style
to ``D`` (the down projection, eq. 13); ``official`` is the swap in the authors' code.

The frozen parts come from numpy's PCG64 generator in float64, seeded by ``(seed, crc32(module name))`` and cast to
float32, so two runs on different machines build the same ``A`` and ``C`` (and every file stores them anyway).

``ratio = 0`` (the paper's ``d = 0`` point of Fig. 11, and a plain LoRA for the baselines) leaves no frozen part, so
``B = D = 0`` would never receive a gradient; it needs a non-zero learned init (:attr:`PLPConfig.learned_init`):
``D`` is drawn as in standard LoRA (``kaiming``: peft's default, ``gaussian``: diffusers' DreamBooth-LoRA script)
and ``B`` stays zero, so ``ΔW = 0`` at step 0 and the first step trains ``B``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import weakref
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from .errors import B4MError
from .lowrank import low_rank_add, low_rank_product

FROZEN_INITS = ("approx", "exact", "random")
LEARNED_INITS = ("zero", "kaiming", "gaussian")
ASSIGNMENTS = ("paper", "official")
ROLES = ("content", "style")
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

#: The training forward of :class:`PLPLinear`: True casts an autocast input once (shared by the layers that get the
#: same tensor, e.g. to_q, to_k and to_v) and adds the adapter's output to the base layer's inside its last matmul
#: (:func:`b4m.lowrank.low_rank_add`); False is the earlier path (the base layer and the adapter cast the input each,
#: the add and the scale are kernels of their own), kept so that bench/speed.py can time both in one run.
FUSED_TRAIN_PATH = True

#: The no-grad (sampling) forward of an unmerged :class:`PLPLinear`: True stacks ``W_down`` under the base weight,
#: so that one GEMM reads ``x`` once for the base output and the adapter's ``x · W_downᵀ`` (one GEMM launch fewer
#: per layer; sampling with two GEMMs reading ``x`` cost +13 % over no adapter on an H100). The stack costs a copy of
#: every adapted base weight in the compute dtype, kept while the adapter is used unmerged (SDXL's 560 attention
#: projections: 1.9 GiB in bf16; merged sampling, :func:`merge_plp`, costs nothing extra). False is the earlier path
#: (the base layer, then the adapter's two matmuls), kept so that bench/speed.py can time both in one run (its
#: ``gen/*-legacy`` rows).
STACKED_INFER = True

#: Input and weight dtypes that autocast casts (never fp64), as :func:`_autocast_input`.
_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class PLPConfig:
    """Everything that defines a PLP adapter's structure. Two adapters can be fused only if these agree."""

    rank: int = field(default=64, metadata={"help": "LoRA rank r."})
    ratio: float = field(
        default=0.5, metadata={"help": "Frozen fraction d of each factor's feature dimension (paper 5.7), in [0, 1)."}
    )
    init: str = field(
        default="approx",
        metadata={"help": "Frozen-part init: approx (paper/official), exact (A·C = 0), random (w/o Orth ablation)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the frozen parts A and C (and of a non-zero D init)."})
    assignment: str = field(
        default="paper", metadata={"help": "paper: content = B (up), style = D (down); official: the swap."}
    )
    targets: list[str] | str = field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        metadata={"help": "Module names: a list of exact names or dotted suffixes, or one full-match regex."},
    )
    exclude: list[str] | str = field(default_factory=list, metadata={"help": "Same rule as targets; wins."})
    base_model: str = field(default="", metadata={"help": "Identity of the base model the adapter belongs to."})
    learned_init: str = field(
        default="zero",
        metadata={
            "help": "Init of the learned down half D (B is always zero): zero (B4M), kaiming (peft's LoRA default, "
            "U(±1/√n)) or gaussian (N(0, 1/r²), diffusers' DreamBooth-LoRA). ratio 0 needs a non-zero one."
        },
    )

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise B4MError(f"rank must be >= 1, got {self.rank}")
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


# --------------------------------------------------------------------------------------------------------------------
# Frozen parts


def frozen_rng(seed: int, module_name: str) -> np.random.Generator:
    """A platform-stable generator for one module: PCG64 seeded by the run seed and the module's name."""
    return np.random.Generator(np.random.PCG64([int(seed), zlib.crc32(module_name.encode("utf-8"))]))


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A ``rows × cols`` float64 matrix with orthonormal columns (rows >= cols) or orthonormal rows (rows < cols).

    The Q factor of a Gaussian matrix with R's diagonal positive, which makes it unique (no dependence on the
    LAPACK build's sign convention). Computed as Cholesky QR (``Q = G·R⁻¹`` with ``RᵀR = GᵀG``), which for a
    Gaussian matrix is as accurate as Householder QR and about 20× faster on SDXL's 560 layers.
    """
    tall = rows >= cols
    g = rng.standard_normal((rows, cols) if tall else (cols, rows))
    r = np.linalg.cholesky(g.T @ g).T  # upper triangular, positive diagonal
    q = np.linalg.solve(r.T, g.T).T  # g · r⁻¹
    return q if tall else q.T


def make_frozen(
    init: str, m: int, n: int, rank: int, d_out: int, d_in: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The frozen parts ``A`` (d_out × r) and ``C`` (r × d_in) in float64.

    - ``approx``: the official scheme generalised to any shape. One matrix ``Q`` with ``d_out + d_in`` rows and
      orthonormal columns is drawn; a random permutation gives ``C`` (transpose of ``d_in`` rows) and ``A`` (the
      remaining ``d_out`` rows), so ``AᵀA + CCᵀ = I_r`` while ``A·C`` is small but not zero.
    - ``exact``: ``A`` lives in the first ``⌈r/2⌉`` coordinates of the rank space and ``C`` in the others, so
      ``A·C = 0`` bit for bit. Any rotation of the rank space is a gauge of ``W_up·W_down``, so using the standard
      basis loses nothing; it caps the rank of the ``A·D`` and ``B·C`` blocks at about r/2.
    - ``random``: i.i.d. Gaussian with the same per-entry variance as ``approx`` (the paper's w/o-Orth ablation).
    """
    del m, n  # the shapes that matter are d_out, d_in and rank
    k = d_out + d_in
    if k == 0:  # ratio 0: no frozen part
        return np.zeros((0, rank)), np.zeros((rank, 0))
    if init == "approx":
        q = _orthonormal(rng, k, rank)  # k × r
        perm = rng.permutation(k)
        c = q[np.sort(perm[:d_in])].T
        a = q[np.sort(perm[d_in:])]
        return a, c
    if init == "exact":
        ra = (rank + 1) // 2
        a = np.zeros((d_out, rank))
        c = np.zeros((rank, d_in))
        a[:, :ra] = _orthonormal(rng, d_out, ra)
        c[ra:, :] = _orthonormal(rng, d_in, rank - ra).T
        return a, c
    if init == "random":
        std = 1.0 / np.sqrt(k)
        return rng.standard_normal((d_out, rank)) * std, rng.standard_normal((rank, d_in)) * std
    raise B4MError(f"init must be one of {FROZEN_INITS}, got {init!r}")


def learned_rng(seed: int, module_name: str) -> np.random.Generator:
    """The generator of a non-zero ``D`` init: a stream apart from :func:`frozen_rng`'s, so A and C do not depend on
    ``learned_init``."""
    return np.random.Generator(np.random.PCG64([int(seed), zlib.crc32(module_name.encode("utf-8")), 1]))


def make_learned_down(init: str, n: int, rank: int, d_in: int, rng: np.random.Generator) -> np.ndarray:
    """The initial learned down half ``D`` (``r × (n - d_in)``) in float64.

    - ``zero``: B4M's (the frozen parts carry the signal at step 0).
    - ``kaiming``: peft's default LoRA init of the down projection, ``kaiming_uniform_(a=√5)`` on an ``r × n``
      matrix, i.e. ``U(-1/√n, 1/√n)`` with ``n`` the layer's input width.
    - ``gaussian``: ``N(0, (1/r)²)``, the init of diffusers' DreamBooth-LoRA scripts (``init_lora_weights="gaussian"``)
      and of the public ZipLoRA implementation's LoRAs.
    """
    shape = (rank, n - d_in)
    if init == "zero":
        return np.zeros(shape)
    if init == "kaiming":
        bound = 1.0 / np.sqrt(n)
        return rng.uniform(-bound, bound, shape)
    if init == "gaussian":
        return rng.standard_normal(shape) / rank
    raise B4MError(f"learned_init must be one of {LEARNED_INITS}, got {init!r}")


# --------------------------------------------------------------------------------------------------------------------
# The layer


class PLPLinear(nn.Module):
    """A PLP adapter around one ``nn.Linear`` (kept as ``base_layer``, never modified unless merged)."""

    def __init__(self, base_layer: nn.Linear, config: PLPConfig, name: str) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise B4MError(f"{name}: PLP adapts nn.Linear only, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.name = name
        self.rank = config.rank
        m, n = base_layer.out_features, base_layer.in_features
        self.d_out, self.d_in = int(config.ratio * m), int(config.ratio * n)
        if config.ratio > 0 and (self.d_out == 0 or self.d_in == 0):
            raise B4MError(f"{name}: ratio {config.ratio} leaves no frozen rows/columns for a {m}×{n} layer")
        a, c = make_frozen(config.init, m, n, config.rank, self.d_out, self.d_in, frozen_rng(config.seed, name))
        d = make_learned_down(config.learned_init, n, config.rank, self.d_in, learned_rng(config.seed, name))
        device = base_layer.weight.device
        a, c, d = (torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32)).to(device) for t in (a, c, d))
        self.register_buffer("up_frozen", a)  # A: d_out × r
        self.register_buffer("down_frozen", c)  # C: r × d_in
        self.up_learned = nn.Parameter(torch.zeros(m - self.d_out, config.rank, device=device))  # B
        self.down_learned = nn.Parameter(d)  # D
        # Multipliers of the learned halves and of the whole ΔW (generation-time knobs, not saved).
        self.up_scale = 1.0
        self.down_scale = 1.0
        self.scale = 1.0
        self.enabled = True
        self.merged = False
        # Set by the trainer (see `routing`): (k, owned) = the first k samples of the batch train only the `owned`
        # half ("up" or "down"), the others only the other half.
        self.route: tuple[int, str] | None = None

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    # The paper's letters, for readers of section 4.
    @property
    def A(self) -> torch.Tensor:
        return self.up_frozen

    @property
    def B(self) -> torch.Tensor:
        return self.up_learned

    @property
    def C(self) -> torch.Tensor:
        return self.down_frozen

    @property
    def D(self) -> torch.Tensor:
        return self.down_learned

    def up(self) -> torch.Tensor:
        """W_up = [A; up_scale·B] (m × r)."""
        b = self.up_learned if self.up_scale == 1.0 else self.up_learned * self.up_scale
        return torch.cat([self.up_frozen, b], dim=0)

    def down(self) -> torch.Tensor:
        """W_down = [C, down_scale·D] (r × n)."""
        d = self.down_learned if self.down_scale == 1.0 else self.down_learned * self.down_scale
        return torch.cat([self.down_frozen, d], dim=1)

    def _factors(self) -> tuple:
        """What the low-rank nodes take: A, B, C, D and the halves' scales."""
        return self.up_frozen, self.up_learned, self.down_frozen, self.down_learned, self.up_scale, self.down_scale

    def _scaled_up(self) -> torch.Tensor:
        """scale · W_up (what the no-grad paths multiply by)."""
        return self.up() * self.scale if self.scale != 1.0 else self.up()

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale · W_up · W_down (m × n), in the adapter's dtype."""
        return self.scale * (self.up() @ self.down())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged:
            self._drop_stack()  # a base-weight copy that this layer no longer uses
            return self.base_layer(x)
        if not torch.is_grad_enabled():
            return self._infer(x)
        self._drop_stack()  # training moves B and D: the stack would be stale anyway
        if not FUSED_TRAIN_PATH:
            return self._legacy_forward(x)
        # One autograd node for the whole adapter and its add (see b4m.lowrank); ΔW is never materialised.
        x = _autocast_input(x)
        return low_rank_add(
            self.base_layer(x.reshape(-1, x.shape[-1])),  # 2-D: the adapter adds into it in place
            x,
            *self._factors(),
            self.scale,
            self.route,
        )

    def _legacy_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The training forward before :data:`FUSED_TRAIN_PATH` (for speed comparisons)."""
        y = self.base_layer(x)
        out = low_rank_product(
            x,
            *self._factors(),
            self.route,
        )
        if self.scale != 1.0:
            out = out * self.scale
        return y + out.to(y.dtype)

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        """The no-grad forward (sampling), on the stacked path (:data:`STACKED_INFER`) where it can stand in for the
        base layer exactly (see :meth:`_stack_dtype`), else on the earlier one (:meth:`_factor_infer`).

        Stacked: ``z = x · [W0; W_down]ᵀ + [b; 0]`` in the compute dtype (one GEMM: ``x`` read once), then
        ``z[:, :m] += z[:, m:] · (scale · W_up)ᵀ`` in place (addmm_ on strided views: ld = m + r ≥ the columns, which
        BLAS takes as it is, no copy). The output is the view ``z[..., :m]`` (row stride m + r, last dimension
        contiguous): splitting its last dimension (attention heads) or merging the leading ones still views; only
        code that merges the last dimension with another must reshape. The stack (a copy of ``W0``: the price of
        the path) and ``(scale · W_up)ᵀ`` are built once and kept until a tensor they come from is replaced or
        changed in place (data pointers and versions: the base weight and bias too, since they are copied) or a
        scale changes; under CUDA-graph sampling the capture's warm-up builds them and replays reuse them. They are
        dropped when the layer is merged, disabled or trained, or the switch is off."""
        dtype = self._stack_dtype(x) if STACKED_INFER else None
        if dtype is None:
            self._drop_stack()
            return self._factor_infer(x, self.base_layer(x))
        w, b = self.base_layer.weight, self.base_layer.bias
        sources = (w, b, self.up_frozen, self.up_learned, self.down_frozen, self.down_learned)
        key = (
            dtype,
            w.device,
            self.scale,
            self.up_scale,
            self.down_scale,
            *(None if t is None else (t.data_ptr(), t._version) for t in sources),
        )
        cache = self.__dict__.get("_stack_cache")
        if cache is None or cache[0] != key:
            self._drop_stack()  # free the stale stack before building the new one
            up = self._scaled_up().to(dtype)
            w_stack = torch.cat([w.to(dtype), self.down().to(dtype)])  # (m + r) × n
            b_stack = None if b is None else torch.cat([b.to(dtype), b.new_zeros(self.rank, dtype=dtype)])
            cache = self._stack_cache = (key, w_stack, b_stack, up.T.contiguous())
        _, w_stack, b_stack, up_t = cache
        m = w.shape[0]
        z = F.linear(x.to(dtype), w_stack, b_stack)  # (..., m + r); all in one dtype: autocast casts nothing
        if not z.is_contiguous():  # (never seen) the add below must land in z itself, not in a reshaped copy
            z = z.contiguous()
        z2 = z.view(-1, z.shape[-1])
        z2[:, :m].addmm_(z2[:, m:], up_t)
        return z[..., :m]

    def _drop_stack(self) -> None:
        """Free the stacked sampling weights (:meth:`_infer`). Not inside torch.compile, where it would break the
        graph (torch 2.11's dynamo cannot trace ``__dict__.pop``): a stale stack only holds memory, since
        :meth:`_infer` checks its key before any use."""
        if not torch.compiler.is_compiling():
            self.__dict__.pop("_stack_cache", None)

    def _stack_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype of ``self.base_layer(x)`` where the stacked GEMM computes exactly what that call would (a plain
        ``nn.Linear``, its forward not wrapped or hooked, e.g. by an offloading hook that moves its weight in), else
        None. Not inside torch.compile: the cache is Python state (the earlier path runs there, as before)."""
        base = self.base_layer
        if (
            type(base) is not nn.Linear
            or base._forward_hooks
            or base._forward_pre_hooks
            or "forward" in base.__dict__
            or _nn_module._global_forward_hooks
            or _nn_module._global_forward_pre_hooks
            or torch.compiler.is_compiling()
        ):
            return None
        w = base.weight
        if x.device != w.device:
            return None
        device = x.device.type
        if torch.is_autocast_enabled(device):  # nn.Linear runs in the autocast dtype where autocast casts
            fits = x.dtype in _AUTOCAST_DTYPES and w.dtype in _AUTOCAST_DTYPES
            return torch.get_autocast_dtype(device) if fits else None
        return w.dtype if x.dtype == w.dtype else None

    def _factor_infer(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The no-grad forward before :data:`STACKED_INFER`: ``y + (x · W_downᵀ) · (scale · W_up)ᵀ`` in the output's
        dtype, two matmuls with the add fused into the second; the factors are cast and concatenated once and kept
        until a factor or a scale changes (tensor versions count in-place updates, e.g. an optimizer's). Inside
        torch.compile nothing is cached (Python state; the compiler folds the casts into the graph)."""
        if torch.compiler.is_compiling():
            h = F.linear(x.to(y.dtype), self.down().to(y.dtype))
            return y + F.linear(h, self._scaled_up().to(y.dtype))
        key = (
            y.dtype,
            y.device,
            self.scale,
            self.up_scale,
            self.down_scale,
            *(t._version for t in (self.up_frozen, self.up_learned, self.down_frozen, self.down_learned)),
        )
        if getattr(self, "_factor_cache", (None,))[0] != key:
            up = self._scaled_up().to(y.dtype)
            self._factor_cache = (key, up.T.contiguous(), self.down().to(y.dtype))
        _, up_t, down = self._factor_cache
        h = F.linear(x.to(y.dtype), down)
        return y.reshape(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up_t).view(y.shape)

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW into the base weight (for faster sampling). Refuses a non-finite result; merging twice warns."""
        if self.merged:
            return
        w = self.base_layer.weight
        delta = self.delta_weight().float()
        merged = w.float() + delta
        if not torch.isfinite(merged).all():
            raise B4MError(f"{self.name}: merging the adapter gives non-finite weights; not merged")
        self._delta_cache = delta
        w.copy_(merged.to(w.dtype))
        self.merged = True
        self._drop_stack()  # stale now; merged sampling needs no copy of the weight

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self._delta_cache.float()).to(w.dtype))
        del self._delta_cache
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, d_out={self.d_out}, d_in={self.d_in}"
        )


#: The last input cast by :func:`_autocast_input`: weak references to the source and the cast, the source's version
#: and the dtype.
_last_cast: tuple | None = None


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype where autocast would cast it (else ``x``), so that the base layer and the adapter
    use one cast, and layers fed the very same tensor (to_q, to_k and to_v get one LayerNorm output) one between
    them: the last cast is reused while its source is the same object, unmodified (tensor versions count in-place
    changes) and cast to the same dtype. The gradients of the layers sharing it sum in the autocast dtype before the
    one cast back (as if the model ran in that dtype).

    Both references are weak: the cast lives as long as an adapter node saves it for the backward pass (under
    activation checkpointing, which saves nothing, siblings may cast again: slower, not wrong). A strong one would
    keep the last step's autograd graph (its AccumulateGrad nodes) alive into the next step, which breaks the
    capture of a CUDA graph (the nodes remember the stream they were made on)."""
    global _last_cast
    device = x.device.type
    # Autocast casts fp32, fp16 and bf16 inputs (never fp64): the same ones here.
    if not torch.is_autocast_enabled(device) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return x
    dtype = torch.get_autocast_dtype(device)
    if x.dtype == dtype:
        return x
    if torch.compiler.is_compiling() or x.is_inference():  # no Python state in a traced graph; no version counter
        return x.to(dtype)
    if _last_cast is not None:
        source, version, target, cached = _last_cast
        cast = cached()
        fresh = source() is x and version == x._version and target == dtype
        if fresh and cast is not None and cast.requires_grad == x.requires_grad:
            return cast
    cast = x.to(dtype)
    _last_cast = (weakref.ref(x), x._version, dtype, weakref.ref(cast))
    return cast


# --------------------------------------------------------------------------------------------------------------------
# Targeting and attaching


def _matches(name: str, patterns: Sequence[str] | str) -> bool:
    """peft's rule: a string is a full-match regex; a list means exact names or dotted suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_targets(model: nn.Module, config: PLPConfig) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` that ``config`` targets, in module order."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, PLPLinear):
            raise B4MError(f"{name}: the model already carries PLP adapters; remove them first (remove_plp)")
        if not isinstance(module, nn.Linear) or not name:
            continue
        if config.exclude and _matches(name, config.exclude):
            continue
        if _matches(name, config.targets):
            names.append(name)
    if not names:
        raise B4MError(f"no nn.Linear module matches targets {config.targets!r} (exclude {config.exclude!r})")
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def add_plp(model: nn.Module, config: PLPConfig) -> dict[str, PLPLinear]:
    """Wrap every targeted linear layer of ``model`` in a :class:`PLPLinear`; returns them by module name.

    The base model's own parameters are frozen (``requires_grad=False``); only the learned halves train.
    """
    names = find_targets(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name in names:
        layer = PLPLinear(model.get_submodule(name), config, name)
        _set_submodule(model, name, layer)
        layers[name] = layer
    return layers


def plp_layers(model: nn.Module) -> dict[str, PLPLinear]:
    """The PLP layers of ``model`` by module name (the name of the wrapped linear layer)."""
    return {m.name: m for m in model.modules() if isinstance(m, PLPLinear)}


def remove_plp(model: nn.Module) -> None:
    """Put the original linear layers back (unmerging first where merged)."""
    for name, layer in plp_layers(model).items():
        layer.unmerge()
        _set_submodule(model, name, layer.base_layer)


@torch.no_grad()
def merge_plp(model: nn.Module) -> int:
    """Fold every PLP layer's ΔW into its base weight and put the plain linear layers back (peft's
    ``merge_and_unload``): sampling then costs what the base model costs. Not reversible. Returns the number of
    layers merged."""
    layers = plp_layers(model)
    for name, layer in layers.items():
        layer.merge()
        del layer._delta_cache  # the wrapper goes away: nothing to unmerge
        _set_submodule(model, name, layer.base_layer)
    return len(layers)


@contextlib.contextmanager
def routing(model: nn.Module, k: int, owned: str) -> Iterator[None]:
    """Clean gradient routing in one forward and one backward (multi-correspondence, paper eq. 12).

    Inside the context, the first ``k`` samples of every batch send gradients only to the ``owned`` learned half
    (``"up"`` = B or ``"down"`` = D) and the other samples only to the other half. Samples of a batch are
    independent in a UNet (GroupNorm and attention act per sample), so this equals computing the main loss's
    gradient for the owned half and the auxiliary loss's gradient for the other half separately, at the cost of
    one backward pass (the weight gradients are summed over the chosen rows: see :mod:`b4m.lowrank`). Values and
    activation gradients are unchanged.
    """
    if owned not in ("up", "down"):
        raise B4MError(f"owned half must be 'up' or 'down', got {owned!r}")
    layers = list(plp_layers(model).values())
    for layer in layers:
        layer.route = (k, owned)
    try:
        yield
    finally:
        for layer in layers:
            layer.route = None


def set_scales(
    model: nn.Module,
    config: PLPConfig,
    *,
    scale: float = 1.0,
    content_scale: float = 1.0,
    style_scale: float = 1.0,
) -> None:
    """Scale the whole ΔW and the content and style halves separately (generation-time knobs)."""
    up, down = config.half_scales(content_scale, style_scale)
    for layer in plp_layers(model).values():
        if layer.merged:
            raise B4MError(f"{layer.name}: unmerge before changing scales")
        layer.scale, layer.up_scale, layer.down_scale = scale, up, down


@dataclass
class DryRun:
    """What :func:`add_plp` would do: matched modules and parameter counts."""

    modules: list[tuple[str, int, int, int, int]]  # name, in, out, trainable, frozen
    trainable: int
    frozen: int

    def lines(self) -> list[str]:
        out = [f"{'module':<80} {'in':>6} {'out':>6} {'trainable':>10} {'frozen':>10}"]
        out += [f"{n:<80} {i:>6} {o:>6} {t:>10} {f:>10}" for n, i, o, t, f in self.modules]
        out.append(f"{len(self.modules)} modules, {self.trainable:,} trainable, {self.frozen:,} frozen parameters")
        return out


def dry_run(model: nn.Module, config: PLPConfig) -> DryRun:
    """List matched modules and trainable/frozen counts without touching the model."""
    rows = []
    for name in find_targets(model, config):
        lin = model.get_submodule(name)
        m, n, r = lin.out_features, lin.in_features, config.rank
        d_out, d_in = int(config.ratio * m), int(config.ratio * n)
        rows.append((name, n, m, (m - d_out) * r + r * (n - d_in), d_out * r + r * d_in))
    return DryRun(rows, sum(r[3] for r in rows), sum(r[4] for r in rows))
