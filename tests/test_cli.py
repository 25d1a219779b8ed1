"""The ``hybridmesh`` command line: every command's help, ``--state-dir`` before or after
the subcommand, one clear line for a bad catalog, and a warning naming the nearest valid
name for a misspelt ``HYBRIDMESH_*`` variable (in the CLI and in every service)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localmesh.cli import build_parser, main
from localmesh.parser_tree import subcommands
from services.environment import known_variables, unknown_variables

REPO = Path(__file__).resolve().parent.parent
HYBRIDMESH = Path(sys.executable).parent / "hybridmesh"  # the console script
# The worktree's code first (the shared venv's editable install points elsewhere).
ENVIRONMENT = {**os.environ, "PYTHONPATH": str(REPO)}
COMMANDS = [path for path, _ in subcommands(build_parser())]


def hybridmesh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HYBRIDMESH), *args],
        cwd=REPO,
        env=env or ENVIRONMENT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def help_of(path: tuple[str, ...]) -> str:
    """``hybridmesh <path> --help`` in process: its output, after checking it exits 0."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*path, "--help"])
    assert exited.value.code == 0, path
    return out.getvalue()


def test_the_tree_has_every_command() -> None:
    assert {(), ("up",), ("down",), ("status",), ("demo",)} <= set(COMMANDS)
    assert {("policy", "train"), ("policy", "evaluate"), ("policy", "retrain")} <= set(COMMANDS)
    assert ("router", "retrain") in COMMANDS
    registry = {path[1] for path in COMMANDS if len(path) == 2 and path[0] == "registry"}
    assert registry == {
        "keygen", "publish", "list", "promote", "rollback", "sites", "edge-status",
        "edge-rollback",
    }  # fmt: skip


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) or "hybridmesh" for p in COMMANDS])
def test_every_command_and_option_has_help(path: tuple[str, ...]) -> None:
    text = help_of(path)
    assert text.startswith(f"usage: {' '.join(('hybridmesh', *path))} "), text[:80]
    assert "python -m" not in text
    parser = dict(subcommands(build_parser()))[path]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"{path}: {name} has no help"
        assert all(flag in text for flag in action.option_strings)
    if path:
        assert "--state-dir" in text, "accepted after every subcommand"


@pytest.mark.parametrize("path", [(), ("registry", "promote")])
def test_help_from_the_console_script(path: tuple[str, ...]) -> None:
    shown = hybridmesh(*path, "--help")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"usage: {' '.join(('hybridmesh', *path))} ")
    parser = dict(subcommands(build_parser()))[path]
    for action in parser._actions:
        assert all(flag in shown.stdout for flag in action.option_strings)
    assert shown.stderr == ""


def test_router_alone_prints_its_usage_not_invalid_choice() -> None:
    shown = hybridmesh("router", "--help")
    assert shown.returncode == 0 and "retrain" in shown.stdout, shown.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--state-dir", "{dir}", "registry", "sites", "--registry", "127.0.0.1:1"],
        ["registry", "sites", "--registry", "127.0.0.1:1", "--state-dir", "{dir}"],
        ["registry", "--state-dir", "{dir}", "sites", "--registry", "127.0.0.1:1"],
        ["--state-dir", "{dir}", "status"],
        ["status", "--state-dir", "{dir}"],
        ["policy", "train", "--pair", "p", "--state-dir", "{dir}"],
        ["up", "--random-ports", "--state-dir", "{dir}"],
    ],
)
def test_state_dir_before_or_after_the_subcommand(argv: list[str], tmp_path: Path) -> None:
    args = build_parser().parse_args([a.replace("{dir}", str(tmp_path)) for a in argv])
    assert args.state_dir == tmp_path


