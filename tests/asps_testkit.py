"""Shared pieces for the service tests: a real in-process server (real TLS, real gRPC), sim enclaves,
and a log capture that the tests search for secret values.

Import as ``asps_testkit`` (tests/ is on sys.path, like openbao.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

import asps_client
import asps_pb2
import asps_pb2_grpc
import asps_server
import asps_wire
import ratls_attest
import sgxsim

ENCLAVE_1 = sgxsim.DEFAULT_MR_ENCLAVE
ENCLAVE_2 = hashlib.sha256(b"ASPS test enclave 2").digest()
ENCLAVE_UNKNOWN = hashlib.sha256(b"ASPS test enclave nobody knows").digest()
SIGNER = sgxsim.DEFAULT_MR_SIGNER
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class LogCapture(logging.Handler):
    """Every formatted log line of this process, kept to be searched for secret values."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(asps_server._TextFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in self.lines if ln.startswith("{") and '"verdict"' in ln]


@contextlib.contextmanager
def captured_logs() -> Iterator[LogCapture]:
    """Every logger at DEBUG but gRPC's, which stays at INFO as in the server (asps_server.GRPC_LOG_FLOOR:
    gRPC's asyncio layer logs at DEBUG while it holds its process-wide lock, a deadlock with the GC)."""
    cap = LogCapture()
    root, grpc_log = logging.getLogger(), logging.getLogger("grpc")
    old_level, old_grpc_level = root.level, grpc_log.level
    root.addHandler(cap)
    root.setLevel(logging.DEBUG)
    grpc_log.setLevel(asps_server.GRPC_LOG_FLOOR)
    try:
        yield cap
    finally:
        root.removeHandler(cap)
        root.setLevel(old_level)
        grpc_log.setLevel(old_grpc_level)


def assert_no_secret_in(lines: list[str], values: list[bytes | str]) -> None:
    """No secret value (as text, hex or repr) appears in any line."""
    needles: list[str] = []
    for v in values:
        b = v.encode() if isinstance(v, str) else v
        if len(b) < 4:
            continue
        needles += [b.decode("utf-8", "replace"), b.hex(), repr(b)[2:-1]]
    hits = [(n, ln) for ln in lines for n in needles if n and n in ln]
    assert not hits, f"secret value found in logs: {hits[:3]}"
    assert lines, "no log lines were captured: the search would prove nothing"


@contextlib.contextmanager
def recorded_vault_tokens(bao: Any, into: list[str] | None = None) -> Iterator[list[str]]:
    """The root token and every token `bao.create_token` hands out while inside, appended to `into`
    as they are made: values that no log line may ever show (searched with `assert_no_secret_in`)."""
    made: list[str] = [] if into is None else into
    if getattr(bao, "root_token", None):
        made.append(bao.root_token)
    original = bao.create_token

    def create_token(*args: Any, **kwargs: Any) -> str:
        token = original(*args, **kwargs)
        made.append(token)
        return token

    bao.create_token = create_token
    try:
        yield made
    finally:
        del bao.create_token  # the class's method again


@dataclass
class Env:
    """Paths of the per-module fixtures: sim platform, TLS material."""

    tmp: Path
    sim: sgxsim.SimPlatform
    certs: Path

    @property
    def ca(self) -> bytes:
        return (self.certs / "ca.crt").read_bytes()

    def config(self, policy_path: Path, **kw: Any) -> asps_server.ServerConfig:
        settings: dict[str, Any] = {
            "host": "127.0.0.1:0",
            "cert": str(self.certs / "server.crt"),
            "key": str(self.certs / "server.key"),
            "policy": str(policy_path),
            "collateral": str(self.sim.directory / "collateral.json"),
            "root_ca": str(self.sim.directory / "root_ca.pem"),
        }
        settings.update(kw)
        return asps_server.ServerConfig(**settings)

    def server_env(self, policy_path: Path, port: int, **extra: str) -> dict[str, str]:
        """The ASPS_* variables that set up a server subprocess the way `config` does in-process."""
        return {
            "ASPS_HOST": f"127.0.0.1:{port}",
            "ASPS_CERT": str(self.certs / "server.crt"),
            "ASPS_KEY": str(self.certs / "server.key"),
            "ASPS_POLICY": str(policy_path),
            "ASPS_COLLATERAL": str(self.sim.directory / "collateral.json"),
            "ASPS_ROOT_CA": str(self.sim.directory / "root_ca.pem"),
            **extra,
        }

    def evidence(
        self,
        mr_enclave: bytes = ENCLAVE_1,
        *,
        key_type: str = "p256",
        fmt: str = "cczoo",
        **sim: Any,
    ) -> asps_client.Evidence:
        return asps_client.make_evidence(
            "sim", key_type=key_type, fmt=fmt, sim_dir=str(self.sim.directory), mr_enclave=mr_enclave, **sim
        )


def make_env(tmp_path_factory: pytest.TempPathFactory, sim_platform: sgxsim.SimPlatform) -> Env:
    tmp = tmp_path_factory.mktemp("asps")
    certs = asps_server.generate_demo_certs(tmp / "certs")
    # the collateral file the server reads (FileCollateralSource) must exist in the sim directory
    coll = Path(sim_platform.directory) / "collateral.json"
    if not coll.exists():
        coll.write_text(sim_platform.collateral().to_json())
    return Env(tmp, sim_platform, certs)


# Module fixtures shared by the service test modules. Each is declared under its pytest name: a module
# imports ``module_env``, ``module_logs``, ... (silencing F401 on the import, as for openbao_server)
# and its tests keep asking for ``env`` / ``logs`` / ``ev1`` / ``client``. Where every test of a module
# must run under the log capture (autouse), that module adds
# ``pytestmark = pytest.mark.usefixtures("logs")``.


@pytest.fixture(scope="module", name="logs")
def module_logs() -> Iterator[LogCapture]:
    """Every log line of the module's in-process servers, searched for secrets at the end."""
    with captured_logs() as cap:
        yield cap


@pytest.fixture(scope="module", name="env")
def module_env(
    tmp_path_factory: pytest.TempPathFactory, sim_platform: sgxsim.SimPlatform, logs: LogCapture
) -> Env:
    """The module's sim platform and TLS material, made with the log capture already on."""
    return make_env(tmp_path_factory, sim_platform)


@pytest.fixture(scope="module", name="ev1")
def module_ev1(env: Env) -> asps_client.Evidence:
    return env.evidence(ENCLAVE_1)


@pytest.fixture(scope="module", name="client")
def module_client(server: asps_server.ServerHandle, env: Env) -> Iterator[Client]:
    """A client of the module's ``server`` fixture."""
    c = Client(f"localhost:{server.port}", env.ca)
    yield c
    c.close()


def health_of(port: int, ca: bytes, service: str = "") -> int:
    with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(ca)) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def wait_health(port: int, ca: bytes, want: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = health_of(port, ca)
        if status == want:
            return
        time.sleep(0.05)
    raise AssertionError(f"health stayed {status}, wanted {want}")


def write_policy(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(json.dumps(doc, indent=2))
    return path


@dataclass
class Client:
    """Talks to one server the way asps_client does, but lets tests bend each field."""

    address: str
    ca: bytes
    channel: grpc.Channel = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.secure_channel(
            self.address,
            grpc.ssl_channel_credentials(root_certificates=self.ca),
            options=[("grpc.max_send_message_length", 8 * 1024 * 1024)],
        )
        self.stub = asps_pb2_grpc.SecretProvisionStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def challenge(self) -> bytes:
        return self.stub.GetChallenge(asps_pb2.ChallengeRequest(), timeout=10).token

    def request(
        self,
        ev: asps_client.Evidence,
        names: list[str] = (),  # type: ignore[assignment]
        *,
        token: bytes | None = None,
        signer: Any = None,
        evidence_bytes: bytes | None = None,
    ) -> tuple[asps_pb2.SecretsRequest, bytes]:
        token = self.challenge() if token is None else token
        names = list(names)
        sig = asps_wire.sign_transcript(
            signer or ev.private_key, asps_wire.transcript(token, ev.cert_der, names)
        )
        req = asps_pb2.SecretsRequest(
            evidence=ev.cert_der if evidence_bytes is None else evidence_bytes,
            token=token,
            names=names,
            signature=sig,
        )
        return req, token

    def get(self, ev: asps_client.Evidence, names: list[str] = (), **kw: Any) -> tuple[str, dict[str, bytes]]:  # type: ignore[assignment]
        req, token = self.request(ev, names, **kw)
        reply = self.stub.GetSecrets(req, timeout=10)
        return reply.app_id, asps_client.open_bundle(ev.private_key, reply.sealed, token)

    def refused(self, req: asps_pb2.SecretsRequest) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as e:
            self.stub.GetSecrets(req, timeout=10)
        return e.value


def forged_certificate(quote_cert_der: bytes, other_key: Any) -> bytes:
    """A certificate carrying the quote of `quote_cert_der` but another key (self-signed by it)."""
    cert = x509.load_der_x509_certificate(quote_cert_der)
    ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(ratls_attest.OID_CCZOO_QUOTE))
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
        .public_key(other_key.public_key())
        .add_extension(ext.value, critical=False)
    )
    return builder.sign(other_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def new_p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def plain_certificate(key: Any) -> bytes:
    """A self-signed certificate with no evidence at all."""
    import datetime

    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "no quote here")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .public_key(key.public_key())
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


