"""Model cards: the JSON beside each shipped weights file in ``models/``.

A card records how the weights were made and how good they are: the training recipe, the data
size, the epochs run, the validation curve, the evaluation metrics (NN vs ER/HIO), the machine,
and the code commit.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

from ..nn.folding import fold
from ..nn.int8 import FORMAT as INT8_FORMAT
from ..nn.int8 import Int8CDINN
from ..nn.model import CDINN, count_flops
from ..nn.weights import read_network, read_weights, save_weights

__all__ = ["code_commit", "publish", "publish_int8", "attach_crystal_evaluation"]


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


def _stage(run_dir: Path) -> dict:
    hist = json.loads((run_dir / "history.json").read_text())
    best = min(hist["history"], key=lambda h: h["val_loss"])
    return {"recipe": hist["recipe"], "machine": hist.get("machine"), "epochs_run": len(hist["history"]),
            "best_epoch": best["epoch"],
            "best_val_loss": best["val_loss"], "training_seconds": hist["history"][-1]["seconds"],
            "validation_curve": [{k: h[k] for k in ("epoch", "train_loss", "val_loss", "lr")}
                                 for h in hist["history"]]}


def _stage_of_card(card: dict) -> dict:
    """The final training stage a model card describes, as a lineage entry."""
    curve = card["validation_curve"]
    return {"recipe": card["recipe"], "machine": card.get("training_machine"), "epochs_run": card["epochs_run"],
            "best_epoch": card["best_epoch"],
            "best_val_loss": min(h["val_loss"] for h in curve), "training_seconds": card["training_seconds"],
            "validation_curve": curve}


def _evaluation(report: dict) -> dict:
    return {k: report[k] for k in ("n", "seed", "size", "recipe", "centre", "photons", "precision", "views", "machine",
                                   "methods", "speedup_nn_vs_erhio", "noise", "offsets") if k in report}


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


def _check_centring(centred: bool, evaluations: list[str | Path]) -> None:
    """Refuse evaluations that did not run the network as it is shipped (centring its input or not)."""
    for folder in evaluations:
        ran = bool(json.loads((Path(folder) / "report.json").read_text()).get("centre", False))
        if ran != centred:
            raise ValueError(f"{folder} was evaluated with centre={ran}, but the network is shipped with "
                             f"centred_input={centred}")


def _data_source(recipe: dict) -> str:
    kind = recipe.get("data_recipe", "paper")
    if kind == "mixed":
        share = recipe.get("crystal_fraction", 0.5)
        return f"cdinn_stream.simulate (paper recipe {1 - share:.0%}, crystal recipe {share:.0%})"
    return f"cdinn_stream.simulate ({kind} recipe)"


def _write_card(card: dict, report: dict, also: list[str | Path], weights: Path,
                crystal_evaluation: str | Path | None = None) -> Path:
    """Complete ``card`` with the evaluations, commit, date and weights file, and write it beside the weights.
    ``crystal_evaluation``: the folder of an evaluation on the crystal recipe (``evaluate --recipe
    crystal``), kept as ``evaluation_crystal`` with its figures as ``<name>.crystal.*.png``."""
    if crystal_evaluation is not None:
        crystal = json.loads((Path(crystal_evaluation) / "report.json").read_text())
        if crystal.get("recipe") != "crystal":
            raise ValueError(f"{crystal_evaluation} is not an evaluation on the crystal recipe")
        card["evaluation_crystal"] = _evaluation(crystal)
        _copy_figures(Path(crystal_evaluation), weights.parent, f"{weights.stem}.crystal")
    card.update({
        "evaluation": _evaluation(report),
        "other_evaluations": [_evaluation(json.loads((Path(d) / "report.json").read_text())) for d in also],
        "code_commit": code_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "weights_file": weights.name,
        "weights_bytes": weights.stat().st_size,
    })
    card_path = weights.with_suffix(".json")
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    return card_path


def publish(run_dir: str | Path, evaluation_dir: str | Path, name: str, models_dir: str | Path = "models",
            *, lineage: list[str | Path] = (), after_card: str | Path | None = None,
            also: list[str | Path] = (), crystal_evaluation: str | Path | None = None) -> Path:
    """Copy a training run's best weights to ``models/<name>.pt`` and write ``models/<name>.json``.

    ``run_dir`` holds ``best.pt`` and ``history.json`` (from ``cdinn-stream train``);
    ``evaluation_dir`` holds ``report.json`` (from ``cdinn-stream evaluate`` on those weights).
    ``lineage`` lists the training folders the run was fine-tuned from (``init_weights``), oldest
    first; each one's recipe and validation curve goes into the card. ``after_card`` is the card
    of the weights the lineage starts from (read it before it is overwritten): its lineage and
    its own final stage come first. ``also`` lists more evaluation folders of the same weights
    (another precision, noise level or number of symmetry views); they go under
    ``other_evaluations``. ``crystal_evaluation`` is an evaluation folder on the crystal recipe
    (``evaluate --recipe crystal``): every card reports it beside the paper recipe's.
    """
    run_dir, evaluation_dir, models_dir = Path(run_dir), Path(evaluation_dir), Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    network = read_weights(run_dir / "best.pt")
    hist = json.loads((run_dir / "history.json").read_text())
    report = json.loads((evaluation_dir / "report.json").read_text())
    if hist["recipe"].get("centre") and not network.config.centred_input:  # trained before the config said so
        network.config = replace(network.config, centred_input=True)
    _check_centring(network.config.centred_input, [evaluation_dir, *([crystal_evaluation] if crystal_evaluation
                                                                       else [])])
    best = min(hist["history"], key=lambda h: h["val_loss"])
    weights = models_dir / f"{name}.pt"
    save_weights(network, weights, meta={"name": name, "epoch": best["epoch"]})
    _copy_figures(evaluation_dir, models_dir, name)
    if (run_dir / "training_curve.png").is_file():
        shutil.copy(run_dir / "training_curve.png", models_dir / f"{name}.training_curve.png")
    stages = [_stage(Path(d)) for d in lineage]
    if after_card is not None:
        earlier = json.loads(Path(after_card).read_text())
        stages = earlier.get("lineage", []) + [_stage_of_card(earlier)] + stages
    card = {
        "name": name,
        "format": "cdinn-stream/1",
        "architecture": network.config.to_dict(),
        "parameters": sum(p.numel() for p in network.parameters()),
        "flops_per_frame": count_flops(network),
        "recipe": hist["recipe"],
        "training_machine": hist.get("machine"),
        "data": {"simulator": _data_source(hist["recipe"]), "train_samples": hist["recipe"]["n_train"],
                 "validation_samples": hist["recipe"]["n_val"], "seed": hist["recipe"]["seed"],
                 "photons": hist["recipe"]["photons"], "background": hist["recipe"].get("background", 0.0),
                 **_crystal_data(hist["recipe"])},
        "epochs_run": len(hist["history"]),
        "best_epoch": best["epoch"],
        "validation_curve": [{k: h[k] for k in ("epoch", "train_loss", "val_loss", "lr")} for h in hist["history"]],
        "training_seconds": hist["history"][-1]["seconds"],
        "lineage": stages,
        "total_epochs": sum(s["epochs_run"] for s in stages) + len(hist["history"]),
        "total_training_seconds": sum(s["training_seconds"] for s in stages)
        + hist["history"][-1]["seconds"],
    }
    return _write_card(card, report, also, weights, crystal_evaluation)


def publish_int8(weights: str | Path, evaluation_dir: str | Path, name: str, models_dir: str | Path = "models",
                 *, source: str, stages: list[dict], also: list[str | Path] = (),
                 crystal_evaluation: str | Path | None = None) -> Path:
    """Copy an int8 weights file to ``models/<name>.pt`` and write ``models/<name>.json``.

    ``weights`` comes from a quantization-aware fine-tune (``docs/experiments/int8_qat.py``) or a
    post-training quantization (``docs/experiments/int8_ptq.py``) of the shipped float model
    ``source``, whose card's name, commit and evaluation go into the new card; ``stages`` are the
    runs, oldest first (each a dict with at least ``recipe``, ``steps``, ``batch``,
    ``training_seconds`` and ``train_samples``, and optionally ``data``, the card's data entry);
    ``evaluation_dir``, ``also`` and ``crystal_evaluation`` are as for :func:`publish`.
    """
    evaluation_dir, models_dir = Path(evaluation_dir), Path(models_dir)
    network = read_network(weights)
    if not isinstance(network, Int8CDINN):
        raise ValueError(f"{weights} is not an int8 weights file")
    _check_centring(network.config.centred_input, [evaluation_dir, *([crystal_evaluation] if crystal_evaluation
                                                                   else [])])
    source_card = json.loads((models_dir / f"{source}.json").read_text())
    report = json.loads((evaluation_dir / "report.json").read_text())
    target = models_dir / f"{name}.pt"
    shutil.copy(weights, target)
    _copy_figures(evaluation_dir, models_dir, name)
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
    return _write_card(card, report, also, target, crystal_evaluation)


def attach_crystal_evaluation(name: str, evaluation_dir: str | Path, models_dir: str | Path = "models") -> Path:
    """Add an evaluation on the crystal recipe (``evaluate --recipe crystal`` of the shipped
    ``name``) to that model's card as ``evaluation_crystal``, with its figures; the rest of the
    card is kept. Returns the card's path."""
    models_dir = Path(models_dir)
    card_path = models_dir / f"{name}.json"
    report = json.loads((Path(evaluation_dir) / "report.json").read_text())
    if report.get("recipe") != "crystal":
        raise ValueError(f"{evaluation_dir} is not an evaluation on the crystal recipe")
    if report.get("model") != name:
        raise ValueError(f"{evaluation_dir} evaluates {report.get('model')!r}, not {name!r}")
    if not card_path.is_file():
        raise ValueError(f"no model card {card_path}")
    card = json.loads(card_path.read_text())
    card["evaluation_crystal"] = _evaluation(report)
    _copy_figures(Path(evaluation_dir), models_dir, f"{name}.crystal")
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    return card_path
