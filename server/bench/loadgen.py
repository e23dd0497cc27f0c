"""N concurrent streaming chat clients against an OpenAI-compatible server, bounded by count and time.

Library use: `await run_load(source, LoadConfig(...))` returns `{"config", "summary", "records"}`;
`summary` is `stats.summarize`'s dict.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from server.bench.prompts import PromptSource
from server.bench.stats import RequestRecord, summarize

DEFAULT_BASE_URL = "http://127.0.0.1:8080/v1"


@dataclass
class LoadConfig:
    base_url: str = DEFAULT_BASE_URL
    model: str | None = None  # None: the first id from GET /v1/models
    concurrency: int = 1
    num_requests: int = 8
    duration_s: float | None = None  # in-flight requests are cancelled when it runs out
    request_timeout_s: float = 300.0  # the longest wait for connect or for the next chunk
    warmup_requests: int = 1  # sent one at a time before measuring, not recorded
    temperature: float | None = None
    ignore_eos: bool = False  # vLLM-style extension; servers without it ignore the field
    api_key: str | None = None
    progress: bool = True
    allow_remote: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)


def check_address(base_url: str, allow_remote: bool = False) -> None:
    """Refuse anything but http(s) to a loopback host unless `allow_remote`."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base URL must be http(s)://HOST[:PORT]/..., got {base_url!r}")
    if allow_remote or parts.hostname == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{parts.hostname} is not a loopback address; pass --allow-remote to load it")


def make_client(cfg: LoadConfig) -> httpx.AsyncClient:
    # trust_env=False: no proxy from the environment, so requests go only to the address given.
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    n = max(cfg.concurrency, 1)
    return httpx.AsyncClient(
        base_url=cfg.base_url.rstrip("/"),
        headers=headers,
        timeout=httpx.Timeout(cfg.request_timeout_s, connect=min(cfg.request_timeout_s, 30.0)),
        limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        trust_env=False,
        follow_redirects=False,
    )


async def resolve_model(client: httpx.AsyncClient) -> str:
    resp = await client.get("/models")
    resp.raise_for_status()
    models = resp.json().get("data") or []
    if not models:
        raise RuntimeError("GET /models listed no model; pass the model name explicitly")
    return str(models[0]["id"])


def _content_of(choice: dict[str, Any]) -> str:
    delta = choice.get("delta") or {}
    return str(delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or "")


async def stream_one(
    client: httpx.AsyncClient, body: dict[str, Any], rec: RequestRecord, clock: Callable[[], float]
) -> None:
    """POST one streaming chat completion and fill `rec` as chunks arrive; never raises on
    server or network failures (they become `rec.error`), only on cancellation."""
    chunks = 0
    try:
        async with client.stream("POST", "/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                rec.error = f"http_{resp.status_code}"
                rec.error_detail = (await resp.aread()).decode(errors="replace")[:300]
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    rec.finished = rec.error is None
                    return
                obj = json.loads(data)
                if "error" in obj:
                    rec.error, rec.error_detail = "stream_error", json.dumps(obj["error"])[:300]
                    continue
                if obj.get("usage"):
                    rec.output_tokens = obj["usage"]["completion_tokens"]
                    rec.prompt_tokens = obj["usage"].get("prompt_tokens")
                    rec.usage_reported = True
                if any(_content_of(c) for c in obj.get("choices") or []):
                    rec.chunk_times.append(clock())
                    chunks += 1
            rec.error = rec.error or "protocol"
            rec.error_detail = rec.error_detail or "stream ended without [DONE]"
    except httpx.TimeoutException as e:
        rec.error, rec.error_detail = "timeout", repr(e)
    except httpx.TransportError as e:
        rec.error, rec.error_detail = "connection", repr(e)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        rec.error, rec.error_detail = "protocol", repr(e)
    finally:
        rec.end = clock()
        if not rec.usage_reported:
            rec.output_tokens = chunks


def request_body(source: PromptSource, cfg: LoadConfig, model: str) -> dict[str, Any]:
    body = {**source.next_body(), **cfg.extra_body, "model": model, "stream": True}
    body["stream_options"] = {"include_usage": True}
    if cfg.temperature is not None:
        body["temperature"] = cfg.temperature
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    return body


class _Progress:
    """One `\\r`-rewritten status line on stderr."""

    def __init__(self, records: list[RequestRecord], total: int, label: str, t0: float):
        self.records, self.total, self.label, self.t0 = records, total, label, t0

    def line(self) -> str:
        now = time.monotonic()
        done = sum(r.end is not None for r in self.records)
        errors = sum(r.error is not None for r in self.records)
        tokens = sum(r.output_tokens if r.end is not None else len(r.chunk_times) for r in self.records)
        elapsed = now - self.t0
        width = 24
        fill = int(width * done / self.total) if self.total else 0
        rate = tokens / elapsed if elapsed > 0 else 0.0
        return (
            f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} "
            f"err {errors}  {rate:7.1f} tok/s  {elapsed:6.1f}s "
        )

    async def run(self) -> None:
        while True:
            sys.stderr.write(self.line())
            sys.stderr.flush()
            await asyncio.sleep(0.5)


async def run_load(source: PromptSource, cfg: LoadConfig) -> dict[str, Any]:
    """Drive `cfg.concurrency` clients until `cfg.num_requests` have been sent and answered, or
    `cfg.duration_s` has passed; returns `{"config", "summary", "records"}` (JSON-ready)."""
    check_address(cfg.base_url, cfg.allow_remote)
    async with make_client(cfg) as client:
        model = cfg.model or await resolve_model(client)
        for _ in range(cfg.warmup_requests):
            await stream_one(client, request_body(source, cfg, model), RequestRecord(time.monotonic()), time.monotonic)

        records: list[RequestRecord] = []
        issued = itertools.count()
        t0 = time.monotonic()
        deadline = t0 + cfg.duration_s if cfg.duration_s else None

        async def client_loop() -> None:
            while next(issued) < cfg.num_requests and (deadline is None or time.monotonic() < deadline):
                rec = RequestRecord(start=time.monotonic())
                records.append(rec)
                await stream_one(client, request_body(source, cfg, model), rec, time.monotonic)

        progress = _Progress(records, cfg.num_requests, f"c={cfg.concurrency}", t0)
        ticker = asyncio.create_task(progress.run()) if cfg.progress else None
        workers = [asyncio.create_task(client_loop()) for _ in range(cfg.concurrency)]
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        _, pending = await asyncio.wait(workers, timeout=remaining)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = (time.monotonic() if deadline is None else min(time.monotonic(), deadline)) - t0
        if ticker:
            ticker.cancel()
            sys.stderr.write(progress.line() + "\n")

    config = {**asdict(cfg), "model": model, "api_key": None}
    return {"config": config, "summary": summarize(records, wall), "records": [r.to_json() for r in records]}


async def run_sweep(source: PromptSource, cfg: LoadConfig, concurrencies: list[int]) -> list[dict[str, Any]]:
    """`run_load` once per concurrency level; `cfg.num_requests` of 0 means 4 per client (at least 8)."""
    results: list[dict[str, Any]] = []
    for c in concurrencies:
        n = cfg.num_requests or max(8, 4 * c)
        results.append(await run_load(source, LoadConfig(**{**asdict(cfg), "concurrency": c, "num_requests": n})))
    return results