def test_state_dir_default_is_the_environment_or_var_mesh(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("HYBRIDMESH_STATE_DIR", raising=False)
    assert build_parser().parse_args(["status"]).state_dir == Path("var/mesh")
    monkeypatch.setenv("HYBRIDMESH_STATE_DIR", str(tmp_path))
    assert build_parser().parse_args(["registry", "keygen", "--keys", "k"]).state_dir == tmp_path


def test_status_reads_the_state_dir_given_after_the_subcommand(tmp_path: Path) -> None:
    """The state file of the directory given after ``status`` is the one read: its
    (unreachable) endpoints are listed."""
    state = {
        "state_dir": str(tmp_path),
        "endpoints": {n: f"127.0.0.1:{i + 1}" for i, n in enumerate(("router", "envoy", "triton"))},
        "pids": {},
        "logs": {},
        "wan_delay_ms": 40,
    }
    (tmp_path / "state.json").write_text(json.dumps(state))
    shown = hybridmesh("status", "--state-dir", str(tmp_path))
    assert shown.returncode == 1, shown.stderr
    assert "127.0.0.1:1 " in shown.stdout and "NOT SERVING" in shown.stdout, shown.stdout


def test_removed_flags_are_refused() -> None:
    """``demo`` always runs on free ports; a ``--random-ports`` that did nothing is gone."""
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["demo", "--random-ports"])
    assert exited.value.code == 2


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "No such file or directory"),
        ("[pairs\n", "not valid TOML"),
        ('[pairs.x]\nedge_model = "e"\n', "pairs.x: missing 'cloud_model'"),
    ],
)
def test_up_with_a_bad_catalog_is_one_line_and_exit_2(
    content: str | None, problem: str, tmp_path: Path
) -> None:
    catalog = tmp_path / "catalog.toml"
    if content is not None:
        catalog.write_text(content)
    shown = hybridmesh("up", "--catalog", str(catalog), "--state-dir", str(tmp_path / "mesh"))
    assert shown.returncode == 2
    assert len(shown.stderr.splitlines()) == 1, shown.stderr
    assert shown.stderr.startswith(f"hybridmesh up: error: {catalog}: {problem}"), shown.stderr
    assert str(catalog) in shown.stderr and "Traceback" not in shown.stderr
    assert not (tmp_path / "mesh").exists(), "nothing was started"


