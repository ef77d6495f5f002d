"""A micro-step's batch: the values drawn are those of the copies it made before it could copy without a host sync
(b4m.device.to_device_async, inside async_copies), with extra conditioning, folded draws and a rank's share of the
rows."""

import pytest
import torch

from b4m.device import async_copies, to_device_async
from b4m.models.base import Conditioning
from b4m.training import distributed
from b4m.training.batch import _draw_rows, draw_batch
from b4m.training.config import TrainConfig
from b4m.training.distributed import Dist
from b4m.training.sets import TrainSet
from test_train import toy_sets
from toy_model import ToyModel


def with_extra(sets: list[TrainSet]) -> list[TrainSet]:
    """The sets with SDXL-like extra conditioning (text_embeds, time_ids), one row per image."""
    out = []
    for i, s in enumerate(sets):
        n = len(s.latents)
        extra = {"text_embeds": torch.arange(n * 3.0).view(n, 3) + i, "time_ids": torch.arange(n * 6.0).view(n, 6)}
        out.append(TrainSet(s.name, s.latents, Conditioning(s.cond.hidden, extra), s.weight, s.main))
    return out


def before(model, sets, config, g, draws=1):
    """draw_batch as it was written before (CPU gathers, then blocking .to(device)), no objective."""
    ordered = [s for s in sets if s.main] + [s for s in sets if not s.main]
    n = config.batch_size // draws
    drawn = [_draw_rows(ordered, n, model.num_train_timesteps, config, g) for _ in range(draws)]
    picks = [torch.cat([d[0][j] for d in drawn]) for j in range(len(ordered))]

    def by_set(per_draw):
        return torch.cat([x[j * n : (j + 1) * n] for j in range(len(ordered)) for x in per_draw])

    device = model.device
    latents = torch.cat([s.latents[i] for s, i in zip(ordered, picks, strict=True)]).to(device)
    cond = Conditioning.cat([s.cond[i] for s, i in zip(ordered, picks, strict=True)]).to(device)
    noise = by_set([d[1] for d in drawn]).to(device, latents.dtype)
    timesteps = by_set([d[2] for d in drawn]).to(device)
    weights = torch.cat([torch.full((config.batch_size,), s.weight / config.batch_size) for s in ordered]).to(device)
    dist = distributed.current()
    rows = dist.shard_rows(len(ordered), config.batch_size)
    if rows is not None:
        latents, cond, weights, noise, timesteps = (x[rows] for x in (latents, cond, weights, noise, timesteps))
    noisy = model.add_noise(latents, noise, timesteps)
    return noisy, timesteps, cond, model.target(latents, noise, timesteps), weights


@pytest.mark.parametrize("draws", [1, 2])
@pytest.mark.parametrize("rank", [None, 1])
def test_a_batch_draws_what_it_drew_before_with_either_copies(monkeypatch, draws, rank):
    if rank is not None:
        monkeypatch.setattr(distributed, "_current", Dist(rank, 2))
    model = ToyModel()
    sets = with_extra(toy_sets(model))
    config = TrainConfig(routing="clean", owned="up", batch_size=4, timestep_bias="high-noise")
    g, g_before = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for async_on in (True, False):  # the second batch: the generator's state after the first is the same too
        with async_copies(async_on):
            batch = draw_batch(model, sets, config, g, draws=draws)
        noisy, timesteps, cond, target, weights = before(model, sets, config, g_before, draws)
        for got, want in [
            (batch.noisy, noisy),
            (batch.timesteps, timesteps),
            (batch.target, target),
            (batch.weights, weights),
            (batch.cond.hidden, cond.hidden),
            *((batch.cond.extra[k], cond.extra[k]) for k in cond.extra),
        ]:
            assert got.dtype == want.dtype and got.device == want.device and torch.equal(got, want)
    assert torch.equal(g.get_state(), g_before.get_state())


def test_on_the_cpu_a_copy_is_the_tensor_itself():
    t = torch.arange(4)
    assert to_device_async(t, "cpu") is t and to_device_async(t, torch.device("cpu")) is t
