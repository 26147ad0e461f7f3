"""Replay stored runs from Tiled (bluesky-tiled-plugins / databroker 2) into the live callback.

``cdinn-stream replay UID --tiled URL`` reads the run's documents (``BlueskyRun.documents()``)
and feeds them to a :class:`~cdinn_stream.callback.ReconstructionCallback`, as fast as possible
or at the recorded pace. Results go where live ones go, under the Tiled container
``cdinn-replay`` by default so the live ones are kept.

The Tiled server must export ``BlueskyRun`` as ``application/json-seq`` (bluesky-tiled-plugins'
``json_seq_exporter``; the embedded demo server registers it). Frames stored in external files
are read from the paths in the stream_resource documents, so those files must be readable here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

__all__ = ["run_documents", "replay_documents", "register_exporter"]

logger = logging.getLogger(__name__)


def register_exporter() -> None:
    """Let a Tiled server started in this process serve ``BlueskyRun.documents()``."""
    from bluesky_tiled_plugins.exporters import json_seq_exporter
    from tiled.media_type_registration import default_serialization_registry

    default_serialization_registry.register("BlueskyRun", "application/json-seq", json_seq_exporter)


def run_documents(client, uid: str) -> Iterable[tuple[str, dict]]:
    """``(name, doc)`` of a stored run, in the order Tiled returns them."""
    try:
        run = client[uid]
    except KeyError:
        raise ValueError(f"no run {uid!r} in the Tiled catalog") from None
    try:
        yield from run.documents()
    except Exception as err:
        if "406" in str(err) or "json-seq" in str(err):
            raise ValueError("this Tiled server does not export BlueskyRun documents (application/json-seq): "
                             "configure bluesky_tiled_plugins.exporters:json_seq_exporter") from err
        raise


def replay_documents(docs: Iterable[tuple[str, dict]], callback: Callable[[str, dict], None], *,
                     pace: str = "fast") -> int:
    """Feed documents to ``callback``; ``pace="recorded"`` sleeps to reproduce the event times.
    Returns the number of documents."""
    n = 0
    t_first = wall_first = None
    for name, doc in docs:
        if pace == "recorded" and name in ("event", "event_page"):
            t = doc["time"][0] if name == "event_page" else doc["time"]
            if t_first is None:
                t_first, wall_first = t, time.monotonic()
            else:
                delay = (t - t_first) - (time.monotonic() - wall_first)
                if delay > 0:
                    time.sleep(delay)
        callback(name, doc)
        n += 1
    return n
