"""Over-the-air updates of the models an edge node serves.

For each served model the updater asks the registry which version is promoted; when it
differs from the one serving, it downloads the version (resumably), verifies the signed
manifest and every file's sha256, installs it into the edge's model store, canaries it on
the golden set against the serving version, and switches atomically (``LocalModels.swap``:
in-flight requests finish on the old session). A version that fails any step is refused:
recorded (``refused.json``), reported, and never retried, so it cannot block the next
one. The newest ``keep_versions`` versions stay installed for rollback. Fetching,
verifying and the refused versions are the OTA client library's (``ota.updates``), shared
with the router's policy updater.

Downgrades (a rollback, by the operator or by promotion of an older version) move the
newer versions out of the store into ``<staging>/retired``, so a restart of the edge
node, which loads the newest installed version, comes back on the version that served.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_node.canary import CanaryMargins, CanaryVerdict, GoldenSet, judge
from edge_node.local_models import LoadedModel, LocalModels
from ota.artifacts import ArtifactRef
from ota.fetch import ArtifactSource
from ota.refused import RefusedVersions
from ota.updates import SiteUpdates, VerificationError
from services.logging import get_logger
from workload.model_store import ModelStoreError, load_verified, versions

MODEL_KIND = "model"
_log = get_logger("edge_node.updater")


@dataclass(frozen=True)
class UpdateReport:
    model: str
    version: int
    outcome: str  # "switched" | "refused" | "rolled-back"
    reason: str = ""
    previous_version: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)
    canary: CanaryVerdict | None = None


@dataclass(frozen=True)
class UpdaterSettings:
    store: Path
    staging: Path
    keep_versions: int = 3
    intra_op_threads: int = 1
    margins: CanaryMargins = field(default_factory=CanaryMargins)


class EdgeUpdater:
    def __init__(  # noqa: PLR0917 (the collaborators, each with its own type)
        self,
        source: ArtifactSource,
        models: LocalModels,
        settings: UpdaterSettings,
        trusted: Mapping[str, Ed25519PublicKey],
        golden: GoldenSet,
        on_report: Callable[[UpdateReport], None] | None = None,
    ) -> None:
        self._updates = SiteUpdates(source, MODEL_KIND, settings.staging, trusted)
        self._models = models
        self._settings = settings
        self._golden = golden
        self._on_report = on_report
        self._lock = asyncio.Lock()  # one update or rollback at a time

    @property
    def store(self) -> Path:
        return self._settings.store

    @property
    def refused(self) -> RefusedVersions:
        return self._updates.refused

    async def poll_once(self) -> list[UpdateReport]:
        """Bring every served model to its promoted version (unless that was refused)."""
        reports = []
        for model in self._models.all():
            wanted = await self._updates.wanted(model.name, model.version)
            if wanted is not None:
                reports.append(await self.apply(model.name, wanted))
        return reports

    async def apply(self, name: str, version: int) -> UpdateReport:
        async with self._lock:
            return await self._apply(name, version)

    async def rollback(self, name: str) -> UpdateReport:
        """The operator's command: serve the installed version below the current one,
        and refuse the current one (so polling does not bring it back)."""
        async with self._lock:
            current = self._models.resolve_name(name)
            earlier = [v for v in self._installed(name) if v < int(current.version)]
            if not earlier:
                raise ModelStoreError(f"{name}: no earlier installed version to roll back to")
            self._updates.refuse(ArtifactRef(MODEL_KIND, name, int(current.version)))
            report = await self._apply(name, earlier[-1], canary=False, announce=False)
            return self._report(
                UpdateReport(
                    name,
                    earlier[-1],
                    "rolled-back" if report.outcome == "switched" else report.outcome,
                    f"by command from v{current.version}; {report.reason}".rstrip("; "),
                    current.version,
                    report.timings_s,
                )
            )

    async def _apply(
        self, name: str, version: int, *, canary: bool = True, announce: bool = True
    ) -> UpdateReport:
        ref = ArtifactRef(MODEL_KIND, name, version)
        current = self._models.resolve_name(name)
        target = self._settings.store / name / str(version)
        try:
            timings = await self._updates.install(ref, target)
        except VerificationError as error:
            return self._refused(ref, str(error), current, {})
        started = time.perf_counter()
        try:
            candidate = await asyncio.to_thread(self._load, target)
        except (ModelStoreError, OSError, RuntimeError) as error:
            await asyncio.to_thread(self._retire, target)
            return self._refused(ref, f"does not load: {error}", current, timings)
        timings["load"] = time.perf_counter() - started
        verdict = None
        if canary:
            started = time.perf_counter()
            verdict = await asyncio.to_thread(self._canary, current, candidate)
            timings["canary"] = time.perf_counter() - started
            if not verdict.passed:
                await asyncio.to_thread(self._retire, target)
                return self._refused(ref, f"canary: {verdict.reason}", current, timings, verdict)
        started = time.perf_counter()
        self._models.swap(candidate)
        timings["switch"] = time.perf_counter() - started
        if version < int(current.version):
            for newer in self._installed(name):
                if newer > version:
                    await asyncio.to_thread(self._retire, self._settings.store / name / str(newer))
        await asyncio.to_thread(self._prune, name, version)
        report = UpdateReport(name, version, "switched", "", current.version, timings, verdict)
        return self._report(report) if announce else report

    def _load(self, directory: Path) -> LoadedModel:
        return LoadedModel(load_verified(directory), directory, self._settings.intra_op_threads)

    def _canary(self, current: LoadedModel, candidate: LoadedModel) -> CanaryVerdict:
        if (current.inputs, current.outputs) != (candidate.inputs, candidate.outputs):
            return CanaryVerdict(False, 0.0, 0.0, 0.0, "input/output contract changed")
        return judge(
            _predict(current, self._golden.images),
            _predict(candidate, self._golden.images),
            self._golden.labels,
            self._settings.margins,
        )

    def _installed(self, name: str) -> list[int]:
        return versions(self._settings.store / name)

    def _prune(self, name: str, serving: int) -> None:
        """Keep the newest ``keep_versions`` installed versions (always the serving one)."""
        installed = [v for v in self._installed(name) if v != serving]
        for old in installed[: max(len(installed) - (self._settings.keep_versions - 1), 0)]:
            shutil.rmtree(self._settings.store / name / str(old))

    def _retire(self, directory: Path) -> None:
        retired = self._settings.staging / "retired" / directory.parent.name
        retired.mkdir(parents=True, exist_ok=True)
        destination = retired / f"{directory.name}-{time.time_ns()}"
        shutil.move(directory, destination)

    def _refused(
        self,
        ref: ArtifactRef,
        reason: str,
        current: LoadedModel,
        timings: dict[str, float],
        verdict: CanaryVerdict | None = None,
    ) -> UpdateReport:
        self._updates.refuse(ref)
        return self._report(
            UpdateReport(
                ref.name, ref.version, "refused", reason, current.version, timings, verdict
            )
        )

    def _report(self, report: UpdateReport) -> UpdateReport:
        log = _log.info if report.outcome != "refused" else _log.warning
        log(
            "model update",
            model=report.model,
            version=report.version,
            outcome=report.outcome,
            reason=report.reason,
            previous=report.previous_version,
            **{f"{k}_ms": round(v * 1e3, 2) for k, v in report.timings_s.items()},
        )
        if self._on_report is not None:
            self._on_report(report)
        return report


def _predict(model: LoadedModel, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
    """Predicted classes, in batches the model accepts."""
    input_name = model.inputs[0].name
    predictions = []
    for start in range(0, len(images), model.max_batch_size):
        outputs = model.run({input_name: images[start : start + model.max_batch_size]})
        predictions.append(np.argmax(outputs[model.classification_output], axis=1))
    classes: npt.NDArray[np.int64] = np.concatenate(predictions).astype(np.int64)
    return classes
