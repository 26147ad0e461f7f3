"""Supervised training of a :class:`~cdinn_stream.nn.model.CDINN` on simulated data.

Adam, batch 256, the paper's 180k / 20k train / validation split, validation after every epoch,
early stopping on the validation loss, a checkpoint after every epoch (``resume=True`` goes on
from it, with the recipe stored in it: :func:`resume_config`), a fixed seed for data, initial
weights and shuffling, a progress bar, and a training-curve PNG (the paper's Fig. 2).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.physics import SUPPORT_THRESHOLD, normalized_amplitude, peak_offsets, ramp, roll_frames, wrap
from ..core.simulate import add_noise_torch, simulate
from ..core.timing import machine_info
from ..nn.model import CDINN, ModelConfig, with_patterson, with_vector_phase
from ..nn.reconstruct import check_device
from ..nn.weights import read_weights, save_weights
from .losses import fourier_loss, twin_aware_loss

__all__ = ["TrainConfig", "train", "FinetuneConfig", "finetune", "plot_training_curve", "RUNTIME_FIELDS",
           "stored_recipe", "resume_config", "read_labelled", "output_folder"]

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Options of :func:`train`.

    Attributes:
        out_dir: where checkpoints, the weights, the curve PNG and ``history.json`` go.
        size: frame size ``N``.
        widths: encoder widths of the model (see :class:`~cdinn_stream.nn.model.ModelConfig`).
        convs_per_stage: convolutions per encoder / decoder stage.
        space_to_depth: pixel folding factor of the model. The defaults (32, 64, 128), 1, 4 are
            the shipped models' recipe; the paper's network is (32, 64, 128), 2, 1.
        patterson: add the autocorrelation input channels (see :class:`~cdinn_stream.nn.model.ModelConfig`).
        phase_head: ``"angle"`` or ``"vector"`` (:class:`~cdinn_stream.nn.model.ModelConfig`); an angle
            network given as ``init_weights`` is converted (:func:`~cdinn_stream.nn.model.with_vector_phase`).
        n_train: training samples (paper: 180,000).
        n_val: validation samples (paper: 20,000).
        batch_size: samples per Adam step (paper: 256).
        epochs: the most epochs to run.
        patience: stop after this many epochs without a better validation loss.
        lr: Adam learning rate (halved when the validation loss stalls for one epoch).
        phase_weight: weight of the phase MSE against the shape cross-entropy.
        offset_invariant: score the phase up to a global offset (which ``|F|`` cannot see).
        support_weight: weight of the support cross-entropy (predicted vs true support at 0.1).
        support_pos_weight: extra weight of missed support pixels (their phase reads 0).
        init_weights: start from these weights (fine-tuning) instead of random ones.
        seed: seed of the data, the initial weights and the shuffling.
        max_minutes: stop after the epoch that passes this wall-clock budget (``None``: no limit).
        photons: Poisson noise in the training data: total photons per frame, or a ``(low, high)``
            range drawn log-uniformly per frame; ``None``: clean.
        background: mean background counts per pixel added before the Poisson draw.
        remove_ramp: simulate strain relative to the mean lattice (linear phase ramp removed).
        fourier_weight: weight of the physics-aware loss (:func:`~cdinn_stream.lab.losses.fourier_loss`,
            ``|FT|`` of the prediction against the input amplitudes) added to the supervised loss.
        threads: torch CPU threads (``None``: torch's default).
        device: where to train (``"cpu"``, ``"cuda"``, or ``"auto"``: CUDA when available). The
            whole data set is moved there; on CUDA the network runs in bf16 autocast (``amp``).
        amp: bf16 autocast on CUDA (the loss is computed in fp32).
        fresh_noise: draw new Poisson noise (``photons``, ``background``) for every batch from
            clean intensities, on the device, instead of noise fixed once in the data; the
            validation set keeps one fixed draw.
        data: a folder of ``intensity.npy``, ``amplitude.npy``, ``phase.npy`` (or an ``.npz``) to
            train on instead of simulating; its first ``n_train`` samples train, the next ``n_val``
            validate. With ``fresh_noise`` its intensities must be noise-free.
        workers: processes simulating the data (same samples for any number).
        schedule: ``"plateau"`` (halve the learning rate when the validation loss stalls) or
            ``"cosine"`` (cosine decay to ``lr / 100`` over ``max_minutes`` when given, else
            over ``epochs``; no early stopping).
        data_recipe: the simulated data: ``"paper"``, ``"crystal"`` (:mod:`cdinn_stream.core.crystal`, with
            its detector effects baked into the noise-free intensities) or ``"mixed"``
            (``crystal_fraction`` of each split from the crystal recipe, the rest from the paper's).
        crystal_fraction: the crystal recipe's share of a ``"mixed"`` set.
        centre: centre every input pattern on its Bragg peak by the rule inference uses
            (:func:`~cdinn_stream.core.physics.peak_offsets`, after the noise is drawn) and take the
            matching ramp out of the target phase, so that the network learns what
            :meth:`~cdinn_stream.nn.reconstruct.CDIModel.predict` asks of it.
    """

    out_dir: Path = Path("runs/cdinn-32")
    size: int = 32
    widths: tuple[int, ...] = (32, 64, 128)
    convs_per_stage: int = 1
    space_to_depth: int = 4
    patterson: bool = False
    phase_head: str = "angle"
    n_train: int = 180_000
    n_val: int = 20_000
    batch_size: int = 256
    epochs: int = 30
    patience: int = 4
    lr: float = 1e-3
    phase_weight: float = 1.0
    offset_invariant: bool = True
    support_weight: float = 1.0
    support_pos_weight: float = 8.0
    init_weights: str | None = None
    seed: int = 0
    max_minutes: float | None = None
    photons: float | tuple[float, float] | None = None
    background: float = 0.0
    fourier_weight: float = 0.0
    remove_ramp: bool = False
    threads: int | None = None
    device: str = "cpu"
    amp: bool = True
    fresh_noise: bool = False
    data: str | None = None
    workers: int = 1
    schedule: str = "plateau"
    data_recipe: str = "paper"
    crystal_fraction: float = 0.5
    centre: bool = False
    history: list[dict] = field(default_factory=list, repr=False)

    def recipe(self) -> dict:
        d = asdict(self)
        d.pop("history")
        d["out_dir"] = str(self.out_dir)
        d["widths"] = list(self.widths)
        return d


