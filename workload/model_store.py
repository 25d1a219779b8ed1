"""The edge model store: a self-describing, verifiable directory per model version.

Layout: ``<store>/<name>/<version>/manifest.json`` plus the files it lists (the ONNX
model, its card). The manifest carries the sha256 and size of every file, the
input/output contract, the labels and the provenance, so a version directory is the unit
that over-the-air updates ship and verify. A detached signature of the manifest
(``manifest.sig``, a later issue) sits beside it; since the manifest pins every file's
hash, signing the manifest signs the version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
MANIFEST_SCHEMA = "hybridmesh.model-manifest/v1"
KSERVE_DATATYPES = frozenset(
    {"BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"}
)
OUTPUT_KINDS = frozenset({"logits", "probabilities"})
# Model names become directory names, Triton model names and gRPC fields: keep them plain.
MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ModelStoreError(Exception):
    """A model version is missing, malformed, or does not match its manifest."""


class ManifestError(ModelStoreError):
    """The manifest is unreadable, of another schema, or breaks a rule of this one."""


class ModelIntegrityError(ModelStoreError):
    """A file listed in the manifest is missing or its size or sha256 differs."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    datatype: str  # KServe v2 name, e.g. "UINT8"
    shape: tuple[int, ...]  # -1 for a dynamic dimension


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the version directory, "/"-separated
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


def _tensor(raw: Any, where: str) -> TensorEntry:
    name, datatype, shape = raw["name"], raw["datatype"], raw["shape"]
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{where}: tensor name must be a non-empty string, not {name!r}")
    if datatype not in KSERVE_DATATYPES:
        raise ManifestError(f"{where}: tensor {name}: unknown datatype {datatype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and (d == -1 or d > 0) for d in shape
    ):
        raise ManifestError(f"{where}: tensor {name}: shape {shape!r} needs ints > 0 or -1")
    return TensorEntry(name, datatype, tuple(shape))


def _file(raw: Any, where: str) -> FileEntry:
    entry = FileEntry(str(raw["path"]), str(raw["sha256"]), int(raw["size_bytes"]))
    relative = PurePosixPath(entry.path)
    # The manifest decides which paths get read (and, over the air, written): stay inside.
    if relative.is_absolute() or ".." in relative.parts or "\\" in entry.path:
        raise ManifestError(f"{where}: file path {entry.path!r} leaves the version directory")
    if entry.path in (MANIFEST_FILE, SIGNATURE_FILE):
        raise ManifestError(f"{where}: {entry.path} cannot list itself")
    if not SHA256_HEX.fullmatch(entry.sha256) or entry.size_bytes < 0:
        raise ManifestError(f"{where}: file {entry.path}: bad sha256 or size")
    return entry


def parse_manifest(text: str, where: str = "manifest") -> ModelManifest:
    """Parse and check a manifest's rules (not its files: see ``load_verified``)."""
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.get("schema") != MANIFEST_SCHEMA:
            found = raw.get("schema") if isinstance(raw, dict) else type(raw).__name__
            raise ManifestError(f"{where}: schema {found!r} is not {MANIFEST_SCHEMA}")
        manifest = ModelManifest(
            name=_model_name(raw["name"], where),
            version=_version(raw["version"], where),
            task=str(raw["task"]),
            model_file=raw["model_file"],
            files=tuple(_file(f, where) for f in raw["files"]),
            inputs=tuple(_tensor(t, where) for t in raw["inputs"]),
            outputs=tuple(_tensor(t, where) for t in raw["outputs"]),
            labels=tuple(str(label) for label in raw["labels"]),
            output_kind=raw["output_kind"],
            max_batch_size=int(raw["max_batch_size"]),
            preprocessing=str(raw["preprocessing"]),
            metrics=dict(raw.get("metrics", {})),
            provenance=dict(raw.get("provenance", {})),
            created=str(raw.get("created", "")),
        )
    except (KeyError, TypeError, ValueError) as error:
        # json.JSONDecodeError is a ValueError.
        raise ManifestError(f"{where}: malformed manifest ({error!r})") from error
    _check_rules(manifest, where)
    return manifest


