"""The model pair catalog (models/catalog.toml): pair name -> edge model, cloud model.

A pair is what a client asks for; the catalog names its two models and the tensor
contract they share. The models' own manifests stay the source of labels, versions and
hashes; ``check_against_store`` proves each pair's models exist and honour the contract.
Usage: ``python -m workload.catalog [--catalog models/catalog.toml] [--store models/store]``
checks the catalog against the store and lists the pairs.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.views import MIN_RANK, VIEWS
from workload.model_store import (
    KSERVE_DATATYPES,
    OUTPUT_KINDS,
    ModelManifest,
    ModelStoreError,
    TensorEntry,
    load_verified,
    versions,
)

__all__ = [
    "CatalogError",
    "DataSource",
    "ModelPair",
    "ModelStoreError",
    "check_against_store",
    "load_catalog",
]

PAIR_KEYS = frozenset(
    {"edge_model", "cloud_model", "input", "output", "output_kind", "anonymiser", "data", "views"}
)
DATA_KEYS = frozenset({"loader", "npz", "seed", "router_train", "calibration"})
# The built-in labelled data sets (workload.pair_data.BUILTIN_LOADERS).
BUILTIN_LOADERS = frozenset({"fashion-mnist"})
DEFAULT_DATA_SEED = 20260611
DEFAULT_FRACTIONS = (0.4, 0.3)  # router-train, calibration; the rest is the test split


@dataclass(frozen=True)
class DataSource:
    """Where a pair's labelled data comes from (the router policy's training data).

    Either a built-in ``loader`` (e.g. ``fashion-mnist``: its own fixed splits), or an
    ``npz`` file with ``inputs`` (the pair's input dtype and shape) and integer
    ``labels``, cut by one permutation seeded with ``seed`` into disjoint router-train,
    calibration and test splits (``router_train`` and ``calibration`` are fractions;
    the test split is the rest). A relative ``npz`` path is relative to the catalog file.
    """

    loader: str | None = None
    npz: Path | None = None
    seed: int = DEFAULT_DATA_SEED
    fractions: tuple[float, float] = DEFAULT_FRACTIONS


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
    # None: the pair declares no labelled data (no router policy can be trained for it).
    data: DataSource | None = None
    # Label-preserving test-time views (services.views) the edge tier runs too, whose
    # outputs are router features; () for a pair without such a transform.
    views: tuple[str, ...] = ()

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


def _data(raw: Any, where: str, base: Path) -> DataSource:
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: must be a table")
    unknown = sorted(set(raw) - DATA_KEYS)
    if unknown:
        raise CatalogError(f"{where}: unknown keys {unknown}; known: {sorted(DATA_KEYS)}")
    if ("loader" in raw) == ("npz" in raw):
        raise CatalogError(f"{where}: needs exactly one of loader (built-in) or npz (a file)")
    if "loader" in raw:
        if raw["loader"] not in BUILTIN_LOADERS:
            raise CatalogError(
                f"{where}: unknown loader {raw['loader']!r}; built-in: {sorted(BUILTIN_LOADERS)}"
            )
        extra = sorted(set(raw) - {"loader"})
        if extra:
            raise CatalogError(f"{where}: {extra} apply to npz data only")
        return DataSource(loader=str(raw["loader"]))
    try:
        seed = int(raw.get("seed", DEFAULT_DATA_SEED))
        fractions = (
            float(raw.get("router_train", DEFAULT_FRACTIONS[0])),
            float(raw.get("calibration", DEFAULT_FRACTIONS[1])),
        )
    except (TypeError, ValueError) as error:
        raise CatalogError(f"{where}: {error}") from error
    if not all(0.0 < f < 1.0 for f in fractions) or sum(fractions) >= 1.0:
        raise CatalogError(
            f"{where}: router_train and calibration must be fractions in (0, 1) that leave "
            "a test split (sum < 1)"
        )
    path = Path(str(raw["npz"]))
    return DataSource(
        npz=path if path.is_absolute() else base / path, seed=seed, fractions=fractions
    )


def _pair(name: str, entry: Any, where: str, base: Path = Path(".")) -> ModelPair:
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: must be a table")
    # A misspelt optional key would silently fall back to its default: refuse it.
    unknown = sorted(set(entry) - PAIR_KEYS)
    if unknown:
        raise CatalogError(f"{where}: unknown keys {unknown}; known: {sorted(PAIR_KEYS)}")
    try:
        pair = ModelPair(
            name=name,
            edge_model=str(entry["edge_model"]),
            cloud_model=str(entry["cloud_model"]),
            input=_tensor(entry["input"], f"{where}.input"),
            output=_tensor(entry["output"], f"{where}.output"),
            output_kind=str(entry.get("output_kind", "logits")),
            anonymiser=str(entry.get("anonymiser", "strip-attributes")),
            data=_data(entry["data"], f"{where}.data", base) if "data" in entry else None,
            views=_views(entry.get("views", []), f"{where}.views"),
        )
    except KeyError as error:
        raise CatalogError(f"{where}: missing {error}") from error
    if pair.output_kind not in OUTPUT_KINDS:
        raise CatalogError(f"{where}: output_kind must be one of {sorted(OUTPUT_KINDS)}")
    for view in pair.views:
        if len(pair.input.shape) < MIN_RANK[view]:
            raise CatalogError(
                f"{where}.views: {view!r} needs an input of rank >= {MIN_RANK[view]}; "
                f"{pair.input.name} is {list(pair.input.shape)}"
            )
    return pair


def _views(raw: Any, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(view, str) for view in raw):
        raise CatalogError(f"{where}: must be a list of view names")
    unknown = sorted(set(raw) - set(VIEWS))
    if unknown or len(set(raw)) != len(raw):
        raise CatalogError(f"{where}: unknown or repeated views {raw}; known: {sorted(VIEWS)}")
    return tuple(raw)


def load_catalog(path: Path) -> dict[str, ModelPair]:
    """Every pair in the catalog, by name. Raises CatalogError naming the bad entry."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as error:
        raise CatalogError(f"{path}: {error.strerror or error}") from error
    except tomllib.TOMLDecodeError as error:
        raise CatalogError(f"{path}: not valid TOML ({error})") from error
    tables = raw.get("pairs", {})
    if not isinstance(tables, dict):
        raise CatalogError(f"{path}: pairs must be a table of [pairs.<name>] tables")
    pairs = {
        name: _pair(name, entry, f"{path}: pairs.{name}", path.parent)
        for name, entry in tables.items()
    }
    if not pairs:
        raise CatalogError(f"{path}: no [pairs.<name>] entries")
    return pairs


def check_against_store(pairs: dict[str, ModelPair], store: Path) -> dict[str, ModelManifest]:
    """Verify the newest version of every model the pairs name; returns them by name."""
    manifests: dict[str, ModelManifest] = {}
    for pair in pairs.values():
        for model in (pair.edge_model, pair.cloud_model):
            if model not in manifests:
                found = versions(store / model)
                if not found:
                    raise CatalogError(f"pair {pair.name}: no versions of {model} in {store}")
                try:
                    manifests[model] = load_verified(store / model / str(found[-1]))
                except ModelStoreError as error:
                    raise CatalogError(f"pair {pair.name}: {error}") from error
            pair.check_against(manifests[model])
    return manifests


def _describe(data: DataSource | None) -> str:
    if data is None:
        return "none declared"
    return f"loader {data.loader}" if data.loader else f"npz {data.npz} (seed {data.seed})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--catalog", type=Path, default=Path("models/catalog.toml"))
    parser.add_argument("--store", type=Path, default=Path("models/store"))
    arguments = parser.parse_args()
    try:
        pairs = load_catalog(arguments.catalog)
        manifests = check_against_store(pairs, arguments.store)
    except CatalogError as error:
        sys.stderr.write(f"catalog check failed: {error}\n")
        raise SystemExit(1) from error
    for pair in pairs.values():
        edge, cloud = manifests[pair.edge_model], manifests[pair.cloud_model]
        sys.stdout.write(
            f"{pair.name}: edge {edge.name} v{edge.version}, cloud {cloud.name} v{cloud.version}"
            f", input {pair.input.name} {pair.input.datatype} {list(pair.input.shape)}"
            f", data {_describe(pair.data)}\n"
        )


if __name__ == "__main__":
    main()
