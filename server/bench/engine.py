"""`python -m server.bench engine`: the engine without HTTP. Output tokens/s and time to first token
at several concurrencies, and the second turn of a long conversation with and without prefix reuse.

    python -m server.bench engine                       # the demo model, on this machine's default device
    python -m server.bench engine --model DIR --write   # any MLA model; --write updates docs/benchmarks.md

    python -m server.bench engine --compare prefill_buckets --length-spread 1024   # an option off vs on
    python -m server.bench engine --compare speculative --workload edit            # ngram drafts off vs on

Each concurrency level submits that many requests at once (prompt of --prompt-len tokens, exactly
--output-len output tokens, greedy) and steps the engine until all finish. `--workload edit` makes
each prompt an edit request (`edit_prompts`) instead of distinct random tokens.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

from server.bench.report import DOCS, headed, update_section, utc_now
from server.engine.args import EngineArgs
from server.engine.factory import engine_model, load_engine
from server.engine.llm_engine import LLMEngine
from server.engine.model.demo_model import ensure_demo_model
from server.engine.model.loader import load_model
from server.engine.types import SamplingParams, StreamDelta

BLOCK_SIZE = 64
# The engine options `--compare` sets off and on, and how its table names them.
COMPARED = {
    "async_scheduling": "Async scheduling",
    "prefill_buckets": "Prefill attention at bucketed lengths",
    "moe_by_expert": "Routed experts one expert at a time (off: mlx-lm's sorted gather_qmm)",
    "speculative": "Speculative decoding by prompt lookup (on: ngram)",
}
ON_VALUE = {"speculative": "ngram"}  # the value `--compare` gives an option that is not on/off
SPEC_COUNTERS = ("spec_drafts", "spec_draft_tokens", "spec_accepted_tokens")


def make_engine(loaded: tuple[Any, Any], num_blocks: int, prefix_caching: bool = True, **options: Any) -> LLMEngine:
    """An engine whose cache holds exactly `num_blocks` blocks, as long a context as they hold, on
    `loaded`: an engine model (`factory.engine_model`) and its tokenizer."""
    tokens = num_blocks * BLOCK_SIZE
    args = EngineArgs(
        max_model_len=tokens,
        cache_tokens=tokens,
        block_size=BLOCK_SIZE,
        enable_prefix_caching=prefix_caching,
        **options,
    )
    return load_engine(args, loaded=loaded)


def submit(engine: LLMEngine, rid: str, ids: list[int], max_tokens: int, times: dict[str, list[float]]) -> None:
    """Add a greedy request; `times[rid]` gets its submission time, then each delta's arrival."""
    times[rid] = [time.perf_counter()]

    def emit(delta: StreamDelta | Exception) -> None:
        times[rid].append(time.perf_counter())

    engine.add_request(ids, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), rid, emit)


def run_all(engine: LLMEngine) -> None:
    while engine.has_work:
        engine.step()


def prompt_ids(n: int, seed: int, vocab: int) -> list[int]:
    return [16 + (seed * 7919 + i * 104729) % (vocab - 32) for i in range(n)]


def edit_prompts(engine: LLMEngine, seeds: list[int], prompt_len: int, vocab: int) -> list[list[int]]:
    """Edit requests, as a coding agent sends them: a text, then the start of it again with small
    changes, to be continued. The text is the model's own: a third of `prompt_len` random tokens
    S, then the model's greedy continuation T of S as long again; the prompt is S + T + S', S with
    every 8th token changed, so a faithful continuation repeats T (a model echoing its context,
    as the demo model does, draws its own output again; drafts from the prompt can then hit)."""
    third = prompt_len // 3
    heads = [prompt_ids(third, seed, vocab) for seed in seeds]
    outputs = engine.generate(heads, SamplingParams(temperature=0.0, max_tokens=third, ignore_eos=True))
    texts = [out.token_ids for out in outputs]
    changed = [[16 + (t + 1) % (vocab - 32) if j % 8 == 7 else t for j, t in enumerate(h)] for h in heads]
    return [h + t + c for h, t, c in zip(heads, texts, changed, strict=True)]


