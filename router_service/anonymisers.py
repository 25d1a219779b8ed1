"""Anonymisers: what runs on INTERNAL data before it leaves the site.

Each takes the request's input tensor and returns the tensor to upload. Request
attributes (device id, location, ...) never reach the cloud: the cloud's InferRequest has
no field for them, so every anonymiser strips them by construction; ``strip-attributes``
does only that. ``face-blur`` also finds faces in images with OpenCV's bundled Haar
cascade and blurs them beyond recognition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from hybridmesh.common.v1 import tensor_pb2
from services.tensors import DATATYPE_TO_NUMPY, encode_tensor

FACE_CASCADE = "haarcascade_frontalface_default.xml"
# Faces smaller than this are not recognisable either; smaller windows cost time and
# produce false positives on texture.
MIN_FACE_PX = 24


@dataclass(frozen=True)
class Anonymised:
    tensor: tensor_pb2.Tensor
    # What was changed, for the audit log (e.g. faces blurred).
    regions_blurred: int = 0


Anonymiser = Callable[[tensor_pb2.Tensor], Anonymised]


def strip_attributes(tensor: tensor_pb2.Tensor) -> Anonymised:
    return Anonymised(tensor)


@cache
def _face_detector() -> cv2.CascadeClassifier:
    detector = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / FACE_CASCADE))  # type: ignore[attr-defined]
    if detector.empty():
        raise RuntimeError(f"OpenCV's {FACE_CASCADE} could not be loaded")
    return detector


def blur_faces(image: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.uint8], int]:
    """One image, HxW (gray) or HxWx3 (RGB/BGR): the image with every detected face
    blurred, and how many were found."""
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    faces = _face_detector().detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=5, minSize=(MIN_FACE_PX, MIN_FACE_PX)
    )
    out = image.copy()
    for x, y, w, h in faces:
        region = out[y : y + h, x : x + w]
        # Pixelate then blur: a plain small-kernel blur can leave a face recognisable.
        small = cv2.resize(region, (8, 8), interpolation=cv2.INTER_AREA)
        coarse = cv2.resize(small, (int(w), int(h)), interpolation=cv2.INTER_NEAREST)
        out[y : y + h, x : x + w] = cv2.GaussianBlur(coarse, (0, 0), sigmaX=max(w, h) / 8)
    return out, len(faces)


def face_blur(tensor: tensor_pb2.Tensor) -> Anonymised:
    """A batch of UINT8 images [N, H, W] or [N, H, W, 3]: faces blurred in each."""
    if tensor.datatype != tensor_pb2.DATA_TYPE_UINT8 or len(tensor.shape) not in (3, 4):
        raise ValueError("face-blur takes UINT8 images shaped [N, H, W] or [N, H, W, 3]")
    dtype = DATATYPE_TO_NUMPY[tensor.datatype]
    images = np.frombuffer(tensor.raw_contents, dtype=dtype).reshape(list(tensor.shape))
    blurred, found = [], 0
    for image in images:
        anonymised, count = blur_faces(np.ascontiguousarray(image))
        blurred.append(anonymised)
        found += count
    return Anonymised(encode_tensor(tensor.name, np.stack(blurred)), regions_blurred=found)


ANONYMISERS: dict[str, Anonymiser] = {
    "strip-attributes": strip_attributes,
    "face-blur": face_blur,
}


def anonymiser(name: str) -> Anonymiser:
    found = ANONYMISERS.get(name)
    if found is None:
        raise ValueError(f"unknown anonymiser {name!r}; known: {sorted(ANONYMISERS)}")
    return found
