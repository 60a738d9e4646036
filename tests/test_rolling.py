"""oxypy.rolling: oxy's memmetrics tables, window expiry on reads, histogram accuracy."""

from __future__ import annotations

import random
import threading

import gevent
import pytest

from oxypy import ConfigurationError
from oxypy.rolling import (
    HIGHEST_US,
    Histogram,
    RatioCounter,
    RollingCounter,
    RollingHistogram,
    RoundTripMetrics,
    bucket_index,
    bucket_value,
)


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- RollingCounter ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("buckets", "resolution"),
    [
        pytest.param(0, 1.0, id="zero-buckets"),
        pytest.param(-1, 1.0, id="negative-buckets"),
        pytest.param(2.5, 1.0, id="float-buckets"),
        pytest.param(10, 0, id="zero-resolution"),
        pytest.param(10, -1.0, id="negative-resolution"),
        pytest.param(10, float("inf"), id="infinite-resolution"),
    ],
)
def test_invalid_windows_are_rejected(buckets: int, resolution: float) -> None:
    with pytest.raises(ConfigurationError):
        RollingCounter(buckets, resolution)
    with pytest.raises(ConfigurationError):
        RatioCounter(buckets, resolution)
    with pytest.raises(ConfigurationError):
        RollingHistogram(buckets, resolution)


def test_rolling_counter_clone_expired() -> None:
    clock = FakeClock()
    c = RollingCounter(3, 1.0, clock=clock)
    c.inc()
    clock.advance(1)
    c.inc()
    clock.advance(1)
    c.inc()
    clock.advance(1)
    clone = c.clone()
    assert clone.count() == 2
    c.inc(5)
    assert clone.count() == 2  # independent copy
    assert c.count() == 7


def test_rolling_counter_cleanup_after_idle_read() -> None:
    # oxy #245: buckets hold 1 .. 10**9; after 9 idle seconds only the newest is left.
    clock = FakeClock()
    c = RollingCounter(10, 1.0, clock=clock)
    for i in range(10):
        c.inc(10**i)
        clock.advance(1)
    clock.advance(-1)
    assert c.count() == 1_111_111_111
    clock.advance(9)
    assert c.count() == 10**9
    clock.advance(1)
    assert c.count() == 0


def test_rolling_counter_reset_and_properties() -> None:
    clock = FakeClock()
    c = RollingCounter(4, 0.5, clock=clock)
    assert (c.buckets, c.resolution, c.window) == (4, 0.5, 2.0)
    c.inc(3)
    assert c.counted_buckets() == 1
    c.reset()
    assert (c.count(), c.counted_buckets()) == (0, 0)


def test_rolling_counter_clock_going_back_drops_data() -> None:
    clock = FakeClock()
    c = RollingCounter(3, 1.0, clock=clock)
    c.inc()
    clock.advance(-10)
    assert c.count() == 0


# --- RatioCounter (oxy ratio_test.go) ---------------------------------------------


def test_ratio_counter_not_ready() -> None:
    fr = RatioCounter(10, 1.0, clock=FakeClock())
    assert not fr.is_ready()
    assert fr.ratio() == 0.0
    fr.count_a()
    assert not fr.is_ready()


@pytest.mark.parametrize(
    ("buckets", "steps", "ratio"),
    [
        pytest.param(1, [(0, 1, 0)], 1.0, id="noB"),
        pytest.param(1, [(0, 0, 1)], 0.0, id="noA"),
        pytest.param(3, [(0, 0, 1), (1, 1, 0), (1, 1, 0)], 2 / 3, id="multipleBuckets"),
        pytest.param(3, [(0, 0, 1), (1, 1, 0), (1, 1, 0), (1, 1, 2)], 3 / 5, id="overwriteBuckets"),
        pytest.param(
            3,
            [(0, 0, 1), (1, 1, 0), (1, 1, 0), (1, 1, 2), (2, 0, 1)],
            1 / 4,
            id="inactiveBuckets",
        ),
        pytest.param(2, [(0, 0, 1), (1, 1, 0), (100, 1, 0)], 1.0, id="longInactivity"),
    ],
)
def test_ratio_counter_table(
    buckets: int, steps: list[tuple[float, int, int]], ratio: float
) -> None:
    clock = FakeClock()
    fr = RatioCounter(buckets, 1.0, clock=clock)
    for advance, a, b in steps:
        clock.advance(advance)
        if a:
            fr.inc_a(a)
        if b:
            fr.inc_b(b)
    assert fr.is_ready()
    assert fr.ratio() == pytest.approx(ratio)


