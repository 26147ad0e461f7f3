"""Pipeline suite: documents in -> reconstructions out over ZeroMQ and in Tiled.

Real parts on 127.0.0.1: a Tiled server in its own process (``tiled serve catalog --temp``), a
ZeroMQ subscriber in its own process that timestamps every frame it receives, and the
:class:`~cdinn_stream.ReconstructionCallback` fed with event-model documents carrying simulated
detector frames (Poisson noise, background, the Bragg peak off centre).

* ``throughput``: event pages as fast as they are taken; frames/s from the first document to the
  last result received by the subscriber and written to Tiled, against the bare model's
  frames/s at the same batch size and precision, measured in the same run.
* ``latency``: single events offered at a fixed rate (100 frames/s, like a detector), latency
  from each event's timestamp to its arrival at the subscriber (and to the end of its Tiled write).
* ``memory``: resident memory of this process sampled over a long run (100,000 frames).
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from event_model import compose_run
from tqdm.auto import tqdm

from cdinn_stream.core.physics import normalized_amplitude
from cdinn_stream.core.timing import time_call
from cdinn_stream.lab.sim import BCDIFrameSource, OperandoCrystal
from cdinn_stream.live.callback import ReconstructionCallback
from cdinn_stream.nn.reconstruct import load_model
from cdinn_stream.sinks import TiledSink, ZmqPublisherSink

KEY = "bcdi_image"
#: the paper's network, for the pipeline measured where the network dominates
PAPER_MODEL = "cdinn-32-paper"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TiledProcess:
    """``tiled serve catalog --temp`` on 127.0.0.1 in a child process."""

    def __init__(self):
        self.port, self.api_key = _free_port(), secrets.token_hex(16)
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="cdinn-bench-tiled-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "tiled", "serve", "catalog", "--temp", "--host",
                                      "127.0.0.1", "--port", str(self.port), "--api-key", self.api_key],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def client(self, timeout: float = 60.0):
        from tiled.client import from_uri

        end = time.monotonic() + timeout
        while True:
            try:
                return from_uri(self.uri, api_key=self.api_key)
            except Exception:
                if time.monotonic() > end or self.proc.poll() is not None:
                    tail = Path(self.log.name).read_text(errors="replace").strip().splitlines()[-15:]
                    raise RuntimeError(f"the Tiled server on {self.uri} did not start; its log ({self.log.name}) "
                                       "ends:\n" + "\n".join(tail)) from None
                time.sleep(0.3)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


_RECEIVER = """
import json, sys, time
import numpy as np, zmq
address, n_frames, out, ready, idle_ms = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
sock = zmq.Context.instance().socket(zmq.SUB)
sock.setsockopt(zmq.SUBSCRIBE, b"cdinn.")
sock.setsockopt(zmq.RCVHWM, 0)
sock.connect(address)
event_time, arrival, got, is_ready = [], [], 0, False
while got < n_frames and sock.poll(idle_ms):
    parts = sock.recv_multipart()
    now = time.time()
    if parts[0] == b"cdinn.heartbeat" and not is_ready:
        open(ready, "w").close()
        is_ready = True
    elif parts[0] == b"cdinn.result":
        times = json.loads(parts[1])["time"]
        event_time.extend(times)
        arrival.extend([now] * len(times))
        got += len(times)
