"""Command-line bugs of issue 10, each reproduced against the real scripts: gen-certs --help, JSON log
mode on every line, client flag validation, --sim-dir typos, connection diagnoses, --key hints."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from asps_testkit import ENCLAVE_1, Client, make_env, write_policy
from openbao import free_port
from test_service_process import ServerProcess
from test_tls_lifecycle import DAY, NOW, issue

import asps_pb2

REPO = Path(__file__).resolve().parent.parent
SERVER = str(REPO / "asps_server.py")
CLIENT = str(REPO / "asps_client.py")


@pytest.fixture(scope="module")
def env(tmp_path_factory, sim_platform):
    return make_env(tmp_path_factory, sim_platform)


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def policy_doc(secrets: dict[str, str] | None = None) -> dict:
    app = {"id": "app1", "mr_enclave": ENCLAVE_1.hex(), "secrets": secrets or {"db_password": "pw-1"}}
    return {"kms": "none", "app_list": [app]}


def assert_all_json(lines: list[str]) -> list[dict]:
    parsed = []
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(obj, dict), line
        parsed.append(obj)
    return parsed


# --- gen-certs ------------------------------------------------------------------------------------------


def test_gen_certs_help_prints_help_and_writes_nothing(tmp_path):
    r = run([SERVER, "gen-certs", "--help"], tmp_path)
    assert r.returncode == 0 and "DIR" in r.stdout and "demo" in r.stdout
    assert list(tmp_path.iterdir()) == []  # no directory called --help, no ca.key anywhere
    r = run([SERVER, "gen-certs", "-x", "d"], tmp_path)
    assert r.returncode == 2 and list(tmp_path.iterdir()) == []
    r = run([SERVER, "gen-certs"], tmp_path)
    assert r.returncode == 2 and "DIR" in r.stderr
    r = run([SERVER, "gen-certs", "out", "asps.example"], tmp_path)
    assert r.returncode == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
    ]


# --- JSON log mode: every line -----------------------------------------------------------------------------


def test_json_mode_every_line_of_a_real_run_is_json(env, tmp_path):
    """A server in JSON mode with a group-readable token key file (a warning), the simulated root (a loud
    warning), a refused request (an audit line), a TLS handshake a client aborts (gRPC's own log line),
    a broken policy on SIGHUP (an error) and SIGTERM: stdout and stderr hold only JSON lines."""
    policy = write_policy(tmp_path / "p.json", policy_doc())
    key_file = tmp_path / "token.key"
    key_file.write_text(os.urandom(16).hex() + "\n")
    key_file.chmod(0o644)
    port = free_port()
    srv = ServerProcess(
        ["--log-format", "json", "--token-key-file", str(key_file)], env.server_env(policy, port)
    )
    try:
        srv.wait_for(f"Server listening on 127.0.0.1:{port}", where="out")
        client = Client(f"localhost:{port}", env.ca)
        try:
            err = client.refused(
                asps_pb2.SecretsRequest(evidence=b"x", token=b"y" * 57, names=[], signature=b"z")
            )
            assert err.code().name in ("INVALID_ARGUMENT", "UNAUTHENTICATED")
        finally:
            client.close()
        # a client that does not trust the server's certificate: the server side sees a failed handshake
        ctx = ssl.create_default_context()
        ctx.set_alpn_protocols(["h2"])
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            ctx.wrap_socket(raw, server_hostname="localhost")
        # a connection that is not TLS at all
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
            raw.recv(100)
        policy.write_text("{ broken")
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_for("policy reload failed")
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.finish() == 0
    finally:
        srv.kill()
    out, err = assert_all_json(srv.out), assert_all_json(srv.err)
    assert any(o["message"].startswith("Server listening on") for o in out)
    messages = [o.get("message", "") for o in err]
    assert any("readable by group/others" in m for m in messages)
    assert any("TRUSTED ROOT IS NOT INTEL'S" in m for m in messages)
    assert any("policy reload failed" in m for m in messages)
    assert any("verdict" in o for o in err)  # the refusal's audit line
    assert any(o.get("level") == "warning" for o in err)
    # lines written straight to stderr (dcap's root warning; gRPC's C core, e.g. its handshake failures)
    routed = [o["message"] for o in err if o.get("logger") == "asps.stderr"]
    assert any("is not the Intel SGX Root CA" in m for m in routed), routed


def test_json_mode_refusals_and_usage_errors_are_json(env, tmp_path):
    cert, key, _ = issue(env.certs, tmp_path / "expired", not_before=NOW - 30 * DAY, not_after=NOW - DAY)
    policy = write_policy(tmp_path / "p.json", policy_doc())
    r = run(
        [SERVER, "--log-format", "json"],
        REPO,
        **env.server_env(policy, free_port(), ASPS_CERT=str(cert), ASPS_KEY=str(key)),
    )
    assert r.returncode == 2
    lines = assert_all_json(r.stderr.splitlines()) + assert_all_json(r.stdout.splitlines())
    assert any("cannot start" in o["message"] and "expired on" in o["message"] for o in lines)
    r = run([SERVER, "--no-such-flag"], REPO, ASPS_LOG_FORMAT="json")
    assert r.returncode == 2
    [usage] = assert_all_json(r.stderr.splitlines())
    assert "unrecognized arguments: --no-such-flag" in usage["message"] and usage["level"] == "error"
    r = run([SERVER, "--log-format=json", "--threads", "many"], REPO)
    assert r.returncode == 2 and assert_all_json(r.stderr.splitlines())


def test_json_mode_workers_supervisor_lines_are_json(env, tmp_path):
    policy = write_policy(tmp_path / "p.json", policy_doc())
    port = free_port()
    srv = ServerProcess(["--log-format", "json", "--workers", "2"], env.server_env(policy, port))
    try:
        srv.wait_for(f"Server listening on 127.0.0.1:{port} (2 workers)", where="out", timeout=60)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.finish(timeout=60) == 0
    finally:
        srv.kill()
    assert_all_json(srv.out)
    messages = [o.get("message", "") for o in assert_all_json(srv.err)]
    assert any("share a random one" in m for m in messages)
    assert any("stopping 2 workers" in m for m in messages)
