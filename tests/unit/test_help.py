"""Every command and option of ``cdinn-stream`` says what it is for; the README's table of commands
lists every command; the IOC's help says how a client finds it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from cdinn_stream.apps.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _subcommand_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {a.dest: a.help for a in action._choices_actions}


def test_every_command_and_option_has_help():
    parser = build_parser()
    missing = [f"cdinn-stream {a.option_strings[0]}" for a in parser._actions
               if not isinstance(a, argparse._SubParsersAction) and not (a.help or "").strip()]
    for name, help_ in _subcommand_help(parser).items():
        if not (help_ or "").strip():
            missing.append(f"cdinn-stream {name} (the command itself)")
    for name, sub in _subparsers(parser).items():
        for action in sub._actions:
            if action.help == argparse.SUPPRESS:
                continue
            if not (action.help or "").strip():
                missing.append(f"cdinn-stream {name} {(action.option_strings or [action.dest])[0]}")
    assert not missing, "options without help text:\n" + "\n".join(missing)


def _readme_command_table() -> set[str]:
    """The commands in the README's 'What is where' row of the command line (``cli.py``)."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("|") and "apps/cli.py" in line:
            (cell,) = re.findall(r"`cdinn-stream ([^`]+)`", line)
            return {c.strip() for c in cell.split("|")}
    raise AssertionError("the README's 'What is where' table has no row for cdinn_stream/apps/cli.py")


def test_readme_command_table_lists_every_command():
    assert _readme_command_table() == set(_subparsers(build_parser()))


def test_serve_help_gives_different_addresses_for_input_and_output():
    serve = _subparsers(build_parser())["serve"]
    helps = {a.dest: a.help for a in serve._actions}
    address = re.compile(r"tcp://[\w.]+:\d+")
    (zmq_in,) = address.findall(helps["zmq"])
    (zmq_out,) = address.findall(helps["zmq_out"])
    assert zmq_in != zmq_out


@pytest.mark.parametrize("variable", ["EPICS_CA_ADDR_LIST", "EPICS_CA_AUTO_ADDR_LIST", "EPICS_CA_SERVER_PORT"])
def test_ioc_help_says_how_clients_find_it(capsys, variable):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ioc", "--help"])
    assert variable in capsys.readouterr().out


def test_phase_rms_is_called_a_standard_deviation():
    """P:PHASE_RMS is the phase's spread about its circular mean (a standard deviation), not the RMS of the phase."""
    ioc_help = _subparsers(build_parser())["ioc"].format_help()
    texts = {"cdinn-stream ioc --help": ioc_help,
             "cdinn_stream/apps/ioc.py": (ROOT / "cdinn_stream/apps/ioc.py").read_text(),
             "cdinn_stream/sinks/epics.py": (ROOT / "cdinn_stream/sinks/epics.py").read_text()}
    for where, text in texts.items():
        assert "RMS phase" not in text, where
        assert "standard deviation" in " ".join(text.split()), where
