import copy
import gc
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from b4m import B4MError, PLPConfig, add_plp, dry_run, merge_plp, plp_layers, remove_plp, set_scales
from b4m.adapter.file import adapter_from_model, fuse, load_adapter, model_factors, save_adapter
from b4m.adapter.init import frozen_rng, learned_rng, make_frozen, make_learned_down
from b4m.adapter.layer import PLPLinear
from b4m.adapter.lowrank import autocast_input
from b4m.adapter.walker import routing
from conftest import TINY_SD_UNET, TINY_SDXL_UNET, make_unet, unet_inputs


class TwoLayers(nn.Module):
    """A stand-in for an attention block: a square layer and a cross-attention-like m ≠ n layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.to_q = nn.Linear(16, 16)
        self.to_k = nn.Linear(48, 20)  # like SDXL's attn2.to_k 2048 → 640

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return self.to_q(x).sum(-1, keepdim=True) * self.to_k(ctx)


def randomize_learned(model: nn.Module, std: float = 0.1, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in plp_layers(model).values():
            layer.up_learned.copy_(torch.randn(layer.up_learned.shape, generator=g) * std)
            layer.down_learned.copy_(torch.randn(layer.down_learned.shape, generator=g) * std)


@pytest.mark.parametrize("init", ["approx", "exact", "random"])
def test_shapes_and_forward_equal_closed_form(init):
    base = nn.Linear(48, 20)
    layer = PLPLinear(copy.deepcopy(base), PLPConfig(rank=8, init=init), "to_k")
    assert (layer.d_out, layer.d_in) == (10, 24)
    a, b, c, d = layer.up_frozen, layer.up_learned, layer.down_frozen, layer.down_learned  # the paper's A, B, C, D
    assert a.shape == (10, 8) and b.shape == (10, 8)
    assert c.shape == (8, 24) and d.shape == (8, 24)
    randomize_learned(nn.Sequential(layer))
    x = torch.randn(3, 5, 48, dtype=torch.float64)
    up = torch.cat([a, b]).double()
    down = torch.cat([c, d], dim=1).double()
    expected = x @ (base.weight.double() + up @ down).T + base.bias.double()
    torch.testing.assert_close(layer(x.float()).double(), expected, rtol=1e-5, atol=1e-5)
    # ΔW's blocks are those of eq. 9.
    dw = layer.delta_weight()
    torch.testing.assert_close(dw[:10, :24], a @ c)
    torch.testing.assert_close(dw[:10, 24:], a @ d)
    torch.testing.assert_close(dw[10:, :24], b @ c)
    torch.testing.assert_close(dw[10:, 24:], b @ d)


def test_approx_init_is_the_official_scheme_generalised():
    a, c = make_frozen("approx", 8, 10, 24, frozen_rng(0, "x"))
    # Disjoint rows of one matrix with orthonormal columns: AᵀA + CCᵀ = I_r, while A·C is not zero.
    np.testing.assert_allclose(a.T @ a + c @ c.T, np.eye(8), atol=1e-12)
    assert np.abs(a @ c).max() > 1e-3


def test_exact_init_gives_zero_product_and_identity_model_at_step_zero(sdxl_unet):
    a, c = make_frozen("exact", 8, 10, 24, frozen_rng(0, "x"))
    assert np.array_equal(a @ c, np.zeros((10, 24)))
    np.testing.assert_allclose(a.T @ a + c @ c.T, np.eye(8), atol=1e-12)
    inputs = unet_inputs(sdxl_unet)
    before = sdxl_unet(**inputs).sample
    add_plp(sdxl_unet, PLPConfig(rank=4, init="exact"))
    after = sdxl_unet(**inputs).sample
    assert torch.equal(before, after)


def test_approx_init_changes_the_model_at_step_zero(sd_unet):
    inputs = unet_inputs(sd_unet)
    before = sd_unet(**inputs).sample
    add_plp(sd_unet, PLPConfig(rank=4, init="approx"))
    assert not torch.allclose(before, sd_unet(**inputs).sample)


def test_random_init_is_not_orthogonal():
    a, c = make_frozen("random", 8, 10, 24, frozen_rng(0, "x"))
    assert np.abs(a.T @ a + c @ c.T - np.eye(8)).max() > 0.1


def test_frozen_parts_are_deterministic_and_platform_stable():
    a1, c1 = make_frozen("approx", 8, 10, 24, frozen_rng(3, "blocks.0.to_q"))
    a2, c2 = make_frozen("approx", 8, 10, 24, frozen_rng(3, "blocks.0.to_q"))
    assert np.array_equal(a1, a2) and np.array_equal(c1, c2)
    a3, _ = make_frozen("approx", 8, 10, 24, frozen_rng(3, "blocks.1.to_q"))
    assert not np.array_equal(a1, a3)
    # Golden values: numpy keeps PCG64 streams fixed across versions and platforms; if this changes, runs made with
    # older versions can no longer be reproduced from their seed (their files still fuse: A and C are stored).
    a, c = make_frozen("approx", 8, 10, 24, frozen_rng(0, "to_q"))
    np.testing.assert_allclose(a[0, :3], [0.03170856, 0.13165017, 0.18929004], atol=1e-7)
    np.testing.assert_allclose(c[0, :3], [-0.38025173, 0.04152603, 0.05467493], atol=1e-7)


def test_only_learned_halves_train_and_frozen_parts_survive_weight_decay():
    model = TwoLayers()
    add_plp(model, PLPConfig(rank=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{p}" for m in ("to_q", "to_k") for p in ("up_learned", "down_learned")}
    frozen = {n: b.clone() for n, b in model.named_buffers()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    for _ in range(5):
        loss = model(torch.randn(2, 16), torch.randn(2, 48)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(frozen[n], b) for n, b in model.named_buffers())
    layer = plp_layers(model)["to_q"]
    assert layer.up_learned.abs().sum() > 0 and layer.down_learned.abs().sum() > 0  # both learn from a zero start


def test_half_assignment():
    assert PLPConfig().half_of("content") == "up" and PLPConfig().half_of("style") == "down"
    official = PLPConfig(assignment="official")
    assert official.half_of("content") == "down" and official.half_of("style") == "up"


def test_content_and_style_scales_scale_their_halves():
    model = TwoLayers()
    config = PLPConfig(rank=4)
    add_plp(model, config)
    randomize_learned(model)
    x, ctx = torch.randn(2, 16), torch.randn(2, 48)
    set_scales(model, config, content_scale=0.0, style_scale=0.5, scale=2.0)
    scaled = model(x, ctx)
    set_scales(model, config)
    with torch.no_grad():
        for layer in plp_layers(model).values():
            layer.up_learned.zero_()  # paper: content = B
            layer.down_learned.mul_(0.5)
            layer.scale = 2.0
    torch.testing.assert_close(scaled, model(x, ctx))


def test_targets_suffix_regex_exclude_and_cross_attention_shapes(sdxl_unet):
    names = [row[0] for row in dry_run(sdxl_unet, PLPConfig(rank=4)).modules]
    # 12 transformer blocks (down 2×2, mid 2, up 3×2) × 2 attentions × 4 projections
    assert len(names) == 12 * 2 * 4
    assert all(n.split(".")[-1] in {"to_q", "to_k", "to_v", "0"} for n in names)
    only_attn2 = dry_run(sdxl_unet, PLPConfig(rank=4, targets=r".*attn2\.to_(k|v)")).modules
    assert {(i, o) for _, i, o, _, _ in only_attn2} == {(40, 32)}  # cross-attention k/v: m ≠ n
    no_out = dry_run(sdxl_unet, PLPConfig(rank=4, exclude=["to_out.0"])).modules
    assert len(no_out) == len(names) * 3 // 4
    with pytest.raises(B4MError, match="no nn.Linear module matches"):
        dry_run(sdxl_unet, PLPConfig(targets=["nothing_here"]))


def test_dry_run_counts_match_the_attached_adapter(sd_unet):
    dr = dry_run(sd_unet, PLPConfig(rank=4))
    layers = add_plp(sd_unet, PLPConfig(rank=4))
    assert len(dr.modules) == len(layers) == 48
    assert dr.trainable == sum(p.numel() for p in sd_unet.parameters() if p.requires_grad)
    assert dr.frozen == sum(b.numel() for n, b in sd_unet.named_buffers() if n.endswith("_frozen"))
    assert "48 modules" in dr.lines()[-1]


def test_merge_unmerge_and_remove(sd_unet):
    original = {n: p.clone() for n, p in sd_unet.named_parameters()}
    inputs = unet_inputs(sd_unet)
    add_plp(sd_unet, PLPConfig(rank=4))
    randomize_learned(sd_unet, std=0.3)
    unmerged = sd_unet(**inputs).sample
    for layer in plp_layers(sd_unet).values():
        layer.merge()
    torch.testing.assert_close(sd_unet(**inputs).sample, unmerged, rtol=1e-4, atol=1e-5)
    with pytest.raises(B4MError, match="unmerge before changing scales"):
        set_scales(sd_unet, PLPConfig(rank=4), content_scale=0.5)
    remove_plp(sd_unet)
    assert not plp_layers(sd_unet)
    for n, p in sd_unet.named_parameters():
        torch.testing.assert_close(p, original[n], rtol=0, atol=1e-6)


def test_merge_plp_folds_the_adapter_in_and_removes_the_wrappers(sd_unet):
    inputs = unet_inputs(sd_unet)
    layers = add_plp(sd_unet, PLPConfig(rank=4))
    randomize_learned(sd_unet, std=0.3)
    with torch.no_grad():
        unmerged = sd_unet(**inputs).sample
        assert merge_plp(sd_unet) == len(layers)
        assert not plp_layers(sd_unet)
        assert all(type(sd_unet.get_submodule(name)) is nn.Linear for name in layers)
        torch.testing.assert_close(sd_unet(**inputs).sample, unmerged, rtol=1e-4, atol=1e-5)


def test_merge_refuses_non_finite():
    layer = PLPLinear(nn.Linear(8, 8), PLPConfig(rank=2), "to_q")
    with torch.no_grad():
        layer.up_learned.fill_(float("inf"))
        layer.down_learned.fill_(1.0)
    with pytest.raises(B4MError, match="to_q: merging"):
        layer.merge()
    assert not layer.merged


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rank=0), "rank must be"),
        (dict(ratio=1.0), "ratio must be in"),
        (dict(ratio=0.0), "ratio 0 leaves no frozen part"),
        (dict(ratio=0.0, learned_init="zero"), "or a non-zero learned_init"),
        (dict(learned_init="xavier"), "learned_init must be one of"),
        (dict(init="orth"), "init must be one of"),
        (dict(assignment="swap"), "assignment must be one of"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(B4MError, match=message):
        PLPConfig(**kwargs)


def test_attaching_twice_is_refused():
    model = TwoLayers()
    add_plp(model, PLPConfig(rank=2))
    with pytest.raises(B4MError, match="already carries PLP adapters"):
        add_plp(model, PLPConfig(rank=2))


def test_sd_and_sdxl_default_targets_cover_every_attention_projection():
    for cfg in (TINY_SD_UNET, TINY_SDXL_UNET):
        unet = make_unet(cfg)
        n_attn = sum(1 for n, m in unet.named_modules() if n.endswith((".attn1", ".attn2")))
        assert len(dry_run(unet, PLPConfig(rank=4)).modules) == 4 * n_attn


def test_bf16_base_layer_with_fp32_adapter_with_and_without_autocast():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = PLPLinear(base, PLPConfig(rank=4), "to_q")
    randomize_learned(nn.Sequential(layer))
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    expected = base(x).float() + x.float() @ layer.delta_weight().T
    plain = layer(x)
    assert plain.dtype == torch.bfloat16
    torch.testing.assert_close(plain.float(), expected, rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = layer(x)
    torch.testing.assert_close(autocast.float(), expected, rtol=2e-2, atol=2e-2)
    autocast.float().sum().backward()
    assert layer.up_learned.grad.dtype == torch.float32  # adapter weights and their grads stay fp32


# --------------------------------------------------------------------------------------------------------------------
# The training path: one input cast under autocast, the adapter's add fused into its last matmul


class Block(nn.Module):
    """A transformer block's attention in miniature: q, k and v of one LayerNorm output (fp32 under autocast), then a
    cross-attention whose k and v share the context."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm1, self.norm2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.attn1 = nn.ModuleDict(dict(to_q=nn.Linear(16, 16), to_k=nn.Linear(16, 16), to_v=nn.Linear(16, 16)))
        self.attn2 = nn.ModuleDict(dict(to_q=nn.Linear(16, 16), to_k=nn.Linear(24, 16), to_v=nn.Linear(24, 16)))
        self.attn1["to_out"] = nn.ModuleList([nn.Linear(16, 16)])
        self.attn2["to_out"] = nn.ModuleList([nn.Linear(16, 16)])

    @staticmethod
    def attend(attn: nn.ModuleDict, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        q, k, v = attn["to_q"](h), attn["to_k"](ctx), attn["to_v"](ctx)
        return attn["to_out"][0](F.scaled_dot_product_attention(q, k, v))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attend(self.attn1, h, h)
        return x + self.attend(self.attn2, self.norm2(x), ctx)


def naive_forward(self: PLPLinear, x: torch.Tensor) -> torch.Tensor:
    """The adapter in plain PyTorch, as the paper writes it: ``W0·x + scale · W_up·(W_down·x)`` with routing as two
    half-batch paths, each with the half it must not train detached (the reference the one-node path must equal)."""

    def path(rows: torch.Tensor, up_grad: bool, down_grad: bool) -> torch.Tensor:
        b = self.up_learned if up_grad else self.up_learned.detach()
        d = self.down_learned if down_grad else self.down_learned.detach()
        up = torch.cat([self.up_frozen, b * self.up_scale]).to(rows.dtype)
        down = torch.cat([self.down_frozen, d * self.down_scale], dim=1).to(rows.dtype)
        return self.scale * F.linear(F.linear(rows, down), up)

    y = self.base_layer(x)
    if self.route is None:
        delta = path(x, True, True)
    else:
        k, owned = self.route
        delta = torch.cat([path(x[:k], owned == "up", owned == "down"), path(x[k:], owned == "down", owned == "up")])
    return y + delta.to(y.dtype)


def train_pass(model, inputs, amp: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A forward and a backward of ``model`` (routed, scaled PLP layers): the output and the gradients of the float
    inputs and of every learned half."""
    floats = {k: v for k, v in inputs.items() if torch.is_tensor(v) and v.is_floating_point()}
    leaves = {k: v.detach().requires_grad_() for k, v in floats.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model(**{**inputs, **leaves})
        out = out if torch.is_tensor(out) else out.sample
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    params = [p for layer in plp_layers(model).values() for p in (layer.up_learned, layer.down_learned)]
    grads = torch.autograd.grad((out.float() * w).sum(), [*leaves.values(), *params])
    return out.detach(), list(grads)


def reference_pass(model, inputs, amp: bool, monkeypatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with monkeypatch.context() as m:
        m.setattr(PLPLinear, "forward", naive_forward)
        return train_pass(model, inputs, amp)


def scaled_routed_plp(model: nn.Module) -> None:
    config = PLPConfig(rank=4)
    add_plp(model, config)
    randomize_learned(model)
    set_scales(model, config, scale=0.8, content_scale=1.5, style_scale=0.5)
    model.train()


def max_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    """Each tensor's largest deviation, relative to its largest entry."""
    return [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want, strict=True)]


@pytest.mark.parametrize("amp", [False, True])
def test_training_path_equals_the_adapter_in_plain_pytorch(amp, monkeypatch):
    """The one-node training forward (shared input cast, the add inside the last matmul, routing in the backward)
    gives the output and the gradients of the adapter written out in plain PyTorch."""
    block = Block()
    scaled_routed_plp(block)
    g = torch.Generator().manual_seed(1)
    inputs = dict(x=torch.randn(3, 5, 16, generator=g), ctx=torch.randn(3, 7, 24, generator=g))
    with routing(block, 1, "up"):
        out, grads = train_pass(block, inputs, amp)
        ref, ref_grads = reference_pass(block, inputs, amp, monkeypatch)
    assert out.dtype == ref.dtype == torch.float32  # the residual stream stays fp32
    assert all(g.dtype == torch.float32 for g in grads) and len(grads) == 2 + 2 * 8
    # fp32: addmm's rounding against a matmul, a scale and an add; bf16: about two significant digits.
    assert max(max_errors([out, *grads], [ref, *ref_grads])) < (2e-2 if amp else 1e-6)


def test_training_path_on_a_unet_is_as_accurate_as_plain_pytorch(sdxl_unet, monkeypatch):
    """Through a whole UNet, bf16 roundings grow to several percent whichever the implementation: against the fp32
    result, the one-node path's errors are those of the plain one (and the two fp32 results agree)."""
    scaled_routed_plp(sdxl_unet)
    inputs = unet_inputs(sdxl_unet, batch=3)
    with routing(sdxl_unet, 1, "up"):
        exact, exact_grads = reference_pass(sdxl_unet, inputs, False, monkeypatch)
        fp32, fp32_grads = train_pass(sdxl_unet, inputs, False)
        fused = max_errors(train_pass(sdxl_unet, inputs, True)[1], exact_grads)
        plain = max_errors(reference_pass(sdxl_unet, inputs, True, monkeypatch)[1], exact_grads)
    assert max(max_errors([fp32, *fp32_grads], [exact, *exact_grads])) < 1e-5
    assert sum(fused) < 1.25 * sum(plain) and max(fused) < 1.25 * max(plain)


class CastCounter(TorchDispatchMode):
    """Counts the casts of tensors of one shape to bf16 (autocast's included: they pass the dispatcher too)."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape, self.casts = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].shape == self.shape:
            self.casts += kwargs.get("dtype") == torch.bfloat16
        return func(*args, **kwargs)


def qkv_layers() -> list[PLPLinear]:
    torch.manual_seed(0)
    layers = [PLPLinear(nn.Linear(16, 12), PLPConfig(rank=4), name) for name in ("to_q", "to_k", "to_v")]
    randomize_learned(nn.Sequential(*layers))
    return layers


def test_layers_fed_one_tensor_share_one_autocast_cast():
    """to_q, to_k and to_v of an attention block get one fp32 LayerNorm output: under autocast it is cast to bf16
    once, not twice a layer (the base layer's and the adapter's), with the values of separate casts."""
    layers = qkv_layers()
    leaf = torch.randn(2, 5, 16, requires_grad=True)
    h = leaf * 1.0  # an activation: autocast's own cache keeps casts of leaves only (and training turns it off)

    def run(inputs: list[torch.Tensor]) -> tuple[CastCounter, list[torch.Tensor], list]:
        with CastCounter(h.shape) as counter, torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            outs = [layer(x) for layer, x in zip(layers, inputs, strict=True)]
        params = [p for layer in layers for p in (layer.up_learned, layer.down_learned)]
        loss = sum(o.float().sum() for o in outs)
        grads = torch.autograd.grad(loss, [leaf, *params], retain_graph=True)  # h serves four runs
        return counter, outs, grads

    shared, outs, grads = run([h, h, h])
    assert shared.casts == 1  # a cast per layer and per path would be 6
    apart, ref_outs, ref_grads = run([h.clone() for _ in layers])  # three tensors: three casts
    assert apart.casts == 3
    for got, want in zip(outs, ref_outs, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(grads[1:], ref_grads[1:], strict=True):
        assert torch.equal(got, want)  # the learned halves' gradients do not see how h's gradient is summed
    # h's: three bf16 gradients summed in bf16 before the cast back, against three fp32 casts summed in fp32.
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=2e-2, atol=2e-2 * ref_grads[0].abs().max().item())


def test_the_shared_cast_follows_in_place_changes_and_keeps_nothing_alive():
    layer = qkv_layers()[0]
    h = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = layer(h)
        with torch.no_grad():
            h.mul_(2.0)  # a new version: the cast of the old values must not be reused
        with CastCounter(h.shape) as counter:
            second = layer(h)
        fresh = layer(h.clone())
    assert counter.casts == 1
    assert not torch.equal(second, first) and torch.equal(second, fresh)
    source = weakref.ref(h)
    del h
    gc.collect()
    assert source() is None


def test_the_shared_cast_does_not_outlive_its_graph():
    """Once the backward pass has freed what the adapters saved, nothing holds the cast, nor through it the step's
    autograd graph (whose AccumulateGrad nodes a CUDA graph capture of the next step must not meet)."""
    layer = qkv_layers()[0]
    h = torch.randn(2, 5, 16, requires_grad=True) * 1.0

    def casts() -> list[torch.Tensor]:  # live bf16 tensors of h's shape: the shared cast, if anything keeps it
        return [o for o in gc.get_objects() if torch.is_tensor(o) and o.dtype == torch.bfloat16 and o.shape == h.shape]

    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        out = layer(h)
    gc.collect()
    assert casts()  # saved for the backward pass
    out.float().sum().backward()
    del out
    gc.collect()
    assert not casts()


def test_no_shared_cast_without_autocast():
    """CPU fp32 training (no autocast) feeds the very tensor it got to both paths, cast by nobody."""
    layer = qkv_layers()[0]
    h = torch.randn(2, 5, 16)
    assert autocast_input(h) is h
    with CastCounter(h.shape) as counter:
        layer(h)
    assert counter.casts == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_input(h.double()).dtype == torch.float64  # autocast leaves fp64 alone too


# --------------------------------------------------------------------------------------------------------------------
# Frozen ratio d = 0 (paper Fig. 11) and a plain LoRA: no frozen part, a non-zero learned init


def test_ratio_zero_has_no_frozen_part_and_starts_at_the_base_model(sd_unet):
    base = nn.Linear(48, 20)
    layer = PLPLinear(copy.deepcopy(base), PLPConfig(rank=8, ratio=0.0, learned_init="kaiming"), "to_k")
    assert (layer.d_out, layer.d_in) == (0, 0)
    assert layer.up_frozen.shape == (0, 8) and layer.down_frozen.shape == (8, 0)
    assert layer.up_learned.shape == (20, 8) and layer.down_learned.shape == (8, 48)
    assert torch.equal(layer.up_learned, torch.zeros(20, 8))
    # peft's kaiming_uniform_(a=√5) on an r × n down projection: U(-1/√n, 1/√n), n = 48.
    bound = 1 / np.sqrt(48)
    d = layer.down_learned.detach()
    assert d.abs().max() <= bound and d.abs().max() > 0.9 * bound
    assert abs(d.std().item() - bound / np.sqrt(3)) < 0.02  # the uniform's std; 384 draws
    assert torch.equal(layer.delta_weight(), torch.zeros(20, 48))
    x = torch.randn(3, 48)
    assert torch.equal(layer(x), base(x))  # ΔW = 0 at step 0, exactly

    inputs = unet_inputs(sd_unet)
    before = sd_unet(**inputs).sample
    add_plp(sd_unet, PLPConfig(rank=4, ratio=0.0, learned_init="gaussian"))
    assert torch.equal(before, sd_unet(**inputs).sample)
    assert not any(n.endswith("_frozen") and b.numel() for n, b in sd_unet.named_buffers())


def test_gaussian_learned_init_and_its_stream():
    d = make_learned_down("gaussian", 640, 64, 0, learned_rng(0, "to_q"))
    assert d.shape == (64, 640)
    assert abs(d.std() - 1 / 64) < 1e-3  # N(0, 1/r²), diffusers' DreamBooth-LoRA init
    again = make_learned_down("gaussian", 640, 64, 0, learned_rng(0, "to_q"))
    assert np.array_equal(d, again)
    assert not np.array_equal(d, make_learned_down("gaussian", 640, 64, 0, learned_rng(0, "to_k")))
    assert not np.array_equal(d, make_learned_down("gaussian", 640, 64, 0, learned_rng(1, "to_q")))
    assert np.array_equal(make_learned_down("zero", 48, 8, 24, learned_rng(0, "x")), np.zeros((8, 24)))


def test_a_learned_init_leaves_the_frozen_parts_alone():
    """learned_init draws from its own stream: A and C are the same as with a zero init; only D differs."""
    zero = PLPLinear(nn.Linear(48, 20), PLPConfig(rank=8), "to_k")
    kaiming = PLPLinear(nn.Linear(48, 20), PLPConfig(rank=8, learned_init="kaiming"), "to_k")
    assert torch.equal(zero.up_frozen, kaiming.up_frozen) and torch.equal(zero.down_frozen, kaiming.down_frozen)
    assert torch.equal(zero.up_learned, kaiming.up_learned) and torch.equal(zero.down_learned, torch.zeros(8, 24))
    assert kaiming.down_learned.abs().max() <= 1 / np.sqrt(48)
    assert kaiming.down_learned.abs().sum() > 0


def test_ratio_zero_trains_b_first_then_both_with_the_closed_form_gradient():
    """With B = 0, the first SGD step moves only B, by -lr · ∂L/∂W · Dᵀ; the second moves D too."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = PLPLinear(copy.deepcopy(base), PLPConfig(rank=3, ratio=0.0, learned_init="kaiming"), "to_q")
    x, y = torch.randn(4, 6), torch.randn(4, 5)
    d0 = layer.down_learned.detach().clone()
    opt = torch.optim.SGD([layer.up_learned, layer.down_learned], lr=0.1)
    loss = (layer(x) - y).pow(2).sum()
    loss.backward()
    grad_w = 2 * (base(x) - y).T @ x  # ∂L/∂ΔW at ΔW = 0
    torch.testing.assert_close(layer.up_learned.grad, grad_w @ d0.T)
    assert torch.equal(layer.down_learned.grad, torch.zeros(3, 6))
    opt.step()
    opt.zero_grad()
    torch.testing.assert_close(layer.up_learned.detach(), -0.1 * grad_w @ d0.T)
    assert torch.equal(layer.down_learned.detach(), d0)
    (layer(x) - y).pow(2).sum().backward()
    assert layer.down_learned.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(layer.down_learned.detach(), d0)


def test_ratio_zero_files_dry_run_export_and_fuse(tmp_path):
    config = PLPConfig(rank=4, ratio=0.0, learned_init="kaiming")
    model = TwoLayers()
    dr = dry_run(model, config)
    add_plp(model, config)
    randomize_learned(model)
    assert dr.frozen == 0 and dr.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    content = adapter_from_model(model, config, "content")
    path = save_adapter(content, tmp_path / "c.b4m.safetensors")
    loaded = load_adapter(path)
    assert loaded.config.learned_init == "kaiming" and loaded.config.ratio == 0.0
    factors = model_factors(model)
    for name, layer in plp_layers(model).items():
        torch.testing.assert_close(factors[name][0] @ factors[name][1], layer.delta_weight().detach())
        assert torch.equal(loaded.factors()[name][0], layer.up_learned.detach())  # up = [A; B] with A empty
    style = adapter_from_model(model, config, "style")
    fused = fuse(loaded, style)  # d = 0 ablation: B from the content run, D from the style run
    assert fused.modules == loaded.modules


def test_no_grad_forward_equals_the_training_forward_and_follows_updates():
    """Sampling's path (cached factors, fused add) gives the training path's values, and notices a changed factor
    (an optimizer's in-place step) or a changed scale."""
    base = nn.Linear(48, 20)
    layer = PLPLinear(copy.deepcopy(base), PLPConfig(rank=8), "to_k")
    randomize_learned(nn.Sequential(layer))
    x = torch.randn(3, 5, 48)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            fast = layer(x)
        return fast, layer(x).detach()

    fast, slow = both()
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        layer.up_learned.add_(1.0)
    fast2, slow2 = both()
    assert not torch.allclose(fast2, fast)
    torch.testing.assert_close(fast2, slow2, rtol=1e-6, atol=1e-6)
    layer.scale, layer.down_scale = 0.5, 2.0
    fast3, slow3 = both()
    assert not torch.allclose(fast3, fast2)
    torch.testing.assert_close(fast3, slow3, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# The no-grad (sampling) path: the base layer, then two skinny matmuls; no copy of the base weight


def scaled_layer(bias: bool = True, m: int = 20, n: int = 48, rank: int = 8) -> PLPLinear:
    torch.manual_seed(0)
    layer = PLPLinear(nn.Linear(n, m, bias=bias), PLPConfig(rank=rank), "to_k")
    randomize_learned(nn.Sequential(layer))
    layer.scale, layer.up_scale, layer.down_scale = 0.8, 1.5, 0.5
    return layer


def closed_form(layer: PLPLinear, x: torch.Tensor) -> torch.Tensor:
    base = layer.base_layer
    out = x.double() @ (base.weight.double() + layer.delta_weight().double()).T
    return out if base.bias is None else out + base.bias.double()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6, 48), (3, 5, 48), (48,)])
