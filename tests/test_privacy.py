"""Anonymisers on real data: OpenCV's Haar cascade finds the face in a real photograph
(Grace Hopper, shipped offline inside matplotlib) and the face-blur anonymiser leaves
nothing the detector can find, while the rest of the image is untouched."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from hybridmesh.common.v1 import tensor_pb2
from router_service.anonymisers import _face_detector, anonymiser, blur_faces, face_blur
from router_service.app import RouterNode, pairs_from_catalog
from services.telemetry import create_telemetry
from services.tensors import encode_tensor
from tests.helpers.photos import photo
from tests.helpers.router_node import router_settings


def faces(image: npt.NDArray[np.uint8]) -> list[tuple[int, int, int, int]]:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    found = _face_detector().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=3)
    return [tuple(int(v) for v in box) for box in found]  # type: ignore[misc]


def test_the_face_in_a_real_photo_is_found_and_blurred_beyond_detection() -> None:
    image = photo()
    before = faces(image)
    assert len(before) == 1  # the detector works on this photo
    blurred, count = blur_faces(image)
    assert count == 1
    # Looser detector settings than the anonymiser's still find nothing afterwards.
    assert faces(blurred) == []
    x, y, w, h = before[0]
    # Outside the face (with a margin: the anonymiser's own box, found with stricter
    # settings, may differ a little from this one) the image is byte for byte the same.
    around = np.zeros(image.shape[:2], dtype=bool)
    around[max(y - h // 4, 0) : y + h + h // 4, max(x - w // 4, 0) : x + w + w // 4] = True
    assert np.array_equal(blurred[~around], image[~around])
    # Inside it the detail is gone: far less local contrast than before.
    face = np.s_[y : y + h, x : x + w]
    assert detail(blurred[face]) < detail(image[face]) / 4


def detail(region: npt.NDArray[np.uint8]) -> float:
    """Mean absolute difference between horizontal neighbours."""
    return float(np.abs(np.diff(region.astype(np.int16), axis=1)).mean())


def test_face_blur_anonymises_a_batch_of_images_and_keeps_the_contract() -> None:
    image = photo()
    batch = np.stack([image, np.ascontiguousarray(image[:, ::-1])])
    result = face_blur(encode_tensor("image", batch))
    assert result.regions_blurred == 2
    assert list(result.tensor.shape) == list(batch.shape)
    assert result.tensor.datatype == tensor_pb2.DATA_TYPE_UINT8
    sent = np.frombuffer(result.tensor.raw_contents, dtype=np.uint8).reshape(batch.shape)
    assert faces(np.ascontiguousarray(sent[0])) == []
    assert faces(np.ascontiguousarray(sent[1])) == []
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[None]
    assert face_blur(encode_tensor("image", gray)).regions_blurred == 1


def test_face_blur_refuses_what_is_not_an_image_and_unknown_names_fail() -> None:
    with pytest.raises(ValueError, match="UINT8"):
        face_blur(encode_tensor("x", np.zeros((1, 4, 4), dtype=np.float32)))
    with pytest.raises(ValueError, match="unknown anonymiser"):
        anonymiser("hash-everything")
    plain = encode_tensor("image", np.zeros((1, 1, 28, 28), dtype=np.uint8))
    assert anonymiser("strip-attributes")(plain).tensor == plain


def test_a_pair_with_an_unknown_anonymiser_stops_the_router(tmp_path: Path) -> None:
    settings = router_settings("127.0.0.1:1", "127.0.0.1:2", outbox_path=tmp_path / "o.sqlite")
    pair = replace(pairs_from_catalog(settings.catalog)[0], anonymiser="hash-everything")
    with pytest.raises(ValueError, match="unknown anonymiser"):
        RouterNode(settings, create_telemetry("router", export_otlp=False), [pair])
