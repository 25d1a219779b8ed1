"""Fixtures shared across test modules."""

# Imported here, at collection, on purpose: hypothesis' pytest plugin otherwise imports it
# in pytest_terminal_summary, deep in the stack, where CPython 3.11.7's AST constructor
# trips over its own recursion check ("AST constructor recursion depth mismatch") while
# pytest rewrites hypothesis' modules, and the run dies after the tests.
import hypothesis  # noqa: F401

from tests.edge_fixtures import running_edge
from tests.scripted_tiers import scripted

__all__ = ["running_edge", "scripted"]