np.savez(out, event_time=np.asarray(event_time), arrival=np.asarray(arrival))
"""


class Subscriber:
    """A ZeroMQ subscriber in a child process: stamps each frame's arrival (``time.time()``) and
    saves the stamps once ``n_frames`` results have arrived (or none for ``idle`` s)."""

    def __init__(self, sink: ZmqPublisherSink, n_frames: int, workdir: Path, idle: float = 120.0):
        tag = secrets.token_hex(4)
        self.out, ready = workdir / f"received-{tag}.npz", workdir / f"ready-{tag}"
        self.proc = subprocess.Popen([sys.executable, "-c", _RECEIVER, sink.address, str(n_frames), str(self.out),
                                      str(ready), str(int(idle * 1000))])
        end = time.monotonic() + 60
        while not ready.exists():  # the slow joiner: publish heartbeats until one arrives
            sink.heartbeat()
            if time.monotonic() > end or self.proc.poll() is not None:
                raise RuntimeError("the ZeroMQ subscriber did not connect")
            time.sleep(0.05)

    def result(self, timeout: float = 300.0) -> dict:
        self.proc.wait(timeout)
        d = np.load(self.out)
        return {"event_time": d["event_time"], "arrival": d["arrival"]}


def frame_pool(n: int = 512, frame_shape: tuple[int, int] = (64, 64), size: int = 32) -> np.ndarray:
    """``n`` noisy detector frames of operando crystals with the Bragg peak off centre."""
    rng = np.random.default_rng(0)
    frames = []
    for k in range(8):
        src = BCDIFrameSource(OperandoCrystal(size, seed=k), frame_shape=frame_shape, seed=k,
                              peak_row=int(rng.integers(size // 2, frame_shape[0] - size // 2)))
        for _ in range(n // 8):
            frames.append(src())
    return np.stack(frames)


def _documents(pool: np.ndarray):
    run = compose_run(metadata={"purpose": "cdinn-stream pipeline benchmark"})
    desc = run.compose_descriptor(name="primary", data_keys={
        KEY: {"source": "sim", "dtype": "array", "shape": list(pool.shape[1:])}})
    return run, desc


def _pipeline(model, zmq_sink: ZmqPublisherSink, tiled: TiledProcess | None, batch_size: int,
              max_latency: float) -> ReconstructionCallback:
    """The callback publishing to ZeroMQ and, unless ``tiled`` is ``None``, writing to Tiled."""
    sinks = [zmq_sink] + ([TiledSink(tiled.client(), parent="bench")] if tiled is not None else [])
    return ReconstructionCallback(model=model, sinks=sinks, batch_size=batch_size, max_latency=max_latency)


def _tiled_stats(stats: dict) -> dict:
    return stats["sinks"].get("TiledSink", {"frames_written": None, "writes": None, "latency_p50_ms": None,
                                            "latency_p99_ms": None})


def _flood(model, tiled: TiledProcess | None, n_frames: int, page: int, batch_size: int, workdir: Path,
           label: str) -> tuple[float, dict, dict, np.ndarray]:
    """Event pages as fast as the pipeline takes them: seconds from the first document to the last
    frame received (and stored), the subscriber's stamps, the callback's stats, the frame pool."""
    pool = frame_pool()
    zmq_sink = ZmqPublisherSink("tcp://127.0.0.1:0")
    sub = Subscriber(zmq_sink, n_frames, workdir)
    cb = _pipeline(model, zmq_sink, tiled, batch_size, 0.01)
    run, desc = _documents(pool)
    t0 = time.time()
    cb("start", run.start_doc)
    cb("descriptor", desc.descriptor_doc)
    for i in tqdm(range(0, n_frames, page), desc=label, unit="page", leave=False):
        idx = np.arange(i, min(i + page, n_frames)) % len(pool)
        now = time.time()
        cb("event_page", desc.compose_event_page(data={KEY: pool[idx]}, timestamps={KEY: [now] * len(idx)},
                                                 seq_num=list(range(i + 1, i + 1 + len(idx))),
                                                 time=[now] * len(idx), validate=False))
    cb("stop", run.compose_stop())
    cb.flush(timeout=600)
    got = sub.result()
    t_end = max(time.time(), got["arrival"].max() if len(got["arrival"]) else 0)
    stats = cb.stats()
    cb.close()
    zmq_sink.close()
    if tiled is not None:  # what the server holds, parked-and-written-back results included
        stored = tiled.client()["bench"]
        uid = run.start_doc["uid"]
        stats["frames_in_tiled"] = int(stored[uid]["frame_info"].shape[0]) if uid in stored else 0
    return t_end - t0, got, stats, pool


def throughput(model_name: str, precision: str, n_frames: int, page: int, batch_size: int, tiled: TiledProcess | None,
               workdir: Path, device: str = "cpu") -> dict:
    """Event pages as fast as the pipeline takes them; the bare model at the same batch size."""
    import torch

    model = load_model(model_name, device=device, precision=precision)
    crops = np.resize(frame_pool()[:, 16:48, 16:48], (batch_size, 32, 32))  # the pool repeated to a full batch
    prepared = normalized_amplitude(crops).to(model.device)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    raw = batch_size / time_call(lambda: (model.predict_tensor(prepared), sync()), repeat=5)
    seconds, got, stats, pool = _flood(model, tiled, n_frames, page, batch_size, workdir, "pipeline throughput")
    fps = n_frames / seconds
    return {"frames": n_frames, "page": page, "batch_size": batch_size, "precision": model.precision,
            "device": str(model.device),
            "detector_frame": list(pool.shape[1:]), "frames_received_zmq": int(len(got["arrival"])),
            "frames_in_tiled": stats.get("frames_in_tiled"), "tiled_writes": _tiled_stats(stats)["writes"],
            "tiled_dropped": _tiled_stats(stats).get("frames_dropped"),
            "tiled_parked": _tiled_stats(stats).get("frames_spilled"), "frames_dropped": stats["frames_dropped"],
            "seconds": seconds, "frames_per_s": fps, "raw_model_frames_per_s": raw, "ratio_to_raw_model": fps / raw}


class _NullModel:
    """Stands in for the network (returns its input as amplitude and phase): the pipeline's
    ceiling without the model -- documents, peak search and crop, batching, ZeroMQ."""

    def __init__(self, model):
        self.network, self.name, self.card, self.size = model.network, "null", {}, model.size
        self.device, self.precision, self.centre = model.device, "none", model.centre

    def predict_tensor(self, amplitude):
        return amplitude, amplitude


def ceiling(model_name: str, n_frames: int, page: int, batch_size: int, workdir: Path) -> dict:
    """Documents in to ZeroMQ subscriber with the network replaced by :class:`_NullModel` (no Tiled)."""
    model = _NullModel(load_model(model_name, device="cpu", precision="fp32"))
    seconds, got, _, _ = _flood(model, None, n_frames, page, batch_size, workdir, "pipeline ceiling")
    return {"frames": n_frames, "page": page, "frames_received_zmq": int(len(got["arrival"])),
            "frames_per_s": n_frames / seconds}


def latency(model_name: str, precision: str, rate: float, n_frames: int, tiled: TiledProcess | None, workdir: Path,
            max_latency: float = 0.005, threads: int = 1, device: str = "cpu") -> dict:
    """Single events offered at ``rate`` frames/s; per-frame latency to the subscriber and to Tiled.

    The model runs on ``threads`` torch threads: at 100 frames/s one core is plenty, and the
    other serves the Tiled server and the subscriber (two busy torch threads on a 2-core machine
    doubled the p99 in our runs)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _latency(model_name, precision, rate, n_frames, tiled, workdir, max_latency, device) | {
            "torch_threads": threads, "device": device}
    finally:
        torch.set_num_threads(previous)