def concurrency_row(
    engine: LLMEngine,
    c: int,
    prompt_len: int,
    output_len: int,
    vocab: int,
    run: int,
    spread: int = 0,
    prompts: list[list[int]] | None = None,
) -> dict[str, float]:
    """`c` requests at once; prompts differ between runs (`run`), so none is a prefix-cache hit.
    With `spread`, request i is `(run * c + i) % spread` tokens longer than `prompt_len`: lengths
    the engine has not seen while run * c + i < spread. `prompts`: the requests' prompts instead."""
    times: dict[str, list[float]] = {}
    before = engine.stats()
    t0 = time.perf_counter()
    for i in range(c):
        n = prompt_len + ((run * c + i) % spread if spread else 0)
        ids = prompts[i] if prompts is not None else prompt_ids(n, 100_000 * run + 1000 * c + i, vocab)
        submit(engine, f"c{c}-{run}-{i}", ids, output_len, times)
    run_all(engine)
    wall = time.perf_counter() - t0
    after = engine.stats()
    tokens = after["generated_tokens"] - before["generated_tokens"]
    ttft = sorted(t[1] - t[0] for t in times.values())
    gaps = [b - a for t in times.values() for a, b in itertools.pairwise(t[1:])]
    return {
        "concurrency": c,
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "ttft_p50_ms": 1e3 * statistics.median(ttft),
        "ttft_max_ms": 1e3 * ttft[-1],
        "itl_p50_ms": 1e3 * statistics.median(gaps) if gaps else float("nan"),
        **{k: after[k] - before[k] for k in SPEC_COUNTERS},
    }


