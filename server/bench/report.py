"""Rewrite one named section of docs/benchmarks.md, leaving the others alone.

Several benchmark scripts (kernel, engine, serving) share the file; each owns the text between
`<!-- section:NAME -->` and `<!-- /section:NAME -->`, so reruns replace only their own numbers.
"""

from __future__ import annotations

import re
from pathlib import Path

TITLE = "# Benchmarks\n"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- section:{name} -->", f"<!-- /section:{name} -->"


def update_section(path: str | Path, name: str, markdown: str) -> None:
    """Replace section `name` of the markdown file at `path` with `markdown`.

    Creates the file (with a `# Benchmarks` title) and appends the section when either is missing.
    """
    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"section name must be a plain word, got {name!r}")
    path = Path(path)
    start, end = _markers(name)
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else TITLE
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i >= 0 and j >= 0:
        text = text[:i] + block + text[j + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def results_table(series: dict[str, list[dict]]) -> str:
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
