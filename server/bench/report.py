"""What every benchmark subcommand shares when it reports: the device, the date, the command line,
and one way to rewrite its own section of docs/benchmarks.md.

Several subcommands (kernel, engine, side-by-side) share the file; each owns the text between
`<!-- section:NAME -->` and `<!-- /section:NAME -->`, so reruns replace only their own numbers.
Text outside the markers (the prose written by hand) is never touched.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.platform import current_platform

TITLE = "# Benchmarks\n"
DOCS = Path("docs/benchmarks.md")


# ---- where, when, how ----------------------------------------------------------------------


def device_name() -> str:
    """The device MLX computes on by default, named for a report: `NVIDIA H100 80GB HBM3 (MLX CUDA)`,
    `Apple M2 Max (MLX Metal)` or `CPU <model name>, N cores (MLX CPU)`."""
    plat = current_platform()
    if plat.backend == "cuda":
        return f"{plat.device_name or 'GPU'} (MLX CUDA)"
    if plat.backend == "metal":
        return f"{plat.device_name or platform.machine()} (MLX Metal)"
    return f"CPU {_cpu_model(plat.device_name)}, {os.cpu_count()} cores (MLX CPU)"


def _cpu_model(device_name: str) -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    if sys.platform == "darwin":
        import subprocess

        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        if out.stdout.strip():
            return out.stdout.strip()
    return device_name or platform.processor() or platform.machine()


def utc_now() -> str:
    """The date and time a run started, as every section writes it."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def command_line(subcommand: str, argv: Sequence[str] | None = None) -> str:
    """`python -m server.bench SUBCOMMAND ARGS...`, shell-quoted: how to rerun what is reported.
    `argv` defaults to this process's arguments after the subcommand."""
    if argv is None:
        args = sys.argv[1:]
        argv = args[1:] if args[:1] == [subcommand] else args
    return shlex.join(["python", "-m", "server.bench", subcommand, *argv])


def provenance(date: str, device: str, command: str) -> str:
    """The line under every generated heading: when, where and how the numbers were taken."""
    return f"{date}, {device}. Command: `{command}`"


def headed(title: str, started: str, subcommand: str, argv: list[str] | None, *body: str) -> str:
    """A generated section: `### {title} on {this device}`, its provenance line, then `body`."""
    device = device_name()
    lines = [f"### {title} on {device}", "", provenance(started, device, command_line(subcommand, argv)) + ".", ""]
    return "\n".join([*lines, *body])


# ---- docs/benchmarks.md --------------------------------------------------------------------


def _span(text: str, name: str) -> tuple[int, int] | None:
    """Where section `name` starts (its opening marker) and ends (after its closing marker)."""
    start, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    return (i, j + len(end)) if i >= 0 and j >= 0 else None


def read_section(path: str | Path, name: str) -> str | None:
    """The text of section `name` of the markdown file at `path`, or None when it has none."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    span = _span(text, name)
    if span is None:
        return None
    body = text[span[0] : span[1]]
    return body[body.index("\n") + 1 : body.rindex("\n")]


def update_section(path: str | Path, name: str, markdown: str) -> None:
    """Replace section `name` of the markdown file at `path` with `markdown`.

    Creates the file (with a `# Benchmarks` title) and appends the section when either is missing.
    """
    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"section name must be a plain word, got {name!r}")
    path = Path(path)
    block = f"<!-- section:{name} -->\n{markdown.strip()}\n<!-- /section:{name} -->"
    text = path.read_text() if path.exists() else TITLE
    span = _span(text, name)
    text = text.rstrip("\n") + "\n\n" + block + "\n" if span is None else text[: span[0]] + block + text[span[1] :]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---- tables --------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def results_table(series: dict[str, list[dict[str, Any]]]) -> str:
    """A markdown table with one row per (label, concurrency) of `run_load` results; results that
    carry `peak_rss_bytes` (the side-by-side runner's) get a server memory column."""
    rss = any("peak_rss_bytes" in r for results in series.values() for r in results)
    lines = [
        "| run | clients | done/sent | errors | prompt / out tok | TTFT p50 / p90 / p99 ms | ITL p50 / p99 ms"
        " | req tok/s (mean) | total tok/s |" + (" peak RSS MiB |" if rss else ""),
        "|---|---:|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if rss else ""),
    ]
    for label, results in series.items():
        for r in results:
            s = r["summary"]
            errors = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())) or "0"
            ttft = " / ".join(_fmt(s["ttft_ms"][p], 0) for p in ("p50", "p90", "p99"))
            itl = " / ".join(_fmt(s["itl_ms"][p]) for p in ("p50", "p99"))
            mib = r.get("peak_rss_bytes")
            lines.append(
                f"| {label} | {r['config']['concurrency']} | {s['completed']}/{s['requests']} | {errors}"
                f" | {_fmt(s['mean_prompt_tokens'], 0)} / {_fmt(s['mean_output_tokens'], 0)} | {ttft} | {itl}"
                f" | {_fmt(s['request_tokens_per_s']['mean'])} | {_fmt(s['aggregate_tokens_per_s'])} |"
                + (f" {_fmt(None if mib is None else mib / 2**20, 0)} |" if rss else "")
            )
    return "\n".join(lines)
