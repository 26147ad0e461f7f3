"""Where reconstructions go: ZeroMQ, Tiled and EPICS adapters (one module each)."""

from .epics import EpicsSink
from .tiled import FRAME_INFO_COLUMNS, TiledSink, read_frame_info, read_run
from .zmq import ZmqPublisherSink, decode_message

__all__ = ["ZmqPublisherSink", "decode_message", "TiledSink", "EpicsSink", "FRAME_INFO_COLUMNS", "read_frame_info",
           "read_run"]
