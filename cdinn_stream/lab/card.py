"""Model cards: the JSON beside each shipped weights file in ``models/``.

A card records how the weights were made and how good they are: the training recipe, the data
size, the epochs run, the validation curve, the evaluation metrics (NN vs ER/HIO), the machine,
and the code commit.

Publishing checks before it writes anything: every evaluation must be of the weights published
(the ``weights_sha256`` that ``evaluate`` records), an existing model is replaced only with
``force``, and the package's shipped models (:func:`~cdinn_stream.nn.reconstruct.shipped_model_dirs`)
only with ``force`` and a warning. The weights and the card are written together, or not at all.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

from ..nn.folding import fold
from ..nn.int8 import FORMAT as INT8_FORMAT
from ..nn.int8 import Int8CDINN
from ..nn.model import CDINN, count_flops
from ..nn.reconstruct import read_network, shipped_model_dirs
from ..nn.weights import read_weights, save_weights
from .evaluate import weights_sha256
from .train import output_folder

__all__ = ["code_commit", "publish", "publish_int8", "attach_crystal_evaluation"]

logger = logging.getLogger(__name__)


def code_commit(repo: str | Path | None = None) -> str:
    """The git commit of the code (with ``-dirty`` when there are uncommitted changes)."""
    repo = Path(repo) if repo else Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "cdinn_stream"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ValueError(f"no {what} {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err


def _history(run_dir: Path) -> dict:
    """A run's ``history.json`` (of ``train`` or ``finetune``), with at least one epoch."""
    if not run_dir.is_dir():
        raise ValueError(f"no run folder {run_dir} (RUN: the output folder of cdinn-stream train or finetune)")
    hist = _read_json(run_dir / "history.json", "training history")
    if not hist.get("history") or "recipe" not in hist:
        raise ValueError(f"{run_dir / 'history.json'} has no recipe or no epoch: the run has not finished one")
    return hist


def _is_finetune(recipe: dict) -> bool:
    """Whether a recipe is of ``finetune`` (unlabelled frames, the |FT| loss) rather than ``train``."""
    return recipe.get("stage") == "finetune" or ("n_train" not in recipe and "frames" in recipe)


def _curve(history: list[dict]) -> list[dict]:
    return [{k: h[k] for k in ("epoch", "train_loss", "val_loss", "lr") if k in h} for h in history]


def _epochs_run(history: list[dict]) -> int:
    """Epochs trained (a fine-tune's epoch 0 scores its initial weights only)."""
    return sum(1 for h in history if h.get("train_loss") is not None)


def _stage(run_dir: Path) -> dict:
    hist = _history(Path(run_dir))
    best = min(hist["history"], key=lambda h: h["val_loss"])
    return {"recipe": hist["recipe"], "machine": hist.get("machine"), "epochs_run": _epochs_run(hist["history"]),
            "best_epoch": best["epoch"],
            "best_val_loss": best["val_loss"], "training_seconds": hist["history"][-1]["seconds"],
            "validation_curve": _curve(hist["history"])}


def _stage_of_card(card: dict) -> dict:
    """The final training stage a model card describes, as a lineage entry."""
    curve = card["validation_curve"]
    return {"recipe": card["recipe"], "machine": card.get("training_machine"), "epochs_run": card["epochs_run"],
            "best_epoch": card["best_epoch"],
            "best_val_loss": min(h["val_loss"] for h in curve), "training_seconds": card["training_seconds"],
            "validation_curve": curve}


def _evaluation(report: dict) -> dict:
    return {k: report[k] for k in ("n", "seed", "size", "recipe", "data", "centre", "photons", "precision", "views",
                                   "machine", "methods", "speedup_nn_vs_erhio", "noise", "offsets") if k in report}


def _copy_figures(evaluation_dir: Path, models_dir: Path, name: str) -> None:
    for fig in ("examples.png", "best.png", "worst.png"):
        if (evaluation_dir / fig).is_file():
            shutil.copy(evaluation_dir / fig, models_dir / f"{name}.{fig}")


