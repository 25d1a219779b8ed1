"""Tensor contract <-> numpy, with validation that names the offending field.

Shared by every tier: the edge node decodes what the router sends, the cloud service
decodes what arrives over the WAN, and the router re-encodes for the next hop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from hybridmesh.common.v1 import tensor_pb2
from services.errors import InvalidArgumentError, clip
from services.validation import check_enum, enum_name

DataTypeValue: TypeAlias = tensor_pb2.DataType.ValueType

DATATYPE_TO_NUMPY: dict[DataTypeValue, np.dtype[np.generic]] = {
    tensor_pb2.DATA_TYPE_BOOL: np.dtype(np.bool_),
    tensor_pb2.DATA_TYPE_UINT8: np.dtype(np.uint8),
    tensor_pb2.DATA_TYPE_INT8: np.dtype(np.int8),
    tensor_pb2.DATA_TYPE_INT16: np.dtype("<i2"),
    tensor_pb2.DATA_TYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DATA_TYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DATA_TYPE_FP16: np.dtype("<f2"),
    tensor_pb2.DATA_TYPE_FP32: np.dtype("<f4"),
    tensor_pb2.DATA_TYPE_FP64: np.dtype("<f8"),
}

# KServe v2 / Triton datatype strings, as used in model manifests and by tritonclient.
KSERVE_NAMES: dict[DataTypeValue, str] = {
    tensor_pb2.DATA_TYPE_BOOL: "BOOL",
    tensor_pb2.DATA_TYPE_UINT8: "UINT8",
    tensor_pb2.DATA_TYPE_INT8: "INT8",
    tensor_pb2.DATA_TYPE_INT16: "INT16",
    tensor_pb2.DATA_TYPE_INT32: "INT32",
    tensor_pb2.DATA_TYPE_INT64: "INT64",
    tensor_pb2.DATA_TYPE_FP16: "FP16",
    tensor_pb2.DATA_TYPE_FP32: "FP32",
    tensor_pb2.DATA_TYPE_FP64: "FP64",
}
DATATYPE_BY_KSERVE_NAME: dict[str, DataTypeValue] = {name: dt for dt, name in KSERVE_NAMES.items()}


def datatype_name(datatype: DataTypeValue) -> str:
    """KServe name, else the contract's name, else the number (never raises)."""
    return KSERVE_NAMES.get(datatype) or enum_name(tensor_pb2.DataType.DESCRIPTOR, datatype)


@dataclass(frozen=True)
class InputSpec:
    """One input a model takes: -1 in ``shape`` is a dynamic dimension."""

    datatype: DataTypeValue
    shape: Sequence[int]


def decode_inputs(
    inputs: Sequence[tensor_pb2.Tensor],
    specs: Mapping[str, InputSpec],
    *,
    model: str,
    max_batch_size: int,
    max_payload_bytes: int,
    field: str = "inputs",
) -> dict[str, npt.NDArray[np.generic]]:
    """Validate a request's input tensors against a model's inputs and decode them.

    The one path every tier takes for what a caller sends: payload bound, each tensor
    named once and known, datatype/shape/bytes per ``decode_tensor``, nothing missing,
    one batch size. Every error names the field.
    """
    payload = sum(len(tensor.raw_contents) for tensor in inputs)
    if payload > max_payload_bytes:
        raise InvalidArgumentError(
            f"payload of {payload} bytes exceeds the limit of {max_payload_bytes}", field=field
        )
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    for index, tensor in enumerate(inputs):
        where = f"{field}[{index}]"
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidArgumentError(
                f"unknown input {clip(tensor.name)!r}; {model} takes {sorted(specs)}",
                field=f"{where}.name",
            )
        if tensor.name in arrays:
            raise InvalidArgumentError(
                f"input {clip(tensor.name)!r} given twice", field=f"{where}.name"
            )
        arrays[tensor.name] = decode_tensor(
            tensor,
            where,
            expected_datatype=spec.datatype,
            expected_shape=spec.shape,
            max_batch_size=max_batch_size,
        )
    missing = sorted(set(specs) - set(arrays))
    if missing:
        raise InvalidArgumentError(f"missing input(s) {missing}", field=field)
    batch_sizes = {array.shape[0] for array in arrays.values()}
    if len(batch_sizes) > 1:
        raise InvalidArgumentError(
            f"inputs disagree on the batch size: {sorted(batch_sizes)}", field=field
        )
    return arrays


def decode_tensor(
    tensor: tensor_pb2.Tensor,
    field: str,
    *,
    expected_datatype: DataTypeValue,
    expected_shape: Sequence[int],
    max_batch_size: int,
) -> npt.NDArray[np.generic]:
    """Validate ``tensor`` against a spec (-1 = any size) and return it as an array.

    Every check names the field so the caller knows exactly what to fix.
    """
    check_enum(tensor.datatype, tensor_pb2.DataType.DESCRIPTOR, f"{field}.datatype")
    if tensor.datatype != expected_datatype:
        raise InvalidArgumentError(
            f"expected datatype {datatype_name(expected_datatype)}, "
            f"got {datatype_name(tensor.datatype)}",
            field=f"{field}.datatype",
        )
    shape = list(tensor.shape)
    if len(shape) != len(expected_shape):
        raise InvalidArgumentError(
            f"expected rank {len(expected_shape)} shape {_spec(expected_shape)}, "
            f"got rank {len(shape)} {shape}",
            field=f"{field}.shape",
        )
    for axis, (got, want) in enumerate(zip(shape, expected_shape, strict=True)):
        if got <= 0 or want not in (-1, got):
            raise InvalidArgumentError(
                f"dimension {axis} is {got}, expected {_spec(expected_shape)}",
                field=f"{field}.shape",
            )
    if shape[0] > max_batch_size:
        raise InvalidArgumentError(
            f"batch size {shape[0]} exceeds the limit of {max_batch_size}",
            field=f"{field}.shape",
        )
    dtype = DATATYPE_TO_NUMPY[expected_datatype]
    # math.prod on Python ints: a hostile shape cannot overflow into a small number.
    expected_bytes = math.prod(shape) * dtype.itemsize
    if len(tensor.raw_contents) != expected_bytes:
        raise InvalidArgumentError(
            f"expected {expected_bytes} bytes for shape {shape} of "
            f"{datatype_name(expected_datatype)}, got {len(tensor.raw_contents)}",
            field=f"{field}.raw_contents",
        )
    return np.frombuffer(tensor.raw_contents, dtype=dtype).reshape(shape)


def encode_tensor(name: str, array: npt.NDArray[np.generic]) -> tensor_pb2.Tensor:
    """Array -> Tensor (little-endian, C order)."""
    for datatype, dtype in DATATYPE_TO_NUMPY.items():
        if array.dtype == dtype or array.dtype == dtype.newbyteorder("="):
            contiguous = np.ascontiguousarray(array, dtype=dtype)
            return tensor_pb2.Tensor(
                name=name,
                datatype=datatype,
                shape=list(array.shape),
                raw_contents=contiguous.tobytes(),
            )
    raise TypeError(f"no contract datatype for numpy dtype {array.dtype}")


def _spec(shape: Sequence[int]) -> str:
    return "[" + ",".join("n" if dim == -1 else str(dim) for dim in shape) + "]"
