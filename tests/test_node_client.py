"""Any language can call hybridmesh: a Node client built from the .proto files alone
(@grpc/grpc-js + @grpc/proto-loader) calls the router of a real mesh."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from tests.helpers.item_difficulty import easy_and_hard
from tests.helpers.local_mesh import Mesh
from workload.fashion_mnist import LABELS, load_split

REPO = Path(__file__).resolve().parent.parent
IMAGES = load_split("test").images[:300]
EASY, HARD = easy_and_hard(IMAGES, 1)


async def call_from_node(router: str, image_file: Path) -> dict[str, object]:
    node = shutil.which("node")
    assert node, "node is required (the machine's Node.js; npm packages come from make)"
    process = await asyncio.create_subprocess_exec(
        node,
        str(REPO / "examples/node/infer.js"),
        router,
        str(image_file),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    answer: dict[str, object] = json.loads(stdout)
    return answer


@pytest.mark.asyncio(loop_scope="module")
async def test_node_client_gets_an_explained_answer(mesh: Mesh, tmp_path: Path) -> None:
    for index, tier in ((EASY[0], "TIER_EDGE"), (HARD[0], "TIER_CLOUD")):
        image_file = tmp_path / f"{index}.raw"
        image_file.write_bytes(IMAGES[index].tobytes())
        answer = await call_from_node(mesh.router.host.address, image_file)
        assert answer["served_by"] == tier
        assert answer["label"] == LABELS[int(answer["class_index"])]  # type: ignore[call-overload]
        assert answer["data_left_site"] is (tier == "TIER_CLOUD")
        assert len(str(answer["trace_id"])) == 32
