"""Perplexity through the engine itself, with the INT4 and with the bf16 latent cache.

Each window is one request to an engine (the engine's absorbed MLA attention, over its paged
latent cache: `LatentCache` for "int4", `DenseLatentCache` for "bf16"): its first `prefill` tokens
are the prompt, prefilled in chunks (they too attend over the cache they were just written to,
dequantized), and the rest its output, forced token by token (`OutputConstraint.tokens`), so
every later token is fed as a decode step, as the engine decodes a completion. Each output
token's logprob (of the raw logits, before the forcing mask) is the log-probability of the true
token after the true prefix. So every scored token attends over the cache as the engine stores it.

Statistics, per cache mode: perplexity exp(mean NLL) over the scored tokens, with mlx_lm.perplexity's
standard error (the token-level delta method: ppl * sd(NLL) / sqrt(tokens)) and a 95% interval
over windows (the windows' mean NLLs; tokens inside a window are not independent). The INT4 / bf16
ratio exp(mean NLL_int4 - mean NLL_bf16) has a 95% interval from the windows' paired differences.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.args import EngineArgs
from ..engine.factory import load_engine
from ..engine.types import OutputConstraint, SamplingParams

Z95 = 1.959964


def load_tokens(tokenizer: Any, path: Path) -> list[int]:
    """A file as one token stream: plain text (.txt), or JSON lines (.jsonl) whose records hold
    "messages" (rendered with the model's chat template) or "text", concatenated as mlx_lm.perplexity
    concatenates a dataset's samples."""
    if path.suffix != ".jsonl":
        ids: list[int] = tokenizer.encode(path.read_text(encoding="utf-8"))
        return ids
    out: list[int] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "messages" in rec:
            out.extend(tokenizer.apply_chat_template(rec["messages"], tokenize=True))
        else:
            out.extend(tokenizer.encode(rec["text"]))
    return out


def windows(tokens: list[int], length: int, count: int) -> list[list[int]]:
    """Up to `count` consecutive, non-overlapping windows of `length` tokens."""
    n = min(count, len(tokens) // length)
    return [tokens[i * length : (i + 1) * length] for i in range(n)]


@dataclass
class Result:
    mode: str
    nll: np.ndarray  # [windows, scored tokens per window]
    seconds: float

    @property
    def ppl(self) -> float:
        return math.exp(float(self.nll.mean()))

    @property
    def stderr(self) -> float:
        """mlx_lm.perplexity's standard error of the perplexity (token-level delta method)."""
        flat = self.nll.reshape(-1)
        return self.ppl * float(flat.std(ddof=1)) / math.sqrt(flat.size)

    @property
    def ci95(self) -> tuple[float, float]:
        """95% interval of the perplexity over windows."""
        per = self.nll.mean(axis=1)
        half = Z95 * float(per.std(ddof=1)) / math.sqrt(len(per)) if len(per) > 1 else math.inf
        m = float(per.mean())
        return math.exp(m - half), math.exp(m + half)


def ratio(a: Result, b: Result) -> tuple[float, float, float]:
    """(ppl_a / ppl_b, 95% low, 95% high) from the windows' paired mean-NLL differences."""
    d = a.nll.mean(axis=1) - b.nll.mean(axis=1)
    m = float(a.nll.mean() - b.nll.mean())
    half = Z95 * float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else math.inf
    return math.exp(m), math.exp(m - half), math.exp(m + half)


def score(
    loaded: tuple[Any, Any],
    wins: list[list[int]],
    mode: str,
    prefill: int = 1,
    batch: int = 64,
    chunk: int = 512,
    block_size: int = 64,
) -> Result:
    """NLL [windows, len - prefill] of each window's tokens from position `prefill` on, decoded one
    at a time by an engine over `loaded` (an engine model, `factory.engine_model`, and its
    tokenizer), with the `mode` latent cache ("int4" or "bf16") and `batch` windows running at once."""
    length = len(wins[0])
    batch = min(batch, len(wins))
    args = EngineArgs(
        max_model_len=length,
        max_num_seqs=batch,
        prefill_chunk_size=chunk,
        cache_tokens=batch * -(-length // block_size) * block_size,
        block_size=block_size,
        latent_cache=mode,
        enable_prefix_caching=False,  # every window's every token computed
        warmup="off",
    )
    engine = load_engine(args, loaded)
    params = [
        SamplingParams(
            max_tokens=length - prefill,
            temperature=0.0,
            logprobs=True,
            ignore_eos=True,
            constraint=OutputConstraint(tokens=tuple(w[prefill:])),
        )
        for w in wins
    ]
    t0 = time.perf_counter()
    outputs = engine.generate([w[:prefill] for w in wins], params)
    seconds = time.perf_counter() - t0
    for out in outputs:
        if out.error is not None:
            raise out.error
    return Result(mode, -np.array([[lp.logprob for lp in out.logprobs] for out in outputs], np.float64), seconds)


def run(
    model_dir: str,
    data: Path,
    length: int = 512,
    samples: int = 100,
    long_length: int = 4096,
    long_samples: int = 16,
    long_last: int = 64,
    batch: int = 64,
    modes: tuple[str, ...] = ("int4", "bf16"),
) -> dict[str, Any]:
    """Short windows (every token from position 1 decoded) and long windows (the last `long_last`
    tokens of `long_length`-token windows decoded, after a prefill of the rest). long_samples=0: none."""
    from ..engine.factory import engine_model
    from ..engine.model.loader import load_model

    model, tokenizer = load_model(model_dir)
    model = engine_model(model)
    tokens = load_tokens(tokenizer, data)
    report: dict[str, Any] = {"model": model_dir, "data": str(data), "tokens_in_file": len(tokens)}
    parts = [("short", length, samples, 1)]
    if long_samples:
        parts.append(("long", long_length, long_samples, long_length - long_last))
    for name, win_len, count, prefill in parts:
        wins = windows(tokens, win_len, count)
        if not wins:
            report[name] = {"error": f"the file has fewer than {win_len} tokens"}
            continue
        results = {m: score((model, tokenizer), wins, m, prefill=prefill, batch=batch) for m in modes}
        part: dict[str, Any] = {
            "window": win_len,
            "windows": len(wins),
            "scored_positions": [prefill, win_len - 1],
            "scored_tokens": int(next(iter(results.values())).nll.size),
        }
        for m, r in results.items():
            part[m] = {"ppl": r.ppl, "stderr": r.stderr, "ci95": list(r.ci95), "seconds": r.seconds}
        if "int4" in results and "bf16" in results:
            part["ratio_int4_bf16"] = list(ratio(results["int4"], results["bf16"]))
        report[name] = part
    return report


def render(report: dict[str, Any]) -> str:
    lines = [f"model {report['model']}  data {report['data']} ({report['tokens_in_file']} tokens)"]
    for name in ("short", "long"):
        part = report.get(name)
        if not part:
            continue
        if "error" in part:
            lines.append(f"{name}: {part['error']}")
            continue
        a, b = part["scored_positions"]
        lines.append(
            f"{name}: {part['windows']} windows of {part['window']} tokens, positions {a}-{b} scored "
            f"({part['scored_tokens']} tokens)"
        )
        for m in ("int4", "bf16"):
            if m in part:
                r = part[m]
                lo, hi = r["ci95"]
                lines.append(
                    f"  {m:5s} perplexity {r['ppl']:.4f} +- {r['stderr']:.4f} (95% over windows {lo:.4f}-{hi:.4f})"
                    f"  [{r['seconds']:.0f} s]"
                )
        if "ratio_int4_bf16" in part:
            q, lo, hi = part["ratio_int4_bf16"]
            lines.append(f"  ratio int4/bf16 {q:.5f} (95% {lo:.5f}-{hi:.5f})")
    return "\n".join(lines)
