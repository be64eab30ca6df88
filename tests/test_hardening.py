"""Findings of the security review and the acceptance audit, one regression test (or a few) each.

Real crypto, real sim quotes, real TLS and gRPC where the finding is about the wire; the pipeline
alone (`Provisioner`) where the finding is about what one request leaves behind.
"""

from __future__ import annotations

import datetime
import hashlib
import secrets
import struct
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from asps_testkit import (  # noqa: F401  (fixtures: client, env, ev1, logs)
    ENCLAVE_1,
    ENCLAVE_UNKNOWN,
    Client,
    assert_no_secret_in,
    module_client,
    module_env,
    module_ev1,
    module_logs,
    new_p256,
    plain_certificate,
    write_policy,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

import asps_client
import asps_pb2
import asps_pb2_grpc
import asps_server
import asps_wire
import dcap
import dcap_quote
import policy as policy_mod
import ratls

REPO = Path(__file__).resolve().parent.parent
V1 = "hardening-" + secrets.token_hex(12)
BIG = "big-" + secrets.token_hex(8) + "x" * 40_000
TOKEN_KEY = b"hardening token key, 32 bytes!!!"

pytestmark = pytest.mark.usefixtures("logs")  # every test runs under the log capture


def doc() -> dict:
    return {
        "kms": "none",
        "app_list": [
            {"id": "app1", "mr_enclave": ENCLAVE_1.hex(), "secrets": {"master_key": V1, "big": BIG}},
        ],
    }


@pytest.fixture(scope="module")
def unknown(env):
    return env.evidence(ENCLAVE_UNKNOWN)


def provisioner(env, tmp_path, *, clock=None, token_cache: int = 200_000, legacy: bool = False):
    policy_path = write_policy(tmp_path / "policy.json", doc())
    verifier = asps_server.build_verifier(env.config(policy_path))
    kw = {} if clock is None else {"clock": clock}
    tokens = asps_server.TokenBook([TOKEN_KEY], cache_size=token_cache, **kw)
    return asps_server.Provisioner(
        policy_mod.load_policy(str(policy_path)),
        verifier,
        tokens,
        legacy=legacy,
        evidence_cache=asps_server.EvidenceCache(16),
        **kw,
    )


def signed(prov, ev, names=("master_key",), *, token=None, signer=None, evidence=None):
    """(evidence, token, names, signature) for `prov.get_secrets`, signed the way the client does."""
    token = prov.get_challenge()[0] if token is None else token
    der = ev.cert_der if evidence is None else evidence
    sig = asps_wire.sign_transcript(
        signer or ev.private_key, asps_wire.transcript(token, der, list(names))
    )
    return der, token, list(names), sig


def refusal(fn, *args, **kw) -> asps_server.Refusal:
    with pytest.raises(asps_server.Refusal) as e:
        fn(*args, **kw)
    return e.value


def rsa_huge_exponent_certificate() -> bytes:
    """A self-issued certificate whose RSA key has a 1001-bit public exponent (signed by an EC key:
    only the key matters here)."""
    n = rsa.generate_private_key(65537, 2048).public_key().public_numbers().n
    huge = rsa.RSAPublicNumbers(2**1000 + 1, n).public_key()
    signer = new_p256()
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "huge e")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .serial_number(7)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .public_key(huge)
        .sign(signer, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


# --- 1. evidence cache: only accepted evidence, and no certificate DER -----------------------------------


def test_refused_evidence_is_never_cached_and_entries_hold_no_der(env, ev1, unknown, tmp_path):
    prov = provisioner(env, tmp_path)
    for _ in range(3):
        r = refusal(prov.get_secrets, *signed(prov, unknown))
        assert (r.kind, r.step) == (asps_server.Kind.DENIED, "policy")
    assert len(prov.evidence) == 0, "refused evidence was cached"

    assert prov.get_secrets(*signed(prov, ev1))[0] == "app1"
    assert len(prov.evidence) == 1
    digest = hashlib.sha256(ev1.cert_der).digest()
    identity, der_digest = prov.evidence.get(digest, int(prov._clock()), prov.policy, prov.verifier)
    assert identity.cert_der == b"" and der_digest == hashlib.sha256(ev1.cert_der).digest()
    assert identity.mr_enclave == ENCLAVE_1

    # a hit still proves possession of the key, over the transcript of the DER that was sent
    hits = prov.evidence.hits
    assert prov.get_secrets(*signed(prov, ev1))[0] == "app1"
    assert prov.evidence.hits == hits + 1
    r = refusal(prov.get_secrets, *signed(prov, ev1, signer=new_p256()))
    assert (r.kind, r.step) == (asps_server.Kind.UNAUTHENTICATED, "signature")


# --- 2. a token is used up only by an authenticated request -------------------------------------------


def test_token_book_check_records_nothing_and_record_is_insert_if_absent():
    book = asps_server.TokenBook([TOKEN_KEY])
    token, _ = book.mint()
    ticket = book.check(token)
    assert book.check(token) == ticket and len(book) == 0
    book.record(ticket)
    assert len(book) == 1
    r = refusal(book.record, ticket)
    assert r.kind is asps_server.Kind.UNAUTHENTICATED and "already used" in r.reason
    assert "already used" in refusal(book.check, token).reason  # cheap refusal stays early


def test_failed_requests_do_not_use_up_the_token_or_fill_the_replay_cache(env, ev1, tmp_path):
    prov = provisioner(env, tmp_path, token_cache=3)
    token = prov.get_challenge()[0]
    r = refusal(prov.get_secrets, *signed(prov, ev1, token=token, signer=new_p256()))
    assert r.step == "signature"
    key = new_p256()
    no_quote = plain_certificate(key)
    r = refusal(prov.get_secrets, *signed(prov, ev1, token=token, signer=key, evidence=no_quote))
    assert (r.kind, r.step) == (asps_server.Kind.UNAUTHENTICATED, "evidence")
    assert len(prov.tokens) == 0
    # the genuine holder of the token still gets through with it, once
    assert prov.get_secrets(*signed(prov, ev1, token=token))[0] == "app1"
    assert "already used" in refusal(prov.get_secrets, *signed(prov, ev1, token=token)).reason

    # garbage with fresh tokens, many times the cache size, leaves it as it was
    for _ in range(10):
        refusal(prov.get_secrets, *signed(prov, ev1, signer=new_p256()))
        refusal(prov.get_secrets, *signed(prov, ev1, signer=key, evidence=no_quote))
    assert len(prov.tokens) == 1
    assert prov.get_secrets(*signed(prov, ev1))[0] == "app1"


def test_concurrent_requests_with_one_token_only_one_passes(env, ev1, tmp_path):
    prov = provisioner(env, tmp_path)
    prov.get_secrets(*signed(prov, ev1))  # warm the evidence cache: the requests race on the token
    args = signed(prov, ev1)
    start = threading.Barrier(8)

    def one() -> str:
        start.wait()
        try:
            prov.get_secrets(*args)
            return "granted"
        except asps_server.Refusal as r:
            return r.reason

    with futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: one(), range(8)))
    assert results.count("granted") == 1, results
    assert all("already used" in r for r in results if r != "granted")


