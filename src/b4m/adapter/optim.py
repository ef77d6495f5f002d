"""The Riemannian preconditioner of B4M (paper eq. 13-14; Zhang & Pilanci 2024) for PLP layers.

For every PLP layer, with ``B`` the learned rows of the up projection and ``D`` the learned columns of the down
projection, the Euclidean gradients are replaced by the scaled-gradient directions::

    grad_D <- (NᵀN + δI)⁻¹ grad_D        grad_B <- grad_B (MMᵀ + δI)⁻¹

Both matrices are ``r × r``. With ``factors="learned"`` (the paper) ``N = B`` and ``M = D``; with ``factors="full"``
(Zhang & Pilanci's LoRA rule applied to the whole factors) ``N = W_up = [A; B]`` and ``M = W_down = [C, D]``. The
frozen ``A`` and ``C`` are buffers, not parameters, so no optimizer (weight decay included) ever moves them.

:func:`create_optimizer` wraps any torch optimizer like ``peft.optimizers.create_riemannian_optimizer`` does: its
``step()`` preconditions, then clips the global gradient norm, then runs the wrapped optimizer's step.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import B4MError
from .layer import PLPLinear
from .walker import plp_layers

FACTORS = ("learned", "full")
STATE_KEY = "b4m_preconditioner"  # the preconditioner's settings inside optimizer.state_dict()
SETTINGS = ("precondition", "reg", "factors", "max_grad_norm")


def _check(reg: float, factors: str, max_grad_norm: float | None = None) -> None:
    if not reg >= 0:  # also catches NaN
        raise B4MError(f"preconditioner reg (δ) must be >= 0, got {reg}")
    if factors not in FACTORS:
        raise B4MError(f"preconditioner factors must be one of {FACTORS}, got {factors!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise B4MError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")


def _damped_inverse(gram: torch.Tensor, reg: float) -> torch.Tensor:
    """``(G + reg·I)⁻¹`` for a batch of symmetric PSD ``r × r`` matrices ``G``.

    With ``reg > 0`` every eigenvalue of ``G + reg·I`` is at least ``reg``, so a plain (LU) inverse is exact and
    well conditioned; ``inv_ex`` skips the error check, so the step never waits for the GPU. With ``reg = 0`` it
    is a pseudo-inverse, as in peft, so a singular ``G`` (e.g. ``B = 0`` at init) gives finite values.
    """
    if reg > 0:
        eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
        return torch.linalg.inv_ex(gram + reg * eye)[0]
    return torch.linalg.pinv(gram, hermitian=True)


@torch.no_grad()
def precondition_(
    layers: dict[str, PLPLinear],
    reg: float = 1e-2,
    factors: str = "learned",
    params: Iterable[torch.Tensor] | None = None,
) -> None:
    """Precondition the gradients of the learned halves of ``layers`` in place.

    Both ``r × r`` matrices of a layer come from the current (pre-update) factors, computed in at least float32
    (float64 for float64 parameters) and cast back to each gradient's dtype. A half that does not require grad or
    has no gradient is skipped; the other half of its layer is still preconditioned.

    Layers of equal shapes are done together (a few batched matmuls and inverses per shape, not a dozen small
    kernels per layer: SDXL has 560 adapted layers and about ten shapes), with no host synchronisation.

    Args:
        layers: PLP layers by module name, e.g. ``plp_layers(model)``.
        reg: Damping δ added to the diagonal before inversion.
        factors: ``"learned"`` (Gram matrices of ``B`` and ``D``, the paper) or ``"full"`` (of ``[A; B]``, ``[C, D]``).
        params: If given, only gradients of these parameters are touched (an optimizer passes its own).
    """
    _check(reg, factors)
    allowed = None if params is None else {id(p) for p in params}
    # (side, factor shape, grad shape, dtypes, device) -> [(grad, factor)]. "left": grad_D <- (NᵀN + δI)⁻¹ grad_D
    # with N the up factor; "right": grad_B <- grad_B (MMᵀ + δI)⁻¹ with M the down factor (the module docstring's).
    groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for layer in layers.values():
        b, d = layer.up_learned, layer.down_learned
        grad_b, grad_d = (
            p.grad if p.requires_grad and (allowed is None or id(p) in allowed) else None for p in (b, d)
        )
        if grad_b is None and grad_d is None:
            continue
        dtype = torch.promote_types(b.dtype, torch.float32)
        up, down = b.detach(), d.detach()
        if factors == "full":  # the raw tensors: layer.up()/down() would apply the generation scales
            up = torch.cat([layer.up_frozen.to(up.dtype), up], dim=0)
            down = torch.cat([layer.down_frozen.to(down.dtype), down], dim=1)
        for side, grad, factor in (("left", grad_d, up), ("right", grad_b, down)):
            if grad is not None:
                key = (side, tuple(factor.shape), tuple(grad.shape), dtype, grad.dtype, grad.device)
                groups[key].append((grad, factor))
    # Every inverse comes from the pre-update factors: the factors are parameters, only gradients are written.
    for (side, _, _, dtype, _, _), jobs in groups.items():
        grads = [grad for grad, _ in jobs]
        f = torch.stack([factor for _, factor in jobs]).to(dtype)
        inv = _damped_inverse(f.mT @ f if side == "left" else f @ f.mT, reg)
        g = torch.stack(grads).to(dtype)
        out = (inv @ g if side == "left" else g @ inv).to(grads[0].dtype)
        torch._foreach_copy_(grads, list(out.unbind(0)))


def create_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float,
    precondition: bool = True,
    reg: float = 1e-2,
    factors: str = "learned",
    max_grad_norm: float | None = None,
    param_groups: list[dict] | None = None,
    **kwargs,
) -> torch.optim.Optimizer:
    """An instance of a subclass of ``optimizer_cls`` that preconditions the PLP gradients on every ``step()``.

    ``step()`` does, in order: precondition (if enabled) -> clip the global gradient norm of all the optimizer's
    parameters to ``max_grad_norm`` (if set; the norm before clipping is kept in ``last_grad_norm``) -> the wrapped
    step. Closures are not supported. Parameters that are not learned PLP halves are updated unchanged.

    The PLP layers are found in ``model`` by name and kept as ``optimizer.plp_layers``; each ``B`` is paired with the
    ``D`` of its own layer, whatever the order of the parameters. Only gradients of parameters held by this optimizer
    are preconditioned, so keep both halves of a layer in one optimizer (use ``param_groups`` for separate lrs).
    ``state_dict()`` stores the settings (``precondition``, ``reg``, ``factors``, ``max_grad_norm``) under
    ``"b4m_preconditioner"`` next to torch's own entries, and ``load_state_dict()`` restores them.

    Args:
        model: The model carrying PLP layers (see :func:`b4m.adapter.walker.add_plp`).
        optimizer_cls: A torch optimizer class whose ``step()`` does not require a closure (AdamW, SGD, ...).
        lr: Learning rate (the default of every param group).
        precondition: Apply the preconditioner; ``False`` gives exactly ``optimizer_cls`` (plus optional clipping).
        reg: Damping δ of the ``r × r`` inverses (peft's default 1e-2). 0 falls back to a pseudo-inverse.
        factors: ``"learned"`` (the paper: Gram matrices of ``B`` and ``D``) or ``"full"`` (Zhang & Pilanci on the
            whole factors ``[A; B]`` and ``[C, D]``).
        max_grad_norm: Clip the global gradient norm to this value after preconditioning; ``None`` does not clip.
        param_groups: Torch-style param groups (list of dicts with ``"params"``); default: every parameter of
            ``model`` that requires grad, in one group.
        **kwargs: Passed on to ``optimizer_cls`` (``weight_decay``, ``betas``, ``momentum``, ...).

    Returns:
        The optimizer.
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise B4MError(f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
    closure = inspect.signature(optimizer_cls.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise B4MError(f"{optimizer_cls.__name__} requires a closure; use an optimizer like AdamW or SGD")
    _check(reg, factors, max_grad_norm)
    layers = plp_layers(model)
    if precondition and not layers:
        raise B4MError("the model has no PLP layers to precondition; call add_plp first or pass precondition=False")
    if param_groups is None:
        param_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        if not param_groups[0]["params"]:
            raise B4MError("the model has no parameters that require grad")

    class Preconditioned(optimizer_cls):
        def _all_params(self) -> list[torch.Tensor]:
            return [p for group in self.param_groups for p in group["params"]]

        @torch.no_grad()
        def step(self, closure=None):
            if closure is not None:
                raise B4MError("the preconditioned optimizer does not support closures: call backward, then step()")
            if self.precondition:
                precondition_(self.plp_layers, self.reg, self.factors, params=self._all_params())
            if self.max_grad_norm is not None:
                grads = [p for p in self._all_params() if p.grad is not None]
                self.last_grad_norm = nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
            return super().step()

        def state_dict(self) -> dict:
            state = super().state_dict()
            state[STATE_KEY] = {k: getattr(self, k) for k in SETTINGS}
            return state

        def load_state_dict(self, state_dict: dict) -> None:
            state_dict = dict(state_dict)
            settings = state_dict.pop(STATE_KEY, None)
            if settings is not None:
                _check(settings["reg"], settings["factors"], settings["max_grad_norm"])
                if settings["precondition"] and not self.plp_layers:
                    raise B4MError("the saved optimizer preconditions PLP layers, but the model has none")
                for k in SETTINGS:
                    setattr(self, k, settings[k])
            super().load_state_dict(state_dict)

    Preconditioned.__name__ = Preconditioned.__qualname__ = f"Preconditioned{optimizer_cls.__name__}"
    optimizer = Preconditioned(param_groups, lr=lr, **kwargs)
    optimizer.plp_layers = layers
    optimizer.precondition, optimizer.reg, optimizer.factors = precondition, reg, factors
    optimizer.max_grad_norm = max_grad_norm
    optimizer.last_grad_norm = None
    return optimizer
