"""deploy/service.py (launchd agent) and Dockerfile.macos, checked without launchctl or Docker."""

from __future__ import annotations

import grp
import importlib.util
import json
import os
import plistlib
import pwd
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from server.serve import GRACEFUL_SHUTDOWN_S

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset

REPO = Path(__file__).resolve().parents[2]
SERVICE = REPO / "deploy" / "service.py"

spec = importlib.util.spec_from_file_location("deploy_service", SERVICE)
service = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = service  # dataclasses look their module up while the class is built
spec.loader.exec_module(service)


def run_service(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SERVICE), *args],
        env={**os.environ, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=30,
    )


def files_and_commands(stdout: str) -> tuple[list[str], list[list[str]]]:
    """The dry run's `write` paths and `run` commands, in order; written text is indented."""
    files = [shlex.split(line)[1] for line in stdout.splitlines() if line.startswith("write ")]
    commands = [shlex.split(line)[1:] for line in stdout.splitlines() if line.startswith("run ")]
    return files, commands


def written_text(stdout: str, path: Path) -> str:
    lines = stdout.splitlines()
    start = lines.index(f"write {shlex.quote(str(path))}") + 1
    body = []
    for line in lines[start:]:
        if not line.startswith("    "):
            break
        body.append(line[4:])
    return "\n".join(body) + "\n"


