"""The `serving` section of docs/benchmarks.md, rendered from every side-by-side summary in docs/bench/.

Plots are drawn here, from the summaries, so a run on a machine without matplotlib (the GPU machine)
still yields everything the docs need.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from server.bench.report import results_table, update_section

SECTION = "serving"

GPU_COMMANDS = (
    "python3 -m server.engine.synthetic_model /tmp/msm4-8l --layers 8 --shape mistral-small-4",
    "python3 -m server.bench.side_by_side --model /tmp/msm4-8l --tag h100 --cell-seconds 20,40 "
    "--results-dir $OUT/side_by_side --docs $OUT/benchmarks.md --docs-data $OUT/bench",
)

INTRO = """\
## Serving: side by side with mlx_lm.server

`python -m server.bench.side_by_side` runs ours, `mlx_lm.server` as it batches by default, and
`mlx_lm.server --kv-bits 4` in turn on the same model directory and machine. Every cell (prompt
length x concurrency) gets a fresh server process, so requests a time bound cut off cannot slow the
next cell and the peak RSS belongs to that cell; after one short unrecorded warm-up request the load
generator (`python -m server.bench`) drives it: streaming clients, greedy decoding, EOS suppressed
with `logit_bias` so every request produces `max_tokens`, distinct random-word prompts so no prefix
cache helps, a request count and a time bound per cell. TTFT is from sending the request to the
first content chunk; ITL is the gap between content chunks; "req tok/s" is a request's decode rate
after its first token; "total tok/s" is every output token received in the cell over the cell's wall
time. Requests still running when the time bound passes are cut (counted in "done/sent", not as
errors), so a cell with few done requests reports the latencies of the lucky ones. Peak RSS is the
server process's high-water mark (Linux VmHWM; sampled `ps -o rss` on macOS, where Metal buffers
are not all counted). Cache bytes are per token per layer, computed from the model's config
(server/bench/cache_bytes.py). Full per-request results go to `--results-dir` (default
`out/bench/side_by_side/`); the summaries this section is rendered from live in `docs/bench/`.

The same load generator tests any OpenAI-compatible server on this machine, e.g.
`python -m server.bench --base-url http://127.0.0.1:8080/v1 -c 1,4,16,64 --prompt-len uniform:512:2048
--max-tokens 128 --duration 60` (or `--replay requests.jsonl`); it prints the table, writes JSON and a
PNG under `out/bench/`.

mlx-lm 0.32.2 facts that shape the `--kv-bits 4` rows, checked on this version: `--kv-bits` disables
batching (requests are served one at a time); the cache stays full precision until
`--quantized-kv-start` tokens (default 5000); and mlx-lm's `mistral4` cannot decode from a quantized
cache at all (with the rope head 16 wide the quantize fails on group size 64; with 64 wide the
decode path raises `AttributeError: 'list' object has no attribute 'swapaxes'`), so any request
past 5000 tokens fails there (the `protocol` errors: the stream ends without `[DONE]`).
`mlx_lm.server` serves through Python's `ThreadingHTTPServer`, whose listen backlog is
socketserver's default of 5: a burst of 16-64 connects to a busy process gets some connections reset
before any byte (the `connection` errors, httpx `ReadError`). A plain `ThreadingHTTPServer` next to
a CPU-bound thread showed the same here (2 of 64 reset with backlog 5, none with 128).

CPU rows come from a small shared development machine with the tiny demo model: read them as a check
of the tooling and of relative behaviour, not as performance figures."""


_REPORTED = re.compile(r"cache|mem|bytes|peak|preempt")


def _reported(health: dict | None, prefix: str = "") -> list[str]:
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


def _memory_table(run: dict) -> str:
    cache = run["cache_bytes_per_token_layer"]
    lines = ["| server | cache bytes / token / layer | peak RSS MiB (max over cells) | startup s (max) | exit | /health cache figures (last cell) |",
             "|---|---:|---:|---:|---:|---|"]
    for s in run["servers"]:
        shown = ", ".join(_reported(s.get("health"))) or "–"
        startup = "–" if s["startup_s"] is None else f"{s['startup_s']:.1f}"
        lines.append(f"| {s['label']} | {cache.get(s['name'], '–')} | {_fmt_mib(s['peak_rss_bytes'])} | "
                     f"{startup} | {s['exit_code']} | {shown} |")
    return "\n".join(lines)


def _plot(series: dict, png: Path, source: Path, title: str) -> bool:
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


def render_run(run: dict, docs_dir: Path, source: Path) -> str:
    """Markdown for one device's summary (`source`), drawing its plots beside it."""
    m, st = run["model"], run["settings"]
    out = [
        f"### {run['tag']}: {run['device']}, {run['date']}",
        "",
        f"Command: `{run['command']}` ({run['wall_s'] / 60:.1f} min). Model: `{m['model_type']}`, "
        f"{m['layers']} layers, {m['dtype']}-byte dtype, context {m['context']}. Cells: "
        f"{st['requests_per_client']} requests per client (at least 4), "
        f"{st['max_tokens']} output tokens.",
    ]
    for (requested, used), seconds in zip(st["prompt_plan"], st["cell_seconds"]):
        clamp = "" if requested == used else f"; asked for {requested}, clamped to the model's context"
        series = {s["label"]: [c for c in s["cells"] if c["prompt_tokens_requested"] == requested]
                  for s in run["servers"]}
        series = {k: v for k, v in series.items() if v}
        out += ["", f"#### ~{used}-token prompts ({seconds:.0f} s per cell{clamp})", ""]
        out.append(results_table(series) if series else "No cell ran.")
        png = source.parent / f"side_by_side_{run['tag']}_{requested}.png"
        if series and _plot(series, png, source, f"{run['device']}: ~{used}-token prompts"):
            out += ["", f"![{run['tag']} ~{used}-token prompts]({os.path.relpath(png, docs_dir)})"]
    out += ["", "#### Memory", "", _memory_table(run)]
    failed = [f"- {s['label']} failed: {s['error'].splitlines()[0]}" for s in run["servers"] if s["error"]]
    if failed:
        out += ["", *failed]
    return "\n".join(out)


def render_section(docs: str | Path, data_dir: str | Path) -> str:
    """Rewrite the `serving` section of `docs` from `data_dir/side_by_side_*.json`; returns its text."""
    docs, data_dir = Path(docs), Path(data_dir)
    runs = [(json.loads(p.read_text()), p) for p in sorted(data_dir.glob("side_by_side_*.json"))]
    runs.sort(key=lambda run_path: run_path[0]["tag"] != "cpu")
    parts = [INTRO] + [render_run(run, docs.parent, path) for run, path in runs]
    if not any(run["tag"] in ("h100", "cuda") for run, _ in runs):
        parts.append(
            "### h100: to be run on the H100\n\n"
            "Not run yet. On the GPU machine, with a Mistral-Small-4-shaped model directory (real\n"
            "dimensions, 8 layers, random 4-bit weights in HF layout, `embed_q`/`unembed_out` unquantized):\n\n"
            + "".join(f"    {c}\n" for c in GPU_COMMANDS) + "\n"
            "then copy `$OUT/bench/side_by_side_h100*` into docs/bench/ and run\n"
            "`python -m server.bench.side_by_side --render-only` to re-render this section."
        )
    text = "\n\n".join(parts)
    update_section(docs, SECTION, text)
    return text
