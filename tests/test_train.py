import errno
from pathlib import Path

import pytest
import torch
from PIL import Image

from b4m import B4MError, PLPConfig, add_plp, plp_layers
from b4m.adapter.file import load_adapter
from b4m.data import ImageSet, to_tensor
from b4m.training.config import TrainConfig, folded
from b4m.training.loop import micro_step_loss, train
from b4m.training.sets import TrainSet, encode_set
from toy_model import ToyModel


def toy_sets(model: ToyModel, n_aux: int = 2) -> list[TrainSet]:
    g = torch.Generator().manual_seed(5)
    sets = [TrainSet("main", torch.randn(3, 4, 8, 8, generator=g), model.encode_prompts(["a sks dog"] * 3))]
    for i in range(n_aux):
        prompt = f"a cat in style {i}"
        sets.append(
            TrainSet(
                f"aux{i}", torch.randn(2, 4, 8, 8, generator=g), model.encode_prompts([prompt] * 2), 1 / n_aux, False
            )
        )
    return sets


def attached(seed: int = 0) -> tuple[ToyModel, PLPConfig]:
    model = ToyModel(seed)
    config = PLPConfig(rank=4, base_model="toy")
    add_plp(model.denoiser, config)
    with torch.no_grad():  # non-zero learned halves, so every gradient path is exercised
        g = torch.Generator().manual_seed(1)
        for layer in plp_layers(model.denoiser).values():
            layer.up_learned.copy_(0.1 * torch.randn(layer.up_learned.shape, generator=g))
            layer.down_learned.copy_(0.1 * torch.randn(layer.down_learned.shape, generator=g))
    return model, config


def adapter_state(model: ToyModel) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{p}": getattr(l, p).detach().clone()
        for n, l in plp_layers(model.denoiser).items()
        for p in ("up_frozen", "up_learned", "down_frozen", "down_learned")
    }


def test_clean_routing_equals_separate_gradients():
    """One batch, one backward: the owned half gets the main loss's gradient, the other half the aux loss's."""
    model, _ = attached()
    sets = toy_sets(model)
    config = TrainConfig(routing="clean", owned="up", batch_size=2)
    layers = list(plp_layers(model.denoiser).values())
    ups = [l.up_learned for l in layers]
    downs = [l.down_learned for l in layers]

    micro_step_loss(model, sets, config, torch.Generator().manual_seed(3)).backward()
    routed_up = [p.grad.clone() for p in ups]
    routed_down = [p.grad.clone() for p in downs]

    # Reference: the same draw without routing, main and aux losses differentiated separately.
    for p in ups + downs:
        p.grad = None
    main_only = [s if s.main else TrainSet(s.name, s.latents, s.cond, 0.0, False) for s in sets]
    aux_only = [TrainSet(s.name, s.latents, s.cond, 0.0, True) if s.main else s for s in sets]
    none = TrainConfig(routing="none", batch_size=2)
    ref_up = torch.autograd.grad(micro_step_loss(model, main_only, none, torch.Generator().manual_seed(3)), ups)
    ref_down = torch.autograd.grad(micro_step_loss(model, aux_only, none, torch.Generator().manual_seed(3)), downs)
    for got, want in zip(routed_up + routed_down, list(ref_up) + list(ref_down), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert all(g.abs().sum() > 0 for g in routed_up + routed_down)


def test_resume_continues_exactly(tmp_path):
    config = TrainConfig(
        steps=6, lr=1e-3, routing="clean", owned="up", grad_accum=2, checkpoint_every=4, check_every=2
    )
    model, plp = attached()
    train(model, plp, toy_sets(model), config, tmp_path / "straight")
    straight = adapter_state(model)

    model, plp = attached()
    first = TrainConfig(**{**config.__dict__, "steps": 4})
    train(model, plp, toy_sets(model), first, tmp_path / "resumed")
    model, plp = attached(seed=0)  # a fresh process: model rebuilt, adapter re-attached
    result = train(model, plp, toy_sets(model), config, tmp_path / "resumed", resume=True)
    assert result.steps == 2
    resumed = adapter_state(model)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    key = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.up_learned"
    assert not torch.equal(straight[key], adapter_state(attached()[0])[key])  # training moved it


def test_checkpoints_are_pruned_and_hold_the_adapter(tmp_path):
    model, plp = attached()
    train(
        model,
        plp,
        toy_sets(model),
        TrainConfig(steps=5, routing="clean", owned="down", grad_accum=1, checkpoint_every=1, keep_checkpoints=2),
        tmp_path,
        role="style",
    )
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000004", "step-000005"]
    adapter = load_adapter(tmp_path / "checkpoints" / "step-000005" / "adapter.b4m.safetensors")
    assert adapter.role == "style"
    state = adapter_state(model)
    for name in adapter.modules:
        assert torch.equal(adapter.tensors[name]["down_learned"], state[f"{name}.down_learned"])


def test_frozen_parts_do_not_move_and_mixed_routing_uses_a_lower_lr(tmp_path):
    model, plp = attached()
    before = adapter_state(model)
    config = TrainConfig(steps=2, routing="mixed", owned="up", grad_accum=1, weight_decay=0.5)
    train(model, plp, toy_sets(model), config, tmp_path)
    after = adapter_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith("_frozen"))
    from b4m.training.loop import make_optimizer

    assert [g["lr"] for g in make_optimizer(model, config).param_groups] == [1e-4, 1e-5]


