"""Test-time views: declared per pair in the catalog, the same transform and the same
features in training and serving, and a policy's features computable from what it
declares."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from router_service.escalation import PolicyArtifactError, read_policy_metadata
from router_service.features import (
    SUMMARY_FEATURES,
    VIEW_FEATURES,
    feature_names,
    router_features,
    views_of,
)
from services.views import UnknownViewError, apply_view, view_output_name
from workload.catalog import CatalogError, load_catalog

CATALOG = Path("models/catalog.toml")
COMMITTED_V1 = Path("models/policies/fashion-mnist/1")


def softmax_rows(rng: np.random.Generator, n: int, classes: int) -> npt.NDArray[np.float32]:
    logits = rng.normal(0, 2, (n, classes))
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    result: npt.NDArray[np.float32] = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
    return result


def test_hflip_mirrors_the_last_axis_and_needs_an_image() -> None:
    images = np.arange(2 * 1 * 2 * 3, dtype=np.uint8).reshape(2, 1, 2, 3)
    flipped = apply_view("hflip", images)
    assert flipped.flags.c_contiguous
    assert (flipped[0, 0, 0] == [2, 1, 0]).all()
    assert (apply_view("hflip", flipped) == images).all()
    with pytest.raises(UnknownViewError):
        apply_view("hflip", np.zeros((2, 64), np.float32))
    with pytest.raises(UnknownViewError):
        apply_view("rotate", images)
    assert view_output_name("logits", "hflip") == "logits_view_hflip"


def test_view_features_one_item_equal_the_batch_path() -> None:
    rng = np.random.default_rng(7)
    probabilities, view = softmax_rows(rng, 40, 10), softmax_rows(rng, 40, 10)
    view[:10] = probabilities[:10]  # some items where both views agree exactly
    inputs = rng.integers(0, 256, (40, 1, 28, 28), dtype=np.uint8)
    batched = router_features(probabilities, inputs, {"hflip": view})
    names = feature_names(10, ("hflip",))
    assert batched.shape == (40, len(names))
    assert len(names) == len(SUMMARY_FEATURES) + 10 + len(VIEW_FEATURES)
    for index in range(40):
        one = router_features(
            probabilities[index : index + 1],
            inputs[index : index + 1],
            {"hflip": view[index : index + 1]},
        )
        np.testing.assert_allclose(one[0], batched[index], rtol=1e-5, atol=1e-6)
    agreement = batched[:, names.index("view_hflip_agreement")]
    kl = batched[:, names.index("view_hflip_symmetric_kl")]
    assert (agreement[:10] == 1.0).all() and np.allclose(kl[:10], 0.0, atol=1e-6)
    # Without views, the old feature set is unchanged (the committed v1 policy's).
    np.testing.assert_array_equal(
        router_features(probabilities, inputs), batched[:, : len(SUMMARY_FEATURES) + 10]
    )


def test_views_of_reads_a_feature_list_back() -> None:
    assert views_of(feature_names(10), 10) == ()
    assert views_of(feature_names(10, ("hflip",)), 10) == ("hflip",)
    with pytest.raises(ValueError, match="feature"):
        views_of([*feature_names(10), "view_hflip_top1_probability"], 10)


def test_a_policy_whose_features_its_views_cannot_give_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "1"
    shutil.copytree(COMMITTED_V1, directory)
    assert read_policy_metadata(directory).views == ()
    raw = json.loads((directory / "policy.json").read_text())
    raw["views"] = ["hflip"]  # declares a view its 16 features do not include
    (directory / "policy.json").write_text(json.dumps(raw))
    with pytest.raises(PolicyArtifactError, match="feature names"):
        read_policy_metadata(directory)
    raw["feature_names"] = feature_names(10, ("hflip",))
    (directory / "policy.json").write_text(json.dumps(raw))
    assert read_policy_metadata(directory).views == ("hflip",)


def test_the_catalog_declares_views_per_pair(tmp_path: Path) -> None:
    assert load_catalog(CATALOG)["fashion-mnist"].views == ("hflip",)
    text = CATALOG.read_text()
    for bad, message in (
        ('["rotate"]', "unknown"),
        ('["hflip", "hflip"]', "repeated"),
        ('"hflip"', "list"),
    ):
        path = tmp_path / "catalog.toml"
        path.write_text(text.replace('views = ["hflip"]', f"views = {bad}"))
        with pytest.raises(CatalogError, match=message):
            load_catalog(path)
    flat = text.replace("shape = [-1, 1, 28, 28]", "shape = [-1, 784]")
    path = tmp_path / "flat.toml"
    path.write_text(flat)
    with pytest.raises(CatalogError, match="rank"):
        load_catalog(path)
    path.write_text(text.replace('views = ["hflip"]\n', ""))
    assert load_catalog(path)["fashion-mnist"].views == ()
