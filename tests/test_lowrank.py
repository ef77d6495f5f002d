import pytest
import torch

from b4m.lowrank import low_rank_product


def reference(x, a, b, c, d, us, ds, route):
    """The same product with plain autograd: routing as two half-batch paths with the other half detached."""

    def path(rows, b_grad, d_grad):
        up = torch.cat([a, (b if b_grad else b.detach()) * us])
        down = torch.cat([c, (d if d_grad else d.detach()) * ds], dim=1)
        return rows @ down.T @ up.T

    if route is None:
        return path(x, True, True)
    k, owned = route
    return torch.cat([path(x[:k], owned == "up", owned == "down"), path(x[k:], owned == "down", owned == "up")])


@pytest.mark.parametrize("route", [None, (2, "up"), (2, "down"), (0, "up"), (3, "down")])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.5, 2.0)])
def test_matches_plain_autograd_and_gradcheck(route, scales):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    a, c = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(6, 7, generator=g, dtype=torch.float64)
    b = torch.randn(6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    d = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    out = low_rank_product(x, a, b, c, d, *scales, route)
    ref = reference(x, a, b, c, d, *scales, route)
    torch.testing.assert_close(out, ref)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out * w).sum(), (x, b, d))
    want = torch.autograd.grad((ref * w).sum(), (x, b, d))
    for gg, ww in zip(got, want, strict=True):
        torch.testing.assert_close(gg, ww)
    if route is None:
        assert torch.autograd.gradcheck(lambda x, b, d: low_rank_product(x, a, b, c, d, *scales), (x, b, d))


def test_autocast_computes_in_bf16_and_returns_fp32_grads():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, generator=g)
    a, c = torch.randn(3, 4, generator=g), torch.randn(4, 4, generator=g)
    b = torch.randn(5, 4, generator=g, requires_grad=True)
    d = torch.randn(4, 4, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = low_rank_product(x, a, b, c, d)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert b.grad.dtype == torch.float32 and d.grad.dtype == torch.float32
    ref = reference(x, a, b, c, d, 1.0, 1.0, None)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())  # bf16: ~3 digits
