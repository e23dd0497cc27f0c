"""`python -m server` / `mla-server`: help, --print-config, and one clear line when it cannot start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import free_port

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset

REPO = Path(__file__).resolve().parent.parent


def run_server(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_every_option():
    result = run_server("--help")
    assert result.returncode == 0
    for option in ("--model", "--host", "--port", "--max-num-seqs", "--log-level", "--config", "--print-config"):
        assert option in result.stdout
    assert "MLA_SERVER_PORT" in result.stdout


def test_print_config_through_the_command(tmp_path):
    config = tmp_path / "server.toml"
    config.write_text("max_num_seqs = 8\n")
    result = run_server("--config", str(config), "--print-config", env={"MLA_SERVER_PORT": "9100"})
    assert result.returncode == 0, result.stderr
    assert "max_num_seqs = 8" in result.stdout and "port = 9100" in result.stdout


def test_bad_setting_exits_2_with_one_line():
    result = run_server(env={"MLA_SERVER_MAX_NUM_SEQS": "many"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "MLA_SERVER_MAX_NUM_SEQS" in result.stderr


def test_port_in_use_exits_1_before_loading_the_model():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        result = run_server("--port", str(port), "--model", "/no/such/model")
    assert result.returncode == 1
    # the port is checked first: the missing model was never reached
    assert result.stderr.strip().splitlines() == [
        f"mla-server: port {port} on 127.0.0.1 is already in use "
        f"(see who holds it: lsof -nP -iTCP:{port} -sTCP:LISTEN); stop that process or choose another --port"
    ]
    assert time.monotonic() - started < 30


def test_missing_model_exits_1_without_a_traceback():
    result = run_server("--port", str(free_port()), "--model", "/no/such/model", "--log-level", "error")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mla-server: ") and "/no/such/model" in last


def test_log_file_is_reopened_after_rotation(tmp_path):
    """newsyslog renames the log; the next record must start a new file, not follow the old one."""
    log = tmp_path / "server.log"
    code = (
        "import logging, os, sys\n"
        "from server.config import Settings\n"
        "from server.serve import _configure_logging\n"
        "_configure_logging(Settings(log_file=sys.argv[1]))\n"
        "logging.getLogger('t').warning('before rotation')\n"
        "os.rename(sys.argv[1], sys.argv[1] + '.0')\n"
        "logging.getLogger('t').warning('after rotation')\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(log)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "before rotation" in (tmp_path / "server.log.0").read_text()
    assert "after rotation" in log.read_text() and "before rotation" not in log.read_text()


def test_the_package_turns_off_mlx_cuda_cache_abort_before_mlx_loads():
    # MLX's CUDA caches throw after 2x their capacity in lifetime misses (server/__init__.py).
    probe = "import os, sys, server; print(os.environ['MLX_ENABLE_CACHE_THRASHING_CHECK'], 'mlx.core' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "MLX_ENABLE_CACHE_THRASHING_CHECK"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "False"]
    env["MLX_ENABLE_CACHE_THRASHING_CHECK"] = "1"  # the user's own value wins
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "False"]
