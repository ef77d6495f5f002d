"""The ``b4m`` typer app: the root (``--version``), every command bound to its name, and :func:`main`.

The commands live in the modules of their job; this is the one place that names them (the modules do not import
this one).
"""

from __future__ import annotations

import sys
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


app.command("inspect")(files.inspect)
app.command("dry-run")(files.dry_run)
app.command("fuse")(files.fuse)
app.command("export")(files.export)
app.command("content")(stages.content)
app.command("style")(stages.style)
app.command("make")(stages.make)
app.command("generate")(stages.generate)
app.command("run")(stages.run)
app.command("demo")(world.demo)
app.command("bench")(bench.bench)
app.command("eval")(bench.evaluate)
app.command("sweep")(sweep.sweep)
app.command("ui")(ui.ui)

world_app = typer.Typer(
    help="The built-in world: render reference folders, score images, pretrain its base model, train oracles, "
    "measure the model's quality.",
    no_args_is_help=True,
)
world_app.command("render")(world.render)
world_app.command("score")(world.score)
world_app.command("pretrain")(world.pretrain)
world_app.command("oracle")(world.oracle)
world_app.command("evaluate")(world.evaluate)
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
