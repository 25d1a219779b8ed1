"""The feedback loop: reconciled examples in a real outbox file, the committed models,
a real signed registry. The candidate is published only when it beats the serving
policy on held-out data by the required margin."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from localmesh.cli import main as hybridmesh_main
from registry.signing import generate_key
from registry.store import RegistryStore
from router_service.escalation import EscalationClassifier
from router_service.policy_updater import POLICY_KIND
from tests.helpers.outbox_examples import reconcile_examples
from training.retrain import reconciled_examples
from workload.catalog import load_catalog
from workload.fashion_mnist import load_split

REPO = Path(__file__).resolve().parent.parent
STORE = REPO / "models" / "store"
PAIR = "fashion-mnist"
EXAMPLES = 200


def predictions(model: str, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
    session = ort.InferenceSession(str(STORE / model / "1" / "model.onnx"))
    classes: npt.NDArray[np.int64] = np.argmax(session.run(None, {"image": images})[0], axis=1)
    return classes


def fill_outbox(path: Path) -> int:
    """Reconcile EXAMPLES test images as the router would: edge and cloud answers."""
    images = load_split("test").images[:EXAMPLES]
    edge, cloud = predictions("fashion-edge", images), predictions("fashion-cloud", images)
    reconcile_examples(
        path, PAIR, "image", images, ("fashion-edge:1", edge), ("fashion-cloud:1", cloud)
    )
    return int(np.sum(edge != cloud))


def test_reconciled_examples_carry_the_clouds_disagreement(tmp_path: Path) -> None:
    disagreements = fill_outbox(tmp_path / "outbox.sqlite")
    examples = reconciled_examples(
        tmp_path / "outbox.sqlite",
        load_catalog(REPO / "models" / "catalog.toml")[PAIR],
        STORE / "fashion-edge" / "1" / "model.onnx",
    )
    assert examples.count == EXAMPLES
    assert int(examples.labels.sum()) == disagreements > 0
    assert examples.features.shape == (EXAMPLES, 16)


def test_publishes_only_when_better(tmp_path: Path, capsys: object) -> None:
    fill_outbox(tmp_path / "outbox.sqlite")
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "models" / "policies" / PAIR / "1", policies / PAIR / "1")
    generate_key(tmp_path / "keys")
    common = [
        "--outbox", str(tmp_path / "outbox.sqlite"), "--policies", str(policies),
        "--registry-root", str(tmp_path / "registry"), "--keys", str(tmp_path / "keys"),
    ]  # fmt: skip
    # An impossible margin: reported, nothing written or published.
    assert hybridmesh_main(["router", "retrain", *common, "--min-gain", "1.0"]) == 0
    assert not (policies / PAIR / "2").exists()
    assert not (tmp_path / "registry").exists()
    # Any candidate counts as better: written as v2, signed, published and promoted.
    assert hybridmesh_main(["router", "retrain", *common, "--min-gain", "-1.0"]) == 0
    candidate = EscalationClassifier(policies / PAIR / "2")
    assert candidate.version == "2" and 0.0 < candidate.threshold < 1.0
    store = RegistryStore(tmp_path / "registry")
    assert store.promoted(POLICY_KIND, PAIR) == 2
    assert (
        candidate.metadata.feature_names
        == EscalationClassifier(policies / PAIR / "1").metadata.feature_names
    )


def test_a_missing_or_foreign_outbox_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt ``--outbox`` is refused by name (it was created empty and the retrain
    ran on no examples, exit 0); a file that is not SQLite is one line, no traceback."""
    missing = tmp_path / "misspelt.sqlite"
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not a database\n" * 100)
    for outbox, said in ((missing, "no such file"), (foreign, "not a router outbox")):
        status = hybridmesh_main(
            ["policy", "retrain", "--pair", PAIR, "--outbox", str(outbox),
             "--out", str(tmp_path / "out")]
        )  # fmt: skip
        error = capsys.readouterr().err
        assert status == 2, error
        assert error == f"error: --outbox {outbox}: {said}" + error.split(said, 1)[1], error
        assert error.count("\n") == 1, error
    assert not missing.exists(), "refused without creating it"


def test_evaluating_a_missing_policy_version_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = hybridmesh_main(["policy", "evaluate", "--pair", PAIR, "--version", "-3"])
    error = capsys.readouterr().err
    assert status == 2 and error.count("\n") == 1, error
    assert "fashion-mnist/-3/policy.json" in error, error