def _crystal_data(recipe: dict) -> dict:
    """The crystal recipe's part of a training set, for the card (nothing for the paper recipe)."""
    kind = recipe.get("data_recipe", "paper")
    if kind == "paper":
        return {}
    return {"crystal_fraction": 1.0 if kind == "crystal" else recipe.get("crystal_fraction", 0.5),
            "crystal_seed": recipe["seed"] + 7919,  # train.py draws crystals with the seed + 7919
            "crystal_detector": "partial coherence, flat field, gaps, dead and hot pixels baked in; counting noise "
                                "as above" if recipe.get("fresh_noise") else "as drawn by simulate(recipe='crystal')",
            "centred": bool(recipe.get("centre", False))}


def _check_centring(centred: bool, reports: dict[Path, dict]) -> None:
    """Refuse evaluations that did not run the network as it is shipped (centring its input or not)."""
    for folder, report in reports.items():
        ran = bool(report.get("centre", False))
        if ran != centred:
            raise ValueError(f"{folder} was evaluated with centre={ran}, but the network is shipped with "
                             f"centred_input={centred}")


def _data_source(recipe: dict) -> str:
    kind = recipe.get("data_recipe", "paper")
    if kind == "mixed":
        share = recipe.get("crystal_fraction", 0.5)
        return f"cdinn_stream.simulate (paper recipe {1 - share:.0%}, crystal recipe {share:.0%})"
    return f"cdinn_stream.simulate ({kind} recipe)"


def _data(recipe: dict) -> dict:
    """The card's ``data`` entry of a ``train`` or ``finetune`` run's recipe."""
    if _is_finetune(recipe):
        return {"source": recipe.get("source") or "unlabelled frames", "labels": None,
                "frames": recipe.get("frames"), "validation_frames": recipe.get("validation_frames"),
                "loss": f"|FT| of the prediction against the measured amplitudes ({recipe.get('kind')})",
                "seed": recipe.get("seed")}
    return {"simulator": _data_source(recipe), "train_samples": recipe.get("n_train"),
            "validation_samples": recipe.get("n_val"), "seed": recipe.get("seed"),
            "photons": recipe.get("photons"), "background": recipe.get("background", 0.0), **_crystal_data(recipe)}


def _report(folder: str | Path) -> dict:
    """An evaluation folder's ``report.json``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"no evaluation folder {folder} (make it with cdinn-stream evaluate --model WEIGHTS "
                         f"--out {folder})")
    return _read_json(folder / "report.json", "evaluation report")


def _evaluated(folder: str | Path, weights: Path) -> dict:
    """The report of an evaluation of ``weights``; refused when it evaluated other weights or does not say."""
    report = _report(folder)
    got = report.get("weights_sha256")
    if got is None:
        raise ValueError(f"{Path(folder) / 'report.json'} does not say which weights it evaluated (no weights_sha256: "
                         f"made before evaluate recorded it): re-run cdinn-stream evaluate --model {weights} "
                         f"--out {folder}")
    want = weights_sha256(weights)
    if got != want:
        raise ValueError(f"{folder} is an evaluation of other weights ({report.get('weights', report.get('model'))}, "
                         f"sha256 {got[:12]}) than {weights} (sha256 {want[:12]}): evaluate these "
                         f"(cdinn-stream evaluate --model {weights} --out DIR)")
    return report


def _evaluations(weights: Path, evaluation_dir: str | Path, also: list[str | Path],
                 crystal_evaluation: str | Path | None) -> tuple[dict, list[dict], dict | None]:
    """The reports of the evaluation, the ``also`` ones and the crystal one, each checked to be of ``weights``."""
    report = _evaluated(evaluation_dir, weights)
    others = [_evaluated(d, weights) for d in also]
    crystal = None
    if crystal_evaluation is not None:
        crystal = _evaluated(crystal_evaluation, weights)
        if crystal.get("recipe") != "crystal":
            raise ValueError(f"{crystal_evaluation} is not an evaluation on the crystal recipe")
    return report, others, crystal


def _shipped(models_dir: Path, name: str) -> bool:
    """Whether ``models_dir`` is the package's own models folder and holds the model ``name``."""
    here = models_dir.resolve()
    return any(d.resolve() == here for d in shipped_model_dirs()) and (
        (models_dir / f"{name}.pt").exists() or (models_dir / f"{name}.json").exists())


