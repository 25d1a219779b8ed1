"""Fixtures shared across test modules."""

from tests.edge_fixtures import running_edge
from tests.scripted_tiers import scripted

__all__ = ["running_edge", "scripted"]
