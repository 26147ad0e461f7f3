"""Real components on 127.0.0.1: a Tiled server, a caproto IOC, ZeroMQ sockets, a RunEngine."""

from __future__ import annotations

import logging
import secrets
import time
import uuid

import pytest
import torch
import zmq

from cdinn_stream.apps.demo import loopback_epics_env

loopback_epics_env()  # before pyepics is first used in this process


@pytest.fixture(scope="session")
def tiled_server(tmp_path_factory):
    from tiled.server import SimpleTiledServer

    key = secrets.token_hex(8)
    server = SimpleTiledServer(directory=tmp_path_factory.mktemp("tiled"), api_key=key,
                               readable_storage=[str(tmp_path_factory.getbasetemp())])
    yield server
    server.close()


@pytest.fixture
def tiled_client(tiled_server):
    from tiled.client import from_uri

    return from_uri(f"http://127.0.0.1:{tiled_server.port}", api_key=tiled_server.api_key)


@pytest.fixture(scope="session")
def ioc():
    from cdinn_stream.apps.ioc import IOCThread

    prefix = f"T{uuid.uuid4().hex[:6]}:"
    thread = IOCThread(prefix).start()
    yield thread
    thread.stop()


@pytest.fixture
def model():
    from cdinn_stream.nn.model import CDINN, ModelConfig
    from cdinn_stream.nn.reconstruct import CDIModel

    torch.manual_seed(0)
    return CDIModel(CDINN(ModelConfig(32, (8, 16, 32), 1, 4)), name="tiny", device="cpu", precision="fp32")


@pytest.fixture
def RE():
    from bluesky import RunEngine

    return RunEngine({})


class ZmqCollector:
    """A SUB socket on the sink's address, collecting decoded messages."""

    def __init__(self, address: str):
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"cdinn.")
        self.sock.connect(address)
        self.messages: list = []

    def drain(self, until_stops: int = 1, timeout: float = 20.0) -> list:
        from cdinn_stream.sinks import decode_message

        end = time.monotonic() + timeout
        while sum(m[0] == "cdinn.stop" for m in self.messages) < until_stops and time.monotonic() < end:
            if self.sock.poll(100):
                self.messages.append(decode_message(self.sock.recv_multipart()))
        return self.messages

    def close(self):
        self.sock.close()


@pytest.fixture
def zmq_pair():
    from cdinn_stream.sinks import ZmqPublisherSink

    sink = ZmqPublisherSink("tcp://127.0.0.1:0")
    collector = ZmqCollector(sink.address)
    # slow joiner: wait until the subscription reaches the publisher
    end = time.monotonic() + 5
    while time.monotonic() < end:
        sink._socket.send_multipart([b"cdinn.ping", b"{}"])
        if collector.sock.poll(50):
            collector.sock.recv_multipart()
            break
    yield sink, collector
    collector.close()
    sink.close()


@pytest.fixture(autouse=True)
def _quiet_caproto():
    logging.getLogger("caproto").setLevel(logging.ERROR)


class TiledServerProcess:
    """``tiled serve catalog`` in a child process with a catalog on disk: stop and start it again
    on the same port and the data are still there."""

    def __init__(self, directory):
        import socket

        self.directory = directory
        self.api_key = secrets.token_hex(8)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self._initialised = False

    def start(self, timeout: float = 60.0) -> TiledServerProcess:
        import subprocess
        import sys

        import httpx

        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "tiled", "serve", "catalog", str(self.directory / "catalog.db"), "-w",
               str(self.directory / "data"), "--host", "127.0.0.1", "--port", str(self.port), "--api-key", self.api_key]
        if not self._initialised:
            cmd.append("--init")
            self._initialised = True
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + timeout
        while True:
            try:
                httpx.get(f"{self.uri}/api/v1/", timeout=1).raise_for_status()
                return self
            except Exception:
                if time.monotonic() > end or self.proc.poll() is not None:
                    raise RuntimeError("tiled serve did not start") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def client(self):
        from tiled.client import from_uri

        return from_uri(self.uri, api_key=self.api_key)


@pytest.fixture
def tiled_process(tmp_path):
    server = TiledServerProcess(tmp_path / "tiled").start()
    yield server
    server.stop()


@pytest.fixture
def quick_tiled_retries(monkeypatch):
    """The Tiled client retries a failed request for up to 45 s (TILED_RETRY_TIMEOUT); tests of an
    unreachable server do not wait that long."""
    import tiled.client.utils as tiled_utils

    monkeypatch.setattr(tiled_utils, "TILED_RETRY_ATTEMPTS", 2)
    monkeypatch.setattr(tiled_utils, "TILED_RETRY_TIMEOUT", 1.0)
