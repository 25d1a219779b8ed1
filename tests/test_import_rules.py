"""The services import only serving code: no offline tools (training, benchmarks, the
local mesh), no training libraries, and not the registry's server package (sites update
through the ``ota`` client library). Checked on the source, so a lazy import inside a
function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVICE_PACKAGES = ("router_service", "edge_node", "cloud_inference")
# The registry's package is its server; sites update through ``ota``.
FORBIDDEN = frozenset(
    {"localmesh", "bench", "training", "registry", "torch", "sklearn", "skl2onnx"}
)


def imported_roots(path: Path) -> set[str]:
    """The top-level package of every absolute import in the module, wherever it sits."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


SERVICE_MODULES = sorted(
    path for package in SERVICE_PACKAGES for path in (REPO / package).rglob("*.py")
)


@pytest.mark.parametrize(
    "path", SERVICE_MODULES, ids=[str(p.relative_to(REPO)) for p in SERVICE_MODULES]
)
def test_service_modules_import_no_offline_code(path: Path) -> None:
    offline = sorted(imported_roots(path) & FORBIDDEN)
    assert not offline, f"{path.relative_to(REPO)} imports {offline}"


def test_the_rule_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from localmesh.launcher import LocalMesh\n    import torch\n")
    assert imported_roots(module) == {"localmesh", "torch"}
