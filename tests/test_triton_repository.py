"""workload.triton_repository: both flavours agree; the local one serves on the real
tritonserver with the same logits as onnxruntime on the same model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as triton_grpc

from cloud_inference.triton_launcher import TritonServer
from tests.triton_fixtures import STORE, TRITON_MODELS, triton
from workload.fashion_mnist import LABELS, load_split
from workload.model_store import latest_versions
from workload.triton_repository import write_repository

__all__ = ["triton"]


def test_flavours_share_names_and_tensors(tmp_path: Path) -> None:
    local = write_repository(STORE, tmp_path / "local", "local", TRITON_MODELS)
    production = write_repository(STORE, tmp_path / "prod", "production", TRITON_MODELS)
    assert local == production == TRITON_MODELS
    for model in TRITON_MODELS:
        local_config = (tmp_path / "local" / model / "config.pbtxt").read_text()
        prod_config = (tmp_path / "prod" / model / "config.pbtxt").read_text()
        assert 'backend: "python"' in local_config and "KIND_CPU" in local_config
        assert 'platform: "onnxruntime_onnx"' in prod_config and "KIND_GPU" in prod_config
        for config in (local_config, prod_config):
            assert 'name: "image" data_type: TYPE_UINT8 dims: [1, 28, 28]' in config
            assert 'name: "logits" data_type: TYPE_FP32 dims: [10]' in config
            assert "dynamic_batching" in config and "max_batch_size: 64" in config
        assert (tmp_path / "local" / model / "1" / "model.py").exists()
        assert not (tmp_path / "prod" / model / "1" / "model.py").exists()
        labels = (tmp_path / "prod" / model / "labels.txt").read_text().splitlines()
        assert labels == list(LABELS)


def test_dynamic_batching_can_be_switched_off(tmp_path: Path) -> None:
    write_repository(STORE, tmp_path, "local", ["fashion-edge"], dynamic_batching=False)
    assert "dynamic_batching" not in (tmp_path / "fashion-edge" / "config.pbtxt").read_text()


def test_unknown_model_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not in the store"):
        write_repository(STORE, tmp_path, "local", ["no-such-model"])


# The module-scoped Triton lives on the module's event loop; so does this test.
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("model", TRITON_MODELS)
async def test_real_triton_serves_the_onnxruntime_answer(triton: TritonServer, model: str) -> None:
    images = load_split("test").images[:16]
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
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_no_orphans_after_stop(tmp_path: Path) -> None:
    import asyncio

    async def run() -> list[int]:
        write_repository(STORE, tmp_path / "repo", "local", ["fashion-edge"])
        async with TritonServer(tmp_path / "repo", tmp_path / "run") as server:
            assert server.pid is not None
            group = server.pid
            children = _group_members(group)
            assert len(children) >= 2, "tritonserver plus its python backend stub"
        return children

    members = asyncio.run(run())
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
