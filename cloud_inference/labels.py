"""Class labels (and artifact hashes) of the models Triton serves, for the answers.

Two sources, chosen by configuration: the model store's manifest of the exact version
Triton serves (which also gives the artifact's sha256 for ListModels), or the
``labels.txt`` beside each model in a Triton model repository (the file its config's
``label_filename`` names), for models that never went through the store.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from services.logging import get_logger
from workload.model_store import MANIFEST_FILE, ModelStoreError, parse_manifest

_log = get_logger("cloud_inference.labels")
LABELS_FILE = "labels.txt"


@dataclass(frozen=True)
class ModelFacts:
    """What the answers say about one served model version beyond Triton's metadata."""

    labels: tuple[str, ...] = ()
    sha256: str = ""  # of the model artifact; "" when the source does not know it


def facts_from_store(store: Path, served: Iterable[tuple[str, str]]) -> dict[str, ModelFacts]:
    """From ``<store>/<name>/<version>/manifest.json`` of each served (name, version)."""
    facts = {}
    for name, version in served:
        path = store / name / version / MANIFEST_FILE
        try:
            manifest = parse_manifest(path.read_text(), str(path))
        except (OSError, ModelStoreError) as error:
            _log.warning(
                "no labels for a served model", model=name, version=version, error=str(error)
            )
            continue
        facts[name] = ModelFacts(manifest.labels, manifest.model_sha256)
    return facts


def facts_from_repository(repository: Path, models: Iterable[str]) -> dict[str, ModelFacts]:
    """From ``<repository>/<name>/labels.txt`` (one label per line, class index order)."""
    facts = {}
    for name in models:
        path = repository / name / LABELS_FILE
        try:
            # Line i is class i: only trailing blank lines are dropped, never inner ones.
            labels = tuple(line.strip() for line in path.read_text().rstrip().splitlines())
        except OSError as error:
            _log.warning("no labels for a served model", model=name, error=str(error))
            continue
        facts[name] = ModelFacts(labels)
    return facts
