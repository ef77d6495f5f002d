"""The initial values of a PLP layer: the frozen parts ``A`` and ``C`` and the learned down half ``D``.

Every draw comes from numpy's PCG64 in float64, seeded by ``(seed, crc32(module name))``, and is cast to float32 by
the layer, so two runs on different machines build the same ``A`` and ``C`` (files store them anyway).
"""

from __future__ import annotations

import zlib

import numpy as np

from ..errors import B4MError
from .config import FROZEN_INITS, LEARNED_INITS


def frozen_rng(seed: int, module_name: str) -> np.random.Generator:
    """A platform-stable generator for one module: PCG64 seeded by the run seed and the module's name."""
    return np.random.Generator(np.random.PCG64([int(seed), zlib.crc32(module_name.encode("utf-8"))]))


def learned_rng(seed: int, module_name: str) -> np.random.Generator:
    """The generator of a non-zero ``D`` init: a stream apart from :func:`frozen_rng`'s, so A and C do not depend on
    ``learned_init``."""
    return np.random.Generator(np.random.PCG64([int(seed), zlib.crc32(module_name.encode("utf-8")), 1]))


def orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
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
    init: str, rank: int, d_out: int, d_in: int, rng: np.random.Generator
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
    k = d_out + d_in
    if k == 0:  # ratio 0: no frozen part
        return np.zeros((0, rank)), np.zeros((rank, 0))
    if init == "approx":
        q = orthonormal(rng, k, rank)  # k × r
        perm = rng.permutation(k)
        c = q[np.sort(perm[:d_in])].T
        a = q[np.sort(perm[d_in:])]
        return a, c
    if init == "exact":
        ra = (rank + 1) // 2
        a = np.zeros((d_out, rank))
        c = np.zeros((rank, d_in))
        a[:, :ra] = orthonormal(rng, d_out, ra)
        c[ra:, :] = orthonormal(rng, d_in, rank - ra).T
        return a, c
    if init == "random":
        std = 1.0 / np.sqrt(k)
        return rng.standard_normal((d_out, rank)) * std, rng.standard_normal((rank, d_in)) * std
    raise B4MError(f"init must be one of {FROZEN_INITS}, got {init!r}")


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
