"""Perplexity through the engine's own cache path, with the INT4 and with the bf16 latent cache.

The model runs in the engine's `ModelRunner` (the engine's absorbed MLA attention, over its paged
latent cache: `LatentCache` for "int4", `DenseLatentCache` for "bf16"; decode through this
device's default backend, `platform.DEFAULTS`). Each window's first
`prefill` tokens go in as prefill chunks (they too attend over the cache they were just written
to, dequantized); every later token is fed as a decode step, one token per sequence per step, as
the engine decodes a completion: the true token goes in, and the step's logits give the
log-probability of the next true token. So every scored token attends over the cache as the
engine stores it.

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

import mlx.core as mx
import numpy as np

from ..engine.core.scheduler import StepPlan
from ..engine.core.sequence import Sequence
from ..engine.model.model_runner import ModelRunner
from ..engine.types import SamplingParams
from ..platform import current_platform

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


def _noop(item: object) -> None:
    pass


def score(
    model: Any,
    wins: list[list[int]],
    mode: str,
    prefill: int = 1,
    batch: int = 64,
    chunk: int = 512,
    block_size: int = 64,
) -> Result:
    """NLL [windows, len - prefill] of each window's tokens from position `prefill` on, decoded one
    at a time through a `ModelRunner` of `model` (an engine model: `factory.engine_model`) with the
    `mode` latent cache ("int4" or "bf16")."""
    length = len(wins[0])
    per_seq = -(-length // block_size)
    batch = min(batch, len(wins))
    runner = ModelRunner(
        model,
        num_blocks=batch * per_seq,
        decode_backend=current_platform().defaults.decode_backend,
        block_size=block_size,
        latent_cache=mode,
    )
    rows = []
    t0 = time.perf_counter()
    for start in range(0, len(wins), batch):
        group = wins[start : start + batch]
        seqs = []
        for j, w in enumerate(group):
            seq = Sequence(f"ppl-{start + j}", w[:prefill], SamplingParams(max_tokens=length), emit=_noop)
            seq.block_table = list(range(j * per_seq, (j + 1) * per_seq))
            seqs.append(seq)
        nll = np.zeros((len(group), length - prefill), np.float64)
        for j, seq in enumerate(seqs):  # prefill, a chunk at a time; the last chunk scores token `prefill`
            while seq.num_computed < prefill:
                n = min(chunk, prefill - seq.num_computed)
                logits = runner.run(StepPlan(prefills=[(seq, n)]))
                mx.eval(logits, *runner.cache_arrays())
                seq.num_computed += n
            nll[j, 0] = _nll(logits, [group[j][prefill]])[0]
        for k in range(prefill, length - 1):  # feed token k, score token k + 1
            for seq, w in zip(seqs, group, strict=True):
                seq.append(w[k])
            logits = runner.run(StepPlan(decodes=[(seq, 1) for seq in seqs]))
            nll[:, k + 1 - prefill] = _nll(logits, [w[k + 1] for w in group])
            for seq in seqs:
                seq.num_computed += 1
        rows.append(nll)
    return Result(mode, np.concatenate(rows), time.perf_counter() - t0)


def _nll(logits: mx.array, targets: list[int]) -> np.ndarray:
    """-log p(target) per row of float32 logits [N, V]."""
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logp, mx.array(targets, mx.int32)[:, None], axis=-1)[:, 0]
    return -np.array(picked, dtype=np.float64)


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
        results = {m: score(model, wins, m, prefill=prefill, batch=batch) for m in modes}
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
