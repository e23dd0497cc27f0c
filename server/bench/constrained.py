"""`python -m server.bench constrained`: the cost of constrained decoding, through the engine.

    python -m server.bench constrained                   # the demo model, this machine's default device
    python -m server.bench constrained --model DIR       # any MLA model

Submits --clients requests at once (same prompt, --output-len tokens each, temperature 1.0,
seeded), of which 0, 16 and all use a `json_schema` whose shortest document is longer than
--output-len tokens, so every row decodes exactly --output-len tokens and the batch keeps its
size; unconstrained rows ignore EOS. Decode tok/s is counted from the step where every request
has its first token to the end. Prints a markdown table with the ratio to the unconstrained run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from typing import Any

from server.bench.report import device_name, utc_now
from server.engine.args import EngineArgs
from server.engine.factory import load_engine
from server.engine.llm_engine import LLMEngine
from server.engine.types import OutputConstraint, SamplingParams, StreamDelta

# Many items of several fields: no document of it fits in a few hundred tokens, and each step's
# mask mixes strings, numbers, enums and structure.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 200,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 16},
                    "count": {"type": "integer"},
                    "kind": {"enum": ["alpha", "beta", "gamma"]},
                    "ok": {"type": "boolean"},
                },
                "required": ["name", "count", "kind", "ok"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}


def run_level(
    engine: LLMEngine, prompt: list[int], clients: int, constrained: int, output_len: int
) -> dict[str, float]:
    counts = [0] * clients

    def emitter(i: int) -> Any:
        def emit(item: StreamDelta | Exception) -> None:
            if isinstance(item, Exception):
                raise item
            counts[i] += len(item.token_ids)

        return emit

    for i in range(clients):
        params = SamplingParams(max_tokens=output_len, temperature=1.0, seed=i, ignore_eos=True)
        if i < constrained:
            params.constraint = OutputConstraint(json_schema=SCHEMA)
        engine.add_request(prompt, params, emit=emitter(i))
    start = time.perf_counter()
    while engine.has_work and min(counts) == 0:
        engine.step()
    decode_start, tokens_before = time.perf_counter(), sum(counts)
    while engine.has_work:
        engine.step()
    end = time.perf_counter()
    decoded = sum(counts) - tokens_before
    return {"tok_s": decoded / (end - decode_start), "wall_s": end - start, "tokens": sum(counts)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.bench constrained", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default=None, help="model directory or repo id (default: the demo model)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--levels", default="0,16,64", help="how many of the clients use json_schema, comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="runs per level; the best is reported")
    args = p.parse_args(argv)
    clients = args.clients
    engine = load_engine(
        EngineArgs(model=args.model, max_num_seqs=clients, cache_tokens=clients * 64 * (2 + args.output_len // 64))
    )
    prompt = list(
        engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Inventory as JSON."}], add_generation_prompt=True
        )
    )
    levels = [min(int(x), clients) for x in args.levels.split(",")]
    run_level(engine, prompt, clients, clients, 8)  # warm-up: shapes, the llguidance tokenizer
    results = {}
    for level in levels:
        runs = [run_level(engine, prompt, clients, level, args.output_len) for _ in range(args.repeats)]
        results[level] = max(runs, key=lambda r: r["tok_s"])
    base = results.get(0, results[levels[0]])["tok_s"]
    command = shlex.join(["python", "-m", "server.bench", "constrained", *(sys.argv[1:] if argv is None else argv)])
    print(f"{utc_now()}, {device_name()}. Command: `{command}`")
    print()
    print(f"| json_schema clients (of {clients}) | decode tok/s | ratio to unconstrained |")
    print("|---:|---:|---:|")
    for level in levels:
        r = results[level]
        print(f"| {level} | {r['tok_s']:.0f} | {r['tok_s'] / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