def test_genuine_but_refused_requests_spend_no_token(env, ev1, unknown, tmp_path):
    """Issue 11: a token counts as used only once the policy grants the request. Genuine quotes the
    policy refuses (unknown enclave, debug enclave, Revoked TCB, a name not granted) hold no slot."""
    prov = provisioner(env, tmp_path, token_cache=2)
    debug = env.evidence(ENCLAVE_1, debug=True)
    revoked = env.evidence(ENCLAVE_1, tcb="Revoked")
    cases = [(unknown, ("master_key",)), (debug, ("master_key",)), (revoked, ("master_key",))]
    cases.append((ev1, ("nope",)))
    for _ in range(5):  # more than the cache holds: a recorded refusal would fill it
        for ev, names in cases:
            r = refusal(prov.get_secrets, *signed(prov, ev, names))
            kinds = (asps_server.Kind.DENIED, asps_server.Kind.NOT_GRANTED, asps_server.Kind.UNAUTHENTICATED)
            assert r.kind in kinds, r.reason
            assert r.step in ("policy", "evidence"), (r.step, r.reason)
    assert len(prov.tokens) == 0
    # a token refused once by the policy is not spent: the granted request with it goes through, once
    token = prov.get_challenge()[0]
    refusal(prov.get_secrets, *signed(prov, ev1, ("nope",), token=token))
    assert prov.get_secrets(*signed(prov, ev1, token=token))[0] == "app1"
    assert len(prov.tokens) == 1
    assert "already used" in refusal(prov.get_secrets, *signed(prov, ev1, token=token)).reason


