"""`python -m server.eval perplexity --model DIR --data FILE`: see server/eval/perplexity.py and docs/quality.md."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .perplexity import render, run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m server.eval")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("perplexity", help="perplexity with the INT4 and the bf16 latent cache, and their ratio")
    q.add_argument("--model", default=None, help="model directory or Hugging Face id (default: the demo model)")
    q.add_argument("--data", required=True, help="a .txt file, or .jsonl with 'messages' or 'text' records")
    q.add_argument("--length", type=int, default=512, help="short windows: tokens each (all decoded)")
    q.add_argument("--samples", type=int, default=100, help="short windows: how many")
    q.add_argument("--long-length", type=int, default=4096, help="long windows: tokens each")
    q.add_argument("--long-samples", type=int, default=16, help="long windows: how many (0: none)")
    q.add_argument("--long-last", type=int, default=64, help="long windows: the last tokens, decoded and scored")
    q.add_argument("--batch", type=int, default=64, help="sequences decoded together")
    q.add_argument("--modes", default="int4,bf16", help="latent caches to measure")
    q.add_argument("--json", default=None, help="also write the report here")
    a = p.parse_args(argv)
    if a.model is None:
        from ..engine.model.demo_model import ensure_demo_model

        a.model = str(ensure_demo_model())
    report = run(
        a.model,
        Path(a.data),
        length=a.length,
        samples=a.samples,
        long_length=a.long_length,
        long_samples=a.long_samples,
        long_last=a.long_last,
        batch=a.batch,
        modes=tuple(a.modes.split(",")),
    )
    print(render(report), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
