"""Gradient checkpointing (the low-memory preset), the fused optimizer and the config presets."""

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel

from b4m import B4MError, PLPConfig, add_plp, plp_layers
from b4m.adapter.layer import PLPLinear
from b4m.models.base import Conditioning
from b4m.runs.config import PRESETS, STAGE_DEFAULTS, load_config, preset_settings, to_toml
from b4m.training.config import TrainConfig
from b4m.training.loop import micro_step_loss, train, train_step
from b4m.training.sets import TrainSet
from b4m.training.speed import enable_gradient_checkpointing
from conftest import TINY_SDXL_UNET
from toy_model import ToyModel

POOLED = TINY_SDXL_UNET["projection_class_embeddings_input_dim"] - 6 * TINY_SDXL_UNET["addition_time_embed_dim"]


class ToySDXL(ToyModel):
    """The trainer's toy model with a tiny SDXL-layout UNet (added text/time conditioning)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        torch.manual_seed(seed)
        self.denoiser = UNet2DConditionModel(**TINY_SDXL_UNET).eval()

    def encode_prompts(self, prompts, size=None) -> Conditioning:
        g = torch.Generator().manual_seed(len(prompts))
        n = len(prompts)
        return Conditioning(
            torch.randn(n, 7, TINY_SDXL_UNET["cross_attention_dim"], generator=g),
            {
                "text_embeds": torch.randn(n, POOLED, generator=g),
                "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * n),
            },
        )

    def predict(self, noisy, timesteps, cond):
        return self.denoiser(noisy, timesteps, encoder_hidden_states=cond.hidden, added_cond_kwargs=cond.extra).sample


def attached(seed: int = 0) -> tuple[ToySDXL, PLPConfig]:
    model = ToySDXL(seed)
    config = PLPConfig(rank=4, base_model="toy")
    add_plp(model.denoiser, config)
    with torch.no_grad():  # non-zero learned halves, so every gradient path is exercised
        g = torch.Generator().manual_seed(1)
        for layer in plp_layers(model.denoiser).values():
            layer.up_learned.copy_(0.1 * torch.randn(layer.up_learned.shape, generator=g))
            layer.down_learned.copy_(0.1 * torch.randn(layer.down_learned.shape, generator=g))
    return model, config


def sets_of(model: ToySDXL) -> list[TrainSet]:
    g = torch.Generator().manual_seed(5)
    sets = [TrainSet("main", torch.randn(3, 4, 8, 8, generator=g), model.encode_prompts(["a sks dog"] * 3))]
    for i in range(2):
        latents = torch.randn(2, 4, 8, 8, generator=g)
        sets.append(TrainSet(f"aux{i}", latents, model.encode_prompts([f"style {i}"] * 2), 0.5, False))
    return sets


def learned(model) -> list[torch.Tensor]:
    return [p for layer in plp_layers(model.denoiser).values() for p in (layer.up_learned, layer.down_learned)]


@pytest.mark.parametrize("routing", ["clean", "none"])
def test_checkpointed_gradients_equal_plain_ones(routing, monkeypatch):
    config = TrainConfig(routing=routing, owned="up", batch_size=2)
    grads = {}
    for ckpt in (False, True):
        model, _ = attached()
        model.denoiser.train()
        if ckpt:
            enable_gradient_checkpointing(model)
        calls = []
        forward = PLPLinear.forward
        monkeypatch.setattr(PLPLinear, "forward", lambda self, x, c=calls, f=forward: c.append(1) or f(self, x))
        loss = micro_step_loss(model, sets_of(model), config, torch.Generator().manual_seed(3))
        n_forward = len(calls)
        loss.backward()
        monkeypatch.undo()
        assert len(calls) == (2 * n_forward if ckpt else n_forward)  # checkpointing recomputes in the backward
        grads[ckpt] = [p.grad.clone() for p in learned(model)]
    assert all(g.abs().sum() > 0 for g in grads[False])
    for plain, ckpt in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["clean", "none"])
def test_rows_per_forward_trains_what_the_whole_batch_trains(routing, monkeypatch):
    """``rows_per_forward`` (a micro-step's batch in forwards of that many images, for memory): the same step of the
    learned halves as one forward of the whole batch, routing included (a forward of main and auxiliary rows, or of
    either alone), in as many forwards as the batch has chunks of that size."""
    stepped = {}
    for rows in (0, 1, 3):
        model, _ = attached()
        model.denoiser.train()
        config = TrainConfig(routing=routing, owned="up", batch_size=2, grad_accum=2, rows_per_forward=rows)
        params = learned(model)
        before = [p.detach().clone() for p in params]
        calls = []
        forward = PLPLinear.forward
        monkeypatch.setattr(PLPLinear, "forward", lambda self, x, c=calls, f=forward: c.append(len(x)) or f(self, x))
        optimizer = torch.optim.SGD(params, lr=1.0)  # the step is the gradient
        train_step(model, sets_of(model), config, optimizer, torch.Generator().manual_seed(3))
        monkeypatch.undo()
        assert max(calls) == (rows or 6)  # 3 sets × 2 images a micro-step, in forwards of at most `rows`
        stepped[rows] = [b - p.detach() for p, b in zip(params, before, strict=True)]
    assert all(s.abs().sum() > 0 for s in stepped[0])
    for rows in (1, 3):
        for whole, split in zip(stepped[0], stepped[rows], strict=True):
            torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


def test_a_run_resumes_under_any_speed_setting():
    """Every setting auto chooses trains the same thing, so a run may resume under another (a smaller GPU)."""
    from b4m.training.checkpoint import SESSION_KEYS
    from b4m.training.speed import SPEED_KEYS

    assert set(SPEED_KEYS) <= set(SESSION_KEYS)


def test_rows_per_forward_is_checked():
    with pytest.raises(B4MError, match="rows_per_forward must be at least 0"):
        TrainConfig(rows_per_forward=-1)
    with pytest.raises(B4MError, match="rows_per_forward needs cuda_graphs off"):
        TrainConfig(rows_per_forward=1, cuda_graphs=True)


def test_train_wires_checkpointing_and_resume_may_switch_it(tmp_path, monkeypatch):
    """The low-memory preset's setting reaches the denoiser (its forward runs again in the backward), trains the
    same adapter, is turned off after the run (the next run on the model starts as it was), and a run resumes
    across it."""
    calls = []
    forward = PLPLinear.forward
    monkeypatch.setattr(PLPLinear, "forward", lambda self, x, c=calls, f=forward: c.append(1) or f(self, x))
    config = TrainConfig(steps=4, lr=1e-3, routing="clean", owned="up", grad_accum=2, checkpoint_every=2)
    model, plp = attached()
    train(model, plp, sets_of(model), config, tmp_path / "plain")
    assert not model.denoiser.is_gradient_checkpointing
    plain, plain_calls = learned(model), len(calls)

    low = TrainConfig(**{**config.__dict__, "gradient_checkpointing": True})
    model, plp = attached()
    calls.clear()
    train(model, plp, sets_of(model), low, tmp_path / "ckpt")
    assert len(calls) == 2 * plain_calls and not model.denoiser.is_gradient_checkpointing
    monkeypatch.undo()
    for a, b in zip(plain, learned(model), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)

    # Two steps without, then resumed with checkpointing (e.g. on a smaller GPU): accepted, same result.
    model, plp = attached()
    train(model, plp, sets_of(model), TrainConfig(**{**config.__dict__, "steps": 2}), tmp_path / "switch")
    model, plp = attached()
    result = train(model, plp, sets_of(model), low, tmp_path / "switch", resume=True)
    assert result.steps == 2
    for a, b in zip(plain, learned(model), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_checkpointing_needs_a_denoiser_that_supports_it():
    model, _ = attached()
    model.denoiser = torch.nn.Linear(2, 2)
    with pytest.raises(B4MError, match="Linear does not support gradient checkpointing"):
        enable_gradient_checkpointing(model)


def test_fused_optimizer_trains_like_the_default(tmp_path):
    config = TrainConfig(steps=2, lr=1e-3, routing="none", grad_accum=1, precondition=True)
    results = []
    for fused in (False, True):
        model, plp = attached()
        train(
            model,
            plp,
            sets_of(model),
            TrainConfig(**{**config.__dict__, "fused_optimizer": fused}),
            tmp_path / str(fused),
        )
        results.append(learned(model))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_presets_sit_between_defaults_and_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "low-memory"\n[train]\nsteps = 7\n')
    cfg = load_config(path, {})
    assert (cfg.preset, cfg.train.gradient_checkpointing, cfg.train.steps) == ("low-memory", True, 7)
    # The file's own key wins over its preset; a flag wins over both.
    path.write_text('preset = "low-memory"\n[train]\ngradient_checkpointing = false\n')
    assert load_config(path, {}).train.gradient_checkpointing is False
    assert load_config(path, {"train.gradient_checkpointing": True}).train.gradient_checkpointing is True
    # A preset chosen by a flag (what `--preset` maps to) over the stage defaults of make.
    cfg = load_config(None, {"preset": "fast"}, STAGE_DEFAULTS["make"])
    assert (cfg.train.fused_optimizer, cfg.train.gradient_checkpointing, cfg.train.steps) == (True, False, 50)
    # --print-config output loads back to the same config.
    printed = tmp_path / "printed.toml"
    printed.write_text(to_toml(cfg))
    assert load_config(printed, {}) == cfg
    assert preset_settings("low-memory") == PRESETS["low-memory"]


def test_unknown_preset_names_the_choices(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "turbo"\n')
    with pytest.raises(B4MError, match="run.toml: unknown preset 'turbo'; choose one of fast, low-memory"):
        load_config(path, {})
    path.write_text("preset = 3\n")
    with pytest.raises(B4MError, match="preset must be a name"):
        load_config(path, {})


def test_auto_speed_falls_back_when_the_first_step_runs_out_of_memory(tmp_path, monkeypatch):
    """speed = auto on a GPU: CUDA graphs first; an out-of-memory first step (simulated here on a CPU) starts the run
    again with gradient checkpointing: one warning, the same adapter as a run started that way, nothing written by
    the failed attempt. Later out-of-memory errors are not retried."""
    import b4m.training.loop as loop
    from b4m.training.speed import speed_plans

    assert [label for label, _ in speed_plans(TrainConfig(), torch.device("cpu"))] == ["as configured"]
    assert len(speed_plans(TrainConfig(speed="fixed"), torch.device("cuda"))) == 1
    # auto sets every speed setting: a rows_per_forward given beside it (the API's default speed) is no conflict
    split = [c.rows_per_forward for _, c in speed_plans(TrainConfig(rows_per_forward=2), torch.device("cuda"))]
    assert split == [0, 0, 0, 1]
    (_, fast), (low_label, low), (one_label, one) = speed_plans(TrainConfig(grad_accum=1), torch.device("cuda"))
    assert dataclasses.replace(one, rows_per_forward=0) == low and one.rows_per_forward == 1
    assert "one image" in one_label
    assert fast.cuda_graphs and fast.fused_optimizer and fast.fold_accumulation and not fast.gradient_checkpointing
    # with accumulation, the micro-steps one at a time (graphs kept) come between one batch and checkpointing
    (_, fast4), (middle_label, middle), (_, low4), _ = speed_plans(TrainConfig(grad_accum=4), torch.device("cuda"))
    assert fast4.fold_accumulation and middle.cuda_graphs and not middle.fold_accumulation
    # the default's first plan is the fast preset, setting for setting (issue 19: "default settings equal the fastest
    # preset's speed" wherever that plan fits the card)
    assert dataclasses.replace(fast4, speed="fixed") == TrainConfig(**preset_settings("fast")["train"])
    assert not middle.gradient_checkpointing and low4.gradient_checkpointing and "out of memory" in middle_label
    assert (
        low.gradient_checkpointing and not (low.cuda_graphs or low.fold_accumulation) and "out of memory" in low_label
    )

    config = TrainConfig(steps=3, lr=1e-3, routing="clean", owned="up", grad_accum=1, checkpoint_every=1)
    cpu_low = TrainConfig(**{**config.__dict__, "gradient_checkpointing": True})
    model, plp = attached()
    expected = train(model, plp, sets_of(model), cpu_low, tmp_path / "direct")
    want = learned(model)

    plans = [("first", config), ("second", cpu_low)]
    monkeypatch.setattr(loop, "speed_plans", lambda c, d: plans)
    step = loop.train_step
    failures = []

    def fails_once(model, sets, config, *args, **kwargs):
        if not config.gradient_checkpointing and not failures:
            failures.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(model, sets, config, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", fails_once)
    model, plp = attached()
    with pytest.warns(UserWarning, match="out of GPU memory at the first step with first; starting again with second"):
        result = train(model, plp, sets_of(model), config, tmp_path / "auto")
    assert result.speed == "second" and result.steps == expected.steps == 3
    assert not model.denoiser.is_gradient_checkpointing
    for a, b in zip(want, learned(model), strict=True):
        assert torch.equal(a, b)

    plans[:] = [("only", config)]  # nothing left to try: one line
    failures.clear()
    model, plp = attached()
    with pytest.raises(B4MError, match=r"out of GPU memory at the first step with only \(CUDA out of memory.*\); use"):
        train(model, plp, sets_of(model), config, tmp_path / "none")

    calls = []

    def fails_later(model, sets, config, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory at step 2")
        return step(model, sets, config, *args, **kwargs)

    plans[:] = [("first", config), ("second", cpu_low)]
    monkeypatch.setattr(loop, "train_step", fails_later)
    model, plp = attached()
    with pytest.raises(torch.OutOfMemoryError, match="at step 2"):
        train(model, plp, sets_of(model), config, tmp_path / "later")


def test_auto_speed_starts_again_without_cuda_graphs_when_their_capture_fails(tmp_path, monkeypatch):
    """speed = auto: a first step whose CUDA graph cannot be captured (simulated on a CPU) starts the run again with
    the same settings, graphs off, and no later plan captures; one warning, the adapter of a run started that way.
    With a fixed speed the capture error is the run's one-line error."""
    import b4m.training.loop as loop
    from b4m.cuda_graphs import GraphCaptureFailed

    config = TrainConfig(steps=3, lr=1e-3, routing="clean", owned="up", grad_accum=1, checkpoint_every=1)
    model, plp = attached()
    train(model, plp, sets_of(model), config, tmp_path / "direct")
    want = learned(model)

    graphed = TrainConfig(**{**config.__dict__, "cuda_graphs": True})
    monkeypatch.setattr(loop, "speed_plans", lambda c, d: [("graphs", graphed), ("also graphs", graphed)])
    step = loop.train_step
    seen = []

    def capture_fails(model, sets, config, *args, **kwargs):
        seen.append(config.cuda_graphs)
        if config.cuda_graphs:
            raise GraphCaptureFailed("CUDA graph capture of the training step failed (operation not permitted)")
        return step(model, sets, config, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", capture_fails)
    model, plp = attached()
    with pytest.warns(UserWarning, match="CUDA graph capture failed at the first step with graphs"):
        result = train(model, plp, sets_of(model), config, tmp_path / "auto")
    assert result.speed == "graphs, without CUDA graphs (their capture failed)" and result.steps == 3
    assert seen == [True, False, False, False]
    for a, b in zip(want, learned(model), strict=True):
        assert torch.equal(a, b)

    fixed = TrainConfig(**{**graphed.__dict__, "speed": "fixed"})
    monkeypatch.setattr(loop, "speed_plans", lambda c, d: [("as configured", fixed)])
    model, plp = attached()
    with pytest.raises(B4MError, match="CUDA graph capture of the training step failed"):
        train(model, plp, sets_of(model), fixed, tmp_path / "fixed")


def two_plans_with_the_collector_off(monkeypatch, model, plp, out):
    """``train`` over two plans of the same settings ("first", "second"), the garbage collector's automatic turns
    off throughout (so only what the fallback frees is freed); the result of the plan that finished."""
    import gc

    import b4m.training.loop as loop

    config = TrainConfig(steps=1, lr=1e-3, routing="clean", owned="up", grad_accum=1, checkpoint_every=1)
    monkeypatch.setattr(loop, "speed_plans", lambda c, d: [("first", config), ("second", config)])
    gc.disable()
    try:
        with pytest.warns(UserWarning, match="starting again with second"):
            return train(model, plp, sets_of(model), config, out)
    finally:
        gc.enable()


def test_a_failed_first_step_gives_its_memory_back_before_the_next_plan(tmp_path, monkeypatch):
    """What a first step that ran out of memory held is freed before the next plan's first step, even what only a
    reference cycle keeps (frames of the error's traceback can form one): with the garbage collector's automatic
    turns off, the failed step's tensor is gone when the next plan starts."""
    import weakref

    import b4m.training.loop as loop

    step, held, alive = loop.train_step, [], []

    class Cycle:  # an activation that a reference cycle keeps, as a traceback's frames may
        def __init__(self):
            self.me, self.activation = self, torch.zeros(1024)

    def first_fails(*args, **kwargs):
        if not held:
            cycle = Cycle()
            held.append(weakref.ref(cycle.activation))
            del cycle
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        alive.append(held[0]() is not None)
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", first_fails)
    result = two_plans_with_the_collector_off(monkeypatch, *attached(), tmp_path / "run")
    assert result.speed == "second" and alive == [False]


def test_the_out_of_memory_error_says_what_to_try_next():
    """The one-line error after the last plan ran out of memory names the lightest change left to try."""
    from b4m.training.loop import memory_advice

    fixed = TrainConfig(speed="fixed", cuda_graphs=True, fold_accumulation=True)
    assert "no --preset fast" in memory_advice(fixed) and "--preset low-memory" in memory_advice(fixed)
    assert memory_advice(TrainConfig()) == "use --preset low-memory"
    low = TrainConfig(speed="fixed", gradient_checkpointing=True)
    assert "rows_per_forward = 1" in memory_advice(low)
    last = dataclasses.replace(low, rows_per_forward=1)
    assert "low-memory-8bit" in memory_advice(last) and "lower resolution" in memory_advice(last)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_first_step_that_fails_inside_the_model_leaves_none_of_its_tensors(tmp_path, monkeypatch, where):
    """An out-of-memory error raised inside the first step's real forward (or backward) of the last adapted layer:
    with the garbage collector's automatic turns off, neither that layer's input nor its output is alive when the
    next plan's first step starts (the error's traceback holds them only until the fallback has handled it)."""
    import weakref

    import b4m.training.loop as loop

    model, plp = attached()
    last = [m for m in model.denoiser.modules() if isinstance(m, PLPLinear)][-1]
    held, alive = [], []
    forward, step = PLPLinear.forward, loop.train_step

    def boom(*_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def failing_forward(self, x, *args, **kwargs):
        out = forward(self, x, *args, **kwargs)
        if self is last and not held:
            held.extend([weakref.ref(x), weakref.ref(out)])
            out.register_hook(boom) if where == "backward" else boom()
        return out

    def next_plan(*args, **kwargs):
        if held and not alive:
            alive.append([r() is not None for r in held])
        return step(*args, **kwargs)

    monkeypatch.setattr(PLPLinear, "forward", failing_forward)
    monkeypatch.setattr(loop, "train_step", next_plan)
    result = two_plans_with_the_collector_off(monkeypatch, model, plp, tmp_path / "run")
    assert result.speed == "second" and alive == [[False, False]]
