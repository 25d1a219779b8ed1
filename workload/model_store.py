"""The edge model store: a self-describing, verifiable directory per model version.

Layout: ``<store>/<name>/<version>/manifest.json`` plus the files it lists (the ONNX
model). The manifest carries the sha256 of every file, the input/output contract, the
labels and the provenance, so a version directory is the unit that over-the-air updates
ship and verify. A detached signature (``manifest.sig``) is added by the registry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
MANIFEST_SCHEMA = "hybridmesh.model-manifest/v1"
KSERVE_DATATYPES = frozenset(
    {"BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"}
)
OUTPUT_KINDS = frozenset({"logits", "probabilities"})


class ModelStoreError(Exception):
    """A model version is missing, malformed, or does not match its manifest."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    datatype: str  # KServe v2 name, e.g. "UINT8"
    shape: tuple[int, ...]  # -1 for a dynamic dimension


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: int
    task: str
    model_file: str
    files: tuple[FileEntry, ...]
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    labels: tuple[str, ...]
    output_kind: str
    max_batch_size: int
    preprocessing: str
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    @property
    def model_sha256(self) -> str:
        return next(f.sha256 for f in self.files if f.path == self.model_file)

    def to_json(self) -> str:
        document = {"schema": MANIFEST_SCHEMA, **asdict(self)}
        return json.dumps(document, indent=2, sort_keys=True) + "\n"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensors(raw: Any, where: str) -> tuple[TensorEntry, ...]:
    entries = []
    for item in raw:
        if item["datatype"] not in KSERVE_DATATYPES:
            raise ModelStoreError(f"{where}: unknown datatype {item['datatype']!r}")
        entries.append(TensorEntry(item["name"], item["datatype"], tuple(item["shape"])))
    return tuple(entries)


def parse_manifest(text: str, where: str = "manifest") -> ModelManifest:
    try:
        raw = json.loads(text)
        if raw.get("schema") != MANIFEST_SCHEMA:
            raise ModelStoreError(f"{where}: schema {raw.get('schema')!r} is not {MANIFEST_SCHEMA}")
        manifest = ModelManifest(
            name=raw["name"],
            version=int(raw["version"]),
            task=raw["task"],
            model_file=raw["model_file"],
            files=tuple(
                FileEntry(f["path"], f["sha256"], int(f["size_bytes"])) for f in raw["files"]
            ),
            inputs=_tensors(raw["inputs"], where),
            outputs=_tensors(raw["outputs"], where),
            labels=tuple(raw["labels"]),
            output_kind=raw["output_kind"],
            max_batch_size=int(raw["max_batch_size"]),
            preprocessing=raw["preprocessing"],
            metrics=dict(raw.get("metrics", {})),
            provenance=dict(raw.get("provenance", {})),
            created=raw.get("created", ""),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ModelStoreError(f"{where}: malformed manifest ({error!r})") from error
    if manifest.output_kind not in OUTPUT_KINDS:
        raise ModelStoreError(f"{where}: output_kind must be one of {sorted(OUTPUT_KINDS)}")
    if manifest.model_file not in {f.path for f in manifest.files}:
        raise ModelStoreError(f"{where}: model_file {manifest.model_file!r} is not listed in files")
    return manifest


def load_verified(version_dir: Path) -> ModelManifest:
    """Read a version's manifest and check every listed file's size and sha256."""
    manifest_path = version_dir / MANIFEST_FILE
    try:
        manifest = parse_manifest(manifest_path.read_text(), str(manifest_path))
    except OSError as error:
        raise ModelStoreError(f"{manifest_path}: {error}") from error
    if version_dir.name != str(manifest.version) or version_dir.parent.name != manifest.name:
        raise ModelStoreError(
            f"{version_dir}: directory does not match manifest {manifest.name}/{manifest.version}"
        )
    for entry in manifest.files:
        path = version_dir / entry.path
        if not path.is_file():
            raise ModelStoreError(f"{path}: listed in the manifest but missing")
        actual = sha256_of(path)
        if actual != entry.sha256 or path.stat().st_size != entry.size_bytes:
            raise ModelStoreError(f"{path}: sha256 {actual} does not match manifest {entry.sha256}")
    return manifest


def versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest_versions(store: Path) -> list[Path]:
    """The newest version directory of every model in the store."""
    if not store.is_dir():
        raise ModelStoreError(f"{store}: model store not found")
    latest = []
    for model_dir in sorted(p for p in store.iterdir() if p.is_dir()):
        found = versions(model_dir)
        if found:
            latest.append(model_dir / str(found[-1]))
    return latest


def write_version(store: Path, manifest: ModelManifest, files: dict[str, bytes]) -> Path:
    """Write ``files`` and a manifest listing their hashes; returns the version directory."""
    version_dir = store / manifest.name / str(manifest.version)
    version_dir.mkdir(parents=True, exist_ok=False)
    entries = []
    for relative, content in sorted(files.items()):
        (version_dir / relative).write_bytes(content)
        entries.append(FileEntry(relative, hashlib.sha256(content).hexdigest(), len(content)))
    # Through the parser, so a writer can never produce a manifest a reader refuses.
    checked = parse_manifest(_manifest_json(manifest, entries))
    (version_dir / MANIFEST_FILE).write_text(checked.to_json())
    load_verified(version_dir)
    return version_dir


def _manifest_json(manifest: ModelManifest, files: list[FileEntry]) -> str:
    document = {"schema": MANIFEST_SCHEMA, **asdict(manifest)}
    document["files"] = [asdict(entry) for entry in files]
    return json.dumps(document, indent=2, sort_keys=True)
