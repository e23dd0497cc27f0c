"""`python -m server.bench side-by-side`: our server and mlx_lm.server on one model and machine, in turn.

Each server is started, driven at every (prompt length, concurrency) cell with a bounded request
count and time, read for peak memory and stopped. Full results go to --results-dir; a summary JSON
and PNGs per device tag go to docs/bench/, and the `serving` section of docs/benchmarks.md is
re-rendered from every tag's summary there (so a CPU run and a GPU run sit side by side).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import httpx

from server.bench import cache_bytes
from server.bench.loadgen import LoadConfig, run_load
from server.bench.prompts import (
    DEFAULT_WORDS,
    LengthDist,
    SyntheticPrompts,
    calibrate_tokens_per_word,
    words_for_tokenizer,
)
from server.bench.render import render_section
from server.bench.report import command_line, device_name, utc_now
from server.bench.serve import concurrency_list
from server.bench.servers import ServerProcess, free_port, mlx_launch, python_module
from server.platform import current_platform

# Room for the chat template and the output when a prompt length is clamped to the context.
_TEMPLATE_MARGIN = 64


class PromptWords(TypedDict):
    """How prompts are built for this model's tokenizer (SyntheticPrompts' keyword arguments)."""

    tokens_per_word: float
    words: Sequence[str]


@dataclass(frozen=True)
class ServerKind:
    label: str
    module_args: tuple[str, ...]  # `python -m` module and its arguments before --model
    extra: tuple[str, ...] = ()
    model_name: str | None = None  # None: ask GET /v1/models
    ranks: int = 1  # > 1: tensor parallel, that many processes started by mlx.launch

    @property
    def ours(self) -> bool:
        return self.module_args[0] == "server"

    def argv(self, model: Path, port: int, user_args: list[str]) -> list[str]:
        launch = mlx_launch(self.ranks) if self.ranks > 1 else []
        return launch + python_module(
            *self.module_args,
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *self.extra,
            *user_args,
        )


SERVERS = {
    "ours": ServerKind("ours (INT4 paged latent)", ("server",)),
    # Two ranks on one machine (nccl over two GPUs, ring on a CPU): issue 13's tensor-parallel rows.
    "ours_tp2": ServerKind("ours, 2 ranks (tensor parallel)", ("server",), ranks=2),
    # mlx_lm.server maps the name "default_model" to its --model; another name would make it load that.
    "mlx_lm": ServerKind("mlx_lm.server", ("mlx_lm", "server"), model_name="default_model"),
    "mlx_lm_kv4": ServerKind(
        "mlx_lm.server --kv-bits 4", ("mlx_lm", "server"), ("--kv-bits", "4"), model_name="default_model"
    ),
}

DEFAULT_SERVERS = ["ours", "mlx_lm", "mlx_lm_kv4"]


def seconds_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seconds, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("cell time bounds must be > 0")
    return values


def server_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SERVERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"servers must be among {', '.join(SERVERS)}; got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server.bench side-by-side",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, help="model directory (default: the embedded demo model)")
    p.add_argument(
        "--servers",
        type=server_list,
        default=DEFAULT_SERVERS,
        help=f"among {', '.join(SERVERS)} (default: {','.join(DEFAULT_SERVERS)})",
    )
    p.add_argument("--concurrency", type=concurrency_list, default=[1, 4, 16, 64])
    p.add_argument(
        "--prompt-tokens",
        type=concurrency_list,
        default=[1024, 8192],
        help="prompt lengths; clamped to the model's context",
    )
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--requests-per-client", type=int, default=2, help="requests per cell = this x clients, >= 4")
    p.add_argument(
        "--cell-seconds",
        type=seconds_list,
        default=[30.0, 60.0],
        help="time bound of one cell, one per prompt length or one for all (default 30,60)",
    )
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument(
        "--warm",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measured cell, a warm pass of this many seconds (at most one request per client) at "
        "the cell's prompt length and concurrency on other prompts; the cold first request and the warm "
        "pass are reported apart (default 0: off)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="concurrency 1,4,16, 1K prompts, 16 output tokens, 1 request per client, 15 s cells",
    )
    p.add_argument(
        "--greedy-prompts",
        type=int,
        default=0,
        metavar="N",
        help="on each server's first cell, N fixed prompts decoded greedily (32 tokens); the docs say which "
        "servers' outputs equal the first server's (default 0: off)",
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature of the measured requests (default 0)"
    )
    p.add_argument(
        "--allow-eos",
        action="store_true",
        help="let answers end at EOS (default: EOS suppressed on both servers, so output lengths are equal)",
    )
    p.add_argument("--tag", help="device tag naming the docs files (default: cpu, cuda or metal)")
    p.add_argument("--device", help="device description for the docs (default: detected)")
    p.add_argument("--ours-args", default="", help="extra arguments for our server (one shell-quoted string)")
    p.add_argument("--mlx-lm-args", default="", help="extra arguments for both mlx_lm.server runs")
    p.add_argument("--results-dir", type=Path, default=Path("out/bench/side_by_side"))
    p.add_argument("--docs", type=Path, default=Path("docs/benchmarks.md"))
    p.add_argument("--docs-data", type=Path, default=Path("docs/bench"), help="summary JSON and PNGs")
    p.add_argument("--no-docs", action="store_true", help="write --results-dir only")
    p.add_argument("--render-only", action="store_true", help="re-render the docs section from --docs-data")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.argv = argv  # as given, for the command line the docs record (None: this process's)
    if args.quick:
        args.concurrency, args.prompt_tokens = [c for c in args.concurrency if c <= 16] or [1], [1024]
        args.max_tokens, args.requests_per_client, args.cell_seconds = 16, 1, [15.0]
    if len(args.cell_seconds) == 1:
        args.cell_seconds = args.cell_seconds * len(args.prompt_tokens)
    if len(args.cell_seconds) != len(args.prompt_tokens):
        p.error("--cell-seconds takes one value, or one per --prompt-tokens length")
    if args.max_tokens < 1 or args.requests_per_client < 1:
        p.error("--max-tokens and --requests-per-client must be >= 1")
    for name in ("ours_args", "mlx_lm_args"):
        try:
            setattr(args, name, shlex.split(getattr(args, name)))
        except ValueError as e:
            p.error(f"--{name.replace('_', '-')}: {e}")
    return args


def prompt_plan(requested: list[int], context: int, max_tokens: int) -> list[tuple[int, int]]:
    """(requested, used) prompt lengths: each clamped so prompt + template + output fit the context."""
    limit = context - max_tokens - _TEMPLATE_MARGIN
    if limit < 1:
        raise ValueError(f"--max-tokens {max_tokens} leaves no room for a prompt in a {context}-token context")
    return [(n, min(n, limit)) for n in requested]


def run_cell(
    name: str,
    args: argparse.Namespace,
    model: Path,
    used: int,
    seconds: float,
    clients: int,
    prompt_kw: PromptWords,
    extra: dict[str, Any],
    greedy_prompts: int = 0,
) -> dict[str, Any]:
    """One fresh server process for one (prompt length, concurrency) cell, so that requests a time
    bound cut off cannot slow the next cell, and the process's peak memory belongs to this cell.
    With `greedy_prompts`, it also records that many greedy outputs (`greedy_outputs`)."""
    kind = SERVERS[name]
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    argv = kind.argv(model, port, args.ours_args if kind.ours else args.mlx_lm_args)
    server = ServerProcess(argv, base, args.results_dir / f"{name}_{used}_c{clients}.log")
    print(f"== {kind.label}, ~{used}-token prompts, {clients} clients: {shlex.join(argv)}", file=sys.stderr)
    common: dict[str, Any] = dict(
        base_url=base,
        model=kind.model_name,
        temperature=args.temperature,
        ignore_eos=not args.allow_eos,
        extra_body=extra,
        request_timeout_s=max(seconds, 60.0),
    )
    cell: dict[str, Any] = {
        "prompt_tokens_target": used,
        "cell_seconds": seconds,
        "argv": argv,
        "error": None,
        "health": None,
    }
    t0 = time.monotonic()
    server.start()
    try:
        server.wait_healthy(args.startup_timeout)
        cell["startup_s"] = time.monotonic() - t0
        # Compile and allocate on a short request first, unrecorded (its time is the cold start).
        warm = SyntheticPrompts(LengthDist("fixed", min(used, 128)), 4, seed=-1, **prompt_kw)
        t1 = time.monotonic()
        asyncio.run(run_load(warm, LoadConfig(num_requests=1, warmup_requests=0, progress=False, **common)))
        cell["cold_first_request_s"] = time.monotonic() - t1
        if greedy_prompts:
            cell["greedy"] = greedy_outputs(base, kind.model_name, prompt_kw, greedy_prompts, extra)
        if args.warm > 0:
            # The cell's own shapes on other prompts (another seed), so the measured prompts are
            # still real prefills, not prefix-cache hits.
            warm = SyntheticPrompts(LengthDist("fixed", used), args.max_tokens, seed=used + 7_919, **prompt_kw)
            t1 = time.monotonic()
            wcfg = LoadConfig(
                concurrency=clients, num_requests=clients, duration_s=args.warm, warmup_requests=0, **common
            )
            warm_result = asyncio.run(run_load(warm, wcfg))
            cell["warm_pass"] = {"seconds": time.monotonic() - t1, "summary": warm_result.get("summary")}
        source = SyntheticPrompts(LengthDist("fixed", used), args.max_tokens, seed=used, **prompt_kw)
        cfg = LoadConfig(
            concurrency=clients,
            num_requests=max(4, args.requests_per_client * clients),
            duration_s=seconds,
            warmup_requests=0,
            **common,
        )
        cell.update(asyncio.run(run_load(source, cfg)))
        cell["health"] = server.health()
    except (RuntimeError, TimeoutError, httpx.HTTPError) as e:
        cell["error"] = str(e)
    finally:
        cell["exit_code"] = server.stop()
    cell["peak_rss_bytes"] = server.peak_rss
    return cell


GREEDY_TOKENS = 32


def greedy_outputs(base: str, model: str | None, prompt_kw: PromptWords, n: int, extra: dict[str, Any]) -> list[str]:
    """The greedy completions (text) of `n` prompts that are the same on every server."""
    source = SyntheticPrompts(LengthDist("fixed", 64), GREEDY_TOKENS, seed=424_242, **prompt_kw)
    outputs = []
    with httpx.Client(timeout=300.0, trust_env=False) as client:
        model = model or client.get(f"{base}/models").json()["data"][0]["id"]
        for _ in range(n):
            body = {**source.next_body(), "model": model, "temperature": 0.0, **extra}
            reply = client.post(f"{base}/chat/completions", json=body).raise_for_status().json()
            outputs.append(reply["choices"][0]["message"]["content"] or "")
    return outputs


def run_server(
    name: str,
    args: argparse.Namespace,
    model: Path,
    plan: list[tuple[int, int]],
    prompt_kw: PromptWords,
    eos_ids: list[int],
) -> dict[str, Any]:
    """Every cell of `plan` x concurrency on server `name`; stops at the first cell it fails to serve."""
    # Suppressing EOS keeps output lengths equal: mlx_lm.server ignores `ignore_eos`.
    extra = {"logit_bias": {str(i): -100 for i in eos_ids}} if eos_ids and not args.allow_eos else {}
    cells: list[dict[str, Any]] = []
    for (requested, used), seconds in zip(plan, args.cell_seconds, strict=True):
        for clients in args.concurrency:
            greedy = 0 if cells else args.greedy_prompts
            cell = run_cell(name, args, model, used, seconds, clients, prompt_kw, extra, greedy)
            cell["prompt_tokens_requested"] = requested
            cells.append(cell)
            if cell["error"]:
                break
        if cells and cells[-1]["error"]:
            break
    served = [c for c in cells if "summary" in c]
    rss = [c["peak_rss_bytes"] for c in cells if c["peak_rss_bytes"] is not None]
    return {
        "name": name,
        "label": SERVERS[name].label,
        "argv": cells[0]["argv"] if cells else None,
        "startup_s": max((c.get("startup_s") or 0.0 for c in cells), default=None),
        # Cold start, apart from the measured cells: the first cell's start and first request.
        "first_startup_s": cells[0].get("startup_s") if cells else None,
        "first_request_s": cells[0].get("cold_first_request_s") if cells else None,
        "error": next((c["error"] for c in cells if c["error"]), None),
        "peak_rss_bytes": max(rss, default=None),
        "greedy": cells[0].get("greedy") if cells else None,
        "health": served[-1]["health"] if served else None,
        "exit_code": cells[-1]["exit_code"] if cells else None,
        "cells": served,
    }


def _eos_ids(config: dict[str, Any]) -> list[int]:
    eos = config.get("eos_token_id")
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.model is None:
        from server.engine.model.demo_model import ensure_demo_model

        args.model = ensure_demo_model()
    model = args.model.resolve()
    config = json.loads((model / "config.json").read_text())
    tokenizer = model / "tokenizer.json"
    words = words_for_tokenizer(tokenizer) if tokenizer.exists() else DEFAULT_WORDS
    tpw = calibrate_tokens_per_word(tokenizer, words) if tokenizer.exists() else 1.0
    prompt_kw = PromptWords(tokens_per_word=tpw, words=words)
    plan = prompt_plan(args.prompt_tokens, config.get("max_position_embeddings", 4096), args.max_tokens)
    started = utc_now()
    t0 = time.monotonic()
    servers = [run_server(name, args, model, plan, prompt_kw, _eos_ids(config)) for name in args.servers]
    return {
        "tag": args.tag or current_platform().backend,
        "device": args.device or device_name(),
        "date": started,
        "wall_s": time.monotonic() - t0,
        "command": command_line("side-by-side", args.argv),
        "model": {
            "path": str(model),
            "model_type": config.get("model_type"),
            "layers": config.get("num_hidden_layers"),
            "dtype": cache_bytes.dtype_bytes(config),
            "context": config.get("max_position_embeddings"),
            "tokens_per_word": tpw,
        },
        "settings": {
            "concurrency": args.concurrency,
            "prompt_plan": plan,
            "max_tokens": args.max_tokens,
            "requests_per_client": args.requests_per_client,
            "cell_seconds": args.cell_seconds,
        },
        "cache_bytes_per_token_layer": {
            "ours": cache_bytes.ours(config),
            "ours_tp2": cache_bytes.ours(config),  # each rank holds the whole latent pool
            "mlx_lm": cache_bytes.mlx_lm_full(config),
            "mlx_lm_kv4": cache_bytes.mlx_lm_full(config),
            "mlx_lm_kv4_if_quantized": cache_bytes.mlx_lm_int4(config),
        },
        "servers": servers,
    }


def write_outputs(run_result: dict[str, Any], args: argparse.Namespace) -> None:
    """Full results to --results-dir; unless --no-docs, the summary (no per-request records) that
    the docs section and its plots are rendered from to --docs-data."""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    full = args.results_dir / f"side_by_side_{run_result['tag']}.json"
    full.write_text(json.dumps(run_result, indent=1))
    print(f"results: {full}", file=sys.stderr)
    if args.no_docs:
        return
    summary = {
        **run_result,
        "servers": [
            {**s, "cells": [{k: v for k, v in c.items() if k != "records"} for c in s["cells"]]}
            for s in run_result["servers"]
        ],
    }
    args.docs_data.mkdir(parents=True, exist_ok=True)
    (args.docs_data / f"side_by_side_{run_result['tag']}.json").write_text(json.dumps(summary, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.render_only:
        write_outputs(run(args), args)
    if not args.no_docs:
        render_section(args.docs, args.docs_data)
        print(f"docs: {args.docs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
