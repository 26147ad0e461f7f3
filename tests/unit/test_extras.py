"""The optional dependencies: every extra the docs, CI and error messages name exists, ``[all]``
holds every runtime extra, and the README's commands install what they run."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
DEVELOPMENT = {"test", "bench"}  # tools for working on the package, not part of [all]
# `pip install ".[a,b]"`, `pip install -e '.[a]'`, `cdinn-stream[a]`
EXTRAS = re.compile(r"""(?:\.|cdinn-stream)\[([\w,\s-]+)\]""")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _extras() -> dict[str, list[str]]:
    return _project()["optional-dependencies"]


def _named_in(text: str) -> set[str]:
    return {e.strip() for group in EXTRAS.findall(text) for e in group.split(",") if e.strip()}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _documents() -> dict[str, str]:
    paths = [ROOT / "README.md", ROOT / ".ci" / "run", *sorted((ROOT / "docs").glob("*.md")),
             *sorted(ROOT.glob("*/README.md")), *sorted((ROOT / "cdinn_stream").rglob("*.py"))]
    return {str(p.relative_to(ROOT)): p.read_text() for p in paths if p.is_file()}


def test_every_extra_named_in_the_docs_ci_and_messages_exists():
    extras = set(_extras())
    named = {where: _named_in(text) - extras for where, text in _documents().items()}
    assert not {k: v for k, v in named.items() if v}, "extras that pyproject.toml does not define"
    assert _named_in((ROOT / ".ci" / "run").read_text()), ".ci/run installs the package with its extras"


def test_all_holds_every_runtime_extra():
    extras = _extras()
    assert {"server", "epics", "profile", "all"} <= set(extras)
    in_all = set(extras["all"])
    for name, requirements in extras.items():
        if name in DEVELOPMENT | {"all"}:
            continue
        assert set(requirements) <= in_all, f"[all] lacks [{name}]: {set(requirements) - in_all}"


def test_services_are_optional():
    """Serving Tiled, EPICS and IPython are extras, not what every user installs."""
    core = {_name(r) for r in _project()["dependencies"]}
    assert not core & {"caproto", "pyepics", "ipython", "ophyd-async"}
    assert not any("server" in r for r in _project()["dependencies"] if _name(r) == "tiled")
    extras = _extras()
    assert {_name(r) for r in extras["epics"]} == {"caproto", "pyepics"}
    assert any(_name(r) == "tiled" and "server" in r for r in extras["server"])
    assert {_name(r) for r in extras["profile"]} == {"ipython"}


def _pip_installs(text: str) -> list[set[str]]:
    """The extras of each `pip install` of the package (`.` or `-e .`) in ``text``."""
    return [_named_in(m) for m in re.findall(r"pip install (?:-e )?[\"']?\.(?:\[[^\]]*\])?[\"']?", text)]


def test_readme_and_ci_install_everything_they_run():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    ci_command = re.search(r"python -m pip install torch.*pytest", ci).group(0)
    assert ci_command in readme, "the README's test command is what .ci/run runs"
    (ci_install,) = _pip_installs(ci)
    assert {"all", "test"} <= ci_install
    main_job = re.search(r"```bash\n(.*cdinn-stream demo.*)\n```", readme).group(1)
    (demo_install,) = _pip_installs(main_job)
    assert "all" in demo_install, "the demo needs the Tiled server and the EPICS IOC"


def test_a_missing_optional_package_names_its_extra(monkeypatch):
    import importlib

    import cdinn_stream.sinks.epics as epics_sink

    for name in ("caproto", "caproto.server"):
        monkeypatch.setitem(sys.modules, name, None)  # import caproto -> ImportError
    monkeypatch.delitem(sys.modules, "cdinn_stream.apps.ioc", raising=False)
    with pytest.raises(ImportError, match=r"cdinn-stream\[epics\]"):
        importlib.import_module("cdinn_stream.apps.ioc")
    monkeypatch.delitem(sys.modules, "cdinn_stream.apps.ioc", raising=False)

    monkeypatch.setattr(epics_sink.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"cdinn-stream\[epics\]"):
        epics_sink.EpicsSink("CDINN:")
