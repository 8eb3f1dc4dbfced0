"""The `ediffi` command line: the top layer, the only package that knows every other
(docs/architecture.md §2). Settings are built here, once, and passed down."""

from cli.main import build_parser, main

__all__ = ["build_parser", "main"]
