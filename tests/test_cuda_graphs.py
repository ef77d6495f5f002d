"""CUDA-graph micro-steps: the same adapters as the eager loop (on a GPU), and no effect on a CPU."""

import pytest
import torch

from b4m import PLPConfig, add_plp, plp_layers
from b4m.cuda_graphs import graphed_sampling
from b4m.device import async_copies
from b4m.training.config import TrainConfig
from b4m.training.loop import draw_batch, graphed_micro_step, make_optimizer, scaled_loss, train
from b4m.training.sets import TrainSet
from conftest import TINY_SDXL_UNET, make_unet, unet_inputs
from test_train import adapter_state, attached, toy_sets

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(tmp_path, name: str, device: str, **settings) -> dict[str, torch.Tensor]:
    model, plp = attached()
    model.to(device)
    # speed fixed: on a GPU the default (auto) would graph the eager run too
    base = dict(
        steps=4, lr=1e-2, routing="clean", owned="up", batch_size=2, grad_accum=3, checkpoint_every=100, speed="fixed"
    )
    config = TrainConfig(**{**base, **settings})
    train(model, plp, toy_sets(model), config, tmp_path / name)
    return {k: v.cpu() for k, v in adapter_state(model).items()}


def test_on_a_cpu_the_setting_changes_nothing(tmp_path):
    model, _ = attached()
    config = TrainConfig(routing="none", cuda_graphs=True)
    assert graphed_micro_step(model, config, make_optimizer(model, config), "no") is None
    eager = run(tmp_path, "eager", "cpu")
    asked = run(tmp_path, "graphs", "cpu", cuda_graphs=True)
    assert all(torch.equal(eager[k], asked[k]) for k in eager)


@cuda
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_graphed_micro_steps_accumulate_the_eager_gradients(precision):
    """Three micro-steps (clean routing), captured on the first: the summed gradients are the eager ones, and a
    second round of pure replays, after an in-place zeroing, gives the second eager round's."""
    model, _ = attached()
    model.to("cuda")
    sets = [TrainSet(s.name, s.latents.cuda(), s.cond.to("cuda"), s.weight, s.main) for s in toy_sets(model)]
    config = TrainConfig(routing="clean", owned="up", batch_size=2, grad_accum=3, cuda_graphs=True)
    optimizer = make_optimizer(model, config)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    loss_fn = scaled_loss(model, config, precision)

    def eager_round(g) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        for _ in range(3):
            loss_fn(draw_batch(model, sets, config, g)).backward()
        return [p.grad.clone() for p in params]

    g = torch.Generator().manual_seed(7)
    want = [eager_round(g), eager_round(g)]
    for p in params:
        p.grad = None
    graphed = graphed_micro_step(model, config, optimizer, precision)
    g = torch.Generator().manual_seed(7)
    for expected in want:
        for p in params:  # in place, as train_step zeroes them when graphs are on
            if p.grad is not None:
                p.grad.zero_()
        for _ in range(3):
            graphed(draw_batch(model, sets, config, g))
        for p, w in zip(params, expected, strict=True):
            # fp32 convolutions run as TF32 by default and may pick other kernels under capture (measured on an H100:
            # differences up to 5e-5 of the largest entry): compare at the scale of each gradient
            torch.testing.assert_close(p.grad, w, rtol=1e-3, atol=1e-3 * w.abs().max().item())
    assert graphed.graph is not None


@cuda
def test_drawing_a_batch_does_not_wait_for_the_gpu():
    """With the sets on the GPU and async_copies on (the default), a batch's copies are queued
    (b4m.device.to_device_async): torch's sync-debug mode, set to raise, sees no synchronisation in drawing it,
    add_noise and the target included; the blocking copies (async_copies off) raise there. The first draw runs
    before: diffusers' scheduler moves its alphas_cumprod to the device in its first add_noise (a blocking copy once a
    run, not once a step)."""
    model, _ = attached()
    model.to("cuda")
    sets = [TrainSet(s.name, s.latents.cuda(), s.cond.to("cuda"), s.weight, s.main) for s in toy_sets(model)]
    config = TrainConfig(routing="clean", owned="up", batch_size=2)
    g = torch.Generator().manual_seed(7)
    draw_batch(model, sets, config, g)
    torch.cuda.synchronize()
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with async_copies():
            batch = draw_batch(model, sets, config, g)
        with async_copies(False), pytest.raises(RuntimeError, match="synchroniz"):
            draw_batch(model, sets, config, g)
    finally:
        torch.cuda.set_sync_debug_mode(mode)
    assert batch.noisy.is_cuda and batch.weights.is_cuda and batch.cond.hidden.is_cuda


