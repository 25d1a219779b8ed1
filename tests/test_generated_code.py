"""The committed generated code matches protos/ (regenerated into a temp dir)."""

from __future__ import annotations

from pathlib import Path

from tools.generate_protos import REPO_ROOT, generate, generated_files


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    generate(tmp_path)
    expected = generated_files(tmp_path)
    committed = generated_files(REPO_ROOT)
    assert expected, "protoc produced nothing"
    stale = sorted(
        path
        for path in expected.keys() | committed.keys()
        if expected.get(path) != committed.get(path)
    )
    assert not stale, f"generated code is stale, run `make protos`: {stale}"


def test_every_proto_package_matches_its_folder() -> None:
    for proto in (REPO_ROOT / "protos").rglob("*.proto"):
        package_line = next(
            line for line in proto.read_text().splitlines() if line.startswith("package ")
        )
        package = package_line.removeprefix("package ").rstrip(";")
        folder = proto.parent.relative_to(REPO_ROOT / "protos")
        assert package == ".".join(folder.parts), proto
