"""A real tritonserver (the binary bundled in nvidia-pytriton) on the local repository."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from localmesh.triton import TritonServer
from tests.helpers.paths import STORE
from workload.triton_repository import write_repository

TRITON_MODELS = ["fashion-cloud", "fashion-edge"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def triton(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TritonServer]:
    """One Triton per test module (it takes seconds to start); tests must not kill it."""
    base = tmp_path_factory.mktemp("triton")
    write_repository(STORE, base / "repository", "local", TRITON_MODELS)
    async with TritonServer(base / "repository", base / "run") as server:
        yield server
