"""NATS JetStream as the pool's work queue: subjects, the documents' wire format, the streams.

Bluesky documents travel on subjects ``<prefix>.<beamline>.<document name>``, in two streams:

* ``<PREFIX>_DOCS`` (limits retention, ``max_age`` 7 days by default): the control documents
  ``start``, ``descriptor``, ``resource``, ``datum``, ``datum_page``, ``stream_resource``,
  ``stop``, and the pool's own ``merge`` and ``complete``. *Every* worker process reads all of
  them from the first (a durable consumer per process), so it can interpret any frame it gets.
* ``<PREFIX>_FRAMES`` (work-queue retention): the frame documents ``event``, ``event_page`` and
  ``stream_datum``, on ``<prefix>.<beamline>.<document name>.<run uid>``. The workers of a pool
  *share* them through one durable pull consumer (:func:`work_consumer`: ``<group>-<beamline>``):
  each message goes to one worker, is acknowledged only once its results are stored, and is
  removed from the stream by that acknowledgement. A run is complete when its stop document is
  in and no message of its subject is left (:func:`frames_left`): every frame acknowledged (or
  terminated after its last delivery), however many workers died. A work-queue stream takes
  only consumers whose filters do not overlap: pools on one server must take disjoint beamlines
  (one pool for ``*``, or one per beamline), :func:`work_subscription` says so when they do not.
* the key-value bucket ``<PREFIX>_RUNS`` (:func:`run_claims`): one key per run attempt, created
  by the worker that merges it (``create`` fails for every other worker, for ever, unlike a
  message id's duplicate window), then marked ``complete``; a worker reading old control
  documents skips the runs it finds there.

Every message carries the headers ``Cdinn-Run`` (the run uid) and ``Nats-Msg-Id`` (one per
document: a publish retried after a broker restart is stored once). The body is
:func:`encode_document`: a small JSON header with the arrays of the document as raw buffers
after it (inline frames cost one copy, no base64). Nothing here imports ``nats``: the functions
that talk to the server take the client's JetStream context.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

__all__ = ["JetStreamSettings", "CONTROL_DOCUMENTS", "FRAME_DOCUMENTS", "POOL_DOCUMENTS", "WORK_CONSUMER",
           "encode_document", "decode_document", "document_subject", "message_id", "frame_seq_nums",
           "ensure_streams", "frames_left", "PayloadTooLarge", "RUN_HEADER", "work_consumer", "work_subscription",
           "run_claims", "claim_key"]

#: documents every worker reads (the run's context)
CONTROL_DOCUMENTS = ("start", "descriptor", "resource", "datum", "datum_page", "stream_resource", "stop")
#: documents the pool's own bookkeeping adds to the control stream
POOL_DOCUMENTS = ("merge", "complete")
#: documents that carry frames (inline or by reference): shared among the workers
FRAME_DOCUMENTS = ("event", "event_page", "stream_datum")
#: the header naming a message's run
RUN_HEADER = "Cdinn-Run"
#: the group name of the pool's shared consumer (``--group`` of ``cdinn-stream worker``; the
#: consumer is named after the group and the beamline: :func:`work_consumer`)
WORK_CONSUMER = "workers"

_MAGIC = b"CDJ1"


class PayloadTooLarge(ValueError):
    """A document bigger than the server's ``max_payload``."""


@dataclass(frozen=True)
class JetStreamSettings:
    """Where the pool's documents go and how the workers' consumer behaves.

    Attributes:
        url: the NATS server, e.g. ``nats://127.0.0.1:4222``.
        prefix: first token of every subject; the streams are ``<PREFIX>_DOCS`` and ``<PREFIX>_FRAMES``.
        beamline: second token: the beamline (or ``replay``) the documents come from.
        ack_wait: seconds a worker has to acknowledge a frame message before it goes to another.
        max_deliver: deliveries of a frame message at most (then it is dropped and logged).
        max_ack_pending: frame messages out and not yet acknowledged, over all workers: the
            back-pressure (the server stops handing out frames past it).
        docs_max_age: seconds the control documents are kept (a worker starting later reads the
            runs still in progress from them).
    """

    url: str = "nats://127.0.0.1:4222"
    prefix: str = "cdinn"
    beamline: str = "bl"
    ack_wait: float = 30.0
    max_deliver: int = 10
    max_ack_pending: int = 1024
    docs_max_age: float = 7 * 86400.0

    @property
    def docs_stream(self) -> str:
        return f"{self.prefix.upper()}_DOCS"

    @property
    def frames_stream(self) -> str:
        return f"{self.prefix.upper()}_FRAMES"

    @property
    def claims_bucket(self) -> str:
        return f"{self.prefix.upper()}_RUNS"

    @property
    def frames_filter(self) -> str:
        """The frame subjects of this beamline (all beamlines for ``*``)."""
        return f"{self.prefix}.{self.beamline}.*.*"


