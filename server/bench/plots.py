"""PNG plots of load-run summaries against concurrency; matplotlib is imported only when plotting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# (summary key, sub-key, name, line style) for the latency panel; a series keeps one colour.
_LATENCY = (
    ("ttft_ms", "p50", "TTFT p50", "-"),
    ("ttft_ms", "p99", "TTFT p99", "--"),
    ("itl_ms", "p50", "ITL p50", ":"),
)


def plot_series(series: dict[str, list[dict[str, Any]]], path: str | Path, title: str) -> Path:
    """Write one PNG: aggregate tokens/s (left) and latencies (right) against concurrency.

    `series` maps a label (a server, a prompt length) to `run_load` results, one per concurrency.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(14, 4.5))
    for i, (label, results) in enumerate(series.items()):
        colour = f"C{i % 10}"
        xs = [r["config"]["concurrency"] for r in results]
        sums = [r["summary"] for r in results]
        ax_tp.plot(xs, [s["aggregate_tokens_per_s"] or 0.0 for s in sums], marker="o", color=colour, label=label)
        for key, sub, name, style in _LATENCY:
            ys = [float("nan") if s[key][sub] is None else s[key][sub] for s in sums]
            ax_lat.plot(xs, ys, style, marker=".", color=colour, label=f"{label}: {name}")
    ticks = sorted({r["config"]["concurrency"] for results in series.values() for r in results})
    ax_tp.set(xlabel="concurrent clients", ylabel="output tokens/s (aggregate)", title="Throughput")
    ax_lat.set(xlabel="concurrent clients", ylabel="ms", title="Latency", yscale="log")
    for ax in (ax_tp, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.grid(True, alpha=0.3)
    ax_tp.legend(fontsize=7)
    ax_lat.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