@cuda
@pytest.mark.parametrize("sets_on", ["cuda", "cpu"])
def test_copies_without_a_sync_draw_the_same_batch_through_pinned_memory(monkeypatch, sets_on):
    """async_copies on and off draw the same values bit for bit, the sets on the GPU (as the loop keeps them) or on
    the CPU; on, every copy to the GPU goes through pinned memory (sync-debug mode does not flag a non-blocking copy
    from pageable memory, so the calls are counted)."""
    model, _ = attached()
    model.to("cuda")
    sets = [TrainSet(s.name, s.latents.to(sets_on), s.cond.to(sets_on), s.weight, s.main) for s in toy_sets(model)]
    config = TrainConfig(routing="clean", owned="up", batch_size=2)
    pinned = []
    pin = torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: pinned.append(t.shape) or pin(t, *a))
    with async_copies():
        on = draw_batch(model, sets, config, torch.Generator().manual_seed(5))
    assert pinned  # the noise, timesteps and weights at least; the picks too where the sets are on the GPU
    n = len(pinned)
    with async_copies(False):
        off = draw_batch(model, sets, config, torch.Generator().manual_seed(5))
    assert len(pinned) == n  # off: plain copies
    for a, b in [(on.noisy, off.noisy), (on.timesteps, off.timesteps), (on.target, off.target)]:
        assert a.is_cuda and torch.equal(a, b)
    assert torch.equal(on.weights, off.weights) and torch.equal(on.cond.hidden, off.cond.hidden)


@cuda
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_graphed_steps_train_like_eager_ones(tmp_path, precision):
    """The whole loop (4 steps of 3 accumulated micro-steps, clipping, SGD: an update proportional to the gradient,
    so kernel-order rounding stays small; AdamW would magnify it on near-zero gradients) gives the eager adapters."""
    settings = dict(mixed_precision=precision, optimizer="sgd")
    eager = run(tmp_path, "eager", "cuda", **settings)
    graphed = run(tmp_path, "graphed", "cuda", cuda_graphs=True, **settings)
    start = {k: v.cpu() for k, v in adapter_state(attached()[0]).items()}
    moved = [k for k in eager if "learned" in k and not torch.equal(eager[k], start[k])]
    assert len(moved) == len([k for k in eager if "learned" in k])
    for k in eager:
        torch.testing.assert_close(graphed[k], eager[k], rtol=1e-4, atol=1e-6)


@cuda
def test_make_with_the_preconditioner_is_graphed_like_eager(tmp_path):
    settings = dict(routing="none", owned=None, precondition=True, optimizer="sgd")
    eager = run(tmp_path, "eager", "cuda", **settings)
    graphed = run(tmp_path, "graphed", "cuda", cuda_graphs=True, **settings)
    for k in eager:
        torch.testing.assert_close(graphed[k], eager[k], rtol=1e-5, atol=1e-6)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_sampling_replays_the_eager_denoiser(dtype):
    """An SDXL-layout UNet with an unmerged PLP adapter: replays with new inputs give the eager outputs; calls the
    graphs do not cover (gradients, return_dict) stay eager; leaving the context restores the module's forward."""
    unet = make_unet(TINY_SDXL_UNET).to("cuda", dtype)
    add_plp(unet, PLPConfig(rank=4))
    with torch.no_grad():
        for layer in plp_layers(unet).values():
            layer.up_learned.normal_(std=0.2)
    calls = []
    for seed in (1, 2, 3):
        inputs = unet_inputs(unet, seed=seed)
        inputs["added_cond_kwargs"] = {k: v.to("cuda", dtype) for k, v in inputs["added_cond_kwargs"].items()}
        calls.append(
            {k: v.to("cuda", dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
        )
        calls[-1]["timestep"] = inputs["timestep"].to("cuda")
    with torch.no_grad():
        eager = [unet(**c, return_dict=False)[0] for c in calls]
        with graphed_sampling(unet):
            graphed = [unet(**c, return_dict=False)[0] for c in calls]
            assert unet(**calls[0]).sample.shape == eager[0].shape  # return_dict=True: eager
        assert "forward" not in vars(unet)
    for got, want in zip(graphed, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    assert not torch.allclose(graphed[0], graphed[1])


def test_graphed_sampling_on_a_cpu_is_the_eager_denoiser(sdxl_unet):
    inputs = unet_inputs(sdxl_unet)
    with torch.no_grad():
        want = sdxl_unet(**inputs, return_dict=False)[0]
        with graphed_sampling(sdxl_unet):
            got = sdxl_unet(**inputs, return_dict=False)[0]
    assert torch.equal(got, want) and "forward" not in vars(sdxl_unet)
