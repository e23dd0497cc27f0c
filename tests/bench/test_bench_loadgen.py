"""The load generator against the real HTTP app over a slow FakeEngine, on a local uvicorn."""

import asyncio
import json
import time

import pytest
from support.fake_engine import FakeEngine

from server.api.app import create_app
from server.bench.loadgen import LoadConfig, check_address, run_load
from server.bench.prompts import LengthDist, ReplayPrompts, SyntheticPrompts
from server.bench.serve import main as bench_main
from server.bench.servers import free_port

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset


def _run(source, **cfg):
    return asyncio.run(run_load(source, LoadConfig(progress=False, warmup_requests=0, **cfg)))


def test_streams_and_measures(serve_app):
    engine = FakeEngine(token_delay=0.01)
    base = serve_app(create_app(engine)) + "/v1"
    # The fake engine echoes the prompt's words: 6 words with max_tokens 5 give 5 tokens each.
    result = _run(SyntheticPrompts(LengthDist("fixed", 6), max_tokens=5), base_url=base, concurrency=4, num_requests=8)
    s = result["summary"]
    assert s["requests"] == 8 and s["completed"] == 8 and s["errors"] == {}
    assert s["output_tokens"] == 40 and s["mean_prompt_tokens"] > 6
    assert all(r["usage_reported"] and r["output_tokens"] == 5 for r in result["records"])
    assert s["ttft_ms"]["p50"] >= 10.0
    assert 8.0 <= s["itl_ms"]["p50"] < 200.0
    assert s["aggregate_tokens_per_s"] > 0 and s["request_tokens_per_s"]["mean"] > 0
    assert result["config"]["model"] == "fake-model"
    assert len(engine.requests) == 8
    json.dumps(result)


def test_errors_counted_by_kind(serve_app):
    base = serve_app(create_app(FakeEngine(max_model_len=16))) + "/v1"
    too_long = SyntheticPrompts(LengthDist("fixed", 40), max_tokens=4)
    s = _run(too_long, base_url=base, model="fake-model", concurrency=2, num_requests=3)["summary"]
    assert s["errors"] == {"http_400": 3} and s["completed"] == 0

    s = _run(SyntheticPrompts(LengthDist("fixed", 3), 2), base_url=base, model="no-such-model", num_requests=2)[
        "summary"
    ]
    assert s["errors"] == {"http_404": 2}

    refused = f"http://127.0.0.1:{free_port()}/v1"
    s = _run(SyntheticPrompts(LengthDist("fixed", 3), 2), base_url=refused, model="m", num_requests=2)["summary"]
    assert s["errors"] == {"connection": 2}


def test_engine_failure_mid_stream_is_a_stream_error(serve_app):
    base = serve_app(create_app(FakeEngine(fail_after=2))) + "/v1"
    s = _run(SyntheticPrompts(LengthDist("fixed", 8), 8), base_url=base, num_requests=2)["summary"]
    assert s["errors"] == {"stream_error": 2}


def test_time_bound_cuts_requests_and_cancels_them(serve_app):
    engine = FakeEngine(token_delay=0.05)
    base = serve_app(create_app(engine)) + "/v1"
    # Each request would stream 200 tokens, 10 s; the bound is 1 s.
    t0 = time.monotonic()
    result = _run(
        SyntheticPrompts(LengthDist("fixed", 200), 200), base_url=base, concurrency=3, num_requests=100, duration_s=1.0
    )
    assert time.monotonic() - t0 < 4.0
    s = result["summary"]
    assert s["requests"] == 3 and s["unfinished"] == 3 and s["errors"] == {}
    assert s["wall_s"] == pytest.approx(1.0, abs=0.2)
    assert 3 <= s["output_tokens"] <= 3 * 25  # partial streams still count toward throughput
    deadline = time.monotonic() + 5
    while len(engine.cancelled) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(engine.cancelled) == 3


