"""The side-by-side script's argument handling and docs rendering; no server is started."""

import json
import sys
import time
from pathlib import Path

import pytest

from server.bench import cache_bytes
from server.bench.render import render_run, render_section
from server.bench.servers import ServerProcess, session_pids
from server.bench.side_by_side import SERVERS, parse_args, prompt_plan

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset


def test_defaults_cover_the_issue_matrix():
    args = parse_args([])
    assert args.servers == ["ours", "mlx_lm", "mlx_lm_kv4"]
    assert args.concurrency == [1, 4, 16, 64] and args.prompt_tokens == [1024, 8192]
    assert args.model is None and not args.render_only
    assert args.cell_seconds == [30.0, 60.0]
    assert parse_args(["--cell-seconds", "9"]).cell_seconds == [9.0, 9.0]


def test_quick_shrinks_the_run():
    args = parse_args(["--quick"])
    assert args.concurrency == [1, 4, 16] and args.prompt_tokens == [1024]
    assert args.max_tokens == 16 and args.cell_seconds == [15.0]


def test_server_selection_and_extra_args():
    args = parse_args(
        [
            "--servers",
            "ours,mlx_lm_kv4",
            "--ours-args",
            "--max-num-seqs 8",
            "--mlx-lm-args",
            "--decode-concurrency 64",
            "--model",
            "/m",
        ]
    )
    assert args.servers == ["ours", "mlx_lm_kv4"]
    assert args.ours_args == ["--max-num-seqs", "8"] and args.mlx_lm_args == ["--decode-concurrency", "64"]
    argv = SERVERS["mlx_lm_kv4"].argv(Path("/m"), 9000, args.mlx_lm_args)
    assert argv[1:4] == ["-m", "mlx_lm", "server"]
    assert argv[argv.index("--kv-bits") + 1] == "4" and argv[argv.index("--port") + 1] == "9000"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[-2:] == ["--decode-concurrency", "64"]
    ours = SERVERS["ours"].argv(Path("/m"), 9001, args.ours_args)
    assert ours[1:3] == ["-m", "server"] and ours[ours.index("--model") + 1] == "/m"


@pytest.mark.parametrize(
    "argv",
    [
        ["--servers", "vllm"],
        ["--servers", ""],
        ["--concurrency", "0"],
        ["--max-tokens", "0"],
        ["--cell-seconds", "0"],
        ["--cell-seconds", "1,2,3"],
        ["--cell-seconds", "x"],
        ["--ours-args", "'unclosed"],
    ],
)
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2


def test_prompt_plan_clamps_to_context():
    assert prompt_plan([1024, 8192], 32768, 64) == [(1024, 1024), (8192, 8192)]
    assert prompt_plan([1024, 8192], 4096, 64) == [(1024, 1024), (8192, 3968)]
    with pytest.raises(ValueError):
        prompt_plan([1024], 100, 64)


def test_cache_bytes_for_mistral_small_4_shape():
    config = {"kv_lora_rank": 256, "qk_rope_head_dim": 64, "torch_dtype": "bfloat16"}
    assert cache_bytes.ours(config) == 128 + 2 * 4 * 2 + 128  # nibbles + scales/biases + bf16 rope key
    assert cache_bytes.mlx_lm_full(config) == 640
    assert cache_bytes.mlx_lm_int4(config) == (128 + 16) + (32 + 4)


def _fake_run(tag: str) -> dict:
    summary = {
        "requests": 4,
        "completed": 4,
        "unfinished": 0,
        "errors": {},
        "wall_s": 1.0,
        "output_tokens": 64,
        "mean_prompt_tokens": 1030.0,
        "mean_output_tokens": 16.0,
        "ttft_ms": {"p50": 10.0, "p90": 12.0, "p99": 13.0},
        "itl_ms": {"p50": 1.0, "p99": 2.0},
        "request_tokens_per_s": {"mean": 900.0, "p50": 900.0},
        "aggregate_tokens_per_s": 64.0,
    }
    cell = {
        "config": {"concurrency": 1},
        "summary": summary,
        "prompt_tokens_requested": 8192,
        "prompt_tokens_target": 3968,
        "peak_rss_bytes": 290 * 2**20,
    }
    server = {
        "name": "ours",
        "label": "ours (INT4 paged latent)",
        "startup_s": 2.0,
        "error": None,
        "peak_rss_bytes": 300 * 2**20,
        "health": {"status": "ok", "engine": {"running": 0}},
        "exit_code": 0,
        "cells": [cell],
    }
    return {
        "tag": tag,
        "device": "test cpu",
        "date": "2026-01-01 00:00 UTC",
        "wall_s": 60.0,
        "command": "python -m server.bench side-by-side --quick",
        "model": {"model_type": "mistral4", "layers": 2, "dtype": 4, "context": 4096},
        "settings": {"prompt_plan": [[8192, 3968]], "requests_per_client": 1, "cell_seconds": [15.0], "max_tokens": 16},
        "cache_bytes_per_token_layer": {"ours": 144, "mlx_lm": 576},
        "servers": [server],
    }


