"""The model pair catalog (models/catalog.toml): pair name -> edge model, cloud model."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workload.model_store import (
    KSERVE_DATATYPES,
    OUTPUT_KINDS,
    ModelManifest,
    ModelStoreError,
    TensorEntry,
)


class CatalogError(Exception):
    """The catalog is missing, malformed, or disagrees with the model store."""


@dataclass(frozen=True)
class ModelPair:
    name: str
    edge_model: str
    cloud_model: str
    input: TensorEntry
    output: TensorEntry
    output_kind: str
    anonymiser: str

    def check_against(self, manifest: ModelManifest) -> None:
        """Raise CatalogError unless ``manifest`` honours this pair's tensor contract."""
        if self.input not in manifest.inputs:
            raise CatalogError(
                f"pair {self.name}: {manifest.name} v{manifest.version} has inputs "
                f"{manifest.inputs}, the catalog says {self.input}"
            )
        if self.output not in manifest.outputs or manifest.output_kind != self.output_kind:
            raise CatalogError(
                f"pair {self.name}: {manifest.name} v{manifest.version} outputs "
                f"{manifest.outputs} ({manifest.output_kind}), the catalog says "
                f"{self.output} ({self.output_kind})"
            )


def _tensor(raw: Any, where: str) -> TensorEntry:
    try:
        entry = TensorEntry(
            str(raw["name"]), str(raw["datatype"]), tuple(int(d) for d in raw["shape"])
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CatalogError(f"{where}: needs name, datatype and shape ({error!r})") from error
    if entry.datatype not in KSERVE_DATATYPES:
        raise CatalogError(f"{where}: unknown datatype {entry.datatype!r}")
    return entry


def load_catalog(path: Path) -> dict[str, ModelPair]:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise CatalogError(f"{path}: {error}") from error
    pairs = {}
    for name, entry in raw.get("pairs", {}).items():
        where = f"{path}: pairs.{name}"
        try:
            pair = ModelPair(
                name=name,
                edge_model=str(entry["edge_model"]),
                cloud_model=str(entry["cloud_model"]),
                input=_tensor(entry["input"], f"{where}.input"),
                output=_tensor(entry["output"], f"{where}.output"),
                output_kind=str(entry.get("output_kind", "logits")),
                anonymiser=str(entry.get("anonymiser", "strip-attributes")),
            )
        except KeyError as error:
            raise CatalogError(f"{where}: missing {error}") from error
        if pair.output_kind not in OUTPUT_KINDS:
            raise CatalogError(f"{where}: output_kind must be one of {sorted(OUTPUT_KINDS)}")
        pairs[name] = pair
    if not pairs:
        raise CatalogError(f"{path}: no [pairs.<name>] entries")
    return pairs


__all__ = ["CatalogError", "ModelPair", "ModelStoreError", "load_catalog"]
