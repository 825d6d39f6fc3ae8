"""The `frmap` command line: the only layer that parses arguments, prints for people and turns
progress bars on."""

from frmap.engine.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