# --- HTTP stand-ins (a PCCS, a Vault) on 127.0.0.1 ---------------------------------------------------


def send_reply(handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
    """Answer the request `handler` is serving: `status`, `headers`, a true Content-Length, `body`."""
    handler.send_response(status)
    for k, v in headers.items():
        handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class HttpStandIn:
    """An http.server on a free port of 127.0.0.1 answering with `handler`, each request on a daemon
    thread; ``url`` reaches it, ``close()`` stops it."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- TDs: a PCCS serving both an enclave's and a TD's collateral, and a sim TD's evidence -------------


def pccs_for(plat: sgxsim.SimPlatform) -> HttpStandIn:
    """A PCCS stand-in for the sim platform: the SGX API and the TDX API (TCB info, QE identity) beside
    it, CRLs from the SGX API, shaped as PCCS shapes them; so one server verifies enclaves and TDs."""
    return serve_pccs(plat.collateral(), plat.tdx_collateral(), plat.fmspc.hex())


def serve_pccs(
    sgx: Any, tdx: Any, fmspc: str, *, requests: list[str] | None = None, pck_ca: str | None = None
) -> HttpStandIn:
    """A PCCS stand-in for one platform's SGX and TDX collateral; `requests` records each path asked
    for, `pck_ca` (if given) is the only CA whose PCK CRL is served."""
    import urllib.parse

    enc = urllib.parse.quote

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if requests is not None:
                requests.append(self.path)
            url = urllib.parse.urlsplit(self.path)
            q = dict(urllib.parse.parse_qsl(url.query))
            status, body, headers = 404, b"", {}
            for api, c in (("/sgx/certification/v4", sgx), ("/tdx/certification/v4", tdx)):
                route = url.path[len(api):] if url.path.startswith(api) else None
                if route == "/tcb" and q.get("fmspc") == fmspc:
                    status = 200
                    body = f'{{"tcbInfo":{c.tcb_info},"signature":"{c.tcb_info_signature.hex()}"}}'.encode()
                    headers = {"TCB-Info-Issuer-Chain": enc(c.tcb_info_issuer_chain)}
                elif route == "/qe/identity":
                    status = 200
                    body = (f'{{"enclaveIdentity":{c.qe_identity},'
                            f'"signature":"{c.qe_identity_signature.hex()}"}}').encode()
                    headers = {"SGX-Enclave-Identity-Issuer-Chain": enc(c.qe_identity_issuer_chain)}
                elif route == "/pckcrl" and api.startswith("/sgx") and pck_ca in (None, q.get("ca")):
                    status, body = 200, c.pck_crl
                    headers = {"SGX-PCK-CRL-Issuer-Chain": enc(c.pck_crl_issuer_chain)}
                elif route == "/rootcacrl" and api.startswith("/sgx"):
                    status, body = 200, c.root_ca_crl
            send_reply(self, status, headers, body)

    return HttpStandIn(Handler)


def td_evidence(env: Env, *, fmt: str = "dice", key_type: str = "p384", **sim: Any) -> asps_client.Evidence:
    """A sim TD's RA-TLS evidence (sgxsim.SimProvider with tee "tdx"; options mr_td, rtmrs, debug,
    tcb, relaunch)."""
    return asps_client.make_evidence("sim", key_type=key_type, fmt=fmt, sim_dir=str(env.sim.directory),
                                     tee="tdx", **sim)