#: :class:`TrainConfig` fields a resumed run may change: where and how fast it runs, not what it learns.
RUNTIME_FIELDS = ("out_dir", "threads", "device", "workers", "amp")


@contextmanager
def output_folder(path: str | Path) -> Iterator[Path]:
    """Create ``path`` (and its missing parents) for a command's output; when the command fails
    (or is interrupted) before writing anything there, remove the folders it created."""
    path = Path(path)
    created, p = [], path
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for d in created:  # the deepest first; stop at the first one that holds something
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``: an interruption never leaves half a file."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(text: str, path: Path) -> None:
    path.write_text(text)


def _plain(value: object) -> object:
    """``value`` as JSON has it (tuples as lists, paths as strings), to compare recipes."""
    return json.loads(json.dumps(value, default=str))


def stored_recipe(out_dir: str | Path) -> dict:
    """The recipe of the run in ``out_dir``: its checkpoint's (else its ``history.json``'s).
    Raises ``ValueError`` when there is no checkpoint to resume."""
    out = Path(out_dir)
    ckpt = out / "checkpoint.pt"
    if not ckpt.is_file():
        raise ValueError(f"no checkpoint {ckpt} to resume: start the run without --resume")
    try:
        recipe = torch.load(ckpt, weights_only=True, map_location="cpu").get("recipe")
    except Exception as err:  # a truncated or foreign file: torch raises many kinds
        raise ValueError(f"cannot read the checkpoint {ckpt} ({err})") from err
    if recipe is not None:
        return json.loads(recipe)
    hist = out / "history.json"
    if hist.is_file():
        return json.loads(hist.read_text())["recipe"]
    raise ValueError(f"{ckpt} has no recipe and there is no {hist}: cannot tell how the run was made")


