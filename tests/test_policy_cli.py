"""A pair's training data as configuration and the policy lifecycle CLI (``hybridmesh
policy train | evaluate | retrain``), on a second pair whose tensors, datatype and output
kind differ from Fashion-MNIST's (FP32 ``pixels``, ``probabilities``): nothing in the
training code knows either pair."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from localmesh.cli import main as hybridmesh_main
from router_service.escalation import LEARNED, MAX_SOFTMAX, load_policy
from tests.helpers.digits_pair import PAIR, DigitsPair, build_digits_pair
from tests.helpers.outbox_examples import reconcile_examples
from training.retrain import reconciled_examples
from workload.catalog import CatalogError, DataSource, load_catalog
from workload.pair_data import load_pair_split, npz_split_indices

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsPair:
    return build_digits_pair(tmp_path_factory.mktemp("digits"))


def hybridmesh(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "localmesh.cli", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_catalog_declares_data(tmp_path: Path) -> None:
    fashion = load_catalog(REPO / "models" / "catalog.toml")["fashion-mnist"]
    assert fashion.data == DataSource(loader="fashion-mnist")
    base = REPO / "models" / "catalog.toml"
    catalog = tmp_path / "catalog.toml"
    entry = base.read_text().replace("[pairs.fashion-mnist]", "[pairs.f]")
    for data, message in (
        ('{ loader = "mnist" }', "unknown loader 'mnist'"),
        ('{ loader = "fashion-mnist", npz = "a.npz" }', "exactly one of loader"),
        ("{ seed = 3 }", "exactly one of loader"),
        ('{ npz = "a.npz", router_train = 0.6, calibration = 0.4 }', "leave a test split"),
        ('{ npz = "a.npz", test = 0.2 }', r"unknown keys \['test'\]"),
        ('{ loader = "fashion-mnist", seed = 3 }', "apply to npz data only"),
    ):
        catalog.write_text(entry.replace('{ loader = "fashion-mnist" }', data))
        with pytest.raises(CatalogError, match=message):
            load_catalog(catalog)
    catalog.write_text(entry.replace('{ loader = "fashion-mnist" }', '{ npz = "d/a.npz" }'))
    # A relative npz path is relative to the catalog file.
    assert load_catalog(catalog)["f"].data == DataSource(npz=tmp_path / "d" / "a.npz")


def test_npz_splits_are_disjoint_fixed_and_in_the_pairs_dtype(
    digits: DigitsPair, tmp_path: Path
) -> None:
    pair = load_catalog(digits.catalog)[PAIR]
    assert pair.data is not None
    indices = npz_split_indices(len(digits.held_out_labels), pair.data)
    together = np.concatenate(list(indices.values()))
    assert len(together) == len(set(together.tolist())) == len(digits.held_out_labels)
    assert {k: len(v) for k, v in indices.items()} == {
        "router_train": 238,
        "calibration": 178,
        "test": 178,
    }
    again = npz_split_indices(len(digits.held_out_labels), pair.data)
    assert all(np.array_equal(indices[k], again[k]) for k in indices)
    split = load_pair_split(pair, "calibration")
    assert split.inputs.dtype == np.float32 and split.inputs.shape == (178, 64)
    np.testing.assert_array_equal(split.labels, digits.held_out_labels[indices["calibration"]])
    # Data in another dtype than the pair's input is refused, naming the pair.
    np.savez(tmp_path / "bad.npz", inputs=digits.held_out.astype(np.float64), labels=[0] * 594)
    bad = tmp_path / "catalog.toml"
    bad.write_text(digits.catalog.read_text().replace('"digits.npz"', f'"{tmp_path}/bad.npz"'))
    with pytest.raises(CatalogError, match="pair digits, test split: inputs are float64"):
        load_pair_split(load_catalog(bad)[PAIR], "test")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_train_and_evaluate_a_second_pair_with_the_cli(digits: DigitsPair, tmp_path: Path) -> None:
    pair_args = [
        "--pair", PAIR, "--catalog", str(digits.catalog), "--store", str(digits.store),
        "--policies", str(tmp_path / "policies"),
    ]  # fmt: skip
    trained = hybridmesh("policy", "train", *pair_args, "--target", "cloud-share=0.2", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    policy = load_policy(tmp_path / "policies" / PAIR / "1")
    assert policy.metadata.pair == PAIR and policy.metadata.kind in (LEARNED, MAX_SOFTMAX)
    # Reports go to a per-pair path.
    report = tmp_path / "results" / "policies" / PAIR / "evaluation"
    first = json.loads(report.with_suffix(".json").read_text())
    assert first["policy"]["pair"] == PAIR and first["policy"]["version"] == "1"
    assert report.with_suffix(".md").exists() and report.with_suffix(".png").exists()

    by_error = hybridmesh(
        "policy", "train", *pair_args, "--target", "edge-error=0.03", cwd=tmp_path
    )
    assert by_error.returncode == 0, by_error.stderr
    second = json.loads((tmp_path / "policies" / PAIR / "2" / "policy.json").read_text())
    assert second["target"] == {"kind": "edge-error", "value": 0.03}
    assert second["calibration"]["expected"]["edge_kept_error_rate"] <= 0.03

    # Evaluating v1 again (nothing fitted) gives v1's figures.
    evaluated = hybridmesh("policy", "evaluate", *pair_args, "--version", "1", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    again = json.loads(report.with_suffix(".json").read_text())
    for key in ("chosen_operating_point_on_test", "accuracy_at_cloud_share", "curves"):
        assert again[key] == first[key]


@pytest.mark.slow
def test_a_pair_without_data_is_refused_by_name(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.toml"
    text = (REPO / "models" / "catalog.toml").read_text()
    catalog.write_text(text.replace('data = { loader = "fashion-mnist" }\n', ""))
    result = hybridmesh(
        "policy", "train", "--pair", "fashion-mnist", "--catalog", str(catalog),
        "--store", str(REPO / "models" / "store"), "--policies", str(tmp_path / "p"),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "pair fashion-mnist: declares no data" in result.stderr
    missing = hybridmesh("policy", "evaluate", "--pair", "nope", cwd=REPO)
    assert missing.returncode == 2 and "no pair 'nope'" in missing.stderr


def test_retrain_reads_the_outbox_in_the_pairs_dtype(digits: DigitsPair, tmp_path: Path) -> None:
    pair = load_catalog(digits.catalog)[PAIR]
    policies = tmp_path / "policies"
    common = ["--pair", PAIR, "--catalog", str(digits.catalog), "--store", str(digits.store)]
    report_base = str(tmp_path / "r")
    train = ["policy", "train", *common, "--policies", str(policies), "--report", report_base]
    assert hybridmesh_main(train) == 0
    edge = digits.models["digits-edge"].predict(digits.held_out[:40])
    cloud = digits.models["digits-cloud"].predict(digits.held_out[:40])
    reconcile_examples(
        tmp_path / "outbox.sqlite", PAIR, "pixels", digits.held_out[:40],
        ("digits-edge:1", edge), ("digits-cloud:1", cloud),
    )  # fmt: skip
    examples = reconciled_examples(
        tmp_path / "outbox.sqlite", pair, digits.store / "digits-edge" / "1" / "model.onnx"
    )
    assert examples.features.shape == (40, 16)
    assert int(examples.labels.sum()) == int(np.sum(edge != cloud))
    report = tmp_path / "retrain.json"
    argv = [*common, "--policies", str(policies), "--outbox", str(tmp_path / "outbox.sqlite")]
    retrain = ["policy", "retrain", *argv, "--min-gain", "-1.0", "--report", str(report)]
    assert hybridmesh_main(retrain) == 0
    assert json.loads(report.read_text())["reconciled_examples"] == 40
    candidate = load_policy(policies / PAIR / "2")
    assert candidate.metadata.pair == PAIR and candidate.metadata.kind == LEARNED
