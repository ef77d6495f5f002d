"""The PLP product ``(x · W_downᵀ) · W_upᵀ`` as one autograd node, with optional per-sample gradient routing.

One node instead of five (two concatenations, two matmuls and a scale) keeps the per-layer Python and autograd
overhead low, which dominates SDXL training at small batches (docs/benchmarks.md). Routing is free: the backward
pass sums the learned halves' weight gradients over a subset of the batch instead of running two half-batch paths.

Backward, with ``g`` the gradient of the output, ``h = x · W_downᵀ`` (saved, only ``r`` wide)::

    g_h = g · W_up          g_x = g_h · W_down
    g_B = up_scale · Σ_rows(B)  g[:, d_out:]ᵀ · h        (rows of the batch that train B)
    g_D = down_scale · Σ_rows(D) g_hᵀ · x[:, d_in:]      (rows of the batch that train D)
"""

from __future__ import annotations

import torch


def _compute_dtype(x: torch.Tensor, weight_dtype: torch.dtype) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight_dtype


class LowRankProduct(torch.autograd.Function):
    """``out = (x · [C, s_d·D]ᵀ) · [A; s_u·B]ᵀ``; gradients only for ``x``, ``B`` and ``D``."""

    @staticmethod
    def forward(ctx, x, a, b, c, d, up_scale: float, down_scale: float, route: tuple[int, str] | None):
        dtype = _compute_dtype(x, b.dtype)
        with torch.autocast(x.device.type, enabled=False):
            up = torch.cat([a, b * up_scale if up_scale != 1.0 else b], dim=0).to(dtype)  # m × r
            down = torch.cat([c, d * down_scale if down_scale != 1.0 else d], dim=1).to(dtype)  # r × n
            xc = x.to(dtype)
            h = xc @ down.T  # (..., r)
            out = h @ up.T  # (..., m)
        ctx.save_for_backward(xc, h, up, down)
        ctx.meta = (a.shape[0], c.shape[1], up_scale, down_scale, route, x.dtype, b.dtype, d.dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        xc, h, up, down = ctx.saved_tensors
        d_out, d_in, up_scale, down_scale, route, x_dtype, b_dtype, d_dtype = ctx.meta
        with torch.autocast(g.device.type, enabled=False):
            g = g.to(up.dtype)
            g_h = g @ up  # (..., r)
            g_x = (g_h @ down).to(x_dtype) if ctx.needs_input_grad[0] else None
            rows_b, rows_d = _rows(route)
            g_b = g_d = None
            if ctx.needs_input_grad[2]:
                g_rows, h_rows = g[rows_b], h[rows_b]
                g_b = g_rows.reshape(-1, g.shape[-1])[:, d_out:].T @ h_rows.reshape(-1, h.shape[-1])
                g_b = (g_b * up_scale if up_scale != 1.0 else g_b).to(b_dtype)
            if ctx.needs_input_grad[4]:
                gh_rows, x_rows = g_h[rows_d], xc[rows_d]
                g_d = gh_rows.reshape(-1, g_h.shape[-1]).T @ x_rows.reshape(-1, xc.shape[-1])[:, d_in:]
                g_d = (g_d * down_scale if down_scale != 1.0 else g_d).to(d_dtype)
        return g_x, None, g_b, None, g_d, None, None, None


def _rows(route: tuple[int, str] | None) -> tuple[slice, slice]:
    """Batch rows whose gradients reach B and D: all, or the first ``k`` for the owned half and the rest for the
    other."""
    if route is None:
        return slice(None), slice(None)
    k, owned = route
    main, aux = slice(0, k), slice(k, None)
    return (main, aux) if owned == "up" else (aux, main)


def low_rank_product(x, a, b, c, d, up_scale=1.0, down_scale=1.0, route=None) -> torch.Tensor:
    return LowRankProduct.apply(x, a, b, c, d, float(up_scale), float(down_scale), route)