def _config(values: dict) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)} - {"history"}
    values = {k: v for k, v in values.items() if k in names}
    if "widths" in values:
        values["widths"] = tuple(values["widths"])
    if isinstance(values.get("photons"), list):
        values["photons"] = tuple(values["photons"])
    if "out_dir" in values:
        values["out_dir"] = Path(values["out_dir"])
    return TrainConfig(**values)


def resume_config(out_dir: str | Path, given: dict | None = None, *, flags: dict[str, str] | None = None
                  ) -> TrainConfig:
    """The configuration that resumes the run in ``out_dir``: its stored recipe
    (:func:`stored_recipe`), with ``given`` (``TrainConfig`` field -> value) checked against it.
    A recipe field given with another value is refused (``ValueError`` naming it as ``flags``
    spells it, e.g. ``{"n_train": "--n-train"}``); :data:`RUNTIME_FIELDS` given replace the stored ones."""
    out = Path(out_dir)
    values = stored_recipe(out)
    for key, value in (given or {}).items():
        if key in values and key not in RUNTIME_FIELDS and _plain(value) != _plain(values[key]):
            flag = (flags or {}).get(key, key)
            raise ValueError(f"{flag} does not match the run being resumed in {out}: it was made with "
                             f"{key}={values[key]!r}, not {value!r}; a resumed run keeps its recipe: leave {flag} "
                             f"out, or train a new run (another --out) with --init-weights {out / 'best.pt'}")
        values[key] = value
    values["out_dir"] = out
    return _config(values)


def _check_resume(cfg: TrainConfig, stored: dict) -> None:
    """Refuse to resume a run with another recipe than the one it was made with."""
    mine = _plain(cfg.recipe())
    for key, value in _plain(stored).items():
        if key in RUNTIME_FIELDS or key not in mine or mine[key] == value:
            continue
        if key == "centre" and value and cfg.init_weights:  # centred because its initial weights were
            cfg.centre = True
            continue
        raise ValueError(f"{key}={mine[key]!r} does not match the run being resumed in {cfg.out_dir} "
                         f"({key}={value!r}): a resumed run keeps its recipe (resume_config reads it)")


def _photons(cfg: TrainConfig) -> float | tuple[float, float] | None:
    return tuple(cfg.photons) if isinstance(cfg.photons, list | tuple) else cfg.photons


_LABELLED = ("intensity", "amplitude", "phase")


