"""``cdinn-stream worker``: one process of the worker pool that shares runs through NATS JetStream.

Any number of workers, on any hosts, run :class:`PoolWorker` against one NATS server (streams
and subjects: :mod:`cdinn_stream.live.jetstream`; the publishing side:
:mod:`cdinn_stream.live.nats_publisher`). Each worker process:

* follows every run's control documents (start, descriptor, resources, datums, stop) from the
  first one kept, through a durable consumer of its own (``docs-<name>-<process>``), skipping the
  runs whose claim is in the claims bucket (merged, or being merged); it feeds a run's documents
  to its :class:`~cdinn_stream.live.callback.ReconstructionCallback`, in order and each once, when
  the first frame of that run reaches it (a worker that gets no frame of a run writes nothing for it);
* pulls frame messages from the consumer its pool shares (``<group>-<beamline>``), a fetch at a
  time (up to ``fetch_batch`` messages, no more than ``max_inflight_frames`` frames waiting for
  their results: the rest is left to the other workers); the callback crops them and its engine
  batches them for the model as in one process. One stream per run is reconstructed: the first
  whose descriptor holds an image; the frames of another image stream are refused (a warning,
  acknowledged), since the stored rows are keyed by seq_num alone;
* acknowledges a message only when every frame it carries is written by every tracked sink
  (ZeroMQ, and Tiled: the process's partition, :mod:`cdinn_stream.sinks.partitions`, where a
  frame parked in the spool counts as written; the ledger is :mod:`cdinn_stream.live.acks`); a
  sink failure, or the model failing on the frames (the engine's ``on_failed``), asks for a
  redelivery, and on the message's last delivery (``max_deliver``) terminates it with an error
  (so the run can still complete); a message held longer than half ``ack_wait`` is reported in
  progress. A worker that dies leaves its messages unacknowledged: after ``ack_wait`` the server
  hands them to the others. A message whose last delivery went to a worker that died is not
  delivered again: on the server's advisory (``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES``, one
  worker of the pool takes each), or, when no worker heard it, once the pool's consumer is idle
  and the run's stop is in, a worker removes it from the work queue and logs its frames as lost
  (an error), so that the run completes; the merge then records ``frames_missing`` and, of
  them, ``frames_lost`` apart from those the pipelines rejected (``frames_rejected``);
* decides that a run is complete when its stop document is in *and* no frame message of the run
  is left in the work queue (every one acknowledged or terminated), not when the stop arrives;
  then it closes the run in its callback, and the worker that creates the run's key in the
  claims bucket (``create`` fails for the others, without expiry) merges the partitions into the
  run's container in seq_num order, each frame once, publishes ``complete`` and marks the claim
  complete. A failed merge or publish is retried by the same worker.

Results on ZeroMQ carry the run uid and seq_nums: a frame redelivered after a worker died may be
published twice (by the dead worker before it died, and by the one that took it over), and a
subscriber recognises the copy by (run uid, seq_num). Each worker's ``correlation`` observable
(on ZeroMQ and the PVs) compares with the first frame *that worker* reconstructed of the run;
the merge recomputes the stored run's against its first stored frame
(:func:`correlation_from_first`), so that the record holds one reference.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..live.acks import AckTracker, tracked
from ..live.frames import image_keys
from ..live.jetstream import (
    RUN_HEADER,
    WORK_CONSUMER,
    JetStreamSettings,
    claim_key,
    decode_document,
    encode_document,
    ensure_streams,
    frame_seq_nums,
    frames_left,
    run_claims,
    work_consumer,
    work_subscription,
)
from ..live.nats_publisher import connect
from ..sinks.partitions import PartitionSink, merge_partitions, process_token
from ..sinks.spool import default_spool_dir
from .config import PipelineConfig

__all__ = ["PoolWorker", "build_worker", "default_worker_name", "correlation_from_first"]

logger = logging.getLogger(__name__)

#: seconds between two attempts at completing a run whose merge or publish failed
RETRY_INTERVAL = 5.0
#: seconds between two looks, while the worker has no room, for frame messages the server delivered
#: after their fetch returned
LATE_CHECK = 0.1
#: the JetStream API's error code for a message not in the stream (``delete_msg`` of one gone)
NO_MESSAGE_FOUND = 10057
#: completions put off at most while this worker's spool holds rows of the run (then merged without them)
MAX_SPOOL_WAITS = 60


def default_worker_name() -> str:
    """``<host>-<pid>``: unique among the pool's processes."""
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}".replace(".", "-")


