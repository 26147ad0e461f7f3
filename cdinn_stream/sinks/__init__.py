"""Where reconstructions go: ZeroMQ, Tiled and EPICS adapters (one module each), and the wrapper
that keeps results in an on-disk spool while a store is away or behind (``SpooledSink``; the
Tiled sink is one, around a ``TiledStore``)."""

from .epics import EpicsSink
from .spooled import SpooledSink
from .tiled import FRAME_INFO_COLUMNS, TiledSink, TiledStore, read_frame_info, read_observables, read_run
from .zmq import ZmqPublisherSink, decode_message

__all__ = ["ZmqPublisherSink", "decode_message", "TiledSink", "TiledStore", "SpooledSink", "EpicsSink",
           "FRAME_INFO_COLUMNS", "read_frame_info", "read_observables", "read_run"]