def read_labelled(path: str | Path, *, purpose: str = "training") -> dict[str, np.ndarray]:
    """The ``intensity``, ``amplitude`` and ``phase`` arrays of a data set: a folder of ``.npy``
    files (memory-mapped) or an ``.npz`` file, as ``cdinn-stream simulate`` writes them. Raises
    ``ValueError`` for a missing or unreadable path, missing arrays or arrays of different lengths;
    ``purpose`` names what needs the labels, in the message."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no data at {path} (--data): give an .npz file or a folder of intensity.npy, "
                         "amplitude.npy and phase.npy (cdinn-stream simulate writes either)")
    unlabelled = (f"{purpose} needs labelled data: intensity, amplitude and phase arrays (frames without labels: "
                  "cdinn-stream finetune)")
    if path.is_dir():
        missing = [f"{k}.npy" for k in _LABELLED if not (path / f"{k}.npy").is_file()]
        if missing:
            raise ValueError(f"{path} has no {', '.join(missing)}: {unlabelled}")
        arrays = {k: np.load(path / f"{k}.npy", mmap_mode="r") for k in _LABELLED}
    else:
        try:
            blob = np.load(path)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {path} as an .npz file ({err})") from err
        if not isinstance(blob, np.lib.npyio.NpzFile):
            raise ValueError(f"{path} holds one array: give an .npz with intensity, amplitude and phase arrays, "
                             "or a folder of their .npy files")
        with blob:
            missing = [k for k in _LABELLED if k not in blob.files]
            if missing:
                raise ValueError(f"{path} has no {', '.join(missing)} array(s) (it has {blob.files}): {unlabelled}")
            arrays = {k: blob[k] for k in _LABELLED}
    shapes = {k: a.shape for k, a in arrays.items()}
    if len(set(shapes.values())) != 1 or len(shapes["intensity"]) != 3:
        raise ValueError(f"{path}: intensity, amplitude and phase must be (n, N, N) arrays of one shape, not {shapes}")
    return arrays


def _data(cfg: TrainConfig) -> tuple[torch.Tensor, ...]:
    """``(intensity, amplitude, phase)`` of ``n_train + n_val`` samples, from ``cfg.data`` or
    simulated (noise-free when ``cfg.fresh_noise``: the noise is drawn per batch)."""
    n = cfg.n_train + cfg.n_val
    if cfg.data and cfg.data_recipe != "paper":
        raise ValueError("data_recipe simulates the data; with data= the samples come from the folder")
    if cfg.data:
        path = Path(cfg.data)
        arrays = read_labelled(path)
        count, shape = len(arrays["intensity"]), tuple(arrays["intensity"].shape[1:])
        if shape != (cfg.size, cfg.size):
            raise ValueError(f"{path} holds {count} samples of {shape}, not {cfg.size}x{cfg.size} (size, --size)")
        if count < n:
            raise ValueError(f"{path} holds {count} samples of {shape}; n_train + n_val (--n-train {cfg.n_train} "
                             f"+ --n-val {cfg.n_val}) need {n}")
        return tuple(torch.from_numpy(np.array(arrays[k][:n], dtype=np.float32))  # a writable copy
                     for k in ("intensity", "amplitude", "phase"))
    if cfg.data_recipe not in ("paper", "crystal", "mixed"):
        raise ValueError(f"data_recipe must be 'paper', 'crystal' or 'mixed', not {cfg.data_recipe!r}")
    share = {"paper": 0.0, "crystal": 1.0, "mixed": cfg.crystal_fraction}[cfg.data_recipe]
    n_crystal = [round(cfg.n_train * share), round(cfg.n_val * share)]
    n_paper = [cfg.n_train - n_crystal[0], cfg.n_val - n_crystal[1]]
    parts = []
    with tqdm(total=n, desc="simulating", unit="sample", leave=False) as bar:
        for recipe, counts, seed in (("paper", n_paper, cfg.seed), ("crystal", n_crystal, cfg.seed + 7919)):
            if sum(counts):
                parts.append((counts, simulate(
                    sum(counts), cfg.size, seed=seed, photons=None if cfg.fresh_noise else _photons(cfg),
                    background=0.0 if cfg.fresh_noise else cfg.background, remove_ramp=cfg.remove_ramp,
                    progress=bar.update, workers=cfg.workers, recipe=recipe,
                    detector=True if recipe == "crystal" else None)))  # crystals: detector effects baked in
    arrays = []
    for key in ("intensity", "amplitude", "phase"):  # the training samples of each recipe, then their validation ones
        train = [getattr(d, key)[: c[0]] for c, d in parts]
        val = [getattr(d, key)[c[0] :] for c, d in parts]
        arrays.append(torch.from_numpy(np.concatenate(train + val)))
    return tuple(arrays)


def _centred(intensity: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Patterns rolled so their Bragg peak sits at ``N // 2`` (:func:`peak_offsets`) and the target
    phases less the matching ramp, wrapped (0 outside the support)."""
    rolled, target = torch.empty_like(intensity), torch.empty_like(phase)
    for i in range(0, len(intensity), 65_536):  # in chunks: a fixed training set can be large
        part = slice(i, i + 65_536)
        shifts = peak_offsets(intensity[part])
        rolled[part] = roll_frames(intensity[part], -shifts)
        target[part] = torch.where(amplitude[part] > SUPPORT_THRESHOLD,
                                   wrap(phase[part] - ramp(shifts, phase.shape[-1])), 0.0)
    return rolled, target


