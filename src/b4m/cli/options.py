"""The stages' options, generated from the config dataclasses: each setting is declared once, in its field.

A field of :class:`~b4m.runs.config.StageConfig` or of one of its tables (``adapter``, ``train``, ``export``, …)
becomes an option of every command its ``commands`` name (:func:`b4m.settings.setting` puts them in the field's
metadata)::

    steps: int = setting(1000, "Optimizer steps.", flag="--steps", commands=("content", "style", "make"))

- ``help``: the option's help; ``flag``: its name (``short``: an alias such as ``-o``). A bool field gives a
  ``--x/--no-x`` pair, a list field a repeatable option.
- ``unset``: what an empty default (``None`` or ``""``) means, e.g. ``"the model's"``; ``notes``: what a value means,
  e.g. ``"0 fuses only"``. Either is a text for every command or a ``{command: text}`` table.

The help ends with the command's own default, read from the config that the stage starts from
(:data:`~b4m.runs.config.STAGE_DEFAULTS`: make's come from :class:`~b4m.method.config.MakeConfig`): ``--steps`` shows
``(default 1000)`` on content and ``(default 50; 0 fuses only)`` on make. Every option's value is ``None`` when it is
not given, so the ``--config`` file and the stage's defaults still apply.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.markup import escape

from ..runs.config import STAGE_DEFAULTS, StageConfig, load_config, stage_config


@dataclass(frozen=True)
class Setting:
    """One generated option: the config key it sets and the command function's parameter that receives it."""

    key: str  # dotted config key, e.g. "train.steps"
    parameter: inspect.Parameter  # named after the flag: --export-format -> export_format

    @property
    def help(self) -> str:
        return self.parameter.annotation.__metadata__[0].help


def settings_of(command: str) -> list[Setting]:
    """The options of stage ``command`` (``content``, ``style`` or ``make``), in the order of the config's fields."""
    defaults = load_config(None, {}, STAGE_DEFAULTS[command])  # SDXL's and SD's: the config dataclasses'
    world = stage_config(command)  # no model named: the built-in world, which brings its own defaults
    settings = []
    for key, field, hint in _leaves(StageConfig):
        meta = field.metadata
        if command not in meta.get("commands", ()):
            continue
        kind = _without_none(hint)
        flag = meta["flag"]
        decls = [f"{flag}/--no-{flag.removeprefix('--')}"] if kind is bool else [flag]
        decls += [meta["short"]] if "short" in meta else []
        default, on_world = _value(defaults, key), _value(world, key)
        option = typer.Option(*decls, help=_help(meta, command, default, None if on_world == default else on_world))
        name = flag.removeprefix("--").replace("-", "_")
        parameter = inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option]
        )
        settings.append(Setting(key, parameter))
    names = [s.parameter.name for s in settings]
    if len(set(names)) != len(names):
        raise TypeError(f"{command}: two settings declare the same flag ({names})")
    return settings


def with_settings(command: str, function: Callable[..., None]) -> Callable[..., None]:
    """The typer command for stage ``command``: the options of its settings, then ``function``'s own parameters after
    its first. ``function(settings, **own)`` receives the given settings as ``{config key: value}``."""
    own = list(inspect.signature(function, eval_str=True).parameters.values())[1:]
    settings = settings_of(command)
    clash = {s.parameter.name for s in settings} & {p.name for p in own}
    if clash:
        raise TypeError(f"{command}: {', '.join(sorted(clash))} is both a setting and a parameter")

    def run(**values: Any) -> None:
        given = {s.key: values.pop(s.parameter.name) for s in settings}
        function({k: v for k, v in given.items() if v is not None}, **values)

    parameters = [*(s.parameter for s in settings), *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own)]
    run.__signature__ = inspect.Signature(parameters)  # typer reads the parameters from here
    run.__name__ = run.__qualname__ = function.__name__
    run.__doc__ = function.__doc__
    return run


def _leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """``(dotted key, field, type)`` of every setting of ``cls``, the fields of its tables (nested dataclasses) too."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            yield from _leaves(hint, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}", field, hint


def _without_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _value(config: StageConfig, key: str) -> Any:
    value: Any = config
    for name in key.split("."):
        value = getattr(value, name)
    return value


def _for(text: str | dict[str, str] | None, command: str) -> str | None:
    return text.get(command) if isinstance(text, dict) else text


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _help(meta: dict[str, Any], command: str, default: Any, on_world: Any = None) -> str:
    """``meta["help"]`` with the command's default and notes: ``Optimizer steps (default 50; 0 fuses only).``; where
    the built-in world brings its own default: ``(default 60 on the built-in world, 1000 on SD and SDXL)``."""
    if default is None or default == "" or default == []:
        unset = _for(meta.get("unset"), command)
        shown = f"default: {unset}" if unset else None
    else:
        shown = f"default {_shown(default)}"
    if on_world is not None:
        shown = f"default {_shown(on_world)} on the built-in world, {_shown(default)} on SD and SDXL"
    extra = "; ".join(x for x in (shown, _for(meta.get("notes"), command)) if x)
    text = f"{meta['help'].removesuffix('.')} ({extra})." if extra else meta["help"]
    return escape(text)  # typer renders help as rich markup: 'b4m[lowmem]' lost its '[lowmem]'