# --- 3. the server's collateral at fault: UNAVAILABLE, not UNAUTHENTICATED ------------------------------


def _wrapped(inner: BaseException) -> ratls.EvidenceError:
    try:
        try:
            raise inner
        except dcap.DcapError as e:
            raise ratls.EvidenceError("quote_verification", f"quote: {e}") from e
    except ratls.EvidenceError as outer:
        return outer


@pytest.mark.parametrize(
    "check",
    [
        "tcb_info_expired",
        "qe_identity_not_yet_valid",
        "root_ca_crl_expired",
        "pck_crl_expired",
        "tcb_info_chain_expired",
        "tcb_info_signature",
        "tcb_info_chain",
        "qe_identity_signature",
        "qe_identity_chain",
        "root_ca_crl",
        "pck_crl",
    ],
)
def test_collateral_side_checks_are_unavailable(check):
    r = asps_server.classify(_wrapped(dcap.VerificationError(check, "bad")), "evidence")
    assert r.kind is asps_server.Kind.UNAVAILABLE and r.status == grpc.StatusCode.UNAVAILABLE
    assert "the server's collateral is not usable" in r.reason and check in r.reason
    assert check in asps_server.COLLATERAL_CHECKS  # the one explicit list


@pytest.mark.parametrize(
    "check",
    ["pck_chain", "pck_chain_expired", "pck_revoked", "qe_report_signature", "isv_signature", "tcb_level"],
)
def test_quote_side_checks_stay_unauthenticated(check):
    r = asps_server.classify(_wrapped(dcap.VerificationError(check, "bad")), "evidence")
    assert r.kind is asps_server.Kind.UNAUTHENTICATED


def test_malformed_collateral_is_unavailable_and_malformed_quote_is_not():
    r = asps_server.classify(_wrapped(dcap.CollateralError("tcb_info: not valid JSON")), "evidence")
    assert r.kind is asps_server.Kind.UNAVAILABLE
    r = asps_server.classify(_wrapped(dcap_quote.QuoteError("quote too short")), "evidence")
    assert r.kind is asps_server.Kind.UNAUTHENTICATED
    r = asps_server.classify(ratls.EvidenceError("binding", "key not bound"), "evidence")
    assert r.kind is asps_server.Kind.UNAUTHENTICATED


def test_expired_collateral_end_to_end_is_unavailable(env, ev1, tmp_path):
    verifier = asps_server.build_verifier(env.config(tmp_path / "unused.json"))
    expiry = ratls.verify_evidence(ev1.cert_der, verifier).collateral_expiry
    later = [float(expiry + 60)]
    prov = provisioner(env, tmp_path, clock=lambda: later[0])
    r = refusal(prov.get_secrets, *signed(prov, ev1))
    assert (r.kind, r.step) == (asps_server.Kind.UNAVAILABLE, "evidence"), r.reason
    assert "the server's collateral is not usable" in r.reason
    assert len(prov.tokens) == 0  # the caller may retry with the same challenge


# --- 4. RSA keys: no costly RSA operation before the cheap refusal --------------------------------------