@pytest.fixture
def home(tmp_path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


def test_plist_carries_the_users_values(home):
    layout = service.Layout("local.mla-server", home=home, uid=501)
    python = home / "venv" / "bin" / "python"
    config = home / "server.toml"
    raw = service.render_plist(
        layout, python, "0.0.0.0", 9123, model="mlx-community/Some-MLA", config=config, env={"HF_TOKEN": "t"}
    )
    job = plistlib.loads(raw)
    logs = home / "Library" / "Logs" / "local.mla-server"
    assert job["Label"] == "local.mla-server"
    assert job["ProgramArguments"] == [
        str(python), "-m", "server", "--host", "0.0.0.0", "--port", "9123",
        "--log-file", str(logs / "server.log"),
        "--model", "mlx-community/Some-MLA", "--config", str(config),
    ]  # fmt: skip
    assert job["RunAtLoad"] is True
    assert job["KeepAlive"] == {"SuccessfulExit": False}  # restart on a crash, not on exit 0
    assert job["ThrottleInterval"] >= 5
    assert job["ExitTimeOut"] > GRACEFUL_SHUTDOWN_S  # uvicorn cuts stuck streams before launchd kills
    assert job["WorkingDirectory"] == str(home / "Library" / "Application Support" / "local.mla-server")
    assert job["EnvironmentVariables"] == {"PYTHONUNBUFFERED": "1", "HF_TOKEN": "t"}
    assert job["StandardOutPath"] == str(logs / "stdout.log")
    assert job["StandardErrorPath"] == str(logs / "stderr.log")
    assert not re.search(r"\{\w+\}", raw.decode()), "a template placeholder was left unfilled"


def test_plist_without_model_serves_the_demo_model(home):
    layout = service.Layout("local.mla-server", home=home, uid=501)
    job = plistlib.loads(service.render_plist(layout, Path("/v/bin/python"), "127.0.0.1", 8080))
    assert "--model" not in job["ProgramArguments"] and "--config" not in job["ProgramArguments"]


def test_install_dry_run_prints_exactly_the_files_and_commands(home, tmp_path):
    venv, python3 = tmp_path / "venv", "/usr/local/bin/python3.12"
    config = home / "server.toml"
    config.write_text("max_num_seqs = 8\n")
    result = run_service(
        home, "install", "--dry-run", "--model", "mlx-community/Some-MLA", "--host", "0.0.0.0",
        "--port", "9123", "--config", str(config), "--venv", str(venv), "--python", python3, "--env", "HF_TOKEN=t",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    uid, label = os.getuid(), "local.mla-server"
    plist = home / "Library" / "LaunchAgents" / f"{label}.plist"
    staged = home / "Library" / "Application Support" / label / "newsyslog.conf"
    files, commands = files_and_commands(result.stdout)
    assert files == [str(plist), str(staged)]
    assert commands == [
        [python3, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--upgrade", "pip"],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-e", str(REPO)],
        ["sudo", "install", "-m", "644", str(staged), f"/etc/newsyslog.d/{label}.conf"],
        ["launchctl", "enable", f"gui/{uid}/{label}"],
        ["launchctl", "bootstrap", f"gui/{uid}", str(plist)],
    ]
    expected = service.render_plist(
        service.Layout(label, home=home), venv / "bin" / "python", "0.0.0.0", 9123,
        model="mlx-community/Some-MLA", config=config, env={"HF_TOKEN": "t"},
    )  # fmt: skip
    assert plistlib.loads(written_text(result.stdout, plist).encode()) == plistlib.loads(expected)
    # a dry run changes nothing
    assert [p.name for p in home.iterdir()] == ["server.toml"] and not venv.exists()


def test_newsyslog_entry_rotates_every_log_as_the_user(home):
    result = run_service(home, "install", "--dry-run", "--venv", str(home / "venv"), "--python", "/usr/bin/python3")
    staged = home / "Library" / "Application Support" / "local.mla-server" / "newsyslog.conf"
    entries = [line.split() for line in written_text(result.stdout, staged).splitlines() if line.startswith("/")]
    user = pwd.getpwuid(os.getuid())
    owner = f"{user.pw_name}:{grp.getgrgid(user.pw_gid).gr_name}"
    logs = home / "Library" / "Logs" / "local.mla-server"
    assert [e[0] for e in entries] == [str(logs / f"{n}.log") for n in ("server", "stdout", "stderr")]
    for entry in entries:
        assert entry[1] == owner  # rotated files stay writable by the agent
        assert "N" in entry[-1]  # no signal: the default would go to syslogd


def test_reinstall_unloads_the_old_agent_first(home):
    plist = home / "Library" / "LaunchAgents" / "local.mla-server.plist"
    plist.parent.mkdir(parents=True)
    plist.write_bytes(service.render_plist(service.Layout("local.mla-server", home=home), Path("/p"), "h", 1))
    venv = home / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()  # an existing environment is reused, not recreated
    result = run_service(home, "install", "--dry-run", "--venv", str(venv), "--no-log-rotation")
    _, commands = files_and_commands(result.stdout)
    target = f"gui/{os.getuid()}/local.mla-server"
    assert [c for c in commands if c[0] != str(venv / "bin" / "python")] == [
        ["launchctl", "bootout", target],
        ["launchctl", "enable", target],
        ["launchctl", "bootstrap", f"gui/{os.getuid()}", str(plist)],
    ]


@pytest.mark.parametrize(
    "command, expected",
    [
        ("uninstall", [["launchctl", "bootout", "{target}"]]),
        ("restart", [["launchctl", "kickstart", "-k", "{target}"]]),
        (
            "status",
            [["launchctl", "print", "{target}"], ["curl", "-fsS", "--max-time", "5", "http://127.0.0.1:9123/health"]],
        ),
        ("logs", [["tail", "-n", "100", "-F", "{logs}/server.log", "{logs}/stdout.log", "{logs}/stderr.log"]]),
    ],
)
def test_other_commands_dry_run(home, command, expected):
    layout = service.Layout("local.mla-server", home=home)
    layout.plist.parent.mkdir(parents=True)
    layout.plist.write_bytes(service.render_plist(layout, Path("/p"), "0.0.0.0", 9123))
    result = run_service(home, command, "--dry-run")
    assert result.returncode == 0, result.stderr
    files, commands = files_and_commands(result.stdout)
    values = {"target": f"gui/{os.getuid()}/local.mla-server", "logs": str(layout.log_dir)}
    assert commands == [[arg.format(**values) for arg in c] for c in expected]
    assert files == []
    if command == "uninstall":
        assert f"remove {shlex.quote(str(layout.plist))}" in result.stdout.splitlines()
        assert layout.plist.exists()


def test_status_when_not_installed(home):
    result = run_service(home, "status")
    assert result.returncode == 2 and "not installed" in result.stderr


def test_missing_config_file_is_refused(home):
    result = run_service(home, "install", "--dry-run", "--config", str(home / "nope.toml"))
    assert result.returncode == 2 and "nope.toml does not exist" in result.stderr


def pip_install_targets(text: str) -> list[list[str]]:
    """What each `pip install` line installs, flags (-q, -e, --upgrade) left out."""
    targets = []
    for match in re.finditer(r"pip install ([^\n&;]+)", text.replace("\\\n", " ")):
        args = [a for a in shlex.split(match.group(1)) if not a.startswith("-")]
        if args != ["pip"]:
            targets.append(args)
    return targets


def test_dockerfile_installs_the_readme_requirements_and_runs_the_server():
    dockerfile = (REPO / "Dockerfile.macos").read_text()
    # The README's quick start runs scripts/serve.sh, which installs this project from pyproject.toml.
    assert "scripts/serve.sh" in (REPO / "README.md").read_text()
    readme_install = pip_install_targets((REPO / "scripts" / "serve.sh").read_text())
    assert readme_install == [["."]]
    assert pip_install_targets(dockerfile) == readme_install
    assert re.search(r"^COPY pyproject\.toml", dockerfile, re.M)

    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M)
    assert entrypoint and json.loads(entrypoint.group(1)) == ["python", "-m", "server", "--host", "0.0.0.0"]
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", dockerfile, re.M)
    assert re.search(r"^EXPOSE 8080$", dockerfile, re.M)
    assert re.search(r"^VOLUME /models$", dockerfile, re.M)
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    header = dockerfile.split("\nFROM ")[0]
    assert "Metal" in header and "launchd" in header


def test_install_then_uninstall_for_real_with_stub_commands(home, tmp_path):
    """Without --dry-run: files land where the dry run said, commands run in its order."""
    calls, stubs = tmp_path / "calls.txt", tmp_path / "bin"
    stubs.mkdir()
    venv_python = home / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    for stub in (stubs / "launchctl", stubs / "sudo", venv_python):
        stub.write_text(f'#!/bin/sh\n{{ printf "%s\\t" "$(basename "$0")" "$@"; echo; }} >> {calls}\n')
        stub.chmod(0o755)
    env_path = {"PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, str(SERVICE), *args], env={**os.environ, "HOME": str(home), **env_path},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    dry = run("install", "--dry-run", "--venv", str(venv_python.parent.parent), "--port", "9200")
    real = run("install", "--venv", str(venv_python.parent.parent), "--port", "9200")
    assert real.returncode == 0, real.stderr
    layout = service.Layout("local.mla-server", home=home)
    assert layout.plist.read_text() == written_text(dry.stdout, layout.plist)
    assert layout.newsyslog_staged.read_text() == written_text(dry.stdout, layout.newsyslog_staged)
    assert layout.log_dir.is_dir() and layout.workdir.is_dir()
    ran = [line.rstrip("\t").split("\t") for line in calls.read_text().splitlines()]
    _, planned = files_and_commands(dry.stdout)
    assert ran == [[Path(c[0]).name, *c[1:]] for c in planned]

    calls.unlink()
    assert run("uninstall").returncode == 0
    assert not layout.plist.exists()
    assert calls.read_text().split() == ["launchctl", "bootout", f"gui/{os.getuid()}/local.mla-server"]


def test_tensor_parallel_example_is_a_set_mlx_launch_reads_and_launchd_restarts():
    """deploy/tensor-parallel/: the hostfile parses as mlx.launch parses it, and the agent runs
    mlx.launch over it with our server after `--`, restarting on every exit (mlx.launch exits 0
    even when a rank died)."""
    from mlx._distributed_utils.common import Hostfile

    here = REPO / "deploy" / "tensor-parallel"
    hosts = Hostfile.from_file(str(here / "hosts.json")).hosts
    assert [h.ssh_hostname for h in hosts] == ["studio-1.local", "studio-2.local"] and all(h.ips for h in hosts)
    with open(here / "local.mla-server-set.plist", "rb") as f:
        agent = plistlib.load(f)
    argv = agent["ProgramArguments"]
    assert Path(argv[0]).name == "mlx.launch" and argv[argv.index("--hostfile") + 1].endswith("hosts.json")
    assert argv[argv.index("--") + 2 : argv.index("--") + 4] == ["-m", "server"]
    assert agent["KeepAlive"] is True and agent["RunAtLoad"] is True
