"""`python -m server.bench profile`: where one engine step's time goes.

Builds the engine through the server's factory, runs each scenario's requests through it up to
the step to time, takes that step's plan from the engine's scheduler, and times single runs of it:

- `step`: the step as the engine runs it (host preparation, model, sampling, one evaluation);
- `host`: turning the plan into arrays (token ids, positions, block tables, slots);
- the model's parts, each evaluated on its own and summed over layers: attention projections
  (q/kv down and up projections, norms, rope), decode attention (fused INT4 kernel and
  `unembed_out`), prefill attention (latent read, expansion through `kv_b_proj`, SDPA), `o_proj`,
  the MoE router, routed experts, shared expert, dense MLP layers, final norm and LM head;
- `sampling`: the engine's sampler over the step's logits.

Evaluating after every part removes the overlap a single graph has, so the parts add up to more
than `step`; read them as shares. Each scenario runs twice before it is timed (MLX's CUDA backend
compiles kernels on first use of each shape), then `--reps` times; medians are reported.

Scenarios: `prefill:N@S` (one chunk of N prompt tokens after S cached tokens) and `decode:B@S`
(B sequences decoding one token each after S cached tokens, S >= 1), comma-separated. The cached
tokens are computed for real: a request of them first leaves them in the prefix cache (so a
prefill's S is a multiple of the block size); a decode's B prompts of S tokens then recompute
their last block together and draw their first token. That takes longer than the step itself
(a minute more for the defaults on the 2-core CPU).

    python -m server.bench profile --scenarios prefill:2048@0,prefill:2048@8192,decode:1@1024,decode:16@1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from server.bench.report import device_name, headed, update_section, utc_now
from server.engine.args import EngineArgs
from server.engine.core.scheduler import StepPlan
from server.engine.factory import engine_model, load_engine
from server.engine.llm_engine import LLMEngine
from server.engine.model.demo_model import ensure_demo_model
from server.engine.model.loader import load_model
from server.engine.sample.logits_processors import logits_processors
from server.engine.sample.sampling import SamplerState, sample
from server.engine.types import SamplingParams

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
DEFAULT_SCENARIOS = "prefill:2048@0,prefill:512@0,prefill:2048@8192,decode:1@1024,decode:16@1024,decode:64@1024"
PARTS = (
    "attn_proj",
    "attn_decode",
    "attn_prefill",
    "attn_o_proj",
    "router",
    "experts",
    "shared_expert",
    "dense_mlp",
    "lm_head",
)


def parse_scenario(text: str) -> tuple[str, int, int]:
    kind, _, rest = text.partition(":")
    n, _, s = rest.partition("@")
    if kind not in ("prefill", "decode") or not n.isdigit() or not (s or "0").isdigit():
        raise ValueError(f"bad scenario {text!r}: use prefill:N@S or decode:B@S")
    return kind, int(n), int(s or 0)


def _ids(n: int, seed: int, vocab: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % vocab for i in range(n)]


def build_plan(engine: LLMEngine, kind: str, n: int, s: int, seed: int) -> StepPlan:
    """The scenario's step as the engine's scheduler plans it, its cached tokens computed first
    (see the module's docstring); prompts of another `seed` share no prefix with these."""
    vocab = engine.runner.vocab_size
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    prompts = [_ids(s + n, seed, vocab)] if kind == "prefill" else [_ids(s, 1000 * seed + i, vocab) for i in range(n)]
    if s:
        engine.generate([p[:s] for p in prompts], params)  # leaves their full blocks in the prefix cache
    for p in prompts:
        engine.add_request(p, replace(params, max_tokens=2))  # a decode's sequences stay for the step
    if kind == "decode":
        engine.step()  # each prompt's last block again, all in one step: each draws its first token
    plan = engine.scheduler.schedule()
    got = (
        len(plan.decodes),
        {seq.num_computed for seq, _ in plan.decodes},
        [(q.num_computed, k) for q, k in plan.prefills],
    )
    if got != ((0, set(), [(s, n)]) if kind == "prefill" else (n, {s}, [])):
        raise SystemExit(f"{kind}:{n}@{s} planned as {got}: see --help for the steps a scenario can be")
    return plan


def time_step(engine: LLMEngine, plan: StepPlan, samplers: list[SamplerState]) -> dict[str, float]:
    """One step as the engine runs it, and the same step split into evaluated parts (seconds)."""
    runner: Any = engine.runner
    cache = runner.cache_arrays()
    mx.synchronize()
    t0 = time.perf_counter()
    logits = runner.run(plan)
    result = sample(logits, samplers, logits_processors(samplers))
    mx.eval(result.tokens, *cache)
    result.tokens.tolist()
    step = time.perf_counter() - t0

    parts: dict[str, float] = defaultdict(float)
    t0 = time.perf_counter()
    tokens, batch, rows = runner.prepare(plan)
    mx.eval(tokens, rows, batch.positions)
    parts["host"] = time.perf_counter() - t0
    clock = [time.perf_counter()]

    def mark(name: str, *arrays: mx.array) -> None:
        mx.eval(*arrays)
        now = time.perf_counter()
        parts[name] += now - clock[0]
        clock[0] = now

    logits = runner.forward(tokens, batch, rows, mark)
    t0 = time.perf_counter()
    result = sample(logits, samplers, logits_processors(samplers))
    mx.eval(result.tokens)
    result.tokens.tolist()
    parts["sampling"] = time.perf_counter() - t0
    return {"step": step, **parts}


def profile(engine: LLMEngine, scenarios: list[str], reps: int) -> list[dict[str, Any]]:
    out = []
    vocab = engine.runner.vocab_size
    for seed, text in enumerate(scenarios):
        kind, n, s = parse_scenario(text)
        plan = build_plan(engine, kind, n, s, seed)
        rows = len(plan.decodes) + (1 if plan.prefills else 0)
        samplers = [SamplerState(SamplingParams(temperature=0.0), [1], vocab) for _ in range(rows)]
        for _ in range(2):  # compile and allocate
            time_step(engine, plan, samplers)
        runs = [time_step(engine, plan, samplers) for _ in range(reps)]
        for seq, _ in [*plan.decodes, *plan.prefills]:
            engine.abort(seq.request_id)
        keys = sorted({k for r in runs for k in r})
        med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}
        tokens = plan.num_tokens
        out.append({"scenario": text, "tokens": tokens, "ms": {k: 1e3 * v for k, v in med.items()}})
        print(f"{text}: step {1e3 * med['step']:.2f} ms ({tokens / med['step']:.0f} tok/s)", flush=True)
        print(table(out[-1:]).splitlines()[-1], flush=True)  # the row now, in case a later one runs out of time
    return out