def test_ratio_counter_reset() -> None:
    fr = RatioCounter(1, 1.0, clock=FakeClock())
    fr.inc_b(1)
    fr.inc_a(1)
    assert fr.is_ready()
    assert fr.ratio() == 0.5
    assert fr.processed_count() == 2
    fr.reset()
    assert not fr.is_ready()
    fr.inc_a(2)
    assert fr.is_ready()
    assert (fr.ratio(), fr.count_a(), fr.count_b()) == (1.0, 2, 0)


# --- histogram -------------------------------------------------------------------


def test_histogram_merge() -> None:
    a = Histogram()
    a.record(1, 2)
    b = Histogram()
    b.record(2, 1)
    a.merge(b)
    assert a.value_at_quantile(50) == 1
    assert a.value_at_quantile(100) == 2
    assert a.total == 3
    assert b.total == 1


def test_histogram_copy_is_deep() -> None:
    a = Histogram()
    a.record(7)
    b = a.copy()
    a.record(9000)
    a.reset()
    assert (b.total, b.max(), a.total, a.max()) == (1, 7, 0, 0)


def test_empty_histogram_answers_zero() -> None:
    assert Histogram().value_at_quantile(50) == 0
    assert RoundTripMetrics(clock=FakeClock()).latency_at_quantile_ms(99.0) == 0


def test_rolling_histogram_rotation() -> None:
    clock = FakeClock()
    h = RollingHistogram(2, 1.0, clock=clock)
    h.record(5)
    assert h.merged().value_at_quantile(100) == 5
    clock.advance(1)
    h.record(2)
    h.record(1)
    assert h.value_at_quantile(100) == 5
    clock.advance(1)
    h.record(1)
    assert h.value_at_quantile(100) == 2  # the 5 rotated out


def test_rolling_histogram_reset() -> None:
    clock = FakeClock()
    h = RollingHistogram(2, 1.0, clock=clock)
    h.record(5)
    clock.advance(1)
    h.record(2)
    h.reset()
    assert h.merged().total == 0
    h.record(5)
    clock.advance(1)
    h.record(2)
    assert h.value_at_quantile(100) == 5


def test_idle_hour_leaves_no_latencies() -> None:
    # oxy rotates one bucket per *write*, so old latencies survive idle spells.
    clock = FakeClock()
    m = RoundTripMetrics(clock=clock)
    m.record(200, 3.0, False)
    assert 3000 <= m.latency_at_quantile_ms(100) <= 3030
    clock.advance(3600)
    assert m.latency_at_quantile_ms(100) == 0
    assert m.total_count() == 0


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(v, id=str(v))
        for v in (0, 1, 2, 127, 255, 256, 257, 511, 512, 1000, 51_000, 10**6, 10**9, HIGHEST_US)
    ],
)
def test_bucket_bounds_contain_the_value(value: int) -> None:
    i = bucket_index(value)
    assert bucket_value(i) >= value
    assert bucket_value(i - 1) < value if i else value == 0


def test_relative_error_under_one_percent_from_1us_to_1h() -> None:
    rng = random.Random(1)
    values = [1, 99, 255, 256, HIGHEST_US] + [int(10 ** rng.uniform(0, 9.556)) for _ in range(5000)]
    for v in values:
        reported = bucket_value(bucket_index(v))
        assert v <= reported <= v * 1.01, v
    assert bucket_value(bucket_index(HIGHEST_US * 5)) == bucket_value(bucket_index(HIGHEST_US))
    assert bucket_index(-5) == 0


def test_quantiles_match_sorted_values() -> None:
    rng = random.Random(2)
    values = sorted(int(rng.lognormvariate(9, 2)) + 1 for _ in range(2001))
    h = Histogram()
    for v in values:
        h.record(v)
    for q in (1, 25, 50, 75, 90, 99, 99.9, 100):
        exact = values[max(int(q / 100 * len(values) + 0.5), 1) - 1]
        assert exact <= h.value_at_quantile(q) <= exact * 1.01, q


