import pytest
import torch

from b4m.adapter.lowrank import low_rank_add


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


@pytest.mark.parametrize("route", [None, (2, "up"), (1, "down")])
@pytest.mark.parametrize("batch", [(3, 5), (3,)])
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_low_rank_add_matches_plain_autograd_and_gradcheck(route, batch, scale):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*batch, 12, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(x.shape[:-1].numel(), 10, generator=g, dtype=torch.float64, requires_grad=True)  # (rows, m)
    a, c = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(6, 7, generator=g, dtype=torch.float64)
    b = torch.randn(6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    d = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)

    def fused(y, x, b, d):  # y.clone(): the node adds into its y, which a leaf cannot be
        return low_rank_add(y.clone(), x, a, b, c, d, 0.5, 2.0, scale, route)

    out = fused(y, x, b, d)
    ref = y.view(*batch, 10) + scale * reference(x, a, b, c, d, 0.5, 2.0, route)
    assert out.shape == (*batch, 10)
    torch.testing.assert_close(out, ref)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out * w).sum(), (y, x, b, d))
    want = torch.autograd.grad((ref * w).sum(), (y, x, b, d))
    for gg, ww in zip(got, want, strict=True):
        torch.testing.assert_close(gg, ww)
    # Routing changes the learned halves' gradients on purpose: the numerical check covers y and x only then.
    if route is None:
        assert torch.autograd.gradcheck(fused, (y, x, b, d))
    else:
        assert torch.autograd.gradcheck(lambda y, x: fused(y, x, b, d), (y, x))


def test_low_rank_add_writes_into_y_and_its_output_can_be_modified_in_place():
    x, y = torch.randn(2, 3, 8), torch.randn(6, 5, requires_grad=True)
    b = torch.zeros(3, 4, requires_grad=True)
    base = y * 1.0
    out = low_rank_add(base, x, torch.randn(2, 4), b, torch.randn(4, 4), torch.randn(4, 4))
    assert out.shape == (2, 3, 5) and out.data_ptr() == base.data_ptr()  # no new (rows, m) tensor, no copy of y
    out.mul_(2).sum().backward()  # e.g. a processor that rescales in place
    torch.testing.assert_close(y.grad, torch.full_like(y, 2.0))
    assert b.grad is not None


def test_low_rank_add_keeps_y_apart_where_dtypes_differ():
    """A bf16 base layer under an fp32 adapter without autocast: the sum is made in fp32 and cast, into a new
    tensor."""
    x, y = torch.randn(4, 8), torch.randn(4, 5).to(torch.bfloat16)
    before = y.clone()
    a, b, c, d = torch.randn(2, 4), torch.randn(3, 4), torch.randn(4, 4), torch.randn(4, 4)
    out = low_rank_add(y, x, a, b, c, d, scale=0.5)
    assert out.dtype == torch.bfloat16 and torch.equal(y, before)
    assert torch.equal(out, y + (0.5 * reference(x, a, b, c, d, 1.0, 1.0, None)).to(torch.bfloat16))


def test_low_rank_add_under_autocast_computes_in_bf16_and_returns_fp32_grads():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, generator=g)
    a, c = torch.randn(3, 4, generator=g), torch.randn(4, 4, generator=g)
    b = torch.randn(5, 4, generator=g, requires_grad=True)
    d = torch.randn(4, 4, generator=g, requires_grad=True)
    y = torch.zeros(2, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = low_rank_add(y, x, a, b, c, d)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert b.grad.dtype == torch.float32 and d.grad.dtype == torch.float32
    ref = reference(x, a, b, c, d, 1.0, 1.0, None)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())  # bf16: ~3 digits
