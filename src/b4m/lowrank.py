"""The PLP product ``(x · W_downᵀ) · W_upᵀ`` as one autograd node, with optional per-sample gradient routing; and
the whole adapted layer ``x · (W0 + ΔW)ᵀ + bias`` as one node with ``ΔW`` formed once per call (:func:`merged_linear`).

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


class MergedLinear(torch.autograd.Function):
    """``out = x · (W0 + s·W_up·W_down)ᵀ + bias`` with ``W_up = [A; s_u·B]``, ``W_down = [C, s_d·D]``; gradients
    only for ``x``, ``B`` and ``D``.

    The adapted weight ``W = W0 + ΔW`` is formed in float32 (``addmm``, ``m·r·n`` flops) and cast to the compute
    dtype once per call, so the layer costs one matmul forward and one for ``g_x`` backward, like the frozen layer,
    plus one weight-gradient matmul ``G = gᵀ·x`` (``m·n`` per row of the batch) whose products with the factors give
    the learned halves' gradients::

        g_B = s·s_u · G[d_out:, :] · W_downᵀ        g_D = s·s_d · W_upᵀ · G[:, d_in:]

    (with routing, ``G`` sums over the rows that train each half). Against :class:`LowRankProduct` plus the base
    layer, it trades the four to six skinny rank-``r`` matmuls per layer, each reading a whole activation, and the
    factor casts, for that one large matmul: on SDXL at 16 images per step, fewer and better-shaped kernels
    (docs/benchmarks.md). The forward sees ``W`` in the compute dtype: in bf16 an entry of ``ΔW`` smaller than half a
    unit in the last place of its ``W0`` entry does not change the forward (the gradients are those of the rounded
    weight, as for any bf16 model).
    """

    @staticmethod
    def forward(ctx, x, w0, bias, a, b, c, d, scale: float, up_scale: float, down_scale: float, route):
        dtype = _compute_dtype(x, w0.dtype)
        acc = torch.promote_types(w0.dtype, torch.float32)  # ΔW and the factors' gradients: float32 or better
        with torch.autocast(x.device.type, enabled=False):
            up = torch.cat([a, b * up_scale if up_scale != 1.0 else b], dim=0).to(acc)  # m × r
            down = torch.cat([c, d * down_scale if down_scale != 1.0 else d], dim=1).to(acc)  # r × n
            w = torch.addmm(w0.to(acc), up, down, alpha=scale).to(dtype)
            xc = x.to(dtype)
            out = torch.nn.functional.linear(xc, w, bias.to(dtype) if bias is not None else None)
        ctx.save_for_backward(xc, w, up, down)
        ctx.meta = (a.shape[0], c.shape[1], scale * up_scale, scale * down_scale, route, x.dtype, b.dtype, d.dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        xc, w, up, down = ctx.saved_tensors
        d_out, d_in, s_up, s_down, route, x_dtype, b_dtype, d_dtype = ctx.meta
        need_b, need_d = ctx.needs_input_grad[4], ctx.needs_input_grad[6]
        with torch.autocast(g.device.type, enabled=False):
            g = g.to(w.dtype)
            g_x = (g @ w).to(x_dtype) if ctx.needs_input_grad[0] else None
            g2, x2 = g.reshape(-1, g.shape[-1]), xc.reshape(-1, xc.shape[-1])
            rows_b, rows_d = _rows(route)
            if route is None and need_b and need_d:  # one G for both halves
                full = (g2.T @ x2).to(up.dtype)  # m × n
                gb_full, gd_full = full[d_out:], full[:, d_in:]
            else:
                gb_full = gd_full = None
                if need_b:
                    gb_full = (_flat(g[rows_b])[:, d_out:].T @ _flat(xc[rows_b])).to(up.dtype)  # (m - d_out) × n
                if need_d:
                    gd_full = (_flat(g[rows_d]).T @ _flat(xc[rows_d])[:, d_in:]).to(up.dtype)  # m × (n - d_in)
            g_b = (gb_full @ down.T * s_up).to(b_dtype) if need_b else None
            g_d = (up.T @ gd_full * s_down).to(d_dtype) if need_d else None
        return g_x, None, None, None, g_b, None, g_d, None, None, None, None


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def merged_linear(x, w0, bias, a, b, c, d, scale=1.0, up_scale=1.0, down_scale=1.0, route=None) -> torch.Tensor:
    return MergedLinear.apply(x, w0, bias, a, b, c, d, float(scale), float(up_scale), float(down_scale), route)