def test_up_lr_ratio_scales_the_up_half_in_every_routing():
    from b4m.training.loop import make_optimizer

    model, _ = attached()
    ups = {id(l.up_learned) for l in plp_layers(model.denoiser).values()}

    def groups(**kw):  # (lr, "up" / "down") of each param group
        opt = make_optimizer(model, TrainConfig(lr=1e-3, **kw))
        halves = [{"up" if id(p) in ups else "down" for p in g["params"]} for g in opt.param_groups]
        assert all(len(h) == 1 for h in halves)  # no group mixes the halves
        return [(g["lr"], h.pop()) for g, h in zip(opt.param_groups, halves, strict=True)]

    assert groups(routing="clean", owned="up", up_lr_ratio=4) == [(4e-3, "up"), (1e-3, "down")]
    assert groups(routing="clean", owned="down", up_lr_ratio=4) == [(1e-3, "down"), (4e-3, "up")]
    assert groups(routing="mixed", owned="up", up_lr_ratio=4) == [(4e-3, "up"), (1e-4, "down")]
    assert groups(routing="mixed", owned="down", up_lr_ratio=4) == [(1e-3, "down"), (pytest.approx(4e-4), "up")]
    assert groups(routing="none", up_lr_ratio=16) == [(16e-3, "up"), (1e-3, "down")]
    assert len(make_optimizer(model, TrainConfig(lr=1e-3, routing="none")).param_groups) == 1
    with pytest.raises(B4MError, match="up_lr_ratio"):
        TrainConfig(up_lr_ratio=0)


def test_nan_loss_stops_with_the_step_range_and_keeps_the_last_good_checkpoint(tmp_path):
    model, plp = attached()
    sets = toy_sets(model)
    config = TrainConfig(steps=8, routing="clean", owned="up", grad_accum=1, checkpoint_every=2, check_every=2)
    calls = {"n": 0}
    original = model.predict

    def poisoned(noisy, t, cond):
        calls["n"] += 1
        out = original(noisy, t, cond)
        return out * float("nan") if calls["n"] > 5 else out

    model.predict = poisoned
    with pytest.raises(
        B4MError, match="loss became NaN/Inf between steps 5 and 6; the last good checkpoint is .*step-000004"
    ):
        train(model, plp, sets, config, tmp_path)
    # Step 6 (the first NaN) is one call past 5 micro-steps; nothing after the last good checkpoint was written.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_resume_refuses_another_configuration(tmp_path):
    model, plp = attached()
    train(model, plp, toy_sets(model), TrainConfig(steps=2, routing="clean", owned="up", grad_accum=1), tmp_path)
    model, plp = attached()
    with pytest.raises(B4MError, match="checkpoint of another configuration \\(lr differ\\)"):
        train(
            model,
            plp,
            toy_sets(model),
            TrainConfig(steps=4, lr=1.0, routing="clean", owned="up", grad_accum=1),
            tmp_path,
            resume=True,
        )
    with pytest.warns(UserWarning, match="found no complete checkpoint; starting from step 0"):  # not a dead end
        train(
            model,
            plp,
            toy_sets(model),
            TrainConfig(steps=4, routing="clean", owned="up"),
            tmp_path / "new",
            resume=True,
        )


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, plp = attached()
    config = TrainConfig(steps=4, routing="clean", owned="up", grad_accum=1, checkpoint_every=2)
    real_save = torch.save

    def save(obj, path, *a, **k):
        if "step-000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(B4MError, match="No space left on device.*the previous one is kept"):
        train(model, plp, toy_sets(model), config, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]


def test_bad_settings():
    with pytest.raises(B4MError, match="routing must be one of"):
        TrainConfig(routing="sideways")
    model, plp = attached()
    with pytest.raises(B4MError, match="routing 'clean' needs owned"):
        train(model, plp, toy_sets(model), TrainConfig(routing="clean"), "unused")
    with pytest.raises(B4MError, match="clean routing needs auxiliary sets"):
        train(model, plp, toy_sets(model, n_aux=0), TrainConfig(routing="clean", owned="up"), "unused")