def test_no_grad_path_equals_the_closed_form_and_the_training_path(bias, shape):
    layer = scaled_layer(bias)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sampled = layer(x)
    assert sampled.shape == (*shape[:-1], 20)
    torch.testing.assert_close(sampled.double(), closed_form(layer, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sampled, layer(x).detach(), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), sampled, rtol=0, atol=0)


def test_no_grad_path_under_bf16_and_autocast():
    torch.manual_seed(0)
    layer = PLPLinear(nn.Linear(48, 20).to(torch.bfloat16), PLPConfig(rank=8), "to_k")
    randomize_learned(nn.Sequential(layer))
    layer.scale, layer.down_scale = 0.8, 1.5
    x = torch.randn(3, 5, 48)
    with torch.no_grad():
        sampled = layer(x.bfloat16())
    assert sampled.dtype == torch.bfloat16
    torch.testing.assert_close(sampled.double(), closed_form(layer, x.bfloat16()), rtol=3e-2, atol=3e-2)
    fp32 = scaled_layer()  # fp32 weights under bf16 autocast: computed in bf16, as autocast runs the base layer
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        sampled = fp32(x)
    assert sampled.dtype == torch.bfloat16
    torch.testing.assert_close(sampled.double(), closed_form(fp32, x), rtol=3e-2, atol=3e-2)


