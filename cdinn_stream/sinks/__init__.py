"""Where reconstructions go: ZeroMQ, Tiled and EPICS adapters (one module each)."""

from .zmq import ZmqPublisherSink, decode_message
from .tiled import TiledSink
from .epics import EpicsSink

__all__ = ["ZmqPublisherSink", "decode_message", "TiledSink", "EpicsSink"]
