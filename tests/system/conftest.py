"""Real components on 127.0.0.1: a Tiled server, a caproto IOC, ZeroMQ sockets, a RunEngine."""

from __future__ import annotations

import logging
import os
import secrets
import time
import uuid

import pytest
import torch
import zmq
from conftest import free_port, wait_for

from cdinn_stream.apps.demo import loopback_epics_env


def _loopback_epics_settings() -> dict[str, str]:
    """The environment variables ``loopback_epics_env`` sets (Channel Access on 127.0.0.1, a free
    port), without leaving them set."""
    before = dict(os.environ)
    loopback_epics_env()
    settings = {k: v for k, v in os.environ.items() if before.get(k) != v}
    for key in settings:
        if key in before:
            os.environ[key] = before[key]
        else:
            del os.environ[key]
    return settings


@pytest.fixture(scope="session", autouse=True)
def loopback_epics():
    """Channel Access (the caproto IOC and the pyepics client) on 127.0.0.1 and a port of its own,
    for the whole session, set before pyepics is first used (its client library reads them once)
    and restored at the end."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _loopback_epics_settings().items():
            mp.setenv(key, value)
        yield


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
def ioc(loopback_epics):
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

    def subscribed():  # slow joiner: messages sent before the subscription reaches the publisher are lost
        sink._socket.send_multipart([b"cdinn.ping", b"{}"])
        if collector.sock.poll(50):
            collector.sock.recv_multipart()
            return True
        return False

    wait_for(subscribed, timeout=10, interval=0, what="the collector's subscription reaching the ZeroMQ sink")
    yield sink, collector
    collector.close()
    sink.close()


def publish_probe(publisher, uid: str | None = None) -> str:
    """Publish an empty run (a start and a stop document, no events; ``uid`` or a new one) with
    ``publisher`` (a bluesky 0MQ ``Publisher``); returns its uid. ZeroMQ drops what is published
    before its connections are made (the slow joiner): once a probe arrives at the far end, so do
    the documents published after it."""
    from event_model import compose_run

    run = compose_run(uid=uid, metadata={"purpose": "cdinn-stream test probe"})
    publisher("start", run.start_doc)
    publisher("stop", run.compose_stop())
    return run.start_doc["uid"]


def wait_for_serve(publisher, tiled_client, timeout: float = 30.0) -> None:
    """Publish probe runs until `cdinn-stream serve`, behind a bluesky-0MQ-proxy, has stored one in
    Tiled (as an empty container in ``cdinn``): the path publisher -> proxy -> serve -> Tiled is up."""
    probes: list[str] = []

    def stored() -> bool:
        probes.append(publish_probe(publisher))
        return "cdinn" in tiled_client and not set(probes).isdisjoint(tiled_client["cdinn"])

    wait_for(stored, timeout=timeout, interval=0.2, what="a probe run published through the proxy stored by serve")


@pytest.fixture(autouse=True)
def _quiet_caproto():
    logging.getLogger("caproto").setLevel(logging.ERROR)


class TiledServerProcess:
    """``tiled serve catalog`` in a child process with a catalog on disk: stop and start it again
    on the same port and the data are still there. With ``directory=None``: a stock
    ``tiled serve catalog --temp --api-key KEY``, as README.md says to start one. ``tables``: the
    catalog on disk stores tables too (in DuckDB), as bluesky's TiledWriter needs; such a server has
    no streaming cache (no ``--cache``), unlike ``--temp``."""

    def __init__(self, directory=None, *, tables: bool = False):
        self.directory = directory
        self.tables = tables
        self.api_key = secrets.token_hex(8)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self._initialised = False

    def start(self, timeout: float = 60.0) -> TiledServerProcess:
        import subprocess
        import sys

        import httpx

        cmd = [sys.executable, "-m", "tiled", "serve", "catalog", "--host", "127.0.0.1", "--port", str(self.port),
               "--api-key", self.api_key]
        if self.directory is None:
            cmd.append("--temp")
        else:
            (self.directory / "data").mkdir(parents=True, exist_ok=True)
            cmd += [str(self.directory / "catalog.db"), "-w", str(self.directory / "data")]
            if self.tables:
                cmd += ["-w", f"duckdb:///{self.directory / 'tables.duckdb'}"]
            if not self._initialised:
                cmd.append("--init")
                self._initialised = True
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tiled serve exited with status {self.proc.returncode}")
            try:
                httpx.get(f"{self.uri}/api/v1/", timeout=1).raise_for_status()
                return True
            except Exception:
                return False

        wait_for(answers, timeout=timeout, interval=0.2, what=f"tiled serve answering on {self.uri}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def client(self):
        from tiled.client import from_uri

        return from_uri(self.uri, api_key=self.api_key)


@pytest.fixture(scope="module")
def stock_tiled():
    """``tiled serve catalog --temp --api-key KEY`` on 127.0.0.1, as README.md says to start it:
    its URI, key and a client."""
    server = TiledServerProcess().start()
    yield server.uri, server.api_key, server.client()
    server.stop()


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
