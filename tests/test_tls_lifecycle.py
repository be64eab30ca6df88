"""The server's own TLS certificate: refused at start when unusable, warned about before it expires,
rotated on SIGHUP without a restart (real TLS handshakes, real gRPC, a real server process)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from asps_testkit import captured_logs, make_env, write_policy
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openbao import free_port
from test_service_process import ServerProcess

import asps_server

REPO = Path(__file__).resolve().parent.parent
POLICY = {"kms": "none", "app_list": [{"id": "app1", "mr_enclave": "11" * 32, "secrets": {"k": "v"}}]}
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


@pytest.fixture(scope="module")
def env(tmp_path_factory, sim_platform):
    return make_env(tmp_path_factory, sim_platform)


def issue(
    certs: Path,
    out: Path,
    *,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    key: ec.EllipticCurvePrivateKey | None = None,
    key_file_key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[Path, Path, int]:
    """A server certificate for localhost/127.0.0.1 from the demo CA in `certs`, valid in the given window;
    `key_file_key` puts a different key in the key file (a mismatched pair). Returns (cert, key, serial)."""
    ca_key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    key = key or ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / "server.crt", out / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        (key_file_key or key).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path, cert.serial_number


def served_serial(port: int, ca: bytes) -> int:
    """The serial of the certificate a new TLS connection to the server gets, verified against `ca`."""
    ctx = ssl.create_default_context(cadata=ca.decode())
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def test_load_refuses_expired_not_yet_valid_and_mismatched_pairs_saying_which(env, tmp_path):
    cert, key, _ = issue(env.certs, tmp_path / "expired", not_before=NOW - 30 * DAY, not_after=NOW - DAY)
    with pytest.raises(asps_server.TlsIdentityError, match=r"expired on .*renew it") as e:
        asps_server.load_tls_pair(str(cert), str(key))
    assert str(cert) in str(e.value)
    cert, key, _ = issue(env.certs, tmp_path / "future", not_before=NOW + DAY, not_after=NOW + 30 * DAY)
    with pytest.raises(asps_server.TlsIdentityError, match="is not yet valid: valid from"):
        asps_server.load_tls_pair(str(cert), str(key))
    cert, key, _ = issue(
        env.certs,
        tmp_path / "mismatch",
        not_before=NOW - DAY,
        not_after=NOW + 30 * DAY,
        key_file_key=ec.generate_private_key(ec.SECP256R1()),
    )
    with pytest.raises(asps_server.TlsIdentityError, match="does not match the certificate"):
        asps_server.load_tls_pair(str(cert), str(key))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(asps_server.TlsIdentityError, match="not a PEM certificate"):
        asps_server.load_tls_pair(str(tmp_path / "junk.pem"), str(key))
    with pytest.raises(asps_server.TlsIdentityError, match="not a PEM private key"):
        asps_server.load_tls_pair(str(cert), str(tmp_path / "junk.pem"))
    with pytest.raises(asps_server.TlsIdentityError, match="No such file"):
        asps_server.load_tls_pair(str(tmp_path / "absent.crt"), str(key))
    # chain in the wrong order: the CA first, the server's certificate second
    wrong_order = tmp_path / "wrong-order.crt"
    wrong_order.write_bytes((env.certs / "ca.crt").read_bytes() + (env.certs / "server.crt").read_bytes())
    with pytest.raises(
        asps_server.TlsIdentityError, match="number 2 in the file; the server's own certificate"
    ):
        asps_server.load_tls_pair(str(wrong_order), str(env.certs / "server.key"))
    good = asps_server.load_tls_pair(str(env.certs / "server.crt"), str(env.certs / "server.key"))
    # the fixture issued it after this module was imported: compare with the time of the check
    assert good.not_before < datetime.datetime.now(datetime.UTC) < good.not_after


def test_serve_refuses_an_expired_certificate(env, tmp_path):
    cert, key, _ = issue(env.certs, tmp_path / "expired", not_before=NOW - 30 * DAY, not_after=NOW - DAY)
    policy = write_policy(tmp_path / "p.json", POLICY)
    with pytest.raises(asps_server.StartupError, match="expired on"):
        asps_server.serve(env.config(policy, cert=str(cert), key=str(key)))


def test_warns_at_start_when_the_certificate_expires_within_14_days(env, tmp_path):
    cert, key, _ = issue(env.certs, tmp_path / "soon", not_before=NOW - DAY, not_after=NOW + 3 * DAY)
    with captured_logs() as cap:
        asps_server.ServerTlsIdentity(str(cert), str(key))
    warnings = [ln for ln in cap.lines if " WARNING " in ln]
    assert any("expires in 2.9 days" in w or "expires in 3.0 days" in w for w in warnings), cap.lines
    cert, key, _ = issue(env.certs, tmp_path / "later", not_before=NOW - DAY, not_after=NOW + 60 * DAY)
    with captured_logs() as cap:
        asps_server.ServerTlsIdentity(str(cert), str(key))
    assert not [ln for ln in cap.lines if "expires in" in ln]


def test_reload_rotates_for_new_connections_keeps_serving_and_a_bad_pair_is_ignored(env, tmp_path):
    """In-process: reload() switches the certificate new handshakes get; an open channel keeps working;
    an expired or mismatched new pair is refused with a log line and the current one stays."""
    live = tmp_path / "live"
    cert, key, first = issue(env.certs, live, not_before=NOW - DAY, not_after=NOW + 60 * DAY)
    policy = write_policy(tmp_path / "p.json", POLICY)
    handle = asps_server.serve(env.config(policy, cert=str(cert), key=str(key)))
    channel = grpc.secure_channel(f"localhost:{handle.port}", grpc.ssl_channel_credentials(env.ca))
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
        assert served_serial(handle.port, env.ca) == first
        _, _, second = issue(env.certs, live, not_before=NOW - DAY, not_after=NOW + 90 * DAY)
        assert handle.tls is not None and handle.tls.reload()
        assert served_serial(handle.port, env.ca) == second
        assert served_serial(handle.port, env.ca) == second  # stays, not only for one handshake
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1  # open channel
        for bad in (
            dict(not_before=NOW - 30 * DAY, not_after=NOW - DAY),
            dict(
                not_before=NOW - DAY,
                not_after=NOW + DAY,
                key_file_key=ec.generate_private_key(ec.SECP256R1()),
            ),
        ):
            issue(env.certs, live, **bad)
            with captured_logs() as cap:
                assert not handle.tls.reload()
            assert any("TLS reload failed, keeping certificate serial" in ln for ln in cap.lines), cap.lines
            assert served_serial(handle.port, env.ca) == second
    finally:
        channel.close()
        handle.stop(0)


def test_sighup_rotates_the_certificate_of_a_running_server_process(env, tmp_path):
    live = tmp_path / "live"
    cert, key, first = issue(env.certs, live, not_before=NOW - DAY, not_after=NOW + 60 * DAY)
    policy = write_policy(tmp_path / "p.json", POLICY)
    port = free_port()
    srv = ServerProcess(
        [], env.server_env(policy, port, ASPS_CERT=str(cert), ASPS_KEY=str(key), ASPS_LOG_FORMAT="json")
    )
    channel = None
    try:
        srv.wait_for(f"Server listening on 127.0.0.1:{port}", where="out")
        channel = grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(env.ca))
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
        assert served_serial(port, env.ca) == first
        _, _, second = issue(env.certs, live, not_before=NOW - DAY, not_after=NOW + 90 * DAY)
        srv.proc.send_signal(signal.SIGHUP)
        line = srv.wait_for("TLS certificate reloaded")
        assert f"serial {second:x}" in json.loads(line)["message"]
        assert served_serial(port, env.ca) == second
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.finish() == 0
    finally:
        if channel is not None:
            channel.close()
        srv.kill()


def test_server_process_refuses_to_start_on_an_expired_certificate(env, tmp_path):
    cert, key, _ = issue(env.certs, tmp_path / "expired", not_before=NOW - 30 * DAY, not_after=NOW - DAY)
    policy = write_policy(tmp_path / "p.json", POLICY)
    r = subprocess.run(
        [sys.executable, str(REPO / "asps_server.py")],
        env={**os.environ, **env.server_env(policy, free_port(), ASPS_CERT=str(cert), ASPS_KEY=str(key))},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "cannot start" in r.stderr and "expired on" in r.stderr and str(cert) in r.stderr
    assert "Server listening" not in r.stdout
    shutil.rmtree(tmp_path / "expired")
