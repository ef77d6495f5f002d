"""CUDA graphs: a training micro-step's forward and backward, and a sampler's denoiser calls, captured once and
replayed.

An SDXL training step in eager PyTorch is bound by the host, not the GPU: thousands of kernel launches per forward
and backward (the UNet's and 560 adapters') take longer to issue than the GPU takes to run them
(docs/benchmarks.md). A CUDA graph issues the whole micro-step with one launch.

What is captured: :func:`b4m.training.loop.batch_loss` on static input tensors (noisy latents, timesteps, conditioning,
target, weights) and its ``backward()``, which adds into gradient tensors that exist before the capture, so every
replay accumulates exactly like an eager backward does. What stays eager: drawing the batch (the CPU generator, so
runs stay reproducible and resumable), copying it into the static tensors, and the optimizer's step.

Rules that keep replays correct, enforced by the training loop: gradients are zeroed in place
(``zero_grad(set_to_none=False)``), never replaced; parameters are updated in place (every torch optimizer does);
shapes and routing do not change within a run. Used only on CUDA, without fp16 loss scaling, without gradient
checkpointing and without an :class:`~b4m.training.objective.Objective`; elsewhere the loop runs eagerly.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from .errors import B4MError

WARMUP = 3  # eager iterations on a side stream before capture (cuBLAS/cuDNN workspaces, lazy init)


class GraphCaptureFailed(B4MError):
    """The training step could not be captured as a CUDA graph (e.g. the model copies from the host inside it)."""


class GraphedMicroStep:
    """``step(batch)`` runs ``loss_fn(batch)`` and its backward as one CUDA graph replay; returns the loss (a new
    tensor, detached). Captured on the first call, whose batch fixes the shapes.

    Args:
        loss_fn: ``loss_fn(batch) -> scalar loss`` (already divided by the accumulation count), run under the
            caller's settings (autocast inside it: capture needs ``cache_enabled=False``).
        params: The trained parameters: their gradients are allocated before capture and zeroed in place after it.
    """

    def __init__(self, loss_fn: Callable, params: Sequence[torch.Tensor]):
        self.loss_fn = loss_fn
        self.params = [p for p in params if p.requires_grad]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static = None
        self.static_loss: torch.Tensor | None = None

    def _run(self, batch) -> torch.Tensor:
        loss = self.loss_fn(batch)
        loss.backward()
        return loss.detach()

    def _capture(self, batch) -> None:
        self.static = _clone_batch(batch)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        saved = [g.clone() for g in grads]  # the warm-up's gradients are not part of the run
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self._run(self.static)
        torch.cuda.current_stream().wait_stream(side)
        torch._foreach_copy_(grads, saved)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.static_loss = self._run(self.static)
        except RuntimeError as e:
            raise GraphCaptureFailed(
                f"CUDA graph capture of the training step failed ({str(e).splitlines()[0]}); "
                "set train.cuda_graphs = false"
            ) from e
        if any(p.grad is not g for p, g in zip(self.params, grads, strict=True)):
            raise B4MError("CUDA graph capture replaced gradient tensors; set train.cuda_graphs = false")
        self.graph = graph

    def __call__(self, batch) -> torch.Tensor:
        if self.graph is None:
            self._capture(batch)
        else:
            _copy_batch(self.static, batch)
        self.graph.replay()
        return self.static_loss.clone()


def _clone_batch(batch):
    cond = type(batch.cond)(batch.cond.hidden.clone(), {k: v.clone() for k, v in batch.cond.extra.items()})
    return type(batch)(
        batch.noisy.clone(),
        batch.timesteps.clone(),
        cond,
        batch.target.clone(),
        batch.weights.clone(),
        batch.n_main,
        batch.routed,
    )


def _copy_batch(static, batch) -> None:
    """Copy ``batch`` into the captured tensors; the shapes and the routing split must be the captured ones."""
    pairs = [
        (static.noisy, batch.noisy),
        (static.timesteps, batch.timesteps),
        (static.cond.hidden, batch.cond.hidden),
        (static.target, batch.target),
        (static.weights, batch.weights),
    ]
    if static.cond.extra.keys() != batch.cond.extra.keys():
        raise B4MError("CUDA graphs: the conditioning's tensors changed between micro-steps")
    pairs += [(static.cond.extra[k], batch.cond.extra[k]) for k in static.cond.extra]
    if (batch.n_main, batch.routed) != (static.n_main, static.routed) or any(a.shape != b.shape for a, b in pairs):
        raise B4MError("CUDA graphs: a micro-step's shapes changed during the run; set train.cuda_graphs = false")
    torch._foreach_copy_([a for a, _ in pairs], [b for _, b in pairs])


# --------------------------------------------------------------------------------------------------------------------
# Sampling


@contextlib.contextmanager
def graphed_sampling(denoiser: nn.Module) -> Iterator[None]:
    """Inside, no-grad CUDA calls ``denoiser(sample, timestep, encoder_hidden_states=…, added_cond_kwargs=…,
    return_dict=False)`` (what diffusers' pipelines make) replay a CUDA graph, one per input signature, captured on
    first use. Other calls run eagerly, and so does everything if a capture fails (with a warning).

    Scope it to one sampling call: a graph keeps the weights it was captured with, so adapter scales or weights
    changed inside the context would be ignored.
    """
    graphed = _GraphedDenoiser(denoiser)
    denoiser.forward = graphed
    try:
        yield
    finally:
        del denoiser.forward  # the class's forward again


class _GraphedDenoiser:
    def __init__(self, module: nn.Module):
        self.eager = module.forward
        self.graphs: dict[tuple, tuple[list[torch.Tensor], torch.Tensor, torch.cuda.CUDAGraph]] = {}
        self.pool = None
        self.failed = False

    def __call__(self, sample, timestep, encoder_hidden_states=None, *args, added_cond_kwargs=None, **kwargs):
        return_dict = kwargs.pop("return_dict", True)
        plain = (
            not args
            and not return_dict
            and all(v is None for v in kwargs.values())
            and sample.is_cuda
            and encoder_hidden_states is not None
            and not torch.is_grad_enabled()
            and not self.failed
        )
        if plain:
            extra = added_cond_kwargs or {}
            names = sorted(extra)
            t = torch.as_tensor(timestep, device=sample.device)
            inputs = [sample, t, encoder_hidden_states, *(extra[k] for k in names)]
            key = (tuple(names), tuple((tuple(x.shape), x.dtype, x.device) for x in inputs))
            entry = self.graphs.get(key) or self._capture(key, inputs, names)
            if entry is not None:
                static_in, static_out, graph = entry
                torch._foreach_copy_(static_in, inputs)
                graph.replay()
                return (static_out.clone(),)
        return self.eager(
            sample,
            timestep,
            encoder_hidden_states,
            *args,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=return_dict,
            **kwargs,
        )

    def _capture(self, key: tuple, inputs: list[torch.Tensor], names: list[str]):
        static = [x.clone() for x in inputs]

        def call() -> torch.Tensor:
            extra = dict(zip(names, static[3:], strict=True)) or None
            return self.eager(static[0], static[1], static[2], added_cond_kwargs=extra, return_dict=False)[0]

        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    call()
            torch.cuda.current_stream().wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = call()
        except RuntimeError as e:
            self.failed = True
            warnings.warn(f"sampling without CUDA graphs: capture failed ({str(e).splitlines()[0]})", stacklevel=3)
            return None
        self.graphs[key] = (static, out, graph)
        return self.graphs[key]
