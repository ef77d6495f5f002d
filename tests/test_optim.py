"""The Riemannian preconditioner (b4m.optim): closed form, agreement with peft, clipping order, resume."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from b4m.adapter.config import PLPConfig
from b4m.adapter.layer import PLPLinear
from b4m.adapter.optim import create_optimizer, precondition_
from b4m.adapter.walker import add_plp, plp_layers
from b4m.errors import B4MError
from conftest import unet_inputs

REG = 0.05


class Net(nn.Module):
    """Two PLP layers of different shapes and ranks (m != n), with trainable base weights too."""

    def __init__(self, seed: int = 0, learned: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = PLPLinear(nn.Linear(20, 12), PLPConfig(rank=4), "a")
        self.b = PLPLinear(nn.Linear(12, 16), PLPConfig(rank=3), "b")
        if learned:  # nonzero learned halves, so the Gram matrices of B and D are not just δI
            for layer in (self.a, self.b):
                nn.init.normal_(layer.up_learned, std=0.5)
                nn.init.normal_(layer.down_learned, std=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def backward(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(5, 20, generator=g, dtype=torch.float64).to(dtype)
    target = torch.randn(5, 16, generator=g, dtype=torch.float64).to(dtype)
    ((model(x) - target) ** 2).mean().backward()


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    for i in range(steps):
        opt.zero_grad()
        backward(model, seed + i)
        opt.step()


def closed_form(layer: PLPLinear, lr: float, factors: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One preconditioned SGD step of (B, D), in float64 from the current values and grads."""
    a, b, c, d = (
        t.detach().double() for t in (layer.up_frozen, layer.up_learned, layer.down_frozen, layer.down_learned)
    )
    gb, gd = layer.up_learned.grad.double(), layer.down_learned.grad.double()
    n, m = (torch.cat([a, b]), torch.cat([c, d], dim=1)) if factors == "full" else (b, d)
    eye = torch.eye(b.shape[1], dtype=torch.float64)
    d1 = d - lr * torch.linalg.solve(n.T @ n + REG * eye, gd)
    b1 = b - lr * gb @ torch.linalg.inv(m @ m.T + REG * eye)
    return b1, d1


@pytest.mark.parametrize("factors", ["learned", "full"])
def test_sgd_step_matches_closed_form_and_pairs_by_name(factors):
    results = []
    for order in ("model", "reversed", "shuffled"):
        net = Net().double()
        params = [p for p in net.parameters() if p.requires_grad]
        if order == "reversed":
            params = params[::-1]
        elif order == "shuffled":
            params = [params[i] for i in torch.randperm(len(params), generator=torch.Generator().manual_seed(3))]
        opt = create_optimizer(
            net, torch.optim.SGD, lr=0.1, reg=REG, factors=factors, param_groups=[{"params": params}]
        )
        backward(net)
        expected = {name: closed_form(layer, 0.1, factors) for name, layer in plp_layers(net).items()}
        w0, gw = net.a.base_layer.weight.detach().clone(), net.a.base_layer.weight.grad.clone()
        opt.step()
        for name, layer in plp_layers(net).items():
            b1, d1 = expected[name]
            torch.testing.assert_close(layer.up_learned.detach(), b1, rtol=0, atol=1e-12)
            torch.testing.assert_close(layer.down_learned.detach(), d1, rtol=0, atol=1e-12)
        torch.testing.assert_close(net.a.base_layer.weight.detach(), w0 - 0.1 * gw, rtol=0, atol=1e-15)  # plain SGD
        results.append([p.detach().clone() for p in net.parameters()])
    for other in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(results[0], other, strict=True))


def test_float32_and_bfloat16_grads_keep_their_dtype():
    ref = Net().double()
    backward(ref)
    ref_grads = copy.deepcopy([p.grad for p in ref.parameters()])
    precondition_(plp_layers(ref), REG, "full")
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        net = Net().double()
        for p, g in zip(net.parameters(), ref_grads, strict=True):
            p.grad = g.clone()
        for t in [*net.parameters(), *net.buffers()]:  # params, buffers and grads in dtype (adapter halves included:
            t.data = t.data.to(dtype)  # module.to would keep those at float32 or more)
            if t.grad is not None:
                t.grad = t.grad.to(dtype)
        precondition_(plp_layers(net), REG, "full")
        for p, q in zip(net.parameters(), ref.parameters(), strict=True):
            assert p.grad.dtype == dtype
            torch.testing.assert_close(p.grad.double(), q.grad, rtol=tol, atol=tol * q.grad.abs().max().item())


