import pytest
import torch
from torch import nn

from b4m.adapter.config import PLPConfig
from b4m.adapter.layer import PLPLinear
from b4m.adapter.lowrank import fusable_base, fused_base, linear_low_rank, low_rank_add


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


def factors(g, dtype=torch.float64):
    """A (4 × r), B (6 × r, learned), C (r × 7), D (r × 5, learned): m = 10, n = 12, r = 6."""
    a, c = torch.randn(4, 6, generator=g, dtype=dtype), torch.randn(6, 7, generator=g, dtype=dtype)
    b = torch.randn(6, 6, generator=g, dtype=dtype, requires_grad=True)
    d = torch.randn(6, 5, generator=g, dtype=dtype, requires_grad=True)
    return a, b, c, d


@pytest.mark.parametrize("route", [None, (2, "up"), (1, "down")])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_low_rank_matches_plain_autograd_and_gradcheck(route, bias):
    """The base layer inside the node: F.linear plus the product, gradients for x, B and D (none for W0 and its
    bias, which are frozen)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 12, generator=g, dtype=torch.float64)
    bias = torch.randn(10, generator=g, dtype=torch.float64) if bias else None
    a, b, c, d = factors(g)

    def fused(x, b, d):
        return linear_low_rank(x, w, bias, a, b, c, d, 0.5, 2.0, 0.7, route)

    out = fused(x, b, d)
    ref = torch.nn.functional.linear(x, w, bias) + 0.7 * reference(x, a, b, c, d, 0.5, 2.0, route)
    assert out.shape == (3, 5, 10)
    torch.testing.assert_close(out, ref)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out * grad).sum(), (x, b, d))
    want = torch.autograd.grad((ref * grad).sum(), (x, b, d))
    for gg, ww in zip(got, want, strict=True):
        torch.testing.assert_close(gg, ww)
    if route is None:
        assert torch.autograd.gradcheck(fused, (x, b, d))
    else:  # routing changes the learned halves' gradients on purpose
        assert torch.autograd.gradcheck(lambda x: fused(x, b, d), (x,))


def frozen_linear(bias: bool = True, cls=nn.Linear) -> nn.Linear:
    layer = cls(12, 10, bias=bias)
    layer.requires_grad_(False)
    return layer


class Subclass(nn.Linear):
    pass


def test_a_plain_frozen_linear_is_fusable_and_anything_else_is_not():
    x = torch.randn(3, 12)
    assert fusable_base(frozen_linear(), x) and fusable_base(frozen_linear(bias=False), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fusable_base(frozen_linear(), x.bfloat16()) and fusable_base(frozen_linear(), x)
        assert not fusable_base(frozen_linear(), x.double())  # autocast leaves fp64 alone
    assert not fusable_base(frozen_linear(), x.double())  # F.linear would refuse the dtypes; the adapter is fp32
    assert fusable_base(frozen_linear().double(), x.double(), torch.float64)
    assert not fusable_base(frozen_linear().bfloat16(), x.bfloat16())  # bf16 base, fp32 adapter: the add in bf16
    trainable = frozen_linear()
    trainable.weight.requires_grad_(True)
    trainable_bias = frozen_linear()
    trainable_bias.bias.requires_grad_(True)
    hooked, pre_hooked = frozen_linear(), frozen_linear()
    hooked.register_forward_hook(lambda *args: None)
    pre_hooked.register_forward_pre_hook(lambda *args: None)
    replaced = frozen_linear()
    replaced.forward = lambda x: x  # accelerate's hooks set the instance's forward
    for layer in (trainable, trainable_bias, frozen_linear(cls=Subclass), hooked, pre_hooked, replaced):
        assert not fusable_base(layer, x)
    with torch.device("meta"):
        meta = frozen_linear()
    assert not fusable_base(meta, x) and not fusable_base(meta, x.to("meta"))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not fusable_base(frozen_linear(), x)
    finally:
        handle.remove()
    assert fusable_base(frozen_linear(), x)


def plp(bias: bool, seed: int = 0) -> PLPLinear:
    torch.manual_seed(seed)
    layer = PLPLinear(frozen_linear(bias), PLPConfig(rank=4), "to_q")
    with torch.no_grad():  # non-zero learned halves, so every gradient path is exercised
        layer.up_learned.normal_(std=0.3)
        layer.down_learned.normal_(std=0.3)
    layer.up_scale, layer.down_scale, layer.scale = 0.5, 2.0, 0.7
    return layer


def grad_node(out: torch.Tensor) -> str:
    return type(out.grad_fn.next_functions[0][0]).__name__  # under the output's view


@pytest.mark.parametrize("route", [None, (1, "up"), (2, "down")])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("x_grad", [True, False])
def test_plp_linear_with_its_base_inside_trains_like_the_separate_nodes(route, bias, x_grad):
    """Under CPU bf16 autocast: the same output and learned halves' gradients bit for bit (the same GEMMs), and the
    input's gradient up to bf16 rounding (one rounding of g · W0 + g_h · W_down instead of two and a sum)."""
    layer = plp(bias)
    layer.route = route
    x0 = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(3, 5, 10, generator=torch.Generator().manual_seed(2))
    results = []
    for apart in (False, True):
        x = x0.clone().requires_grad_(x_grad)
        layer.zero_grad()
        with fused_base(not apart), torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert grad_node(out) == ("LowRankAddBackward" if apart else "LinearLowRankBackward")
        (out.float() * grad).sum().backward()
        results.append((out, x.grad, layer.up_learned.grad, layer.down_learned.grad))
    (out, g_x, g_b, g_d), (out_apart, g_x_apart, g_b_apart, g_d_apart) = results
    assert out.dtype == torch.bfloat16 and torch.equal(out, out_apart)
    assert torch.equal(g_b, g_b_apart) and torch.equal(g_d, g_d_apart)
    if x_grad:
        torch.testing.assert_close(g_x, g_x_apart, rtol=2e-2, atol=2e-2 * g_x_apart.abs().max().item())
    else:
        assert g_x is None and g_x_apart is None
    assert grad_node(layer(x0.requires_grad_())) == "LowRankAddBackward"  # fused_base ended with its block: off


def test_plp_linear_in_fp32_with_its_base_inside_is_the_separate_nodes():
    layer = plp(bias=True)
    x = torch.randn(4, 12, requires_grad=True)
    with fused_base():
        out = layer(x)
    out.square().sum().backward()
    got = (out, x.grad, layer.up_learned.grad, layer.down_learned.grad)
    x.grad = None
    layer.zero_grad()
    want = layer(x)
    want.square().sum().backward()
    for gg, ww in zip(got, (want, x.grad, layer.up_learned.grad, layer.down_learned.grad), strict=True):
        torch.testing.assert_close(gg, ww, rtol=1e-5, atol=1e-6)
