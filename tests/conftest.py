"""Fixtures shared across test modules, registered here; their code is in tests/helpers.

Function-scoped unless said otherwise; the Triton fixtures are module-scoped (Triton
takes seconds to start), each with its module's event loop."""

# Imported here, at collection, on purpose: hypothesis' pytest plugin otherwise imports it
# in pytest_terminal_summary, deep in the stack, where CPython 3.11.7's AST constructor
# trips over its own recursion check ("AST constructor recursion depth mismatch") while
# pytest rewrites hypothesis' modules, and the run dies after the tests.
import hypothesis  # noqa: F401

from tests.helpers.cloud_service import cloud, cloud_triton
from tests.helpers.edge_node import running_edge
from tests.helpers.local_mesh import any_edge_mesh, mesh, mesh_triton
from tests.helpers.otlp_receiver import otlp_http
from tests.helpers.scripted_tiers import scripted
from tests.helpers.triton import triton

__all__ = [
    "any_edge_mesh",
    "cloud",
    "cloud_triton",
    "mesh",
    "mesh_triton",
    "otlp_http",
    "running_edge",
    "scripted",
    "triton",
]
