"""Generate Python code and typed stubs from protos/ (grpc_tools.protoc + mypy-protobuf).

The proto package is the import path (``hybridmesh.router.v1`` ->
``hybridmesh/router/v1/``), generated at the repository root so no import rewriting is
needed. Usage: ``python tools/generate_protos.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
GENERATED_PACKAGE = "hybridmesh"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Write generated modules, stubs and package ``__init__.py`` files under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Regular packages (not namespace packages) keep mypy and setuptools simple.
    for package_dir in [out_dir / GENERATED_PACKAGE, *(out_dir / GENERATED_PACKAGE).rglob("*")]:
        if package_dir.is_dir() and package_dir.name != "__pycache__":
            (package_dir / "__init__.py").touch()


def generated_files(root: Path) -> dict[str, bytes]:
    """Map of relative path -> content for every generated file under root/hybridmesh."""
    base = root / GENERATED_PACKAGE
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(base.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