def document_subject(prefix: str, beamline: str, name: str, run_uid: str) -> str:
    """``<prefix>.<beamline>.<name>`` (control) or ``<prefix>.<beamline>.<name>.<run uid>`` (frames)."""
    for token in (prefix, beamline):
        if not token or any(c in token for c in ".*> "):
            raise ValueError(f"{token!r} cannot be a subject token (no dots, spaces, * or >)")
    return f"{prefix}.{beamline}.{name}.{run_uid}" if name in FRAME_DOCUMENTS else f"{prefix}.{beamline}.{name}"


def message_id(name: str, doc: dict, run_uid: str) -> str:
    """A document's ``Nats-Msg-Id``: the same for a retried publish of the same document."""
    if name == "event_page":
        return f"{run_uid}:{name}:{doc['descriptor']}:{doc['seq_num'][0]}"
    if name == "event":
        return f"{run_uid}:{name}:{doc['descriptor']}:{doc['seq_num']}"
    if name in ("datum", "datum_page"):
        first = doc["datum_id"] if name == "datum" else doc["datum_id"][0]
        return f"{run_uid}:{name}:{first}"
    return f"{run_uid}:{name}:{doc.get('uid', '')}"


def frame_seq_nums(name: str, doc: dict) -> list[int]:
    """The seq_nums of the frames a frame document carries."""
    if name == "event_page":
        return [int(s) for s in doc["seq_num"]]
    if name == "event":
        return [int(doc["seq_num"])]
    if name == "stream_datum":
        return list(range(int(doc["seq_nums"]["start"]), int(doc["seq_nums"]["stop"])))
    return []


