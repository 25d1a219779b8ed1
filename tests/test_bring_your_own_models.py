"""A second, independent model pair (scikit-learn digits, trained in seconds,
``tests/helpers/digits_pair.py``) goes through the same catalog, store, edge node and Triton
repository code: configuration, not code. Its policy and the whole mesh:
``tests/test_policy_cli.py``, ``tests/test_second_pair.py``."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc.aio as triton_grpc

from edge_node.app import EdgeNode
from edge_node.config import EdgeSettings
from hybridmesh.common.v1 import model_pb2
from hybridmesh.edge.v1 import edge_service_pb2, edge_service_pb2_grpc
from localmesh.triton import TritonServer
from services.telemetry import create_telemetry
from services.tensors import encode_tensor
from tests.helpers.digits_pair import build_digits_pair
from workload.catalog import load_catalog
from workload.model_store import latest_versions
from workload.triton_repository import write_repository


@pytest.fixture(scope="module")
def digits_pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, npt.NDArray[np.float32], dict[str, object]]:
    built = build_digits_pair(tmp_path_factory.mktemp("byo"))
    return built.catalog.parent, built.held_out, dict(built.models)


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