def _check_target(models_dir: Path, name: str, *, force: bool, amend: bool = False) -> None:
    """Refuse to replace the model ``name`` in ``models_dir`` without ``force`` (a shipped one even
    when only its card is amended: ``amend``); warn when ``force`` replaces a shipped one."""
    weights, card = models_dir / f"{name}.pt", models_dir / f"{name}.json"
    if _shipped(models_dir, name):
        if not force:
            raise ValueError(f"{name} is a shipped model ({models_dir.resolve()} is the package's own models folder): "
                             "publish yours under another --name or into another --models folder (--force replaces "
                             "the shipped one)")
        logger.warning("replacing the shipped model %s in %s (--force)", name, models_dir)
        return
    if not amend and (weights.exists() or card.exists()) and not force:
        raise ValueError(f"{weights if weights.exists() else card} exists: choose another --name, or pass --force "
                         "to replace it")
    if not amend and any(d.resolve() == models_dir.resolve() for d in shipped_model_dirs()):
        logger.warning("publishing %s into the package's own models folder %s: it will ship with the package",
                       name, models_dir)
    elif not amend and any((d / f"{name}.pt").is_file() for d in shipped_model_dirs()):
        logger.warning("%s is the name of a shipped model: load_model(%r) finds %s instead where %s comes "
                       "first on the model search path", name, name, weights, models_dir)