# -- the wire format ----------------------------------------------------------------------
def encode_document(name: str, doc: dict) -> bytes:
    """``b"CDJ1"``, the JSON header's length (uint32), the header ``{"name", "doc"}`` with each
    numpy array replaced by ``{"__nd__": [offset, nbytes, dtype, shape]}``, then the arrays' bytes."""
    buffers: list[bytes] = []
    offset = 0

    def pack(obj):
        nonlocal offset
        if isinstance(obj, np.ndarray) and obj.dtype != object:
            data = np.ascontiguousarray(obj)
            buffers.append(data.tobytes())
            ref = {"__nd__": [offset, data.nbytes, data.dtype.str, list(data.shape)]}
            offset += data.nbytes
            return ref
        if isinstance(obj, dict):
            return {k: pack(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            if obj and isinstance(obj[0], np.ndarray):  # a page's list of frames: one array
                try:
                    return pack(np.stack(obj))
                except ValueError:
                    pass
            return [pack(v) for v in obj]
        if isinstance(obj, np.generic):
            return obj.item()
        return obj

    header = json.dumps({"name": name, "doc": pack(doc)}).encode()
    return b"".join([_MAGIC, struct.pack("<I", len(header)), header, *buffers])


def decode_document(data: bytes) -> tuple[str, dict]:
    """``(name, doc)`` of :func:`encode_document`'s bytes (arrays are read-only views of ``data``)."""
    if data[:4] != _MAGIC:
        raise ValueError("not a cdinn-stream document message (bad magic)")
    (n,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8 : 8 + n])
    body = memoryview(data)[8 + n :]

    def unpack(obj):
        if isinstance(obj, dict):
            if "__nd__" in obj and len(obj) == 1:
                offset, nbytes, dtype, shape = obj["__nd__"]
                return np.frombuffer(body[offset : offset + nbytes], dtype=np.dtype(dtype)).reshape(shape)
            return {k: unpack(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [unpack(v) for v in obj]
        return obj

    return header["name"], unpack(header["doc"])


# -- the server ---------------------------------------------------------------------------
async def ensure_streams(js, settings: JetStreamSettings) -> None:
    """Create the two streams if they are missing (an existing stream is left as it is)."""
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    p = settings.prefix
    configs = [
        StreamConfig(name=settings.docs_stream, subjects=[f"{p}.*.{n}" for n in CONTROL_DOCUMENTS + POOL_DOCUMENTS],
                     retention=RetentionPolicy.LIMITS, storage=StorageType.FILE, max_age=settings.docs_max_age,
                     duplicate_window=120.0),
        StreamConfig(name=settings.frames_stream, subjects=[f"{p}.*.{n}.*" for n in FRAME_DOCUMENTS],
                     retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE, duplicate_window=120.0),
    ]
    for config in configs:
        try:
            await js.stream_info(config.name)
        except NotFoundError:
            await js.add_stream(config)


async def frames_left(js, settings: JetStreamSettings, run_uid: str) -> int:
    """Frame messages of ``run_uid`` still in the work queue (delivered or not): 0 once every one
    is acknowledged."""
    info = await js.stream_info(settings.frames_stream, subjects_filter=f"{settings.prefix}.*.*.{run_uid}")
    return sum((info.state.subjects or {}).values())


def work_consumer(group: str, beamline: str) -> str:
    """The durable consumer a pool shares: ``<group>-<beamline>`` (``<group>-all`` for ``*``), so a
    pool for one beamline never binds to a consumer made for another filter."""
    return f"{group}-{'all' if beamline == '*' else beamline}"


async def work_subscription(js, settings: JetStreamSettings, group: str = WORK_CONSUMER):
    """The pull subscription on the pool's shared consumer (:func:`work_consumer`), made with
    ``settings``' ack wait, deliveries and pending bound if it is new (an existing one keeps its
    own). Raises ``ValueError`` when an existing consumer of that name takes other subjects, or
    when the server refuses it because another pool's filter overlaps (work-queue streams take
    disjoint filters only)."""
    from nats.js.api import AckPolicy, ConsumerConfig
    from nats.js.errors import APIError, NotFoundError

    durable, subject = work_consumer(group, settings.beamline), settings.frames_filter
    try:
        info = await js.consumer_info(settings.frames_stream, durable)
    except NotFoundError:
        info = None
    if info is not None:
        have = info.config.filter_subject or ", ".join(info.config.filter_subjects or []) or "every subject"
        if have != subject:
            raise ValueError(f"the consumer {durable} of stream {settings.frames_stream} takes {have}, not {subject}: "
                             "use another --group, or delete that consumer (nats consumer rm "
                             f"{settings.frames_stream} {durable}) once its pool is gone")
    try:
        return await js.pull_subscribe(subject, durable=durable, stream=settings.frames_stream,
                                       config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=settings.ack_wait,
                                                             max_deliver=settings.max_deliver,
                                                             max_ack_pending=settings.max_ack_pending))
    except APIError as err:
        if err.err_code in (10099, 10100):  # work queue: unfiltered, or filters that overlap
            raise ValueError(f"the server refuses a consumer for {subject} on {settings.frames_stream} "
                             f"({err.description}): another pool takes subjects that overlap (one pool for "
                             "--beamline '*', or one per beamline; pools' filters must be disjoint)") from None
        raise


async def run_claims(js, settings: JetStreamSettings):
    """The key-value bucket of the runs' merge claims (created if missing; kept without expiry)."""
    from nats.js.api import KeyValueConfig, StorageType
    from nats.js.errors import BucketNotFoundError

    try:
        return await js.key_value(settings.claims_bucket)
    except BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(KeyValueConfig(bucket=settings.claims_bucket, history=1,
                                                        storage=StorageType.FILE,
                                                        description="cdinn-stream pool: merge claims of runs"))
    except Exception:  # another worker made it at the same moment
        return await js.key_value(settings.claims_bucket)


def claim_key(run_uid: str, start_seq: int) -> str:
    """A run attempt's key in the claims bucket: its uid and the stream sequence of its start
    document (a run published again later, a replay, is a new attempt)."""
    return f"{run_uid}.{start_seq}"
