"""Live adaptation: fine-tune a copy of the model on the current run's frames and hot-swap it in.

Off by default (``ReconstructionCallback(adapt=True)``, ``PipelineConfig(adapt=True)``,
``CDINN_ADAPT=1``). An :class:`Adapter` is offered every result the engine publishes. It keeps
the measured crops of the current run (the latest ``max_frames``: a sample drifts during a run,
so the latest frames say most about the next; every ``holdout``-th seq_num is held out and never
trained on). Its own thread runs a round once the run has given ``min_frames`` frames, and
again after every ``every`` more (each run starts counting afresh); each round:

1. a float copy of the network (the model's own weights; for an int8 model, the float model it
   was quantized from, its card's ``fine_tuned_from``; from the second round on, the last adapted
   network) takes ``steps`` Adam steps on the training frames with the physics-aware loss, the
   reconstruction's chi^2 against the measured amplitudes (no ground truth: the Fourier loss of
   ``cdinn-stream finetune``), on one torch thread, resting after each ten steps and after scoring
   so that it uses at most about ``share`` of one core's time on average;
2. an int8 model is quantized again from it (:func:`cdinn_stream.nn.int8.quantize`, calibrated on
   the run's frames), a float model keeps its precision;
3. the candidate and the model in use are scored on the held-out frames (median chi^2); only a
   candidate at least ``improve`` times lower replaces it: its weights and a model card naming
   the run are saved to ``out_dir`` (the callback's default: the user's model folder,
   :func:`~cdinn_stream.nn.reconstruct.user_models_dir`, so ``load_model(name)`` finds it), and
   :meth:`~cdinn_stream.live.engine.InferenceEngine.swap_model` puts it in between two batches: no
   frame waits and none is lost. Every result says which version made it (``model_version``).

The adapted weights stay in use for the runs that follow (adaptation goes on from them); a new
pipeline starts from the model it is given.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..core.metrics import fourier_chi2
from ..core.physics import far_field_torch, normalized_amplitude, peak_offsets, roll_frames
from ..nn.int8 import Int8CDINN, quantize, save_int8_weights
from ..nn.model import CDINN
from ..nn.weights import save_weights
from .blocks import ResultBlock, RunMarker
from .worker import Worker

if TYPE_CHECKING:  # the adapter works on the engine's model (a CDIModel) through its methods
    from ..nn.reconstruct import CDIModel
    from .engine import InferenceEngine

__all__ = ["Adapter", "fourier_chi2_loss"]

logger = logging.getLogger(__name__)


def fourier_chi2_loss(network: CDINN, amplitude: torch.Tensor) -> torch.Tensor:
    """Mean chi^2 (differentiable) of ``network``'s reconstructions of normalised amplitudes
    ``(B, N, N)`` against those amplitudes: the unsupervised loss of live adaptation."""
    predicted = far_field_torch(CDINN.field(*network.forward_logits(amplitude[:, None]))).abs()
    dims = (-2, -1)
    cross = (predicted * amplitude).sum(dims)
    return (1 - cross.square() / ((predicted * predicted).sum(dims) * (amplitude * amplitude).sum(dims))
            .clamp_min(1e-20)).mean()


class Adapter(Worker):
    """Adapts the engine's model to the run (see the module docstring).

    Args:
        engine: the engine whose model is adapted and swapped.
        min_frames: training frames of a run before the first round.
        every: frames between rounds.
        holdout: every ``holdout``-th seq_num is held out for the comparison.
        steps: Adam steps per round; ``batch`` frames per step; ``lr`` learning rate.
        improve: a candidate replaces the model when its held-out median chi^2 is below
            ``improve`` times the model's.
        share: at most this share of one core's time on average.
        max_frames: the latest frames of the run kept.
        out_dir: where swapped weights and their cards go.
    """

    def __init__(self, engine: InferenceEngine, *, min_frames: int = 512, every: int = 1024, holdout: int = 4,
                 steps: int = 150, batch: int = 64, lr: float = 2e-4, improve: float = 0.95, share: float = 0.5,
                 max_frames: int = 2048, out_dir: str | Path):
        super().__init__("cdinn-adapt")
        if not 0 < share <= 1 or holdout < 2 or min_frames < 1 or every < 1 or steps < 1:
            raise ValueError("adapt: share in (0, 1], holdout >= 2, min_frames, every and steps >= 1")
        self.engine = engine
        self.min_frames, self.every, self.holdout = min_frames, every, holdout
        self.steps, self.batch, self.lr, self.improve, self.share = steps, batch, lr, improve, share
        self.max_frames = max_frames
        self.out_dir = Path(out_dir)
        self.rounds = 0
        self.swaps = 0
        self.history: list[dict] = []
        self.busy_seconds = 0.0
        self._run: str | None = None
        self._train: deque[np.ndarray] = deque()
        self._held: deque[np.ndarray] = deque()
        self._since = 0
        self._run_rounds = 0  # rounds queued in the current run (its first comes after min_frames)
        self._network: CDINN | None = None  # the last adapted float network
        self._start()

    # -- the engine's side (its thread) --------------------------------------------------------
    def marker(self, marker: RunMarker) -> None:
        """A run opens (collect its frames) or closes (stop collecting)."""
        with self._cond:
            if marker.kind == "open":
                self._run, self._since, self._run_rounds = marker.run_uid, 0, 0
                self._train.clear()
                self._held.clear()
            elif marker.run_uid == self._run:
                self._run = None

    def offer(self, result: ResultBlock) -> None:
        """Keep the measured crops of the current run; queue a round when one is due (never blocks)."""
        if result.run_uid != self._run or self._closed:
            return
        f = result.frames
        held = f.seq_nums % self.holdout == 0
        with self._cond:
            self._train.extend(f.frames[~held])
            self._held.extend(f.frames[held])
            while len(self._train) > self.max_frames:
                self._train.popleft()
            while len(self._held) > max(self.max_frames // self.holdout, 64):
                self._held.popleft()
            self._since += len(f)
            due = len(self._train) >= self.min_frames and self._since >= (self.min_frames if not self._run_rounds
                                                                          else self.every)
            if due and not self._queue and not self._working and len(self._held) >= 8:
                self._since = 0
                self._run_rounds += 1
                self._queue.append((result.run_uid, np.stack(self._train), np.stack(self._held)))
                self._cond.notify_all()

    def close(self, timeout: float | None = 30.0) -> bool:
        """Stop: a round in progress is abandoned at its next rest, rounds not begun are dropped."""
        with self._cond:
            self._queue.clear()
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def stats(self) -> dict:
        """Rounds run, swaps made, seconds spent and each round's held-out medians."""
        return {"rounds": self.rounds, "swaps": self.swaps, "busy_s": round(self.busy_seconds, 3),
                "history": self.history}

    # -- the adapter's thread --------------------------------------------------------------
    def _handle(self, items: list) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread for training; the engine sets its own count in its thread
        try:
            for run_uid, train, held in items:
                t0 = time.monotonic()
                try:
                    self._round(run_uid, train, held)
                except Exception:
                    logger.exception("live adaptation failed on run %s (the model in use stays)", run_uid)
                finally:
                    self.busy_seconds += time.monotonic() - t0
                    self.rounds += 1  # counted once the round is over (swapped or not)
        finally:
            torch.set_num_threads(threads)

    def _source(self, model: CDIModel) -> CDINN:
        """A float copy of the network to adapt."""
        return copy.deepcopy(self._network) if self._network is not None else model.float_network()

    def _prepare(self, frames: np.ndarray, centre: bool) -> torch.Tensor:
        x = normalized_amplitude(torch.from_numpy(np.ascontiguousarray(frames, np.float32)))
        return roll_frames(x, -peak_offsets(x.square())) if centre else x

    def _round(self, run_uid: str, train: np.ndarray, held: np.ndarray) -> None:
        started = time.monotonic()
        model, version = self.engine.current_model()
        device = model.device  # train where the model runs (an int8 model: on the CPU)
        network = self._source(model).to(device).train()
        x, xh = self._prepare(train, model.centre).to(device), self._prepare(held, model.centre).to(device)
        opt = torch.optim.Adam(network.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.rounds)
        t0, losses = time.monotonic(), []
        for step in range(self.steps):
            idx = torch.randint(len(x), (min(self.batch, len(x)),), generator=gen).to(device)
            loss = fourier_chi2_loss(network, x[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step % 10 == 9:  # rest for the last ten steps' time (the CPU share)
                if not self._rest(time.monotonic() - t0):
                    return  # closing
                t0 = time.monotonic()
        network.eval()
        candidate = self._candidate(network, model, x)
        baseline = model.sibling(model.network, cuda_graphs=False)  # the engine's own may replay CUDA graphs
        before, after = self._median_chi2(baseline, xh), self._median_chi2(candidate, xh)
        if not self._rest(time.monotonic() - t0):  # the scoring's share too
            return
        entry = {"run_uid": run_uid, "round": self.rounds + 1, "frames": len(x), "held_out": len(xh),
                 "steps": self.steps, "train_chi2_last": float(np.mean(losses[-10:])),
                 "held_out_chi2_median_before": before, "held_out_chi2_median_after": after, "swapped": False,
                 "seconds": round(time.monotonic() - started, 2)}
        self.history.append(entry)
        if not after < self.improve * before:
            logger.info("live adaptation round %d on run %s: held-out median chi2 %.4g -> %.4g, not better by "
                        "the factor %.2f: the model in use stays", entry["round"], run_uid, before, after, self.improve)
            return
        with self._cond:
            if self._closed:
                return
        self._network = network
        base = model.card.get("adapted_from") or model.name
        k = self.swaps + 1
        while (self.out_dir / f"{base}-adapted-{run_uid[:8]}-{k}.pt").exists():  # never overwrite earlier weights
            k += 1
        name = f"{base}-adapted-{run_uid[:8]}-{k}"
        path = self._save(candidate, network, name, base, run_uid, entry, version)
        candidate = candidate.sibling(candidate.network, name=name, card=candidate.card,
                                      cuda_graphs=None)  # the engine's own: scored without CUDA graphs
        new_version = self.engine.swap_model(candidate, path=str(path), adapted_on=run_uid,
                                             held_out_chi2_median_before=before, held_out_chi2_median_after=after)
        self.swaps += 1
        entry.update(swapped=True, version=new_version, path=str(path))
        logger.warning("live adaptation on run %s: held-out median chi2 %.4g -> %.4g: model version %d (%s) in use "
                       "from the next batch; weights in %s", run_uid, before, after, new_version, name, path)

    def _candidate(self, network: CDINN, model: CDIModel, x: torch.Tensor) -> CDIModel:
        if isinstance(model.network, Int8CDINN):
            calibration = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(7))[:2048]]
            return model.sibling(quantize(network, calibration[:, None].cpu()))
        return model.sibling(copy.deepcopy(network), cuda_graphs=False)  # graphs are captured by the engine only

    @staticmethod
    def _median_chi2(model: CDIModel, x: torch.Tensor) -> float:
        values = []
        for chunk in x.split(1024):
            chunk = chunk.to(model.device)
            amp, phase = model.predict_tensor(chunk)
            values.append(fourier_chi2(amp, phase, chunk).cpu())
        return float(torch.cat(values).median())

    def _save(self, candidate: CDIModel, network: CDINN, name: str, base_name: str, run_uid: str, entry: dict,
              version: int) -> Path:
        out = self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}.pt"
        meta = {"adapted_on": run_uid}
        source = base_name  # the float model it came from: itself, or for int8 the float weights saved beside
        if isinstance(candidate.network, Int8CDINN):
            save_int8_weights(candidate.network, path, meta=meta)
            source = str(out / f"{name}-float.pt")
            save_weights(network, source, meta=meta)
        else:
            save_weights(network, path, meta=meta)
        base = candidate.card
        card = {"name": name, "adapted_on": run_uid, "adapted_from": base_name, "adapted_from_version": version,
                "fine_tuned_from": source,
                "method": "live adaptation (cdinn_stream.live.adapt): unsupervised Fourier loss (chi^2 against the "
                          "measured amplitudes) on the run's frames" + (", then int8 post-training quantization "
                                                                       "on them" if isinstance(candidate.network,
                                                                                               Int8CDINN) else ""),
                "recipe": {"steps": self.steps, "batch": self.batch, "lr": self.lr, "holdout": self.holdout,
                           "improve": self.improve},
                "data": {"run_uid": run_uid, "frames": entry["frames"], "held_out": entry["held_out"]},
                "metrics": {"held_out_chi2_median": {"before": entry["held_out_chi2_median_before"],
                                                     "after": entry["held_out_chi2_median_after"]}},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "weights_file": path.name,
                "architecture": base.get("architecture"), "recipe_of_base": base.get("recipe")}
        path.with_suffix(".json").write_text(json.dumps(card, indent=1, default=str))
        candidate.card = card
        return path

    def _rest(self, spent: float) -> bool:
        """Rest ``spent * (1 / share - 1)`` s (the CPU share); False when the adapter closes."""
        end = time.monotonic() + spent * (1 / self.share - 1)
        with self._cond:
            while not self._closed and (left := end - time.monotonic()) > 0:
                self._cond.wait(left)
            return not self._closed