def _latency(model_name: str, precision: str, rate: float, n_frames: int, tiled: TiledProcess | None, workdir: Path,
             max_latency: float, device: str) -> dict:
    model = load_model(model_name, device=device, precision=precision)
    pool = frame_pool()
    zmq_sink = ZmqPublisherSink("tcp://127.0.0.1:0")
    sub = Subscriber(zmq_sink, n_frames, workdir)
    cb = _pipeline(model, zmq_sink, tiled, 64, max_latency)
    run, desc = _documents(pool)
    cb("start", run.start_doc)
    cb("descriptor", desc.descriptor_doc)
    t0 = time.monotonic()
    for i in tqdm(range(n_frames), desc=f"pipeline latency at {rate:.0f} frames/s", unit="frame", leave=False):
        wait = t0 + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        now = time.time()
        cb("event", desc.compose_event(data={KEY: pool[i % len(pool)]}, timestamps={KEY: now}, seq_num=i + 1,
                                       time=now, validate=False))
    cb("stop", run.compose_stop())
    cb.flush(timeout=120)
    got = sub.result()
    stats = cb.stats()
    cb.close()
    zmq_sink.close()
    lat = (got["arrival"] - got["event_time"]) * 1e3
    tiled_stats = _tiled_stats(stats)
    return {"rate": rate, "frames": n_frames, "max_latency_s": max_latency, "precision": model.precision,
            "frames_received_zmq": int(len(lat)),
            "zmq_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                       "max": float(lat.max())},
            "tiled_ms": {"p50": tiled_stats["latency_p50_ms"], "p99": tiled_stats["latency_p99_ms"]},
            "tiled_writes": tiled_stats["writes"]}