def test_agrees_with_peft_on_full_factors():
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_riemannian_optimizer

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(20, 12))
    ours = copy.deepcopy(base)
    layer = PLPLinear(ours[0], PLPConfig(rank=4), "0")
    ours[0] = layer
    nn.init.normal_(layer.up_learned, std=0.5)
    nn.init.normal_(layer.down_learned, std=0.5)
    for p in layer.base_layer.parameters():
        p.requires_grad_(False)

    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=4, target_modules=["0"], init_lora_weights=False), copy.deepcopy(base)
    )
    lora = theirs[0]
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(layer.down())  # W_down = [C, D]
        lora.lora_B["default"].weight.copy_(layer.up())  # W_up = [A; B]
    assert {n for n, p in theirs.named_parameters() if p.requires_grad} == {
        "0.lora_A.default.weight",
        "0.lora_B.default.weight",
    }

    x = torch.randn(6, 20)
    torch.testing.assert_close(theirs(x), ours(x))
    opt_ours = create_optimizer(ours, torch.optim.SGD, lr=0.1, reg=REG, factors="full")
    opt_theirs = create_riemannian_optimizer(theirs, torch.optim.SGD, lr=0.1, reg=REG)
    d0 = layer.down_learned.detach().clone()
    for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
        (model(x) ** 2).mean().backward()
        opt.step()
    assert (layer.down_learned - d0).abs().max() > 0.01  # a real step, not a no-op
    d_in, d_out = layer.d_in, layer.d_out
    torch.testing.assert_close(layer.down_learned, lora.lora_A["default"].weight[:, d_in:], rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.up_learned, lora.lora_B["default"].weight[d_out:], rtol=0, atol=1e-6)


def test_frozen_parts_never_move_under_adamw_weight_decay():
    net = Net()
    frozen = {name: (l.up_frozen.clone(), l.down_frozen.clone()) for name, l in plp_layers(net).items()}
    learned = [p.detach().clone() for p in net.parameters()]
    opt = create_optimizer(net, lr=1e-2, weight_decay=0.1, factors="full")
    train(net, opt, 5)
    for name, layer in plp_layers(net).items():
        assert torch.equal(layer.up_frozen, frozen[name][0])
        assert torch.equal(layer.down_frozen, frozen[name][1])
    assert all(not torch.equal(p, q) for p, q in zip(net.parameters(), learned, strict=True))


def test_without_preconditioning_it_is_plain_adamw():
    net = Net()
    ref = copy.deepcopy(net)
    opt = create_optimizer(net, lr=1e-2, precondition=False, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    train(net, opt, 3)
    train(ref, ref_opt, 3)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), ref.parameters(), strict=True))


@pytest.mark.parametrize("scale", [0.25, 4.0])
def test_clipping_applies_to_preconditioned_grads(scale):
    probe = Net().double()
    backward(probe)
    raw_norm = torch.cat([p.grad.flatten() for p in probe.parameters()]).norm()
    precondition_(plp_layers(probe), REG, "learned")
    pre_grads = [p.grad.clone() for p in probe.parameters()]
    pre_norm = torch.cat([g.flatten() for g in pre_grads]).norm()
    assert not torch.isclose(pre_norm, raw_norm)  # otherwise the test could not tell the order apart

    net = Net().double()
    before = [p.detach().clone() for p in net.parameters()]
    max_norm = scale * pre_norm.item()
    opt = create_optimizer(net, torch.optim.SGD, lr=1.0, reg=REG, max_grad_norm=max_norm)
    backward(net)
    opt.step()
    steps = [q - p.detach() for p, q in zip(net.parameters(), before, strict=True)]  # = the grads the step saw
    seen = torch.cat([s.flatten() for s in steps]).norm()
    torch.testing.assert_close(seen, torch.clamp(pre_norm, max=max_norm), rtol=1e-6, atol=0)
    torch.testing.assert_close(opt.last_grad_norm, pre_norm)
    factor = min(1.0, max_norm / pre_norm.item())
    for s, g in zip(steps, pre_grads, strict=True):
        torch.testing.assert_close(s, g * factor, rtol=1e-5, atol=1e-12)


