"""Where reconstructions go: ZeroMQ, Tiled and EPICS adapters (one module each)."""

from .epics import EpicsSink
from .tiled import TiledSink
from .zmq import ZmqPublisherSink, decode_message

__all__ = ["ZmqPublisherSink", "decode_message", "TiledSink", "EpicsSink"]
