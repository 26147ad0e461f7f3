"""Timing helpers shared by ``evaluate`` and ``bench``: where a measurement ran, and a median timer."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

__all__ = ["machine_info", "time_call", "time_rounds", "latency_ms", "LatencyWindow"]


def machine_info() -> dict:
    """Where a measurement ran: CPU, cores, torch threads, versions."""
    import torch  # here, so that the live pipeline's latency windows do not load torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _seconds_per_call(fn, min_seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return dt / n


def time_call(fn, *, repeat: int = 5, min_seconds: float = 0.2) -> float:
    """Median seconds of ``fn()`` over ``repeat`` rounds (each round loops to ``min_seconds``)."""
    fn()
    return float(np.median([_seconds_per_call(fn, min_seconds) for _ in range(repeat)]))


def time_rounds(fns: dict, *, repeat: int = 5, min_seconds: float = 0.2) -> dict[str, np.ndarray]:
    """Seconds a call of each of ``fns`` (name: callable) in each of ``repeat`` rounds, the
    functions taking turns within a round: on a shared machine, differences and ratios of the
    same round are measured under the same load (take the median of those, not of each column)."""
    for fn in fns.values():
        fn()
    rounds = [[_seconds_per_call(fn, min_seconds) for fn in fns.values()] for _ in range(repeat)]
    return dict(zip(fns, np.asarray(rounds).T, strict=True))


def latency_ms(seconds) -> dict[str, float | None]:
    """``latency_p50_ms`` and ``latency_p99_ms`` of latencies in seconds (``None`` when empty)."""
    lat = np.asarray(seconds, float)
    return {f"latency_p{q}_ms": float(np.percentile(lat, q) * 1e3) if lat.size else None for q in (50, 99)}


class LatencyWindow:
    """The latest ``size`` latencies (seconds) in a ring allocated once: the memory of a
    pipeline's statistics stays the same however long it runs (a deque of Python floats grew by
    about 3 MiB per 100,000 frames per counter until it was full)."""

    def __init__(self, size: int = 100_000):
        self._ring = np.full(size, np.nan)  # written now: its pages are resident from the start
        self._count = 0  # latencies ever added

    def extend(self, seconds: np.ndarray | list[float]) -> None:
        """Add latencies; the oldest fall out once ``size`` are held."""
        v = np.asarray(seconds, float).ravel()
        size, added = len(self._ring), len(v)
        if added > size:  # only the latest fit
            v = v[-size:]
        start = (self._count + added - len(v)) % size
        first = min(len(v), size - start)
        self._ring[start : start + first] = v[:first]
        self._ring[: len(v) - first] = v[first:]
        self._count += added

    def __len__(self) -> int:
        return min(self._count, len(self._ring))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        held = self._ring[: len(self)]
        return held.astype(dtype or float, copy=True)
