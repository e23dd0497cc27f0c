"""`python -m server.bench`: one entry point, its subcommands, each with its own flags."""

import subprocess
import sys
from dataclasses import replace

import pytest

from server.bench.__main__ import SUBCOMMANDS, main

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset

NAMES = ("serve", "side-by-side", "engine", "profile", "constrained", "disk-tier", "kernel")


def test_help_lists_every_subcommand():
    out = subprocess.run(
        [sys.executable, "-m", "server.bench", "--help"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert tuple(SUBCOMMANDS) == NAMES
    for name in NAMES:
        assert name in out


@pytest.mark.parametrize("name", NAMES)
def test_each_subcommand_has_its_own_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m server.bench {name}" in out and "--" in out


def test_subcommand_help_runs_as_a_module():
    out = subprocess.run(
        [sys.executable, "-m", "server.bench", "engine", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "--prompt-len" in out and "--write" in out


@pytest.mark.parametrize("argv", [[], ["no-such-benchmark"], ["--base-url", "http://127.0.0.1:8080/v1"]])
def test_missing_or_unknown_subcommand_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "serve" in capsys.readouterr().err


def test_flags_reach_the_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "-c", "0"])
    assert e.value.code == 2
    assert "concurrency levels must be integers >= 1" in capsys.readouterr().err


def test_kernel_bench_shapes_may_name_heads_and_latent_width():
    import argparse

    from server.bench.kernel import Shape, shape_list

    assert shape_list("16x32768,16x8192x128x512") == [Shape(16, 32768), Shape(16, 8192, 128, 512)]
    assert [s.label for s in shape_list("1x1024,16x32768x8x256")] == ["1x1024", "16x32768x8x256"]
    for bad in ("16x", "16x8192x128", "0x1024"):
        with pytest.raises(argparse.ArgumentTypeError):
            shape_list(bad)


def test_the_kernel_bench_says_what_a_machine_without_a_fused_kernel_has(capsys):
    # On this CPU the engine decodes through plain MLX; the GPU self-test has nothing to run.
    assert main(["kernel"]) == 0
    assert "no fused kernel on this machine" in capsys.readouterr().out
    assert main(["kernel", "--md", "/nonexistent/benchmarks.md"]) == 1  # a table was asked for


def test_the_engine_bench_prefills_every_measured_prompt_in_full():
    # Its time to first token must be a prefill, never a prefix-cache hit on an earlier run.
    from support.engine_harness import demo_engine_model

    from server.bench.engine import concurrency_row, make_engine

    loaded = demo_engine_model()
    engine = make_engine(loaded, num_blocks=64)
    rows = [concurrency_row(engine, 2, 200, 2, loaded[0].args.vocab_size, run) for run in range(3)]
    assert engine.counters["cached_prompt_tokens"] == 0
    assert all(r["tokens"] == 4 and r["itl_p50_ms"] > 0 for r in rows)


def test_the_engine_bench_spreads_prompt_lengths_without_repeating_one(monkeypatch):
    # --length-spread: every request a length the engine has not seen (what prefill buckets are for).
    from support.engine_harness import demo_engine_model

    from server.bench import engine as bench

    lengths: list[int] = []
    submit = bench.submit
    monkeypatch.setattr(
        bench, "submit", lambda e, rid, ids, *rest: (lengths.append(len(ids)), submit(e, rid, ids, *rest))
    )
    loaded = demo_engine_model()
    engine = bench.make_engine(loaded, num_blocks=64)
    for run in range(3):
        bench.concurrency_row(engine, 4, 100, 2, loaded[0].args.vocab_size, run, spread=64)
    assert len(set(lengths)) == 12 and min(lengths) == 100 and max(lengths) < 164


def test_the_profile_times_the_step_each_scenario_names_after_computing_its_cached_tokens():
    from support.engine_harness import demo_engine_model

    from server.bench import profile
    from server.engine.args import EngineArgs
    from server.engine.factory import load_engine

    args = EngineArgs(
        cache_tokens=64 * 32, max_num_seqs=8, max_num_batched_tokens=512, async_scheduling="off", warmup="off"
    )
    engine = load_engine(replace(args, prefill_chunk_size=512), demo_engine_model())
    planned = []  # each plan as built: (decodes' cached tokens and outputs, prefills' cached prompt and chunk)
    build = profile.build_plan

    def recording(*a):
        plan = build(*a)
        decodes = [(s.num_computed, len(s.output_ids)) for s, _ in plan.decodes]
        planned.append((decodes, [(s.num_cached_prompt, s.num_computed, n) for s, n in plan.prefills]))
        return plan

    with pytest.MonkeyPatch.context() as m:
        m.setattr(profile, "build_plan", recording)
        rows = profile.profile(engine, ["prefill:64@128", "decode:4@64", "prefill:32@0"], reps=1)
    assert [r["tokens"] for r in rows] == [64, 4, 32]
    assert planned == [([], [(128, 128, 64)]), ([(64, 1)] * 4, []), ([], [(0, 0, 32)])]
    assert not engine.has_work and engine.blocks.num_free == len(engine.blocks.blocks)