def test_replay_file(serve_app, tmp_path):
    engine = FakeEngine()
    base = serve_app(create_app(engine)) + "/v1"
    replay = tmp_path / "r.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": "one two three"}], "max_tokens": 2, "stream": False},
        {"messages": [{"role": "user", "content": "four five"}]},
    ]
    replay.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    result = _run(ReplayPrompts(replay, max_tokens=9), base_url=base, num_requests=4)
    assert result["summary"]["completed"] == 4
    assert [r["output_tokens"] for r in result["records"]][0::2] == [2, 2]  # max_tokens from the file
    assert [p.max_tokens for _, _, p in engine.requests] == [2, 9, 2, 9]


def test_replay_file_rejects_bad_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no messages"}\n')
    with pytest.raises(ValueError, match="messages"):
        ReplayPrompts(bad, 4)


def test_synthetic_prompts_are_distinct_and_sized():
    src = SyntheticPrompts(LengthDist("fixed", 100), 8, tokens_per_word=2.0)
    a, b = src.next_body(), src.next_body()
    assert a["messages"] != b["messages"]
    assert len(a["messages"][0]["content"].split()) == 50 and a["max_tokens"] == 8
    import random

    rng = random.Random(0)
    uni = LengthDist.parse("uniform:10:20")
    assert all(10 <= uni.sample(rng) <= 20 for _ in range(200))
    assert LengthDist.parse("normal:5:100").sample(rng) >= 1
    for spec in ("fixed", "fixed:0", "uniform:5:1", "normal:3", "gamma:1:2", "fixed:x"):
        with pytest.raises(ValueError):
            LengthDist.parse(spec)


def test_only_loopback_unless_allowed():
    for ok in ("http://127.0.0.1:8080/v1", "http://localhost:1/v1", "http://[::1]:8080/v1", "https://127.0.0.2/v1"):
        check_address(ok)
    for bad in ("http://10.0.0.1:8080/v1", "http://example.com/v1", "ftp://127.0.0.1/", "127.0.0.1:8080"):
        with pytest.raises(ValueError):
            check_address(bad)
    check_address("http://example.com/v1", allow_remote=True)


def test_cli_sweep_writes_json_and_plot(serve_app, tmp_path, capsys):
    base = serve_app(create_app(FakeEngine(token_delay=0.002))) + "/v1"
    out = tmp_path / "run.json"
    rc = bench_main(
        [
            "--base-url",
            base,
            "-c",
            "1,2",
            "-n",
            "3",
            "--prompt-len",
            "uniform:4:8",
            "--max-tokens",
            "4",
            "--out",
            str(out),
            "--warmup",
            "0",
        ]
    )
    assert rc == 0
    results = json.loads(out.read_text())
    assert [r["config"]["concurrency"] for r in results] == [1, 2]
    assert all(r["summary"]["completed"] == 3 for r in results)
    png = out.with_suffix(".png")
    assert png.exists() and png.stat().st_size > 1000
    assert "| clients |" in capsys.readouterr().out


def test_cli_refuses_remote_and_bad_levels(capsys):
    for argv in (
        ["--base-url", "http://10.1.2.3:8080/v1"],
        ["-c", "1,0"],
        ["-c", "a"],
        ["--prompt-len", "x:1"],
        ["--max-tokens", "0"],
        ["--tokens-per-word", "1", "--tokenizer", "t.json"],
    ):
        with pytest.raises(SystemExit) as e:
            bench_main(argv)
        assert e.value.code == 2


def test_prompt_words_follow_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from server.bench.prompts import DEFAULT_WORDS, calibrate_tokens_per_word, words_for_tokenizer

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 300)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    words = words_for_tokenizer(path)
    assert words != DEFAULT_WORDS and all(w.startswith("w") for w in words) and len(set(words)) > 100
    assert calibrate_tokens_per_word(path, words) == pytest.approx(1.0)
    src = SyntheticPrompts(LengthDist("fixed", 50), 4, words=words)
    a, b = (tok.encode(src.next_body()["messages"][0]["content"]).ids for _ in range(2))
    assert a != b and len(set(a)) > 10

    bpe = Tokenizer(models.WordLevel({w: i for i, w in enumerate(("<unk>",) + DEFAULT_WORDS)}, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bpe.save(str(path))
    assert words_for_tokenizer(path) == DEFAULT_WORDS
