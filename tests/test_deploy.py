"""deploy/asps-server.service: valid for systemd, hardened, and its ExecStart is a command line the
server accepts and runs (with the token key read from the systemd credential)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from asps_testkit import ENCLAVE_1, make_env, write_policy
from openbao import free_port
from test_service_process import ServerProcess

import asps_server

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "asps-server.service"
PYTHON_IN_UNIT = "/opt/asps/.venv/bin/python"


def directives(text: str) -> dict[str, list[str]]:
    """KEY -> values (in order) of the unit's [Service] section, continuation lines joined."""
    out: dict[str, list[str]] = {}
    section = ""
    joined = text.replace("\\\n", " ")
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(" ".join(value.split()))
    return out


def exec_start_argv() -> list[str]:
    [line] = directives(UNIT.read_text())["ExecStart"]
    return shlex.split(line)


def test_unit_passes_systemd_analyze_verify(tmp_path):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed here: deploy/asps-server.service cannot be verified")
    text = UNIT.read_text()
    assert text.count(PYTHON_IN_UNIT) == 1
    # verify insists that ExecStart's binary exists: point the copy at this interpreter, nothing else changes
    copy = tmp_path / "asps-server.service"
    copy.write_text(text.replace(PYTHON_IN_UNIT, sys.executable))
    r = subprocess.run([exe, "verify", str(copy)], capture_output=True, text=True, timeout=120)
    # verify exits 0 even for an unknown key or a bad value, printing a warning: none may appear
    assert r.returncode == 0 and r.stderr.strip() == "" and r.stdout.strip() == "", r.stderr + r.stdout


def test_unit_is_hardened():
    d = directives(UNIT.read_text())
    one = {k: v[-1] for k, v in d.items()}
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "User": "asps",
    }.items():
        assert one.get(key) == value, (key, one.get(key))
    assert "@system-service" in d["SystemCallFilter"]
    assert "token-key:/etc/asps/token.key" in d["LoadCredential"]
    assert set(one["ReadOnlyPaths"].split()) >= {"/etc/asps", "/opt/asps"}
    assert "DynamicUser" not in d or one["DynamicUser"] == "yes"
    argv = exec_start_argv()
    assert argv[:2] == [PYTHON_IN_UNIT, "/opt/asps/asps_server.py"]
    assert argv[argv.index("--token-key-file") + 1] == "%d/token-key"


def test_exec_start_runs_the_server_with_the_token_key_credential(tmp_path_factory, sim_platform, tmp_path):
    """The unit's ExecStart, with its /etc and /var paths moved into a temporary directory and the
    address on loopback (no PCCS here: the simulated collateral added), starts, reloads on SIGHUP
    (ExecReload) and stops on SIGTERM; the token key comes from the credentials directory."""
    env = make_env(tmp_path_factory, sim_platform)
    creds = tmp_path / "credentials"
    creds.mkdir()
    key = creds / "token-key"
    key.write_text(os.urandom(16).hex() + "\n")
    key.chmod(0o400)
    policy_doc = {
        "kms": "none",
        "app_list": [{"id": "a", "mr_enclave": ENCLAVE_1.hex(), "secrets": {"k": "v"}}],
    }
    policy = write_policy(tmp_path / "policy.json", policy_doc)
    port = free_port()
    moved = {
        "0.0.0.0:50051": f"127.0.0.1:{port}",
        "/etc/asps/tls/server.crt": str(env.certs / "server.crt"),
        "/etc/asps/tls/server.key": str(env.certs / "server.key"),
        "/etc/asps/policy.json": str(policy),
        "%d/token-key": str(key),
        "/var/log/asps/audit.jsonl": str(tmp_path / "audit.jsonl"),
    }
    argv = [moved.get(a, a) for a in exec_start_argv()[2:]]
    assert not [a for a in argv if a.startswith(("/etc/", "/var/", "/opt/", "%"))], argv
    argv += ["--collateral", str(env.sim.directory / "collateral.json")]
    argv += ["--root-ca", str(env.sim.directory / "root_ca.pem")]
    srv = ServerProcess(argv, {"CREDENTIALS_DIRECTORY": str(creds)})
    try:
        srv.wait_for(f"Server listening on 127.0.0.1:{port}", where="out")
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_for("TLS certificate reloaded")
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.finish() == 0
    finally:
        srv.kill()
    for line in srv.err + srv.out:
        json.loads(line)  # --log-format json: every line
    assert not any("random one" in line for line in srv.err), "the credential's token key was not used"


def test_token_key_file_defaults_to_the_systemd_credential(tmp_path, monkeypatch):
    monkeypatch.delenv("ASPS_TOKEN_KEY_FILE", raising=False)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert asps_server.build_parser().parse_args([]).token_key_file is None  # no credential: no default
    key = tmp_path / asps_server.TOKEN_KEY_CREDENTIAL
    key.write_text("k" * 32 + "\n")
    key.chmod(0o400)
    args = asps_server.build_parser().parse_args([])
    assert args.token_key_file == str(key)
    assert asps_server.load_token_keys(args.token_key_file, None) == (b"k" * 32,)
    monkeypatch.setenv("ASPS_TOKEN_KEY_FILE", "/explicit")
    assert asps_server.build_parser().parse_args([]).token_key_file == "/explicit"
