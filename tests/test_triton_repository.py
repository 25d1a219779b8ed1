"""workload.triton_repository: both flavours agree and parse as Triton model configs; the
local one serves on the real tritonserver with the same logits as onnxruntime."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as triton_grpc
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from localmesh.triton import TritonServer
from tests.helpers.paths import STORE
from tests.helpers.triton import TRITON_MODELS
from workload.fashion_mnist import LABELS, load_split
from workload.model_store import ModelManifest, TensorEntry, latest_versions, write_version
from workload.triton_repository import write_repository


def _parsed(path: Path) -> model_config_pb2.ModelConfig:
    # Triton's own schema: a misspelt field or a bad enum fails here, not in production.
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_flavours_share_names_and_tensors(tmp_path: Path) -> None:
    local = write_repository(STORE, tmp_path / "local", "local", TRITON_MODELS)
    production = write_repository(STORE, tmp_path / "prod", "production", TRITON_MODELS)
    assert local == production == TRITON_MODELS
    newest = {d.parent.name: d for d in latest_versions(STORE)}
    for model in TRITON_MODELS:
        version = newest[model].name
        local_config = _parsed(tmp_path / "local" / model / "config.pbtxt")
        prod_config = _parsed(tmp_path / "prod" / model / "config.pbtxt")
        assert (local_config.backend, local_config.platform) == ("python", "")
        assert (prod_config.backend, prod_config.platform) == ("", "onnxruntime_onnx")
        assert local_config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        assert prod_config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert local_config.parameters["intra_op_threads"].string_value == "1"
        for config in (local_config, prod_config):
            assert config.name == model and config.max_batch_size == 64
            (image,), (logits,) = config.input, config.output
            assert (image.name, image.data_type, list(image.dims)) == (
                "image",
                model_config_pb2.TYPE_UINT8,
                [1, 28, 28],
            )
            assert (logits.name, logits.data_type, list(logits.dims)) == (
                "logits",
                model_config_pb2.TYPE_FP32,
                [10],
            )
            assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16, 32]
            assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 1000
        assert (tmp_path / "local" / model / version / "model.py").exists()
        assert not (tmp_path / "prod" / model / version / "model.py").exists()
        for flavour in ("local", "prod"):
            copied = (tmp_path / flavour / model / version / "model.onnx").read_bytes()
            assert copied == (newest[model] / "model.onnx").read_bytes()
        labels = (tmp_path / "prod" / model / "labels.txt").read_text().splitlines()
        assert labels == list(LABELS)


def test_dynamic_batching_and_threads_are_configurable(tmp_path: Path) -> None:
    write_repository(
        STORE, tmp_path, "local", ["fashion-edge"], dynamic_batching=False, intra_op_threads=2
    )
    config = _parsed(tmp_path / "fashion-edge" / "config.pbtxt")
    assert not config.HasField("dynamic_batching")
    assert config.parameters["intra_op_threads"].string_value == "2"


def test_unknown_model_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not in the store"):
        write_repository(STORE, tmp_path, "local", ["no-such-model"])


# The module-scoped Triton lives on the module's event loop; so does this test.
@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("model", TRITON_MODELS)
async def test_real_triton_serves_the_onnxruntime_answer(triton: TritonServer, model: str) -> None:
    test = load_split("test")
    images = test.images[:16]
    version_dir = next(d for d in latest_versions(STORE) if d.parent.name == model)
    (expected,) = ort.InferenceSession(str(version_dir / "model.onnx")).run(
        ["logits"], {"image": images}
    )
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    try:
        tensor = triton_grpc.InferInput("image", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        result = await client.infer(model, [tensor], client_timeout=10)
        logits = result.as_numpy("logits")
    finally:
        await client.close()
    assert logits.shape == (16, 10) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert (logits.argmax(axis=1) == test.labels[:16]).mean() >= 0.75


def _reshaping_model() -> bytes:
    """FP32 [n, 4] -> [2, 2] -> [n, 4]: fine for n = 1, an onnxruntime error for n = 2."""
    square = helper.make_tensor("square", TensorProto.INT64, [2], [2, 2])
    back = helper.make_tensor("back", TensorProto.INT64, [2], [-1, 4])
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "square"], ["s"]),
            helper.make_node("Reshape", ["s", "back"], ["y"]),
        ],
        "reshaping",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        initializer=[square, back],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.mark.slow
def test_model_errors_reach_the_caller_and_stop_leaves_no_orphans(tmp_path: Path) -> None:
    manifest = ModelManifest(
        name="reshaping",
        version=1,
        task="classification",
        model_file="model.onnx",
        files=(),
        inputs=(TensorEntry("x", "FP32", (-1, 4)),),
        outputs=(TensorEntry("y", "FP32", (-1, 4)),),
        labels=("a", "b", "c", "d"),
        output_kind="logits",
        max_batch_size=8,
        preprocessing="none",
    )
    write_version(tmp_path / "store", manifest, {"model.onnx": _reshaping_model()})
    write_repository(tmp_path / "store", tmp_path / "repo", "local", dynamic_batching=False)

    async def run() -> tuple[list[int], InferenceServerException]:
        async with TritonServer(tmp_path / "repo", tmp_path / "run") as server:
            assert server.pid is not None
            members = _group_members(server.pid)
            assert len(members) >= 2, "tritonserver plus its python backend stub"
            client = triton_grpc.InferenceServerClient(server.grpc_url)
            try:
                ok = triton_grpc.InferInput("x", [1, 4], "FP32")
                ok.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
                result = await client.infer("reshaping", [ok], client_timeout=10)
                assert result.as_numpy("y").tolist() == [[0.0, 1.0, 2.0, 3.0]]
                bad = triton_grpc.InferInput("x", [2, 4], "FP32")
                bad.set_data_from_numpy(np.zeros((2, 4), dtype=np.float32))
                with pytest.raises(InferenceServerException) as failure:
                    await client.infer("reshaping", [bad], client_timeout=10)
                # The model stays up after a failed batch.
                assert await client.is_model_ready("reshaping", client_timeout=5)
            finally:
                await client.close()
        return members, failure.value

    members, error = asyncio.run(run())
    # The python backend turns the exception into this request's error (cloud_inference
    # maps INTERNAL); the message names the failing node.
    assert error.status() == "StatusCode.INTERNAL"
    assert "ONNXRuntimeError" in str(error) and "Reshape" in str(error)
    assert all(not Path(f"/proc/{pid}").exists() for pid in members)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    members.append(int(entry.name))
            except ProcessLookupError:
                continue
    return members
