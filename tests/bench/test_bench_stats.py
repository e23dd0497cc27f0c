import numpy as np
import pytest

from server.bench.stats import RequestRecord, percentile, summarize


@pytest.mark.parametrize("q", [0, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q):
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0]
    assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_percentile_known_values():
    xs = list(range(1, 11))
    assert percentile(xs, 50) == pytest.approx(5.5)
    assert percentile(xs, 90) == pytest.approx(9.1)
    assert percentile(xs, 99) == pytest.approx(9.91)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_summarize_known_records():
    ok = RequestRecord(
        start=0.0,
        end=1.0,
        chunk_times=[0.2, 0.4, 0.6, 1.0],
        output_tokens=4,
        prompt_tokens=10,
        usage_reported=True,
        finished=True,
    )
    slow = RequestRecord(
        start=0.0,
        end=2.0,
        chunk_times=[0.5, 2.0],
        output_tokens=2,
        prompt_tokens=30,
        usage_reported=True,
        finished=True,
    )
    bad = RequestRecord(start=0.0, end=0.1, error="http_400")
    cut = RequestRecord(start=1.0, end=2.0, chunk_times=[1.5], output_tokens=1)
    s = summarize([ok, slow, bad, cut], wall_s=2.0)
    assert s["requests"] == 4 and s["completed"] == 2 and s["unfinished"] == 1
    assert s["errors"] == {"http_400": 1}
    assert s["output_tokens"] == 7
    assert s["aggregate_tokens_per_s"] == pytest.approx(3.5)
    # TTFTs 0.2, 0.5, 0.5 s; gaps 0.2, 0.2, 0.4, 1.5 s.
    assert s["ttft_ms"]["p50"] == pytest.approx(500.0)
    assert s["ttft_ms"]["p90"] == pytest.approx(500.0)
    assert s["itl_ms"]["p50"] == pytest.approx(300.0)
    assert s["itl_ms"]["p99"] == pytest.approx(np.percentile([200, 200, 400, 1500], 99))
    # Decode rates after the first token: 3 / 0.8 and 1 / 1.5 tokens/s.
    assert s["request_tokens_per_s"]["mean"] == pytest.approx((3 / 0.8 + 1 / 1.5) / 2)
    assert s["mean_prompt_tokens"] == pytest.approx(20.0)
    assert s["mean_output_tokens"] == pytest.approx(3.0)


def test_summarize_empty_run():
    s = summarize([], wall_s=0.0)
    assert s["requests"] == 0 and s["ttft_ms"]["p50"] is None and s["aggregate_tokens_per_s"] is None