def test_rsa_key_refused_for_sealing_before_the_signature_check(env, tmp_path):
    prov = provisioner(env, tmp_path)
    der = rsa_huge_exponent_certificate()
    token = prov.get_challenge()[0]
    r = refusal(prov.get_secrets, der, token, ["master_key"], b"\x01" * 256)
    # before the fix: UNAUTHENTICATED at "signature", after a 1001-bit-exponent RSA operation
    assert (r.kind, r.step) == (asps_server.Kind.BAD_INPUT, "sealing_key")
    assert "RSA evidence keys cannot receive sealed secrets" in r.reason


def test_ratls_bounds_the_rsa_public_exponent(env, tmp_path):
    verifier = asps_server.build_verifier(env.config(tmp_path / "unused.json"))
    with pytest.raises(ratls.EvidenceError) as e:
        ratls.verify_evidence(rsa_huge_exponent_certificate(), verifier)
    assert "exponent" in str(e.value) and "certificate" in str(e.value)
    # the legacy path (no signature by the key) is bounded by the same check
    prov = provisioner(env, tmp_path, legacy=True)
    pem = x509.load_der_x509_certificate(rsa_huge_exponent_certificate()).public_bytes(
        serialization.Encoding.PEM
    )
    r = refusal(prov.get_secret_legacy, "master_key", pem.decode())
    assert r.kind is asps_server.Kind.UNAUTHENTICATED and "exponent" in r.reason


def test_ratls_accepts_the_usual_rsa_exponent(env):
    ev = env.evidence(ENCLAVE_1, key_type="rsa3072")
    assert ev.private_key.public_key().public_numbers().e == 65537
    verifier = asps_server.build_verifier(env.config(env.tmp / "unused.json"))
    assert ratls.verify_evidence(ev.cert_der, verifier).mr_enclave == ENCLAVE_1


# --- 7c. RSA-PSS transcript signatures, built by hand ---------------------------------------------------


def test_rsa_pss_transcript_signature_salt_32_only():
    key = rsa.generate_private_key(65537, 2048)
    token, der, names = secrets.token_bytes(57), b"any certificate bytes", ["a", "b\u00e9"]
    data = b"asps/v1 get-secrets" + struct.pack(">I", len(token)) + token + hashlib.sha256(der).digest()
    data += struct.pack(">I", len(names))
    for n in names:
        data += struct.pack(">I", len(n.encode())) + n.encode()

    def pss(salt: int) -> bytes:
        return key.sign(
            data, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt), hashes.SHA256()
        )

    pub = key.public_key()
    assert asps_server.check_signature(der, token, names, pss(32), pub) is pub
    for salt in (0, 20, 64, padding.PSS.MAX_LENGTH):
        r = refusal(asps_server.check_signature, der, token, names, pss(salt), pub)
        assert (r.kind, r.step) == (asps_server.Kind.UNAUTHENTICATED, "signature"), salt
    pkcs1 = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    assert refusal(asps_server.check_signature, der, token, names, pkcs1, pub).step == "signature"


# --- over the wire: undecodable requests, reply size ----------------------------------------------------


@pytest.fixture(scope="module")
def server(env):
    policy = write_policy(env.tmp / "policy-hardening.json", doc())
    limits = asps_server.Limits(reply=16 * 1024)  # BIG (40 KB) cannot fit
    handle = asps_server.serve(env.config(policy, token_keys=(TOKEN_KEY,), limits=limits))
    yield handle
    handle.stop(0)


def _field(num: int, data: bytes) -> bytes:
    assert len(data) < 128
    return bytes([num << 3 | 2, len(data)]) + data


def _raw_call(client: Client, method: str, body: bytes) -> grpc.RpcError:
    call = client.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as e:
        call(body, timeout=10)
    return e.value