@dataclass(eq=False)
class PoolRun:
    """What a worker knows of one run (one attempt: a run published again is a new attempt)."""

    uid: str
    beamline: str
    claim: str  #: its key in the claims bucket
    docs: list = field(default_factory=list)  #: control documents in order, for the callback
    streams: dict = field(default_factory=dict)  #: descriptor uid -> stream name
    images: dict = field(default_factory=dict)  #: descriptor uid -> whether it holds an image
    stream: str | None = None  #: the stream the pool reconstructs (the first with an image)
    refused: set = field(default_factory=set)  #: streams whose frames were refused (warned once)
    stop: dict | None = None
    opened: bool = False  #: its documents went to the callback
    closed: bool = False  #: its stop went to the callback
    completing: bool = False
    retry_at: float = 0.0  #: after a failed completion: when to try again
    claimed: bool = False  #: this worker's claim won: it merges (and retries until it has)
    summary: dict | None = None  #: the merge's summary, once merged
    announced: bool = False  #: ``complete`` published
    spool_waits: int = 0  #: completions put off while this worker's spool held rows of the run


class PoolWorker:
    """One worker of the pool (see the module docstring).

    Args:
        callback: the pipeline (its tracked sinks report to ``tracker``).
        tracker: the ledger of the frames the sinks owe (its ``on_done`` is set here).
        settings: the NATS server, subject prefix, beamline (``*``: all) and consumer settings.
        name: this worker's name (its partitions and its control consumer are named after it).
        process: a token for this process (its partitions' keys and its control consumer carry it).
        tiled_client: where the runs are merged (``None``: no Tiled).
        parent: the Tiled container of the merged runs.
        group: the pool: its workers share the consumer ``<group>-<beamline>``.
        close_wait: seconds the merging worker waits for the others to close their partitions.
        fetch_batch: frame messages per fetch at most.
        max_inflight_frames: frames fed and not yet stored at most (then the worker stops pulling).
        spooled: whether this worker's spool still holds rows of a run (its uid): the merge waits
            for them to be written back to the partition (``None``: no spool).
    """

    def __init__(self, callback, tracker: AckTracker, settings: JetStreamSettings, *, name: str,
                 process: str | None = None, tiled_client=None, parent: str = "cdinn", group: str = WORK_CONSUMER,
                 close_wait: float = 5.0, fetch_batch: int = 64, max_inflight_frames: int = 512,
                 check_interval: float = 0.2, spooled: Callable[[str], bool] | None = None):
        self.cb = callback
        self.tracker = tracker
        tracker.on_done = self._settled
        engine = getattr(callback, "engine", None)
        if engine is not None:  # frames the model failed on reach no sink: give their messages back
            engine.on_failed = self._lost
        self.settings = settings
        self.name = name
        self.process = process or process_token()
        self.tiled_client = tiled_client
        self.parent = parent
        self.group = group
        self.close_wait = close_wait
        self.fetch_batch = fetch_batch
        self.max_inflight_frames = max_inflight_frames
        self.check_interval = check_interval
        self.spooled = spooled or (lambda uid: False)
        self.max_deliver = settings.max_deliver  # the shared consumer's, once bound (0: no limit)
        self.runs: dict[str, PoolRun] = {}
        #: runs completed or claimed by another worker (recent): their late control documents are
        #: ignored, until a new start of the same uid (a replay)
        self.finished: OrderedDict[str, str] = OrderedDict()
        self.counts: Counter[str] = Counter()
        self._consumer = work_consumer(group, settings.beamline)  # the pool's shared consumer
        self._inflight: dict[int, int] = {}  # id(message) -> frames
        self._room: asyncio.Event | None = None  # set when frames in flight are answered (made in run()'s loop)
        self._suspects: dict[str, set[int]] = {}  # run uid -> messages an idle sweep found left (dropped if again)
        self._dropping: set[int] = set()  # stream sequences being dropped by this worker
        self._touched: dict[int, float] = {}  # id(message) -> when last reported in progress
        self._fetched: dict[int, tuple] = {}  # id(message) -> (message, when fetched), until fed or answered
        self._per_message = 1  # frames in the last frame message
        self._feeder = ThreadPoolExecutor(1, thread_name_prefix="cdinn-pool-feed")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._js = None
        self._claims = None

    @property
    def ident(self) -> str:
        """``<name>-<process>``: this process among the pool's."""
        return f"{self.name}-{self.process}"

    # -- running ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> dict:
        """Work until ``stop`` is set; then hand over what is in flight and close. Returns :meth:`stats`."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        self._loop = asyncio.get_running_loop()
        self._room = asyncio.Event()
        s = self.settings
        nc = await connect(s, f"cdinn-stream-worker-{self.ident}")
        self._js = js = nc.jetstream()
        await ensure_streams(js, s)
        self._claims = await run_claims(js, s)
        frames = await work_subscription(js, s, self.group)
        limit = (await frames.consumer_info()).config.max_deliver
        self.max_deliver = int(limit) if limit and limit > 0 else 0  # 0: no limit (never terminated)
        # the server's word that a frame message was delivered max_deliver times and never answered
        # (its last worker died): one worker of the pool (a queue group) takes each
        await nc.subscribe(f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{s.frames_stream}.{self._consumer}",
                           queue=f"{self._consumer}-max-deliveries", cb=self._on_max_deliveries)
        # every control document kept, from the first: the runs in progress are among them
        docs = await js.pull_subscribe(f"{s.prefix}.{s.beamline}.*", durable=f"docs-{self.ident}",
                                       stream=s.docs_stream,
                                       config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT,
                                                             deliver_policy=DeliverPolicy.ALL,
                                                             inactive_threshold=600.0))
        logger.info("worker %s: pulling frames of %s from %s", self.ident, s.beamline, s.url)
        tasks = [asyncio.create_task(coro) for coro in (self._control_loop(docs), self._frame_loop(frames),
                                                         self._upkeep_loop())]
        await stop.wait()
        tasks[1].cancel()  # no more frames; what is in flight is stored and acknowledged
        end = time.monotonic() + 30
        while self._inflight and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._loop.run_in_executor(None, self.cb.close)
        try:  # acknowledgements are sent: close (a drain waits on the pull subscriptions' queues)
            await docs.unsubscribe()
            await js.delete_consumer(s.docs_stream, f"docs-{self.ident}")  # the next process reads its own
        except Exception:
            logger.debug("deleting the control consumer failed (it expires)", exc_info=True)
        try:
            await nc.flush(timeout=5)
            await asyncio.wait_for(nc.close(), 5)
        except Exception:
            logger.debug("closing the NATS connection failed", exc_info=True)
        self._feeder.shutdown()
        return self.stats()

    def stats(self) -> dict:
        """The worker's counters and its pipeline's."""
        return {"worker": self.name, "process": self.process, **dict(self.counts), "pipeline": self.cb.stats()}

    def _submit(self, name: str, doc: dict) -> asyncio.Future:
        """Give a document to the callback on the feeding thread (submitted now: documents given
        without an ``await`` in between reach the callback in the order given)."""
        return self._loop.run_in_executor(self._feeder, self.cb, name, doc)

    async def _feed(self, name: str, doc: dict) -> None:
        await self._submit(name, doc)

    # -- control documents -----------------------------------------------------------------
    async def _control_loop(self, sub) -> None:
        while True:
            try:
                msgs = await sub.fetch(256, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # nothing new (a timeout), or the server away: ask again
                if not isinstance(err, asyncio.TimeoutError):
                    await asyncio.sleep(0.2)
                continue
            for msg in msgs:
                try:
                    await self._control(msg)
                except Exception:
                    logger.exception("worker %s: control message on %s failed", self.ident, msg.subject)
                await msg.ack()

    async def _control(self, msg) -> None:
        run_uid = (msg.headers or {}).get(RUN_HEADER)
        name, doc = decode_document(msg.data)
        if name == "start":
            await self._start(run_uid, msg, doc)
            return
        if run_uid in self.finished:
            return
        run = self.runs.get(run_uid)
        if name == "complete":
            if run is not None and doc.get("claim", run.claim) == run.claim:
                await self._close(run)
                self._forget(run)
            return
        if run is None or name == "merge":
            return
        if name == "stop":
            run.stop = doc
            return
        if name == "descriptor":
            stream = doc.get("name", "primary")
            run.streams[doc["uid"]] = stream
            run.images[doc["uid"]] = self._has_image(doc)
            if run.stream is None and run.images[doc["uid"]]:
                run.stream = stream
        run.docs.append((name, doc))
        if run.opened:  # (no await between the check and the submission: see _frame)
            await self._feed(name, doc)

    async def _start(self, run_uid: str, msg, doc: dict) -> None:
        claim = claim_key(run_uid, msg.metadata.sequence.stream)
        run = self.runs.get(run_uid)
        if (run is not None and run.claim == claim) or self.finished.get(run_uid) == claim:
            return  # this start again (a redelivery)
        if await self._claimed(claim):  # merged, or being merged by another worker: nothing to do here
            self._finish(run_uid, claim)
            return
        self.finished.pop(run_uid, None)  # published again (a replay): a new attempt
        if run is not None:
            logger.warning("worker %s: run %s starts again before its earlier attempt completed: that attempt is "
                           "closed here", self.ident, run_uid)
            await self._close(run)
        self.runs[run_uid] = PoolRun(run_uid, msg.subject.split(".")[1], claim, [("start", doc)])

    async def _claimed(self, claim: str) -> bool:
        """Whether the claims bucket holds ``claim`` (the server away: False; the claim at
        completion decides anyway)."""
        from nats.js.errors import KeyNotFoundError

        try:
            await self._claims.get(claim)
            return True
        except KeyNotFoundError:
            return False
        except Exception as err:
            logger.debug("worker %s: could not read claim %s: %r", self.ident, claim, err)
            return False

    def _has_image(self, descriptor: dict) -> bool:
        """Whether the descriptor's stream holds the detector's image (the callback's rule)."""
        return bool(image_keys(descriptor.get("data_keys", {}), getattr(self.cb, "image_key", None)))

    def _forget(self, run: PoolRun) -> None:
        if self.runs.get(run.uid) is run:
            del self.runs[run.uid]
        self._finish(run.uid, run.claim)

    def _finish(self, run_uid: str, claim: str) -> None:
        self.finished[run_uid] = claim
        self.finished.move_to_end(run_uid)
        while len(self.finished) > 1000:
            self.finished.popitem(last=False)

    # -- frames ------------------------------------------------------------------------------
    async def _frame_loop(self, sub) -> None:
        while True:
            room = self.max_inflight_frames - sum(self._inflight.values())
            if room > 0:
                # no more messages than the room left holds (at the last message's frames each): the
                # other workers get the rest
                want = max(1, min(self.fetch_batch, room // max(self._per_message, 1)))
            elif sub.pending_msgs:
                # delivered to this worker already (the server hands out the rest of a fetch's batch
                # after the fetch has returned): taken now, one at a time from the subscription's queue,
                # or they would wait past ack_wait unreported and go to another worker as well
                want = 1
            else:  # until a message in flight is answered (no await between the sum and the clear), or more
                self._room.clear()  # come in late
                try:
                    await asyncio.wait_for(self._room.wait(), LATE_CHECK)
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                msgs = await sub.fetch(want, timeout=0.5)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if not isinstance(err, asyncio.TimeoutError):
                    logger.debug("worker %s: fetch failed: %r", self.ident, err)
                    await asyncio.sleep(0.2)
                continue
            now = time.monotonic()
            for msg in msgs:  # held from now: the upkeep reports them in progress while they wait their turn
                self._fetched[id(msg)] = (msg, now)
            for msg in msgs:
                try:
                    await self._frame(msg)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.exception("worker %s: frame message on %s failed", self.ident, msg.subject)
                    self.tracker.forget(msg)
                    self._answered(msg)
                    await self._give_back(msg, "failed")
                finally:
                    self._fetched.pop(id(msg), None)
                    if id(msg) not in self._inflight:  # answered here (given back, refused): nothing to report
                        self._touched.pop(id(msg), None)

    async def _give_back(self, msg, why: str) -> None:
        """Ask for a redelivery; on the message's last delivery, terminate it (logged as an error:
        its frames are lost, and the run can complete without them)."""
        try:
            if self.max_deliver and msg.metadata.num_delivered >= self.max_deliver:
                logger.error("worker %s: %s %s on its last delivery (%d of %d): dropped", self.ident, msg.subject,
                             why, msg.metadata.num_delivered, self.max_deliver)
                await msg.term()
                self.counts["terminated"] += 1
            else:
                await msg.nak(delay=1.0)
                self.counts["nacked"] += 1
        except Exception as err:  # the server away: the message comes back after ack_wait
            logger.warning("worker %s: could not answer for %s: %r", self.ident, msg.subject, err)

    async def _known(self, run_uid: str, descriptor: str | None) -> PoolRun | None:
        """The run, once its control documents naming ``descriptor`` are in (they are published
        first, but come through another consumer: wait up to 2 s)."""
        end = time.monotonic() + 2.0
        while True:
            run = self.runs.get(run_uid)
            if run is not None and descriptor in run.streams:
                return run
            if time.monotonic() > end:
                return None
            await asyncio.sleep(0.01)

    async def _frame(self, msg) -> None:
        run_uid = (msg.headers or {}).get(RUN_HEADER)
        name, doc = decode_document(msg.data)
        descriptor = doc.get("descriptor")
        run = await self._known(run_uid, descriptor)
        if run is None:
            await self._give_back(msg, f"({name} of run {run_uid}) came before its start or descriptor")
            return
        if msg.metadata.num_delivered > 1:
            self.counts["redelivered"] += 1
        stream = run.streams[descriptor]
        if run.images.get(descriptor) and stream != run.stream:
            if stream not in run.refused:
                run.refused.add(stream)
                logger.warning("worker %s: run %s: frames of stream %s refused: the pool reconstructs one stream "
                               "per run (%s)", self.ident, run_uid, stream, run.stream)
            self.counts["frames_refused"] += len(frame_seq_nums(name, doc))
            await msg.ack()
            return
        seq = frame_seq_nums(name, doc)
        self._inflight[id(msg)] = self._per_message = len(seq)
        self.tracker.expect(msg, run_uid, stream, seq, since=self._fetched.get(id(msg), (None, None))[1])
        feeds = []
        if not run.opened:  # the run's documents so far, then the frame: submitted in order, no await between
            run.opened = True
            feeds = [self._submit(n, d) for n, d in list(run.docs)]
        feeds.append(self._submit(name, doc))
        await asyncio.gather(*feeds)
        self.tracker.fed(msg)
        self.counts["messages"] += 1
        self.counts["frames"] += len(seq)

    def _lost(self, block) -> None:
        """(From the engine's thread.) The model failed on these frames: no sink gets them."""
        self.tracker.lost(block.run_uid, block.stream, block.seq_nums)

    def _settled(self, msg, ok: bool) -> None:
        """(From a sink's thread.) Every frame of ``msg`` is stored (``ok``), or a sink or the model failed."""
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._answer(msg, ok)))

    async def _answer(self, msg, ok: bool) -> None:
        try:
            if ok:
                await msg.ack()
                self.counts["acked"] += 1
            else:
                await self._give_back(msg, "not stored (a sink or the model failed)")
        except Exception as err:  # the server away: the message comes back after ack_wait (a duplicate)
            logger.warning("worker %s: could not answer for %s: %r", self.ident, msg.subject, err)
        finally:
            self._answered(msg)

    def _answered(self, msg) -> None:
        """``msg`` is no longer in flight: room for more frames."""
        self._inflight.pop(id(msg), None)
        self._touched.pop(id(msg), None)
        if self._room is not None:
            self._room.set()

    # -- upkeep: rejected frames, long writes, run completion -------------------------------
    async def _upkeep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            try:
                await self._upkeep()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                logger.debug("worker %s: upkeep failed: %r", self.ident, err)

    async def _upkeep(self) -> None:
        # messages held past half ack_wait (waiting their turn after a fetch, their run's documents,
        # the feeding thread, or their sinks) are reported in progress: not handed to another worker
        now = time.monotonic()
        held = [*((msg, now - since) for msg, since in list(self._fetched.values())), *self.tracker.waiting()]
        for msg, age in held:
            if min(age, now - self._touched.get(id(msg), 0.0)) > self.settings.ack_wait / 2:
                self._touched[id(msg)] = now
                await msg.in_progress()
        if len(self.tracker):
            # frames without results (rejected) are settled once the pipeline is idle (on the feeding thread)
            idle = await self._loop.run_in_executor(self._feeder, self.cb.flush, 0)
            if idle:
                self.tracker.settle()
        now = time.monotonic()
        for run in [r for r in self.runs.values() if r.stop is not None and not r.completing and now >= r.retry_at]:
            left = await frames_left(self._js, self.settings, run.uid)
            if left and await self._consumer_idle():  # what is left will never be delivered: lost
                left -= await self._drop_undeliverable(run.uid)
            if left == 0:
                run.completing = True
                self._loop.create_task(self._complete(run))

    # -- frame messages that will not be delivered again ------------------------------------------------
    async def _on_max_deliveries(self, msg) -> None:
        try:
            advisory = json.loads(msg.data)
            await self._drop(int(advisory["stream_seq"]), f"its last delivery ({advisory.get('deliveries')} of "
                                                          f"{self.max_deliver or '?'}) was never answered")
        except Exception as err:  # noqa: BLE001 - an upkeep finds the message (once the pool is idle)
            logger.warning("worker %s: a max-deliveries advisory could not be handled: %r", self.ident, err)

    async def _consumer_idle(self) -> bool:
        """Nothing of the pool's consumer is waiting for delivery or for an answer."""
        info = await self._js.consumer_info(self.settings.frames_stream, self._consumer)
        return not info.num_pending and not info.num_ack_pending

    async def _drop_undeliverable(self, run_uid: str) -> int:
        """(When the pool's consumer is idle.) Drop the run's frame messages left in the work queue
        (delivered ``max_deliver`` times, never answered, and missed by the advisory: no worker was
        connected) that the previous sweep found too (an acknowledgement the stream has not applied
        yet is not taken for one). Returns how many."""
        from nats.js.errors import NotFoundError

        if not self.max_deliver:  # no limit: every message is delivered again
            return 0
        s, seq, dropped, found = self.settings, 0, 0, set()
        suspects = self._suspects.get(run_uid, set())
        while True:
            try:
                msg = await self._js.get_msg(s.frames_stream, seq=seq + 1, subject=f"{s.prefix}.*.*.{run_uid}",
                                             next=True)
            except NotFoundError:
                break
            seq = msg.seq
            if seq in suspects:
                dropped += await self._drop(seq, "it was not delivered again after its last delivery went "
                                                 "unanswered", msg)
            else:
                found.add(seq)
        self._suspects[run_uid] = found
        return dropped

    async def _drop(self, stream_seq: int, why: str, msg=None) -> int:
        """Remove frame message ``stream_seq`` from the work queue (so that its run can complete),
        logging its frames as lost: 1, or 0 when it is gone already (or being dropped here)."""
        from nats.js.errors import APIError, NotFoundError

        if stream_seq in self._dropping:
            return 0
        self._dropping.add(stream_seq)
        s = self.settings
        try:
            msg = msg or await self._js.get_msg(s.frames_stream, seq=stream_seq)
            run_uid = (msg.headers or {}).get(RUN_HEADER, "?")
            try:
                seq_nums = frame_seq_nums(*decode_document(msg.data))
            except Exception:  # noqa: BLE001 - the message is lost either way; say what is known
                seq_nums = []
            if not await self._js.delete_msg(s.frames_stream, stream_seq):
                return 0
        except NotFoundError:  # acknowledged late, or dropped by another worker
            return 0
        except APIError as err:
            if err.err_code == NO_MESSAGE_FOUND:  # (delete_msg's word for it)
                return 0
            raise
        finally:
            self._dropping.discard(stream_seq)
        logger.error("worker %s: frames %s of run %s lost: %s (the worker it went to stopped, or did not answer "
                     "within ack_wait); removed from the work queue so that the run can complete", self.ident,
                     list(seq_nums), run_uid, why)
        self.counts["messages_lost"] += 1
        self.counts["frames_lost"] += len(seq_nums)
        return 1

    async def _close(self, run: PoolRun) -> None:
        """Close the run in the callback (its partition is finished) and wait for the sinks."""
        if run.opened and not run.closed:
            run.closed = True
            await self._feed("stop", run.stop or {"uid": f"pool-stop-{run.uid}", "run_start": run.uid,
                                                  "time": time.time(), "exit_status": "abort", "num_events": {}})
            await self._loop.run_in_executor(None, self.cb.flush, 60.0)

    async def _complete(self, run: PoolRun) -> None:
        """Every frame of the run is acknowledged: close it here; merge it if this worker's claim
        wins (and, having won, until the merge and the ``complete`` message are through)."""
        try:
            await self._close(run)
            if not run.claimed:
                if not await self._claim(run):
                    self.counts["runs_completed"] += 1
                    self._forget(run)
                    return
                run.claimed = True
            if run.summary is None:
                summary: dict = {}
                spooled = await self._loop.run_in_executor(None, self.spooled, run.uid)
                if spooled and run.spool_waits >= MAX_SPOOL_WAITS:
                    logger.warning("worker %s: run %s merged while this worker's spool still holds rows of it (not "
                                   "written back in %d attempts): they go to its partition later (read_pool_run)",
                                   self.ident, run.uid, run.spool_waits)
                elif spooled:  # merged without them, its rows would come back to a partition merged away already
                    run.spool_waits += 1
                    logger.info("worker %s: run %s waits for its rows in this worker's spool to be written back",
                                self.ident, run.uid)
                    run.retry_at = time.monotonic() + RETRY_INTERVAL
                    run.completing = False
                    return
                if self.tiled_client is not None:
                    end = {"stop": run.stop, "exit_status": (run.stop or {}).get("exit_status")}
                    expected = ((run.stop or {}).get("num_events") or {}).get(run.stream)
                    summary = await self._loop.run_in_executor(
                        None, lambda: merge_partitions(self.tiled_client, run.uid, parent=self.parent,
                                                       close_wait=self.close_wait, end=end, expected=expected,
                                                       revise=correlation_from_first))
                run.summary = summary
            brief = {**run.summary, "frames_rejected": {  # counts in messages (the seq_num ranges are in Tiled)
                k: sum(b - a + 1 for a, b in v) for k, v in (run.summary.get("frames_rejected") or {}).items()}}
            if not run.announced:
                await self._publish(run, "complete", {"run_uid": run.uid, "claim": run.claim, "worker": self.name,
                                                      **brief})
                run.announced = True
            await self._claims.put(run.claim, json.dumps({"worker": self.ident, "state": "complete",
                                                          "time": time.time(), **brief}).encode())
            self.counts["runs_merged"] += 1
            self.counts["runs_completed"] += 1
            logger.info("worker %s: run %s complete: %s", self.ident, run.uid, json.dumps(brief))
            self._forget(run)
        except Exception:
            logger.exception("worker %s: completing run %s failed: trying again in %s s", self.ident, run.uid,
                             RETRY_INTERVAL)
            run.retry_at = time.monotonic() + RETRY_INTERVAL
            run.completing = False

    async def _claim(self, run: PoolRun) -> bool:
        """Create the run's key in the claims bucket: True for the one worker that does."""
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            await self._claims.create(run.claim, json.dumps({"worker": self.ident, "state": "merging",
                                                             "time": time.time()}).encode())
            return True
        except KeyWrongLastSequenceError:
            return False

    async def _publish(self, run: PoolRun, name: str, doc: dict) -> None:
        """Publish a pool document of the run (once per attempt: a retried publish is stored once)."""
        subject = f"{self.settings.prefix}.{run.beamline}.{name}"
        await self._js.publish(subject, encode_document(name, doc), timeout=5.0,
                               headers={"Nats-Msg-Id": f"{run.claim}:{name}", RUN_HEADER: run.uid})


def correlation_from_first(rows: dict[str, np.ndarray], chunk: int = 4096) -> None:
    """Set the merged ``rows``' ``correlation`` (in their ``observables``) against the first row's
    object (the run's first stored frame): each worker compared its frames with the first frame
    *it* reconstructed, so the stored run holds one reference, as one process would have used."""
    import torch

    from ..core.observe import correlation, reference_objects
    from ..sinks.tiled_layout import OBSERVABLE_COLUMNS

    obs = rows.get("observables")
    if obs is None or not len(obs) or "correlation" not in OBSERVABLE_COLUMNS:
        return
    column = OBSERVABLE_COLUMNS.index("correlation")
    amp, phase = torch.from_numpy(np.asarray(rows["amplitude"])), torch.from_numpy(np.asarray(rows["phase"]))
    reference = reference_objects(amp[:1], phase[:1])
    for lo in range(0, len(obs), chunk):
        obs[lo : lo + chunk, column] = correlation(amp[lo : lo + chunk], phase[lo : lo + chunk], reference).numpy()


def build_worker(config: PipelineConfig, settings: JetStreamSettings, *, name: str | None = None,
                 group: str = WORK_CONSUMER, close_wait: float = 5.0, fetch_batch: int = 64,
                 max_inflight_frames: int | None = None) -> PoolWorker:
    """A :class:`PoolWorker` with the pipeline ``config`` names: its ZeroMQ sink and its Tiled
    partitions tracked for acknowledgement, EPICS (if named) not."""
    from ..live.callback import ReconstructionCallback
    from ..sinks import EpicsSink, ZmqPublisherSink

    name = name or default_worker_name()
    process = process_token()
    model = config.load_model()
    client = config.tiled_client()
    stores: list = []
    if config.zmq_out:
        stores.append(ZmqPublisherSink(config.zmq_out))
    partitions = None
    if client is not None:  # the spool is the name's: a process started again under it writes back what is left
        spool = Path(config.spool_dir) if config.spool_dir else default_spool_dir()
        partitions = PartitionSink(client, worker=name, process=process, parent=config.tiled_parent,
                                   model_card=model.card, spool_dir=spool / f"worker-{name}")
        stores.append(partitions)
    tracker = AckTracker(len(stores), lambda token, ok: None)
    sinks: list = [tracked(s, tracker, i) for i, s in enumerate(stores)]
    if config.epics_prefix:
        sinks.append(EpicsSink(config.epics_prefix))
    cb = ReconstructionCallback(model=model, sinks=sinks, bin=config.bin, batch_size=config.batch_size,
                                max_latency=config.max_latency, refine_every=config.refine_every,
                                refine_iterations=config.refine_iterations, refine_above=config.refine_above,
                                refine_budget=config.refine_budget, refine_share=config.refine_share,
                                refine_window=config.refine_window, close_sinks=True)
    return PoolWorker(cb, tracker, settings, name=name, process=process, tiled_client=client,
                      parent=config.tiled_parent, group=group, close_wait=close_wait, fetch_batch=fetch_batch,
                      max_inflight_frames=max_inflight_frames or 2 * config.batch_size,
                      spooled=None if partitions is None else partitions.spools_run)
