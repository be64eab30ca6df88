"""cli_env: the one rule for flags with ASPS_* twins, and both CLIs following it."""

from __future__ import annotations

import argparse
import re

import pytest

import asps_client
import asps_server
import cli_env


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    cli_env.add_env_argument(p, "--port", type=int, env_name="ASPS_T_PORT", default="7", help="a port")
    cli_env.add_env_argument(p, "--on", action="store_true", env_name="ASPS_T_ON", help="[ASPS_T_ON=1] on")
    return p


def test_the_variable_is_the_default_and_the_flag_wins(monkeypatch):
    monkeypatch.setenv("ASPS_T_PORT", "9")
    assert _parser().parse_args([]).port == 9
    assert _parser().parse_args(["--port", "3"]).port == 3


def test_an_unset_or_empty_variable_leaves_the_default(monkeypatch):
    monkeypatch.delenv("ASPS_T_PORT", raising=False)
    assert _parser().parse_args([]).port == 7
    monkeypatch.setenv("ASPS_T_PORT", "")
    assert _parser().parse_args([]).port == 7


@pytest.mark.parametrize(("value", "on"), [("1", True), ("TRUE", True), ("yes", True), ("on", True),
                                           ("0", False), ("no", False), ("", False), (None, False)])
def test_a_switch_is_on_for_1_true_yes_on(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("ASPS_T_ON", raising=False)
    else:
        monkeypatch.setenv("ASPS_T_ON", value)
    assert _parser().parse_args([]).on is on


def test_help_names_the_variable_once():
    text = _parser().format_help()
    assert "a port [ASPS_T_PORT]" in text
    assert text.count("ASPS_T_ON") == 1


@pytest.mark.parametrize("build", [asps_server.build_parser, asps_client.build_parser])
def test_every_variable_a_cli_reads_is_named_in_its_help(monkeypatch, build):
    """The CLIs take their twins from the helper: setting each named variable changes the default."""
    parser = build()
    text = parser.format_help()
    named = set(re.findall(r"\[(ASPS_[A-Z_]+)", text))
    assert len(named) >= (30 if build is asps_server.build_parser else 5)
    defaults = {a.dest: a.default for a in parser._actions}
    changed = 0
    for name in sorted(named - {"ASPS_HOST"}):  # the client's --host is read in main (it appends)
        monkeypatch.setenv(name, "1" if f"[{name}=1]" in text else "99")
        after = {a.dest: a.default for a in build()._actions}
        monkeypatch.delenv(name)
        changed += after != defaults
    assert changed == len(named - {"ASPS_HOST"})
