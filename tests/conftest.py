"""Shared fixtures: small simulated sets and a tiny random model (CPU, seconds); ``wait_for``,
the tests' way to wait for something to happen, and ``free_port`` (``from conftest import ...``)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest
import torch

from cdinn_stream.core.simulate import simulate
from cdinn_stream.nn.model import CDINN, ModelConfig
from cdinn_stream.nn.reconstruct import CDIModel


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> object:
    """Poll ``predicate()`` until it returns something true, and return that; raise AssertionError
    naming ``what`` when ``timeout`` seconds pass first. Tests wait with this, not with fixed
    sleeps: as long as needed on a loaded machine, no longer than needed on an idle one."""
    end = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate!r}")
        time.sleep(interval)


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def small_set():
    return simulate(64, 32, seed=3)


@pytest.fixture
def tiny_model() -> CDIModel:
    torch.manual_seed(0)
    return CDIModel(CDINN(ModelConfig(32, (4, 8, 16), 1)), name="tiny", device="cpu", precision="fp32")


@pytest.fixture(autouse=True)
def _spool_in_tmp(tmp_path, monkeypatch):
    """Results spooled for an unreachable Tiled server go to the test's folder, not ~/.cache."""
    monkeypatch.setenv("CDINN_SPOOL", str(tmp_path / "spool"))


@pytest.fixture
def tiny_weights(tmp_path):
    """A small untrained model's weights file."""
    from cdinn_stream.nn.weights import save_weights

    path = tmp_path / "tiny.pt"
    save_weights(CDINN(ModelConfig(32, (4, 8, 16), 1, 2)), path)
    return path
