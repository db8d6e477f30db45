"""wanrt.cli: the Typer command-line app."""
