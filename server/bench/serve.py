"""`python -m server.bench serve`: load-test a running OpenAI-compatible server; JSON results, a table, PNG plots."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from server.bench.loadgen import DEFAULT_BASE_URL, LoadConfig, check_address, run_sweep
from server.bench.prompts import (
    DEFAULT_WORDS,
    LengthDist,
    PromptSource,
    ReplayPrompts,
    SyntheticPrompts,
    calibrate_tokens_per_word,
    words_for_tokenizer,
)
from server.bench.report import results_table


def concurrency_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be integers >= 1")
    return values


def length_dist(text: str) -> LengthDist:
    try:
        return LengthDist.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server.bench serve", description=__doc__)
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help="OpenAI-compatible base URL (default %(default)s)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback host in --base-url")
    p.add_argument("--model", help="model name to request (default: first id of GET /models)")
    p.add_argument("--api-key")
    p.add_argument("-c", "--concurrency", type=concurrency_list, default=[1], help="levels to sweep, e.g. 1,4,16,64")
    p.add_argument("-n", "--num-requests", type=int, default=0, help="per level; 0 = 4 per client, at least 8")
    p.add_argument("-t", "--duration", type=float, default=None, help="seconds per level; in-flight requests are cut")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a connection or a chunk")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded requests before each level")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--prompt-len",
        type=length_dist,
        default=LengthDist("fixed", 256),
        help="tokens: fixed:N, uniform:LO:HI or normal:MEAN:STD (default fixed:256)",
    )
    src.add_argument("--replay", type=Path, help="JSONL file of chat request bodies, replayed in a loop")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default %(default)s)")
    p.add_argument("--tokens-per-word", type=float, default=None, help="prompt words to tokens (default 1.0)")
    p.add_argument(
        "--tokenizer", type=Path, help="tokenizer.json: calibrates --tokens-per-word and picks words it keeps distinct"
    )
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (servers that lack it ignore it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="results JSON (default out/bench/loadgen-TIME.json)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.num_requests < 0 or args.max_tokens < 1 or args.warmup < 0:
        p.error("--num-requests and --warmup must be >= 0, --max-tokens >= 1")
    if args.duration is not None and args.duration <= 0:
        p.error("--duration must be > 0")
    if args.tokens_per_word is not None and args.tokenizer is not None:
        p.error("give --tokens-per-word or --tokenizer, not both")
    try:
        check_address(args.base_url, args.allow_remote)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source: PromptSource
    if args.replay:
        source = ReplayPrompts(args.replay, args.max_tokens)
    else:
        words = words_for_tokenizer(args.tokenizer) if args.tokenizer else DEFAULT_WORDS
        tpw = args.tokens_per_word or (calibrate_tokens_per_word(args.tokenizer, words) if args.tokenizer else 1.0)
        source = SyntheticPrompts(args.prompt_len, args.max_tokens, tokens_per_word=tpw, seed=args.seed, words=words)
    cfg = LoadConfig(
        base_url=args.base_url,
        model=args.model,
        num_requests=args.num_requests,
        duration_s=args.duration,
        request_timeout_s=args.timeout,
        warmup_requests=args.warmup,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        api_key=args.api_key,
        progress=not args.no_progress,
        allow_remote=args.allow_remote,
    )
    results = asyncio.run(run_sweep(source, cfg, args.concurrency))

    out = args.out or Path("out/bench") / f"loadgen-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(results_table({args.base_url: results}))
    print(f"results: {out}")
    if not args.no_plot:
        from server.bench.plots import plot_series

        try:
            png = plot_series({args.base_url: results}, out.with_suffix(".png"), title=args.base_url)
            print(f"plot: {png}")
        except ImportError:
            print("matplotlib is not installed (pip install 'mla-server[bench]'): no plot", file=sys.stderr)
    return 0
