"""Every server the package starts binds 127.0.0.1 unless told otherwise; Tiled is used with a key."""

from __future__ import annotations

import secrets

import psutil
import pytest


def _listening() -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN or (c.type == 2 and c.laddr)}  # TCP listeners and bound UDP


def test_servers_bind_loopback_by_default(tmp_path, tiled_server):
    from tiled.server import SimpleTiledServer

    from cdinn_stream.apps.ioc import IOCThread
    from cdinn_stream.sinks import ZmqPublisherSink
    from cdinn_stream.sinks.zmq import DEFAULT_ADDRESS

    assert DEFAULT_ADDRESS.startswith("tcp://127.0.0.1:")
    before = _listening()
    zmq_sink = ZmqPublisherSink(DEFAULT_ADDRESS.rsplit(":", 1)[0] + ":0")
    ioc = IOCThread(f"SEC{secrets.token_hex(2)}:").start()
    # the session server's key: tiled keeps an in-process server's single-user key in process-wide
    # settings, so another key here would lock the session's server out for the tests after this one
    with SimpleTiledServer(directory=tmp_path / "tiled", api_key=tiled_server.api_key) as server:
        new = _listening() - before
        assert any(port == server.port for _, port in new)
        assert new and all(ip == "127.0.0.1" for ip, _ in new), new
    ioc.stop()
    zmq_sink.close()


def test_the_embedded_tiled_server_wants_its_key(tmp_path, tiled_server):
    from tiled.client import from_uri
    from tiled.server import SimpleTiledServer

    key = tiled_server.api_key  # not a new one: see above
    with SimpleTiledServer(directory=tmp_path / "tiled", api_key=key) as server:
        with pytest.raises(Exception, match="401|403|Unauthorized|credentials|authenticat"):
            from_uri(f"http://127.0.0.1:{server.port}", api_key="wrong-key").create_container("x")
        assert "x" not in from_uri(f"http://127.0.0.1:{server.port}", api_key=key)