def table(results: list[dict[str, Any]]) -> str:
    cols = ["host", *PARTS, "sampling"]
    present = [c for c in cols if any(r["ms"].get(c, 0.0) > 0 for r in results)]
    head = "| scenario | step ms | tok/s | " + " | ".join(present) + " |"
    lines = [head, "|---|" + "---:|" * (2 + len(present))]
    for r in results:
        ms = r["ms"]
        total = sum(ms.get(c, 0.0) for c in present) or 1.0
        cells = [f"{ms.get(c, 0.0):.2f} ({100 * ms.get(c, 0.0) / total:.0f}%)" for c in present]
        lines.append(
            f"| {r['scenario']} | {ms['step']:.2f} | {1e3 * r['tokens'] / ms['step']:.0f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m server.bench profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="model dir or repo id (default: the embedded demo model)")
    ap.add_argument("--scenarios", default=DEFAULT_SCENARIOS)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cache-tokens", type=int, default=None, help="cache size (default: what the scenarios need)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--md", type=Path, default=None, help=f"update a section of this file (e.g. {DOCS})")
    ap.add_argument("--section", default="profile")
    ap.add_argument(
        "--moe-by-expert", choices=("auto", "on", "off"), default=EngineArgs.moe_by_expert, help="as the server's flag"
    )
    args = ap.parse_args(argv)

    scenarios = [s for s in args.scenarios.split(",") if s]
    parsed = [parse_scenario(s) for s in scenarios]
    need = max(n * (s + 64) if k == "decode" else s + n + 64 for k, n, s in parsed)
    # Room in one step for any scenario's chunk (a prefill's N; a decode's B last blocks), and no
    # less than the default.
    block = EngineArgs.block_size
    step_tokens = max(EngineArgs.max_num_batched_tokens, *(n if k == "prefill" else n * block for k, n, _ in parsed))
    started = utc_now()
    model, tokenizer = load_model(args.model or str(ensure_demo_model()))
    engine = load_engine(
        EngineArgs(
            model=args.model,
            cache_tokens=args.cache_tokens or need + 1024,
            max_num_seqs=256,
            max_num_batched_tokens=step_tokens,
            prefill_chunk_size=step_tokens,
            async_scheduling="off",  # each step read back before the next: the plan sees its draws
            moe_by_expert=args.moe_by_expert,
        ),
        (engine_model(model), tokenizer),
    )
    results = profile(engine, scenarios, args.reps)
    text = headed(
        f"Step profile: {args.model or 'demo model'}",
        started,
        "profile",
        argv,
        "Milliseconds per step (median of the timed runs); each part evaluated on its own, summed over layers,",
        "with its share of the parts' sum. `step` is the whole step in one graph, as the engine runs it.",
        "",
        table(results),
    )
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"device": device_name(), "date": started, "results": results}, indent=1))
    if args.md:
        update_section(args.md, args.section, text)
    return 0
