"""Fixtures shared across test modules."""

from tests.edge_fixtures import running_edge

__all__ = ["running_edge"]