def test_invalid_utf8_in_string_fields_is_invalid_argument_without_traceback(client, ev1, logs):
    before = len(logs.lines)
    token = client.challenge()
    body = _field(1, b"\x30\x00") + _field(2, token) + _field(3, b"\xff\xfe bad") + _field(4, b"sig")
    err = _raw_call(client, "/asps.v1.SecretProvision/GetSecrets", body)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert "not a valid asps.v1.SecretsRequest" in err.details()
    err = _raw_call(client, "/secretmanager.SecretManger/GetSecret", _field(1, b"\xc3(") + _field(2, b"x"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    new = logs.lines[before:]
    assert not [ln for ln in new if "Traceback" in ln or "deserializing" in ln], new
    assert client.get(ev1, ["master_key"]) == ("app1", {"master_key": V1.encode()})


def test_secrets_larger_than_the_reply_limit_are_resource_exhausted(client, ev1):
    req, _ = client.request(ev1, ["big"])
    err = client.refused(req)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
    assert "exceed the reply size limit" in err.details()
    assert client.get(ev1, ["master_key"]) == ("app1", {"master_key": V1.encode()})


class _HugeReply(asps_pb2_grpc.SecretProvisionServicer):
    """A stand-in server answering every GetSecrets with `size` bytes of junk."""

    def __init__(self, size: int) -> None:
        self.size = size

    def GetChallenge(self, request, context):
        return asps_pb2.Challenge(token=secrets.token_bytes(57), expires_at=0)

    def GetSecrets(self, request, context):
        return asps_pb2.SecretsReply(app_id="app1", sealed=b"\0" * self.size)


@pytest.mark.parametrize("oversized", [True, False])
def test_client_refuses_a_reply_over_its_receive_limit(env, ev1, oversized):
    size = asps_client.MAX_REPLY_BYTES + 1024 if oversized else 1024
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    asps_pb2_grpc.add_SecretProvisionServicer_to_server(_HugeReply(size), server)
    creds = grpc.ssl_server_credentials(
        [((env.certs / "server.key").read_bytes(), (env.certs / "server.crt").read_bytes())]
    )
    port = server.add_secure_port("localhost:0", creds)
    server.start()
    try:
        with pytest.raises(asps_client.ClientError) as e:
            asps_client.fetch_secrets(f"localhost:{port}", ca=env.ca, names=["master_key"], evidence=ev1)
    finally:
        server.stop(0)
    if oversized:
        assert e.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
    else:  # the same junk under the limit reaches the client, which cannot open it
        assert isinstance(e.value, asps_client.BadReply), e.value


# --- 6. --reflection without grpcio-reflection ----------------------------------------------------------


def test_reflection_without_the_package_is_a_startup_error(env, monkeypatch):
    policy = write_policy(env.tmp / "policy-refl.json", doc())
    monkeypatch.setitem(sys.modules, "grpc_reflection", None)
    monkeypatch.setitem(sys.modules, "grpc_reflection.v1alpha", None)
    with pytest.raises(asps_server.StartupError, match="grpcio-reflection"):
        asps_server.serve(env.config(policy, reflection=True))


def test_reflection_without_the_package_exits_2_with_a_clear_message(env):
    policy = write_policy(env.tmp / "policy-refl2.json", doc())
    cfg = env.config(policy)
    script = (
        "import sys; sys.modules['grpc_reflection'] = None; sys.modules['grpc_reflection.v1alpha'] = None;"
        "import asps_server; sys.exit(asps_server.main(sys.argv[1:]))"
    )
    args = ["--host", "127.0.0.1:0", "--cert", cfg.cert, "--key", cfg.key, "--policy", cfg.policy]
    args += ["--collateral", cfg.collateral, "--root-ca", cfg.root_ca, "--reflection"]
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "grpcio-reflection" in proc.stderr and "Traceback" not in proc.stderr


def test_grpcio_reflection_is_a_runtime_requirement(repo_dir):
    lines = [ln.split("#")[0].strip() for ln in (repo_dir / "requirements.in").read_text().splitlines()]
    assert any(ln.startswith("grpcio-reflection") for ln in lines)


def test_zz_no_secret_in_any_log_line(logs):
    assert_no_secret_in(logs.lines, [V1, BIG[:60], TOKEN_KEY])
