"""The `serving` section of docs/benchmarks.md: tables and plots rendered from every side-by-side
summary in docs/bench/. What the numbers mean is written by hand in docs/benchmarks.md, above the
section.

Plots are drawn here, from the summaries, so a run on a machine without matplotlib (the GPU machine)
still yields everything the docs need.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from server.bench.report import provenance, results_table, update_section

SECTION = "serving"

_REPORTED = re.compile(r"cache|mem|bytes|peak|preempt")


def _reported(health: dict[str, Any] | None, prefix: str = "") -> list[str]:
    """`key=value` for the memory and cache figures anywhere in a /health JSON."""
    out = []
    for key, value in (health or {}).items():
        if isinstance(value, dict):
            out += _reported(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and _REPORTED.search(key):
            out.append(f"{prefix}{key}={value}")
    return out


def _fmt_mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.0f}"


def _memory_table(run: dict[str, Any]) -> str:
    cache = run["cache_bytes_per_token_layer"]
    lines = [
        "| server | cache bytes / token / layer | peak RSS MiB (max over cells) | startup s (max) "
        "| cold start s (first cell: start + first request) | exit | /health cache figures (last cell) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in run["servers"]:
        shown = ", ".join(_reported(s.get("health"))) or "–"
        startup = "–" if s["startup_s"] is None else f"{s['startup_s']:.1f}"
        first = (s.get("first_startup_s"), s.get("first_request_s"))
        cold = "–" if None in first else f"{first[0]:.1f} + {first[1]:.1f}"
        lines.append(
            f"| {s['label']} | {cache.get(s['name'], '–')} | {_fmt_mib(s['peak_rss_bytes'])} | "
            f"{startup} | {cold} | {s['exit_code']} | {shown} |"
        )
    return "\n".join(lines)


def _first_difference(a: list[str], b: list[str]) -> int:
    """The index of the first word where `a` and `b` differ (the shorter's length if one is a prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _greedy_lines(servers: list[dict[str, Any]]) -> list[str]:
    """How many greedy outputs of each server equal the first server's, word for word."""
    ran = [s for s in servers if s.get("greedy")]
    if len(ran) < 2:
        return []
    first = ran[0]
    lines = []
    for other in ran[1:]:
        pairs = list(zip(first["greedy"], other["greedy"], strict=True))
        same = sum(a == b for a, b in pairs)
        where = [_first_difference(a.split(), b.split()) for a, b in pairs if a != b]
        differ = f"; the others first differ at word {', '.join(map(str, where))}" if where else ""
        lines.append(f"- {other['label']}: {same} of {len(pairs)} identical to {first['label']}'s{differ}")
    return ["", f"#### Greedy outputs ({len(first['greedy'])} prompts, 32 tokens each)", "", *lines]


def _plot(series: dict[str, list[dict[str, Any]]], png: Path, source: Path, title: str) -> bool:
    """Draw `png` unless it is newer than its `source` summary; False without matplotlib."""
    if png.exists() and png.stat().st_mtime >= source.stat().st_mtime:
        return True
    try:
        from server.bench.plots import plot_series

        plot_series(series, png, title)
    except ImportError:
        print(f"matplotlib is not installed: {png} not drawn", file=sys.stderr)
        return False
    return True


def render_run(run: dict[str, Any], docs_dir: Path, source: Path) -> str:
    """Markdown for one device's summary (`source`), drawing its plots beside it."""
    m, st = run["model"], run["settings"]
    out = [
        f"### {run['tag']}: {run['device']}",
        "",
        provenance(run["date"], run["device"], run["command"]) + f" ({run['wall_s'] / 60:.1f} min). "
        f"Model: `{m['model_type']}`, "
        f"{m['layers']} layers, {m['dtype']}-byte dtype, context {m['context']}. Cells: "
        f"{st['requests_per_client']} requests per client (at least 4), "
        f"{st['max_tokens']} output tokens.",
    ]
    for (requested, used), seconds in zip(st["prompt_plan"], st["cell_seconds"], strict=True):
        clamp = "" if requested == used else f"; asked for {requested}, clamped to the model's context"
        series = {
            s["label"]: [c for c in s["cells"] if c["prompt_tokens_requested"] == requested] for s in run["servers"]
        }
        series = {k: v for k, v in series.items() if v}
        out += ["", f"#### ~{used}-token prompts ({seconds:.0f} s per cell{clamp})", ""]
        out.append(results_table(series) if series else "No cell ran.")
        png = source.parent / f"side_by_side_{run['tag']}_{requested}.png"
        if series and _plot(series, png, source, f"{run['device']}: ~{used}-token prompts"):
            out += ["", f"![{run['tag']} ~{used}-token prompts]({os.path.relpath(png, docs_dir)})"]
    out += ["", "#### Memory", "", _memory_table(run), *_greedy_lines(run["servers"])]
    failed = [f"- {s['label']} failed: {s['error'].splitlines()[0]}" for s in run["servers"] if s["error"]]
    if failed:
        out += ["", *failed]
    return "\n".join(out)


def render_section(docs: str | Path, data_dir: str | Path) -> str:
    """Rewrite the `serving` section of `docs` from `data_dir/side_by_side_*.json`; returns its text."""
    docs, data_dir = Path(docs), Path(data_dir)
    runs = [(json.loads(p.read_text()), p) for p in sorted(data_dir.glob("side_by_side_*.json"))]
    runs.sort(key=lambda run_path: run_path[0]["tag"] != "cpu")
    parts = [render_run(run, docs.parent, path) for run, path in runs]
    text = "\n\n".join(parts) or "No side-by-side summary yet."
    update_section(docs, SECTION, text)
    return text
