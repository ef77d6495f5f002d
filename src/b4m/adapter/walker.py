"""Finding, attaching and removing PLP layers in a model, and acting on all of them at once (peft's model walker).

Targets follow peft's rule: a list means exact module names or dotted suffixes, a string is a full-match regex;
``exclude`` is checked first. Matching nothing is an error that names the patterns. No targets (an empty list or
string: the default) means the model's own, resolved here where the adapter is attached, as peft resolves
``target_modules=None`` (:func:`resolve_targets`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from ..errors import B4MError
from .config import DEFAULT_TARGETS, MODEL_TARGETS, PLPConfig
from .layer import PLPLinear

M = TypeVar("M", bound=nn.Module)


def matches(name: str, patterns: Sequence[str] | str) -> bool:
    """peft's rule: a string is a full-match regex; a list means exact names or dotted suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def resolve_targets(model: nn.Module, config: PLPConfig) -> PLPConfig:
    """``config`` as it applies to ``model``: targets it names as they are; none (empty) replaced by the model's own,
    by the class of ``model`` or of one of its bases (:data:`b4m.adapter.config.MODEL_TARGETS`: FLUX.1's and FLUX.2
    [klein]'s transformers), else :data:`~b4m.adapter.config.DEFAULT_TARGETS` (the UNets' attention projections)."""
    if config.targets:
        return config
    found = (MODEL_TARGETS.get(cls.__name__) for cls in type(model).__mro__)
    default = next((t for t in found if t is not None), None)
    return dataclasses.replace(config, targets=default if default is not None else list(DEFAULT_TARGETS))


