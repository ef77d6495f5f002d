"""The console every command prints on (output and progress; under accelerate, rank 0's)."""

from rich.console import Console

console = Console()