def _complete(card: dict, report: dict, others: list[dict], crystal: dict | None) -> dict:
    """``card`` with its evaluations, the code commit and the date."""
    if crystal is not None:
        card["evaluation_crystal"] = _evaluation(crystal)
    card.update({
        "evaluation": _evaluation(report),
        "other_evaluations": [_evaluation(r) for r in others],
        "code_commit": code_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    return card


def _write(card: dict, models_dir: Path, name: str, write_weights: Callable[[Path], None],
           figures: list[tuple[Path | None, str]]) -> Path:
    """Write ``models_dir/<name>.pt`` (by ``write_weights``), its card and figures (``figures``: an
    evaluation folder and the prefix of its PNGs, or a PNG and its new name); a failure leaves
    neither weights nor card (nor an empty ``models_dir``)."""
    with output_folder(models_dir):
        weights = models_dir / f"{name}.pt"
        tmp = models_dir / f".{name}.pt.partial"
        try:
            write_weights(tmp)
            card.update({"weights_file": weights.name, "weights_bytes": tmp.stat().st_size})
            text = json.dumps(card, indent=1) + "\n"
            os.replace(tmp, weights)
        finally:
            tmp.unlink(missing_ok=True)
        card_path = weights.with_suffix(".json")
        card_path.write_text(text)
    for source, target in figures:
        if source is None:
            continue
        if source.is_dir():
            _copy_figures(source, models_dir, target)
        elif source.is_file():
            shutil.copy(source, models_dir / target)
    return card_path


def publish(run_dir: str | Path, evaluation_dir: str | Path, name: str, models_dir: str | Path = "models",
            *, lineage: list[str | Path] = (), after_card: str | Path | None = None,
            also: list[str | Path] = (), crystal_evaluation: str | Path | None = None, force: bool = False) -> Path:
    """Copy a training run's best weights to ``models/<name>.pt`` and write ``models/<name>.json``.

    ``run_dir`` holds ``best.pt`` and ``history.json`` (from ``cdinn-stream train`` or ``finetune``);
    ``evaluation_dir`` holds ``report.json`` (from ``cdinn-stream evaluate`` of that ``best.pt``: its
    ``weights_sha256`` must be the file's, as must every other evaluation's).
    ``lineage`` lists the training folders the run was fine-tuned from (``init_weights``), oldest
    first; each one's recipe and validation curve goes into the card. ``after_card`` is the card
    of the weights the lineage starts from (read it before it is overwritten): its lineage and
    its own final stage come first. ``also`` lists more evaluation folders of the same weights
    (another precision, noise level or number of symmetry views); they go under
    ``other_evaluations``. ``crystal_evaluation`` is an evaluation folder on the crystal recipe
    (``evaluate --recipe crystal``): every card reports it beside the paper recipe's.
    ``force``: replace an existing model of that name (a shipped one with a warning).
    Everything is checked before anything is written (``ValueError`` with the reason).
    """
    run_dir, evaluation_dir, models_dir = Path(run_dir), Path(evaluation_dir), Path(models_dir)
    hist = _history(run_dir)
    best_pt = run_dir / "best.pt"
    if not best_pt.is_file():
        raise ValueError(f"no weights {best_pt} (RUN: the output folder of cdinn-stream train or finetune)")
    network = read_weights(best_pt)
    recipe = hist["recipe"]
    if recipe.get("centre") and not network.config.centred_input:  # trained before the config said so
        network.config = replace(network.config, centred_input=True)
    report, others, crystal = _evaluations(best_pt, evaluation_dir, also, crystal_evaluation)
    _check_centring(network.config.centred_input, {evaluation_dir: report, **(
        {Path(crystal_evaluation): crystal} if crystal is not None else {})})
    _check_target(models_dir, name, force=force)
    stages = [_stage(Path(d)) for d in lineage]
    if after_card is not None:
        earlier = _read_json(Path(after_card), "model card")
        stages = earlier.get("lineage", []) + [_stage_of_card(earlier)] + stages
    best = min(hist["history"], key=lambda h: h["val_loss"])
    epochs_run = _epochs_run(hist["history"])
    card = {
        "name": name,
        "format": "cdinn-stream/1",
        "architecture": network.config.to_dict(),
        "parameters": sum(p.numel() for p in network.parameters()),
        "flops_per_frame": count_flops(network),
        "recipe": recipe,
        "training_machine": hist.get("machine"),
        "data": _data(recipe),
        "epochs_run": epochs_run,
        "best_epoch": best["epoch"],
        "validation_curve": _curve(hist["history"]),
        "training_seconds": hist["history"][-1]["seconds"],
        "lineage": stages,
        "total_epochs": sum(s["epochs_run"] for s in stages) + epochs_run,
        "total_training_seconds": sum(s["training_seconds"] for s in stages)
        + hist["history"][-1]["seconds"],
    }
    if _is_finetune(recipe):
        card["fine_tuned_from"] = {"weights": recipe.get("init_weights")}
    _complete(card, report, others, crystal)
    return _write(card, models_dir, name, partial(save_weights, network, meta={"name": name, "epoch": best["epoch"]}),
                  [(evaluation_dir, name), (run_dir / "training_curve.png", f"{name}.training_curve.png"),
                   (None if crystal_evaluation is None else Path(crystal_evaluation), f"{name}.crystal")])


def publish_int8(weights: str | Path, evaluation_dir: str | Path, name: str, models_dir: str | Path = "models",
                 *, source: str, stages: list[dict], also: list[str | Path] = (),
                 crystal_evaluation: str | Path | None = None, force: bool = False) -> Path:
    """Copy an int8 weights file to ``models/<name>.pt`` and write ``models/<name>.json``.

    ``weights`` comes from a quantization-aware fine-tune (``docs/experiments/int8_qat.py``) or a
    post-training quantization (``docs/experiments/int8_ptq.py``) of the shipped float model
    ``source``, whose card's name, commit and evaluation go into the new card; ``stages`` are the
    runs, oldest first (each a dict with at least ``recipe``, ``steps``, ``batch``,
    ``training_seconds`` and ``train_samples``, and optionally ``data``, the card's data entry);
    ``evaluation_dir``, ``also``, ``crystal_evaluation`` and ``force`` are as for :func:`publish`
    (the evaluations must be of ``weights``).
    """
    weights, evaluation_dir, models_dir = Path(weights), Path(evaluation_dir), Path(models_dir)
    network = read_network(weights)
    if not isinstance(network, Int8CDINN):
        raise ValueError(f"{weights} is not an int8 weights file")
    report, others, crystal = _evaluations(weights, evaluation_dir, also, crystal_evaluation)
    _check_centring(network.config.centred_input, {evaluation_dir: report, **(
        {Path(crystal_evaluation): crystal} if crystal is not None else {})})
    source_card = _read_json(models_dir / f"{source}.json", "model card of the source model")
    _check_target(models_dir, name, force=force)
    float_form = CDINN(network.config)
    samples = sum(st["steps"] * st["batch"] for st in stages)
    card = {
        "name": name,
        "format": INT8_FORMAT,
        "architecture": network.config.to_dict(),
        "parameters": sum(p.numel() for p in float_form.parameters()),  # of the trained form, as float cards
        "stored_parameters": sum(int(layer["weight"].numel() + layer["bias"].numel())
                                 for layer in network.layers.values()),  # the folded form's int8 weights, biases
        "flops_per_frame": count_flops(float_form),
        "computed_flops_per_frame": count_flops(fold(float_form)),
        "fine_tuned_from": {"name": source, "code_commit": source_card.get("code_commit"),
                            "evaluation": source_card.get("evaluation")},
        "recipe": stages[-1]["recipe"],
        "training_machine": stages[-1].get("machine"),
        "data": stages[-1].get("data") or {
                 "simulator": _data_source(stages[-1]["recipe"]), "train_samples": stages[-1]["train_samples"],
                 "samples_seen": samples, "seed": stages[-1]["recipe"].get("data_seed"),
                 "photons": stages[-1]["recipe"].get("photons"),
                 "background": stages[-1]["recipe"].get("background", 0.0)},
        "steps": sum(st["steps"] for st in stages),
        "epochs_run": round(samples / stages[-1]["train_samples"], 2),
        "training_seconds": stages[-1]["training_seconds"],
        "lineage": stages,
        "total_training_seconds": sum(st["training_seconds"] for st in stages),
    }
    _complete(card, report, others, crystal)
    return _write(card, models_dir, name, partial(shutil.copyfile, weights),
                  [(evaluation_dir, name), (None if crystal_evaluation is None else Path(crystal_evaluation),
                                            f"{name}.crystal")])


def attach_crystal_evaluation(name: str, evaluation_dir: str | Path, models_dir: str | Path = "models",
                              *, force: bool = False) -> Path:
    """Add an evaluation on the crystal recipe (``evaluate --recipe crystal`` of ``name``, its
    weights ``models_dir/<name>.pt``: the report's ``weights_sha256`` must be theirs) to that
    model's card as ``evaluation_crystal``, with its figures; the rest of the card is kept. A
    shipped model's card is amended only with ``force`` (and a warning). Returns the card's path."""
    models_dir = Path(models_dir)
    card_path = models_dir / f"{name}.json"
    report = _report(evaluation_dir)
    if report.get("recipe") != "crystal":
        raise ValueError(f"{evaluation_dir} is not an evaluation on the crystal recipe")
    if report.get("model") != name:
        raise ValueError(f"{evaluation_dir} evaluates {report.get('model')!r}, not {name!r}")
    if not card_path.is_file():
        raise ValueError(f"no model card {card_path}")
    weights = models_dir / f"{name}.pt"
    if not weights.is_file():
        raise ValueError(f"no weights {weights} beside the card {card_path}")
    _evaluated(evaluation_dir, weights)
    _check_target(models_dir, name, force=force, amend=True)
    card = json.loads(card_path.read_text())
    card["evaluation_crystal"] = _evaluation(report)
    _copy_figures(Path(evaluation_dir), models_dir, f"{name}.crystal")
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    return card_path
