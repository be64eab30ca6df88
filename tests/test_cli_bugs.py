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

import asps_client
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


# --- client flags ------------------------------------------------------------------------------------------


def test_client_unknown_sim_tcb_is_a_usage_error_not_a_traceback(env, tmp_path):
    sim = ["--provider", "sim", "--sim-dir", str(env.sim.directory)]
    r = run(
        [CLIENT, "--host", "127.0.0.1:1", "--ca", str(env.certs / "ca.crt"), *sim, "--sim-tcb", "Bogus"],
        tmp_path,
    )
    assert r.returncode == asps_client.EXIT_USAGE, r.stderr
    assert "Traceback" not in r.stderr
    assert "unknown sim TCB level 'Bogus'" in r.stderr and "UpToDate" in r.stderr


def test_client_mistyped_sim_dir_is_an_error_unless_sim_init(env, tmp_path, capsys):
    typo = tmp_path / "simm"
    base = ["--host", "127.0.0.1:1", "--ca", str(env.certs / "ca.crt"), "--connect-timeout", "1"]
    assert asps_client.main([*base, "--provider", "sim", "--sim-dir", str(typo)]) == asps_client.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"--sim-dir {typo}: does not exist" in err and "--sim-init" in err
    assert not typo.exists(), "no platform was created behind the user's back"
    typo.mkdir()
    assert asps_client.main([*base, "--provider", "sim", "--sim-dir", str(typo)]) == asps_client.EXIT_USAGE
    assert "holds no simulated platform" in capsys.readouterr().err
    # asked for explicitly: a new platform is made, and the client goes on to connect (nothing listens)
    rc = asps_client.main([*base, "--provider", "sim", "--sim-dir", str(typo), "--sim-init"])
    assert rc == asps_client.EXIT_UNREACHABLE
    assert (typo / "platform.json").is_file()
    capsys.readouterr()


def test_server_tls_flag_aliases_and_client_secret_alias():
    import asps_server

    p = asps_server.build_parser()
    for flags in (["--tls-cert", "c.pem", "--tls-key", "k.pem"], ["--cert", "c.pem", "--key", "k.pem"]):
        args = p.parse_args(flags)
        assert (args.cert, args.key) == ("c.pem", "k.pem")
    c = asps_client.build_parser()
    assert c.parse_args(["--secret", "a", "--key", "b", "-key", "c"]).names == ["a", "b", "c"]


# --- client: what failed when it cannot connect ---------------------------------------------------------


class TlsListener:
    """A bare TLS server (Python's ssl) presenting the given certificate; it completes or fails handshakes
    and answers nothing, which is all the client's diagnosis needs to see."""

    def __init__(self, cert: Path, key: Path) -> None:
        import threading

        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.set_alpn_protocols(["h2"])
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.settimeout(5)
                self.ctx.wrap_socket(conn, server_side=True).close()
            except OSError:
                conn.close()

    def close(self) -> None:
        self.sock.close()


