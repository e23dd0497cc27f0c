"""`python -m server.bench disk-tier`: what the prefix cache's disk tier buys and costs, in process.

- time to first token of a conversation's second turn (a `--context`-token first prompt, then
  `--turn` more tokens) (a) warm in memory, (b) in a fresh engine (an empty pool: as after a
  restart) reading the first turn's blocks from the disk tier, (c) in a fresh engine without it;
- decode tok/s of `--clients` concurrent requests with the tier on (their prompts written to it)
  and off, side by side in one run.

Fresh engines share the loaded model; each tier run uses a new temporary directory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..engine.args import EngineArgs
from ..engine.disk_cache import DiskCache
from ..engine.factory import engine_model, load_engine
from ..engine.llm_engine import DiskTier, LLMEngine
from ..engine.model.demo_model import ensure_demo_model
from ..engine.model.loader import load_model
from ..engine.types import RequestOutput, SamplingParams


def _engine(loaded: tuple[Any, Any], args: EngineArgs, directory: Path | None) -> LLMEngine:
    base = load_engine(args, loaded)
    if directory is None:
        return base
    runner: Any = base.runner
    disk = DiskTier(DiskCache(directory, 1 << 40, runner.block_nbytes), b"disk-tier-benchmark".ljust(32, b"."))
    return LLMEngine(base.runner, base.tokenizer, base.args, decode=base.decode, disk=disk)


def _ids(n: int, seed: int) -> list[int]:
    return [16 + (seed * 7919 + i * 104729) % 1000 for i in range(n)]


def _ttft(engine: LLMEngine, ids: list[int], rid: str) -> tuple[float, int]:
    """Seconds to the first token of `ids` (greedy, 1 token), and its cached tokens."""
    out = RequestOutput(rid)
    t0 = time.perf_counter()
    engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0), rid, out)
    while not out.finished:
        engine.step()
    elapsed = time.perf_counter() - t0
    while engine.has_work:
        engine.step()
    if out.error is not None:
        raise out.error
    return elapsed, out.deltas[0].cached_tokens


def _decode_tps(engine: LLMEngine, clients: int, prompt: int, tokens: int) -> float:
    """Generated tokens per second of `clients` requests once all of them decode."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    outs = [RequestOutput(f"d{c}") for c in range(clients)]
    for c, out in enumerate(outs):
        engine.add_request(_ids(prompt, 100 + c), params, out.request_id, out)

    def generated() -> int:
        return sum(len(out.token_ids) for out in outs)

    while not all(out.deltas or out.error for out in outs):
        engine.step()
    start, t0 = generated(), time.perf_counter()
    while engine.has_work:
        engine.step()
    errors = [out.error for out in outs if out.error is not None]
    if errors:
        raise errors[0]
    return (generated() - start) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.bench disk-tier", description=__doc__)
    p.add_argument("--model", default=None, help="model directory (unset: the demo model)")
    p.add_argument("--context", type=int, default=4096, help="first turn's prompt tokens")
    p.add_argument("--turn", type=int, default=64, help="tokens the second turn adds")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens each decode client generates")
    a = p.parse_args(argv)
    model, tokenizer = load_model(a.model or str(ensure_demo_model()))
    loaded = engine_model(model), tokenizer
    args = EngineArgs(cache_tokens=4 * (a.context + a.turn) + a.clients * 256, warmup="off", max_num_seqs=a.clients)
    first = _ids(a.context, 0)
    second = first + _ids(a.turn, 1)
    out: dict[str, Any] = {"context": a.context, "turn": a.turn}
    with tempfile.TemporaryDirectory() as tmp:
        warm = _engine(loaded, args, Path(tmp))
        _ttft(warm, first, "t1")
        assert warm.disk is not None
        warm.disk.cache.flush()
        out["a_warm_s"], out["a_cached"] = _ttft(warm, second, "t2")
        out["b_disk_s"], out["b_cached"] = _ttft(_engine(loaded, args, Path(tmp)), second, "t2")
    out["c_cold_s"], out["c_cached"] = _ttft(_engine(loaded, args, None), second, "t2")
    decode_args = replace(args, max_num_seqs=a.clients)
    with tempfile.TemporaryDirectory() as tmp:
        out["decode_tps_on"] = _decode_tps(_engine(loaded, decode_args, Path(tmp)), a.clients, 256, a.decode_tokens)
    out["decode_tps_off"] = _decode_tps(_engine(loaded, decode_args, None), a.clients, 256, a.decode_tokens)
    out["b_over_a"] = out["b_disk_s"] / out["a_warm_s"]
    out["c_over_b"] = out["c_cold_s"] / out["b_disk_s"]
    out["decode_on_over_off"] = out["decode_tps_on"] / out["decode_tps_off"]
    print(json.dumps(out, indent=2))
    return 0
