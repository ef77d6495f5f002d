"""The ``b4m`` typer app: the root (``--version``), every command bound to its name, and :func:`main`.

The commands live in the modules of their job; this is the one place that names them (the modules do not import
this one).
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from typing import Annotated

import typer

from ..errors import B4MError, Interrupted
from ..version import __version__
from . import bench, files, stages, sweep, ui, world
from .console import console

app = typer.Typer(
    name="b4m",
    help="Break-for-Make: learn a content and a style in separate halves of one LoRA, then make them together.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        console.print(f"b4m {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def _stoppable(command: Callable) -> Callable:
    """``command`` with Ctrl-C outside a training loop (loading, sample images, writing files) reported as one line
    and the command that continues it (:func:`main`), not typer's silent exit 130 (the training loop stops at a
    step's end on its own: :class:`b4m.training.checkpoint.Stopper`)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted("stopped by SIGINT before the command finished", signal.SIGINT) from None

    return run


for _name, _command in {
    "inspect": files.inspect,
    "dry-run": files.dry_run,
    "fuse": files.fuse,
    "export": files.export,
    "content": stages.content,
    "style": stages.style,
    "make": stages.make,
    "generate": stages.generate,
    "run": stages.run,
    "demo": world.demo,
    "bench": bench.bench,
    "eval": bench.evaluate,
    "sweep": sweep.sweep,
    "ui": ui.ui,
}.items():
    app.command(_name)(_stoppable(_command))

world_app = typer.Typer(
    help="The built-in world: render reference folders, score images, pretrain its base model, train oracles, "
    "measure the model's quality.",
    no_args_is_help=True,
)
for _name, _command in {
    "render": world.render,
    "score": world.score,
    "pretrain": world.pretrain,
    "oracle": world.oracle,
    "evaluate": world.evaluate,
}.items():
    world_app.command(_name)(_stoppable(_command))
app.add_typer(world_app, name="world")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main() -> None:
    """The ``b4m`` entry point: a :class:`~b4m.errors.B4MError` prints as one line and exits with status 2."""
    import warnings

    warnings.showwarning = _show_warning  # one line per warning, no source excerpt
    try:
        app()
    except Interrupted as e:  # SIGINT/SIGTERM during training: a checkpoint was written; 130 or 143, as shells do
        again = resume_command(sys.argv[1:])
        print(f"{e}; resume with: {again}" if again else str(e), file=sys.stderr)
        sys.exit(128 + e.signum)
    except B4MError as e:
        print(f"error: {e}", file=sys.stderr)  # one line, never wrapped
        sys.exit(2)


def resume_command(args: list[str]) -> str | None:
    """The command line that continues an interrupted run: the same arguments, ``--resume`` instead of
    ``--overwrite``; None for a command that cannot resume."""
    import shlex

    if not args or args[0] not in ("content", "style", "make", "run", "bench"):
        return None
    kept = [a for a in args if a not in ("--resume", "--overwrite")]
    return shlex.join(["b4m", *kept, "--resume"])