def second_turn_ttft(
    loaded: tuple[Any, Any], history: int, new: int, num_blocks: int, prefix_caching: bool, vocab: int, chunk: int
) -> float:
    engine = make_engine(loaded, num_blocks, prefix_caching, prefill_chunk_size=chunk, max_num_batched_tokens=chunk)
    first_turn = prompt_ids(history, 7, vocab)
    times: dict[str, list[float]] = {}
    submit(engine, "turn1", first_turn, 1, times)
    run_all(engine)
    second = first_turn + prompt_ids(new, 8, vocab)
    submit(engine, "turn2", second, 1, times)
    run_all(engine)
    return 1e3 * (times["turn2"][1] - times["turn2"][0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m server.bench engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="model dir or repo id (default: the embedded demo model)")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--history", type=int, default=8192, help="first-turn tokens for the prefix-reuse case")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk size")
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md (section: engine)")
    ap.add_argument("--section", default="engine")
    ap.add_argument(
        "--compare",
        choices=COMPARED,
        help="instead: each concurrency with this engine option off and on, alternating in this process",
    )
    ap.add_argument("--reps", type=int, default=3, help="runs per mode with --compare")
    ap.add_argument(
        "--workload",
        choices=("random", "edit"),
        default="random",
        help="prompts of distinct random tokens, or edit requests of the model's own text (edit_prompts)",
    )
    ap.add_argument(
        "--length-spread",
        type=int,
        default=0,
        help="prompt lengths vary over this many tokens above --prompt-len, new in every request (0: all equal)",
    )
    args = ap.parse_args(argv)

    started = utc_now()
    model, tokenizer = load_model(args.model or str(ensure_demo_model()))
    loaded = engine_model(model), tokenizer  # one engine model for every engine compared
    vocab = loaded[0].args.vocab_size
    levels = [int(c) for c in args.concurrency.split(",")]
    per_seq_blocks = -(-(args.prompt_len + args.length_spread + args.output_len) // BLOCK_SIZE)

    def engine_for(option: dict[str, Any]) -> LLMEngine:
        return make_engine(
            loaded,
            num_blocks=max(levels) * per_seq_blocks + 8,
            max_num_seqs=max(levels),
            prefill_chunk_size=args.chunk,
            max_num_batched_tokens=max(args.chunk, max(levels)) * 2,
            **option,
        )

    edits: dict[tuple[int, int], list[list[int]]] = {}  # (concurrency, run): its edit prompts
    # The edit prompts' texts are written by an engine of their own, so that no engine measured
    # has them in its prefix cache.
    writer = engine_for({}) if args.workload == "edit" else None

    def measured(engine: LLMEngine, c: int, run: int, output_len: int = args.output_len) -> dict[str, float]:
        prompts = None
        if writer is not None:
            if (c, run) not in edits:
                seeds = [100_000 * run + 1000 * c + i for i in range(c)]
                edits[c, run] = edit_prompts(writer, seeds, args.prompt_len, vocab)
            prompts = edits[c, run]
        return concurrency_row(engine, c, args.prompt_len, output_len, vocab, run, args.length_spread, prompts)

    if args.compare:
        on = ON_VALUE.get(args.compare, "on")
        engines = {mode: engine_for({args.compare: on if mode == "on" else mode}) for mode in ("off", "on")}
        for engine in engines.values():  # first uses compile kernels on MLX's GPU backends
            for c in levels:
                measured(engine, c, run=0, output_len=8)
        text = compare(args.compare, engines, levels, measured, args.reps)
    else:
        engine = engine_for({})
        # Every measurement is taken twice and the second kept: the first pays for kernels that the
        # GPU runtime compiles on first use of each shape (minutes on MLX's CUDA backend).
        for c in levels:
            measured(engine, c, run=0, output_len=8)
        text = engine_tables(args, loaded, [measured(engine, c, run=1) for c in levels])
    text = headed(f"Engine: {args.model or 'demo model'}", started, "engine", argv, text)
    print(text)
    if args.write:
        update_section(DOCS, args.section, text)
    return 0


def engine_tables(args: argparse.Namespace, loaded: tuple[Any, Any], rows: list[dict[str, float]]) -> str:
    """The concurrency table and the prefix-reuse table."""
    vocab = loaded[0].args.vocab_size
    history_blocks = -(-(args.history + 256) // BLOCK_SIZE) + 4
    turns: dict[bool, float] = {}
    for flag in (False, True, False, True):
        turns[flag] = second_turn_ttft(loaded, args.history, 64, history_blocks, flag, vocab, args.chunk)
    lines = [
        f"Prompt {args.prompt_len} tokens (distinct in every run), {args.output_len} output tokens each, greedy, "
        "all requests submitted at once; each row is the second of two runs (the first compiles kernels).",
        "",
        "| concurrency | output tok/s | TTFT p50 (ms) | TTFT max (ms) | wall (s) |",
        "|---:|---:|---:|---:|---:|",
        *[
            f"| {r['concurrency']} | {r['tok_s']:.1f} | {r['ttft_p50_ms']:.1f} | {r['ttft_max_ms']:.1f} | {r['wall_s']:.2f} |"
            for r in rows
        ],
        "",
        f"Second turn after {args.history} tokens of history (+64 new tokens), time to first token:",
        "",
        "| prefix reuse | TTFT (ms) |",
        "|---|---:|",
        f"| off | {turns[False]:.1f} |",
        f"| on | {turns[True]:.1f} |",
        f"| speed-up | {turns[False] / turns[True]:.1f}x |",
    ]
    return "\n".join(lines)


def compare(
    option: str,
    engines: dict[str, LLMEngine],
    levels: list[int],
    measured: Callable[[LLMEngine, int, int], dict[str, float]],
    reps: int,
) -> str:
    """Each level with `option` off and on in turn (the order flips every repetition), in this
    process on the same model, both on the same prompts: medians of `reps` runs each."""
    lines = [
        f"{COMPARED[option]} off and on, alternating; median of {reps} runs each (distinct prompts every run,"
        " the same for both).",
        "",
        "| concurrency | output tok/s off | on | on / off | ITL p50 off (ms) | on (ms) | TTFT p50 off (ms) | on (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    run = 1
    drafted: list[str] = []  # speculative decoding's acceptance, where the engines drafted
    for c in levels:
        runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
        for rep in range(reps):
            for mode in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                runs[mode].append(measured(engines[mode], c, run))
            run += 1
        med = {
            m: {k: statistics.median(r[k] for r in rs) for k in ("tok_s", "itl_p50_ms", "ttft_p50_ms")}
            for m, rs in runs.items()
        }
        off, on = med["off"], med["on"]
        lines.append(
            f"| {c} | {off['tok_s']:.1f} | {on['tok_s']:.1f} | {on['tok_s'] / off['tok_s']:.3f} | {off['itl_p50_ms']:.2f} "
            f"| {on['itl_p50_ms']:.2f} | {off['ttft_p50_ms']:.1f} | {on['ttft_p50_ms']:.1f} |"
        )
        spec = {k: sum(r[k] for r in runs["on"]) for k in SPEC_COUNTERS}
        if spec["spec_drafts"]:
            drafted.append(
                f"| {c} | {spec['spec_drafts']} | {spec['spec_accepted_tokens'] / spec['spec_draft_tokens']:.3f} "
                f"| {1 + spec['spec_accepted_tokens'] / spec['spec_drafts']:.2f} |"
            )
    if drafted:
        lines += ["", "| concurrency | drafts (on) | acceptance rate | mean accepted length |", "|---:|---:|---:|---:|"]
        lines += drafted
    return "\n".join(lines)
