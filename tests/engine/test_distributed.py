"""Tensor-parallel serving: two ranks over MLX's ring backend on loopback, launched by mlx.launch,
serve the demo model through HTTP with the single-process server's greedy tokens, leak no block on
either rank through cancellations and preemptions, and both stop on one SIGTERM to rank 0; when a
rank dies, rank 0 fails the live stream with a clear error and exits non-zero."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from support import free_port, iter_sse, sse_events

from server.bench.servers import ServerProcess, mlx_launch, python_module, session_pids

ARGS = ["--cache-tokens", str(64 * 10), "--max-num-seqs", "4", "--log-level", "info"]
EOS = 2  # the demo model's </s>
PROMPTS = [
    "Tell me about the quick brown fox.",
    "Write a haiku about caches. " * 6,  # two blocks: prefix reuse across ranks
    "hello",
]

launcher = shutil.which("mlx.launch", path=os.path.dirname(sys.executable))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(launcher is None, reason="mlx.launch is not installed")]


def start(argv: list[str], port: int, log: Path) -> ServerProcess:
    server = ServerProcess(argv, f"http://127.0.0.1:{port}/v1", log)
    server.start()
    server.wait_healthy(180)
    return server


def greedy(base: str, prompt: str, stream: bool = False) -> str:
    messages = [{"role": "user", "content": prompt}]
    if stream:
        body = {"model": "mla-demo", "messages": messages, "max_tokens": 24, "temperature": 0, "stream": True}
        events = sse_events(httpx.post(f"{base}/chat/completions", json=body, timeout=120))
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="mla-demo", messages=messages, max_tokens=24, temperature=0)
    return reply.choices[0].message.content or ""


async def crowd(base: str) -> None:
    """More work than the pool holds (preemptions), and streams closed early (cancellations)."""
    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)

    async def full(i: int) -> None:
        prompt = f"request {i} " + "with a long shared middle part " * 8
        await client.chat.completions.create(
            model="mla-demo",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=200,
            temperature=1.0,
            seed=i,
            logit_bias={str(EOS): -100},  # every reply runs to max_tokens, so the pool must run short
        )

    async def dropped(i: int) -> None:
        stream = await client.chat.completions.create(
            model="mla-demo", messages=[{"role": "user", "content": f"drop {i}"}], max_tokens=200, stream=True
        )
        async for _ in stream:
            break
        await stream.close()

    await asyncio.gather(*[full(i) for i in range(6)], *[dropped(i) for i in range(3)])
    await client.close()


def test_two_ranks_serve_the_single_process_tokens_and_stop_together(tmp_path):
    single_port, tp_port = free_port(), free_port()
    single = start(python_module("server", *ARGS, "--port", str(single_port)), single_port, tmp_path / "single.log")
    try:
        expected = [greedy(single.base_url, p) for p in PROMPTS] + [greedy(single.base_url, PROMPTS[0], stream=True)]
    finally:
        single.stop()

    argv = mlx_launch(2) + python_module("server", *ARGS, "--port", str(tp_port))  # ring on this CPU
    tp = start(argv, tp_port, tmp_path / "tp.log")
    try:
        got = [greedy(tp.base_url, p) for p in PROMPTS] + [greedy(tp.base_url, PROMPTS[0], stream=True)]
        assert got == expected

        asyncio.run(crowd(tp.base_url))
        deadline = time.monotonic() + 30
        while (health := tp.health() or {}).get("engine", {}).get("running", 1) and time.monotonic() < deadline:
            time.sleep(0.2)
        engine = health["engine"]
        assert engine["preemptions"] > 0, "the crowd was meant to preempt"
        assert engine["cache_blocks_free"] == engine["cache_blocks"]  # rank 0 leaked nothing

        rank0 = int(re.search(r"Started server process \[(\d+)\]", tp.log_path.read_text()).group(1))
        os.kill(rank0, signal.SIGTERM)
        assert tp.proc is not None
        assert tp.proc.wait(60) == 0  # mlx.launch ends when both ranks have
        log = tp.log_path.read_text()
        free = re.search(r"rank 1 stopped: (\d+) of (\d+) cache blocks free", log)
        assert free and free.group(1) == free.group(2), log[-2000:]  # rank 1 leaked nothing either
    finally:
        tp.stop()


def test_a_dead_rank_fails_the_live_stream_and_rank_0_exits_non_zero(tmp_path):
    port = free_port()
    argv = mlx_launch(2) + python_module("server", *ARGS, "--rank-timeout", "5", "--port", str(port))
    tp = start(argv, port, tmp_path / "tp.log")
    try:
        rank0 = int(re.search(r"Started server process \[(\d+)\]", tp.log_path.read_text()).group(1))
        assert tp.proc is not None
        followers = [p for p in session_pids(tp.proc.pid) if p not in (rank0, tp.proc.pid)]
        body = {
            "model": "mla-demo",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 500,
            "stream": True,
            "logit_bias": {str(EOS): -100},
        }
        with httpx.stream("POST", f"{tp.base_url}/chat/completions", json=body, timeout=60) as reply:
            events = iter_sse(reply.iter_lines())
            assert next(events)["choices"]  # the stream has started on both ranks
            for pid in followers:
                os.kill(pid, signal.SIGKILL)
            rest = list(events)
        assert rest[-1] == "[DONE]"
        errors = [e["error"]["message"] for e in rest if isinstance(e, dict) and "error" in e]
        assert errors == ["a tensor-parallel rank failed; the server is stopping"]
        tp.proc.wait(60)  # mlx.launch ends with its ranks (and exits 0 whatever they did)
        assert "Node with rank 0 exited with code 1" in tp.log_path.read_text()
    finally:
        tp.stop()


def test_the_launcher_ports_lie_below_the_ephemeral_range_where_no_connection_takes_them():
    argv = mlx_launch(2)
    ring = int(argv[argv.index("--starting-port") + 1])
    nccl = int(argv[argv.index("--nccl-port") + 1])
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    first_ephemeral = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 49152
    assert nccl == ring + 2  # rank 0, rank 1, then NCCL's rendezvous: one checked block
    assert ring > 1024 and nccl < first_ephemeral
