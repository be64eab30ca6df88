"""Shared fixtures: the real samples in ../shared and a simulated SGX platform per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# gRPC's fork handlers make a fork()ed child (subprocess with preexec_fn, as tests/openbao.py starts
# OpenBao) crash now and then (SIGABRT/SIGSEGV before exec) while gRPC threads run in this process.
# Nothing here forks a process that keeps using gRPC, so turn them off before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SAMPLES = REPO.parent / "shared" / "samples"


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    if not SAMPLES.is_dir():
        pytest.fail(f"shared samples not found at {SAMPLES}")
    return SAMPLES


@pytest.fixture(scope="session")
def sim_platform(tmp_path_factory):
    """One simulated SGX platform (test PKI + collateral) for the whole session."""
    import sgxsim

    return sgxsim.SimPlatform.init(tmp_path_factory.mktemp("sim"))