def test_tensorboard_logs_the_loss(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, plp = attached()
    config = TrainConfig(steps=4, routing="clean", owned="up", grad_accum=1, check_every=2, tensorboard=True)
    result = train(model, plp, toy_sets(model), config, tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [s for s, _ in logged] == [2, 4]
    assert [v for _, v in logged] == pytest.approx([v for _, v in result.losses])


def test_fold_accumulation_trains_what_accumulating_trains(tmp_path):
    """Folding runs a step's micro-steps as one batch of the images they would draw (the same draws from the same
    generator), each weighing 1/grad_accum: the adapters of accumulating, up to rounding; and a run resumes across
    the setting (2 steps folded, then 2 unfolded: the 4-step run)."""
    base = dict(steps=3, lr=1e-3, routing="clean", owned="up", checkpoint_every=10, batch_size=1, grad_accum=3)
    folded_config = TrainConfig(**base, fold_accumulation=True)
    assert (folded(folded_config).batch_size, folded(folded_config).grad_accum) == (3, 1)
    model, plp = attached()
    train(model, plp, toy_sets(model), folded_config, tmp_path / "folded")
    got = adapter_state(model)
    model, plp = attached()
    train(model, plp, toy_sets(model), TrainConfig(**base), tmp_path / "accumulated")
    want = adapter_state(model)
    moved = [k for k in want if "learned" in k]
    start = adapter_state(attached()[0])
    assert all(not torch.equal(want[k], start[k]) for k in moved)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)

    four = {**base, "steps": 4, "checkpoint_every": 2}
    model, plp = attached()
    train(model, plp, toy_sets(model), TrainConfig(**four), tmp_path / "straight")
    straight = adapter_state(model)
    model, plp = attached()
    train(model, plp, toy_sets(model), TrainConfig(**{**four, "steps": 2}, fold_accumulation=True), tmp_path / "mix")
    model, plp = attached()
    result = train(model, plp, toy_sets(model), TrainConfig(**four), tmp_path / "mix", resume=True)
    assert result.steps == 2
    for k in straight:
        torch.testing.assert_close(adapter_state(model)[k], straight[k], rtol=1e-5, atol=1e-6)


def test_timestep_bias_moves_the_noise_levels_and_none_keeps_the_uniform_draws():
    from b4m.training.batch import draw_timesteps

    T, n = 1000, 40_000
    uniform = draw_timesteps(n, T, TrainConfig(), torch.Generator().manual_seed(3))
    assert torch.equal(uniform, torch.randint(0, T, (n,), generator=torch.Generator().manual_seed(3)))
    low = draw_timesteps(n, T, TrainConfig(timestep_bias="low-noise"), torch.Generator().manual_seed(3))
    high = draw_timesteps(n, T, TrainConfig(timestep_bias="high-noise"), torch.Generator().manual_seed(3))
    for t in (low, high):
        assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= T - 1
    # u^3 < 1/2 with probability (1/2)^(1/3) = 0.794: the low-noise half gets 79% of the draws, the high-noise half
    # as much under high-noise; uniform draws split evenly
    assert abs((low < T // 2).float().mean().item() - 0.5 ** (1 / 3)) < 0.01
    assert abs((high >= T // 2).float().mean().item() - 0.5 ** (1 / 3)) < 0.01
    assert abs((uniform < T // 2).float().mean().item() - 0.5) < 0.01
    squared = TrainConfig(timestep_bias="low-noise", timestep_bias_exponent=2.0)
    square = draw_timesteps(n, T, squared, torch.Generator())
    assert abs((square < T // 2).float().mean().item() - 0.5**0.5) < 0.01
    with pytest.raises(B4MError, match="timestep_bias_exponent must be at least 1, got 0.5"):
        TrainConfig(timestep_bias_exponent=0.5)


@pytest.mark.parametrize(("size", "batches"), [(32, [8, 2]), (512, [2] * 5), (1024, [1] * 10)])
def test_a_set_is_encoded_in_batches_a_card_can_hold(size, batches):
    """Ten images: eight a call at the world's 32 px, two at 512 px, one at 1024 px (a float32 VAE at 1024 px keeps
    about 0.5 GB a full-resolution activation per image); the latents are those of one image at a time."""
    model, calls = ToyModel(), []
    encode = model.encode_images
    model.encode_images = lambda pixels: calls.append(len(pixels)) or encode(pixels)
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy()) for _ in range(10)]
    image_set = ImageSet("refs", None, images, ["a sks"] * 10, [Path(f"{i}.png") for i in range(10)])
    cached = encode_set(model, image_set, 1.0, True)
    assert calls == batches
    one_by_one = torch.cat([encode(to_tensor([im])) for im in images])
    torch.testing.assert_close(cached.latents, one_by_one)
