"""The examples run as printed (README, "Calling hybridmesh from your service"): each is
executed as its own process against the router of a real mesh (real edge node, cloud
service and Triton) and its output checked: an easy image answered on the edge, a hard
one in the cloud, a SENSITIVE one kept on the edge, enums printed by name."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers.item_difficulty import easy_and_hard
from tests.helpers.local_mesh import Mesh
from workload.fashion_mnist import LABELS, load_split

REPO = Path(__file__).resolve().parent.parent
IMAGES = load_split("test").images[:300]
EASY, HARD = easy_and_hard(IMAGES, 1)
# The worktree's code first (the shared venv's editable install may point elsewhere).
ENVIRONMENT = {**os.environ, "PYTHONPATH": str(REPO)}


async def run(*command: str, env: dict[str, str] | None = None) -> str:
    """Run one example from the repository root, as the README prints it: its stdout."""
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=REPO,
        env=env or ENVIRONMENT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


def fields(output: str) -> dict[str, str]:
    """``name value`` lines, as the Python examples print them."""
    return dict(line.split(" ", 1) for line in output.splitlines())


async def python_example(
    name: str, *args: str, env: dict[str, str] | None = None
) -> dict[str, str]:
    return fields(await run(sys.executable, f"examples/python/{name}", *args, env=env))


@pytest.mark.asyncio(loop_scope="module")
async def test_stubs_example(mesh: Mesh) -> None:
    router = mesh.router.host.address
    easy = await python_example("infer_stubs.py", router, "--index", str(EASY[0]))
    hard = await python_example("infer_stubs.py", router, "--index", str(HARD[0]))
    assert easy["served_by"] == "TIER_EDGE", easy
    assert easy["reason"] == "DECISION_REASON_EDGE_CONFIDENT"
    assert easy["data_left_site"] == "False" and easy["cloud_model"] == "- (did not run)"
    assert hard["served_by"] == "TIER_CLOUD", hard
    assert hard["reason"] == "DECISION_REASON_ESCALATED_HARD_CASE"
    assert hard["data_left_site"] == "True" and int(hard["cost_cloud_micros"]) > 0
    assert hard["cloud_model"].startswith("fashion-cloud v")
    for answer in (easy, hard):
        assert answer["label"].split(" (class")[0] in LABELS
        assert answer["edge_model"].startswith("fashion-edge v") and answer["policy_version"]
        assert len(answer["trace_id"]) == 32 and answer["degraded"] == "False"
    sensitive = await python_example(
        "infer_stubs.py", router, "--index", str(HARD[0]), "--privacy", "SENSITIVE"
    )
    assert sensitive["served_by"] == "TIER_EDGE", sensitive
    assert sensitive["reason"] == "DECISION_REASON_PRIVACY_SENSITIVE"
    assert sensitive["data_left_site"] == "False"


@pytest.mark.asyncio(loop_scope="module")
async def test_examples_find_the_local_meshs_router(mesh: Mesh, tmp_path: Path) -> None:
    """With no address, both Python examples read the router from the state file that
    ``hybridmesh up`` writes in ``$HYBRIDMESH_STATE_DIR``; with none, one clear line."""
    environment = {**ENVIRONMENT, "HYBRIDMESH_STATE_DIR": str(tmp_path)}
    for name in ("infer_stubs.py", "infer_oip.py"):
        missing = await asyncio.create_subprocess_exec(
            sys.executable, f"examples/python/{name}", cwd=REPO, env=environment,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await missing.communicate()
        assert missing.returncode == 1
        assert stderr.decode() == (
            f"no router address given and no mesh is up ({tmp_path / 'state.json'} is missing)\n"
        )
    state = {"endpoints": {"router": mesh.router.host.address}}
    (tmp_path / "state.json").write_text(json.dumps(state))
    stubs = await python_example("infer_stubs.py", "--index", str(EASY[0]), env=environment)
    oip = await python_example("infer_oip.py", "--index", str(EASY[0]), env=environment)
    assert stubs["served_by"] == "TIER_EDGE" and oip["served_by"] == "EDGE"
    assert stubs["trace_id"] != oip["trace_id"], "two requests"


@pytest.mark.asyncio(loop_scope="module")
async def test_tritonclient_example(mesh: Mesh) -> None:
    router = mesh.router.host.address
    easy = await python_example("infer_oip.py", router, "--index", str(EASY[0]))
    hard = await python_example("infer_oip.py", router, "--index", str(HARD[0]))
    sensitive = await python_example(
        "infer_oip.py", router, "--index", str(HARD[0]), "--privacy", "SENSITIVE"
    )
    assert (easy["served_by"], easy["reason"]) == ("EDGE", "EDGE_CONFIDENT"), easy
    assert (hard["served_by"], hard["reason"]) == ("CLOUD", "ESCALATED_HARD_CASE"), hard
    assert (sensitive["served_by"], sensitive["reason"]) == ("EDGE", "PRIVACY_SENSITIVE")
    assert hard["data_left_site"] == "True" and sensitive["data_left_site"] == "False"
    assert int(hard["cost_cloud_micros"]) > 0 and int(sensitive["cost_cloud_micros"]) == 0
    for answer in (easy, hard, sensitive):
        assert answer["label"].split(" (class")[0] in LABELS
        assert len(answer["trace_id"]) == 32 and answer["degraded"] == "False"


@pytest.mark.asyncio(loop_scope="module")
async def test_node_example(mesh: Mesh, tmp_path: Path) -> None:
    """Any language can call hybridmesh: the Node client is built from the .proto files
    alone (@grpc/grpc-js + @grpc/proto-loader)."""
    node = shutil.which("node")
    assert node, "node is required (the machine's Node.js; npm packages come from make)"
    router = mesh.router.host.address
    image_file = tmp_path / "hard.raw"
    image_file.write_bytes(IMAGES[HARD[0]].tobytes())
    (tmp_path / "state.json").write_text(json.dumps({"endpoints": {"router": router}}))
    for args, env, tier in (
        # A Fashion-MNIST test image by index, the router from the local mesh's state file.
        (["--index", str(EASY[0])], {**ENVIRONMENT, "HYBRIDMESH_STATE_DIR": str(tmp_path)},
         "TIER_EDGE"),
        # A raw image file, the router given.
        ([router, "--image", str(image_file)], ENVIRONMENT, "TIER_CLOUD"),
    ):  # fmt: skip
        answer = json.loads(await run(node, "examples/node/infer.js", *args, env=env))
        assert answer["served_by"] == tier, answer
        assert answer["label"] == LABELS[int(answer["class_index"])]
        assert answer["data_left_site"] is (tier == "TIER_CLOUD")
        assert len(str(answer["trace_id"])) == 32


def test_the_readme_shows_what_the_examples_run() -> None:
    """Each Python block of the README's client section is a verbatim part of an example,
    and each example the README runs exists."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Calling hybridmesh from your service", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    examples = [
        (REPO / "examples/python" / n).read_text() for n in ("infer_stubs.py", "infer_oip.py")
    ]
    assert len(blocks) == 2
    for block, example in zip(blocks, examples, strict=True):
        assert block in example, block
    for path in re.findall(r"(examples/\S+\.(?:py|js))", section):
        assert (REPO / path).is_file(), path
