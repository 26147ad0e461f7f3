"""Saving and loading model weights without executing code.

A weights file is a ``torch.save`` of plain data: ``{"format", "config", "state_dict", "meta"}``.
It is read with ``torch.load(..., weights_only=True)``, which refuses anything but tensors and
primitive containers, so a weights file cannot run code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .model import CDINN, ModelConfig

__all__ = ["FORMAT", "save_weights", "read_weights", "load_blob", "float_network", "WeightsError"]

#: Version tag of the weights file format.
FORMAT = "cdinn-stream/1"


class WeightsError(ValueError):
    """A weights file that is missing, corrupt, truncated or of an unknown format."""


def save_weights(model: CDINN, path: str | Path, *, meta: dict | None = None) -> None:
    """Write ``model``'s configuration and weights (float32, on CPU) to ``path``."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, "config": model.config.to_dict(), "state_dict": state, "meta": meta or {}},
               Path(path))


def load_blob(path: str | Path, map_location: str | torch.device, formats: tuple[str, ...]) -> dict:
    """The plain-data contents of a weights file of one of ``formats`` (:class:`WeightsError` otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no weights file at {path}")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, pickle with code, random bytes, ...
        raise WeightsError(f"cannot read weights file {path}: {err}") from err
    if not isinstance(blob, dict) or blob.get("format") not in formats:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise WeightsError(f"{path} is not a {' or '.join(formats)} weights file (found format {found!r})")
    return blob


def float_network(blob: dict, path: str | Path) -> CDINN:
    """The float network of a :data:`FORMAT` blob (from :func:`load_blob`)."""
    try:
        model = CDINN(ModelConfig.from_dict(blob["config"]))
        model.load_state_dict(blob["state_dict"])
    except Exception as err:
        raise WeightsError(f"weights in {path} do not match their configuration: {err}") from err
    return model.eval()


def read_weights(path: str | Path, *, map_location: str | torch.device = "cpu") -> CDINN:
    """Build a :class:`CDINN` from a weights file; raises :class:`WeightsError` on a bad file."""
    return float_network(load_blob(path, map_location, (FORMAT,)), path)
