"""The edge node runs a requested test-time view too and returns its output as an extra
tensor; the router's features from it equal the ones training computes."""

from __future__ import annotations

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from router_service.features import router_features
from router_service.response import tensor_array
from services.classification import softmax
from services.views import apply_view
from tests.helpers.edge_node import RunningEdge
from tests.helpers.paths import STORE
from tests.helpers.requests import edge_request
from workload.fashion_mnist import load_split


async def test_a_requested_view_comes_back_as_an_extra_output(running_edge: RunningEdge) -> None:
    images = load_split("test").images[:32]
    request = edge_request(images)
    request.views.append("hflip")
    reply = await running_edge.stub.Infer(request, timeout=10)
    names = [tensor.name for tensor in reply.outputs]
    assert names == ["logits", "logits_view_hflip"]  # the model's own output stays first
    logits, flipped = (tensor_array(tensor).astype(np.float32) for tensor in reply.outputs)
    session = ort.InferenceSession(
        str(STORE / "fashion-edge" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (expected,) = session.run(["logits"], {"image": apply_view("hflip", images)})
    np.testing.assert_allclose(flipped, expected, atol=1e-5)
    # The features the router computes from the reply are training's (same code).
    features = router_features(softmax(logits), images, {"hflip": softmax(flipped)})
    one = router_features(softmax(logits[:1]), images[:1], {"hflip": softmax(flipped[:1])})
    np.testing.assert_allclose(one[0], features[0], rtol=1e-5, atol=1e-6)
    # Without views, the reply is what it always was.
    plain = await running_edge.stub.Infer(edge_request(images), timeout=10)
    assert [tensor.name for tensor in plain.outputs] == ["logits"]


async def test_an_unknown_view_is_invalid_argument(running_edge: RunningEdge) -> None:
    request = edge_request(load_split("test").images[:1])
    request.views.append("rotate")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await running_edge.stub.Infer(request, timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rotate" in (raised.value.details() or "")


def test_an_unknown_view_name_is_echoed_cut_short() -> None:
    """A 10 KB view name (the fuzz test found it echoed whole) is cut to 128 characters."""
    import pytest

    from services.views import UnknownViewError, apply_view

    with pytest.raises(UnknownViewError) as raised:
        apply_view("é" * 10_000, np.zeros((1, 1, 2, 2), dtype=np.uint8))
    assert len(str(raised.value)) < 300
