"""The models an edge node serves: verified store entries with open onnxruntime sessions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from hybridmesh.common.v1 import model_pb2, tensor_pb2
from services.errors import InvalidArgumentError, NotFoundError, clip
from services.tensors import DATATYPE_BY_KSERVE_NAME, DataTypeValue
from workload.model_store import ModelManifest, ModelStoreError, latest_versions, load_verified


@dataclass(frozen=True)
class TensorSpecification:
    name: str
    datatype: DataTypeValue
    shape: tuple[int, ...]

    def to_proto(self) -> tensor_pb2.TensorSpec:
        return tensor_pb2.TensorSpec(name=self.name, datatype=self.datatype, shape=self.shape)


class LoadedModel:
    """One model version with its onnxruntime session."""

    def __init__(self, manifest: ModelManifest, directory: Path, intra_op_threads: int) -> None:
        self.manifest = manifest
        self.name = manifest.name
        self.version = str(manifest.version)
        self.labels = tuple(manifest.labels)
        self.sha256 = manifest.model_sha256
        self.inputs = tuple(
            TensorSpecification(t.name, DATATYPE_BY_KSERVE_NAME[t.datatype], tuple(t.shape))
            for t in manifest.inputs
        )
        self.outputs = tuple(
            TensorSpecification(t.name, DATATYPE_BY_KSERVE_NAME[t.datatype], tuple(t.shape))
            for t in manifest.outputs
        )
        self.classification_output = manifest.outputs[0].name
        self.outputs_probabilities = manifest.output_kind == "probabilities"
        self.max_batch_size = manifest.max_batch_size
        # Unknown latency counts as slow: it goes to a worker thread.
        self.compute_us = float(manifest.metrics.get("latency_us_batch1_median", float("inf")))
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(directory / manifest.model_file), options, providers=["CPUExecutionProvider"]
        )
        self._output_names = [spec.name for spec in self.outputs]

    def run(
        self, inputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.float32]]:
        """Blocking session run; call through asyncio.to_thread."""
        values = self._session.run(self._output_names, dict(inputs))
        return dict(zip(self._output_names, values, strict=True))

    def info(self) -> model_pb2.ModelInfo:
        return model_pb2.ModelInfo(
            model=model_pb2.ModelRef(name=self.name, version=self.version),
            inputs=[spec.to_proto() for spec in self.inputs],
            outputs=[spec.to_proto() for spec in self.outputs],
            labels=self.labels,
            sha256=self.sha256,
            max_batch_size=self.max_batch_size,
            ready=True,
        )


class LocalModels:
    """Name -> the version being served."""

    def __init__(self, models: Iterable[LoadedModel]) -> None:
        self._by_name = {model.name: model for model in models}

    @classmethod
    def load(
        cls, store: Path, intra_op_threads: int, served_models: Sequence[str] = ()
    ) -> LocalModels:
        """Load and verify (sha256) the newest version of each served model in the store."""
        directories = [
            directory
            for directory in latest_versions(store)
            if not served_models or directory.parent.name in served_models
        ]
        missing = set(served_models) - {directory.parent.name for directory in directories}
        if missing:
            raise ModelStoreError(f"{store}: no versions of {sorted(missing)}")
        return cls(
            LoadedModel(load_verified(directory), directory, intra_op_threads)
            for directory in directories
        )

    def resolve(self, ref: model_pb2.ModelRef) -> LoadedModel:
        if not ref.name:
            raise InvalidArgumentError("required", field="model.name")
        model = self._by_name.get(ref.name)
        if model is None:
            raise NotFoundError(
                f"no model {clip(ref.name)!r} on this edge node; it has {sorted(self._by_name)}",
                field="model.name",
            )
        if ref.version and ref.version != model.version:
            raise NotFoundError(
                f"{model.name} version {clip(ref.version)!r} is not served; "
                f"serving {model.version}",
                field="model.version",
            )
        return model

    def resolve_name(self, name: str) -> LoadedModel:
        """The version serving under ``name``."""
        return self.resolve(model_pb2.ModelRef(name=name))

    def all(self) -> list[LoadedModel]:
        return list(self._by_name.values())

    def swap(self, model: LoadedModel) -> LoadedModel | None:
        """Serve ``model`` under its name from now on; returns the version it replaced.

        One reference assignment on the event loop: a request that already resolved the
        old version finishes on it (its session stays open until it is dropped), every
        later request gets the new one. No request fails because of a switch.
        """
        previous = self._by_name.get(model.name)
        self._by_name = {**self._by_name, model.name: model}
        return previous
