"""workload.model_store and workload.catalog: self-describing, verifiable, consistent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from workload.catalog import CatalogError, load_catalog
from workload.model_store import (
    MANIFEST_FILE,
    ModelStoreError,
    latest_versions,
    load_verified,
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
    with pytest.raises(ModelStoreError, match="sha256"):
        load_verified(model.parent)


def test_a_missing_file_or_bad_manifest_is_refused(store_copy: Path) -> None:
    version_dir = store_copy / "fashion-edge" / "1"
    (version_dir / "MODEL_CARD.md").unlink()
    with pytest.raises(ModelStoreError, match="missing"):
        load_verified(version_dir)
    manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
    manifest["output_kind"] = "vibes"
    (version_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelStoreError, match="output_kind"):
        load_verified(version_dir)


def test_a_version_in_the_wrong_directory_is_refused(store_copy: Path) -> None:
    moved = store_copy / "fashion-edge" / "7"
    (store_copy / "fashion-edge" / "1").rename(moved)
    with pytest.raises(ModelStoreError, match="does not match"):
        load_verified(moved)


def test_latest_version_wins(store_copy: Path) -> None:
    shutil.copytree(store_copy / "fashion-edge" / "1", store_copy / "fashion-edge" / "10")
    assert [d.name for d in latest_versions(store_copy)] == ["10"]


def test_catalog_pairs_match_their_manifests() -> None:
    pairs = load_catalog(CATALOG)
    pair = pairs["fashion-mnist"]
    assert (pair.edge_model, pair.cloud_model) == ("fashion-edge", "fashion-cloud")
    by_name = {d.parent.name: load_verified(d) for d in latest_versions(STORE)}
    for model in (pair.edge_model, pair.cloud_model):
        pair.check_against(by_name[model])


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