def memory(model_name: str, precision: str, n_frames: int, page: int, rate: float, tiled: TiledProcess | None,
           workdir: Path) -> dict:
    """Resident memory of this process and queue depths, sampled over an ``n_frames`` run offered
    at ``rate`` frames/s in pages of ``page`` (a detector's pace, not a flood)."""
    model = load_model(model_name, device="cpu", precision=precision)
    pool = frame_pool()
    proc = psutil.Process()
    zmq_sink = ZmqPublisherSink("tcp://127.0.0.1:0")
    sub = Subscriber(zmq_sink, n_frames, workdir)
    cb = _pipeline(model, zmq_sink, tiled, 256, 0.01)
    run, desc = _documents(pool)
    cb("start", run.start_doc)
    cb("descriptor", desc.descriptor_doc)
    samples = []
    t0 = time.monotonic()
    for i in tqdm(range(0, n_frames, page), desc="pipeline memory", unit="page", leave=False):
        wait = t0 + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        idx = np.arange(i, min(i + page, n_frames)) % len(pool)
        now = time.time()
        cb("event_page", desc.compose_event_page(data={KEY: pool[idx]}, timestamps={KEY: [now] * len(idx)},
                                                 seq_num=list(range(i + 1, i + 1 + len(idx))),
                                                 time=[now] * len(idx), validate=False))
        if i % (n_frames // 50) < page:
            sinks = cb.engine.sink_summary()
            samples.append((i, proc.memory_info().rss / 2**20, cb.engine.queued_frames,
                            max(v["queued_frames"] for v in sinks.values())))
    cb("stop", run.compose_stop())
    cb.flush(timeout=600)
    samples.append((n_frames, proc.memory_info().rss / 2**20, cb.engine.queued_frames, 0))
    got = sub.result()
    stats = cb.stats()
    cb.close()
    zmq_sink.close()
    rss = np.array([s[1] for s in samples])
    tenth = max(1, len(rss) // 10)
    return {"frames": n_frames, "rate": rate, "precision": model.precision,
            "frames_in": stats["frames_in"], "frames_out": stats["frames_out"],
            "frames_rejected": sum(stats["rejected"].values()), "frames_dropped": stats["frames_dropped"],
            "frames_failed": stats["frames_failed"],
            "frames_received_zmq": int(len(got["arrival"])),
            "frames_in_tiled": _tiled_stats(stats)["frames_written"],
            "rss_mb": {"after_first_10pct": float(rss[tenth]), "peak": float(rss.max()), "end": float(rss[-1])},
            "growth_after_first_10pct_mb": float(rss[-1] - rss[tenth]),
            "max_queued_frames": {"engine": int(max(s[2] for s in samples)), "sinks": int(max(s[3] for s in samples))},
            "samples": [[int(i), round(m, 1), int(q), int(sq)] for i, m, q, sq in samples]}


def run(model: str, *, quick: bool = False, device: str = "cpu") -> dict:
    """All three pipeline measurements against one Tiled server process.

    On a GPU (``device="cuda"``): the throughput with 200,000 frames in pages of 1,024 and
    batches of 4,096, and the latency at 100 frames/s; memory is a CPU-side property and is
    measured on the CPU run only."""
    precision = "auto"
    gpu = device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="cdinn-bench-") as tmp:
        tiled: TiledProcess | None = TiledProcess()
        out: dict = {}
        try:
            try:
                tiled.client()
            except RuntimeError as err:  # measured without Tiled, and said so in the results
                if not gpu:
                    raise
                out["tiled_error"] = str(err)
                tiled.close()
                tiled = None
            if gpu:
                out |= {"throughput": throughput(model, precision, 8192 if quick else 200_000, 1024, 4096, tiled,
                                                 Path(tmp), device),
                        "ceiling": ceiling(model, 8192 if quick else 100_000, 1024, 4096, Path(tmp)),
                        "latency": latency(model, precision, 100.0, 100 if quick else 1000, tiled, Path(tmp),
                                           device=device)}
            else:
                out |= {"throughput": throughput(model, precision, 4096 if quick else 50_000, 256, 1024, tiled,
                                                 Path(tmp)),
                        "throughput_zmq_only": throughput(model, precision, 4096 if quick else 50_000, 256, 1024,
                                                          None, Path(tmp)),
                        "ceiling": ceiling(model, 4096 if quick else 50_000, 256, 1024, Path(tmp)),
                        # the same pipeline where the network dominates: the paper's (22x the folded default's FLOPs)
                        "throughput_paper_network": throughput(PAPER_MODEL, precision, 2048 if quick else 20_000,
                                                               256, 1024, tiled, Path(tmp)),
                        "latency": latency(model, precision, 100.0, 100 if quick else 2000, tiled, Path(tmp)),
                        "memory": memory(model, precision, 5000 if quick else 100_000, 100, 2000.0, tiled,
                                         Path(tmp))}
        finally:
            if tiled is not None:
                tiled.close()
    return out


def _variant_row(label: str, x: dict) -> str:
    """A table row for the pipeline measured another way, with its ratio to the bare model timed with it."""
    tiled = f", {x['frames_in_tiled']} in Tiled" if x.get("frames_in_tiled") is not None else ""
    return (f"| {label}, and its ratio to the bare model measured with it | {x['frames_per_s']:.0f} frames/s "
            f"({x['frames_received_zmq']} received{tiled}), {x['ratio_to_raw_model']:.2f} of "
            f"{x['raw_model_frames_per_s']:.0f} frames/s | |")


def table(r: dict) -> list[str]:
    """Markdown lines for :func:`run` results."""
    t, lat, mem = r["throughput"], r["latency"], r.get("memory")
    f = t["detector_frame"]
    gpu = t.get("device", "cpu").startswith("cuda")
    has_tiled = t["frames_in_tiled"] is not None
    stored = (f"{t['frames_in_tiled']} in Tiled in {t['tiled_writes']} writes" if has_tiled
              else "no Tiled server")
    lines = [f"## Pipeline end to end ({'GPU ' + t['device'] if gpu else 'CPU'})", "",
             f"Documents in (event pages of {t['page']} detector frames {f[0]}x{f[1]}, Poisson noise, peak off centre) "
             f"-> crop -> model (batch {t['batch_size']}, {t['precision']}) -> ZeroMQ subscriber process"
             f"{' + Tiled server process' if has_tiled else ''}, all on 127.0.0.1.", ""]
    if r.get("tiled_error"):
        error = " ".join(r["tiled_error"].strip().splitlines()[-2:])  # the exception, at the end of its log
        lines += [f"The Tiled server did not start on this machine, so this run measured ZeroMQ alone: `{error}`", ""]
    complete = has_tiled and t["frames_in_tiled"] == t["frames"]
    if has_tiled and t.get("tiled_dropped"):
        stored += f" ({t['tiled_dropped']} dropped by the Tiled sink's back-pressure)"
    if has_tiled and t.get("tiled_parked"):
        stored += f" ({t['tiled_parked']} parked on local disk and written back)"
    lines += ["| measurement | result | target |", "|---|---|---|",
              f"| throughput, documents in to results received{' and stored' if complete else ''} | "
              f"{t['frames_per_s']:.0f} frames/s ({t['frames_received_zmq']} over ZeroMQ, {stored}, "
              f"{t['frames_dropped']} dropped by the model's queue) | >= {10_000 if gpu else 1000} frames/s |",
              f"| bare model, same batch and precision, same run | {t['raw_model_frames_per_s']:.0f} frames/s | |",
              f"| pipeline / bare model | {t['ratio_to_raw_model']:.2f} | >= 0.8 |"]
    if "throughput_zmq_only" in r:
        lines.append(_variant_row("same pipeline without Tiled (ZeroMQ only; the Tiled server shares this machine's "
                                  "cores)", r["throughput_zmq_only"]))
    if "throughput_paper_network" in r:
        lines.append(_variant_row(f"same pipeline with the paper's full-resolution network (`{PAPER_MODEL}`, 22x the "
                                  "folded default's FLOPs, where the network and not the pipeline takes the CPU)",
                                  r["throughput_paper_network"]))
    if "ceiling" in r:
        c = r["ceiling"]
        lines.append(f"| same pipeline with the network replaced by a no-op (its ceiling: documents, peak search and "
                     f"crop, batching, ZeroMQ; no Tiled) | {c['frames_per_s']:.0f} frames/s "
                     f"({c['frames_received_zmq']} received) | |")
    lines += [
              f"| latency at {lat['rate']:.0f} frames/s offered ({lat.get('torch_threads', 2)} torch thread, batching "
              f"wait {lat['max_latency_s'] * 1e3:.0f} ms), event time to ZeroMQ subscriber, p50 / p99 / max | "
              f"{lat['zmq_ms']['p50']:.1f} / {lat['zmq_ms']['p99']:.1f} / {lat['zmq_ms']['max']:.1f} ms | "
              "p99 <= 20 ms |"]
    if has_tiled:
        lines.append(f"| same, frame in to end of its Tiled write, p50 / p99 | {lat['tiled_ms']['p50']:.1f} / "
                     f"{lat['tiled_ms']['p99']:.1f} ms ({lat['tiled_writes']} writes) | |")
    if mem is None:
        return lines
    return lines + [
            f"| resident memory over {mem['frames']} frames offered at {mem['rate']:.0f} frames/s: after 10% / peak / "
            f"end | {mem['rss_mb']['after_first_10pct']:.0f} / {mem['rss_mb']['peak']:.0f} / "
            f"{mem['rss_mb']['end']:.0f} MiB (growth {mem['growth_after_first_10pct_mb']:+.0f} MiB) | flat |",
            f"| same run: largest queue, model / sinks; frames into the model = out + dropped + failed; rejected | "
            f"{mem['max_queued_frames']['engine']} / {mem['max_queued_frames']['sinks']} frames; {mem['frames_in']} = "
            f"{mem['frames_out']} + {mem['frames_dropped']} + {mem.get('frames_failed', 0)}; "
            f"{mem['frames_rejected']} | no growth |"]
