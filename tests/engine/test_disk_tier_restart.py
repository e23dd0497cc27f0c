"""The prefix cache's disk tier across real process stops and starts (`python -m server`, one
directory): a conversation's next turn after a restart prefills only what the first turn's prompt
did not hold, with the same greedy tokens as without the tier; SIGTERM and kill -9 in the middle of
writes leave a directory the next start reads without error."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

import httpx
import openai
import pytest
from support import RemoteServer, wait_until

from server.engine.disk_cache import SUFFIX, TMP_SUFFIX

pytestmark = pytest.mark.slow

BS = 64
WORDS = [
    "the",
    "cache",
    "is",
    "quantized",
    "to",
    "four",
    "bits",
    "with",
    "a",
    "scale",
    "and",
    "a",
    "bias",
    "for",
    "every",
    "group",
    "of",
    "values",
]


def long_text(n: int, seed: int = 0) -> str:
    return " ".join(WORDS[(seed * 7 + i * 5) % len(WORDS)] for i in range(n))


def server(directory: Path, on: bool = True) -> RemoteServer:
    tier = ["--disk-cache-dir", str(directory), "--disk-cache-bytes", str(1 << 30 if on else 0)]
    return RemoteServer(["--log-level", "warning", "--cache-tokens", "16384", *tier])


def chat(srv: RemoteServer, messages: list[dict[str, str]]) -> tuple[str, int, int]:
    """Greedy reply text, prompt tokens and cached tokens of one chat completion."""
    r = srv.get_client().chat.completions.create(
        model="mla-demo",
        messages=messages,
        max_tokens=16,
        temperature=0.0,  # type: ignore[arg-type]
    )
    usage = r.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    return r.choices[0].message.content or "", usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens or 0


def chat_until_stopped(srv: RemoteServer, messages: list[dict[str, str]]) -> None:
    with contextlib.suppress(openai.APIError):  # the server is stopped under it
        chat(srv, messages)


def health(srv: RemoteServer) -> dict[str, int]:
    engine: dict[str, int] = httpx.get(srv.url_for("health")).json()["engine"]
    return engine


def written_all(srv: RemoteServer, blocks: int) -> None:
    assert wait_until(lambda: health(srv)["disk_cache_blocks_written"] >= blocks, timeout=30)


def test_the_next_turn_after_a_restart_prefills_only_its_new_tokens_with_the_same_tokens(tmp_path):
    first = [{"role": "user", "content": long_text(700)}]
    with server(tmp_path) as srv:
        reply, prompt1, _ = chat(srv, first)
        written_all(srv, prompt1 // BS)
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": long_text(40, 1)}]
    with server(tmp_path) as srv:
        with_tier, prompt2, cached = chat(srv, second)
        stats = health(srv)
    assert cached == prompt1 // BS * BS  # every full block of the first turn's prompt, from disk
    assert stats["cached_prompt_tokens_disk"] == cached
    with server(tmp_path / "none", on=False) as srv:
        without, _, cached_without = chat(srv, second)
    assert cached_without == 0 and with_tier == without
    assert prompt2 > prompt1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stop_in_the_middle_of_writes_leaves_a_directory_the_next_start_reads(tmp_path, sig):
    prompts = [[{"role": "user", "content": long_text(600, seed)}] for seed in range(6)]
    with server(tmp_path) as srv:
        threads = [threading.Thread(target=chat_until_stopped, args=(srv, p), daemon=True) for p in prompts]
        for t in threads:
            t.start()
        assert wait_until(lambda: health(srv)["disk_cache_blocks_written"] > 0, timeout=60)
        srv.send_signal(sig)  # prompts still prefilling, blocks still queued for the writer
        srv.wait(30)
    # What a writer killed inside a write leaves: a torn temporary file, and a torn block file
    # (as from a disk that lost the end of a rename's data).
    (tmp_path / ("ab" * 32 + SUFFIX + ".1.2" + TMP_SUFFIX)).write_bytes(b"torn")
    whole = sorted(tmp_path.glob("*" + SUFFIX))
    assert whole
    whole[0].write_bytes(whole[0].read_bytes()[:100])
    with server(tmp_path) as srv:
        for p in prompts:  # every prompt again: each block either read whole or computed
            reply, _, _ = chat(srv, p)
            assert reply
        stats = health(srv)
    assert stats["disk_cache_blocks_read"] > 0
    assert stats["disk_cache_files_rejected"] == 1