def _model_name(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or not MODEL_NAME.fullmatch(raw):
        raise ManifestError(f"{where}: name {raw!r} must match {MODEL_NAME.pattern}")
    return raw


def _version(raw: Any, where: str) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 1:
        raise ManifestError(f"{where}: version must be an integer >= 1, not {raw!r}")
    return raw


def _check_rules(manifest: ModelManifest, where: str) -> None:
    if not manifest.task:
        raise ManifestError(f"{where}: task must not be empty")
    if manifest.output_kind not in OUTPUT_KINDS:
        raise ManifestError(f"{where}: output_kind must be one of {sorted(OUTPUT_KINDS)}")
    paths = [f.path for f in manifest.files]
    if len(set(paths)) != len(paths):
        raise ManifestError(f"{where}: files lists a path twice: {paths}")
    if manifest.model_file not in paths:
        raise ManifestError(f"{where}: model_file {manifest.model_file!r} is not listed in files")
    if not manifest.inputs or not manifest.outputs:
        raise ManifestError(f"{where}: needs at least one input and one output tensor")
    if manifest.max_batch_size < 0:
        raise ManifestError(f"{where}: max_batch_size must be >= 0")


def load_verified(version_dir: Path) -> ModelManifest:
    """Read a version's manifest and check every listed file's size and sha256."""
    manifest_path = version_dir / MANIFEST_FILE
    try:
        text = manifest_path.read_text()
    except OSError as error:
        raise ManifestError(f"{manifest_path}: {error}") from error
    manifest = parse_manifest(text, str(manifest_path))
    if version_dir.name != str(manifest.version) or version_dir.parent.name != manifest.name:
        raise ManifestError(
            f"{version_dir}: directory does not match manifest {manifest.name}/{manifest.version}"
        )
    for entry in manifest.files:
        path = version_dir / entry.path
        if not path.is_file():
            raise ModelIntegrityError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry.size_bytes:
            raise ModelIntegrityError(
                f"{path}: size {size} bytes does not match manifest {entry.size_bytes}"
            )
        actual = sha256_of(path)
        if actual != entry.sha256:
            raise ModelIntegrityError(
                f"{path}: sha256 {actual} does not match manifest {entry.sha256}"
            )
    return manifest


def versions(model_dir: Path) -> list[int]:
    """The version numbers under a model directory, ascending (none if it is missing)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest_versions(store: Path) -> list[Path]:
    """The newest version directory of every model in the store, by model name."""
    if not store.is_dir():
        raise ModelStoreError(f"{store}: model store not found")
    latest = []
    for model_dir in sorted(p for p in store.iterdir() if p.is_dir()):
        found = versions(model_dir)
        if found:
            latest.append(model_dir / str(found[-1]))
    return latest


def write_version(store: Path, manifest: ModelManifest, files: dict[str, bytes]) -> Path:
    """Write ``files`` and a manifest listing their hashes; returns the version directory.

    ``manifest.files`` is ignored: it is computed from ``files``. The version must be
    newer than every version already in the store (versions only go up), and the
    directory appears complete or not at all: it is staged beside its final place and
    renamed, so a reader never sees half a version.
    """
    model_dir = store / manifest.name
    existing = versions(model_dir)
    if existing and manifest.version <= existing[-1]:
        raise ModelStoreError(
            f"{model_dir}: version {manifest.version} is not newer than {existing[-1]}"
        )
    entries = [
        FileEntry(relative, hashlib.sha256(content).hexdigest(), len(content))
        for relative, content in sorted(files.items())
    ]
    # Through the parser, so a writer can never produce a manifest a reader refuses.
    checked = parse_manifest(_manifest_json(manifest, entries), f"{manifest.name} (writing)")
    model_dir.mkdir(parents=True, exist_ok=True)
    # A dot-name that is not all digits: versions() and latest_versions() never see it.
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{manifest.version}-", dir=model_dir))
    try:
        staging.chmod(0o755)  # mkdtemp makes it 0700; a store is read by other users
        for relative, content in files.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        (staging / MANIFEST_FILE).write_text(checked.to_json())
        version_dir = model_dir / str(manifest.version)
        staging.rename(version_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    load_verified(version_dir)
    return version_dir


def _manifest_json(manifest: ModelManifest, files: list[FileEntry]) -> str:
    document = {"schema": MANIFEST_SCHEMA, **asdict(manifest)}
    document["files"] = [asdict(entry) for entry in files]
    return json.dumps(document, indent=2, sort_keys=True)


def derive_version(
    source: Path, store: Path, version: int, model_bytes: bytes | None = None
) -> Path:
    """A new version in ``store`` made from the verified version at ``source``: same
    contract, labels and card, the given model bytes (or the same ones)."""
    manifest = load_verified(source)
    files = {entry.path: (source / entry.path).read_bytes() for entry in manifest.files}
    if model_bytes is not None:
        files[manifest.model_file] = model_bytes
    return write_version(store, dataclasses.replace(manifest, version=version), files)