def test_client_names_expired_certificate_vs_connection_refused_per_address(env, tmp_path, capsys):
    cert, key, _ = issue(env.certs, tmp_path / "expired", not_before=NOW - 30 * DAY, not_after=NOW - DAY)
    listener = TlsListener(cert, key)
    base = ["--ca", str(env.certs / "ca.crt"), "--provider", "sim", "--sim-dir", str(env.sim.directory)]
    try:
        rc = asps_client.main(["--host", f"127.0.0.1:{listener.port}", *base, "--connect-timeout", "3"])
        assert rc == asps_client.EXIT_UNREACHABLE
        err = capsys.readouterr().err
        assert (
            f"127.0.0.1:{listener.port}: TLS certificate verification failed: certificate has expired" in err
        )
        assert "Connection refused" not in err and "connection refused" not in err
        # "localhost" may resolve to ::1 too, where nothing listens: each address says what happened there
        rc = asps_client.main(["--host", f"localhost:{listener.port}", *base, "--connect-timeout", "3"])
        assert rc == asps_client.EXIT_UNREACHABLE
        err = capsys.readouterr().err
        assert (
            f"127.0.0.1:{listener.port}: TLS certificate verification failed: certificate has expired" in err
        )
        if socket.has_ipv6 and any(i[0] == socket.AF_INET6 for i in socket.getaddrinfo("localhost", 1)):
            assert f"[::1]:{listener.port}: connection refused" in err
        # two replicas, one with the expired certificate, one down: each is named with its own cause
        down = free_port()
        hosts = f"127.0.0.1:{listener.port},127.0.0.1:{down}"
        assert (
            asps_client.main(["--host", hosts, *base, "--connect-timeout", "3"])
            == asps_client.EXIT_UNREACHABLE
        )
        err = capsys.readouterr().err
        assert (
            f"127.0.0.1:{listener.port}: TLS certificate verification failed: certificate has expired" in err
        )
        assert f"127.0.0.1:{down}: connection refused" in err
    finally:
        listener.close()
    port = free_port()
    rc = asps_client.main(["--host", f"127.0.0.1:{port}", *base, "--connect-timeout", "3"])
    assert rc == asps_client.EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}: connection refused (nothing listens there)" in err
    assert "verification" not in err


def test_client_names_a_certificate_from_another_ca_against_a_real_server(env, tmp_path, capsys):
    policy = write_policy(tmp_path / "p.json", policy_doc())
    port = free_port()
    srv = ServerProcess([], env.server_env(policy, port))
    other_ca = env.tmp.parent / f"other-ca-{port}"
    import asps_server

    asps_server.generate_demo_certs(other_ca)
    try:
        srv.wait_for(f"Server listening on 127.0.0.1:{port}", where="out")
        argv = ["--host", f"127.0.0.1:{port}", "--ca", str(other_ca / "ca.crt"), "--provider", "sim"]
        rc = asps_client.main([*argv, "--sim-dir", str(env.sim.directory), "--connect-timeout", "3"])
        assert rc == asps_client.EXIT_UNREACHABLE
        err = capsys.readouterr().err
        assert f"127.0.0.1:{port}: TLS certificate verification failed" in err and "signed by --ca" in err
    finally:
        srv.proc.send_signal(signal.SIGTERM)
        srv.finish()


def test_not_found_hints_at_omitting_key_and_lists_nothing_ungranted(env, tmp_path, capsys):
    doc = policy_doc({"db_password": "pw-1"})
    doc["app_list"].append({"id": "app2", "mr_enclave": "22" * 32, "secrets": {"other_apps_key": "x"}})
    policy = write_policy(tmp_path / "p.json", doc)
    import asps_server

    handle = asps_server.serve(env.config(policy))
    try:
        base = ["--host", f"localhost:{handle.port}", "--ca", str(env.certs / "ca.crt"), "--provider", "sim"]
        base += ["--sim-dir", str(env.sim.directory)]
        assert asps_client.main([*base, "--key", "master_key"]) == asps_client.EXIT_NOT_GRANTED
        err = capsys.readouterr().err
        assert "'master_key' is not granted" in err
        assert "omit --key (or give --key all)" in err
        assert "other_apps_key" not in err and "db_password" not in err
        assert asps_client.main([*base, "--secret", "db_password"]) == 0
        assert capsys.readouterr().out == "Secret received: pw-1\n"
        assert asps_client.main([*base, "--key", "all"]) == 0
        assert capsys.readouterr().out == "Secret received: pw-1\n"
    finally:
        handle.stop(0)


def test_client_with_an_unusable_ca_file_says_so_without_a_traceback(env, tmp_path, capsys):
    bad_ca = tmp_path / "ca.crt"
    bad_ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    argv = ["--host", f"127.0.0.1:{free_port()}", "--ca", str(bad_ca), "--provider", "sim"]
    rc = asps_client.main([*argv, "--sim-dir", str(env.sim.directory), "--connect-timeout", "2"])
    assert rc == asps_client.EXIT_UNREACHABLE
    assert "--ca holds no usable PEM CA certificate" in capsys.readouterr().err
