#!/usr/bin/env python3
"""Run mla-server as a per-user launchd agent on macOS: install, uninstall, status, logs, restart.

    python3 deploy/service.py install --model mlx-community/Some-MLA-Model --port 8080
    python3 deploy/service.py status

Every subcommand is first planned as a list of steps (directories, files, commands), then either
carried out or, with --dry-run, only printed; planning reads the file system but changes nothing
and needs no launchctl, so the plan can be checked on any OS. Standard library only, Python 3.9+
(the macOS system python3 can run it; the server's own environment needs 3.11+).
"""

from __future__ import annotations

import argparse
import grp
import os
import plistlib
import pwd
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).resolve().parent / "templates"
DEFAULT_LABEL = "local.mla-server"
NEWSYSLOG_DIR = Path("/etc/newsyslog.d")


@dataclass
class MakeDir:
    path: Path


@dataclass
class Write:
    path: Path
    text: str


@dataclass
class Remove:
    path: Path


@dataclass
class Run:
    argv: list[str]
    required: bool = True  # a failing required command stops the plan with its exit status


Step = MakeDir | Write | Remove | Run


@dataclass
class Layout:
    """Where one agent's files live; the label keeps several agents (ports, models) apart."""

    label: str
    home: Path = field(default_factory=Path.home)
    uid: int = field(default_factory=os.getuid)

    @property
    def plist(self) -> Path:
        return self.home / "Library" / "LaunchAgents" / f"{self.label}.plist"

    @property
    def workdir(self) -> Path:
        return self.home / "Library" / "Application Support" / self.label

    @property
    def log_dir(self) -> Path:
        return self.home / "Library" / "Logs" / self.label

    @property
    def logs(self) -> dict[str, Path]:
        """The server's own log, then what launchd captures from stdout and stderr."""
        return {name: self.log_dir / f"{name}.log" for name in ("server", "stdout", "stderr")}

    @property
    def newsyslog_staged(self) -> Path:
        return self.workdir / "newsyslog.conf"

    @property
    def newsyslog(self) -> Path:
        return NEWSYSLOG_DIR / f"{self.label}.conf"

    @property
    def domain(self) -> str:
        return f"gui/{self.uid}"

    @property
    def target(self) -> str:
        return f"{self.domain}/{self.label}"


def render_plist(
    layout: Layout,
    python: Path,
    host: str,
    port: int,
    model: str | None = None,
    config: Path | None = None,
    env: dict[str, str] | None = None,
) -> bytes:
    """The agent's plist: the template with the user's paths and values, options appended."""
    with open(TEMPLATES / "agent.plist", "rb") as fh:
        job = plistlib.load(fh)
    logs = layout.logs
    values = {
        "label": layout.label,
        "python": str(python),
        "host": host,
        "port": str(port),
        "workdir": str(layout.workdir),
        "log_file": str(logs["server"]),
        "stdout_log": str(logs["stdout"]),
        "stderr_log": str(logs["stderr"]),
    }
    job = _fill(job, values)
    if model:
        job["ProgramArguments"] += ["--model", model]
    if config:
        job["ProgramArguments"] += ["--config", str(config)]
    job["EnvironmentVariables"].update(env or {})
    return plistlib.dumps(job, sort_keys=False)  # keep the template's order


def render_newsyslog(layout: Layout) -> str:
    """Rotation entries owned by the agent's user: files newsyslog recreates stay writable by it."""
    logs, user = layout.logs, pwd.getpwuid(layout.uid)
    return (
        (TEMPLATES / "newsyslog.conf")
        .read_text()
        .format(
            label=layout.label,
            owner=user.pw_name,
            group=grp.getgrgid(user.pw_gid).gr_name,
            log_file=logs["server"],
            stdout_log=logs["stdout"],
            stderr_log=logs["stderr"],
        )
    )


def plan_install(layout: Layout, args: argparse.Namespace) -> list[Step]:
    venv = Path(args.venv).expanduser().absolute()
    python = venv / "bin" / "python"
    steps: list[Step] = []
    if not python.exists():
        if args.python == sys.executable and sys.version_info < (3, 11):
            raise ValueError("the server needs Python 3.11+: pass --python /path/to/python3.11 (or newer)")
        steps.append(Run([str(Path(args.python).absolute()), "-m", "venv", str(venv)]))
    steps += [
        Run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"]),
        Run([str(python), "-m", "pip", "install", "-q", "-e", str(REPO)]),
        MakeDir(layout.plist.parent),
        MakeDir(layout.workdir),
        MakeDir(layout.log_dir),
    ]
    if layout.plist.exists():
        # Reinstalling replaces the running job; it may not be loaded, hence not required.
        steps.append(Run(["launchctl", "bootout", layout.target], required=False))
    plist = render_plist(
        layout, python, args.host, args.port, _model_ref(args.model), _config_path(args.config), _env_pairs(args.env)
    )
    steps.append(Write(layout.plist, plist.decode()))
    if args.rotate_logs:
        steps += [
            Write(layout.newsyslog_staged, render_newsyslog(layout)),
            Run(["sudo", "install", "-m", "644", str(layout.newsyslog_staged), str(layout.newsyslog)]),
        ]
    steps += [
        # A job once disabled (launchctl disable) refuses to bootstrap until enabled again.
        Run(["launchctl", "enable", layout.target]),
        Run(["launchctl", "bootstrap", layout.domain, str(layout.plist)]),
    ]
    return steps


