"""A second, independent model pair (scikit-learn digits, trained in seconds) goes through
the same catalog, store, edge node and Triton repository code: configuration, not code."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc.aio as triton_grpc
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from edge_node.app import EdgeNode
from edge_node.config import EdgeSettings
from hybridmesh.common.v1 import model_pb2
from hybridmesh.edge.v1 import edge_service_pb2, edge_service_pb2_grpc
from localmesh.triton import TritonServer
from services.telemetry import create_telemetry
from services.tensors import encode_tensor
from workload.catalog import load_catalog
from workload.model_store import ModelManifest, TensorEntry, latest_versions, write_version
from workload.triton_repository import write_repository

CATALOG = """
[pairs.digits]
edge_model = "digits-edge"
cloud_model = "digits-cloud"
input = { name = "pixels", datatype = "FP32", shape = [-1, 64] }
output = { name = "probabilities", datatype = "FP32", shape = [-1, 10] }
output_kind = "probabilities"
"""


def _manifest(name: str, accuracy: float) -> ModelManifest:
    return ModelManifest(
        name=name,
        version=1,
        task="classification",
        model_file="model.onnx",
        files=(),
        inputs=(TensorEntry("pixels", "FP32", (-1, 64)),),
        outputs=(TensorEntry("probabilities", "FP32", (-1, 10)),),
        labels=tuple(str(digit) for digit in range(10)),
        output_kind="probabilities",
        max_batch_size=32,
        preprocessing="8x8 pixel intensities 0..16 as float32",
        metrics={"test_accuracy": accuracy},
    )


@pytest.fixture(scope="module")
def digits_pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, npt.NDArray[np.float32], dict[str, object]]:
    base = tmp_path_factory.mktemp("byo")
    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.data.astype(np.float32), digits.target, test_size=0.33, random_state=3
    )
    models = {
        "digits-edge": LogisticRegression(max_iter=300).fit(train_x, train_y),
        "digits-cloud": MLPClassifier((128,), max_iter=300, random_state=3).fit(train_x, train_y),
    }
    for name, model in models.items():
        onnx_model = to_onnx(model, train_x[:1], options={id(model): {"zipmap": False}})
        onnx_model.graph.input[0].name = "pixels"
        for node in onnx_model.graph.node:
            node.input[:] = ["pixels" if i == "X" else i for i in node.input]
        accuracy = float(model.score(test_x, test_y))
        write_version(
            base / "store",
            _manifest(name, accuracy),
            {"model.onnx": onnx_model.SerializeToString()},
        )
    (base / "catalog.toml").write_text(CATALOG)
    return base, test_x, dict(models)


def test_catalog_and_store_accept_the_new_pair(
    digits_pair: tuple[Path, npt.NDArray[np.float32], dict[str, object]],
) -> None:
    base, _, _ = digits_pair
    pair = load_catalog(base / "catalog.toml")["digits"]
    from workload.model_store import load_verified

    for version_dir in latest_versions(base / "store"):
        pair.check_against(load_verified(version_dir))


async def test_edge_node_serves_the_new_pair(
    digits_pair: tuple[Path, npt.NDArray[np.float32], dict[str, object]],
) -> None:
    base, test_x, models = digits_pair
    settings = EdgeSettings(port=0, model_store=base / "store", served_models=("digits-edge",))
    node = EdgeNode(settings, create_telemetry("byo", export_otlp=False))
    await node.start()
    try:
        async with grpc.aio.insecure_channel(node.host.address) as channel:
            reply = await edge_service_pb2_grpc.EdgeServiceStub(channel).Infer(
                edge_service_pb2.InferRequest(
                    model=model_pb2.ModelRef(name="digits-edge"),
                    inputs=[encode_tensor("pixels", test_x[:20])],
                ),
                timeout=10,
            )
    finally:
        await node.stop(0)
    expected = models["digits-edge"].predict(test_x[:20])  # type: ignore[attr-defined]
    got = [c.top_k[0].class_index for c in reply.classifications]
    assert got == expected.tolist()
    # Probabilities pass through unchanged (output_kind = probabilities: no softmax).
    probabilities = models["digits-edge"].predict_proba(test_x[:1])[0]  # type: ignore[attr-defined]
    assert reply.classifications[0].top_k[0].probability == pytest.approx(
        probabilities.max(), abs=1e-5
    )


async def test_triton_serves_the_new_cloud_model(
    digits_pair: tuple[Path, npt.NDArray[np.float32], dict[str, object]],
) -> None:
    base, test_x, models = digits_pair
    write_repository(base / "store", base / "repository", "local", ["digits-cloud"])
    async with TritonServer(base / "repository", base / "run") as server:
        client = triton_grpc.InferenceServerClient(server.grpc_url)
        try:
            tensor = triton_grpc.InferInput("pixels", [20, 64], "FP32")
            tensor.set_data_from_numpy(test_x[:20])
            result = await client.infer("digits-cloud", [tensor], client_timeout=10)
        finally:
            await client.close()
    expected = models["digits-cloud"].predict_proba(test_x[:20])  # type: ignore[attr-defined]
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-4)