# --- RoundTripMetrics ------------------------------------------------------------


def test_round_trip_defaults() -> None:
    # oxy TestNewRTMetrics_defaults, with network errors reported, not inferred.
    m = RoundTripMetrics(clock=FakeClock())
    m.record(200, 1.0, False)
    m.record(502, 2.0, True)
    m.record(200, 1.0, False)
    m.record(200, 1.0, False)
    assert m.network_error_count() == 1
    assert m.total_count() == 4
    assert m.status_code_counts() == {200: 3, 502: 1}
    assert m.network_error_ratio() == 0.25
    assert m.response_code_ratio(500, 503, 200, 300) == pytest.approx(1 / 3)
    assert 2000 <= m.latency_at_quantile_ms(100) <= 2020
    m.reset()
    assert (m.network_error_count(), m.total_count(), m.status_code_counts()) == (0, 0, {})
    assert (m.network_error_ratio(), m.latency_at_quantile_ms(100)) == (0.0, 0)


def test_status_502_alone_is_not_a_network_error() -> None:
    m = RoundTripMetrics(clock=FakeClock())
    m.record(502, 0.01, False)
    m.record(504, 0.01, False)
    assert m.network_error_ratio() == 0.0
    assert m.response_code_ratio(500, 600, 0, 600) == 1.0


@pytest.mark.parametrize(
    ("records", "expression_value"),
    [
        pytest.param([(200, 0.0)] * 5 + [(500, 0.0)] * 6, 6 / 11, id="6x500-of-11"),
        pytest.param([(200, 0.0)] * 5 + [(500, 0.0)] * 4, 4 / 9, id="4x500-of-9"),
        pytest.param([], 0.0, id="no-traffic"),
    ],
)
def test_response_code_ratio_table(
    records: list[tuple[int, float]], expression_value: float
) -> None:
    m = RoundTripMetrics(clock=FakeClock())
    for status, latency in records:
        m.record(status, latency, False)
    assert m.response_code_ratio(500, 600, 0, 600) == pytest.approx(expression_value)


def test_counter_window_is_ten_seconds_and_latency_window_a_minute() -> None:
    clock = FakeClock()
    m = RoundTripMetrics(clock=clock)
    m.record(200, 0.051, True)
    clock.advance(9.5)
    assert (m.total_count(), m.network_error_ratio()) == (1, 1.0)
    clock.advance(1)
    assert (m.total_count(), m.network_error_ratio()) == (0, 0.0)
    assert m.latency_at_quantile_ms(50.0) == 51
    clock.advance(50)
    assert m.latency_at_quantile_ms(50.0) == 0


def test_latency_series_gives_each_slot_oldest_first() -> None:
    clock = FakeClock(1000.0)  # slot 1000 of 1 s
    m = RoundTripMetrics(histogram_buckets=4, histogram_resolution=1.0, clock=clock)
    assert m.latency_series(50) == [0, 0, 0, 0]
    m.record(200, 0.010)
    m.record(200, 0.030)
    m.record(200, 0.050)
    clock.advance(2)  # an empty slot between
    m.record(200, 0.002)
    assert m.latency_series(50) == [0, 30_079, 0, 2_007]
    assert m.latency_series(100) == [0, 50_175, 0, 2_007]
    clock.advance(3)  # the first slot with data left the window
    assert m.latency_series(50) == [2_007, 0, 0, 0]


def test_concurrent_records_from_threads_and_greenlets() -> None:
    m = RoundTripMetrics()
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(n):
                m.record(200 if i % 4 else 502, 0.001, i % 4 == 0)
                if i % 50 == 0:
                    m.network_error_ratio()
                    m.latency_at_quantile_ms(99)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    greenlets = [gevent.spawn(work, 500) for _ in range(20)]
    threads = [threading.Thread(target=work, args=(500,)) for _ in range(4)]
    for t in threads:
        t.start()
    gevent.joinall(greenlets, timeout=30, raise_error=True)
    for t in threads:
        t.join(30)
    assert errors == []
    assert m.total_count() == 24 * 500
    assert m.network_error_count() == 24 * 125
    assert m.status_code_counts() == {200: 24 * 375, 502: 24 * 125}