def test_state_dict_round_trip_resumes_exactly():
    settings = dict(reg=REG, factors="full", max_grad_norm=0.5)
    net = Net()
    opt = create_optimizer(net, lr=1e-2, weight_decay=0.1, **settings)
    train(net, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    train(net, opt, 2, seed=3)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["opt"]["b4m_preconditioner"] == dict(precondition=True, **settings)
    fresh = Net(seed=1, learned=False)
    fresh.load_state_dict(saved["model"])
    fresh_opt = create_optimizer(fresh, lr=1e-2, weight_decay=0.1)  # default settings: restored by the load
    fresh_opt.load_state_dict(saved["opt"])
    assert (fresh_opt.reg, fresh_opt.factors, fresh_opt.max_grad_norm) == (REG, "full", 0.5)
    assert "b4m_preconditioner" in saved["opt"]  # the load did not mutate the caller's dict
    train(fresh, fresh_opt, 2, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), fresh.parameters(), strict=True))


@pytest.mark.parametrize("factors", ["learned", "full"])
def test_reg_zero_with_zero_learned_halves_is_finite(factors):
    net = Net(learned=False)  # B = D = 0: the learned Gram matrices are exactly zero
    opt = create_optimizer(net, torch.optim.SGD, lr=0.1, reg=0.0, factors=factors)
    train(net, opt, 2)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    # pinv(0) = 0: with "learned" factors, reg = 0 can never leave B = D = 0; the full factors can.
    assert bool(net.a.down_learned.any()) == (factors == "full")


def test_only_the_optimizers_own_grads_are_preconditioned():
    net = Net()
    backward(net)
    grad_b, grad_d = net.a.up_learned.grad.clone(), net.a.down_learned.grad.clone()
    downs = [layer.down_learned for layer in plp_layers(net).values()]
    opt = create_optimizer(net, torch.optim.SGD, lr=0.0, param_groups=[{"params": downs}])
    opt.step()
    assert torch.equal(net.a.up_learned.grad, grad_b)  # not in this optimizer: untouched
    assert not torch.equal(net.a.down_learned.grad, grad_d)


def test_bad_input():
    net = Net()
    with pytest.raises(B4MError, match="factors"):
        create_optimizer(net, lr=1e-3, factors="foo")
    with pytest.raises(B4MError, match="reg"):
        create_optimizer(net, lr=1e-3, reg=-1)
    with pytest.raises(B4MError, match="reg"):
        precondition_(plp_layers(net), reg=float("nan"))
    with pytest.raises(B4MError, match="closure"):
        create_optimizer(net, torch.optim.LBFGS, lr=1e-3)
    with pytest.raises(B4MError, match="no PLP layers"):
        create_optimizer(nn.Linear(3, 3), lr=1e-3)
    opt = create_optimizer(net, lr=1e-3)
    backward(net)
    with pytest.raises(B4MError, match="closure"):
        opt.step(lambda: 0.0)


def test_tiny_unet_step(sd_unet):
    layers = add_plp(sd_unet, PLPConfig(rank=4))
    opt = create_optimizer(sd_unet, lr=1e-3, factors="full", max_grad_norm=1.0)
    assert opt.plp_layers.keys() == layers.keys()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for layer in layers.values() for p in (layer.up_learned, layer.down_learned)
    }
    sd_unet(**unet_inputs(sd_unet)).sample.square().mean().backward()
    opt.step()
    assert all(layer.up_learned.any() and layer.down_learned.any() for layer in layers.values())
    assert all(torch.isfinite(p).all() for p in sd_unet.parameters())
