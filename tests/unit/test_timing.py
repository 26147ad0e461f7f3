"""Latency statistics keep a fixed window of the latest latencies."""

import numpy as np

from cdinn_stream.core.timing import LatencyWindow, latency_ms


def test_latency_window_keeps_the_latest_in_fixed_memory():
    window = LatencyWindow(size=10)
    assert len(window) == 0 and latency_ms(window) == {"latency_p50_ms": None, "latency_p99_ms": None}
    window.extend(np.arange(4.0))
    np.testing.assert_array_equal(np.sort(np.asarray(window)), [0, 1, 2, 3])
    ring = window._ring
    for start in range(4, 40, 7):  # pieces that wrap round the ring
        window.extend(np.arange(start, start + 7, dtype=float))
    assert window._ring is ring and len(window) == 10
    np.testing.assert_array_equal(np.sort(np.asarray(window)), np.arange(36.0, 46.0))
    window.extend(np.arange(100.0, 125.0))  # more than the window at once
    np.testing.assert_array_equal(np.sort(np.asarray(window)), np.arange(115.0, 125.0))
    assert latency_ms(window)["latency_p50_ms"] == np.percentile(np.arange(115.0, 125.0), 50) * 1e3
    window.extend([200.0, 201.0, 202.0])  # after a long extend, the oldest of the kept ones go first
    np.testing.assert_array_equal(np.sort(np.asarray(window)), [*np.arange(118.0, 125.0), 200, 201, 202])
