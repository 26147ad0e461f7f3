# IPython configuration of the cdinn_sim profile, read by `ipython --profile-dir=profiles/cdinn_sim`.
# This folder is part of a source checkout: IPython's command history goes to the user's cache
# ($XDG_CACHE_HOME or ~/.cache, then cdinn-stream/ipython/), not into history.sqlite here.
import os
from pathlib import Path

c = get_config()  # noqa: F821 (IPython's config loader provides it)

_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cdinn-stream" / "ipython"
try:
    _cache.mkdir(parents=True, exist_ok=True)
    c.HistoryManager.hist_file = str(_cache / "cdinn_sim-history.sqlite")
except OSError:  # no writable cache: keep the history of this session in memory only
    c.HistoryManager.hist_file = ":memory:"