def test_up_with_models_missing_from_the_store_names_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog = REPO / "models" / "catalog.toml"
    assert main(["up", "--catalog", str(catalog), "--store", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(catalog) in error and str(tmp_path) in error, error


def test_registry_with_a_missing_key_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "v1"
    source.mkdir()
    argv = ["registry", "publish", "--root", str(tmp_path / "r"), "--keys", str(tmp_path)]
    assert main([*argv, "--name", "m", "--version", "1", str(source)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("hybridmesh registry: error: ") and "publisher.key" in error, error
    assert error.count("\n") == 1


def test_unknown_variables_name_the_nearest_valid_one() -> None:
    known = known_variables()
    # Every service's settings, nested ones, and the tools' own.
    assert {
        "HYBRIDMESH_ROUTER_PORT", "HYBRIDMESH_EDGE_MODEL_STORE", "HYBRIDMESH_CLOUD_TRITON_URL",
        "HYBRIDMESH_REGISTRY_ROOT", "HYBRIDMESH_ROUTER_BREAKER_CLOUD__SLOW_CALL_S",
        "HYBRIDMESH_STATE_DIR", "HYBRIDMESH_OPERATOR_KEYS",
    } <= known  # fmt: skip
    environ = {
        "HYBRIDMESH_ROUTER_PROT": "1",
        "hybridmesh_router_port": "1",  # read case-insensitively: valid
        "HYBRIDMESH_EDGE_MODELSTORE": "x",
        "HYBRIDMESH_ROUTER_BREAKER_CLOUD__SLOW_CALL": "0.3",
        "HYBRIDMESH_QWERTY": "1",
        "PATH": "/bin",
    }
    found = {v.name: v.nearest for v in unknown_variables(environ)}
    assert found == {
        "HYBRIDMESH_ROUTER_PROT": "HYBRIDMESH_ROUTER_PORT",
        "HYBRIDMESH_EDGE_MODELSTORE": "HYBRIDMESH_EDGE_MODEL_STORE",
        "HYBRIDMESH_ROUTER_BREAKER_CLOUD__SLOW_CALL": (
            "HYBRIDMESH_ROUTER_BREAKER_CLOUD__SLOW_CALL_S"
        ),
        "HYBRIDMESH_QWERTY": None,
    }


def test_the_cli_warns_about_a_misspelt_variable() -> None:
    shown = hybridmesh("--help", env={**ENVIRONMENT, "HYBRIDMESH_STAT_DIR": "x"})
    assert shown.returncode == 0
    assert shown.stderr == (
        "hybridmesh: warning: unknown environment variable HYBRIDMESH_STAT_DIR (ignored); "
        "did you mean HYBRIDMESH_STATE_DIR?\n"
    )


SERVICES = {
    "router_service": "ROUTER",
    "edge_node": "EDGE",
    "cloud_inference": "CLOUD",
    "registry": "REGISTRY",
}


@pytest.mark.slow
@pytest.mark.parametrize("package", SERVICES)
async def test_every_service_warns_at_start_up(package: str, tmp_path: Path) -> None:
    prefix = f"HYBRIDMESH_{SERVICES[package]}_"
    environment = {
        **ENVIRONMENT,
        f"{prefix}PORT": "0",
        f"{prefix}LOG_LEVEL": "info",
        f"{prefix}SHUTDOWN_GRACE_SECONDS": "0",
        f"{prefix}LOGLEVEL": "debug",  # the misspelt one
        "HYBRIDMESH_REGISTRY_ROOT": str(tmp_path),
        "HYBRIDMESH_ROUTER_OUTBOX_PATH": str(tmp_path / "outbox.sqlite"),
        "HYBRIDMESH_ROUTER_AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl"),
        "HYBRIDMESH_CLOUD_TRITON_URL": "127.0.0.1:1",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", package,
        cwd=REPO, env=environment, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert process.stderr is not None
    warning: dict[str, object] = {}
    try:
        async with asyncio.timeout(60):
            while not warning:
                line = await process.stderr.readline()
                assert line, f"{package} exited ({await process.wait()}) without the warning"
                record = json.loads(line) if line.startswith(b"{") else {}
                if record.get("event") == "unknown environment variable":
                    warning = record
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGTERM)
            await process.wait()
    assert warning["variable"] == f"{prefix}LOGLEVEL"
    assert warning["did_you_mean"] == f"{prefix}LOG_LEVEL"
    assert warning["level"] == "warning"


@pytest.mark.parametrize("command", ["down", "status"])
@pytest.mark.parametrize(
    ("content", "said"),
    [
        (None, "no mesh is up"),
        ("{bad", "not valid JSON"),
        ("[]", "not a JSON object"),
        ('{"pids": {"router": 1}}', "not a mesh's state"),
    ],
)
def test_down_and_status_without_a_valid_state_file_are_one_line(
    command: str, content: str | None, said: str, tmp_path: Path
) -> None:
    """No state file: "no mesh is up"; a corrupt one: one line naming it, and ``down``
    signals nothing (its process ids cannot be trusted). Exit status 1, no traceback."""
    if content is not None:
        (tmp_path / "state.json").write_text(content)
    shown = hybridmesh("--state-dir", str(tmp_path), command)
    assert shown.returncode == 1, shown.stderr
    assert "Traceback" not in shown.stderr, shown.stderr
    assert said in shown.stdout + shown.stderr, (shown.stdout, shown.stderr)
    if content is not None:
        assert len(shown.stderr.splitlines()) == 1, shown.stderr
        assert str(tmp_path / "state.json") in shown.stderr
        assert (tmp_path / "state.json").exists(), "a file it could not read is left alone"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_to_demo_stops_the_parts_it_started(tmp_path: Path) -> None:
    """``timeout``/``kill`` send SIGTERM: the demo stops its mesh as Ctrl-C would. Triton
    and Envoy run in process groups of their own, so without that they outlived it."""
    state_dir = tmp_path / "mesh"
    demo = subprocess.Popen(
        [
            str(HYBRIDMESH),
            "--state-dir",
            str(state_dir),
            "demo",
            "--limit",
            "10000",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        env={**ENVIRONMENT, "MPLBACKEND": "Agg"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pids: list[int] = []
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            if line.startswith("mesh up"):
                break
        state = json.loads((state_dir / "state.json").read_text())
        pids = list(state["pids"].values())
        assert pids and all(_alive(pid) for pid in pids)
        demo.send_signal(signal.SIGTERM)
        status = demo.wait(timeout=120)
        left = [pid for pid in pids if _alive(pid) and not _zombie(pid)]
        assert not left, f"parts left running after SIGTERM: {left}"
        assert status == 128 + signal.SIGTERM
    finally:
        for pid in pids:  # what this test started, if the demo left it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        if demo.poll() is None:
            demo.kill()
            demo.wait()


def _zombie(pid: int) -> bool:
    """A stopped part not yet reaped by its (exited) parent's init."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("option", ["--limit", "--concurrency"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_demo_counts_below_one_are_refused(option: str, value: str) -> None:
    """``--limit -1`` sliced the test set (all but one image), ``--limit 0`` ran an empty
    demo and wrote its report: both are usage errors naming the option."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["demo", option, value])
    assert exited.value.code == 2
    assert f"argument {option}: must be at least 1, got {value}" in stderr.getvalue()


def test_status_says_which_outbox_file_is_unreadable(tmp_path: Path) -> None:
    """One worker's outbox file damaged: status names it and still lists the rest (it
    was a traceback, and nothing after the outbox was shown)."""
    from router_service.outbox import Outbox

    router = tmp_path / "router"
    Outbox(router / "outbox.worker0.sqlite", max_items=1).close()
    (router / "outbox.worker1.sqlite").write_bytes(b"\xff" * 4096)
    state = {
        "state_dir": str(tmp_path),
        "endpoints": {n: f"127.0.0.1:{i + 1}" for i, n in enumerate(("router", "envoy", "triton"))},
        "pids": {},
        "logs": {},
        "wan_delay_ms": 40,
        "outbox": str(router / "outbox.sqlite"),
    }
    (tmp_path / "state.json").write_text(json.dumps(state))
    shown = hybridmesh("--state-dir", str(tmp_path), "status")
    assert "Traceback" not in shown.stderr, shown.stderr
    assert "worker0: 0 queued" in shown.stdout, shown.stdout
    assert f"worker1: unreadable {router / 'outbox.worker1.sqlite'}" in shown.stdout


def test_status_says_a_dead_part_is_down_while_it_is_unreaped(tmp_path: Path) -> None:
    """A part that died stays a zombie until its supervisor reaps it; kill(pid, 0) still
    succeeds, so status said "running" for a dead Envoy and exited 0."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # exits; not waited for yet
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stat = Path(f"/proc/{dead.pid}/stat")
        for _ in range(200):  # until it has exited (a zombie: this test has not reaped it)
            if stat.read_text().rpartition(")")[2].split()[0] == "Z":
                break
            time.sleep(0.05)
        state = {
            "state_dir": str(tmp_path),
            "endpoints": {"envoy": "127.0.0.1:1", "triton": "127.0.0.1:2"},
            "pids": {"envoy": dead.pid, "triton": alive.pid},
            "logs": {},
            "wan_delay_ms": 40,
        }
        (tmp_path / "state.json").write_text(json.dumps(state))
        shown = hybridmesh("--state-dir", str(tmp_path), "status")
        assert f"DOWN  pid {dead.pid}" in shown.stdout, shown.stdout
        assert f"running  pid {alive.pid}" in shown.stdout, shown.stdout
        assert shown.returncode == 1
    finally:
        alive.kill()
        alive.wait()
        dead.wait()


@pytest.mark.parametrize("package", SERVICES)
def test_every_service_names_a_bad_variable_in_one_line(package: str) -> None:
    """A bad value was a pydantic traceback naming only the field ("port")."""
    variable = f"HYBRIDMESH_{SERVICES[package]}_PORT"
    started = subprocess.run(
        [sys.executable, "-m", package],
        cwd=REPO,
        env={**ENVIRONMENT, variable: "99999"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert started.returncode == 1, started.stderr
    assert "Traceback" not in started.stderr, started.stderr
    assert f"{variable}='99999': Input should be less than or equal to 65535" in started.stderr


@pytest.mark.parametrize("command", [["status"], ["down"], ["up", "--random-ports"]])
def test_a_state_dir_that_is_a_file_is_one_line_and_exit_2(
    command: list[str], tmp_path: Path
) -> None:
    """It was a NotADirectoryError or FileExistsError traceback."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a directory\n")
    shown = hybridmesh("--state-dir", str(a_file), *command)
    assert shown.returncode == 2, shown.stderr
    assert shown.stderr == f"hybridmesh: error: --state-dir {a_file}: not a directory\n"
    assert a_file.read_text() == "not a directory\n"


def test_demo_runs_the_edge_in_the_router_and_up_keeps_it_a_process() -> None:
    parser = build_parser()
    assert parser.parse_args(["demo"]).edge_mode == "in-process"
    assert parser.parse_args(["up"]).edge_mode == "remote"
    assert parser.parse_args(["up", "--edge-mode", "in-process"]).edge_mode == "in-process"
