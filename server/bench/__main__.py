"""`python -m server.bench {serve,side-by-side,engine,profile,constrained,disk-tier,kernel} ...`: every benchmark of this project.

Each subcommand keeps its own flags (`python -m server.bench SUBCOMMAND --help`) and is imported
only when it runs, so the load generator needs neither MLX nor a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple


class Subcommand(NamedTuple):
    module: str  # has `main(argv: list[str] | None) -> int`
    help: str


SUBCOMMANDS = {
    "serve": Subcommand("server.bench.serve", "load-test a running OpenAI-compatible server (JSON, table, PNG)"),
    "side-by-side": Subcommand(
        "server.bench.side_by_side", "our server and mlx_lm.server in turn on one model; docs/benchmarks.md serving"
    ),
    "engine": Subcommand("server.bench.engine", "the engine without HTTP: tokens/s, TTFT, prefix reuse"),
    "profile": Subcommand("server.bench.profile", "where one engine step's time goes (attention, MoE, host, ...)"),
    "constrained": Subcommand(
        "server.bench.constrained", "decode tok/s with 0, 16 and 64 of 64 requests under a json_schema grammar"
    ),
    "disk-tier": Subcommand(
        "server.bench.disk_tier", "second-turn TTFT warm, from the disk tier and cold; decode tok/s with it on and off"
    ),
    "kernel": Subcommand("server.bench.kernel", "check the fused MLA decode kernel against the reference, time it"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server.bench",
        description=(__doc__ or "").splitlines()[0],
        epilog="python -m server.bench SUBCOMMAND --help shows that subcommand's flags.",
    )
    sub = p.add_subparsers(dest="subcommand", metavar="{" + ",".join(SUBCOMMANDS) + "}", required=True)
    for name, cmd in SUBCOMMANDS.items():
        # Listed here for --help only: the subcommand's own parser reads its arguments.
        sub.add_parser(name, help=cmd.help, add_help=False).add_argument("args", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        build_parser().parse_args(argv)  # prints help, or the usage error, and exits
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]].module)
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