def find_targets(model: nn.Module, config: PLPConfig) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` that ``config`` targets (none named: the model's own,
    :func:`resolve_targets`), in module order."""
    config = resolve_targets(model, config)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, PLPLinear):
            raise B4MError(f"{name}: the model already carries PLP adapters; remove them first (remove_plp)")
        if not isinstance(module, nn.Linear) or not name:
            continue
        if config.exclude and matches(name, config.exclude):
            continue
        if matches(name, config.targets):
            names.append(name)
    if not names:
        raise B4MError(f"no nn.Linear module matches targets {config.targets!r} (exclude {config.exclude!r})")
    return names


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model`` (wrapping a layer, or unwrapping it again)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def linear_module(model: nn.Module, name: str, where: str = "") -> nn.Linear:
    """The ``nn.Linear`` at ``name`` in ``model``; a one-line error (prefixed with ``where``) if there is none."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise B4MError(f"{where}module {name} does not exist in the model (another base model?)") from None
    if not isinstance(module, nn.Linear):
        raise B4MError(f"{where}module {name} is a {type(module).__name__} in the model, not nn.Linear")
    return module


def wrap_linears(model: nn.Module, names: Sequence[str], make: Callable[[nn.Linear, str], M]) -> dict[str, M]:
    """Replace each linear layer ``names`` of ``model`` by ``make(layer, name)`` (an adapter that keeps it as its
    ``base_layer``) and freeze the base model's own parameters; returns the adapters by module name."""
    linears = {name: linear_module(model, name) for name in names}  # every name checked before anything changes
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name, linear in linears.items():
        layers[name] = make(linear, name)
        set_submodule(model, name, layers[name])
    return layers


def check_rank(model: nn.Module, config: PLPConfig) -> list[str]:
    """The names ``config`` targets in ``model`` (works on a meta-device skeleton too), after checking that its rank
    fits every one of them: at most the narrower side of each layer (a larger rank adds nothing but memory).

    Raises:
        B4MError: The rank exceeds a targeted layer's width (the message names the narrowest layer).
    """
    names = find_targets(model, config)
    widths = {
        name: min(model.get_submodule(name).in_features, model.get_submodule(name).out_features) for name in names
    }
    narrowest = min(widths, key=widths.get)
    if config.rank > widths[narrowest]:
        raise B4MError(
            f"rank {config.rank} is larger than the narrowest adapted layer ({narrowest}: {widths[narrowest]} wide); "
            f"use --rank {widths[narrowest]} or less"
        )
    return names


def add_plp(model: nn.Module, config: PLPConfig) -> dict[str, PLPLinear]:
    """Wrap every targeted linear layer of ``model`` in a :class:`PLPLinear` (:func:`check_rank` first); returns
    them by module name. No targets in ``config``: the model's own (:func:`resolve_targets`).

    The base model's own parameters are frozen (``requires_grad=False``); only the learned halves train.
    """
    config = resolve_targets(model, config)
    return wrap_linears(model, check_rank(model, config), lambda linear, name: PLPLinear(linear, config, name))


def plp_layers(model: nn.Module) -> dict[str, PLPLinear]:
    """The PLP layers of ``model`` by module name (the name of the wrapped linear layer)."""
    return {m.name: m for m in model.modules() if isinstance(m, PLPLinear)}


def remove_plp(model: nn.Module) -> None:
    """Put the original linear layers back (unmerging first where merged)."""
    for name, layer in plp_layers(model).items():
        layer.unmerge()
        set_submodule(model, name, layer.base_layer)


@torch.no_grad()
def merge_plp(model: nn.Module) -> int:
    """Fold every PLP layer's ΔW into its base weight and put the plain linear layers back (peft's
    ``merge_and_unload``): sampling then costs what the base model costs. Not reversible. Returns the number of
    layers merged."""
    layers = plp_layers(model)
    for name, layer in layers.items():
        layer.merge()
        set_submodule(model, name, layer.base_layer)
    return len(layers)


@contextlib.contextmanager
def routing(model: nn.Module, k: int, owned: str) -> Iterator[None]:
    """Clean gradient routing in one forward and one backward (multi-correspondence, paper eq. 12).

    Inside the context, the first ``k`` samples of every batch send gradients only to the ``owned`` learned half
    (``"up"`` = B or ``"down"`` = D) and the other samples only to the other half. Samples of a batch are
    independent in a UNet (GroupNorm and attention act per sample), so this equals computing the main loss's
    gradient for the owned half and the auxiliary loss's gradient for the other half separately, at the cost of
    one backward pass (the weight gradients are summed over the chosen rows: see :mod:`b4m.adapter.lowrank`).
    Values and activation gradients are unchanged.
    """
    if owned not in ("up", "down"):
        raise B4MError(f"owned half must be 'up' or 'down', got {owned!r}")
    layers = list(plp_layers(model).values())
    for layer in layers:
        layer.route = (k, owned)
    try:
        yield
    finally:
        for layer in layers:
            layer.route = None


def set_scales(
    model: nn.Module,
    config: PLPConfig,
    *,
    scale: float = 1.0,
    content_scale: float = 1.0,
    style_scale: float = 1.0,
) -> None:
    """Scale the whole ΔW and the content and style halves separately (generation-time knobs)."""
    up, down = config.half_scales(content_scale, style_scale)
    for layer in plp_layers(model).values():
        if layer.merged:
            raise B4MError(f"{layer.name}: unmerge before changing scales")
        layer.scale, layer.up_scale, layer.down_scale = scale, up, down


@dataclass
class DryRun:
    """What :func:`add_plp` would do: matched modules and parameter counts."""

    modules: list[tuple[str, int, int, int, int]]  # name, in, out, trainable, frozen
    trainable: int
    frozen: int

    def lines(self) -> list[str]:
        out = [f"{'module':<80} {'in':>6} {'out':>6} {'trainable':>10} {'frozen':>10}"]
        out += [f"{n:<80} {i:>6} {o:>6} {t:>10} {f:>10}" for n, i, o, t, f in self.modules]
        out.append(f"{len(self.modules)} modules, {self.trainable:,} trainable, {self.frozen:,} frozen parameters")
        return out


def dry_run(model: nn.Module, config: PLPConfig) -> DryRun:
    """List matched modules and trainable/frozen counts without touching the model."""
    rows = []
    for name in find_targets(model, config):
        lin = model.get_submodule(name)
        m, n, r = lin.out_features, lin.in_features, config.rank
        d_out, d_in = config.frozen_dims(m, n)
        rows.append((name, n, m, (m - d_out) * r + r * (n - d_in), d_out * r + r * d_in))
    return DryRun(rows, sum(r[3] for r in rows), sum(r[4] for r in rows))
