"""The edge updater against a real registry store, real signatures and real onnxruntime
sessions of the committed edge model and versions derived from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_node.local_models import LocalModels
from edge_node.updater import EdgeUpdater, UpdateReport, UpdaterSettings
from ota.artifacts import ArtifactRef
from ota.fetch import fetch_verified
from ota.signatures import load_trusted_keys
from registry.signing import generate_key
from registry.store import StoreSource
from tests.helpers.ota_site import Site, golden_set, make_site, worse_model_bytes
from tests.helpers.paths import EDGE_MODEL
from workload.model_store import versions

GOLDEN = golden_set()


def updater_for(site: Site, models: LocalModels, reports: list[UpdateReport]) -> EdgeUpdater:
    return EdgeUpdater(
        StoreSource(site.registry),
        models,
        UpdaterSettings(store=site.edge_store, staging=site.staging, keep_versions=2),
        load_trusted_keys([site.public_key]),
        GOLDEN,
        on_report=reports.append,
    )


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path)


def serving(models: LocalModels) -> str:
    return models.resolve_name(EDGE_MODEL).version


async def test_a_signed_update_is_verified_canaried_and_switched(site: Site) -> None:
    models = LocalModels.load(site.edge_store, 1)
    reports: list[UpdateReport] = []
    updater = updater_for(site, models, reports)
    assert await updater.poll_once() == [], "already on the promoted version"
    old = models.resolve_name(EDGE_MODEL)
    site.publish(2)
    (report,) = await updater.poll_once()
    assert (report.outcome, report.version, report.previous_version) == ("switched", 2, "1")
    assert report.canary is not None and report.canary.agreement == 1.0
    assert set(report.timings_s) >= {"download", "verify", "load", "canary", "switch"}
    assert serving(models) == "2"
    # A request that resolved v1 before the switch still completes on v1's session.
    image = GOLDEN.images[:1]
    assert old.run({"image": image})[old.classification_output].shape == (1, 10)
    assert versions(site.edge_store / EDGE_MODEL) == [1, 2], "the previous version is kept"
    assert reports == [report]
    # The edge node restarting now loads what serves.
    assert LocalModels.load(site.edge_store, 1).resolve_name(EDGE_MODEL).version == "2"


async def test_a_tampered_artifact_is_refused_and_does_not_block_the_next(site: Site) -> None:
    models = LocalModels.load(site.edge_store, 1)
    updater = updater_for(site, models, [])
    site.publish(2)
    stored = site.registry.root / "model" / EDGE_MODEL / "2" / "model.onnx"
    data = bytearray(stored.read_bytes())
    data[-10] ^= 0x55
    stored.write_bytes(bytes(data))
    (report,) = await updater.poll_once()
    assert report.outcome == "refused" and "sha256 differs" in report.reason
    assert serving(models) == "1"
    assert not (site.edge_store / EDGE_MODEL / "2").exists()
    assert json.loads((site.staging / "refused.json").read_text()) == {EDGE_MODEL: [2]}
    assert await updater.poll_once() == [], "a refused version is not retried"
    site.publish(3)
    (report,) = await updater.poll_once()
    assert (report.outcome, serving(models)) == ("switched", "3")


async def test_an_artifact_signed_by_an_untrusted_key_is_refused(
    site: Site, tmp_path: Path
) -> None:
    models = LocalModels.load(site.edge_store, 1)
    updater = updater_for(site, models, [])
    operator, site.key = site.key, generate_key(tmp_path / "intruder")
    site.publish(2, promote=False)
    # The operator's promotion statement is good; the manifest's signature is not.
    site.registry.promote("model", EDGE_MODEL, 2, operator)
    (report,) = await updater.poll_once()
    assert report.outcome == "refused" and "not among the trusted keys" in report.reason
    assert serving(models) == "1"


async def test_a_deliberately_worse_model_is_stopped_by_the_canary(site: Site) -> None:
    models = LocalModels.load(site.edge_store, 1)
    updater = updater_for(site, models, [])
    site.publish(2, worse_model_bytes())
    (report,) = await updater.poll_once()
    assert report.outcome == "refused" and report.reason.startswith("canary:")
    assert report.canary is not None
    assert report.canary.candidate_accuracy < report.canary.current_accuracy - 0.005
    assert serving(models) == "1"
    assert versions(site.edge_store / EDGE_MODEL) == [1], "the bad version is not installed"


async def test_rollback_by_command_restores_the_previous_version_and_sticks(site: Site) -> None:
    models = LocalModels.load(site.edge_store, 1)
    updater = updater_for(site, models, [])
    site.publish(2)
    await updater.poll_once()
    report = await updater.rollback(EDGE_MODEL)
    assert (report.outcome, report.version, report.previous_version) == ("rolled-back", 1, "2")
    assert serving(models) == "1"
    assert await updater.poll_once() == [], "the rolled-back version stays refused"
    assert LocalModels.load(site.edge_store, 1).resolve_name(EDGE_MODEL).version == "1"


async def test_only_keep_versions_stay_installed(site: Site) -> None:
    models = LocalModels.load(site.edge_store, 1)
    updater = updater_for(site, models, [])
    for version in (2, 3, 4):
        site.publish(version)
        await updater.poll_once()
    assert versions(site.edge_store / EDGE_MODEL) == [3, 4]


async def test_an_interrupted_download_resumes_where_it_stopped(site: Site) -> None:
    site.publish(2)
    ref = ArtifactRef("model", EDGE_MODEL, 2)
    source = StoreSource(site.registry)
    trusted = load_trusted_keys([site.public_key])
    downloads = site.staging / "downloads"
    part = downloads / "model" / EDGE_MODEL / "2" / "model.onnx.part"
    part.parent.mkdir(parents=True)
    # As a lost link leaves it: the first 20,000 bytes of the model on disk.
    part.write_bytes(site.registry.read_chunk(ref, "model.onnx", 0, 20_000))
    fetched = await fetch_verified(source, ref, downloads, trusted, chunk_bytes=4096)
    assert fetched.resumed_bytes == 20_000
    assert fetched.downloaded_bytes == fetched.manifest.total_bytes - 20_000
    assert not part.exists()
    copy = fetched.directory / "model.onnx"
    original = site.registry.root / "model" / EDGE_MODEL / "2" / "model.onnx"
    assert copy.read_bytes() == original.read_bytes()


def test_the_worse_model_really_is_worse() -> None:
    """The fixture the canary test relies on: same contract, a realistic regression
    (about 3 points on the golden set), not a broken model."""
    session = ort.InferenceSession(worse_model_bytes())
    logits = session.run(None, {"image": GOLDEN.images})[0]
    accuracy = float(np.mean(np.argmax(logits, axis=1) == GOLDEN.labels))
    assert 0.5 < accuracy < 0.90, accuracy
