"""Command-line flags with ASPS_* environment twins: the variable gives the default, the flag wins.

One rule for every CLI that has such twins (asps_server, asps_client): an empty variable counts as
unset, a switch is on for 1/true/yes/on, and `--help` names the variable in brackets. Tiny and
standard-library only, because the enclave side loads it.

Who may import it: anyone (enclave side included).
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def env(name: str, default: Any = None) -> Any:
    """The variable's value, or `default` when it is unset or empty."""
    return os.environ.get(name) or default


def env_switch(name: str) -> bool:
    return env(name, "").lower() in ("1", "true", "yes", "on")


def add_env_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *flags: str,
    env_name: str,
    default: Any = None,
    help: str,
    **kwargs: Any,
) -> argparse.Action:
    """`parser.add_argument(*flags, ...)` whose default comes from `env_name` when it is set (a
    store_true switch: from `env_switch`); the help text names the variable unless it already does."""
    if kwargs.get("action") == "store_true":
        value: Any = env_switch(env_name)
    else:
        value = env(env_name, default)
    if f"[{env_name}" not in help:
        help = f"{help} [{env_name}]"
    return parser.add_argument(*flags, default=value, help=help, **kwargs)
