"""On-disk spool of results waiting for a Tiled server (pure file I/O, no Tiled calls).

One folder per run under the spool root::

    <root>/<run_uid>/manifest.json       parent, start document, model card, frames already in
                                         Tiled ("written"), and the run's end ("close") once known
    <root>/<run_uid>/chunk-000001.npz    the columns of one write (one row per frame each), in order

The wrapper :class:`~cdinn_stream.sinks.spooled.SpooledSink` (as :class:`~cdinn_stream.sinks.TiledSink`)
appends here while its store is unreachable or behind and writes the chunks back in order when it
answers; ``cdinn-stream backfill`` does the same later for a spool left behind (the server never
came back before the process ended). Nothing here knows Tiled: a manifest records where its run
goes (``parent``) for the store that writes it back.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

__all__ = ["Spool", "default_spool_dir"]


def default_spool_dir() -> Path:
    """``$CDINN_SPOOL`` or ``~/.cache/cdinn-stream/spool``."""
    return Path(os.environ.get("CDINN_SPOOL") or Path.home() / ".cache" / "cdinn-stream" / "spool")


class Spool:
    """Results of runs waiting for Tiled, on disk under ``root``."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_spool_dir()
        self._next: dict[str, int] = {}  # next chunk number per run (no directory listing per write)

    def _dir(self, run_uid: str) -> Path:
        if not run_uid or "/" in run_uid or run_uid.startswith("."):
            raise ValueError(f"not a run uid: {run_uid!r}")
        return self.root / run_uid

    def runs(self) -> list[str]:
        """Run uids with a spool, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(self.manifest(p.name).get("created", 0), p.name) for p in self.root.iterdir()
                 if (p / "manifest.json").is_file()]
        return [uid for _, uid in sorted(found)]

    def has(self, run_uid: str) -> bool:
        """Whether ``run_uid`` has anything waiting."""
        return (self._dir(run_uid) / "manifest.json").is_file()

    def manifest(self, run_uid: str) -> dict:
        return json.loads((self._dir(run_uid) / "manifest.json").read_text())

    def _write_manifest(self, run_uid: str, manifest: dict) -> None:
        path = self._dir(run_uid) / "manifest.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, default=str))
        os.replace(tmp, path)  # atomic: a crash leaves the old or the new manifest

    def begin(self, run_uid: str, *, parent: str, start: dict, model_card: dict, written: int,
              server: str | None = None) -> None:
        """Start spooling ``run_uid`` for ``server`` (its address; no-op if the run has a spool)."""
        if self.has(run_uid):
            return
        self._dir(run_uid).mkdir(parents=True, exist_ok=True)
        self._write_manifest(run_uid, {"run_uid": run_uid, "server": server, "parent": parent, "start": start,
                                       "model_card": model_card, "written": written, "created": time.time()})

    def update(self, run_uid: str, **changes) -> None:
        self._write_manifest(run_uid, {**self.manifest(run_uid), **changes})

    def append(self, run_uid: str, columns: dict[str, np.ndarray]) -> Path:
        """Add one write's columns after the run's last chunk."""
        k = self._next.get(run_uid)
        if k is None:
            chunks = self.chunks(run_uid)
            k = int(chunks[-1].stem.split("-")[1]) + 1 if chunks else 1
        self._next[run_uid] = k + 1
        path = self._dir(run_uid) / f"chunk-{k:06d}.npz"
        tmp = path.with_name(path.stem + ".partial.npz")
        np.savez(tmp, **columns)
        os.replace(tmp, path)
        return path

    def chunks(self, run_uid: str) -> list[Path]:
        """The run's chunk files, in order."""
        return sorted(p for p in self._dir(run_uid).glob("chunk-*.npz") if ".partial" not in p.name)

    @staticmethod
    def read(chunk: Path) -> dict[str, np.ndarray]:
        with np.load(chunk) as data:
            return {k: data[k] for k in data.files}

    def frames(self, run_uid: str) -> int:
        """Frames waiting for ``run_uid`` (each column of a chunk has one row per frame)."""
        total = 0
        for chunk in self.chunks(run_uid):
            with np.load(chunk) as data:
                total += len(data[data.files[0]]) if data.files else 0
        return total

    def remove(self, run_uid: str) -> None:
        self._next.pop(run_uid, None)
        shutil.rmtree(self._dir(run_uid), ignore_errors=True)
