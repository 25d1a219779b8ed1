"""workload.model_store and workload.catalog: self-describing, verifiable, consistent."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from workload.catalog import CatalogError, check_against_store, load_catalog
from workload.model_store import (
    MANIFEST_FILE,
    ManifestError,
    ModelIntegrityError,
    ModelManifest,
    ModelStoreError,
    TensorEntry,
    latest_versions,
    load_verified,
    write_version,
)

REPO = Path(__file__).resolve().parent.parent
STORE = REPO / "models" / "store"
CATALOG = REPO / "models" / "catalog.toml"


def test_every_committed_version_verifies() -> None:
    versions = latest_versions(STORE)
    assert {d.parent.name for d in versions} >= {"fashion-edge"}
    for version_dir in versions:
        manifest = load_verified(version_dir)
        assert manifest.model_file in {f.path for f in manifest.files}
        assert "MODEL_CARD.md" in {f.path for f in manifest.files}
        assert manifest.metrics["test_accuracy"] > 0.8
        assert manifest.provenance["command"].startswith("python -m workload.train_fashion")


@pytest.fixture
def store_copy(tmp_path: Path) -> Path:
    shutil.copytree(STORE / "fashion-edge", tmp_path / "fashion-edge")
    return tmp_path


def test_a_changed_byte_is_refused(store_copy: Path) -> None:
    model = store_copy / "fashion-edge" / "1" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[100] ^= 1
    model.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=r"sha256 [0-9a-f]{64} does not match"):
        load_verified(model.parent)
    model.write_bytes(bytes(data) + b"\0")
    with pytest.raises(ModelIntegrityError, match="size 38070 bytes does not match"):
        load_verified(model.parent)


def test_a_missing_file_or_bad_manifest_is_refused(store_copy: Path) -> None:
    version_dir = store_copy / "fashion-edge" / "1"
    (version_dir / "MODEL_CARD.md").unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        load_verified(version_dir)
    original = json.loads((version_dir / MANIFEST_FILE).read_text())
    broken = [
        ({"output_kind": "vibes"}, "output_kind"),
        ({"schema": "hybridmesh.model-manifest/v0"}, "schema"),
        ({"version": "1"}, "version must be an integer"),
        ({"name": "../fashion-edge"}, "name"),
        ({"labels": None}, "malformed"),
        ({"files": [{"path": "../../x", "sha256": "0" * 64, "size_bytes": 1}]}, "leaves"),
    ]
    for change, message in broken:
        (version_dir / MANIFEST_FILE).write_text(json.dumps(original | change))
        with pytest.raises(ManifestError, match=message):
            load_verified(version_dir)
    (version_dir / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ManifestError, match="malformed"):
        load_verified(version_dir)


def test_a_version_in_the_wrong_directory_is_refused(store_copy: Path) -> None:
    moved = store_copy / "fashion-edge" / "7"
    (store_copy / "fashion-edge" / "1").rename(moved)
    with pytest.raises(ModelStoreError, match="does not match"):
        load_verified(moved)


def test_latest_version_wins(store_copy: Path) -> None:
    shutil.copytree(store_copy / "fashion-edge" / "1", store_copy / "fashion-edge" / "10")
    assert [d.name for d in latest_versions(store_copy)] == ["10"]


def _tiny_manifest(version: int) -> ModelManifest:
    return ModelManifest(
        name="tiny",
        version=version,
        task="classification",
        model_file="model.onnx",
        files=(),
        inputs=(TensorEntry("x", "FP32", (-1, 2)),),
        outputs=(TensorEntry("y", "FP32", (-1, 2)),),
        labels=("a", "b"),
        output_kind="logits",
        max_batch_size=8,
        preprocessing="none",
        metrics={"test_accuracy": 0.5},
        provenance={"command": "test", "seed": 1},
        created="2026-01-01T00:00:00+00:00",
    )


def test_writer_round_trips_through_the_verifying_reader(tmp_path: Path) -> None:
    files = {"model.onnx": b"not really onnx", "notes/README.md": b"hello"}
    version_dir = write_version(tmp_path, _tiny_manifest(1), files)
    assert version_dir == tmp_path / "tiny" / "1"
    manifest = load_verified(version_dir)
    assert [(f.path, f.size_bytes) for f in manifest.files] == [
        ("model.onnx", 15),
        ("notes/README.md", 5),
    ]
    assert manifest.model_sha256 == hashlib.sha256(b"not really onnx").hexdigest()
    assert manifest == replace(_tiny_manifest(1), files=manifest.files)
    on_disk = json.loads((version_dir / MANIFEST_FILE).read_text())
    assert on_disk["schema"] == "hybridmesh.model-manifest/v1"
    assert on_disk["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]


def test_versions_only_go_up_and_failures_leave_nothing(tmp_path: Path) -> None:
    write_version(tmp_path, _tiny_manifest(2), {"model.onnx": b"v2"})
    for stale in (1, 2):
        with pytest.raises(ModelStoreError, match="not newer than 2"):
            write_version(tmp_path, _tiny_manifest(stale), {"model.onnx": b"old"})
    with pytest.raises(ManifestError, match="leaves the version directory"):
        write_version(tmp_path, _tiny_manifest(3), {"model.onnx": b"x", "../escape": b"x"})
    with pytest.raises(ManifestError, match="model_file"):
        write_version(tmp_path, _tiny_manifest(3), {"weights.bin": b"x"})
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["2"]
    assert not (tmp_path / "escape").exists()
    write_version(tmp_path, _tiny_manifest(3), {"model.onnx": b"v3"})
    assert [d.name for d in latest_versions(tmp_path)] == ["3"]


def test_catalog_pairs_match_their_manifests() -> None:
    pairs = load_catalog(CATALOG)
    pair = pairs["fashion-mnist"]
    assert (pair.edge_model, pair.cloud_model) == ("fashion-edge", "fashion-cloud")
    assert pair.input == TensorEntry("image", "UINT8", (-1, 1, 28, 28))
    manifests = check_against_store(pairs, STORE)
    assert sorted(manifests) == ["fashion-cloud", "fashion-edge"]
    assert manifests["fashion-edge"].labels == manifests["fashion-cloud"].labels


def test_catalog_that_disagrees_with_the_store_is_refused(tmp_path: Path) -> None:
    text = CATALOG.read_text()
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(text.replace('"fashion-cloud"', '"fashion-huge"'))
    with pytest.raises(CatalogError, match="pair fashion-mnist: no versions of fashion-huge"):
        check_against_store(load_catalog(catalog), STORE)
    catalog.write_text(text.replace('datatype = "UINT8"', 'datatype = "FP32"'))
    with pytest.raises(CatalogError, match="fashion-edge v1 has inputs"):
        check_against_store(load_catalog(catalog), STORE)


def test_catalog_errors_name_the_entry(tmp_path: Path) -> None:
    bad = tmp_path / "catalog.toml"
    bad.write_text('[pairs.x]\nedge_model = "a"\n')
    with pytest.raises(CatalogError, match=r"pairs\.x: missing"):
        load_catalog(bad)
    bad.write_text(
        '[pairs.x]\nedge_model = "a"\ncloud_model = "b"\n'
        'input = { name = "i", datatype = "FLOAT", shape = [-1] }\n'
        'output = { name = "o", datatype = "FP32", shape = [-1] }\n'
    )
    with pytest.raises(CatalogError, match="unknown datatype"):
        load_catalog(bad)
    # A misspelt optional key must not silently fall back to the default.
    bad.write_text(CATALOG.read_text().replace("anonymiser =", "anonymizer ="))
    with pytest.raises(CatalogError, match=r"unknown keys \['anonymizer'\]"):
        load_catalog(bad)
    bad.write_text('pairs = "fashion-mnist"\n')
    with pytest.raises(CatalogError, match="pairs must be a table"):
        load_catalog(bad)