def _inputs(intensity: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor, cfg: TrainConfig,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Network input ``(B, 1, N, N)`` from intensities, with fresh noise when ``cfg.fresh_noise``,
    centred when ``cfg.centre``; and the target phases that go with it."""
    if cfg.fresh_noise:
        intensity = add_noise_torch(intensity, photons=_photons(cfg), background=cfg.background, generator=generator)
    if cfg.centre:
        intensity, phase = _centred(intensity, amplitude, phase)
    return normalized_amplitude(intensity).unsqueeze(1), phase


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(name)
    return torch.device(name)


def _loss(s: torch.Tensor, ph: torch.Tensor, x: torch.Tensor, a: torch.Tensor, p: torch.Tensor,
          cfg: TrainConfig) -> torch.Tensor:
    loss = twin_aware_loss(s, ph, a, p, phase_weight=cfg.phase_weight, offset_invariant=cfg.offset_invariant,
                           support_weight=cfg.support_weight, support_pos_weight=cfg.support_pos_weight)
    if cfg.fourier_weight:
        loss = loss + cfg.fourier_weight * fourier_loss(s, ph, x)
    return loss


@torch.no_grad()
def _validate(model: CDINN, x, a, p, cfg: TrainConfig) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(x), 1024):
        with _autocast(x.device, cfg):
            s, ph = model.forward_logits(x[i : i + 1024])
        total += float(_loss(s.float(), ph.float(), x[i : i + 1024], a[i : i + 1024], p[i : i + 1024], cfg)) * len(s)
    return total / len(x)


def _autocast(device: torch.device, cfg: TrainConfig):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.amp)


def _cosine_lr(cfg: TrainConfig, progress: float) -> float:
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Train, checkpointing every epoch; returns the history (list of per-epoch dicts) and paths.

    ``resume=True`` goes on from ``out_dir/checkpoint.pt`` (``ValueError`` when there is none) with
    the same recipe: ``cfg`` must match the stored one but for :data:`RUNTIME_FIELDS`
    (:func:`resume_config` makes such a ``cfg``). A run that fails before its first checkpoint
    leaves no empty ``out_dir``; checkpoint, ``best.pt`` and ``history.json`` are replaced whole,
    so an interrupted run can always be resumed from its last epoch."""
    if cfg.schedule not in ("plateau", "cosine"):
        raise ValueError(f"schedule must be 'plateau' or 'cosine', not {cfg.schedule!r}")
    out = Path(cfg.out_dir)
    if resume:
        _check_resume(cfg, stored_recipe(out))
    elif (out / "checkpoint.pt").exists():
        raise ValueError(f"{out} already holds a training run (checkpoint.pt): --resume continues it; choose "
                         "another --out for a new run")
    device = _device(cfg.device)
    with output_folder(out):
        return _train(cfg, out, device, resume)


def _train(cfg: TrainConfig, out: Path, device: torch.device, resume: bool) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = CDINN(ModelConfig(cfg.size, tuple(cfg.widths), cfg.convs_per_stage, cfg.space_to_depth,
                              cfg.patterson, centred_input=cfg.centre, phase_head=cfg.phase_head))
    if cfg.init_weights and not resume:  # a resumed run's weights come from its checkpoint
        init = read_weights(cfg.init_weights)
        if init.config.centred_input and not cfg.centre:
            logger.warning("%s was trained on centred patterns: training on, centred too", cfg.init_weights)
            cfg.centre = True
            model.config = replace(model.config, centred_input=True)
        if cfg.patterson and not init.config.patterson:
            logger.info("adding the autocorrelation input channels to %s (zero weights)", cfg.init_weights)
            init = with_patterson(init)
        if cfg.phase_head != init.config.phase_head:
            if cfg.phase_head != "vector":
                raise ValueError(f"{cfg.init_weights} has the vector phase head: train it with phase_head 'vector'")
            logger.info("giving %s the vector phase head, started from its angle head", cfg.init_weights)
            init = with_vector_phase(init)
        model.load_state_dict(init.state_dict())
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    history: list[dict] = []
    best, best_epoch, start = math.inf, -1, 0
    ckpt_path = out / "checkpoint.pt"
    if resume:
        ckpt = torch.load(ckpt_path, weights_only=True, map_location=device)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        history = json.loads(ckpt["history"])
        best, best_epoch, start = ckpt["best"], ckpt["best_epoch"], ckpt["epoch"] + 1
        logger.info("resuming from epoch %d (best val %.5f at epoch %d)", start, best, best_epoch)
    intensity, a, p = (t.to(device) for t in _data(cfg))
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    it, at, pt = intensity[: cfg.n_train], a[: cfg.n_train], p[: cfg.n_train]
    av = a[cfg.n_train :]
    xv, pv = _inputs(intensity[cfg.n_train :], av, p[cfg.n_train :], cfg,
                     torch.Generator(device=device).manual_seed(cfg.seed + 2))
    if not cfg.fresh_noise:  # fixed inputs: centre and scale once
        it, pt = _inputs(it, at, pt, cfg, None)
    del intensity
    steps_per_epoch = -(-cfg.n_train // cfg.batch_size)
    t0 = time.monotonic() - (history[-1]["seconds"] if history else 0.0)

    def progress(epoch: int, step: int) -> float:
        if cfg.max_minutes:
            return (time.monotonic() - t0) / (60 * cfg.max_minutes)
        return (epoch + step / steps_per_epoch) / cfg.epochs

    for epoch in range(start, cfg.epochs):
        if cfg.schedule == "plateau" and epoch - best_epoch > cfg.patience and best_epoch >= 0:
            logger.info("early stop: no better validation loss for %d epochs", cfg.patience)
            break
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(cfg.n_train, generator=g).to(device)
        running, seen = torch.zeros((), device=device), 0
        bar = tqdm(range(0, cfg.n_train, cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch")
        done = False
        for step, i in enumerate(bar):
            if cfg.schedule == "cosine":
                frac = progress(epoch, step)
                if cfg.max_minutes and frac >= 1:
                    done = True
                    break
                for group in opt.param_groups:
                    group["lr"] = _cosine_lr(cfg, frac)
            idx = order[i : i + cfg.batch_size]
            xb, pb = _inputs(it[idx], at[idx], pt[idx], cfg, gen) if cfg.fresh_noise else (it[idx], pt[idx])
            with _autocast(device, cfg):
                s, ph = model.forward_logits(xb.contiguous(memory_format=torch.channels_last))
            loss = _loss(s.float(), ph.float(), xb, at[idx], pb, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.detach() * len(idx)
            seen += len(idx)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{float(running) / seen:.4f}")
        bar.close()
        if seen == 0:
            break
        train_loss = float(running) / seen
        val = _validate(model, xv, av, pv, cfg)
        if cfg.schedule == "plateau":
            sched.step(val)
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val,
                        "lr": opt.param_groups[0]["lr"], "seconds": time.monotonic() - t0, "samples": seen})
        logger.info("epoch %d: train %.5f val %.5f", epoch + 1, train_loss, val)
        tqdm.write(f"epoch {epoch + 1}: train loss {train_loss:.5f}, validation loss {val:.5f}")
        if val < best:
            best, best_epoch = val, epoch
            _write_atomic(out / "best.pt", partial(save_weights, model, meta={"epoch": epoch + 1, "val_loss": val}))
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "history": json.dumps(history), "best": best, "best_epoch": best_epoch, "epoch": epoch,
                 "recipe": json.dumps(cfg.recipe())}
        _write_atomic(ckpt_path, partial(torch.save, state))
        record = json.dumps({"recipe": cfg.recipe(), "machine": machine_info(), "history": history}, indent=1)
        _write_atomic(out / "history.json", partial(_write_text, record))
        plot_training_curve(history, out / "training_curve.png")
        if done or (cfg.max_minutes is not None and (time.monotonic() - t0) / 60 > cfg.max_minutes):
            logger.info("stopping: wall-clock budget of %.1f min used", cfg.max_minutes)
            break
    return {"history": history, "best_epoch": best_epoch + 1, "best_val_loss": best,
            "weights": str(out / "best.pt")}


@dataclass
class FinetuneConfig:
    """Options of :func:`finetune`: fine-tuning on unlabelled frames with the physics-aware loss.

    Attributes:
        intensity: ``(n, N, N)`` measured (or simulated) intensities, Bragg peak at ``N // 2``.
        init_weights: the weights to start from.
        out_dir: where ``best.pt``, ``history.json`` and the curve PNG go.
        kind: the :func:`~cdinn_stream.lab.losses.fourier_loss` (``"nse"``, ``"pearson"``, ``"poisson"``).
        val_fraction: frames held out to pick the best epoch and stop early.
        source: where the frames came from (their file), recorded in ``history.json``.
    """

    intensity: object
    init_weights: str
    out_dir: Path = Path("runs/finetune")
    kind: str = "nse"
    epochs: int = 10
    patience: int = 2
    lr: float = 1e-4
    batch_size: int = 256
    val_fraction: float = 0.1
    seed: int = 0
    threads: int | None = None
    source: str | None = None


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune on frames without ground truth: only ``|FT|`` of the prediction against the
    measured amplitudes is scored. Returns the history and the best weights' path. A run that
    fails before writing leaves no empty ``out_dir``."""
    with output_folder(cfg.out_dir) as out:
        return _finetune(cfg, out)


def _finetune(cfg: FinetuneConfig, out: Path) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = read_weights(cfg.init_weights)
    raw = torch.as_tensor(cfg.intensity, dtype=torch.float32)
    if raw.ndim != 3 or raw.shape[-1] != model.config.size or raw.shape[-2] != model.config.size:
        raise ValueError(f"frames are {tuple(raw.shape[1:])} but the model takes "
                         f"{model.config.size}x{model.config.size}")
    if model.config.centred_input:  # as inference will see them
        raw = torch.cat([roll_frames(c, -peak_offsets(c)) for c in raw.split(65_536)])
    x = normalized_amplitude(raw).unsqueeze(1)
    photons = raw.clamp_min(0).sum(dim=(-2, -1))  # the frames' counts, for the Poisson loss
    if x.shape[-1] != model.config.size:
        raise ValueError(f"frames are {tuple(x.shape[-2:])} but the model takes "
                         f"{model.config.size}x{model.config.size}")
    n_val = max(1, int(len(x) * cfg.val_fraction))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    xv, xt = x[order[:n_val]], x[order[n_val:]]
    pv, pt = photons[order[:n_val]], photons[order[n_val:]]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    @torch.no_grad()
    def validate() -> float:
        model.eval()
        return sum(float(fourier_loss(*model.forward_logits(xv[i : i + 1024]), xv[i : i + 1024], kind=cfg.kind,
                                      photons=pv[i : i + 1024])) * len(xv[i : i + 1024])
                   for i in range(0, len(xv), 1024)) / len(xv)

    history = [{"epoch": 0, "train_loss": None, "val_loss": validate(), "seconds": 0.0}]
    best, best_epoch, t0 = history[0]["val_loss"], 0, time.monotonic()
    save_weights(model, out / "best.pt", meta={"epoch": 0, "val_loss": best, "finetune": cfg.kind})
    for epoch in range(1, cfg.epochs + 1):
        if epoch - best_epoch > cfg.patience:
            break
        model.train()
        perm = torch.randperm(len(xt), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        running = 0.0
        for i in tqdm(range(0, len(xt), cfg.batch_size), desc=f"finetune {epoch}/{cfg.epochs}", unit="batch"):
            idx = perm[i : i + cfg.batch_size]
            batch = xt[idx]
            loss = fourier_loss(*model.forward_logits(batch), batch, kind=cfg.kind, photons=pt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item() * len(batch)
        val = validate()
        history.append({"epoch": epoch, "train_loss": running / len(xt), "val_loss": val,
                        "seconds": time.monotonic() - t0})
        tqdm.write(f"epoch {epoch}: train {running / len(xt):.5f}, held-out {val:.5f} ({cfg.kind} |FT| loss)")
        if val < best:
            best, best_epoch = val, epoch
            save_weights(model, out / "best.pt", meta={"epoch": epoch, "val_loss": val, "finetune": cfg.kind})
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "intensity"}
    (out / "history.json").write_text(json.dumps({"recipe": {"stage": "finetune", **recipe, "frames": len(x),
                                                             "validation_frames": n_val},
                                                  "machine": machine_info(), "history": history}, indent=1))
    plot_training_curve([h for h in history if h["train_loss"] is not None], out / "training_curve.png")
    return {"history": history, "best_epoch": best_epoch, "best_val_loss": best, "weights": str(out / "best.pt")}


def plot_training_curve(history: list[dict], path: Path) -> None:
    """Training and validation loss per epoch (the paper's Fig. 2) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="training")
    ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (shape BCE + phase MSE, twin-aware)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