def plan_uninstall(layout: Layout, args: argparse.Namespace) -> list[Step]:
    steps: list[Step] = [Run(["launchctl", "bootout", layout.target], required=False)]
    if layout.plist.exists():
        steps.append(Remove(layout.plist))
    if layout.newsyslog.exists():
        steps.append(Run(["sudo", "rm", "-f", str(layout.newsyslog)]))
    return steps


def plan_status(layout: Layout, args: argparse.Namespace) -> list[Step]:
    host, port = _installed_address(layout)
    probe = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{f'[{probe}]' if ':' in probe else probe}:{port}/health"
    return [
        Run(["launchctl", "print", layout.target], required=False),
        Run(["curl", "-fsS", "--max-time", "5", url]),
    ]


def plan_logs(layout: Layout, args: argparse.Namespace) -> list[Step]:
    return [Run(["tail", "-n", str(args.lines), "-F", *(str(p) for p in layout.logs.values())])]


def plan_restart(layout: Layout, args: argparse.Namespace) -> list[Step]:
    return [Run(["launchctl", "kickstart", "-k", layout.target])]


PLANS = {
    "install": plan_install,
    "uninstall": plan_uninstall,
    "status": plan_status,
    "logs": plan_logs,
    "restart": plan_restart,
}


def describe(step: Step) -> list[str]:
    """The lines printed for a step; a written file's text follows its path, indented."""
    if isinstance(step, MakeDir):
        return [f"mkdir {shlex.quote(str(step.path))}"]
    if isinstance(step, Write):
        return [f"write {shlex.quote(str(step.path))}"] + ["    " + line for line in step.text.splitlines()]
    if isinstance(step, Remove):
        return [f"remove {shlex.quote(str(step.path))}"]
    return [f"run {shlex.join(step.argv)}"]


def execute(steps: list[Step]) -> int:
    for step in steps:
        print(describe(step)[0], flush=True)
        if isinstance(step, MakeDir):
            step.path.mkdir(parents=True, exist_ok=True)
        elif isinstance(step, Write):
            step.path.write_text(step.text)
        elif isinstance(step, Remove):
            step.path.unlink(missing_ok=True)
        else:
            rc = subprocess.run(step.argv).returncode
            if rc and step.required:
                print(f"failed (exit {rc}): {shlex.join(step.argv)}", file=sys.stderr)
                return rc
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    layout = Layout(args.label)
    try:
        steps = PLANS[args.command](layout, args)
    except ValueError as e:
        print(f"service.py {args.command}: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for step in steps:
            print("\n".join(describe(step)))
        return 0
    try:
        rc = execute(steps)
    except KeyboardInterrupt:  # how `logs` ends
        return 0
    if rc == 0 and args.command == "install":
        print(f"installed {layout.label}; check it with: python3 {shlex.quote(__file__)} status")
    if rc == 0 and args.command == "uninstall":
        print(f"kept {layout.log_dir}, {layout.workdir} and the virtual environment; delete them if unwanted")
    return rc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="service.py", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--label", default=DEFAULT_LABEL, help=f"launchd label (default {DEFAULT_LABEL})")
    common.add_argument("--dry-run", action="store_true", help="print the files and commands, change nothing")
    sub = parser.add_subparsers(dest="command", required=True)
    install = sub.add_parser("install", parents=[common], help="create the environment, write and load the agent")
    install.add_argument("--model", help="local model directory or Hugging Face repo id (default: the demo model)")
    install.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0: the whole network)")
    install.add_argument("--port", type=int, default=8080)
    install.add_argument("--config", help="TOML file with further server options (see docs/deploy.md)")
    install.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server, e.g. HF_TOKEN=...; repeatable",
    )
    install.add_argument("--venv", default=str(REPO / ".venv"), help="virtual environment to create or reuse")
    install.add_argument("--python", default=sys.executable, help="Python 3.11+ that creates the environment")
    install.add_argument(
        "--no-log-rotation",
        dest="rotate_logs",
        action="store_false",
        help="skip the newsyslog entry (its installation asks for your password via sudo)",
    )
    sub.add_parser("uninstall", parents=[common], help="unload the agent, remove its plist and rotation entry")
    sub.add_parser("status", parents=[common], help="launchd's view of the job, then GET /health")
    logs = sub.add_parser("logs", parents=[common], help="follow the log files")
    logs.add_argument("--lines", type=int, default=100, help="lines of history to show first")
    sub.add_parser("restart", parents=[common], help="stop the server (SIGTERM) and start it again")
    return parser


def _fill(value: Any, values: dict[str, str]) -> Any:
    """Formats every string inside a parsed plist with `values`."""
    if isinstance(value, str):
        return value.format_map(values)
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    return value


def _model_ref(model: str | None) -> str | None:
    """A local directory becomes absolute (the agent runs elsewhere); anything else is a repo id."""
    if model and Path(model).expanduser().exists():
        return str(Path(model).expanduser().absolute())
    return model


def _config_path(config: str | None) -> Path | None:
    if config is None:
        return None
    path = Path(config).expanduser().absolute()
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    return path


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--env expects NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def _installed_address(layout: Layout) -> tuple[str, str]:
    """Host and port from the installed plist's command line."""
    if not layout.plist.exists():
        raise ValueError(f"{layout.label} is not installed ({layout.plist} does not exist)")
    with open(layout.plist, "rb") as fh:
        argv = plistlib.load(fh)["ProgramArguments"]
    return argv[argv.index("--host") + 1], argv[argv.index("--port") + 1]


if __name__ == "__main__":
    raise SystemExit(main())
