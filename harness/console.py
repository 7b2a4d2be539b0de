"""The two consoles every command writes to: results on stdout, progress and messages on stderr."""
from rich.console import Console

console = Console(stderr=True)
out = Console()