def test_the_no_grad_path_follows_every_tensor_and_scale_it_comes_from():
    """In-place changes of the base weight or bias, of B, C or D, a replaced weight and a changed scale all show in
    the next sampling output (nothing computed from the old values is reused)."""
    layer = scaled_layer()
    x = torch.randn(3, 5, 48)

    def check() -> torch.Tensor:
        with torch.no_grad():
            out = layer(x)
        torch.testing.assert_close(out.double(), closed_form(layer, x), rtol=1e-5, atol=1e-5)
        return out

    before = check()
    base = layer.base_layer
    changes = [
        lambda: base.weight.add_(1.0),
        lambda: base.bias.add_(1.0),
        lambda: layer.up_learned.add_(0.5),
        lambda: layer.down_learned.mul_(2.0),
        lambda: layer.down_frozen.mul_(-1.0),
        lambda: setattr(base.weight, "data", base.weight.data * 2),  # a new tensor, not an in-place change
        lambda: setattr(layer, "scale", 0.3),
        lambda: setattr(layer, "up_scale", 0.7),
        lambda: setattr(layer, "down_scale", 2.0),
    ]
    for change in changes:
        with torch.no_grad():
            change()
        after = check()
        assert not torch.allclose(after, before)
        before = after


class LargestTensor(TorchDispatchMode):
    """The largest tensor (in elements) that any op writes into new memory while the mode is on (views and in-place
    results, which share an input's storage, are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        shared = {t.untyped_storage().data_ptr() for t in inputs if torch.is_tensor(t)}
        for t in torch.utils._pytree.tree_leaves(out):
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in shared:
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("autocast", [False, True])
def test_unmerged_sampling_makes_no_copy_of_the_base_weight(autocast):
    """Sampling unmerged never builds a tensor the size of the base weight (issue 17: a stacked copy of every adapted
    weight cost 11 GiB on FLUX.1-dev), on the first call, which casts and caches the factors, and on later ones;
    what the layer keeps between calls is no larger than its factors."""
    torch.manual_seed(0)
    layer = PLPLinear(nn.Linear(96, 64), PLPConfig(rank=4), "to_k")
    randomize_learned(nn.Sequential(layer))
    if autocast:  # a bf16 model under autocast, as generation runs (an fp32 weight autocast casts on every call)
        layer.to(torch.bfloat16)
    x = torch.randn(2, 96)
    for _ in range(2):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), LargestTensor() as mode:
            out = layer(x)
        torch.testing.assert_close(out.double(), closed_form(layer, x), rtol=3e-2 if autocast else 1e-5, atol=3e-2)
        assert mode.numel < layer.base_layer.weight.numel() // 4, mode.numel
    held = [t for v in vars(layer).values() for t in (v if isinstance(v, tuple) else [v]) if torch.is_tensor(t)]
    assert sum(t.numel() for t in held) <= (64 + 96) * 4


def test_merged_trained_and_hooked_layers_sample_right():
    layer = scaled_layer()
    x = torch.randn(3, 5, 48)
    with torch.no_grad():
        unmerged = layer(x)
    weight = layer.base_layer.weight.detach().clone()
    layer.merge()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), layer.base_layer(x))  # merged: the base layer alone
    layer.unmerge()  # ΔW recomputed and subtracted: the weight back up to fp32 rounding
    torch.testing.assert_close(layer.base_layer.weight.detach(), weight, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer(x).sum().backward()  # a training forward between two samplings
    with torch.no_grad():
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    # A hooked base layer (e.g. an offloading hook that moves its weight in) must be called.
    calls = []
    handle = layer.base_layer.register_forward_pre_hook(lambda module, args: calls.append(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    assert calls == [1]
    handle.remove()


@pytest.mark.parametrize("config", [TINY_SD_UNET, TINY_SDXL_UNET], ids=["sd", "sdxl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_grad_path_through_a_unet_equals_the_training_path(config, dtype):
    """diffusers' attention views the projections per head (q.view(b, -1, heads, d).transpose(1, 2)): through a
    whole UNet the sampling path gives the training path's output, well within the adapter's own effect."""
    unet = make_unet(config)
    add_plp(unet, PLPConfig(rank=4))
    randomize_learned(unet)
    set_scales(unet, PLPConfig(rank=4), scale=0.8, content_scale=1.5, style_scale=0.5)
    unet.to(dtype)
    assert all(layer.up_learned.dtype == torch.float32 for layer in plp_layers(unet).values())  # adapters stay fp32
    inputs = unet_inputs(unet)
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        sampled = unet(**inputs).sample
    trained = unet(**inputs).sample.detach()
    with torch.inference_mode():
        again = unet(**inputs).sample
    assert torch.equal(again, sampled)
    with torch.no_grad():
        remove_plp(unet)
        base = unet(**inputs).sample
    (err,) = max_errors([sampled.float()], [trained.float()])
    (effect,) = max_errors([sampled.float()], [base.float()])
    # fp32: GEMM rounding only. bf16: the two paths round at different places (the training path sums the adapter
    # in fp32, sampling in bf16): a few bf16 ulps, still well below the adapter's own effect.
    if dtype == torch.float32:
        assert err < 1e-5 and effect > 100 * err, (err, effect)
    else:
        assert err < 4e-2 and effect > 4 * err, (err, effect)


@pytest.mark.parametrize("amp", [False, True])
def test_torch_compile_traces_the_adapter_in_one_graph(amp):
    """The training and the sampling forward compile without a graph break (fullgraph), under autocast too (the
    shared cast), and compute what the eager layer does: exactly in fp32; under bf16 autocast (where the compiled
    node adds out of place, the eager one in place: other roundings) as close to an fp32 reference as eager is. A
    break (torch 2.11's dynamo broke on the stack cache's ``__dict__.pop``) split an SDXL UNet into dozens of graphs
    and made the compiled training step slower than eager; torch 2.13 traces that call, so here this guards the
    sampling path's factor cache, which no torch traces, and whatever comes next."""
    model = TwoLayers()
    add_plp(model, PLPConfig(rank=8))
    randomize_learned(model)
    params = [p for p in model.parameters() if p.requires_grad]
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 5, 48)
    compiled = torch.compile(model, backend="eager", fullgraph=True)

    def run(fn, autocast: bool) -> list[torch.Tensor]:
        with torch.no_grad():
            fn(x, ctx)  # leaves a stack that the training forward drops (eagerly) or keeps (compiled)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(x, ctx)
            out.float().sum().backward()
            with torch.no_grad():
                infer = fn(x, ctx)
        return [out.float(), infer.float(), *(p.grad.clone() for p in params)]

    reference, want, got = run(model, False), run(model, amp), run(compiled, amp)
    torch._dynamo.reset()
    for r, w, g in zip(reference, want, got, strict=True):
        if amp:
            assert (g - r).abs().max() <= 2 * (w - r).abs().max() + 1e-6
        else:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
