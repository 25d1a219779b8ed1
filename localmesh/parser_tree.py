"""Walking an argparse tree of subcommands: to add an option to every level of it
(``--state-dir`` anywhere on the command line) and to check every level's help."""

from __future__ import annotations

import argparse
from collections.abc import Iterator


def subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """``(path, parser)`` for ``parser`` and every subcommand below it, depth first; the
    path is the subcommand names from the root, e.g. ``("registry", "promote")``."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from subcommands(child, (*path, name))


def add_below_root(parser: argparse.ArgumentParser, *flags: str, **options: object) -> None:
    """Add the option to every subcommand (not the root) with ``default=SUPPRESS``, so the
    root's own option and default hold unless the option is given after a subcommand."""
    for path, child in subcommands(parser):
        if path:
            child.add_argument(*flags, default=argparse.SUPPRESS, **options)  # type: ignore[arg-type]