def test_render_section_from_summaries(tmp_path):
    docs, data = tmp_path / "docs" / "benchmarks.md", tmp_path / "docs" / "bench"
    data.mkdir(parents=True)
    docs.write_text("# Benchmarks\n\n<!-- section:kernel -->\nkernel numbers\n<!-- /section:kernel -->\n")
    (data / "side_by_side_cpu.json").write_text(json.dumps(_fake_run("cpu")))
    (data / "side_by_side_cpu_8192.png").write_bytes(b"png")
    render_section(docs, data)
    text = docs.read_text()
    assert "kernel numbers" in text and "<!-- section:serving -->" in text
    assert (
        "clamped to the model's context" in text
        and "| ours (INT4 paged latent) | 1 | 4/4 |" in text
        and "| 64.0 | 290 |" in text
    )
    assert "(bench/side_by_side_cpu_8192.png)" in text and "| 144 | 300 |" in text
    assert (
        "### cpu: test cpu\n\n2026-01-01 00:00 UTC, test cpu. Command: `python -m server.bench side-by-side --quick`"
        in text
    )

    (data / "side_by_side_h100.json").write_text(json.dumps(_fake_run("h100")))
    render_section(docs, data)
    text = docs.read_text()
    assert text.index("### cpu") < text.index("### h100")
    assert (data / "side_by_side_h100_8192.png").stat().st_size > 1000  # drawn from the summary


def test_render_without_matplotlib_leaves_plots_out(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    (tmp_path / "side_by_side_cuda.json").write_text(json.dumps(_fake_run("cuda")))
    text = render_section(tmp_path / "benchmarks.md", tmp_path)
    assert "| ours (INT4 paged latent) | 1 | 4/4 |" in text and "![" not in text


def test_tensor_parallel_kind_starts_two_ranks_through_mlx_launch():
    argv = SERVERS["ours_tp2"].argv(Path("/m"), 9002, ["--max-num-seqs", "8"])
    launcher, rest = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    assert Path(launcher[0]).name == "mlx.launch" and launcher[launcher.index("-n") + 1] == "2"
    assert "--backend" not in launcher  # mlx.launch picks nccl with CUDA, ring without
    assert rest[1:3] == ["-m", "server"] and rest[-2:] == ["--max-num-seqs", "8"]
    assert "ours_tp2" not in parse_args([]).servers  # not part of the default comparison


def test_greedy_outputs_are_compared_with_the_first_servers(tmp_path):
    run = _fake_run("cpu")
    first = run["servers"][0]
    first["greedy"] = ["a b c", "a b c d", "x y"]
    run["servers"].append({**first, "name": "ours_tp2", "label": "two ranks", "greedy": ["a b c", "a b z d", "x"]})
    source = tmp_path / "side_by_side_cpu.json"
    source.write_text(json.dumps(run))
    text = render_run(run, tmp_path, source)
    assert "#### Greedy outputs (3 prompts, 32 tokens each)" in text
    assert "- two ranks: 1 of 3 identical to ours (INT4 paged latent)'s; the others first differ at word 2, 1" in text


def test_a_launched_set_counts_all_its_processes_and_leaves_none_behind(tmp_path):
    # The child takes a process group of its own, as mlx.launch's ranks do: the group's SIGTERM
    # does not reach it, so only the session sweep in stop() ends it.
    child = "x = bytearray(200 << 20); import time; time.sleep(60)"
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}], process_group=0); time.sleep(60)"
    server = ServerProcess([sys.executable, "-c", code], "http://127.0.0.1:9/v1", tmp_path / "log")
    server.start()
    assert server.proc is not None
    try:
        deadline = time.monotonic() + 20
        while len(session_pids(server.proc.pid)) < 2 or (server.peak_rss or 0) < 200 << 20:
            assert time.monotonic() < deadline, f"peak {server.peak_rss} over {session_pids(server.proc.pid)}"
            time.sleep(0.2)
        children = [p for p in session_pids(server.proc.pid) if p != server.proc.pid]
    finally:
        server.stop(5)
    time.sleep(0.5)
    assert not [p for p in children if Path(f"/proc/{p}").exists() and " Z " not in Path(f"/proc/{p}/stat").read_text()]
